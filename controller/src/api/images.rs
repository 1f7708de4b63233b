//! `/1.0/images`: list, build, import, delete, and aliases.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use berth_proto::api::{self, ImageAlias, ImageAliasesPost, ImagesPost};
use berth_proto::v1::{self, image_import_chunk};
use http::HeaderMap;
use serde::Deserialize;
use tracing::{info, warn};

use super::operations::{new_operation, run_task, sync};
use super::{ApiError, JsonBody, SharedState};
use crate::agents::LONG_CALL;
use crate::clock;
use crate::state::{Alias, Command, Image, State as ClusterState};

/// Image recipes a node can build.
pub const RECIPES: &[&str] = &["busybox", "debian/12"];

fn to_api(img: &Image, aliases: &BTreeMap<String, Alias>) -> api::Image {
    api::Image {
        fingerprint: img.fingerprint.clone(),
        aliases: aliases
            .values()
            .filter(|a| a.target == img.fingerprint)
            .map(|a| ImageAlias {
                name: a.name.clone(),
                description: a.description.clone(),
            })
            .collect(),
        architecture: img.architecture.clone(),
        properties: img.properties.clone(),
        size: img.size,
        created_at: img.created_at.clone(),
        uploaded_at: img.uploaded_at.clone(),
        locations: img.locations.iter().cloned().collect(),
    }
}

fn from_agent(img: &v1::Image, node: &str) -> Image {
    Image {
        fingerprint: img.fingerprint.clone(),
        properties: img.properties.clone().into_iter().collect(),
        architecture: img.architecture.clone(),
        size: img.size_bytes,
        created_at: clock::format_unix(img.created_at),
        uploaded_at: clock::now(),
        locations: [node.to_string()].into(),
        projects: Default::default(),
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    recursion: u8,
}

/// `GET /1.0/images`.
pub async fn list(
    State(state): State<SharedState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let images: Vec<api::Image> = state
        .cp
        .read(|s| s.images.values().map(|i| to_api(i, &s.aliases)).collect())
        .await?;
    if q.recursion == 0 {
        return Ok(sync(
            images
                .iter()
                .map(|i| format!("/1.0/images/{}", i.fingerprint))
                .collect::<Vec<_>>(),
        ));
    }
    Ok(sync(images))
}

/// `GET /1.0/images/{fingerprint}` (an alias or a unique prefix works too).
pub async fn get_one(
    State(state): State<SharedState>,
    Path(fp): Path<String>,
) -> Result<Response, ApiError> {
    let img = state
        .cp
        .read(|s| s.resolve_image(&fp).map(|i| to_api(i, &s.aliases)))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("image \"{fp}\" not found")))?;
    Ok(sync(img))
}

/// The node that builds or receives an image: the least loaded online node.
async fn pick_node(state: &SharedState) -> Result<crate::state::Node, ApiError> {
    state
        .cp
        .read(|s: &ClusterState| {
            let usage = crate::scheduler::node_usage(s);
            s.nodes
                .values()
                .filter(|n| n.status == crate::state::NodeStatus::Online)
                .min_by_key(|n| {
                    (
                        usage.get(&n.name).map(|u| u.instances).unwrap_or(0),
                        n.name.clone(),
                    )
                })
                .cloned()
        })
        .await?
        .ok_or_else(|| ApiError::bad_request("no node is online to hold the image"))
}

async fn record_image(
    state: &SharedState,
    img: Image,
    aliases: &[ImageAlias],
) -> Result<(), ApiError> {
    let fp = img.fingerprint.clone();
    state.cp.write(Command::PutImage { image: img }).await?;
    for a in aliases {
        state
            .cp
            .write(Command::PutAlias {
                alias: Alias {
                    name: a.name.clone(),
                    project: crate::state::DEFAULT_PROJECT.into(),
                    target: fp.clone(),
                    description: a.description.clone(),
                },
            })
            .await?;
    }
    Ok(())
}

/// `?target=NODE`.
#[derive(Debug, Default, Deserialize)]
pub struct TargetQuery {
    #[serde(default)]
    target: String,
}

/// `POST /1.0/images`: a JSON body builds an image on a node; an `application/octet-stream`
/// body imports an LXD/Incus image tarball.
pub async fn create(
    State(state): State<SharedState>,
    Query(target): Query<TargetQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let is_upload = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    if is_upload {
        return import(state, headers, body).await;
    }
    let bytes = axum::body::to_bytes(body, super::MAX_JSON_BODY)
        .await
        .map_err(|_| ApiError::bad_request("request body is not readable or larger than 1 MiB"))?;
    let req: ImagesPost = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    if req.source.kind != "build" {
        return Err(ApiError::bad_request(format!(
            "image source type \"{}\" is not supported; use \"build\" or upload a tarball",
            req.source.kind
        )));
    }
    if !RECIPES.contains(&req.source.recipe.as_str()) {
        return Err(ApiError::bad_request(format!(
            "unknown image recipe \"{}\"; known recipes: {}",
            req.source.recipe,
            RECIPES.join(", ")
        )));
    }
    let mirror = &req.source.mirror;
    if !(mirror.is_empty() || mirror.starts_with("http://") || mirror.starts_with("https://")) {
        return Err(ApiError::bad_request(
            "mirror must be an http:// or https:// URL",
        ));
    }
    for a in &req.aliases {
        api::names::validate_image_alias(&a.name).map_err(ApiError::bad_request)?;
    }
    let aliases = if req.aliases.is_empty() {
        vec![ImageAlias {
            name: req.source.recipe.clone(),
            description: String::new(),
        }]
    } else {
        req.aliases.clone()
    };
    // Every online node builds the image unless one is named: instances can then be placed
    // anywhere (nodes do not copy images between themselves yet). Recipes are reproducible
    // where they can be (busybox gives the same fingerprint everywhere); where they are not
    // (debootstrap), each node's build is its own image and the alias names the first.
    let nodes = build_nodes(&state, &target.target).await?;
    let op = new_operation(
        &state,
        "task",
        &format!("Building image {}", req.source.recipe),
        BTreeMap::new(),
    );
    let st = state.clone();
    run_task(&state, op, async move {
        let builds = nodes.iter().map(|node| {
            let st = st.clone();
            let recipe = req.source.recipe.clone();
            let mirror = req.source.mirror.clone();
            async move {
                let mut call = tonic::Request::new(v1::BuildImageRequest { recipe, mirror });
                call.set_timeout(LONG_CALL);
                let built = match st.agents.client(node) {
                    Ok(mut c) => c
                        .build_image(call)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(ApiError::from),
                    Err(e) => Err(e.into()),
                };
                (node.name.clone(), built)
            }
        });
        let mut first = None;
        let mut failures = Vec::new();
        for (node, built) in futures::future::join_all(builds).await {
            match built {
                Ok(img) => {
                    info!(fingerprint = %img.fingerprint, %node, "image built");
                    let names: &[ImageAlias] = if first.is_none() { &aliases } else { &[] };
                    if first.as_ref().is_some_and(|fp| *fp != img.fingerprint) {
                        warn!(%node, fingerprint = %img.fingerprint, "the build is not reproducible; the node keeps its own image");
                    }
                    record_image(&st, from_agent(&img, &node), names).await?;
                    first.get_or_insert(img.fingerprint);
                }
                Err(e) => {
                    warn!(%node, error = %e.message, "image build failed");
                    failures.push(format!("{node}: {}", e.message));
                }
            }
        }
        match first {
            Some(fp) if failures.is_empty() => Ok(serde_json::json!({ "fingerprint": fp })),
            Some(_) => Err(ApiError::internal(format!(
                "the image was built on some nodes but failed on {}",
                failures.join("; ")
            ))),
            None => Err(ApiError::internal(format!(
                "the image build failed: {}",
                failures.join("; ")
            ))),
        }
    })
    .await
}

/// The nodes that build an image: `target` when given (it must be online), else every
/// online node.
async fn build_nodes(
    state: &SharedState,
    target: &str,
) -> Result<Vec<crate::state::Node>, ApiError> {
    let nodes: Vec<crate::state::Node> = state
        .cp
        .read(|s| {
            s.nodes
                .values()
                .filter(|n| n.status == crate::state::NodeStatus::Online)
                .cloned()
                .collect()
        })
        .await?;
    if target.is_empty() {
        if nodes.is_empty() {
            return Err(ApiError::bad_request(
                "no node is online to build the image",
            ));
        }
        return Ok(nodes);
    }
    match nodes.into_iter().find(|n| n.name == target) {
        Some(n) => Ok(vec![n]),
        None => Err(ApiError::bad_request(format!(
            "node {target} does not exist or is offline"
        ))),
    }
}

async fn import(state: SharedState, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let text = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let format = match text("X-Berth-Image-Format").as_str() {
        "" | "unified" => "unified".to_string(),
        "split" => "split".to_string(),
        other => {
            return Err(ApiError::bad_request(format!(
                "image format \"{other}\" is not unified or split"
            )));
        }
    };
    let metadata_size: u64 = match text("X-Berth-Metadata-Size").as_str() {
        "" => 0,
        s => s
            .parse()
            .map_err(|_| ApiError::bad_request("X-Berth-Metadata-Size is not a number"))?,
    };
    if format == "split" && metadata_size == 0 {
        return Err(ApiError::bad_request(
            "a split image needs X-Berth-Metadata-Size",
        ));
    }
    let aliases: Vec<String> = text("X-Berth-Aliases")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for a in &aliases {
        api::names::validate_image_alias(a).map_err(ApiError::bad_request)?;
    }
    let node = pick_node(&state).await?;
    let header = v1::ImageImportChunk {
        msg: Some(image_import_chunk::Msg::Header(v1::ImageImportHeader {
            format,
            metadata_size,
            aliases: aliases.clone(),
        })),
    };
    // A broken-off upload cancels the call, so the agent never imports a truncated file.
    let (stream, broke_rx) =
        super::forward_upload(header, body.into_data_stream(), true, |bytes| {
            v1::ImageImportChunk {
                msg: Some(image_import_chunk::Msg::Data(bytes)),
            }
        });
    // The upload is read now, while the client sends it; the operation reports the result.
    let mut call = tonic::Request::new(stream);
    call.set_timeout(LONG_CALL);
    let mut client = state.agents.client(&node)?;
    let img = tokio::select! {
        r = client.import_image(call) => r?.into_inner(),
        Ok(why) = broke_rx => {
            return Err(ApiError::bad_request(format!("the upload broke off: {why}")));
        }
    };
    let op = new_operation(&state, "task", "Importing image", BTreeMap::new());
    let st = state.clone();
    let alias_list: Vec<ImageAlias> = aliases
        .into_iter()
        .map(|name| ImageAlias {
            name,
            description: String::new(),
        })
        .collect();
    run_task(&state, op, async move {
        let fp = img.fingerprint.clone();
        record_image(&st, from_agent(&img, &node.name), &alias_list).await?;
        Ok(serde_json::json!({ "fingerprint": fp }))
    })
    .await
}

/// `DELETE /1.0/images/{fingerprint}`: removes the image from every node that holds it.
pub async fn delete(
    State(state): State<SharedState>,
    Path(fp): Path<String>,
) -> Result<Response, ApiError> {
    let (img, nodes) = state
        .cp
        .read(|s| {
            let img = s.resolve_image(&fp).cloned();
            let nodes: Vec<_> = img
                .as_ref()
                .map(|i| {
                    i.locations
                        .iter()
                        .filter_map(|n| s.nodes.get(n).cloned())
                        .collect()
                })
                .unwrap_or_default();
            (img, nodes)
        })
        .await?;
    let img = img.ok_or_else(|| ApiError::not_found(format!("image \"{fp}\" not found")))?;
    let op = new_operation(&state, "task", "Deleting image", BTreeMap::new());
    let st = state.clone();
    run_task(&state, op, async move {
        for n in nodes {
            match st
                .agents
                .client(&n)?
                .delete_image(crate::agents::short(v1::DeleteImageRequest {
                    fingerprint: img.fingerprint.clone(),
                }))
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        st.cp
            .write(Command::DeleteImage {
                fingerprint: img.fingerprint.clone(),
            })
            .await?;
        Ok(serde_json::Value::Null)
    })
    .await
}

/// `GET /1.0/images/aliases`.
pub async fn list_aliases(
    State(state): State<SharedState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let aliases: Vec<Alias> = state
        .cp
        .read(|s| s.aliases.values().cloned().collect())
        .await?;
    if q.recursion == 0 {
        return Ok(sync(
            aliases
                .iter()
                .map(|a| format!("/1.0/images/aliases/{}", a.name))
                .collect::<Vec<_>>(),
        ));
    }
    Ok(sync(
        aliases
            .iter()
            .map(|a| serde_json::json!({"name": a.name, "target": a.target, "description": a.description}))
            .collect::<Vec<_>>(),
    ))
}

/// `GET /1.0/images/aliases/{name}`.
pub async fn get_alias(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let a = state
        .cp
        .read(|s| s.aliases.get(&name).cloned())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("image alias \"{name}\" not found")))?;
    Ok(sync(
        serde_json::json!({"name": a.name, "target": a.target, "description": a.description}),
    ))
}

/// `POST /1.0/images/aliases`.
pub async fn create_alias(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<ImageAliasesPost>,
) -> Result<Response, ApiError> {
    api::names::validate_image_alias(&req.name).map_err(ApiError::bad_request)?;
    let target = state
        .cp
        .read(|s| s.resolve_image(&req.target).map(|i| i.fingerprint.clone()))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("image \"{}\" not found", req.target)))?;
    state
        .cp
        .write(Command::PutAlias {
            alias: Alias {
                name: req.name,
                project: crate::state::DEFAULT_PROJECT.into(),
                target,
                description: req.description,
            },
        })
        .await?;
    Ok(sync(serde_json::Value::Null))
}

/// `DELETE /1.0/images/aliases/{name}`.
pub async fn delete_alias(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    state.cp.write(Command::DeleteAlias { name }).await?;
    Ok(sync(serde_json::Value::Null))
}
