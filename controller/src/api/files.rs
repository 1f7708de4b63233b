//! `/1.0/instances/{name}/files?path=...`: pull, push and delete files inside an instance.
//! Metadata travels in LXD's `X-LXD-*` headers; contents stream through without being held in memory.
//! A push or delete that succeeded is announced as the lifecycle event `instance-file-pushed`
//! or `instance-file-deleted` (`context.path`), naming the key.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use berth_proto::api::file_headers;
use berth_proto::v1::{self, file_pull_chunk, file_push_chunk};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue};
use serde::Deserialize;
use tracing::warn;

use super::instances::{find, require_member};
use super::operations::sync;
use super::{ApiError, Scope, SharedState};
use crate::state::Command;

#[derive(Deserialize)]
pub struct PathQuery {
    path: Option<String>,
}

fn checked_path(q: &PathQuery) -> Result<String, ApiError> {
    let p = q
        .path
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("the path query parameter is missing"))?;
    if !p.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "path \"{p}\" is not absolute"
        )));
    }
    if p.len() > 4096 || p.contains('\0') {
        return Err(ApiError::bad_request(
            "path is longer than 4096 bytes or contains a NUL byte",
        ));
    }
    Ok(p.to_string())
}

/// Publishes (through the replicated log, so on every controller) the lifecycle event
/// `action` on instance `name` (its own name) of the scope's project, naming the key: for
/// what changes outside the replicated state. The action has already happened: a failure to
/// record it is logged, and the request still succeeds.
pub(crate) async fn record_event(
    state: &SharedState,
    scope: &Scope,
    action: &str,
    name: &str,
    context: BTreeMap<String, String>,
) {
    let cmd = scope.by(Command::Record {
        project: scope.project.clone(),
        action: action.to_string(),
        source: format!("/1.0/instances/{name}{}", scope.url_suffix()),
        context,
    });
    if let Err(e) = state.cp.write(cmd).await {
        warn!(instance = %name, action, error = %e, "cannot record a lifecycle event");
    }
}

fn type_name(t: i32) -> &'static str {
    match v1::FileType::try_from(t) {
        Ok(v1::FileType::Directory) => "directory",
        Ok(v1::FileType::Symlink) => "symlink",
        _ => "file",
    }
}

fn meta_headers(info: &v1::FileInfo) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put(file_headers::TYPE, type_name(info.r#type).into());
    put(file_headers::UID, info.uid.to_string());
    put(file_headers::GID, info.gid.to_string());
    put(file_headers::MODE, format!("{:04o}", info.mode & 0o7777));
    h
}

/// `GET /1.0/instances/{name}/files?path=P`: not for viewer keys (files may hold secrets).
pub async fn pull(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let path = checked_path(&q)?;
    let (i, n) = find(&state, &scope, &name).await?;
    require_member(&scope, "reading files of an instance")?;
    let mut stream = state
        .agents
        .client(&n)?
        .pull_file(v1::FilePullRequest {
            instance: i.name.clone(),
            path,
        })
        .await?
        .into_inner();
    let info = match stream.message().await? {
        Some(v1::FilePullChunk {
            msg: Some(file_pull_chunk::Msg::Info(info)),
        }) => info,
        _ => return Err(ApiError::internal("the agent sent no file metadata")),
    };
    let headers = meta_headers(&info);
    match v1::FileType::try_from(info.r#type) {
        Ok(v1::FileType::Directory) => {
            let mut resp = sync(&info.entries);
            resp.headers_mut().extend(headers);
            Ok(resp)
        }
        Ok(v1::FileType::Symlink) => Ok((headers, info.target.clone()).into_response()),
        _ => {
            let body = stream.filter_map(|chunk| async move {
                match chunk {
                    Ok(v1::FilePullChunk {
                        msg: Some(file_pull_chunk::Msg::Data(d)),
                    }) => Some(Ok::<_, tonic::Status>(d)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                }
            });
            let mut h = headers;
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok((h, Body::from_stream(body)).into_response())
        }
    }
}

fn header_num(
    headers: &HeaderMap,
    name: &str,
    radix: u32,
    max: u32,
    default: u32,
) -> Result<u32, ApiError> {
    match headers.get(name) {
        None => Ok(default),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim(), radix).ok())
            .filter(|n| *n <= max)
            .ok_or_else(|| ApiError::bad_request(format!("header {name} is not a valid value"))),
    }
}

/// `POST /1.0/instances/{name}/files?path=P`: body = contents (or a symlink's target).
pub async fn push(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let path = checked_path(&q)?;
    let kind = match headers
        .get(file_headers::TYPE)
        .map(|v| v.to_str().unwrap_or("?"))
    {
        None | Some("file") => v1::FileType::File,
        Some("directory") => v1::FileType::Directory,
        Some("symlink") => v1::FileType::Symlink,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "file type \"{other}\" is not one of file, directory, symlink"
            )));
        }
    };
    if let Some(w) = headers.get(file_headers::WRITE)
        && w.to_str().unwrap_or("?") != "overwrite"
    {
        return Err(ApiError::bad_request(
            "only the overwrite write mode is supported",
        ));
    }
    let default_mode = if kind == v1::FileType::Directory {
        0o755
    } else {
        0o644
    };
    let uid = header_num(&headers, file_headers::UID, 10, u32::MAX - 1, 0)?;
    let gid = header_num(&headers, file_headers::GID, 10, u32::MAX - 1, 0)?;
    let mode = header_num(&headers, file_headers::MODE, 8, 0o7777, default_mode)?;
    let (i, n) = find(&state, &scope, &name).await?;
    scope.require_write()?;
    let mut header = v1::FileHeader {
        instance: i.name.clone(),
        path: path.clone(),
        r#type: kind as i32,
        mode,
        uid,
        gid,
        target: String::new(),
        size: headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
    };
    let mut data = body.into_data_stream();
    if kind == v1::FileType::Symlink {
        let mut target = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
            target.extend_from_slice(&chunk);
            if target.len() > 4096 {
                return Err(ApiError::bad_request(
                    "symlink target is longer than 4096 bytes",
                ));
            }
        }
        header.target = String::from_utf8(target)
            .map_err(|_| ApiError::bad_request("symlink target is not UTF-8"))?;
        if header.target.is_empty() || header.target.contains('\0') {
            return Err(ApiError::bad_request(
                "symlink target is empty or contains a NUL byte",
            ));
        }
    }
    // Forward the body through a channel: the gRPC call streams it as it arrives. If the
    // client's upload breaks off, the call is cancelled (not ended), so the agent keeps the
    // old file rather than committing a short one.
    let (stream, broke_rx) = super::forward_upload(
        v1::FilePushChunk {
            msg: Some(file_push_chunk::Msg::Header(header)),
        },
        data,
        kind == v1::FileType::File,
        |bytes| v1::FilePushChunk {
            msg: Some(file_push_chunk::Msg::Data(bytes)),
        },
    );
    let mut client = state.agents.client(&n)?;
    let info = tokio::select! {
        r = client.push_file(stream) => r?.into_inner(),
        Ok(why) = broke_rx => {
            return Err(ApiError::bad_request(format!("the upload broke off: {why}")));
        }
    };
    record_event(
        &state,
        &scope,
        "instance-file-pushed",
        &name,
        BTreeMap::from([("path".to_string(), path)]),
    )
    .await;
    Ok(sync(
        serde_json::json!({ "path": info.path, "size": info.size }),
    ))
}

/// `DELETE /1.0/instances/{name}/files?path=P`.
pub async fn delete(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let path = checked_path(&q)?;
    let (i, n) = find(&state, &scope, &name).await?;
    scope.require_write()?;
    state
        .agents
        .client(&n)?
        .delete_file(crate::agents::short(v1::FileDeleteRequest {
            instance: i.name.clone(),
            path: path.clone(),
        }))
        .await?;
    record_event(
        &state,
        &scope,
        "instance-file-deleted",
        &name,
        BTreeMap::from([("path".to_string(), path)]),
    )
    .await;
    Ok(sync(serde_json::Value::Null))
}
