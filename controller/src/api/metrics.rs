//! `GET /1.0/metrics`: cluster-wide figures in the Prometheus text format, from any controller.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::{ApiError, SharedState};
use crate::metrics::{ClusterFigures, RaftFigures, render};

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /1.0/metrics`: instances, nodes, operations, reconciler queue (from this controller's copy of the
/// replicated state, without a read barrier, so that a controller cut off from the leader
/// still answers), this controller's Raft figures and its API request figures. Any valid API
/// key may read it.
pub async fn get(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let cluster = state.cp.read_local(ClusterFigures::from_state);
    let raft = {
        let rx = state.cp.raft().metrics();
        let m = rx.borrow();
        RaftFigures::from_metrics(&m, state.metrics.leader_changes())
    };
    let queue_depth = crate::reconcile::queue_depth(&state) as u64;
    let text = render(
        &state.name,
        &cluster,
        &raft,
        &state.metrics.api_figures(),
        Some(queue_depth),
    );
    Ok(([(http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}
