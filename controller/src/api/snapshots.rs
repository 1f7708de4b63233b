//! `/1.0/instances/{name}/snapshots`: list, take, show, rename, delete; and restore (`PUT
//! /1.0/instances/{name}` with `restore`).
//!
//! Every change is an instance action ([`crate::state::Action`]) carried out by the leader's
//! reconciler on the instance's node, with an operation to wait for.

use axum::extract::{Path, Query, State};
use axum::response::Response;
use berth_proto::api::{InstanceSnapshotPost, InstanceSnapshotsPost};
use serde::Deserialize;

use super::{ApiError, JsonBody, Scope, SharedState};

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub recursion: u8,
}

fn not_yet() -> ApiError {
    ApiError::bad_request("snapshots are not available yet")
}

/// `GET /1.0/instances/{name}/snapshots`.
pub async fn list(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let _ = (state, scope, name, q.recursion);
    Err(not_yet())
}

/// `POST /1.0/instances/{name}/snapshots`.
pub async fn create(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<InstanceSnapshotsPost>,
) -> Result<Response, ApiError> {
    let _ = (state, scope, name, body);
    Err(not_yet())
}

/// `GET /1.0/instances/{name}/snapshots/{snapshot}`.
pub async fn get_one(
    State(state): State<SharedState>,
    scope: Scope,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let _ = (state, scope, name, snapshot);
    Err(not_yet())
}

/// `POST /1.0/instances/{name}/snapshots/{snapshot}`: rename.
pub async fn rename(
    State(state): State<SharedState>,
    scope: Scope,
    Path((name, snapshot)): Path<(String, String)>,
    JsonBody(body): JsonBody<InstanceSnapshotPost>,
) -> Result<Response, ApiError> {
    let _ = (state, scope, name, snapshot, body);
    Err(not_yet())
}

/// `DELETE /1.0/instances/{name}/snapshots/{snapshot}`.
pub async fn delete(
    State(state): State<SharedState>,
    scope: Scope,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let _ = (state, scope, name, snapshot);
    Err(not_yet())
}

/// `PUT /1.0/instances/{name}` with `{"restore": SNAPSHOT}`: `wanted` is the `If-Match` ETag.
pub async fn restore(
    state: SharedState,
    scope: Scope,
    name: String,
    snapshot: String,
    wanted: Option<String>,
) -> Result<Response, ApiError> {
    let _ = (state, scope, name, snapshot, wanted);
    Err(not_yet())
}
