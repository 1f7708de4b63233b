//! Copy and move: `POST /1.0/instances` with a `copy` source, and `POST /1.0/instances/{name}`
//! with `migration` and `?target=`. Both become instance actions (`CopyFrom` on the new
//! instance, `Migrate` on the moving one) that the leader's reconciler carries out.

use axum::response::Response;
use berth_proto::api::{InstancePost, InstancesPost};

use super::instances::TargetQuery;
use super::{ApiError, Scope, SharedState};

/// `POST /1.0/instances` with `source.type = "copy"` (`profiles` as the request gave them).
pub async fn copy(
    state: SharedState,
    scope: Scope,
    q: TargetQuery,
    req: InstancesPost,
    profiles: Option<Vec<String>>,
) -> Result<Response, ApiError> {
    let _ = (state, scope, q, req, profiles);
    Err(ApiError::bad_request("copies are not available yet"))
}

/// `POST /1.0/instances/{name}` with `migration` (or `?target=`): move to node `target`.
pub async fn migrate(
    state: SharedState,
    scope: Scope,
    name: String,
    target: String,
    body: InstancePost,
) -> Result<Response, ApiError> {
    let _ = (state, scope, name, target, body);
    Err(ApiError::bad_request(
        "moves between nodes are not available yet",
    ))
}
