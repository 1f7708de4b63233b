//! Operations: long work answered with 202 and polled, waited on, or cancelled through
//! `/1.0/operations/{id}`. Operations are replicated state, so any controller can answer for them.
//! Only exec sessions can be cancelled while they run (`may_cancel: true`), on the controller
//! that holds them.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use berth_proto::api::{self, Operation, OperationStatus};
use http::StatusCode;
use serde::Deserialize;
use tracing::{Instrument, error, info_span, warn};

use super::exec::Cancelled;
use super::{ApiError, Scope, SharedState};
use crate::clock;
use crate::raft::WriteError;
use crate::state::{ApplyOk, Command};

/// Answers `metadata` in a sync envelope.
pub fn sync(metadata: impl serde::Serialize) -> Response {
    Json(api::Response::sync(
        serde_json::to_value(metadata).unwrap_or_default(),
    ))
    .into_response()
}

/// Answers 202 with the operation.
pub fn accepted(op: &Operation) -> Response {
    (StatusCode::ACCEPTED, Json(api::Response::asynchronous(op))).into_response()
}

/// A new operation of `project` in state `Running`, not yet stored. Only that project's keys
/// (and fleet keys) see it.
pub fn new_operation_in(
    state: &SharedState,
    project: &str,
    class: &str,
    description: &str,
    resources: BTreeMap<String, Vec<String>>,
) -> Operation {
    let now = clock::now();
    Operation {
        id: uuid::Uuid::new_v4().to_string(),
        class: class.into(),
        description: description.into(),
        created_at: now.clone(),
        updated_at: now,
        status: OperationStatus::Running,
        status_code: OperationStatus::Running.code(),
        resources,
        metadata: serde_json::Value::Null,
        may_cancel: false,
        err: String::new(),
        location: state.name.clone(),
        project: project.to_string(),
    }
}

/// Resources naming instance `name` (its own name, not the scoped one) of `project`.
pub fn instance_resources_in(project: &str, name: &str) -> BTreeMap<String, Vec<String>> {
    let suffix = super::instances::project_suffix(project);
    BTreeMap::from([(
        "instances".into(),
        vec![format!("/1.0/instances/{name}{suffix}")],
    )])
}

/// The project an operation belongs to (operations from before projects: `default`).
pub fn operation_project(op: &Operation) -> &str {
    if op.project.is_empty() {
        crate::state::DEFAULT_PROJECT
    } else {
        &op.project
    }
}

/// Whether `scope` sees `op`: fleet keys see every operation by id; project keys only their
/// project's.
fn sees(scope: &Scope, op: &Operation) -> bool {
    scope.identity.is_fleet() || operation_project(op) == scope.project
}

/// Stores `op` and runs `work` in the background; the operation ends with the work's result.
/// Returns the 202 answer.
pub async fn run_task<F>(state: &SharedState, op: Operation, work: F) -> Result<Response, ApiError>
where
    F: Future<Output = Result<serde_json::Value, ApiError>> + Send + 'static,
{
    let instance = op
        .resources
        .get("instances")
        .and_then(|v| v.first())
        .and_then(|p| p.rsplit('/').next())
        .unwrap_or_default()
        .to_string();
    let span = info_span!("operation", op = %op.id, instance = %instance, what = %op.description);
    spawn_operation(state, op, span, |op| async move { (op, work.await) }).await
}

/// Stores `op` and runs `work` on it in the background, in `span`: `work` hands the operation
/// back (its metadata possibly changed, and kept when it fails) with the result it ends with.
/// Returns the 202 answer.
pub async fn spawn_operation<W, F>(
    state: &SharedState,
    op: Operation,
    span: tracing::Span,
    work: W,
) -> Result<Response, ApiError>
where
    W: FnOnce(Operation) -> F + Send + 'static,
    F: Future<Output = (Operation, Result<serde_json::Value, ApiError>)> + Send + 'static,
{
    state
        .cp
        .write(Command::PutOperation {
            operation: op.clone(),
        })
        .await?;
    let answer = accepted(&op);
    let st = state.clone();
    tokio::spawn(
        async move {
            let (op, result) = work(op).await;
            finish(&st, op, result).await;
        }
        .instrument(span),
    );
    Ok(answer)
}

/// Records the end of an operation.
pub async fn finish(
    state: &SharedState,
    mut op: Operation,
    result: Result<serde_json::Value, ApiError>,
) {
    match result {
        Ok(metadata) => {
            op.status = OperationStatus::Success;
            op.metadata = metadata;
        }
        Err(e) => {
            warn!(error = %e.message, "operation failed");
            op.status = OperationStatus::Failure;
            op.err = e.message;
        }
    }
    record_end(state, op).await;
}

/// Records that an operation was cancelled.
pub async fn finish_cancelled(state: &SharedState, mut op: Operation) {
    op.status = OperationStatus::Cancelled;
    op.err = "operation cancelled".into();
    record_end(state, op).await;
}

/// Stores a finished operation (`op.status` set), retrying through an election.
async fn record_end(state: &SharedState, mut op: Operation) {
    op.may_cancel = false;
    op.status_code = op.status.code();
    op.updated_at = clock::now();
    let id = op.id.clone();
    // During an election the write fails; one attempt would leave the operation Running for
    // ever. PutOperation stores the whole operation, so repeating it is harmless.
    let written = retry_write(&id, FINISH_RETRY_FOR, FIRST_RETRY, || {
        state.cp.write(Command::PutOperation {
            operation: op.clone(),
        })
    })
    .await;
    if let Err(e) = written {
        error!(operation = %id, error = %e, "gave up recording the end of the operation; it stays running in the cluster's state");
    }
}

/// How long [`finish`] keeps trying to record the end of an operation.
const FINISH_RETRY_FOR: Duration = Duration::from_secs(30);

/// The first pause between two attempts; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The longest pause between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Repeats a write of operation `id` until it succeeds, `apply` rejects it (repeating cannot
/// help then), or `limit` has passed; pauses start at `first` and double. Each distinct
/// failure is logged once, not at every attempt. Answers the last error when it gives up.
async fn retry_write<F, Fut>(
    id: &str,
    limit: Duration,
    first: Duration,
    mut attempt: F,
) -> Result<(), WriteError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<ApplyOk, WriteError>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = first;
    let mut logged = String::new();
    loop {
        let e = match attempt().await {
            Ok(_) => return Ok(()),
            Err(e @ WriteError::Rejected(_)) => return Err(e),
            Err(e) => e,
        };
        let now = tokio::time::Instant::now();
        if now + pause > deadline {
            return Err(e);
        }
        let message = e.to_string();
        if message != logged {
            warn!(operation = %id, error = %message, "cannot record the end of the operation yet; retrying");
            logged = message;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY);
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("operation {id} not found"))
}

/// The operation `id`, if `scope` sees it (404 otherwise, as if it did not exist).
async fn find(state: &SharedState, scope: &Scope, id: &str) -> Result<Operation, ApiError> {
    state
        .cp
        .read(|s| s.operations.get(id).cloned())
        .await?
        .filter(|op| sees(scope, op))
        .ok_or_else(|| not_found(id))
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    recursion: u8,
    /// Fleet keys: every project's operations.
    #[serde(default, rename = "all-projects")]
    all_projects: bool,
}

/// `GET /1.0/operations`: by status, as LXD groups them; the operations of the `?project=`
/// project, or of every project with `?all-projects=true` (fleet keys only).
pub async fn list(
    State(state): State<SharedState>,
    scope: Scope,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    if q.all_projects {
        scope.identity.require_fleet()?;
    }
    let project = scope.project.clone();
    let ops: Vec<Operation> = state
        .cp
        .read(|s| {
            s.operations
                .values()
                .filter(|op| q.all_projects || operation_project(op) == project)
                .cloned()
                .collect()
        })
        .await?;
    let mut by_status: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for op in ops {
        let key = format!("{:?}", op.status).to_lowercase();
        let entry = by_status
            .entry(key)
            .or_insert_with(|| serde_json::Value::Array(vec![]));
        if let serde_json::Value::Array(v) = entry {
            if q.recursion > 0 {
                v.push(serde_json::to_value(&op).unwrap_or_default());
            } else {
                v.push(format!("/1.0/operations/{}", op.id).into());
            }
        }
    }
    Ok(sync(by_status))
}

/// `GET /1.0/operations/{id}`.
pub async fn get_one(
    State(state): State<SharedState>,
    scope: Scope,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(sync(find(&state, &scope, &id).await?))
}

#[derive(Deserialize)]
pub struct WaitQuery {
    /// Seconds; -1 or absent means as long as it takes (capped at one hour).
    #[serde(default)]
    timeout: Option<i64>,
}

/// `GET /1.0/operations/{id}/wait?timeout=N`: answers when the operation has ended or the
/// timeout has passed, whichever comes first.
pub async fn wait(
    State(state): State<SharedState>,
    scope: Scope,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let secs = match q.timeout {
        None | Some(-1) => 3600,
        Some(t) if (0..=3600).contains(&t) => t as u64,
        Some(t) => {
            return Err(ApiError::bad_request(format!(
                "timeout {t} must be between -1 and 3600 seconds"
            )));
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut changes = state.cp.subscribe();
    // One linearizable read, then this controller's own copy as it applies entries (a
    // follower would otherwise ask the leader for a read index on every applied entry).
    let mut op = find(&state, &scope, &id).await?;
    loop {
        if op.status.is_final() || tokio::time::Instant::now() >= deadline {
            return Ok(sync(op));
        }
        // Wake on every applied entry, and at least once a second.
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            changes.changed(),
        )
        .await;
        op = state
            .cp
            .read_local(|s| s.operations.get(&id).cloned())
            .ok_or_else(|| not_found(&id))?;
    }
}

/// `DELETE /1.0/operations/{id}`: cancels an exec session (waiting or running), or
/// removes a finished operation. Viewers may not.
pub async fn cancel(
    State(state): State<SharedState>,
    scope: Scope,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut op = find(&state, &scope, &id).await?;
    scope.require_write()?;
    if op.status.is_final() {
        state
            .cp
            .write(scope.by(Command::DeleteOperations { ids: vec![id] }))
            .await?;
        return Ok(sync(serde_json::Value::Null));
    }
    match state.execs.cancel(&id) {
        Cancelled::Pending => {
            op.status = OperationStatus::Cancelled;
            op.status_code = op.status.code();
            op.updated_at = clock::now();
            op.err = "operation cancelled".into();
            op.may_cancel = false;
            state
                .cp
                .write(scope.by(Command::PutOperation { operation: op }))
                .await?;
            Ok(sync(serde_json::Value::Null))
        }
        // The session kills its command and records the end.
        Cancelled::Running => Ok(sync(serde_json::Value::Null)),
        Cancelled::None if op.may_cancel && op.location != state.name => {
            Err(ApiError::bad_request(format!(
                "operation {id} runs on controller {:?}; cancel it there",
                op.location
            )))
        }
        Cancelled::None => Err(ApiError::bad_request(format!(
            "operation {id} cannot be cancelled while it runs"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::raft::Unavailable;
    use crate::state::ApplyError;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn the_end_of_an_operation_is_written_through_an_election() {
        // Two failures (no leader, then an unsure commit), then the write goes through.
        let calls = AtomicUsize::new(0);
        let r = retry_write("op", Duration::from_secs(5), MS, || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err(WriteError::Unavailable(Unavailable::NoLeader)),
                1 => Err(WriteError::Unsure(Unavailable::NoQuorum)),
                _ => Ok(ApplyOk::Done),
            }
        })
        .await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retries_stop_at_the_limit_and_on_a_rejection() {
        let calls = AtomicUsize::new(0);
        let started = std::time::Instant::now();
        let r = retry_write("op", 50 * MS, MS, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<ApplyOk, _>(WriteError::Unavailable(Unavailable::NoLeader))
        })
        .await;
        assert!(matches!(r, Err(WriteError::Unavailable(_))), "{r:?}");
        assert!(calls.load(Ordering::SeqCst) > 2);
        assert!(started.elapsed() < Duration::from_secs(2));

        let calls = AtomicUsize::new(0);
        let r = retry_write("op", Duration::from_secs(5), MS, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<ApplyOk, _>(WriteError::Rejected(ApplyError::not_found("gone")))
        })
        .await;
        assert!(matches!(r, Err(WriteError::Rejected(_))), "{r:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod api_tests {
    use berth_proto::api::{Operation, OperationStatus};

    use crate::api::projects::testkit::*;
    use crate::state::Command;

    async fn put(api: &Api, id: &str, project: &str, status: OperationStatus) {
        api.cp
            .write(Command::PutOperation {
                operation: Operation {
                    id: id.into(),
                    class: "task".into(),
                    status,
                    status_code: status.code(),
                    project: project.into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn operations_are_seen_in_their_project_only() {
        let api = Api::start().await;
        put(&api, "op-a", "a", OperationStatus::Success).await;
        put(&api, "op-b", "b", OperationStatus::Success).await;
        put(&api, "op-d", "", OperationStatus::Running).await;

        let (status, body) = api.call(MEMBER_A, "GET", "/1.0/operations", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["metadata"],
            serde_json::json!({"success": ["/1.0/operations/op-a"]})
        );
        for path in [
            "/1.0/operations/op-b",
            "/1.0/operations/op-d",
            "/1.0/operations/op-b/wait?timeout=0",
            "/1.0/operations/nope",
        ] {
            let (status, body) = api.call(MEMBER_A, "GET", path, None).await;
            assert_eq!(status, 404, "{path}: {body}");
        }
        assert_eq!(
            api.call(MEMBER_A, "DELETE", "/1.0/operations/op-b", None)
                .await
                .0,
            404
        );
        assert_eq!(
            api.call(MEMBER_A, "GET", "/1.0/operations/op-a", None)
                .await
                .0,
            200
        );
        assert_eq!(
            api.call(MEMBER_A, "GET", "/1.0/operations/op-a/wait?timeout=0", None)
                .await
                .0,
            200
        );
        // Asking for project b or for all projects gives nothing away.
        assert_eq!(
            api.call(MEMBER_A, "GET", "/1.0/operations?project=b", None)
                .await
                .0,
            404
        );
        assert_eq!(
            api.call(MEMBER_A, "GET", "/1.0/operations?all-projects=true", None)
                .await
                .0,
            403
        );
        // A viewer reads, but does not cancel or remove.
        assert_eq!(
            api.call(VIEWER_A, "GET", "/1.0/operations/op-a", None)
                .await
                .0,
            200
        );
        assert_eq!(
            api.call(VIEWER_A, "DELETE", "/1.0/operations/op-a", None)
                .await
                .0,
            403
        );

        // Fleet keys: the ?project= one by default, every one with all-projects, any by id.
        let (_, body) = api.call(OPERATOR, "GET", "/1.0/operations", None).await;
        assert_eq!(
            body["metadata"],
            serde_json::json!({"running": ["/1.0/operations/op-d"]})
        );
        let (_, body) = api
            .call(
                OPERATOR,
                "GET",
                "/1.0/operations?all-projects=true&recursion=1",
                None,
            )
            .await;
        assert_eq!(body["metadata"]["success"].as_array().unwrap().len(), 2);
        assert_eq!(
            api.call(ADMIN, "GET", "/1.0/operations/op-b", None).await.0,
            200
        );

        // The member removes its finished operation.
        assert_eq!(
            api.call(MEMBER_A, "DELETE", "/1.0/operations/op-a", None)
                .await
                .0,
            200
        );
        assert!(!api.model().await.operations.contains_key("op-a"));
        api.cp.shutdown().await;
    }
}
