//! `POST /1.0/cluster/members/{name}/state`: evacuate a node (its instances move elsewhere,
//! or stop, and nothing new is placed on it) or restore it (they come back).

use axum::extract::{Path, State};
use axum::response::Response;
use berth_proto::api::ClusterMemberStatePost;

use super::{ApiError, JsonBody, Scope, SharedState};

/// `POST /1.0/cluster/members/{name}/state`.
pub async fn post_state(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ClusterMemberStatePost>,
) -> Result<Response, ApiError> {
    let _ = (state, scope, name, body);
    Err(ApiError::bad_request("evacuation is not available yet"))
}
