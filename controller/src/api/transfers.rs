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
    if let Some(p) = src.pending.as_ref().filter(|p| {
        matches!(
            p.action,
            Action::Migrate { .. } | Action::Delete { .. } | Action::Restore { .. }
        )
    }) {
        // Its volume moves, goes or is replaced: the copy would read a moving target.
        return Err(ApiError::conflict(format!(
            "instance {:?} is busy with operation {} ({}); copy it once that ends",
            c.source,
            p.op,
            p.action.describe()
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
    // A refresh of a copy that does not exist yet makes it, as LXD does.
    if let Some(target) = s
        .instances
        .get(&key)
        .filter(|i| c.req.source.refresh && i.project == scope.project)
    {
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
    let hwaddr = super::instances::random_hwaddr()?;
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
                // The target passes the scheduler's filters (architecture, room, constraints,
                // placement groups) as a placement there would.
                let fits = if s.nodes.contains_key(to) && to != i.node {
                    crate::scheduler::place_instance(
                        s,
                        &Instance {
                            node: to.to_string(),
                            ..i.clone()
                        },
                    )
                    .map(drop)
                    .map_err(|e| e.to_string())
                } else {
                    Ok(())
                };
                (
                    i.clone(),
                    s.nodes.get(&i.node).cloned(),
                    s.nodes.get(to).cloned(),
                    fits,
                )
            })
        })
        .await?;
    let shown = split_scoped_name(key).1;
    let Some((inst, from, to_node, fits)) = found else {
        return Err(ApiError::not_found(format!("instance {shown:?} not found")));
    };
    check_move(&inst, from.as_ref(), to_node.as_ref(), to)?;
    fits.map_err(|e| {
        ApiError::bad_request(format!(
            "instance {shown:?} cannot move to node {to:?}: {e}"
        ))
    })?;
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
        let local = state.cp.read_local(|s| s.operations.get(id).cloned());
        // Not here yet: on a follower, the write that made it (forwarded to the leader) may
        // not be applied locally yet; a linearizable read waits until it is.
        let op = match local {
            Some(op) => Some(op),
            None => state.cp.read(|s| s.operations.get(id).cloned()).await?,
        };
        match op {
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

/// Test helpers shared with the evacuation tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod testsupport {
    use berth_proto::api::{InstanceStatusCode, Operation};

    use crate::api::projects::testkit::{Api, join_node};
    use crate::clock;
    use crate::state::{Action, Command, Image, Node, NodeStatus, Observed, PendingAction};

    /// Joins node `name` (4 CPUs, 8 GiB) with subnet `10.87.<n>.1/24` and gives it image `img`.
    pub async fn add_node(api: &Api, name: &str, n: u8) {
        join_node(
            &api.cp,
            Node {
                name: name.into(),
                address: format!("10.0.0.{n}:8445"),
                ipv4_cidr: format!("10.87.{n}.1/24"),
                cpus: 4,
                memory_bytes: 8 << 30,
                ..Default::default()
            },
        )
        .await;
        api.cp
            .write(Command::PutImage {
                image: Image {
                    fingerprint: "img".into(),
                    locations: [name.to_string()].into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap();
    }

    pub async fn set_offline(api: &Api, node: &str) {
        api.cp
            .write(Command::SetNodeStatus {
                name: node.into(),
                status: NodeStatus::Offline,
            })
            .await
            .unwrap();
    }

    /// Records that instance `key` (a state key) was seen with `status`.
    pub async fn observe(api: &Api, key: &str, status: InstanceStatusCode) {
        let based_on = api.model().await.instances[key].observed.updated_at.clone();
        api.cp
            .write(Command::ObserveInstance {
                name: key.into(),
                observed: Observed {
                    status,
                    pid: 1,
                    updated_at: clock::now(),
                    error: String::new(),
                },
                based_on,
            })
            .await
            .unwrap();
    }

    /// Gives instance `key` a recorded snapshot `snap` (as a finished snapshot action does).
    pub async fn add_snapshot(api: &Api, key: &str, snap: &str) {
        let op = format!("snap-{key}-{snap}");
        api.cp
            .write(Command::SetInstanceAction {
                name: key.into(),
                pending: PendingAction {
                    op: op.clone(),
                    action: Action::Snapshot {
                        name: snap.into(),
                        expires_at: String::new(),
                        scheduled: false,
                        due: String::new(),
                    },
                    since: clock::now(),
                },
                desired: None,
                operation: Operation {
                    id: op.clone(),
                    ..Default::default()
                },
                now: clock::now(),
            })
            .await
            .unwrap();
        api.finish_pending(key).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use berth_proto::api::InstanceStatusCode;
    use serde_json::json;

    use super::testsupport::*;
    use super::*;
    use crate::api::projects::testkit::*;

    #[test]
    fn copy_sources_parse() {
        assert_eq!(
            parse_copy_source("web").unwrap(),
            ("web".to_string(), String::new())
        );
        assert_eq!(
            parse_copy_source("web/snap0").unwrap(),
            ("web".to_string(), "snap0".to_string())
        );
        for bad in ["", "/snap0", "web/", "a_b", "web/a/b"] {
            assert!(parse_copy_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn copies_leave_volatile_keys_behind() {
        let source = BTreeMap::from([
            ("limits.cpu".to_string(), "2".to_string()),
            (
                "volatile.eth0.hwaddr".to_string(),
                "00:16:3e:00:00:01".to_string(),
            ),
            ("user.a".to_string(), "1".to_string()),
        ]);
        let overrides = BTreeMap::from([
            ("user.a".to_string(), "2".to_string()),
            ("volatile.x".to_string(), "y".to_string()),
        ]);
        let c = copy_config(&source, &overrides);
        assert_eq!(
            c,
            BTreeMap::from([
                ("limits.cpu".to_string(), "2".to_string()),
                ("user.a".to_string(), "2".to_string()),
            ])
        );
    }

    async fn two_nodes() -> Api {
        let api = Api::start().await;
        api.add_node_and_image().await;
        add_node(&api, "n2", 2).await;
        api.add_instance("a", "web", &[("user.x", "1"), ("volatile.last", "z")])
            .await;
        api
    }

    fn copy_body(name: &str, source: &str) -> serde_json::Value {
        json!({"name": name, "source": {"type": "copy", "source": source}})
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copy_is_checked_before_it_is_accepted() {
        let api = two_nodes().await;
        api.add_instance("a", "db", &[]).await;
        let cases = [
            (copy_body("db", "web"), "", 409, "already exists"),
            (copy_body("c1", "nope"), "", 404, "not found"),
            (copy_body("c1", "web/snapx"), "", 404, "no snapshot"),
            (copy_body("c1", "web"), "?target=n9", 400, "n9"),
            (copy_body("web", "web"), "", 400, "onto itself"),
        ];
        for (body, query, status, text) in cases {
            let (s, answer) = api
                .call(
                    MEMBER_A,
                    "POST",
                    &format!("/1.0/instances{query}"),
                    Some(body.clone()),
                )
                .await;
            assert_eq!(s, status, "{body}: {answer}");
            assert!(answer.to_string().contains(text), "{body}: {answer}");
        }
        // A refresh of a copy that does not exist yet makes the copy (as LXD does).
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances",
                Some(json!({"name": "fresh", "source": {"type": "copy", "source": "web", "refresh": true}})),
            )
            .await;
        assert_eq!(s, 202, "{answer}");
        assert!(api.model().await.instances.contains_key("a_fresh"));
        // Project b does not see project a's instance; a viewer writes nothing.
        let (s, _) = api
            .call(
                MEMBER_B,
                "POST",
                "/1.0/instances",
                Some(copy_body("c1", "web")),
            )
            .await;
        assert_eq!(s, 404);
        let (s, _) = api
            .call(
                VIEWER_A,
                "POST",
                "/1.0/instances",
                Some(copy_body("c1", "web")),
            )
            .await;
        assert_eq!(s, 403);
        // A running target cannot be refreshed.
        observe(&api, "a_db", InstanceStatusCode::Running).await;
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances",
                Some(json!({"name": "db", "source": {"type": "copy", "source": "web", "refresh": true}})),
            )
            .await;
        assert_eq!(s, 400, "{answer}");
        assert!(answer.to_string().contains("stopped"), "{answer}");
        // An offline source node cannot copy.
        set_offline(&api, "n1").await;
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances",
                Some(copy_body("c1", "web")),
            )
            .await;
        assert_eq!(s, 503, "{answer}");
        assert!(!api.model().await.instances.contains_key("a_c1"));
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_gets_a_new_identity_on_its_sources_node() {
        let api = two_nodes().await;
        add_snapshot(&api, "a_web", "s1").await;
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances",
                Some(json!({
                    "name": "c1",
                    "source": {"type": "copy", "source": "web"},
                    "config": {"user.y": "2"},
                    "start": true
                })),
            )
            .await;
        assert_eq!(s, 202, "{answer}");
        let op = answer["operation"].as_str().unwrap().to_string();
        let m = api.model().await;
        let (src, c) = (&m.instances["a_web"], &m.instances["a_c1"]);
        assert_eq!(c.node, "n1");
        assert_ne!(c.hwaddr, src.hwaddr);
        assert_ne!(c.ipv4, src.ipv4);
        assert!(!c.ipv4.is_empty());
        assert_eq!(c.observed.status, InstanceStatusCode::Pending);
        assert_eq!(c.config.get("user.x").map(String::as_str), Some("1"));
        assert_eq!(c.config.get("user.y").map(String::as_str), Some("2"));
        assert!(!c.config.contains_key("volatile.last"));
        assert!(c.snapshots.contains_key("s1"));
        assert_eq!(c.profiles, src.profiles);
        let p = c.pending.as_ref().unwrap();
        assert!(op.ends_with(&p.op), "{op} {}", p.op);
        assert_eq!(
            p.action,
            Action::CopyFrom {
                source: "a_web".into(),
                snapshot: String::new(),
                instance_only: false,
                refresh: false,
                start: true,
            }
        );
        // A copy of a snapshot takes no snapshots; ?target= places it.
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances?project=a&target=n2",
                Some(copy_body("c2", "web/s1")),
            )
            .await;
        assert_eq!(s, 202, "{answer}");
        let c2 = &api.model().await.instances["a_c2"];
        assert_eq!(c2.node, "n2");
        assert!(c2.snapshots.is_empty());
        assert!(matches!(
            c2.pending.as_ref().unwrap().action,
            Action::CopyFrom {
                instance_only: true,
                ..
            }
        ));
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restricted_projects_choose_no_node() {
        let api = two_nodes().await;
        let (s, answer) = api
            .call(
                ADMIN,
                "PATCH",
                "/1.0/projects/a",
                Some(json!({"config": {"restricted": "true"}})),
            )
            .await;
        assert_eq!(s, 200, "{answer}");
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances?target=n2",
                Some(copy_body("c1", "web")),
            )
            .await;
        assert_eq!(s, 403, "{answer}");
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances/web?target=n2",
                Some(json!({"migration": true})),
            )
            .await;
        assert_eq!(s, 403, "{answer}");
        // Without a target the copy is fine.
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances",
                Some(copy_body("c1", "web")),
            )
            .await;
        assert_eq!(s, 202, "{answer}");
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn moves_are_checked_and_become_migrate_actions() {
        let api = two_nodes().await;
        add_node(&api, "n3", 3).await;
        set_offline(&api, "n3").await;
        let post = |q: &str, body: serde_json::Value| {
            let path = format!("/1.0/instances/web{q}");
            let api = &api;
            async move { api.call(MEMBER_A, "POST", &path, Some(body)).await }
        };
        let cases = [
            ("", json!({"migration": true}), 400, "target"),
            (
                "?target=n9",
                json!({"migration": true}),
                404,
                "node \\\"n9\\\" not found",
            ),
            ("?target=n3", json!({"migration": true}), 400, "offline"),
            (
                "?target=n1",
                json!({"migration": true}),
                400,
                "already on node",
            ),
            (
                "?target=n2",
                json!({"name": "other", "migration": true}),
                400,
                "rename",
            ),
        ];
        for (q, body, status, text) in cases {
            let (s, answer) = post(q, body.clone()).await;
            assert_eq!(s, status, "{q} {body}: {answer}");
            assert!(answer.to_string().contains(text), "{q} {body}: {answer}");
        }
        let (s, _) = api
            .call(
                MEMBER_B,
                "POST",
                "/1.0/instances/web?target=n2",
                Some(json!({"migration": true})),
            )
            .await;
        assert_eq!(s, 404);
        api.cp
            .write(Command::SetNodeEvacuated {
                name: "n2".into(),
                evacuated: true,
            })
            .await
            .unwrap();
        let (s, answer) = post("?target=n2", json!({"migration": true})).await;
        assert_eq!(s, 400, "{answer}");
        assert!(answer.to_string().contains("evacuated"), "{answer}");
        api.cp
            .write(Command::SetNodeEvacuated {
                name: "n2".into(),
                evacuated: false,
            })
            .await
            .unwrap();
        observe(&api, "a_web", InstanceStatusCode::Running).await;
        // The name may be repeated; `live` is accepted; a running instance moves live.
        let (s, answer) = post(
            "?target=n2",
            json!({"name": "web", "migration": true, "live": true}),
        )
        .await;
        assert_eq!(s, 202, "{answer}");
        let m = api.model().await;
        let p = m.instances["a_web"].pending.clone().unwrap();
        assert_eq!(
            p.action,
            Action::Migrate {
                from: "n1".into(),
                to: "n2".into(),
                live: true,
            }
        );
        assert_eq!(m.operations[&p.op].project, "a");
        // A second move while the first runs is refused, and so is a copy of it.
        let (s, answer) = post("?target=n2", json!({"migration": true})).await;
        assert_eq!(s, 409, "{answer}");
        let (s, answer) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances",
                Some(copy_body("c1", "web")),
            )
            .await;
        assert_eq!(s, 409, "{answer}");
        assert!(answer.to_string().contains("(move)"), "{answer}");
        api.cp.shutdown().await;
    }
}
