//! `POST /1.0/cluster/members/{name}/state`: evacuate a node (its instances move elsewhere,
//! or stop, and nothing new is placed on it) or restore it (they come back).
//!
//! Fleet keys only. Evacuating marks the node evacuated first (the scheduler then places
//! nothing there), then walks its instances, at most [`PARALLEL`] at a time: each gets an
//! evacuation mark (`Instance.evacuated_from`: node, mode, whether it was running), then moves
//! to a node the scheduler picks (a running one live) or, in mode `stop`, stops. The answer is
//! one operation (a task of this controller; a restart of it fails the operation, and
//! evacuating again resumes) that ends when all are done, with one
//! [`EvacuationResult`] per instance in its metadata. Evacuating again continues where a
//! partial evacuation stopped: marks already made are kept.
//!
//! Restoring clears the node's evacuated mark, then brings back every instance marked as
//! evacuated from it: moved ones move back (live if running), stopped ones start again if they
//! were running; marks are cleared as each one is done.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use berth_proto::api::{ClusterMemberStatePost, InstanceStatusCode, OperationStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{info, info_span, warn};

use super::operations::{new_operation_in, spawn_operation};
use super::transfers::{request_move, wait_for_operation};
use super::{ApiError, JsonBody, Scope, SharedState};
use crate::clock;
use crate::state::{
    Action, Command, DEFAULT_PROJECT, DesiredState, Evacuation, Instance, NodeStatus,
    PendingAction, State as Model, split_scoped_name,
};

/// Instances handled at the same time.
pub const PARALLEL: usize = 2;

/// Longest clean stop an evacuation in mode `stop` waits for before forcing.
const STOP_TIMEOUT_CAP_SECS: u32 = 60;

/// What was asked, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Move the instances away (`move`) or stop them where they are (`stop`).
    Evacuate { stop: bool },
    /// Bring them back.
    Restore,
}

impl Request {
    /// Parses `action` and `mode`; 400 for anything else.
    pub fn parse(body: &ClusterMemberStatePost) -> Result<Request, ApiError> {
        match (body.action.as_str(), body.mode.as_str()) {
            ("evacuate", "" | "move") => Ok(Request::Evacuate { stop: false }),
            ("evacuate", "stop") => Ok(Request::Evacuate { stop: true }),
            ("evacuate", other) => Err(ApiError::bad_request(format!(
                "evacuation mode {other:?} is not one of move, stop"
            ))),
            ("restore", "") => Ok(Request::Restore),
            ("restore", _) => Err(ApiError::bad_request(
                "a restore takes no mode: it undoes what the evacuation did",
            )),
            (other, _) => Err(ApiError::bad_request(format!(
                "action {other:?} is not one of evacuate, restore"
            ))),
        }
    }
}

/// What happened to one instance, in the operation's metadata (`{"instances": [...]}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvacuationResult {
    /// The instance's name in its project.
    pub instance: String,
    pub project: String,
    /// `moved`, `stopped`, `started`, `returned`, `left` (nothing to do) or `failed`.
    pub result: String,
    /// Where it is now.
    pub node: String,
    /// Why it failed; `""` when it did not.
    #[serde(default)]
    pub error: String,
}

/// The operation's metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvacuationMetadata {
    /// The node evacuated or restored.
    pub node: String,
    /// `evacuate` or `restore`.
    pub action: String,
    /// `move` or `stop` for an evacuation.
    #[serde(default)]
    pub mode: String,
    pub instances: Vec<EvacuationResult>,
}

/// 400 when a `move` evacuation of `node` has instances and no other node to take them.
pub fn check_evacuation(s: &Model, node: &str, req: Request) -> Result<(), ApiError> {
    if !s.nodes.contains_key(node) {
        return Err(ApiError::not_found(format!("node {node:?} not found")));
    }
    if req == (Request::Evacuate { stop: false })
        && s.instances.values().any(|i| i.node == node)
        && !s
            .nodes
            .values()
            .any(|n| n.name != node && n.status == NodeStatus::Online && !n.evacuated)
    {
        return Err(ApiError::bad_request(format!(
            "node {node:?} is the only online node that is not evacuated: its instances have \
             nowhere to go (evacuate with mode stop to stop them where they are)"
        )));
    }
    if req == Request::Restore && s.nodes.get(node).map(|n| n.status) == Some(NodeStatus::Offline) {
        return Err(ApiError::bad_request(format!(
            "node {node:?} is offline; restore it once it is back"
        )));
    }
    Ok(())
}

/// `POST /1.0/cluster/members/{name}/state`.
pub async fn post_state(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ClusterMemberStatePost>,
) -> Result<Response, ApiError> {
    scope.identity.require_fleet()?;
    let req = Request::parse(&body)?;
    state.cp.read(|s| check_evacuation(s, &name, req)).await??;
    let evacuated = matches!(req, Request::Evacuate { .. });
    state
        .cp
        .write(scope.by(Command::SetNodeEvacuated {
            name: name.clone(),
            evacuated,
        }))
        .await?;
    let (description, mode) = match req {
        Request::Evacuate { stop: false } => ("Evacuating cluster member", "move"),
        Request::Evacuate { stop: true } => ("Evacuating cluster member (stop)", "stop"),
        Request::Restore => ("Restoring cluster member", ""),
    };
    let op = new_operation_in(
        &state,
        DEFAULT_PROJECT,
        "task",
        description,
        [(
            "cluster_members".to_string(),
            vec![format!("/1.0/cluster/members/{name}")],
        )]
        .into(),
    );
    info!(node = %name, action = %body.action, mode, op = %op.id, "cluster member state change accepted");
    let meta = EvacuationMetadata {
        node: name.clone(),
        action: body.action.clone(),
        mode: mode.to_string(),
        instances: Vec::new(),
    };
    let st = state.clone();
    // The background writes are not the request's: a replay of its Idempotency-Key must not
    // stand in for them.
    let mut scope = scope;
    scope.idempotency = None;
    let span = info_span!("operation", op = %op.id, node = %name, what = %op.description);
    // A task of this controller whose metadata is kept when it fails.
    spawn_operation(&state, op, span, move |mut op| async move {
        let results = run(&st, &scope, &name, req, &op.id, meta.clone()).await;
        let failed = results.iter().filter(|r| r.result == "failed").count();
        let total = results.len();
        let meta = EvacuationMetadata {
            instances: results,
            ..meta
        };
        op.metadata = serde_json::to_value(&meta).unwrap_or_default();
        let result = if failed > 0 {
            Err(ApiError::conflict(format!(
                "{failed} of {total} instances could not be {}; run it again to retry them",
                if evacuated { "evacuated" } else { "restored" }
            )))
        } else {
            Ok(op.metadata.clone())
        };
        info!(total, failed, "cluster member state change done");
        (op, result)
    })
    .await
}

/// Writes the running operation's metadata (best effort).
async fn publish(state: &SharedState, op_id: &str, meta: &EvacuationMetadata) {
    let Some(mut op) = state.cp.read_local(|s| s.operations.get(op_id).cloned()) else {
        return;
    };
    op.metadata = serde_json::to_value(meta).unwrap_or_default();
    op.updated_at = clock::now();
    if let Err(e) = state
        .cp
        .write(Command::PutOperation { operation: op })
        .await
    {
        warn!(error = %e, "could not record evacuation progress");
    }
}

/// The instances the request works on, by state key.
fn targets(s: &Model, node: &str, req: Request) -> Vec<String> {
    s.instances
        .values()
        .filter(|i| match req {
            Request::Evacuate { .. } => i.node == node,
            Request::Restore => i.evacuated_from.as_ref().is_some_and(|e| e.node == node),
        })
        .map(|i| i.name.clone())
        .collect()
}

/// Handles every instance, [`PARALLEL`] at a time, and returns what happened to each.
async fn run(
    state: &SharedState,
    scope: &Scope,
    node: &str,
    req: Request,
    op_id: &str,
    meta: EvacuationMetadata,
) -> Vec<EvacuationResult> {
    let keys = state.cp.read_local(|s| targets(s, node, req));
    let gate = Arc::new(Semaphore::new(PARALLEL));
    let mut tasks = tokio::task::JoinSet::new();
    for key in keys {
        let (st, sc, gate, node) = (state.clone(), scope.clone(), gate.clone(), node.to_string());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let (project, shown) = {
                let (p, n) = split_scoped_name(&key);
                (p.to_string(), n.to_string())
            };
            let mut r = EvacuationResult {
                instance: shown,
                project,
                ..Default::default()
            };
            match one(&st, &sc, &node, req, &key).await {
                Ok((result, now_on)) => {
                    r.result = result.to_string();
                    r.node = now_on;
                }
                Err(e) => {
                    warn!(instance = %key, node = %node, error = %e.message, "evacuation step failed");
                    r.result = "failed".into();
                    r.error = e.message;
                    r.node = st
                        .cp
                        .read_local(|s| s.instances.get(&key).map(|i| i.node.clone()))
                        .unwrap_or_default();
                }
            }
            r
        });
    }
    let mut results = Vec::new();
    let mut meta = meta;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(r) => {
                results.push(r);
                meta.instances.clone_from(&results);
                publish(state, op_id, &meta).await;
            }
            Err(e) => warn!(error = %e, "an evacuation step ended abnormally"),
        }
    }
    results.sort_by(|a, b| (&a.project, &a.instance).cmp(&(&b.project, &b.instance)));
    results
}

/// The instance as it is now, once any action it has in flight ended.
async fn settled(state: &SharedState, key: &str) -> Result<Option<Instance>, ApiError> {
    loop {
        let Some(i) = state.cp.read(|s| s.instances.get(key).cloned()).await? else {
            return Ok(None);
        };
        match &i.pending {
            Some(p) => {
                wait_for_operation(state, &p.op).await?;
            }
            None => return Ok(Some(i)),
        }
    }
}

/// Fails with the operation's error unless it succeeded.
fn succeeded(op: &berth_proto::api::Operation) -> Result<(), ApiError> {
    if op.status == OperationStatus::Success {
        Ok(())
    } else {
        Err(ApiError::conflict(op.err.clone()))
    }
}

/// Records an action for the instance and waits for it to end.
async fn act(
    state: &SharedState,
    scope: &Scope,
    i: &Instance,
    action: Action,
    desired: DesiredState,
    description: &str,
) -> Result<(), ApiError> {
    let shown = split_scoped_name(&i.name).1;
    let op = new_operation_in(
        state,
        &i.project,
        "task",
        description,
        super::operations::instance_resources_in(&i.project, shown),
    );
    state
        .cp
        .write(scope.by(Command::SetInstanceAction {
            name: i.name.clone(),
            pending: PendingAction {
                op: op.id.clone(),
                action,
                since: op.created_at.clone(),
            },
            desired: Some(desired),
            operation: op.clone(),
            now: clock::now(),
        }))
        .await?;
    succeeded(&wait_for_operation(state, &op.id).await?)
}

/// The node the scheduler picks for `i` (moving away from its node).
fn pick_node(s: &Model, i: &Instance) -> Result<String, ApiError> {
    let candidate = Instance {
        node: String::new(),
        ..i.clone()
    };
    crate::scheduler::place_instance(s, &candidate).map_err(|e| {
        ApiError::conflict(format!(
            "no node can take instance {:?}: {e}",
            split_scoped_name(&i.name).1
        ))
    })
}

/// Evacuates or restores one instance; answers what was done and where it is now.
async fn one(
    state: &SharedState,
    scope: &Scope,
    node: &str,
    req: Request,
    key: &str,
) -> Result<(&'static str, String), ApiError> {
    let Some(i) = settled(state, key).await? else {
        return Ok(("left", String::new()));
    };
    let running = i.observed.status == InstanceStatusCode::Running;
    match req {
        Request::Evacuate { stop } => {
            if i.node != node {
                return Ok(("left", i.node));
            }
            // A mark made by an earlier, partial evacuation is kept: it knows whether the
            // instance ran before that evacuation stopped it.
            let mode = if stop { "stop" } else { "move" };
            if i.evacuated_from.as_ref().is_none_or(|e| e.node != node) {
                state
                    .cp
                    .write(scope.by(Command::SetEvacuation {
                        name: key.to_string(),
                        evacuation: Some(Evacuation {
                            node: node.to_string(),
                            mode: mode.to_string(),
                            was_running: running,
                        }),
                    }))
                    .await?;
            }
            if stop {
                if running {
                    let timeout_secs = stop_timeout(state, &i);
                    act(
                        state,
                        scope,
                        &i,
                        Action::Stop {
                            force: false,
                            timeout_secs,
                        },
                        DesiredState::Stopped,
                        "Stopping instance (evacuation)",
                    )
                    .await?;
                }
                return Ok(("stopped", i.node));
            }
            let to = state.cp.read(|s| pick_node(s, &i)).await??;
            let op = request_move(state, scope, key, &to).await?;
            succeeded(&wait_for_operation(state, &op.id).await?)?;
            Ok(("moved", to))
        }
        Request::Restore => {
            let Some(mark) = i.evacuated_from.clone() else {
                return Ok(("left", i.node));
            };
            let result = if i.node != node {
                let op = request_move(state, scope, key, node).await?;
                succeeded(&wait_for_operation(state, &op.id).await?)?;
                "returned"
            } else if mark.was_running && !running {
                act(
                    state,
                    scope,
                    &i,
                    Action::Start,
                    DesiredState::Running,
                    "Starting instance (restore)",
                )
                .await?;
                "started"
            } else {
                "left"
            };
            state
                .cp
                .write(scope.by(Command::SetEvacuation {
                    name: key.to_string(),
                    evacuation: None,
                }))
                .await?;
            Ok((result, node.to_string()))
        }
    }
}

/// The clean-stop timeout for an evacuation's stop: the instance's `boot.stop.timeout`
/// (30 s by default), at most [`STOP_TIMEOUT_CAP_SECS`].
fn stop_timeout(state: &SharedState, i: &Instance) -> u32 {
    state
        .cp
        .read_local(|s| {
            s.effective_config(i)
                .get("boot.stop.timeout")
                .and_then(|v| v.parse::<u32>().ok())
        })
        .unwrap_or(30)
        .min(STOP_TIMEOUT_CAP_SECS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::api::projects::testkit::*;
    use crate::api::transfers::testsupport::*;

    fn state_body(action: &str, mode: &str) -> serde_json::Value {
        json!({"action": action, "mode": mode})
    }

    #[test]
    fn requests_parse() {
        let parse = |a: &str, m: &str| {
            Request::parse(&ClusterMemberStatePost {
                action: a.into(),
                mode: m.into(),
            })
        };
        assert_eq!(
            parse("evacuate", "").unwrap(),
            Request::Evacuate { stop: false }
        );
        assert_eq!(
            parse("evacuate", "move").unwrap(),
            Request::Evacuate { stop: false }
        );
        assert_eq!(
            parse("evacuate", "stop").unwrap(),
            Request::Evacuate { stop: true }
        );
        assert_eq!(parse("restore", "").unwrap(), Request::Restore);
        for (a, m) in [
            ("evacuate", "migrate"),
            ("restore", "stop"),
            ("drain", ""),
            ("", ""),
        ] {
            assert_eq!(parse(a, m).unwrap_err().status.as_u16(), 400, "{a} {m}");
        }
    }

    /// Polls the model until `f` holds (at most 10 s).
    async fn until(api: &Api, f: impl Fn(&crate::state::State) -> bool) -> crate::state::State {
        for _ in 0..100 {
            let m = api.model().await;
            if f(&m) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the state never reached the expected shape");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn evacuation_is_checked() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        api.add_instance("a", "web", &[]).await;
        let path = "/1.0/cluster/members/n1/state";
        let (s, _) = api
            .call(MEMBER_A, "POST", path, Some(state_body("evacuate", "")))
            .await;
        assert_eq!(s, 403);
        let (s, answer) = api
            .call(
                OPERATOR,
                "POST",
                "/1.0/cluster/members/n9/state",
                Some(state_body("evacuate", "")),
            )
            .await;
        assert_eq!(s, 404, "{answer}");
        let (s, answer) = api
            .call(
                OPERATOR,
                "POST",
                path,
                Some(state_body("evacuate", "drain")),
            )
            .await;
        assert_eq!(s, 400, "{answer}");
        // The only node cannot send its instances anywhere.
        let (s, answer) = api
            .call(OPERATOR, "POST", path, Some(state_body("evacuate", "move")))
            .await;
        assert_eq!(s, 400, "{answer}");
        assert!(answer.to_string().contains("nowhere"), "{answer}");
        assert!(!api.model().await.nodes["n1"].evacuated);
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopped_instances_are_marked_and_moved_away_and_restore_clears_the_node() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        add_node(&api, "n2", 2).await;
        api.add_instance("a", "web", &[]).await;
        let path = "/1.0/cluster/members/n1/state";
        let (s, answer) = api
            .call(OPERATOR, "POST", path, Some(state_body("evacuate", "")))
            .await;
        assert_eq!(s, 202, "{answer}");
        // No reconciler runs here: the move waits as a pending action, after the mark.
        let m = until(&api, |m| m.instances["a_web"].pending.is_some()).await;
        assert!(m.nodes["n1"].evacuated);
        let i = &m.instances["a_web"];
        assert_eq!(
            i.evacuated_from,
            Some(Evacuation {
                node: "n1".into(),
                mode: "move".into(),
                was_running: false,
            })
        );
        assert_eq!(
            i.pending.as_ref().unwrap().action,
            Action::Migrate {
                from: "n1".into(),
                to: "n2".into(),
                live: false,
            }
        );
        // Restore refuses a mode; without one it clears the node's mark at once.
        let (s, _) = api
            .call(OPERATOR, "POST", path, Some(state_body("restore", "move")))
            .await;
        assert_eq!(s, 400);
        let (s, answer) = api
            .call(OPERATOR, "POST", path, Some(state_body("restore", "")))
            .await;
        assert_eq!(s, 202, "{answer}");
        assert!(!api.model().await.nodes["n1"].evacuated);
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_node_evacuates_at_once_with_its_results_in_the_operation() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        let (s, answer) = api
            .call(
                OPERATOR,
                "POST",
                "/1.0/cluster/members/n1/state",
                Some(state_body("evacuate", "stop")),
            )
            .await;
        assert_eq!(s, 202, "{answer}");
        let id = answer["metadata"]["id"].as_str().unwrap().to_string();
        let m = until(&api, |m| m.operations[&id].status.is_final()).await;
        let op = &m.operations[&id];
        assert_eq!(op.status, OperationStatus::Success, "{}", op.err);
        let meta: EvacuationMetadata = serde_json::from_value(op.metadata.clone()).unwrap();
        assert_eq!(
            meta,
            EvacuationMetadata {
                node: "n1".into(),
                action: "evacuate".into(),
                mode: "stop".into(),
                instances: vec![],
            }
        );
        assert!(m.nodes["n1"].evacuated);
        api.cp.shutdown().await;
    }
}
