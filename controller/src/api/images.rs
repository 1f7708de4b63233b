//! `/1.0/images`: list, build, import, publish (from a stopped instance or a snapshot),
//! export (a streamed unified tarball), properties and the public flag (PUT, PATCH), delete,
//! and aliases.
//!
//! Aliases belong to a project. Images built or imported by a project are that project's
//! (`Image.projects`); those of the default project are shared with every project. A key
//! sees the images its project may use (public images included) and only its project's
//! aliases; anything else is 404, as if it did not exist.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use berth_proto::api::{self, ImageAlias, ImageAliasesPost, ImagesPost};
use berth_proto::v1::{self, image_import_chunk};
use http::HeaderMap;
use serde::Deserialize;
use tracing::{info, warn};

use super::error::{guard_if_match, if_match, with_etag};
use super::operations::{new_operation_in, run_task, sync};
use super::{ApiError, JsonBody, Scope, SharedState};
use crate::agents::LONG_CALL;
use crate::clock;
use crate::state::{Alias, Command, Image, ObjectKey, State as ClusterState};

/// Image recipes a node can build.
pub const RECIPES: &[&str] = &["busybox", "debian/12"];

/// Largest image upload accepted (8 GiB): more is answered 413.
pub const MAX_IMAGE_UPLOAD: u64 = 8 << 30;

/// An image as `project` sees it: with the project's aliases for it.
fn to_api(img: &Image, aliases: &BTreeMap<String, Alias>, project: &str) -> api::Image {
    api::Image {
        fingerprint: img.fingerprint.clone(),
        aliases: aliases
            .values()
            .filter(|a| a.target == img.fingerprint && a.project == project)
            .map(|a| ImageAlias {
                name: a.short_name().to_string(),
                description: a.description.clone(),
            })
            .collect(),
        architecture: img.architecture.clone(),
        properties: img.properties.clone(),
        size: img.size,
        created_at: img.created_at.clone(),
        uploaded_at: img.uploaded_at.clone(),
        locations: img.locations.iter().cloned().collect(),
        public: img.public,
        last_used_at: img.last_used_at.clone(),
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
        origins: [node.to_string()].into(),
        ..Image::default()
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    recursion: u8,
    /// Fleet keys: every image, whichever project holds it.
    #[serde(default, rename = "all-projects")]
    all_projects: bool,
}

/// `GET /1.0/images`: the images the `?project=` project may use (every image with
/// `?all-projects=true`, for fleet keys).
pub async fn list(
    State(state): State<SharedState>,
    scope: Scope,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    if q.all_projects {
        scope.identity.require_fleet()?;
    }
    let project = scope.project.clone();
    let images: Vec<api::Image> = state
        .cp
        .read(|s| {
            s.images
                .values()
                .filter(|i| q.all_projects || s.image_visible(i, &project))
                .map(|i| to_api(i, &s.aliases, &project))
                .collect()
        })
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

/// The image `key` (an alias of the project or of the default project, a fingerprint or a
/// unique prefix of one) as `project` may use it. Keys with `@` (the internal form of project
/// aliases) are never looked up, and a prefix is matched among the images the project may
/// use only, so that another project's images cannot make it ambiguous.
fn resolve_in<'a>(s: &'a ClusterState, project: &str, key: &str) -> Option<&'a Image> {
    if key.contains('@') {
        return None;
    }
    for p in [project, crate::state::DEFAULT_PROJECT] {
        if let Some(alias) = s.aliases.get(&crate::state::alias_key(p, key)) {
            return s.images.get(&alias.target);
        }
    }
    if let Some(img) = s.images.get(key) {
        return s.image_visible(img, project).then_some(img);
    }
    if key.len() < crate::state::MIN_FINGERPRINT_PREFIX
        || !key.chars().all(|c| c.is_ascii_hexdigit())
    {
        return None;
    }
    let mut matches = s
        .images
        .range(key.to_string()..)
        .take_while(|(fp, _)| fp.starts_with(key))
        .map(|(_, img)| img)
        .filter(|img| s.image_visible(img, project));
    let first = matches.next()?;
    matches.next().is_none().then_some(first)
}

fn image_not_found(key: &str) -> ApiError {
    ApiError::not_found(format!("image \"{}\" not found", key.escape_debug()))
}

/// `GET /1.0/images/{fingerprint}` (an alias or a unique prefix works too), with its `ETag`.
pub async fn get_one(
    State(state): State<SharedState>,
    scope: Scope,
    Path(fp): Path<String>,
) -> Result<Response, ApiError> {
    let (img, etag) = state
        .cp
        .read(|s| {
            resolve_in(s, &scope.project, &fp).map(|i| {
                (
                    to_api(i, &s.aliases, &scope.project),
                    s.etag(&ObjectKey::Image(i.fingerprint.clone())),
                )
            })
        })
        .await?
        .ok_or_else(|| image_not_found(&fp))?;
    Ok(with_etag(sync(img), etag))
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

/// Records an image as `scope`'s project's (its aliases in that project).
async fn record_image(
    state: &SharedState,
    scope: &Scope,
    mut img: Image,
    aliases: &[ImageAlias],
) -> Result<(), ApiError> {
    let fp = img.fingerprint.clone();
    img.projects.insert(scope.project.clone());
    state
        .cp
        .write(scope.by(Command::PutImage { image: img }))
        .await?;
    for a in aliases {
        state
            .cp
            .write(scope.by(Command::PutAlias {
                alias: Alias {
                    name: scope.alias_key(&a.name),
                    project: scope.project.clone(),
                    target: fp.clone(),
                    description: a.description.clone(),
                },
            }))
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
/// body imports an LXD/Incus image tarball. The image is the `?project=` project's. Viewers
/// may not, nor members in the default project (its images are shared); a restricted
/// project's keys may not name a `?target=` node.
pub async fn create(
    State(state): State<SharedState>,
    scope: Scope,
    Query(target): Query<TargetQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_image_write(&scope)?;
    if !target.target.is_empty() {
        state
            .cp
            .read_local(|m| scope.require_unrestricted(m, "choosing the node (--target)"))?;
    }
    let is_upload = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    if is_upload {
        return import(state, scope, headers, body).await;
    }
    let bytes = axum::body::to_bytes(body, super::MAX_JSON_BODY)
        .await
        .map_err(|_| ApiError::bad_request("request body is not readable or larger than 1 MiB"))?;
    let req: ImagesPost = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    check_may_publish(&scope, req.public, false)?;
    if matches!(req.source.kind.as_str(), "instance" | "snapshot") {
        return publish(state, scope, req).await;
    }
    if req.source.kind != "build" {
        return Err(ApiError::bad_request(format!(
            "image source type \"{}\" is not supported; use \"build\", \"instance\", \"snapshot\" or upload a tarball",
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
    validate_properties(&req.properties)?;
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
    // Every online node builds the image unless one is named, so that the first launches
    // anywhere need no pull (a node that lacks an image pulls it from a holder before a
    // create). Recipes are reproducible where they can be (busybox gives the same fingerprint
    // everywhere); where they are not (debootstrap), each node's build is its own image and
    // the alias names the first.
    let nodes = build_nodes(&state, &target.target).await?;
    let op = new_operation_in(
        &state,
        &scope.project,
        "task",
        &format!("Building image {}", req.source.recipe),
        BTreeMap::new(),
    );
    let st = state.clone();
    let sc = scope.clone();
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
                    let mut image = from_agent(&img, &node);
                    image.properties.extend(req.properties.clone());
                    image.public = req.public;
                    record_image(&st, &sc, image, names).await?;
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

/// The body of an upload, cut off with an error once it passes `limit` bytes; `over` is set
/// when that happens, so the answer can be a 413.
fn capped(body: Body, limit: u64, over: Arc<AtomicBool>) -> Body {
    use futures::StreamExt as _;
    let mut seen: u64 = 0;
    Body::from_stream(body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(axum::BoxError::from)?;
        seen = seen.saturating_add(chunk.len() as u64);
        if seen > limit {
            over.store(true, Ordering::SeqCst);
            return Err(axum::BoxError::from(format!(
                "image upload is larger than the limit of {limit} bytes"
            )));
        }
        Ok(chunk)
    }))
}

async fn import(
    state: SharedState,
    scope: Scope,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_IMAGE_UPLOAD) {
        return Err(ApiError::too_large("image upload", MAX_IMAGE_UPLOAD));
    }
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
    let over = Arc::new(AtomicBool::new(false));
    let body = capped(body, MAX_IMAGE_UPLOAD, over.clone());
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
            if over.load(Ordering::SeqCst) {
                return Err(ApiError::too_large("image upload", MAX_IMAGE_UPLOAD));
            }
            return Err(ApiError::bad_request(format!("the upload broke off: {why}")));
        }
    };
    let op = new_operation_in(
        &state,
        &scope.project,
        "task",
        "Importing image",
        BTreeMap::new(),
    );
    let st = state.clone();
    let sc = scope.clone();
    let alias_list: Vec<ImageAlias> = aliases
        .into_iter()
        .map(|name| ImageAlias {
            name,
            description: String::new(),
        })
        .collect();
    run_task(&state, op, async move {
        let fp = img.fingerprint.clone();
        record_image(&st, &sc, from_agent(&img, &node.name), &alias_list).await?;
        Ok(serde_json::json!({ "fingerprint": fp }))
    })
    .await
}

/// 403 unless `scope` may change the images and aliases of its project: those of the default
/// project are every project's fallback, so there only fleet keys (admin, operator) may.
fn require_image_write(scope: &Scope) -> Result<(), ApiError> {
    scope.require_write()?;
    if scope.project == crate::state::DEFAULT_PROJECT && !scope.identity.is_fleet() {
        return Err(ApiError::forbidden(
            "images and aliases of the default project are shared with every project; changing them needs an admin or operator key",
        ));
    }
    Ok(())
}

/// Whether `scope` may delete `img` (which it sees): fleet keys always; a member only an
/// image its project holds alone (shared images of the default project are the fleet's).
fn may_delete(scope: &Scope, img: &Image) -> bool {
    scope.identity.is_fleet()
        || (scope.project != crate::state::DEFAULT_PROJECT
            && img.projects.len() == 1
            && img.projects.contains(&scope.project))
}

/// `DELETE /1.0/images/{fingerprint}`: removes the image from every node that holds it.
/// Fleet keys, or a member of the one project that holds it; `If-Match` is honoured.
pub async fn delete(
    State(state): State<SharedState>,
    scope: Scope,
    Path(fp): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (img, nodes) = state
        .cp
        .read(|s| {
            let img = resolve_in(s, &scope.project, &fp).cloned();
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
    let img = img.ok_or_else(|| image_not_found(&fp))?;
    require_image_write(&scope)?;
    // A member deleting an image its project holds with others lets go of it (its aliases
    // too); the image stays for the others, and nothing says who they are.
    let unshare = !scope.identity.is_fleet()
        && img.projects.len() > 1
        && img.projects.contains(&scope.project);
    if !unshare && !may_delete(&scope, &img) {
        return Err(ApiError::forbidden(format!(
            "image {} is shared with other projects; only an admin or operator key can delete it",
            img.fingerprint
        )));
    }
    let expect = if_match(&headers)?;
    let op = new_operation_in(
        &state,
        &scope.project,
        "task",
        "Deleting image",
        BTreeMap::new(),
    );
    let st = state.clone();
    run_task(&state, op, async move {
        let fingerprint = img.fingerprint.clone();
        let command = if unshare {
            Command::UnshareImage {
                fingerprint: fingerprint.clone(),
                project: scope.project.clone(),
            }
        } else {
            for n in nodes {
                match st
                    .agents
                    .client(&n)?
                    .delete_image(crate::agents::short(v1::DeleteImageRequest {
                        fingerprint: fingerprint.clone(),
                    }))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code() == tonic::Code::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Command::DeleteImage {
                fingerprint: fingerprint.clone(),
            }
        };
        let command = super::instances::guarded(command, ObjectKey::Image(fingerprint), expect);
        st.cp.write(scope.by(command)).await?;
        Ok(serde_json::Value::Null)
    })
    .await
}

/// An alias as the API shows it (its own name, without the project).
fn alias_view(a: &Alias) -> serde_json::Value {
    serde_json::json!({"name": a.short_name(), "target": a.target, "description": a.description})
}

/// `GET /1.0/images/aliases`: the `?project=` project's aliases.
pub async fn list_aliases(
    State(state): State<SharedState>,
    scope: Scope,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let aliases: Vec<Alias> = state
        .cp
        .read(|s| {
            s.aliases
                .values()
                .filter(|a| a.project == scope.project)
                .cloned()
                .collect()
        })
        .await?;
    if q.recursion == 0 {
        let suffix = scope.url_suffix();
        return Ok(sync(
            aliases
                .iter()
                .map(|a| format!("/1.0/images/aliases/{}{suffix}", a.short_name()))
                .collect::<Vec<_>>(),
        ));
    }
    Ok(sync(aliases.iter().map(alias_view).collect::<Vec<_>>()))
}

/// The state key of alias `name` of `scope`'s project, once `name` is a valid alias (so that
/// it cannot name another project's alias).
fn alias_key_of(scope: &Scope, name: &str) -> Result<String, ApiError> {
    api::names::validate_image_alias(name).map_err(ApiError::bad_request)?;
    Ok(scope.alias_key(name))
}

fn alias_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("image alias \"{}\" not found", name.escape_debug()))
}

/// `GET /1.0/images/aliases/{name}`, with its `ETag`.
pub async fn get_alias(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = alias_key_of(&scope, &name).map_err(|_| alias_not_found(&name))?;
    let (a, etag) = state
        .cp
        .read(|s| {
            s.aliases
                .get(&key)
                .map(|a| (alias_view(a), s.etag(&ObjectKey::Alias(key.clone()))))
        })
        .await?
        .ok_or_else(|| alias_not_found(&name))?;
    Ok(with_etag(sync(a), etag))
}

/// `POST /1.0/images/aliases`: a new alias in the `?project=` project for an image it may use
/// (409 if the name is taken; in the default project, fleet keys only).
pub async fn create_alias(
    State(state): State<SharedState>,
    scope: Scope,
    JsonBody(req): JsonBody<ImageAliasesPost>,
) -> Result<Response, ApiError> {
    require_image_write(&scope)?;
    let key = alias_key_of(&scope, &req.name)?;
    let (exists, target) = state
        .cp
        .read(|s| {
            (
                s.aliases.contains_key(&key),
                resolve_in(s, &scope.project, &req.target).map(|i| i.fingerprint.clone()),
            )
        })
        .await?;
    if exists {
        return Err(ApiError::conflict(format!(
            "image alias \"{}\" already exists; delete it first to point it elsewhere",
            req.name.escape_debug()
        )));
    }
    let target = target.ok_or_else(|| image_not_found(&req.target))?;
    state
        .cp
        .write(scope.by(Command::CreateAlias {
            alias: Alias {
                name: key,
                project: scope.project.clone(),
                target,
                description: req.description,
            },
        }))
        .await?;
    Ok(sync(serde_json::Value::Null))
}

/// `DELETE /1.0/images/aliases/{name}`; `If-Match` is honoured.
pub async fn delete_alias(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = alias_key_of(&scope, &name).map_err(|_| alias_not_found(&name))?;
    // A key that may not delete learns whether the alias exists (404) or not (403) from a
    // linearizable read; a key that may goes straight to the write, whose not-found (from
    // apply, so never stale) is mapped below. That saves a read on every delete.
    if let Err(forbidden) = require_image_write(&scope) {
        if !state.cp.read(|s| s.aliases.contains_key(&key)).await? {
            return Err(alias_not_found(&name));
        }
        return Err(forbidden);
    }
    let command = guard_if_match(
        &headers,
        ObjectKey::Alias(key.clone()),
        Command::DeleteAlias { name: key },
    )?;
    state.cp.write(scope.by(command)).await.map_err(|e| {
        // The apply error names the internal key; say it with the alias's own name.
        let e = ApiError::from(e);
        if e.status == http::StatusCode::NOT_FOUND {
            alias_not_found(&name)
        } else {
            e
        }
    })?;
    Ok(sync(serde_json::Value::Null))
}

/// Where a publish takes its image from: an instance (stopped) or one of its snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PublishSource {
    instance: String,
    /// `""`: the instance itself.
    snapshot: String,
}

/// Reads `source` of a publish: `{type: "instance", name}` or `{type: "snapshot", name:
/// "instance/snapshot"}`.
fn publish_source(source: &api::ImageSource) -> Result<PublishSource, ApiError> {
    let name = source.name.trim();
    let (instance, snapshot) = match source.kind.as_str() {
        "instance" => (name, ""),
        _ => name.split_once('/').ok_or_else(|| {
            ApiError::bad_request(format!(
                "snapshot source \"{}\" must be INSTANCE/SNAPSHOT",
                name.escape_debug()
            ))
        })?,
    };
    if instance.is_empty() {
        return Err(ApiError::bad_request(
            "the source needs the name of the instance to publish",
        ));
    }
    if source.kind == "snapshot" {
        api::names::validate_snapshot_name(snapshot).map_err(ApiError::bad_request)?;
    }
    Ok(PublishSource {
        instance: instance.to_string(),
        snapshot: snapshot.to_string(),
    })
}

/// Most properties an image may carry, and the longest key and value.
const MAX_PROPERTIES: usize = 256;
const MAX_PROPERTY_KEY: usize = 128;
const MAX_PROPERTY_VALUE: usize = 4096;

/// Checks image properties: at most [`MAX_PROPERTIES`], keys of 1 to 128 printable
/// characters without spaces, values up to 4096 bytes without control characters other
/// than newlines and tabs.
fn validate_properties(properties: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if properties.len() > MAX_PROPERTIES {
        return Err(ApiError::bad_request(format!(
            "an image has at most {MAX_PROPERTIES} properties, not {}",
            properties.len()
        )));
    }
    for (k, v) in properties {
        if k.is_empty()
            || k.len() > MAX_PROPERTY_KEY
            || k.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ApiError::bad_request(format!(
                "image property name \"{}\" must be 1 to {MAX_PROPERTY_KEY} characters without spaces or control characters",
                k.escape_debug()
            )));
        }
        if v.len() > MAX_PROPERTY_VALUE
            || v.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(ApiError::bad_request(format!(
                "image property {k} must be at most {MAX_PROPERTY_VALUE} bytes without control characters"
            )));
        }
    }
    Ok(())
}

/// `POST /1.0/images` with `source: {type: "instance" | "snapshot", name}`: makes an image of
/// a stopped instance, or of a snapshot, of the scope's project, on the instance's node.
/// Aliases that exist are a 409 before anything is done. The operation's metadata carries
/// the new image's `fingerprint`.
async fn publish(state: SharedState, scope: Scope, req: ImagesPost) -> Result<Response, ApiError> {
    let source = publish_source(&req.source)?;
    for a in &req.aliases {
        api::names::validate_image_alias(&a.name).map_err(ApiError::bad_request)?;
    }
    validate_properties(&req.properties)?;
    let keys: Vec<(String, String)> = req
        .aliases
        .iter()
        .map(|a| (a.name.clone(), scope.alias_key(&a.name)))
        .collect();
    let taken = state
        .cp
        .read(|s| {
            keys.iter()
                .find(|(_, k)| s.aliases.contains_key(k))
                .map(|(n, _)| n.clone())
        })
        .await?;
    if let Some(name) = taken {
        return Err(ApiError::conflict(format!(
            "image alias \"{}\" already exists; choose another name or delete it first",
            name.escape_debug()
        )));
    }
    let found = super::instances::lookup(&state, &scope, &source.instance).await?;
    let (inst, node) = (found.instance, found.node);
    let shown = &source.instance;
    if !source.snapshot.is_empty() && !inst.snapshots.contains_key(&source.snapshot) {
        return Err(ApiError::not_found(format!(
            "snapshot \"{shown}/{}\" not found",
            source.snapshot.escape_debug()
        )));
    }
    if let Some(p) = &inst.pending {
        return Err(ApiError::conflict(format!(
            "instance \"{shown}\" is busy with operation {}; wait for it to end",
            p.op
        )));
    }
    // A running instance is published from a snapshot taken for it (and deleted after):
    // never from a root filesystem that changes while it is read.
    let snapshot_first = source.snapshot.is_empty()
        && inst.observed.status != berth_proto::api::InstanceStatusCode::Stopped;
    if node.status != crate::state::NodeStatus::Online {
        return Err(ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {} is offline; instance \"{shown}\" cannot be published until it returns",
                node.name
            ),
        ));
    }
    let what = if source.snapshot.is_empty() {
        shown.clone()
    } else {
        format!("{shown}/{}", source.snapshot)
    };
    let op = new_operation_in(
        &state,
        &scope.project,
        "task",
        &format!("Publishing image from {what}"),
        super::operations::instance_resources_in(&scope.project, shown),
    );
    let st = state.clone();
    let temporary = format!("publish-{}", &op.id[..8.min(op.id.len())]);
    run_task(&state, op, async move {
        let snapshot = if snapshot_first {
            super::instances::action_and_wait(
                &st,
                &scope,
                &inst.name,
                "Taking a snapshot to publish",
                crate::state::Action::Snapshot {
                    name: temporary.clone(),
                    expires_at: String::new(),
                    scheduled: false,
                    due: String::new(),
                },
                None,
            )
            .await?;
            temporary.clone()
        } else {
            source.snapshot.clone()
        };
        let mut call = tonic::Request::new(v1::PublishImageRequest {
            instance: inst.name.clone(),
            snapshot,
            properties: req.properties.clone().into_iter().collect(),
        });
        call.set_timeout(LONG_CALL);
        let published = match st.agents.client(&node) {
            Ok(mut client) => client
                .publish_image(call)
                .await
                .map(|r| r.into_inner())
                .map_err(ApiError::from),
            Err(e) => Err(e.into()),
        };
        if snapshot_first
            && let Err(e) = super::instances::action_and_wait(
                &st,
                &scope,
                &inst.name,
                "Deleting the snapshot taken to publish",
                crate::state::Action::DeleteSnapshot {
                    name: temporary.clone(),
                },
                None,
            )
            .await
        {
            warn!(instance = %inst.name, snapshot = %temporary, error = %e, "could not delete the snapshot taken to publish");
        }
        let img = published?;
        info!(instance = %inst.name, node = %node.name, fingerprint = %img.fingerprint, "image published");
        let mut image = from_agent(&img, &node.name);
        image.properties.extend(req.properties.clone());
        image.public = req.public;
        image.projects.insert(scope.project.clone());
        let fp = image.fingerprint.clone();
        st.cp.write(scope.by(Command::PutImage { image })).await?;
        for a in &req.aliases {
            st.cp
                .write(scope.by(Command::CreateAlias {
                    alias: Alias {
                        name: scope.alias_key(&a.name),
                        project: scope.project.clone(),
                        target: fp.clone(),
                        description: a.description.clone(),
                    },
                }))
                .await?;
        }
        Ok(serde_json::json!({ "fingerprint": fp }))
    })
    .await
}

/// Only fleet keys make an image public: a public image is seen by every project (and its
/// fingerprint takes part in every project's prefix lookups).
fn check_may_publish(scope: &Scope, public: bool, was_public: bool) -> Result<(), ApiError> {
    if public && !was_public && !scope.identity.is_fleet() {
        return Err(ApiError::forbidden(
            "only an admin or operator key can make an image public",
        ));
    }
    Ok(())
}

/// A PATCH without `If-Match` that keeps meeting concurrent changes is tried this often.
const PATCH_ATTEMPTS: usize = 5;

/// Whether `scope` may change `img` (which it sees): fleet keys always; a member only an
/// image its project holds alone.
fn may_change(scope: &Scope, img: &Image) -> bool {
    may_delete(scope, img)
}

/// Replaces the properties and public flag of image `key` with what `build` makes of the
/// current image, guarded by `wanted` (the `If-Match` ETag) or, without one, by the ETag
/// read (tried again when another change came first).
async fn update_image<F>(
    state: SharedState,
    scope: Scope,
    key: String,
    wanted: Option<String>,
    build: F,
) -> Result<Response, ApiError>
where
    F: Fn(&Image) -> (BTreeMap<String, String>, bool),
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (img, etag) = state
            .cp
            .read(|s| {
                resolve_in(s, &scope.project, &key).map(|i| {
                    (
                        i.clone(),
                        s.etag(&ObjectKey::Image(i.fingerprint.clone()))
                            .unwrap_or_default(),
                    )
                })
            })
            .await?
            .ok_or_else(|| image_not_found(&key))?;
        require_image_write(&scope)?;
        if !may_change(&scope, &img) {
            return Err(ApiError::forbidden(format!(
                "image {} is not only project {}'s; only an admin or operator key can change it",
                img.fingerprint, scope.project
            )));
        }
        let what = format!("image {}", img.fingerprint);
        super::instances::check_if_match(&what, wanted.as_deref(), &etag)?;
        let (properties, public) = build(&img);
        validate_properties(&properties)?;
        check_may_publish(&scope, public, img.public)?;
        let command = super::instances::guarded(
            Command::UpdateImage {
                fingerprint: img.fingerprint.clone(),
                properties,
                public,
            },
            ObjectKey::Image(img.fingerprint.clone()),
            Some(wanted.clone().unwrap_or(etag)),
        );
        match state.cp.write(scope.by(command)).await {
            Ok(_) => {
                info!(fingerprint = %img.fingerprint, "image properties changed");
                return Ok(sync(serde_json::Value::Null));
            }
            Err(crate::raft::WriteError::Rejected(e))
                if e.kind == crate::state::ApplyErrorKind::PreconditionFailed
                    && wanted.is_none()
                    && attempt < PATCH_ATTEMPTS =>
            {
                continue;
            }
            Err(crate::raft::WriteError::Rejected(e))
                if e.kind == crate::state::ApplyErrorKind::PreconditionFailed
                    && wanted.is_none() =>
            {
                return Err(ApiError::conflict(format!(
                    "{what} keeps being changed by other requests; repeat the request"
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `PUT /1.0/images/{fingerprint}`: replaces the properties and the public flag; `If-Match`
/// is honoured. Fleet keys, or a member of the one project that holds the image.
pub async fn put(
    State(state): State<SharedState>,
    scope: Scope,
    Path(fingerprint): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<api::ImagePut>,
) -> Result<Response, ApiError> {
    let wanted = if_match(&headers)?;
    validate_properties(&body.properties)?;
    update_image(state, scope, fingerprint, wanted, move |_| {
        (body.properties.clone(), body.public)
    })
    .await
}

/// `PATCH /1.0/images/{fingerprint}`: `properties` are merged (a null value removes the key),
/// `public` is set when given.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePatch {
    #[serde(default)]
    properties: BTreeMap<String, Option<String>>,
    #[serde(default)]
    public: Option<bool>,
}

/// `img`'s properties and public flag with `patch` applied.
fn merge_patch(img: &Image, patch: &ImagePatch) -> (BTreeMap<String, String>, bool) {
    let mut properties = img.properties.clone();
    for (k, v) in &patch.properties {
        match v {
            Some(v) => properties.insert(k.clone(), v.clone()),
            None => properties.remove(k),
        };
    }
    (properties, patch.public.unwrap_or(img.public))
}

/// `PATCH /1.0/images/{fingerprint}`: merges properties (null removes one), sets `public`
/// when given; `If-Match` is honoured.
pub async fn patch(
    State(state): State<SharedState>,
    scope: Scope,
    Path(fingerprint): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ImagePatch>,
) -> Result<Response, ApiError> {
    let wanted = if_match(&headers)?;
    update_image(state, scope, fingerprint, wanted, move |img| {
        merge_patch(img, &body)
    })
    .await
}

/// `GET /1.0/images/{fingerprint}/export`: the image as an LXD/Incus unified tarball
/// (`application/octet-stream`, `Content-Disposition: attachment; filename=FP.tar.gz`),
/// streamed from an online node that holds it. Any image the scope's project may use.
pub async fn export(
    State(state): State<SharedState>,
    scope: Scope,
    Path(fingerprint): Path<String>,
) -> Result<Response, ApiError> {
    use futures::StreamExt as _;
    let (img, holders) = state
        .cp
        .read(|s| {
            resolve_in(s, &scope.project, &fingerprint).map(|i| {
                let mut holders: Vec<crate::state::Node> = i
                    .locations
                    .iter()
                    .filter_map(|n| s.nodes.get(n))
                    .filter(|n| n.status == crate::state::NodeStatus::Online)
                    .cloned()
                    .collect();
                holders.sort_by_key(|n| (!i.origins.contains(&n.name), n.name.clone()));
                (i.clone(), holders)
            })
        })
        .await?
        .ok_or_else(|| image_not_found(&fingerprint))?;
    let mut last = ApiError::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no node that holds image {} is online to export it",
            img.fingerprint
        ),
    );
    for node in holders {
        let mut call = tonic::Request::new(v1::ExportImageRequest {
            fingerprint: img.fingerprint.clone(),
        });
        call.set_timeout(LONG_CALL);
        let started = match state.agents.client(&node) {
            Ok(mut c) => c.export_image(call).await.map_err(ApiError::from),
            Err(e) => Err(e.into()),
        };
        let mut stream = match started {
            Ok(r) => r.into_inner(),
            Err(e) => {
                warn!(fingerprint = %img.fingerprint, node = %node.name, error = %e.message, "image export failed");
                last = e;
                continue;
            }
        };
        // The first chunk decides between an error answer and a stream.
        let first = match stream.message().await {
            Ok(first) => first,
            Err(e) => {
                warn!(fingerprint = %img.fingerprint, node = %node.name, error = %e.message(), "image export failed");
                last = e.into();
                continue;
            }
        };
        info!(fingerprint = %img.fingerprint, node = %node.name, "exporting image");
        let rest = stream.map(|chunk| {
            chunk
                .map(|c| c.data)
                .map_err(|e| std::io::Error::other(e.message().to_string()))
        });
        let head = futures::stream::iter(first.map(|c| Ok::<_, std::io::Error>(c.data)));
        let body = Body::from_stream(head.chain(rest));
        return Response::builder()
            .status(http::StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .header(
                http::header::CONTENT_DISPOSITION,
                format!("attachment; filename={}.tar.gz", img.fingerprint),
            )
            .body(body)
            .map_err(|e| ApiError::internal(format!("could not build the export answer: {e}")));
    }
    Err(last)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod api_tests {
    use super::*;
    use crate::api::projects::testkit::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn images_and_aliases_are_seen_by_project() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        api.put_image("bbbbbbbbbbbbbbbb", &["b"]).await;
        api.put_image("aaaaaaaaaaaaaaaa", &["a"]).await;
        // b's image shares a's prefix: a's prefix still finds a's image alone.
        api.put_image("aaaaaaaaaaaaaaab", &["b"]).await;
        // b names its image "mine"; the default project names the shared one "mine" too.
        for (key, project, target) in [
            (MEMBER_B, "b", "bbbbbbbbbbbbbbbb"),
            (ADMIN, "default", "img"),
        ] {
            let (status, body) = api
                .call(
                    key,
                    "POST",
                    &format!("/1.0/images/aliases?project={project}"),
                    Some(serde_json::json!({"name": "mine", "target": target})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
        // b's image is not a's to alias, see or delete.
        let (status, body) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/images/aliases",
                Some(serde_json::json!({"name": "x", "target": "bbbbbbbbbbbbbbbb"})),
            )
            .await;
        assert_eq!(status, 404, "{body}");
        for (method, path) in [
            ("GET", "/1.0/images/bbbbbbbbbbbbbbbb"),
            ("GET", "/1.0/images/bbbbbbbbbbbb"),
            ("DELETE", "/1.0/images/bbbbbbbbbbbbbbbb"),
            ("GET", "/1.0/images/b@mine"),
            ("GET", "/1.0/images/aliases/b@mine"),
            ("DELETE", "/1.0/images/aliases/b@mine"),
            ("GET", "/1.0/images/aliases/mine?project=b"),
        ] {
            let (status, body) = api.call(MEMBER_A, method, path, None).await;
            assert_eq!(status, 404, "{method} {path}: {body}");
            let text = body.to_string();
            assert!(
                !text.contains("shared") && !text.contains("target"),
                "{text}"
            );
        }
        // a sees the shared image and its own; "mine" resolves to the default project's.
        let (_, body) = api.call(MEMBER_A, "GET", "/1.0/images", None).await;
        let mut listed: Vec<String> = serde_json::from_value(body["metadata"].clone()).unwrap();
        listed.sort();
        assert_eq!(listed, ["/1.0/images/aaaaaaaaaaaaaaaa", "/1.0/images/img"]);
        let (status, body) = api
            .call(MEMBER_A, "GET", "/1.0/images/aaaaaaaaaaaa", None)
            .await;
        assert_eq!(
            (status, body["metadata"]["fingerprint"].as_str()),
            (200, Some("aaaaaaaaaaaaaaaa"))
        );
        let (status, body) = api.call(MEMBER_A, "GET", "/1.0/images/mine", None).await;
        assert_eq!(
            (status, body["metadata"]["fingerprint"].as_str()),
            (200, Some("img"))
        );
        let (_, body) = api.call(MEMBER_B, "GET", "/1.0/images/mine", None).await;
        assert_eq!(body["metadata"]["fingerprint"], "bbbbbbbbbbbbbbbb");
        assert_eq!(body["metadata"]["aliases"][0]["name"], "mine");
        let (_, body) = api
            .call(MEMBER_B, "GET", "/1.0/images/aliases?recursion=1", None)
            .await;
        assert_eq!(
            body["metadata"],
            serde_json::json!([{"name": "mine", "target": "bbbbbbbbbbbbbbbb", "description": ""}])
        );
        let (_, body) = api.call(MEMBER_B, "GET", "/1.0/images/aliases", None).await;
        assert_eq!(
            body["metadata"],
            serde_json::json!(["/1.0/images/aliases/mine?project=b"])
        );
        assert_eq!(
            api.call(MEMBER_A, "GET", "/1.0/images/aliases", None)
                .await
                .1["metadata"],
            serde_json::json!([])
        );
        assert_eq!(
            api.call(MEMBER_A, "GET", "/1.0/images?all-projects=true", None)
                .await
                .0,
            403
        );
        let (_, body) = api
            .call(OPERATOR, "GET", "/1.0/images?all-projects=true", None)
            .await;
        assert_eq!(body["metadata"].as_array().unwrap().len(), 4);

        // Viewers read only; members may not delete the shared image.
        let before = api.model().await;
        for (key, method, path, body) in [
            (
                VIEWER_A,
                "POST",
                "/1.0/images/aliases",
                Some(serde_json::json!({"name": "v", "target": "img"})),
            ),
            (
                VIEWER_A,
                "POST",
                "/1.0/images",
                Some(serde_json::json!({"source": {"type": "build", "recipe": "busybox"}})),
            ),
            (VIEWER_A, "DELETE", "/1.0/images/aaaaaaaaaaaaaaaa", None),
            (MEMBER_A, "DELETE", "/1.0/images/img", None),
        ] {
            let (status, answer) = api.call(key, method, path, body).await;
            assert_eq!(status, 403, "{key} {method} {path}: {answer}");
        }
        assert_eq!(api.model().await, before);

        // Aliases with If-Match; the member removes its own alias.
        let got = api
            .send(MEMBER_B, "GET", "/1.0/images/aliases/mine", None, &[])
            .await;
        assert_eq!(got.status, 200);
        let stale = api
            .send(
                MEMBER_B,
                "DELETE",
                "/1.0/images/aliases/mine",
                None,
                &[("if-match", "\"nope\"")],
            )
            .await;
        assert_eq!(stale.status, 412, "{}", stale.body);
        let etag = got.headers["etag"].to_str().unwrap().to_string();
        let ok = api
            .send(
                MEMBER_B,
                "DELETE",
                "/1.0/images/aliases/mine",
                None,
                &[("if-match", &etag)],
            )
            .await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert!(
            api.model().await.aliases.contains_key("mine"),
            "default's alias stays"
        );
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn default_project_images_are_changed_by_fleet_keys_only() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        const MEMBER_DEFAULT: &str = "member-default-secret";
        api.cp
            .write(Command::AddApiKey {
                key: crate::state::ApiKey {
                    id: "k6".into(),
                    name: "dora".into(),
                    hash: crate::api::key_hash(MEMBER_DEFAULT),
                    role: crate::state::Role::Member,
                    project: "default".into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap();
        let (status, body) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/images/aliases",
                Some(serde_json::json!({"name": "base", "target": "img"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let before = api.model().await;
        for (method, path, body) in [
            (
                "POST",
                "/1.0/images/aliases",
                Some(serde_json::json!({"name": "other", "target": "img"})),
            ),
            ("DELETE", "/1.0/images/aliases/base", None),
            (
                "POST",
                "/1.0/images",
                Some(serde_json::json!({"source": {"type": "build", "recipe": "busybox"}})),
            ),
            ("DELETE", "/1.0/images/img", None),
        ] {
            let (status, answer) = api.call(MEMBER_DEFAULT, method, path, body).await;
            assert_eq!(status, 403, "{method} {path}: {answer}");
            assert!(
                answer["error"]
                    .as_str()
                    .unwrap()
                    .contains("needs an admin or operator key"),
                "{answer}"
            );
        }
        // An existing name is a 409, whoever asks; nothing is overwritten.
        api.put_image("bbbbbbbbbbbbbbbb", &["b"]).await;
        let (status, answer) = api
            .call(
                OPERATOR,
                "POST",
                "/1.0/images/aliases",
                Some(serde_json::json!({"name": "base", "target": "img"})),
            )
            .await;
        assert_eq!(status, 409, "{answer}");
        assert!(answer.to_string().contains("already exists"), "{answer}");
        let (status, _) = api
            .call(
                MEMBER_B,
                "POST",
                "/1.0/images/aliases",
                Some(serde_json::json!({"name": "base", "target": "bbbbbbbbbbbbbbbb"})),
            )
            .await;
        assert_eq!(
            status, 200,
            "b's own alias of the same name is another alias"
        );
        let (status, answer) = api
            .call(
                MEMBER_B,
                "POST",
                "/1.0/images/aliases",
                Some(serde_json::json!({"name": "base", "target": "img"})),
            )
            .await;
        assert_eq!(status, 409, "{answer}");
        let after = api.model().await;
        assert_eq!(after.aliases["base"], before.aliases["base"]);
        assert_eq!(after.aliases["b@base"].target, "bbbbbbbbbbbbbbbb");
        // The operator may change the default project's aliases.
        let (status, answer) = api
            .call(OPERATOR, "DELETE", "/1.0/images/aliases/base", None)
            .await;
        assert_eq!(status, 200, "{answer}");
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_over_the_limit_get_413() {
        let api = Api::start().await;
        let too_big = (MAX_IMAGE_UPLOAD + 1).to_string();
        let a = api
            .send(
                ADMIN,
                "POST",
                "/1.0/images",
                None,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-length", &too_big),
                ],
            )
            .await;
        assert_eq!(a.status, 413, "{}", a.body);
        assert!(
            a.body["error"].as_str().unwrap().contains("larger than"),
            "{}",
            a.body
        );
        // A restricted project's key may not choose the node.
        api.cp
            .write(Command::UpdateProject {
                name: "b".into(),
                description: String::new(),
                config: [("restricted".to_string(), "true".to_string())].into(),
            })
            .await
            .unwrap();
        let (status, body) = api
            .call(
                MEMBER_B,
                "POST",
                "/1.0/images?target=n1",
                Some(serde_json::json!({"source": {"type": "build", "recipe": "busybox"}})),
            )
            .await;
        assert_eq!(status, 403, "{body}");
        api.cp.shutdown().await;
    }

    #[tokio::test]
    async fn the_upload_cap_cuts_a_stream_off() {
        use futures::StreamExt as _;
        let over = Arc::new(AtomicBool::new(false));
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
            vec![Ok(vec![0u8; 6].into()), Ok(vec![0u8; 6].into())];
        let body = capped(
            Body::from_stream(futures::stream::iter(chunks)),
            10,
            over.clone(),
        );
        let got: Vec<_> = body.into_data_stream().collect().await;
        assert!(got[0].is_ok());
        assert!(got[1].is_err());
        assert!(over.load(Ordering::SeqCst));
        let fine = Arc::new(AtomicBool::new(false));
        let body = capped(Body::from(vec![0u8; 10]), 10, fine.clone());
        let got: Vec<_> = body.into_data_stream().collect().await;
        assert!(got.iter().all(|c| c.is_ok()));
        assert!(!fine.load(Ordering::SeqCst));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_deleting_a_shared_image_lets_go_of_it() {
        let api = Api::start().await;
        let fp = "cafe".repeat(16);
        api.cp
            .write(Command::PutImage {
                image: Image {
                    fingerprint: fp.clone(),
                    projects: ["a".to_string(), "b".to_string()].into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap();
        let (status, answer) = api
            .call(MEMBER_A, "DELETE", &format!("/1.0/images/{fp}"), None)
            .await;
        assert_eq!(status, 202, "{answer}");
        let mut held = Default::default();
        for _ in 0..100 {
            held = api.model().await.images[&fp].projects.clone();
            if held.len() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(held, ["b".to_string()].into());
        // a no longer sees it; b still does.
        let path = format!("/1.0/images/{fp}");
        assert_eq!(api.call(MEMBER_A, "GET", &path, None).await.0, 404);
        assert_eq!(api.call(MEMBER_B, "GET", &path, None).await.0, 200);
    }

    /// An instance `name` of project a on n1 with `status` and one snapshot `snap0`.
    async fn instance_in_a(api: &Api, name: &str, status: berth_proto::api::InstanceStatusCode) {
        api.cp
            .write(Command::CreateInstance {
                instance: crate::state::Instance {
                    name: crate::state::scoped_name("a", name),
                    project: "a".into(),
                    node: "n1".into(),
                    image: "img".into(),
                    created_at: clock::now(),
                    observed: crate::state::Observed {
                        status,
                        ..Default::default()
                    },
                    snapshots: [(
                        "snap0".to_string(),
                        crate::state::Snapshot {
                            name: "snap0".into(),
                            ..Default::default()
                        },
                    )]
                    .into(),
                    ..Default::default()
                },
                operation: None,
            })
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_checks_everything_before_doing_anything() {
        use berth_proto::api::InstanceStatusCode::{Running, Stopped};
        let api = Api::start().await;
        api.add_node_and_image().await;
        instance_in_a(&api, "web", Running).await;
        instance_in_a(&api, "db", Stopped).await;
        let (status, body) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/images/aliases",
                Some(serde_json::json!({"name": "taken", "target": "img"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let before = api.model().await;
        let post = |source: serde_json::Value, aliases: &[&str]| {
            serde_json::json!({
                "source": source,
                "aliases": aliases.iter().map(|a| serde_json::json!({"name": a})).collect::<Vec<_>>(),
                "properties": {"os": "busybox"},
            })
        };
        for (key, body, code, says) in [
            (
                MEMBER_A,
                post(
                    serde_json::json!({"type": "instance", "name": "db"}),
                    &["new", "taken"],
                ),
                409,
                "alias \"taken\" already exists",
            ),
            (
                MEMBER_A,
                post(serde_json::json!({"type": "instance", "name": "nope"}), &[]),
                404,
                "not found",
            ),
            (
                MEMBER_A,
                post(
                    serde_json::json!({"type": "snapshot", "name": "web/nope"}),
                    &[],
                ),
                404,
                "snapshot \"web/nope\" not found",
            ),
            (
                MEMBER_A,
                post(serde_json::json!({"type": "snapshot", "name": "web"}), &[]),
                400,
                "INSTANCE/SNAPSHOT",
            ),
            // Another project's instance does not exist for b.
            (
                MEMBER_B,
                post(serde_json::json!({"type": "instance", "name": "db"}), &[]),
                404,
                "not found",
            ),
            (
                VIEWER_A,
                post(serde_json::json!({"type": "instance", "name": "db"}), &[]),
                403,
                "viewer",
            ),
        ] {
            let (status, answer) = api
                .call(key, "POST", "/1.0/images", Some(body.clone()))
                .await;
            assert_eq!(status, code, "{body}: {answer}");
            assert!(answer["error"].as_str().unwrap().contains(says), "{answer}");
        }
        let after = api.model().await;
        assert_eq!(after.images, before.images);
        assert_eq!(after.aliases, before.aliases);
        // A snapshot of a running instance may be published: the operation starts.
        let (status, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/images",
                Some(post(
                    serde_json::json!({"type": "snapshot", "name": "web/snap0"}),
                    &["mine"],
                )),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn properties_put_and_patch_with_etags() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        let fp = "abcd".repeat(16);
        api.put_image(&fp, &["a"]).await;
        let path = format!("/1.0/images/{fp}");
        let put =
            serde_json::json!({"properties": {"os": "debian", "release": "12"}, "public": false});
        let (status, answer) = api.call(MEMBER_A, "PUT", &path, Some(put)).await;
        assert_eq!(status, 200, "{answer}");
        let got = api.send(MEMBER_A, "GET", &path, None, &[]).await;
        assert_eq!(
            got.body["metadata"]["properties"],
            serde_json::json!({"os": "debian", "release": "12"})
        );
        assert_eq!(got.body["metadata"]["public"], false);
        assert_eq!(got.body["metadata"]["last_used_at"], "");
        let etag = got.headers["etag"].to_str().unwrap().to_string();
        // A stale ETag is a 412 and changes nothing.
        let stale = api
            .send(
                MEMBER_A,
                "PATCH",
                &path,
                Some(serde_json::json!({"properties": {"os": "alpine"}})),
                &[("if-match", "\"nope\"")],
            )
            .await;
        assert_eq!(stale.status, 412, "{}", stale.body);
        // A member may not make its image public (every project would see it).
        let member = api
            .send(
                MEMBER_A,
                "PATCH",
                &path,
                Some(serde_json::json!({"public": true})),
                &[("if-match", &etag)],
            )
            .await;
        assert_eq!(member.status, 403, "{}", member.body);
        let ok = api
            .send(
                OPERATOR,
                "PATCH",
                &format!("{path}?project=a"),
                Some(serde_json::json!({"properties": {"release": null, "variant": "slim"}, "public": true})),
                &[("if-match", &etag)],
            )
            .await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        let img = api.model().await.images[&fp].clone();
        assert_eq!(
            img.properties,
            [
                ("os".to_string(), "debian".to_string()),
                ("variant".to_string(), "slim".to_string())
            ]
            .into()
        );
        assert!(img.public);
        // The old ETag is stale now.
        let again = api
            .send(
                MEMBER_A,
                "PUT",
                &path,
                Some(serde_json::json!({})),
                &[("if-match", &etag)],
            )
            .await;
        assert_eq!(again.status, 412, "{}", again.body);
        // Bad bodies and bad properties are 400s.
        for body in [
            serde_json::json!({"properties": {"os": "x"}, "size": 3}),
            serde_json::json!({"properties": {"has space": "x"}}),
        ] {
            let (status, answer) = api.call(MEMBER_A, "PATCH", &path, Some(body)).await;
            assert_eq!(status, 400, "{answer}");
        }
        // Viewers may not; b sees the public image but may not change it.
        let (status, _) = api
            .call(
                VIEWER_A,
                "PATCH",
                &path,
                Some(serde_json::json!({"public": false})),
            )
            .await;
        assert_eq!(status, 403);
        let (status, _) = api
            .call(
                MEMBER_B,
                "PATCH",
                &path,
                Some(serde_json::json!({"public": false})),
            )
            .await;
        assert_eq!(status, 403);
        assert!(api.model().await.images[&fp].public);
        // Members may not change the shared image; fleet keys may.
        let shared = serde_json::json!({"properties": {"os": "busybox"}});
        assert_eq!(
            api.call(MEMBER_A, "PUT", "/1.0/images/img", Some(shared.clone()))
                .await
                .0,
            403
        );
        assert_eq!(
            api.call(OPERATOR, "PUT", "/1.0/images/img", Some(shared))
                .await
                .0,
            200
        );
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn public_images_are_seen_by_every_project() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        let fp = "beef".repeat(16);
        api.put_image(&fp, &["a"]).await;
        let path = format!("/1.0/images/{fp}");
        let listed = |body: serde_json::Value| -> Vec<String> {
            serde_json::from_value(body["metadata"].clone()).unwrap()
        };
        assert_eq!(api.call(MEMBER_B, "GET", &path, None).await.0, 404);
        assert_eq!(
            api.call(MEMBER_B, "GET", &format!("{path}/export"), None)
                .await
                .0,
            404
        );
        assert!(!listed(api.call(MEMBER_B, "GET", "/1.0/images", None).await.1).contains(&path));
        let (status, answer) = api
            .call(
                OPERATOR,
                "PATCH",
                &format!("{path}?project=a"),
                Some(serde_json::json!({"public": true})),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let (status, body) = api.call(MEMBER_B, "GET", &path, None).await;
        assert_eq!(
            (status, body["metadata"]["public"].as_bool()),
            (200, Some(true))
        );
        assert!(listed(api.call(MEMBER_B, "GET", "/1.0/images", None).await.1).contains(&path));
        // b may launch from it (the apply check sees it), not delete it.
        assert!(api.model().await.resolve_image_in("b", &fp).is_some());
        assert_eq!(api.call(MEMBER_B, "DELETE", &path, None).await.0, 403);
        // Export: the holder n1 never answers here, so the answer is an error, not a 404.
        let (status, answer) = api
            .call(MEMBER_B, "GET", &format!("{path}/export"), None)
            .await;
        assert_ne!(status, 404, "{answer}");
        assert_ne!(status, 200, "{answer}");
        api.cp.shutdown().await;
    }

    #[test]
    fn patch_merges_and_removes() {
        let img = Image {
            properties: [
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
            ]
            .into(),
            public: true,
            ..Default::default()
        };
        let patch: ImagePatch =
            serde_json::from_value(serde_json::json!({"properties": {"a": null, "c": "3"}}))
                .unwrap();
        let (props, public) = merge_patch(&img, &patch);
        assert_eq!(
            props,
            [
                ("b".to_string(), "2".to_string()),
                ("c".to_string(), "3".to_string())
            ]
            .into()
        );
        assert!(public, "public stays unless given");
        assert!(serde_json::from_value::<ImagePatch>(serde_json::json!({"aliases": []})).is_err());
    }

    #[test]
    fn publish_sources() {
        let src = |kind: &str, name: &str| api::ImageSource {
            kind: kind.into(),
            name: name.into(),
            ..Default::default()
        };
        assert_eq!(
            publish_source(&src("instance", "web")).unwrap(),
            PublishSource {
                instance: "web".into(),
                snapshot: String::new()
            }
        );
        assert_eq!(
            publish_source(&src("snapshot", "web/s1")).unwrap(),
            PublishSource {
                instance: "web".into(),
                snapshot: "s1".into()
            }
        );
        assert!(publish_source(&src("instance", "")).is_err());
        assert!(publish_source(&src("snapshot", "web/")).is_err());
        assert!(publish_source(&src("snapshot", "/s1")).is_err());
    }
}
