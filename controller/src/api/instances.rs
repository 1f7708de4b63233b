//! `/1.0/instances`: list, create, get, update, rename, delete, state, console.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use berth_proto::api::{
    self, InstancePatch, InstancePost, InstancePut, InstanceStatePut, InstanceStatusCode,
    InstancesPost,
};
use berth_proto::v1;
use serde::Deserialize;
use tracing::{error, info, warn};

use super::operations::{instance_resources, new_operation, run_task, sync};
use super::{ApiError, JsonBody, SharedState};
use crate::clock;
use crate::raft::WriteError;
use crate::state::{
    Action, Command, DesiredState, Instance, Node, NodeStatus, Observed, PendingAction,
};

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    recursion: u8,
}

/// The status the API shows: what was last observed, or `Unknown` while the instance's node
/// is offline (its real state cannot be known then).
pub fn shown_status(i: &Instance, node: Option<&Node>) -> InstanceStatusCode {
    match node {
        Some(n) if n.status == NodeStatus::Offline => InstanceStatusCode::Unknown,
        _ => i.observed.status,
    }
}

/// Converts the stored instance to its API shape (without live state).
pub fn to_api(i: &Instance, node: Option<&Node>) -> api::Instance {
    let status = shown_status(i, node);
    api::Instance {
        name: crate::state::split_scoped_name(&i.name).1.to_string(),
        project: i.project.clone(),
        description: i.description.clone(),
        status: status.as_str().into(),
        status_code: status.code(),
        location: i.node.clone(),
        kind: "container".into(),
        architecture: std::env::consts::ARCH.into(),
        config: i.config.clone(),
        profiles: i.profiles.clone(),
        ephemeral: false,
        stateful: false,
        created_at: i.created_at.clone(),
        last_used_at: i.last_used_at.clone(),
        image: i.image.clone(),
        state: None,
    }
}

/// The prefix length of a node's instance subnet ("10.87.3.1/24" gives 24).
pub fn node_prefix(n: &Node) -> u8 {
    n.ipv4_cidr
        .split_once('/')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(24)
}

/// The API state of an instance from what its agent reports.
fn state_from_agent(i: &Instance, prefix: u8, s: &v1::InstanceStatus) -> api::InstanceState {
    let status = match v1::InstanceState::try_from(s.state) {
        Ok(v1::InstanceState::Running) => InstanceStatusCode::Running,
        Ok(v1::InstanceState::Error) => InstanceStatusCode::Error,
        _ => InstanceStatusCode::Stopped,
    };
    let mut network = BTreeMap::new();
    if !i.ipv4.is_empty() {
        network.insert(
            "eth0".to_string(),
            api::InstanceStateNetwork {
                addresses: if status == InstanceStatusCode::Running {
                    vec![api::InstanceStateNetworkAddress {
                        family: "inet".into(),
                        address: i.ipv4.clone(),
                        netmask: prefix.to_string(),
                        scope: "global".into(),
                    }]
                } else {
                    vec![]
                },
                hwaddr: i.hwaddr.clone(),
                host_name: String::new(),
                state: if status == InstanceStatusCode::Running {
                    "up"
                } else {
                    "down"
                }
                .into(),
                kind: "broadcast".into(),
            },
        );
    }
    api::InstanceState {
        status: status.as_str().into(),
        status_code: status.code(),
        pid: s.pid,
        processes: s.processes,
        memory: api::InstanceStateMemory {
            usage: s.memory_usage_bytes,
            usage_peak: 0,
            total: s.memory_limit_bytes,
        },
        cpu: api::InstanceStateCpu {
            usage: s.cpu_usage_ns,
        },
        network,
        started_at: s.started_at,
        limits: s.limits.clone().into_iter().collect(),
    }
}

/// What the state records from an agent's report.
pub fn observed_from(s: &v1::InstanceStatus) -> Observed {
    Observed {
        status: match v1::InstanceState::try_from(s.state) {
            Ok(v1::InstanceState::Running) => InstanceStatusCode::Running,
            Ok(v1::InstanceState::Error) => InstanceStatusCode::Error,
            _ => InstanceStatusCode::Stopped,
        },
        pid: s.pid,
        updated_at: clock::now(),
        error: s.error.clone(),
    }
}

/// Records what an agent reported about an instance, unless the recorded observation changed
/// since `based_on` (its `updated_at` when the agent was asked).
pub async fn observe(state: &SharedState, name: &str, s: &v1::InstanceStatus, based_on: &str) {
    if let Err(e) = state
        .cp
        .write(Command::ObserveInstance {
            name: name.to_string(),
            observed: observed_from(s),
            based_on: based_on.to_string(),
        })
        .await
    {
        warn!(instance = %name, error = %e, "could not record the instance's status");
    }
}

/// The instance and the node it is on, or 404.
pub async fn find(state: &SharedState, name: &str) -> Result<(Instance, Node), ApiError> {
    let found = state
        .cp
        .read(|s| {
            s.instances
                .get(name)
                .map(|i| (i.clone(), s.nodes.get(&i.node).cloned()))
        })
        .await?;
    match found {
        Some((i, Some(n))) => Ok((i, n)),
        Some((i, None)) => Err(ApiError::internal(format!(
            "instance {} is placed on node {}, which is not a member",
            i.name, i.node
        ))),
        None => Err(ApiError::not_found(format!(
            "instance \"{name}\" not found"
        ))),
    }
}

/// Refuses a change while the instance has an action in flight (409, naming its operation)
/// or while its node is offline (503).
fn ensure_at_rest(i: &Instance, n: &Node) -> Result<(), ApiError> {
    if let Some(p) = &i.pending {
        return Err(ApiError::conflict(format!(
            "instance \"{}\" is busy with operation {}; wait for it to end",
            i.name, p.op
        )));
    }
    if n.status == NodeStatus::Offline {
        return Err(ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {} is offline; instance \"{}\" cannot be changed until it returns",
                n.name, i.name
            ),
        ));
    }
    Ok(())
}

/// The live state of one instance, asked of its agent.
async fn live_state(
    state: &SharedState,
    i: &Instance,
    n: &Node,
) -> Result<api::InstanceState, ApiError> {
    let s = state
        .agents
        .client(n)?
        .instance_state(crate::agents::short(v1::InstanceRef {
            name: i.name.clone(),
        }))
        .await?
        .into_inner();
    Ok(state_from_agent(i, node_prefix(n), &s))
}

/// `GET /1.0/instances?recursion=0|1|2`.
pub async fn list(
    State(state): State<SharedState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    if q.recursion == 0 {
        let paths: Vec<String> = state
            .cp
            .read(|s| {
                s.instances
                    .keys()
                    .map(|name| format!("/1.0/instances/{name}"))
                    .collect()
            })
            .await?;
        return Ok(sync(paths));
    }
    let (instances, nodes): (Vec<Instance>, BTreeMap<String, Node>) = state
        .cp
        .read(|s| (s.instances.values().cloned().collect(), s.nodes.clone()))
        .await?;
    match q.recursion {
        1 => Ok(sync(
            instances
                .iter()
                .map(|i| to_api(i, nodes.get(&i.node)))
                .collect::<Vec<_>>(),
        )),
        _ => {
            // One call per node, all nodes at once.
            let mut per_node = BTreeMap::new();
            let calls = nodes
                .values()
                .filter(|n| n.status == NodeStatus::Online)
                .map(|n| {
                    let st = state.clone();
                    async move {
                        let r = match st.agents.client(n) {
                            Ok(mut c) => c
                                .list_instances(crate::agents::short(v1::ListInstancesRequest {}))
                                .await
                                .map(|r| r.into_inner().instances)
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        (n.name.clone(), r)
                    }
                });
            for (node, r) in futures::future::join_all(calls).await {
                match r {
                    Ok(list) => {
                        per_node.insert(
                            node,
                            list.into_iter()
                                .map(|s| (s.name.clone(), s))
                                .collect::<BTreeMap<_, _>>(),
                        );
                    }
                    Err(e) => warn!(node = %node, error = %e, "cannot list the node's instances"),
                }
            }
            let out: Vec<api::Instance> = instances
                .iter()
                .map(|i| {
                    let node = nodes.get(&i.node);
                    let mut a = to_api(i, node);
                    if let Some(s) = per_node.get(&i.node).and_then(|m| m.get(&i.name)) {
                        let prefix = node.map(node_prefix).unwrap_or(24);
                        let st = state_from_agent(i, prefix, s);
                        a.status = st.status.clone();
                        a.status_code = st.status_code;
                        a.state = Some(st);
                    } else {
                        a.state = Some(api::InstanceState {
                            status: a.status.clone(),
                            status_code: a.status_code,
                            ..Default::default()
                        });
                    }
                    a
                })
                .collect();
            Ok(sync(out))
        }
    }
}

#[derive(Deserialize)]
pub struct TargetQuery {
    #[serde(default)]
    target: String,
}

fn random_hwaddr() -> Result<String, ApiError> {
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(format!("00:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]))
}

/// The spec an agent needs to create `i` on `n`.
pub fn agent_spec(i: &Instance, n: &Node) -> v1::InstanceSpec {
    let network = if i.ipv4.is_empty() {
        None
    } else {
        let gateway = n
            .ipv4_cidr
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        Some(v1::NetworkSpec {
            ipv4_cidr: format!("{}/{}", i.ipv4, node_prefix(n)),
            gateway,
            nameservers: vec![],
            hwaddr: i.hwaddr.clone(),
        })
    };
    v1::InstanceSpec {
        name: i.name.clone(),
        image: i.image.clone(),
        config: i.config.clone().into_iter().collect(),
        network,
    }
}

/// `POST /1.0/instances`: create (and with `start`, start) an instance from an image.
pub async fn create(
    State(state): State<SharedState>,
    Query(q): Query<TargetQuery>,
    JsonBody(req): JsonBody<InstancesPost>,
) -> Result<Response, ApiError> {
    api::names::validate_instance_name(&req.name).map_err(ApiError::bad_request)?;
    if !req.kind.is_empty() && req.kind != "container" {
        return Err(ApiError::bad_request(format!(
            "instance type \"{}\" is not supported; only containers are",
            req.kind
        )));
    }
    if req.source.kind != "image" {
        return Err(ApiError::bad_request(format!(
            "instance source type \"{}\" is not supported; use \"image\"",
            req.source.kind
        )));
    }
    if req.profiles.iter().any(|p| p != "default") {
        return Err(ApiError::bad_request(
            "profiles other than \"default\" do not exist yet",
        ));
    }
    api::config::validate(&req.config).map_err(|e| ApiError::bad_request(e.0))?;
    let wanted = if !req.source.fingerprint.is_empty() {
        req.source.fingerprint.clone()
    } else {
        req.source.alias.clone()
    };
    if wanted.is_empty() {
        return Err(ApiError::bad_request(
            "the source names no image (alias or fingerprint)",
        ));
    }
    let target = if q.target.is_empty() {
        req.target.clone()
    } else {
        q.target.clone()
    };
    let (image, exists) = state
        .cp
        .read(|s| {
            (
                s.resolve_image(&wanted).cloned(),
                s.instances.contains_key(&req.name),
            )
        })
        .await?;
    if exists {
        return Err(ApiError::conflict(format!(
            "instance \"{}\" already exists",
            req.name
        )));
    }
    let image =
        image.ok_or_else(|| ApiError::not_found(format!("image \"{wanted}\" not found")))?;
    // An empty node lets the scheduler choose when the create is applied.
    let node = target;
    let mut config = req.config.clone();
    for (k, v) in &image.properties {
        config
            .entry(format!("image.{k}"))
            .or_insert_with(|| v.clone());
    }
    let now = clock::now();
    let instance = Instance {
        name: req.name.clone(),
        project: crate::state::DEFAULT_PROJECT.into(),
        profiles: vec![crate::state::DEFAULT_PROFILE.into()],
        description: req.description.clone(),
        node: node.clone(),
        image: image.fingerprint.clone(),
        config,
        created_at: now.clone(),
        last_used_at: String::new(),
        ipv4: String::new(),
        hwaddr: random_hwaddr()?,
        desired: if req.start {
            DesiredState::Running
        } else {
            DesiredState::Stopped
        },
        observed: Observed {
            status: InstanceStatusCode::Pending,
            pid: 0,
            updated_at: now,
            error: String::new(),
        },
        pending: None,
    };
    let op = new_operation(
        &state,
        "task",
        if req.start {
            "Creating and starting instance"
        } else {
            "Creating instance"
        },
        instance_resources(&req.name),
    );
    let mut instance = instance;
    instance.pending = Some(PendingAction {
        op: op.id.clone(),
        action: Action::Create { start: req.start },
        since: op.created_at.clone(),
    });
    // One entry: the instance, its placement (chosen inside apply), its pending creation and
    // the operation. The leader's reconciler does the rest.
    state
        .cp
        .write(Command::CreateInstance {
            instance,
            operation: Some(op.clone()),
        })
        .await?;
    info!(instance = %req.name, op = %op.id, "instance create accepted");
    Ok(super::operations::accepted(&op))
}

/// `GET /1.0/instances/{name}`.
pub async fn get_one(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (i, n) = find(&state, &name).await?;
    Ok(sync(to_api(&i, Some(&n))))
}

/// `GET /1.0/instances/{name}/state`.
pub async fn get_state(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (i, n) = find(&state, &name).await?;
    if n.status == NodeStatus::Offline {
        let status = InstanceStatusCode::Unknown;
        return Ok(sync(api::InstanceState {
            status: status.as_str().into(),
            status_code: status.code(),
            ..Default::default()
        }));
    }
    Ok(sync(live_state(&state, &i, &n).await?))
}

/// Applies a new config (and description) to an instance under its lock: `build` computes
/// them from the current instance (so that concurrent PATCHes never lose each other's keys),
/// the agent applies them (live keys take effect at once; it also refuses values the host
/// cannot honour), then they are stored through Raft.
async fn apply_update<F>(state: SharedState, name: String, build: F) -> Result<Response, ApiError>
where
    F: FnOnce(&Instance) -> Result<(BTreeMap<String, String>, String), ApiError>,
{
    let lock = state.instance_lock(&name);
    let guard = lock.lock_owned().await;
    let (current, n) = find(&state, &name).await?;
    ensure_at_rest(&current, &n)?;
    let (config, description) = build(&current)?;
    api::config::validate(
        &config
            .iter()
            .filter(|(k, _)| !k.starts_with("volatile.") && !k.starts_with("image."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
    .map_err(|e| ApiError::bad_request(e.0))?;
    // image.* and volatile.* keys are the server's: keep them whatever the client sent.
    let mut merged: BTreeMap<String, String> = config
        .into_iter()
        .filter(|(k, _)| !k.starts_with("volatile.") && !k.starts_with("image."))
        .collect();
    for (k, v) in &current.config {
        if k.starts_with("volatile.") || k.starts_with("image.") {
            merged.insert(k.clone(), v.clone());
        }
    }
    let op = new_operation(
        &state,
        "task",
        "Updating instance",
        instance_resources(&name),
    );
    let s = state
        .agents
        .client(&n)?
        .update_instance(crate::agents::short(v1::UpdateInstanceRequest {
            name: current.name.clone(),
            config: merged.clone().into_iter().collect(),
        }))
        .await?
        .into_inner();
    state
        .cp
        .write(Command::UpdateInstance {
            name: name.clone(),
            config: merged,
            description,
            profiles: None,
            now: clock::now(),
        })
        .await?;
    drop(guard);
    observe(&state, &name, &s, &current.observed.updated_at).await;
    run_task(&state, op, async move { Ok(serde_json::Value::Null) }).await
}

/// `PUT /1.0/instances/{name}`: replaces the writable config.
pub async fn put(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<InstancePut>,
) -> Result<Response, ApiError> {
    if body.profiles.iter().any(|p| p != "default") {
        return Err(ApiError::bad_request(
            "profiles other than \"default\" do not exist yet",
        ));
    }
    if body.ephemeral {
        return Err(ApiError::bad_request(
            "ephemeral instances are not supported yet",
        ));
    }
    api::config::validate(&body.config).map_err(|e| ApiError::bad_request(e.0))?;
    apply_update(state, name, move |_| Ok((body.config, body.description))).await
}

/// `PATCH /1.0/instances/{name}`: changes only what is given; a config key set to null is removed.
pub async fn patch(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<InstancePatch>,
) -> Result<Response, ApiError> {
    // Everything the client sent is checked before any lock is taken.
    if let Some(changes) = &body.config {
        for (k, v) in changes {
            if k.starts_with("volatile.") || k.starts_with("image.") {
                return Err(ApiError::bad_request(format!(
                    "config key {k} is set by the server and cannot be changed"
                )));
            }
            if let Some(v) = v {
                api::config::validate_key_value(k, v).map_err(|e| ApiError::bad_request(e.0))?;
            }
        }
    }
    apply_update(state, name, move |current| {
        let mut config = current.config.clone();
        for (k, v) in body.config.unwrap_or_default() {
            match v {
                Some(v) => {
                    config.insert(k, v);
                }
                None => {
                    config.remove(&k);
                }
            }
        }
        Ok((
            config,
            body.description
                .unwrap_or_else(|| current.description.clone()),
        ))
    })
    .await
}

/// `POST /1.0/instances/{name}`: rename a stopped instance.
pub async fn rename(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<InstancePost>,
) -> Result<Response, ApiError> {
    api::names::validate_instance_name(&body.name).map_err(ApiError::bad_request)?;
    let (i, n) = find(&state, &name).await?;
    ensure_at_rest(&i, &n)?;
    if body.name == name {
        return Err(ApiError::bad_request("the new name is the current name"));
    }
    let exists = state
        .cp
        .read(|s| s.instances.contains_key(&body.name))
        .await?;
    if exists {
        return Err(ApiError::conflict(format!(
            "instance \"{}\" already exists",
            body.name
        )));
    }
    let op = new_operation(
        &state,
        "task",
        "Renaming instance",
        instance_resources(&name),
    );
    let st = state.clone();
    run_task(&state, op, async move {
        let lock = st.instance_lock(&name);
        let _guard = lock.lock().await;
        // An action may have started between the check above and the lock.
        let (i, n) = find(&st, &name).await?;
        ensure_at_rest(&i, &n)?;
        let mut client = st.agents.client(&n)?;
        let s = client
            .instance_state(crate::agents::short(v1::InstanceRef {
                name: i.name.clone(),
            }))
            .await?
            .into_inner();
        if s.state == v1::InstanceState::Running as i32 {
            return Err(ApiError::bad_request(format!(
                "instance \"{name}\" is running; stop it before renaming it"
            )));
        }
        client
            .rename_instance(crate::agents::short(v1::RenameInstanceRequest {
                name: name.clone(),
                new_name: body.name.clone(),
            }))
            .await?;
        let write = st.cp.write(Command::RenameInstance {
            from: name.clone(),
            to: body.name.clone(),
        });
        let back = v1::RenameInstanceRequest {
            name: body.name.clone(),
            new_name: name.clone(),
        };
        let undo = move || async move {
            client
                .rename_instance(crate::agents::short(back))
                .await
                .map(|_| ())
                .map_err(ApiError::from)
        };
        record_rename(&name, &body.name, write, undo).await?;
        Ok(serde_json::Value::Null)
    })
    .await
}

/// Records a rename the agent has made; when the write certainly did not happen, renames
/// the instance back on the agent (`undo`) so that the two agree, and reports the write's
/// error. When the write may still be applied (the leader failed while committing it), the
/// agent keeps the new name: undoing could leave the agent with the old name and the state
/// with the new one.
async fn record_rename<U, UF>(
    from: &str,
    to: &str,
    write: impl std::future::Future<Output = Result<crate::state::ApplyOk, WriteError>>,
    undo: U,
) -> Result<(), ApiError>
where
    U: FnOnce() -> UF,
    UF: std::future::Future<Output = Result<(), ApiError>>,
{
    let e = match write.await {
        Ok(_) => return Ok(()),
        Err(e @ WriteError::Unsure(_)) => {
            error!(instance = %from, to, error = %e, "the agent renamed the instance but the rename may not be recorded");
            return Err(e.into());
        }
        Err(e) => e,
    };
    warn!(instance = %from, to, error = %e, "cannot record the rename; renaming the instance back on its node");
    let mut err = ApiError::from(e);
    if let Err(u) = undo().await {
        error!(instance = %from, to, error = %u.message, "cannot rename the instance back; its node has it as {to}");
        err = ApiError::new(
            err.status,
            format!(
                "{}; renaming the instance back on its node failed too ({}): the node has it as \"{to}\"",
                err.message, u.message
            ),
        );
    }
    Err(err)
}

/// `DELETE /1.0/instances/{name}`: deletes a stopped instance.
pub async fn delete(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (i, n) = find(&state, &name).await?;
    ensure_at_rest(&i, &n)?;
    if i.observed.status == InstanceStatusCode::Running {
        return Err(ApiError::bad_request(format!(
            "instance \"{name}\" is running; stop it first or use --force"
        )));
    }
    let op = new_operation(
        &state,
        "task",
        "Deleting instance",
        instance_resources(&name),
    );
    request_action(&state, &name, op, Action::Delete { force: false }, None).await
}

/// `PUT /1.0/instances/{name}/state`: start, stop or restart.
pub async fn put_state(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<InstanceStatePut>,
) -> Result<Response, ApiError> {
    let (i, n) = find(&state, &name).await?;
    ensure_at_rest(&i, &n)?;
    if body.stateful {
        return Err(ApiError::bad_request(
            "stateful stop and start are not supported",
        ));
    }
    let timeout = match body.timeout {
        t if t <= 0 => i
            .config
            .get("boot.stop.timeout")
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(30),
        t if t <= 3600 => t as u32,
        t => {
            return Err(ApiError::bad_request(format!(
                "timeout {t} must be at most 3600 seconds"
            )));
        }
    };
    let (description, desired) = match body.action.as_str() {
        "start" => ("Starting instance", DesiredState::Running),
        "stop" => ("Stopping instance", DesiredState::Stopped),
        "restart" => ("Restarting instance", DesiredState::Running),
        other => {
            return Err(ApiError::bad_request(format!(
                "action \"{other}\" is not one of start, stop, restart"
            )));
        }
    };
    let op = new_operation(&state, "task", description, instance_resources(&name));
    let timeout_secs = timeout;
    let action = match body.action.as_str() {
        "start" => Action::Start,
        "stop" => Action::Stop {
            force: body.force,
            timeout_secs,
        },
        _ => Action::Restart {
            force: body.force,
            timeout_secs,
        },
    };
    request_action(&state, &name, op, action, Some(desired)).await
}

/// Commits `action` for the instance with the operation that waits for it; answers 202.
/// A second action while one is pending is refused (409, naming the operation).
async fn request_action(
    state: &SharedState,
    name: &str,
    op: berth_proto::api::Operation,
    action: Action,
    desired: Option<DesiredState>,
) -> Result<Response, ApiError> {
    state
        .cp
        .write(Command::SetInstanceAction {
            name: name.to_string(),
            pending: PendingAction {
                op: op.id.clone(),
                action,
                since: op.created_at.clone(),
            },
            desired,
            operation: op.clone(),
            now: clock::now(),
        })
        .await?;
    info!(instance = %name, op = %op.id, ?action, "instance action accepted");
    Ok(super::operations::accepted(&op))
}

#[derive(Deserialize)]
pub struct ConsoleQuery {
    #[serde(default, rename = "type")]
    kind: String,
}

/// `GET /1.0/instances/{name}/console`: the console log (what init wrote to /dev/console).
pub async fn console(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Response, ApiError> {
    if !q.kind.is_empty() && q.kind != "log" {
        return Err(ApiError::bad_request(format!(
            "console type \"{}\" is not supported; only \"log\" is",
            q.kind
        )));
    }
    let (i, n) = find(&state, &name).await?;
    let log = state
        .agents
        .client(&n)?
        .console_log(crate::agents::short(v1::ConsoleLogRequest {
            name: i.name.clone(),
            max_bytes: 1 << 20,
        }))
        .await?
        .into_inner();
    Ok((
        [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        log.data,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::raft::Unavailable;
    use crate::state::{ApplyError, ApplyOk};

    /// Runs `record_rename` with this write result; answers its result and how many times
    /// the instance was renamed back.
    async fn run(
        write: Result<ApplyOk, WriteError>,
        undo: Result<(), ApiError>,
    ) -> (Result<(), ApiError>, usize) {
        let undone = AtomicUsize::new(0);
        let result = record_rename("a", "b", async { write }, || async {
            undone.fetch_add(1, Ordering::SeqCst);
            undo
        })
        .await;
        (result, undone.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_rename_that_is_not_recorded_is_undone() {
        // Recorded: nothing to undo.
        let (r, undone) = run(Ok(ApplyOk::Done), Ok(())).await;
        assert!(r.is_ok());
        assert_eq!(undone, 0);
        // Certainly not written: renamed back, the write's error reported as it was.
        let (r, undone) = run(Err(WriteError::Unavailable(Unavailable::NoLeader)), Ok(())).await;
        let e = r.unwrap_err();
        assert_eq!(undone, 1);
        assert_eq!(e.status, http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.retry_after,
            Some(1),
            "nothing changed: the client may repeat"
        );
        let (r, undone) = run(
            Err(WriteError::Rejected(ApplyError::conflict(
                "instance \"b\" exists",
            ))),
            Ok(()),
        )
        .await;
        assert_eq!(r.unwrap_err().status, http::StatusCode::CONFLICT);
        assert_eq!(undone, 1);
        // The undo fails too: both said, and no Retry-After (the node has the new name).
        let (r, undone) = run(
            Err(WriteError::Raft("storage failed".into())),
            Err(ApiError::bad_request("agent gone")),
        )
        .await;
        let e = r.unwrap_err();
        assert_eq!(undone, 1);
        assert!(e.message.contains("storage failed"), "{}", e.message);
        assert!(e.message.contains("agent gone"), "{}", e.message);
        assert!(e.message.contains("\"b\""), "{}", e.message);
        assert_eq!(e.retry_after, None);
        // The write may still be applied: no undo, and no Retry-After.
        let (r, undone) = run(Err(WriteError::Unsure(Unavailable::NoLeader)), Ok(())).await;
        let e = r.unwrap_err();
        assert_eq!(undone, 0);
        assert_eq!(e.retry_after, None);
    }
}
