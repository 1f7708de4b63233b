//! Copy and move: `POST /1.0/instances` with a `copy` source, and `POST /1.0/instances/{name}`
//! with `migration` and `?target=`. Both become instance actions (`CopyFrom` on the new
//! instance, `Migrate` on the moving one) that the leader's reconciler carries out
//! ([`crate::reconcile`]'s `transfer` module); the answer is 202 with the operation that ends
//! when the action does, and whose metadata shows the transfer's progress
//! ([`berth_proto::api::TransferMetadata`]).
//!
//! A copy gets a new identity (a new MAC, a new address allocated when it is recorded, no
//! `volatile.*` keys) and lands on its source's node (an instant btrfs snapshot) unless
//! `?target=` names another node or the source's node cannot take it (then the scheduler
//! chooses). A move keeps name, address, MAC and snapshots; a running instance moves live.
//! A move cannot rename at the same time: it is refused with 400 (move, then rename).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::response::Response;
use berth_proto::api::{self, InstancePost, InstanceStatusCode, InstancesPost, Operation};
use http::StatusCode;
use tracing::info;

use super::instances::{TargetQuery, lookup};
use super::operations::{accepted, instance_resources_in, new_operation_in};
use super::{ApiError, Scope, SharedState};
use crate::clock;
use crate::state::{
    Action, Command, DesiredState, Instance, Node, NodeStatus, Observed, PendingAction, State,
    split_scoped_name,
};

/// Config keys a copy never takes from its source.
const VOLATILE_PREFIX: &str = "volatile.";

/// Splits a copy source, `NAME` or `NAME/SNAPSHOT`, into the instance and the snapshot (`""`
/// for the instance itself); 400 for names that break the rules.
pub fn parse_copy_source(source: &str) -> Result<(String, String), ApiError> {
    if source.is_empty() {
        return Err(ApiError::bad_request(
            "the copy source names no instance (source.source)",
        ));
    }
    let (name, snapshot) = match source.split_once('/') {
        Some((name, snapshot)) => {
            api::names::validate_snapshot_name(snapshot).map_err(ApiError::bad_request)?;
            (name, snapshot)
        }
        None => (source, ""),
    };
    api::names::validate_instance_name(name).map_err(ApiError::bad_request)?;
    Ok((name.to_string(), snapshot.to_string()))
}

/// The own config of a copy: its source's own config without `volatile.*` keys, with the
/// request's keys over it.
pub fn copy_config(
    source: &BTreeMap<String, String>,
    overrides: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut config: BTreeMap<String, String> = source
        .iter()
        .filter(|(k, _)| !k.starts_with(VOLATILE_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    config.extend(
        overrides
            .iter()
            .filter(|(k, _)| !k.starts_with(VOLATILE_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    config
}

fn random_hwaddr() -> Result<String, ApiError> {
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(format!("00:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]))
}

/// What a copy request becomes once checked against the state.
enum CopyPlan {
    /// A new instance (its node `""` when the scheduler chooses).
    New(Box<Instance>),
    /// `refresh` of the existing, stopped instance of this key.
    Refresh(String),
}

/// What a copy asks for, parsed from the request.
struct CopyRequest<'a> {
    name: &'a str,
    source: String,
    snapshot: String,
    target: String,
    profiles: Option<Vec<String>>,
    req: &'a InstancesPost,
}

fn status_name(i: &Instance) -> &'static str {
    i.observed.status.as_str()
}

/// Checks a copy against the state and builds the new instance (or names the one to refresh).
fn plan_copy(
    s: &State,
    scope: &Scope,
    c: &CopyRequest<'_>,
    hwaddr: String,
) -> Result<CopyPlan, ApiError> {
    let src_key = scope.key(&c.source);
    let src = s
        .instances
        .get(&src_key)
        .filter(|i| i.project == scope.project)
        .ok_or_else(|| ApiError::not_found(format!("instance {:?} not found", c.source)))?;
    if !c.snapshot.is_empty() && !src.snapshots.contains_key(&c.snapshot) {
        return Err(ApiError::not_found(format!(
            "instance {:?} has no snapshot {:?}",
            c.source, c.snapshot
        )));
    }
    if !c.target.is_empty() {
        scope.require_unrestricted(s, "choosing a node with --target")?;
    }
    if src.observed.status == InstanceStatusCode::Pending
        || matches!(
            src.pending.as_ref().map(|p| &p.action),
            Some(Action::Create { .. } | Action::CopyFrom { refresh: false, .. })
        )
    {
        return Err(ApiError::conflict(format!(
            "instance {:?} is still being created; copy it once it exists",
            c.source
        )));
    }
    match s.nodes.get(&src.node) {
        Some(n) if n.status == NodeStatus::Online => {}
        Some(n) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "node {} of instance {:?} is offline; it cannot be copied until the node returns",
                    n.name, c.source
                ),
            ));
        }
        None => {
            return Err(ApiError::internal(format!(
                "instance {:?} is placed on node {}, which is not a member",
                c.source, src.node
            )));
        }
    }
    let key = scope.key(c.name);
    if key == src_key {
        return Err(ApiError::bad_request(
            "an instance cannot be copied onto itself",
        ));
    }
    if c.req.source.refresh {
        let target = s
            .instances
            .get(&key)
            .filter(|i| i.project == scope.project)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "instance {:?} not found; a refresh brings an existing copy up to date",
                    c.name
                ))
            })?;
        if let Some(p) = &target.pending {
            return Err(ApiError::conflict(format!(
                "instance {:?} is busy with operation {}; wait for it to end",
                c.name, p.op
            )));
        }
        if target.observed.status != InstanceStatusCode::Stopped {
            return Err(ApiError::bad_request(format!(
                "instance {:?} is {}; only a stopped instance can be refreshed",
                c.name,
                status_name(target).to_lowercase()
            )));
        }
        if s.nodes.get(&target.node).map(|n| n.status) != Some(NodeStatus::Online) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "node {} of instance {:?} is offline; it cannot be refreshed until the node returns",
                    target.node, c.name
                ),
            ));
        }
        return Ok(CopyPlan::Refresh(key));
    }
    if s.instances.contains_key(&key) {
        return Err(ApiError::conflict(format!(
            "instance {:?} already exists",
            c.name
        )));
    }
    let profiles = c.profiles.clone().unwrap_or_else(|| src.profiles.clone());
    s.check_profiles(&scope.project, &profiles)?;
    let now = clock::now();
    let start = c.req.start;
    // A copy of a snapshot has no snapshots of its own (as in LXD).
    let instance_only = c.req.source.instance_only || !c.snapshot.is_empty();
    let mut instance = Instance {
        name: key,
        project: scope.project.clone(),
        profiles,
        description: if c.req.description.is_empty() {
            src.description.clone()
        } else {
            c.req.description.clone()
        },
        node: c.target.clone(),
        image: src.image.clone(),
        config: copy_config(&src.config, &c.req.config),
        created_at: now.clone(),
        hwaddr,
        desired: if start {
            DesiredState::Running
        } else {
            DesiredState::Stopped
        },
        observed: Observed {
            status: InstanceStatusCode::Pending,
            pid: 0,
            updated_at: now.clone(),
            error: String::new(),
        },
        snapshots: if instance_only {
            BTreeMap::new()
        } else {
            src.snapshots.clone()
        },
        pending: Some(PendingAction {
            op: String::new(),
            action: Action::CopyFrom {
                source: src_key,
                snapshot: c.snapshot.clone(),
                instance_only,
                refresh: false,
                start,
            },
            since: now,
        }),
        ..Instance::default()
    };
    if instance.node.is_empty() {
        // The source's node makes the copy instantly; if it cannot take the instance, the
        // scheduler chooses when the create is applied.
        instance.node.clone_from(&src.node);
        if crate::scheduler::place_instance(s, &instance).is_err() {
            instance.node.clear();
        }
    }
    Ok(CopyPlan::New(Box::new(instance)))
}

/// `POST /1.0/instances` with `source.type = "copy"` (`profiles` as the request gave them;
/// `None` keeps the source's).
pub async fn copy(
    state: SharedState,
    scope: Scope,
    q: TargetQuery,
    req: InstancesPost,
    profiles: Option<Vec<String>>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let (source, snapshot) = parse_copy_source(&req.source.source)?;
    api::config::validate(&req.config).map_err(|e| ApiError::bad_request(e.0))?;
    for p in profiles.iter().flatten() {
        api::names::validate_profile_name(p).map_err(ApiError::bad_request)?;
    }
    let target = if q.target.is_empty() {
        req.target.clone()
    } else {
        q.target.clone()
    };
    let c = CopyRequest {
        name: &req.name,
        source,
        snapshot,
        target,
        profiles,
        req: &req,
    };
    let hwaddr = random_hwaddr()?;
    let plan = state
        .cp
        .read(|s| plan_copy(s, &scope, &c, hwaddr))
        .await??;
    match plan {
        CopyPlan::New(mut instance) => {
            let op = new_operation_in(
                &state,
                &scope.project,
                "task",
                if req.start {
                    "Copying and starting instance"
                } else {
                    "Copying instance"
                },
                instance_resources_in(&scope.project, &req.name),
            );
            if let Some(p) = instance.pending.as_mut() {
                p.op.clone_from(&op.id);
                p.since.clone_from(&op.created_at);
            }
            let key = instance.name.clone();
            // One entry: the record (address and placement chosen in apply, quotas checked
            // there), its pending copy and the operation.
            state
                .cp
                .write(scope.by(Command::CreateInstance {
                    instance: *instance,
                    operation: Some(op.clone()),
                }))
                .await?;
            info!(instance = %key, source = %c.source, op = %op.id, "instance copy accepted");
            Ok(accepted(&op))
        }
        CopyPlan::Refresh(key) => {
            let op = new_operation_in(
                &state,
                &scope.project,
                "task",
                "Refreshing instance copy",
                instance_resources_in(&scope.project, &req.name),
            );
            let action = Action::CopyFrom {
                source: scope.key(&c.source),
                snapshot: c.snapshot.clone(),
                instance_only: req.source.instance_only || !c.snapshot.is_empty(),
                refresh: true,
                start: req.start,
            };
            state
                .cp
                .write(scope.by(Command::SetInstanceAction {
                    name: key.clone(),
                    pending: PendingAction {
                        op: op.id.clone(),
                        action,
                        since: op.created_at.clone(),
                    },
                    desired: req.start.then_some(DesiredState::Running),
                    operation: op.clone(),
                    now: clock::now(),
                }))
                .await?;
            info!(instance = %key, source = %c.source, op = %op.id, "instance refresh accepted");
            Ok(accepted(&op))
        }
    }
}

/// `POST /1.0/instances/{name}` with `migration` (or `?target=`): move to node `target`.
/// A running instance moves live. Renaming in the same request is refused.
pub async fn migrate(
    state: SharedState,
    scope: Scope,
    name: String,
    target: String,
    body: InstancePost,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    if target.is_empty() {
        return Err(ApiError::bad_request(
            "a move to another node needs the node (?target=NODE)",
        ));
    }
    if !body.name.is_empty() && body.name != name {
        return Err(ApiError::bad_request(
            "a move cannot rename the instance at the same time; move it, then rename it",
        ));
    }
    let f = lookup(&state, &scope, &name).await?;
    state
        .cp
        .read(|s| scope.require_unrestricted(s, "moving an instance to another node"))
        .await??;
    let op = request_move(&state, &scope, &f.instance.name, &target).await?;
    Ok(accepted(&op))
}

/// Whether instance `i` (on node `from`) may move to node `to` (named `to_name`) now.
pub fn check_move(
    i: &Instance,
    from: Option<&Node>,
    to: Option<&Node>,
    to_name: &str,
) -> Result<(), ApiError> {
    let shown = split_scoped_name(&i.name).1;
    let to = to.ok_or_else(|| ApiError::not_found(format!("node {to_name:?} not found")))?;
    if i.node == to.name {
        return Err(ApiError::bad_request(format!(
            "instance {shown:?} is already on node {to_name:?}"
        )));
    }
    if to.status == NodeStatus::Offline {
        return Err(ApiError::bad_request(format!(
            "node {to_name:?} is offline"
        )));
    }
    if to.evacuated {
        return Err(ApiError::bad_request(format!(
            "node {to_name:?} is evacuated; it takes no instances until it is restored"
        )));
    }
    if let Some(p) = &i.pending {
        return Err(ApiError::conflict(format!(
            "instance {shown:?} is busy with operation {}; wait for it to end",
            p.op
        )));
    }
    match from {
        Some(n) if n.status == NodeStatus::Offline => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "node {} is offline; instance {shown:?} cannot move until the node returns",
                    n.name
                ),
            ));
        }
        Some(_) => {}
        None => {
            return Err(ApiError::internal(format!(
                "instance {shown:?} is placed on node {}, which is not a member",
                i.node
            )));
        }
    }
    match i.observed.status {
        InstanceStatusCode::Running | InstanceStatusCode::Stopped => Ok(()),
        other => Err(ApiError::bad_request(format!(
            "instance {shown:?} is {}; only a running or stopped instance can move",
            other.as_str().to_lowercase()
        ))),
    }
}

/// Checks and commits the move of instance `key` (a state key) to node `to` on behalf of
/// `scope`; returns the operation (of the instance's project) that ends when the move does.
pub async fn request_move(
    state: &SharedState,
    scope: &Scope,
    key: &str,
    to: &str,
) -> Result<Operation, ApiError> {
    let found = state
        .cp
        .read(|s| {
            s.instances.get(key).map(|i| {
                (
                    i.clone(),
                    s.nodes.get(&i.node).cloned(),
                    s.nodes.get(to).cloned(),
                )
            })
        })
        .await?;
    let shown = split_scoped_name(key).1;
    let Some((inst, from, to_node)) = found else {
        return Err(ApiError::not_found(format!("instance {shown:?} not found")));
    };
    check_move(&inst, from.as_ref(), to_node.as_ref(), to)?;
    let live = inst.observed.status == InstanceStatusCode::Running;
    let op = new_operation_in(
        state,
        &inst.project,
        "task",
        if live {
            "Moving instance (live)"
        } else {
            "Moving instance"
        },
        instance_resources_in(&inst.project, shown),
    );
    state
        .cp
        .write(scope.by(Command::SetInstanceAction {
            name: key.to_string(),
            pending: PendingAction {
                op: op.id.clone(),
                action: Action::Migrate {
                    from: inst.node.clone(),
                    to: to.to_string(),
                    live,
                },
                since: op.created_at.clone(),
            },
            desired: None,
            operation: op.clone(),
            now: clock::now(),
        }))
        .await?;
    info!(instance = %key, from = %inst.node, to = %to, live, op = %op.id, "instance move accepted");
    Ok(op)
}

/// Waits until operation `id` has ended (success, failure or cancel) and returns it.
pub async fn wait_for_operation(state: &SharedState, id: &str) -> Result<Operation, ApiError> {
    let mut changes = state.cp.subscribe();
    loop {
        match state.cp.read_local(|s| s.operations.get(id).cloned()) {
            Some(op) if op.status.is_final() => return Ok(op),
            Some(_) => {}
            None => {
                return Err(ApiError::internal(format!(
                    "operation {id} disappeared before it ended"
                )));
            }
        }
        // Wake on every applied entry, and once a second in any case.
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await {
            // The state machine is gone (shutting down): poll instead of spinning.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
