//! `/1.0/instances`: list, create, get, update, rename, delete, state, console.
//!
//! Every handler works in the project of its [`Scope`]: an instance `web` of project `p` is
//! stored (and known to its node) as `p_web`, the API shows `web` and the project, and an
//! instance of another project answers 404 as if it did not exist. Instances run with their
//! effective config ([`crate::state::State::effective_config`]: profiles in order, then their
//! own config); that is what agents receive.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use berth_proto::api::{
    self, InstancePatch, InstancePost, InstancePut, InstanceStatePut, InstanceStatusCode,
    InstancesPost,
};
use berth_proto::v1;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use tracing::{debug, error, info, warn};

use super::operations::{instance_resources_in, new_operation_in, run_task, sync};
use super::{ApiError, JsonBody, Scope, SharedState};
use crate::clock;
use crate::raft::WriteError;
use crate::state::{
    Action, ApplyError, ApplyErrorKind, Change, Command, DEFAULT_PROFILE, DesiredState, Instance,
    Node, NodeStatus, ObjectKey, Observed, PendingAction, Role, split_scoped_name,
};

#[derive(Deserialize)]
pub struct ListQuery {
    /// `0`, `1` or `2`, optionally followed by `;fields=...` (LXD's form of `fields`).
    #[serde(default)]
    recursion: String,
    /// Every project's instances (admin and operator keys only).
    #[serde(default, rename = "all-projects")]
    all_projects: bool,
    /// An LXD-style filter ([`super::filter`]) on the instances as the API shows them.
    #[serde(default)]
    filter: String,
    /// With `recursion=2`, the parts of `state` wanted, comma-separated (as LXD's
    /// `instances_state_selective_recursion`): `state.network` and `state.status` are
    /// answered from the cluster's records (the status last observed, by the reconciler or
    /// the node's heartbeat, and the allocated address) without asking any agent; any other
    /// part (`state.memory`, `state.cpu`, `state.disk`, `state.processes`, `state.pid`) asks
    /// the nodes as without `fields`. Absent: every part, live from the nodes.
    #[serde(default)]
    fields: Option<String>,
}

/// `?recursion=` as a level and the `fields` it may carry (`2;fields=state.network`, the form
/// LXD clients send); a separate `?fields=` wins over the embedded one. 400 for anything else.
fn parse_recursion(raw: &str, fields: Option<String>) -> Result<(u8, Option<String>), ApiError> {
    let mut parts = raw.split(';');
    let level = parts.next().unwrap_or_default().trim();
    let level = match level {
        "" | "0" => 0,
        "1" => 1,
        "2" => 2,
        _ => {
            return Err(ApiError::bad_request(format!(
                "recursion must be 0, 1 or 2, not {level:?}"
            )));
        }
    };
    let mut embedded = None;
    for part in parts {
        match part.trim().strip_prefix("fields=") {
            Some(f) => embedded = Some(f.to_string()),
            None => {
                return Err(ApiError::bad_request(format!(
                    "unknown recursion option {part:?} (only fields=... may follow the level)"
                )));
            }
        }
    }
    Ok((level, fields.or(embedded)))
}

/// Parts of an instance's `state` that the controller answers from its records.
const RECORDED_STATE_FIELDS: [&str; 2] = ["state.network", "state.status"];

/// Whether `?fields=` asks only for parts the controller knows without asking agents; 400 for
/// a part that does not exist.
fn recorded_fields_only(fields: Option<&str>) -> Result<bool, ApiError> {
    const LIVE: [&str; 5] = [
        "state.memory",
        "state.cpu",
        "state.disk",
        "state.processes",
        "state.pid",
    ];
    let Some(fields) = fields else {
        return Ok(false);
    };
    let mut recorded = true;
    for f in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        if LIVE.contains(&f) {
            recorded = false;
        } else if !RECORDED_STATE_FIELDS.contains(&f) {
            return Err(ApiError::bad_request(format!(
                "unknown state field {f:?} in fields (known: {}, {})",
                RECORDED_STATE_FIELDS.join(", "),
                LIVE.join(", ")
            )));
        }
    }
    Ok(recorded)
}

/// Parses `?filter=` (none when empty); 400 with the parser's sentence otherwise.
pub fn parse_filter(text: &str) -> Result<Option<super::filter::Filter>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    super::filter::Filter::parse(text)
        .map(Some)
        .map_err(ApiError::bad_request)
}

/// Whether an object, as the API shows it, passes the filter (if any).
pub fn passes(filter: Option<&super::filter::Filter>, shown: &impl serde::Serialize) -> bool {
    filter.is_none_or(|f| serde_json::to_value(shown).is_ok_and(|v| f.matches_json(&v)))
}

/// An instance's own name (its state key without the project prefix).
fn short(key: &str) -> &str {
    split_scoped_name(key).1
}

/// `?project=P` for URLs of objects of `project` (empty for `default`).
pub fn project_suffix(project: &str) -> String {
    if project == crate::state::DEFAULT_PROJECT || project.is_empty() {
        String::new()
    } else {
        format!("?project={project}")
    }
}

/// The URL of an instance as the API names it.
pub fn instance_url(i: &Instance) -> String {
    format!(
        "/1.0/instances/{}{}",
        short(&i.name),
        project_suffix(&i.project)
    )
}

/// The status the API shows: what was last observed, or `Unknown` while the instance's node
/// is offline (its real state cannot be known then).
pub fn shown_status(i: &Instance, node: Option<&Node>) -> InstanceStatusCode {
    match node {
        Some(n) if n.status == NodeStatus::Offline => InstanceStatusCode::Unknown,
        _ => i.observed.status,
    }
}

/// Converts the stored instance to its API shape (without live state; `expanded_config` is
/// left empty for the caller to fill).
pub fn to_api(i: &Instance, node: Option<&Node>) -> api::Instance {
    let status = shown_status(i, node);
    api::Instance {
        name: short(&i.name).to_string(),
        project: i.project.clone(),
        description: i.description.clone(),
        status: status.as_str().into(),
        status_code: status.code(),
        location: i.node.clone(),
        kind: "container".into(),
        architecture: std::env::consts::ARCH.into(),
        config: i.config.clone(),
        expanded_config: BTreeMap::new(),
        profiles: i.profiles.clone(),
        ephemeral: false,
        stateful: false,
        created_at: i.created_at.clone(),
        last_used_at: i.last_used_at.clone(),
        image: i.image.clone(),
        state: None,
        snapshots: super::snapshots::views(i),
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
        network: network_state(i, prefix, status),
        started_at: s.started_at,
        limits: s.limits.clone().into_iter().collect(),
        disk: disk_state(s),
    }
}

/// The API state of an instance from the cluster's records alone: the status shown (as
/// [`shown_status`]), the recorded pid and the allocated address; no usage figures.
fn state_from_record(i: &Instance, node: Option<&Node>) -> api::InstanceState {
    let status = shown_status(i, node);
    api::InstanceState {
        status: status.as_str().into(),
        status_code: status.code(),
        pid: if status == InstanceStatusCode::Running {
            i.observed.pid
        } else {
            0
        },
        network: network_state(i, node.map(node_prefix).unwrap_or(24), status),
        ..Default::default()
    }
}

/// `eth0` of an instance with an address (none without): its address while it runs.
fn network_state(
    i: &Instance,
    prefix: u8,
    status: InstanceStatusCode,
) -> BTreeMap<String, api::InstanceStateNetwork> {
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
    network
}

/// The `root` disk of an agent's report, when its use is known.
fn disk_state(s: &v1::InstanceStatus) -> BTreeMap<String, api::InstanceStateDisk> {
    if s.disk_usage_bytes == 0 {
        return BTreeMap::new();
    }
    let total = s
        .limits
        .get("limits.disk")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    BTreeMap::from([(
        "root".to_string(),
        api::InstanceStateDisk {
            usage: s.disk_usage_bytes,
            total,
        },
    )])
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

/// Records what an agent reported about an instance (by state key), unless the recorded
/// observation changed since `based_on` (its `updated_at` when the agent was asked).
pub async fn observe(state: &SharedState, key: &str, s: &v1::InstanceStatus, based_on: &str) {
    if let Err(e) = state
        .cp
        .write(Command::ObserveInstance {
            name: key.to_string(),
            observed: observed_from(s),
            based_on: based_on.to_string(),
        })
        .await
    {
        warn!(instance = %key, error = %e, "could not record the instance's status");
    }
}

/// An instance as a handler finds it: the record, its node, the config it runs with and its
/// ETag, all from one read.
pub struct Found {
    pub instance: Instance,
    pub node: Node,
    /// The effective config (profiles, then its own).
    pub expanded: BTreeMap<String, String>,
    /// [`crate::state::State::etag`] of the instance.
    pub etag: String,
}

/// Finds instance `name` of the scope's project, or 404 (also for a name that is not an
/// instance name, so that `a_b` never reaches instance `b` of project `a`).
pub async fn lookup(state: &SharedState, scope: &Scope, name: &str) -> Result<Found, ApiError> {
    let not_found = || ApiError::not_found(format!("instance {name:?} not found"));
    if api::names::validate_instance_name(name).is_err() {
        return Err(not_found());
    }
    let key = scope.key(name);
    let found = state
        .cp
        .read(|s| {
            s.instances
                .get(&key)
                .filter(|i| i.project == scope.project)
                .map(|i| {
                    (
                        i.clone(),
                        s.nodes.get(&i.node).cloned(),
                        s.effective_config(i).into_owned(),
                        s.etag(&ObjectKey::Instance(key.clone()))
                            .unwrap_or_default(),
                    )
                })
        })
        .await?;
    match found {
        Some((instance, Some(node), expanded, etag)) => Ok(Found {
            instance,
            node,
            expanded,
            etag,
        }),
        Some((i, None, _, _)) => Err(ApiError::internal(format!(
            "instance {name:?} is placed on node {}, which is not a member",
            i.node
        ))),
        None => Err(not_found()),
    }
}

/// The instance `name` of the scope's project and the node it is on, or 404.
pub async fn find(
    state: &SharedState,
    scope: &Scope,
    name: &str,
) -> Result<(Instance, Node), ApiError> {
    let f = lookup(state, scope, name).await?;
    Ok((f.instance, f.node))
}

/// 403 for a viewer key on something that reads or reaches inside an instance (exec, files,
/// console): viewers see instances, not into them.
pub fn require_member(scope: &Scope, what: &str) -> Result<(), ApiError> {
    if scope.identity.role == Role::Viewer {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{what} needs a member, operator or admin key; key {:?} is a viewer key",
                scope.identity.key_name
            ),
        ))
    } else {
        Ok(())
    }
}

/// A new operation of the scope's project about instance `name` (its short name).
pub fn instance_operation(
    state: &SharedState,
    scope: &Scope,
    class: &str,
    description: &str,
    name: &str,
) -> api::Operation {
    new_operation_in(
        state,
        &scope.project,
        class,
        description,
        instance_resources_in(&scope.project, name),
    )
}

/// The ETag an `If-Match` header asks for: `None` without the header or for `*` (any
/// version). Quotes and a weak `W/` prefix are dropped; a list of several ETags is refused.
pub fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(http::header::IF_MATCH) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::bad_request("the If-Match header is not ASCII"))?
        .trim();
    if v == "*" {
        return Ok(None);
    }
    if v.contains(',') {
        return Err(ApiError::bad_request(
            "the If-Match header names several ETags; give the one ETag that was read",
        ));
    }
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v);
    if v.is_empty() {
        return Err(ApiError::bad_request("the If-Match header is empty"));
    }
    Ok(Some(v.to_string()))
}

/// 412 when the client's `If-Match` does not name the current ETag.
pub fn check_if_match(what: &str, wanted: Option<&str>, current: &str) -> Result<(), ApiError> {
    match wanted {
        Some(w) if w != current => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("{what} changed since it was read (its ETag no longer matches If-Match)"),
        )),
        _ => Ok(()),
    }
}

/// `command`, applied only while `key` still has `etag` when one is given.
pub fn guarded(command: Command, key: ObjectKey, etag: Option<String>) -> Command {
    match etag {
        Some(etag) => Command::IfMatch {
            expect: vec![(key, etag)],
            command: Box::new(command),
        },
        None => command,
    }
}

/// A sync answer with an `ETag` header.
pub fn sync_with_etag(metadata: impl serde::Serialize, etag: &str) -> Response {
    let mut resp = sync(metadata);
    if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        resp.headers_mut().insert(http::header::ETAG, v);
    }
    resp
}

/// Refuses a change while the instance has an action in flight (409, naming its operation)
/// or while its node is offline (503).
fn ensure_at_rest(i: &Instance, n: &Node) -> Result<(), ApiError> {
    if let Some(p) = &i.pending {
        return Err(ApiError::conflict(format!(
            "instance \"{}\" is busy with operation {}; wait for it to end",
            short(&i.name),
            p.op
        )));
    }
    if n.status == NodeStatus::Offline {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {} is offline; instance \"{}\" cannot be changed until it returns",
                n.name,
                short(&i.name)
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

/// `GET /1.0/instances?recursion=0|1|2[&all-projects=true]`: the instances of the scope's
/// project (of every project with `all-projects`, for admin and operator keys).
pub async fn list(
    State(state): State<SharedState>,
    scope: Scope,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    if q.all_projects {
        scope.identity.require_fleet()?;
    }
    let filter = parse_filter(&q.filter)?;
    let (recursion, fields) = parse_recursion(&q.recursion, q.fields.clone())?;
    let recorded_only = recorded_fields_only(fields.as_deref())?;
    // The instance as the API shows it, when it is in scope and passes the filter (built once:
    // the filter matches what is shown).
    let shown = |s: &crate::state::State, i: &Instance| -> Option<api::Instance> {
        if !(q.all_projects || i.project == scope.project) {
            return None;
        }
        let mut a = to_api(i, s.nodes.get(&i.node));
        a.expanded_config = s.effective_config(i).into_owned();
        passes(filter.as_ref(), &a).then_some(a)
    };
    if recursion == 0 {
        let paths: Vec<String> = state
            .cp
            .read(|s| {
                s.instances
                    .values()
                    // Without a filter, no object needs building for a URL.
                    .filter(|i| match filter {
                        None => q.all_projects || i.project == scope.project,
                        Some(_) => shown(s, i).is_some(),
                    })
                    .map(instance_url)
                    .collect()
            })
            .await?;
        return Ok(sync(paths));
    }
    let (listed, nodes): (Vec<(Instance, api::Instance)>, BTreeMap<String, Node>) = state
        .cp
        .read(|s| {
            let list = s
                .instances
                .values()
                .filter_map(|i| shown(s, i).map(|a| (i.clone(), a)))
                .collect();
            (list, s.nodes.clone())
        })
        .await?;
    let (records, instances): (Vec<Instance>, Vec<api::Instance>) = listed.into_iter().unzip();
    if recursion == 1 {
        return Ok(sync_list(&instances));
    }
    if recorded_only {
        let out: Vec<api::Instance> = records
            .iter()
            .zip(instances)
            .map(|(i, mut a)| {
                a.state = Some(state_from_record(i, nodes.get(&i.node)));
                a
            })
            .collect();
        return Ok(sync_list(&out));
    }
    // One call per node, all nodes at once.
    let mut per_node = BTreeMap::new();
    let calls = nodes
        .values()
        .filter(|n| n.status == NodeStatus::Online)
        .filter(|n| records.iter().any(|i| i.node == n.name))
        .map(|n| {
            let st = state.clone();
            // Only the listed instances: the node's others cost nothing.
            let names: Vec<String> = records
                .iter()
                .filter(|i| i.node == n.name)
                .map(|i| i.name.clone())
                .collect();
            async move {
                let r = match st.agents.client(n) {
                    Ok(mut c) => c
                        .list_instances(crate::agents::short(v1::ListInstancesRequest { names }))
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
    let out: Vec<api::Instance> = records
        .iter()
        .zip(instances)
        .map(|(i, mut a)| {
            let node = nodes.get(&i.node);
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
    Ok(sync_list(&out))
}

/// A sync envelope around `list`, serialized straight to bytes ([`sync`] goes through a
/// `serde_json::Value` tree first, which at 1000 instances costs more than the rest of the
/// listing). Same fields as [`api::Response::sync`].
fn sync_list(list: &[api::Instance]) -> Response {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        #[serde(rename = "type")]
        kind: api::ResponseType,
        status: &'static str,
        status_code: u16,
        error_code: u16,
        error: &'static str,
        metadata: &'a [api::Instance],
    }
    let envelope = Envelope {
        kind: api::ResponseType::Sync,
        status: "Success",
        status_code: 200,
        error_code: 0,
        error: "",
        metadata: list,
    };
    match serde_json::to_vec(&envelope) {
        Ok(body) => (
            [(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            ApiError::internal(format!("cannot encode the instance list: {e}")).into_response()
        }
    }
}

#[derive(Deserialize)]
pub struct TargetQuery {
    #[serde(default)]
    pub target: String,
}

/// A random MAC address in LXD's `00:16:3e` range.
pub(crate) fn random_hwaddr() -> Result<String, ApiError> {
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(format!("00:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]))
}

/// The spec an agent gets for instance `i` running with `config`; `n` is the node whose subnet
/// its address came from ([`crate::state::State::address_home`]), which gives the prefix and
/// the gateway: a moved instance keeps them.
pub fn agent_spec(i: &Instance, config: &BTreeMap<String, String>, n: &Node) -> v1::InstanceSpec {
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
        config: config.clone().into_iter().collect(),
        network,
    }
}

/// Checks profile names given by a client (400 for a name that breaks the rule, so that no
/// name can reach a profile of another project).
fn check_profile_names(profiles: &[String]) -> Result<(), ApiError> {
    for p in profiles {
        api::names::validate_profile_name(p).map_err(ApiError::bad_request)?;
    }
    Ok(())
}

/// The profiles a create asks for: the `default` profile when the body names none (absent
/// or `null`), exactly the list otherwise (`[]`: no profile), as LXD does.
fn requested_profiles(body: &serde_json::Value, listed: &[String]) -> Vec<String> {
    match body.get("profiles") {
        None | Some(serde_json::Value::Null) => vec![DEFAULT_PROFILE.to_string()],
        Some(_) => listed.to_vec(),
    }
}

/// The fields of a create or PUT body for which `null` means absent.
const NULLABLE: &[&str] = &["profiles", "config", "description"];

/// `body` without the top-level `fields` that are `null`: a `null` there means absent.
fn without_null(mut body: serde_json::Value, fields: &[&str]) -> serde_json::Value {
    if let Some(obj) = body.as_object_mut() {
        obj.retain(|k, v| !(v.is_null() && fields.contains(&k.as_str())));
    }
    body
}

/// `POST /1.0/instances`: create (and with `start`, start) an instance from an image, in the
/// scope's project.
pub async fn create(
    State(state): State<SharedState>,
    scope: Scope,
    Query(q): Query<TargetQuery>,
    JsonBody(raw): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let req: InstancesPost = serde_json::from_value(without_null(raw.clone(), NULLABLE))
        .map_err(|e| ApiError::bad_request(format!("request body is not a valid instance: {e}")))?;
    let profiles = requested_profiles(&raw, &req.profiles);
    api::names::validate_instance_name(&req.name).map_err(ApiError::bad_request)?;
    if !req.kind.is_empty() && req.kind != "container" {
        return Err(ApiError::bad_request(format!(
            "instance type \"{}\" is not supported; only containers are",
            req.kind
        )));
    }
    if req.source.kind == "copy" {
        // A copy keeps its source's profiles unless the request lists some.
        let listed = raw
            .get("profiles")
            .filter(|v| !v.is_null())
            .map(|_| profiles);
        return super::transfers::copy(state, scope, q, req, listed).await;
    }
    if req.source.kind != "image" {
        return Err(ApiError::bad_request(format!(
            "instance source type \"{}\" is not supported; use \"image\" or \"copy\"",
            req.source.kind
        )));
    }
    check_profile_names(&profiles)?;
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
    let key = scope.key(&req.name);
    let (image, exists, profiles_ok, unrestricted) = state
        .cp
        .read(|s| {
            (
                s.resolve_image_in(&scope.project, &wanted).cloned(),
                s.instances.contains_key(&key),
                s.check_profiles(&scope.project, &profiles),
                if target.is_empty() {
                    Ok(())
                } else {
                    scope.require_unrestricted(s, "choosing a node with --target")
                },
            )
        })
        .await?;
    unrestricted?;
    if exists {
        return Err(ApiError::conflict(format!(
            "instance \"{}\" already exists",
            req.name
        )));
    }
    let image =
        image.ok_or_else(|| ApiError::not_found(format!("image \"{wanted}\" not found")))?;
    profiles_ok?;
    let mut config = req.config.clone();
    for (k, v) in &image.properties {
        config
            .entry(format!("image.{k}"))
            .or_insert_with(|| v.clone());
    }
    let now = clock::now();
    let op = instance_operation(
        &state,
        &scope,
        "task",
        if req.start {
            "Creating and starting instance"
        } else {
            "Creating instance"
        },
        &req.name,
    );
    let instance = Instance {
        name: key.clone(),
        project: scope.project.clone(),
        profiles,
        description: req.description.clone(),
        // An empty node lets the scheduler choose when the create is applied.
        node: target,
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
        pending: Some(PendingAction {
            op: op.id.clone(),
            action: Action::Create { start: req.start },
            since: op.created_at.clone(),
        }),
        ..Instance::default()
    };
    // One entry: the instance, its placement (chosen inside apply), its pending creation and
    // the operation. Quotas and restrictions are checked there too, atomically. The leader's
    // reconciler does the rest.
    state
        .cp
        .write(scope.by(Command::CreateInstance {
            instance,
            operation: Some(op.clone()),
        }))
        .await?;
    info!(instance = %key, project = %scope.project, op = %op.id, "instance create accepted");
    Ok(super::operations::accepted(&op))
}

/// `GET /1.0/instances/{name}`: the instance with its own `config`, its `expanded_config`
/// and an `ETag` header for `If-Match`.
pub async fn get_one(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let f = lookup(&state, &scope, &name).await?;
    let mut a = to_api(&f.instance, Some(&f.node));
    a.expanded_config = f.expanded;
    Ok(sync_with_etag(a, &f.etag))
}

/// `GET /1.0/instances/{name}/state`.
pub async fn get_state(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (i, n) = find(&state, &scope, &name).await?;
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

/// The writable part of an instance after a PUT or PATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writable {
    pub config: BTreeMap<String, String>,
    pub description: String,
    pub profiles: Vec<String>,
}

/// What PATCH makes of `current`: config keys set (or removed when `null`), the description
/// and the profile list replaced when given.
pub fn merge_patch(current: &Instance, patch: InstancePatch) -> Writable {
    let mut config = current.config.clone();
    for (k, v) in patch.config.unwrap_or_default() {
        match v {
            Some(v) => {
                config.insert(k, v);
            }
            None => {
                config.remove(&k);
            }
        }
    }
    Writable {
        config,
        description: patch
            .description
            .unwrap_or_else(|| current.description.clone()),
        profiles: patch.profiles.unwrap_or_else(|| current.profiles.clone()),
    }
}

/// `config` without the server's keys (`image.*`, `volatile.*`), which are then taken from
/// `current`: whatever a client sends, they stay as the server set them.
pub fn keep_server_keys(
    config: BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let server = |k: &str| k.starts_with("volatile.") || k.starts_with("image.");
    let mut merged: BTreeMap<String, String> =
        config.into_iter().filter(|(k, _)| !server(k)).collect();
    for (k, v) in current {
        if server(k) {
            merged.insert(k.clone(), v.clone());
        }
    }
    merged
}

/// Sends the instance's current effective config (as committed) to its agent: after a
/// profile changed, or to undo a change the cluster refused. Skips (with a log line) an
/// instance whose node is offline or that its node does not have yet (the reconciler sends
/// the config again before the next create or start). Answers whether it was sent.
pub async fn push_effective_config(state: &SharedState, key: &str) -> Result<bool, ApiError> {
    let found = state
        .cp
        .read(|s| {
            s.instances.get(key).map(|i| {
                (
                    i.clone(),
                    s.nodes.get(&i.node).cloned(),
                    s.effective_config(i).into_owned(),
                )
            })
        })
        .await?;
    let Some((i, Some(node), config)) = found else {
        debug!(instance = %key, "instance or node gone; nothing to send");
        return Ok(false);
    };
    if matches!(
        i.pending.as_ref().map(|p| &p.action),
        Some(Action::Create { .. } | Action::CopyFrom { .. })
    ) {
        debug!(instance = %key, "instance still being created; its create sends the config");
        return Ok(false);
    }
    if node.status == NodeStatus::Offline {
        warn!(instance = %key, node = %node.name, "node offline; the instance gets its new config when it next starts");
        return Ok(false);
    }
    let s = state
        .agents
        .client(&node)?
        .update_instance(crate::agents::short(v1::UpdateInstanceRequest {
            name: i.name.clone(),
            config: config.into_iter().collect(),
        }))
        .await?
        .into_inner();
    observe(state, key, &s, &i.observed.updated_at).await;
    Ok(true)
}

/// Applies a new writable part to an instance under its lock: `build` computes it from the
/// current instance (so that concurrent PATCHes on this controller never lose each other's
/// keys); it is validated, the new effective config goes to the agent (live keys take effect
/// at once; it also refuses values the host cannot honour), then the change is committed,
/// guarded by the ETag that was read (the client's `If-Match`, or the one read here, so that
/// a change made meanwhile elsewhere is never overwritten). When the cluster refuses it
/// (quota, restriction, stale ETag), the agent gets the committed config back.
async fn apply_update<F>(
    state: SharedState,
    scope: Scope,
    name: String,
    wanted_etag: Option<String>,
    build: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(&Instance) -> Result<Writable, ApiError>,
{
    scope.require_write()?;
    let key = scope.key(&name);
    let lock = state.instance_lock(&key);
    let guard = lock.lock_owned().await;
    let found = lookup(&state, &scope, &name).await?;
    let what = format!("instance {name:?}");
    check_if_match(&what, wanted_etag.as_deref(), &found.etag)?;
    ensure_at_rest(&found.instance, &found.node)?;
    let w = build(&found.instance)?;
    check_profile_names(&w.profiles)?;
    let config = keep_server_keys(w.config, &found.instance.config);
    api::config::validate(
        &config
            .iter()
            .filter(|(k, _)| !k.starts_with("volatile.") && !k.starts_with("image."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
    .map_err(|e| ApiError::bad_request(e.0))?;
    let mut candidate = found.instance.clone();
    candidate.config = config.clone();
    candidate.description = w.description.clone();
    candidate.profiles = w.profiles.clone();
    // The quotas and restrictions apply checks again are checked here first too, so that a
    // refused change never reaches the agent (not even for the moment until it is undone).
    let expanded = state
        .cp
        .read(|s| {
            s.check_profiles(&scope.project, &candidate.profiles)?;
            s.check_project_change(
                &scope.project,
                &Change {
                    instances: vec![(key.as_str(), Some(&candidate))],
                    profile: None,
                },
            )?;
            Ok::<_, ApplyError>(s.effective_config(&candidate).into_owned())
        })
        .await??;
    let op = instance_operation(&state, &scope, "task", "Updating instance", &name);
    let s = state
        .agents
        .client(&found.node)?
        .update_instance(crate::agents::short(v1::UpdateInstanceRequest {
            name: key.clone(),
            config: expanded.into_iter().collect(),
        }))
        .await?
        .into_inner();
    let command = Command::IfMatch {
        expect: vec![(ObjectKey::Instance(key.clone()), found.etag.clone())],
        command: Box::new(Command::UpdateInstance {
            name: key.clone(),
            config,
            description: w.description,
            profiles: Some(w.profiles),
            now: clock::now(),
        }),
    };
    match state.cp.write(scope.by(command)).await {
        Ok(_) => {}
        // It may still be applied: the agent keeps the new config, which it then matches.
        Err(e @ WriteError::Unsure(_)) => return Err(e.into()),
        Err(e) => {
            // Not applied: the agent goes back to the committed config.
            if let Err(undo) = push_effective_config(&state, &key).await {
                error!(instance = %key, error = %undo.message, "cannot give the instance its committed config back; it runs with the refused one until it restarts");
            }
            return Err(match e {
                WriteError::Rejected(a)
                    if a.kind == ApplyErrorKind::PreconditionFailed && wanted_etag.is_none() =>
                {
                    ApiError::conflict(format!(
                        "instance {name:?} was changed by another request at the same time; repeat the request"
                    ))
                }
                other => other.into(),
            });
        }
    }
    drop(guard);
    observe(&state, &key, &s, &found.instance.observed.updated_at).await;
    run_task(&state, op, async move { Ok(serde_json::Value::Null) }).await
}

/// `PUT /1.0/instances/{name}`: replaces the writable part: config, description and profiles.
pub async fn put(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    // `"profiles": null` is as if absent: no profile (PUT replaces everything); so for the
    // config and the description.
    let body: InstancePut = serde_json::from_value(without_null(raw, NULLABLE))
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    let wanted = if_match(&headers)?;
    if !body.restore.is_empty() {
        return super::snapshots::restore(state, scope, name, body.restore, wanted).await;
    }
    if body.ephemeral {
        return Err(ApiError::bad_request(
            "ephemeral instances are not supported yet",
        ));
    }
    check_profile_names(&body.profiles)?;
    api::config::validate(&body.config).map_err(|e| ApiError::bad_request(e.0))?;
    apply_update(state, scope, name, wanted, move |_| {
        Ok(Writable {
            config: body.config,
            description: body.description,
            profiles: body.profiles,
        })
    })
    .await
}

/// `PATCH /1.0/instances/{name}`: changes only what is given; a config key set to null is
/// removed; `profiles`, when given, replaces the list.
pub async fn patch(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<InstancePatch>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let wanted = if_match(&headers)?;
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
    if let Some(p) = &body.profiles {
        check_profile_names(p)?;
    }
    apply_update(state, scope, name, wanted, move |current| {
        Ok(merge_patch(current, body))
    })
    .await
}

/// `POST /1.0/instances/{name}`: rename an instance (within its project), or move it to
/// another node (`migration` with `?target=`).
pub async fn rename(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    Query(q): Query<TargetQuery>,
    JsonBody(body): JsonBody<InstancePost>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    if body.migration || !q.target.is_empty() {
        return super::transfers::migrate(state, scope, name, q.target, body).await;
    }
    let (i, n) = find(&state, &scope, &name).await?;
    api::names::validate_instance_name(&body.name).map_err(ApiError::bad_request)?;
    ensure_at_rest(&i, &n)?;
    if body.name == name {
        return Err(ApiError::bad_request("the new name is the current name"));
    }
    let (from, to) = (scope.key(&name), scope.key(&body.name));
    let exists = state.cp.read(|s| s.instances.contains_key(&to)).await?;
    if exists {
        return Err(ApiError::conflict(format!(
            "instance \"{}\" already exists",
            body.name
        )));
    }
    let op = instance_operation(&state, &scope, "task", "Renaming instance", &name);
    let st = state.clone();
    run_task(&state, op, async move {
        // A running instance is stopped (cleanly), renamed and started again under its new
        // name: its monitor process holds the name for as long as it runs.
        let running = i.desired == DesiredState::Running;
        if running {
            action_and_wait(
                &st,
                &scope,
                &from,
                "Stopping instance to rename it",
                Action::Stop {
                    force: false,
                    timeout_secs: 0,
                },
                Some(DesiredState::Stopped),
            )
            .await?;
        }
        let renamed = async {
            let lock = st.instance_lock(&from);
            let guard = lock.lock().await;
            // An action may have started between the check above and the lock.
            let (i, n) = find(&st, &scope, &name).await?;
            ensure_at_rest(&i, &n)?;
            let mut client = st.agents.client(&n)?;
            let s = client
                .instance_state(crate::agents::short(v1::InstanceRef {
                    name: i.name.clone(),
                }))
                .await?
                .into_inner();
            if s.state == v1::InstanceState::Running as i32 {
                return Err(ApiError::conflict(format!(
                    "instance \"{name}\" was started again while it was being renamed"
                )));
            }
            client
                .rename_instance(crate::agents::short(v1::RenameInstanceRequest {
                    name: from.clone(),
                    new_name: to.clone(),
                }))
                .await?;
            let write = st.cp.write(scope.by(Command::RenameInstance {
                from: from.clone(),
                to: to.clone(),
            }));
            let back = v1::RenameInstanceRequest {
                name: to.clone(),
                new_name: from.clone(),
            };
            let undo = move || async move {
                client
                    .rename_instance(crate::agents::short(back))
                    .await
                    .map(|_| ())
                    .map_err(ApiError::from)
            };
            record_rename(&name, &body.name, write, undo).await?;
            drop(guard);
            Ok::<(), ApiError>(())
        }
        .await;
        if let Err(e) = renamed {
            // The instance was stopped for a rename that did not happen: it runs again under
            // its old name.
            if running
                && let Err(again) = action_and_wait(
                    &st,
                    &scope,
                    &from,
                    "Starting instance again after a failed rename",
                    Action::Start,
                    Some(DesiredState::Running),
                )
                .await
            {
                warn!(instance = %from, error = %again, "could not start the instance again after a failed rename");
            }
            return Err(e);
        }
        if running {
            action_and_wait(
                &st,
                &scope,
                &to,
                "Starting renamed instance",
                Action::Start,
                Some(DesiredState::Running),
            )
            .await?;
        }
        Ok(serde_json::Value::Null)
    })
    .await
}

/// Requests `action` on instance `key` (wanting it `desired` from then on, when given) and
/// waits for the reconciler to finish it; its failure is this call's error.
pub(crate) async fn action_and_wait(
    state: &SharedState,
    scope: &Scope,
    key: &str,
    description: &str,
    action: Action,
    desired: Option<DesiredState>,
) -> Result<(), ApiError> {
    let op = instance_operation(state, scope, "task", description, short(key));
    request_action(state, scope, key, op.clone(), action, desired, None).await?;
    let done = super::transfers::wait_for_operation(state, &op.id).await?;
    if done.status != api::OperationStatus::Success {
        return Err(ApiError::conflict(format!(
            "{} failed: {}",
            description.to_lowercase(),
            done.err
        )));
    }
    Ok(())
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

/// `DELETE /1.0/instances/{name}`: deletes a stopped instance (`If-Match` honoured).
pub async fn delete(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let wanted = if_match(&headers)?;
    let f = lookup(&state, &scope, &name).await?;
    check_if_match(&format!("instance {name:?}"), wanted.as_deref(), &f.etag)?;
    ensure_at_rest(&f.instance, &f.node)?;
    if f.instance.observed.status == InstanceStatusCode::Running {
        return Err(ApiError::bad_request(format!(
            "instance \"{name}\" is running; stop it first or use --force"
        )));
    }
    let op = instance_operation(&state, &scope, "task", "Deleting instance", &name);
    request_action(
        &state,
        &scope,
        &f.instance.name,
        op,
        Action::Delete { force: false },
        None,
        wanted,
    )
    .await
}

/// `PUT /1.0/instances/{name}/state`: start, stop or restart.
pub async fn put_state(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<InstanceStatePut>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let f = lookup(&state, &scope, &name).await?;
    ensure_at_rest(&f.instance, &f.node)?;
    if body.stateful {
        return Err(ApiError::bad_request(
            "stateful stop and start are not supported",
        ));
    }
    let timeout = match body.timeout {
        t if t <= 0 => f
            .expanded
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
    let op = instance_operation(&state, &scope, "task", description, &name);
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
    request_action(
        &state,
        &scope,
        &f.instance.name,
        op,
        action,
        Some(desired),
        None,
    )
    .await
}

/// Commits `action` for the instance (by state key) with the operation that waits for it,
/// guarded by `etag` when given; answers 202. A second action while one is pending is
/// refused (409, naming the operation).
async fn request_action(
    state: &SharedState,
    scope: &Scope,
    key: &str,
    op: berth_proto::api::Operation,
    action: Action,
    desired: Option<DesiredState>,
    etag: Option<String>,
) -> Result<Response, ApiError> {
    let command = Command::SetInstanceAction {
        name: key.to_string(),
        pending: PendingAction {
            op: op.id.clone(),
            action,
            since: op.created_at.clone(),
        },
        desired,
        operation: op.clone(),
        now: clock::now(),
    };
    state
        .cp
        .write(scope.by(guarded(command, ObjectKey::Instance(key.to_string()), etag)))
        .await?;
    info!(instance = %key, op = %op.id, "instance action accepted");
    Ok(super::operations::accepted(&op))
}

#[derive(Deserialize)]
pub struct ConsoleQuery {
    #[serde(default, rename = "type")]
    kind: String,
}

/// `GET /1.0/instances/{name}/console`: the console log (what init wrote to /dev/console).
/// Not for viewer keys: the console shows what runs inside.
pub async fn console(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Response, ApiError> {
    if !q.kind.is_empty() && q.kind != "log" {
        return Err(ApiError::bad_request(format!(
            "console type \"{}\" is not supported; only \"log\" is",
            q.kind
        )));
    }
    let (i, n) = find(&state, &scope, &name).await?;
    require_member(&scope, "reading the console")?;
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

    #[test]
    fn recursion_takes_lxds_embedded_fields() {
        let p = |r: &str, f: Option<&str>| {
            parse_recursion(r, f.map(str::to_string)).map_err(|e| e.to_string())
        };
        assert_eq!(p("", None), Ok((0, None)));
        assert_eq!(p("1", None), Ok((1, None)));
        assert_eq!(
            p("2;fields=state.network,state.status", None),
            Ok((2, Some("state.network,state.status".into())))
        );
        assert_eq!(p("2;fields=", None), Ok((2, Some(String::new()))));
        // A separate ?fields= wins over the embedded one.
        assert_eq!(
            p("2;fields=state.cpu", Some("state.status")),
            Ok((2, Some("state.status".into())))
        );
        assert!(
            p("3", None)
                .unwrap_err()
                .contains("recursion must be 0, 1 or 2")
        );
        assert!(p("x", None).is_err());
        assert!(
            p("2;sort=name", None)
                .unwrap_err()
                .contains("unknown recursion option")
        );
    }

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

    fn inst(config: &[(&str, &str)], profiles: &[&str]) -> Instance {
        Instance {
            name: "p_web".into(),
            project: "p".into(),
            profiles: profiles.iter().map(|p| p.to_string()).collect(),
            description: "old".into(),
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn patch_merges_config_and_replaces_profiles_only_when_given() {
        let current = inst(&[("limits.cpu", "1"), ("user.a", "x")], &["default"]);
        let w = merge_patch(
            &current,
            InstancePatch {
                config: Some(
                    [
                        ("limits.cpu".to_string(), Some("2".to_string())),
                        ("user.a".to_string(), None),
                    ]
                    .into(),
                ),
                description: None,
                profiles: None,
            },
        );
        assert_eq!(w.config, map(&[("limits.cpu", "2")]));
        assert_eq!(w.description, "old");
        assert_eq!(w.profiles, vec!["default".to_string()]);
        let w = merge_patch(
            &current,
            InstancePatch {
                config: None,
                description: Some("new".into()),
                profiles: Some(vec!["small".into(), "web".into()]),
            },
        );
        assert_eq!(w.config, current.config);
        assert_eq!(w.description, "new");
        assert_eq!(w.profiles, vec!["small".to_string(), "web".to_string()]);
        let w = merge_patch(
            &current,
            InstancePatch {
                profiles: Some(vec![]),
                ..Default::default()
            },
        );
        assert!(w.profiles.is_empty(), "an empty list removes every profile");
    }

    #[test]
    fn server_keys_survive_what_a_client_sends() {
        let current = map(&[("image.os", "debian"), ("limits.cpu", "1")]);
        let sent = map(&[("image.os", "evil"), ("volatile.x", "1"), ("user.a", "b")]);
        assert_eq!(
            keep_server_keys(sent, &current),
            map(&[("image.os", "debian"), ("user.a", "b")])
        );
    }

    #[test]
    fn agents_get_the_effective_config() {
        let mut s = crate::state::State::default();
        for (name, config) in [
            (
                "p_small",
                &[("limits.cpu", "1"), ("limits.memory", "256MiB")][..],
            ),
            ("p_web", &[("limits.cpu", "2"), ("user.tier", "web")][..]),
        ] {
            s.profiles.insert(
                name.into(),
                crate::state::Profile {
                    name: name.into(),
                    project: "p".into(),
                    description: String::new(),
                    config: map(config),
                },
            );
        }
        let mut i = inst(&[("limits.memory", "1GiB")], &["small", "web"]);
        i.ipv4 = "10.1.0.5".into();
        let node = Node {
            name: "n1".into(),
            ipv4_cidr: "10.1.0.1/24".into(),
            ..Default::default()
        };
        let spec = agent_spec(&i, &s.effective_config(&i), &node);
        assert_eq!(spec.name, "p_web", "the node knows the scoped name");
        let config: BTreeMap<String, String> = spec.config.into_iter().collect();
        // Profiles in order (web's cpu over small's), then the instance's own memory.
        assert_eq!(
            config,
            map(&[
                ("limits.cpu", "2"),
                ("limits.memory", "1GiB"),
                ("user.tier", "web")
            ])
        );
        assert_eq!(spec.network.unwrap().ipv4_cidr, "10.1.0.5/24");
        // The API shows the short name, its own config, and the project.
        let a = to_api(&i, Some(&node));
        assert_eq!((a.name.as_str(), a.project.as_str()), ("web", "p"));
        assert_eq!(a.config, map(&[("limits.memory", "1GiB")]));
        assert_eq!(instance_url(&i), "/1.0/instances/web?project=p");
    }

    #[tokio::test]
    async fn list_envelope_matches_sync() {
        let list = vec![to_api(
            &Instance {
                name: "p_web".into(),
                project: "p".into(),
                ..Default::default()
            },
            None,
        )];
        let body = |r: Response| async move {
            let b = axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap();
            // The raw JSON, every key as sent (a typed parse would fill dropped defaults in).
            serde_json::from_slice::<serde_json::Value>(&b).unwrap()
        };
        let (fast, slow) = (sync_list(&list), sync(&list));
        assert_eq!(
            fast.headers().get(http::header::CONTENT_TYPE),
            slow.headers().get(http::header::CONTENT_TYPE)
        );
        assert_eq!(body(fast).await, body(slow).await);
    }

    #[test]
    fn list_fields_answered_from_records() {
        assert!(!recorded_fields_only(None).unwrap());
        assert!(recorded_fields_only(Some("")).unwrap());
        assert!(recorded_fields_only(Some("state.network")).unwrap());
        assert!(recorded_fields_only(Some("state.network, state.status")).unwrap());
        assert!(!recorded_fields_only(Some("state.network,state.memory")).unwrap());
        assert!(!recorded_fields_only(Some("state.disk")).unwrap());
        assert!(recorded_fields_only(Some("state.bogus")).is_err());

        let mut i = Instance {
            name: "web".into(),
            node: "n1".into(),
            ipv4: "10.1.0.5".into(),
            hwaddr: "00:16:3e:00:00:01".into(),
            ..Default::default()
        };
        i.observed.status = InstanceStatusCode::Running;
        i.observed.pid = 4242;
        let mut node = Node {
            name: "n1".into(),
            ipv4_cidr: "10.1.0.1/22".into(),
            status: NodeStatus::Online,
            ..Default::default()
        };
        let st = state_from_record(&i, Some(&node));
        assert_eq!((st.status.as_str(), st.pid), ("Running", 4242));
        let eth0 = &st.network["eth0"];
        assert_eq!(eth0.addresses[0].address, "10.1.0.5");
        assert_eq!(eth0.addresses[0].netmask, "22");
        assert_eq!(eth0.state, "up");
        // An offline node's instances show Unknown, without an address or pid.
        node.status = NodeStatus::Offline;
        let st = state_from_record(&i, Some(&node));
        assert_eq!((st.status.as_str(), st.pid), ("Unknown", 0));
        assert!(st.network["eth0"].addresses.is_empty());
    }

    #[test]
    fn null_profiles_are_absent() {
        let body = without_null(
            serde_json::json!({"name": "a", "source": {"type": "image", "alias": "d"},
                "profiles": null, "description": null, "start": null}),
            NULLABLE,
        );
        assert!(body.get("profiles").is_none());
        assert!(body["start"].is_null(), "only the named fields go");
        assert!(serde_json::from_value::<InstancesPost>(body.clone()).is_err());
        let body = without_null(body, &["start"]);
        let req: InstancesPost = serde_json::from_value(body).unwrap();
        assert!(req.profiles.is_empty());
        let put: InstancePut = serde_json::from_value(without_null(
            serde_json::json!({"profiles": null}),
            &["profiles"],
        ))
        .unwrap();
        assert!(put.profiles.is_empty());
        // PATCH: null leaves the list as it is.
        let patch: InstancePatch =
            serde_json::from_value(serde_json::json!({"profiles": null})).unwrap();
        assert_eq!(patch.profiles, None);
    }

    #[test]
    fn create_profiles_default_only_when_absent() {
        let listed = vec!["web".to_string()];
        let none: Vec<String> = vec![];
        assert_eq!(
            requested_profiles(&serde_json::json!({"name": "a"}), &none),
            vec!["default".to_string()]
        );
        assert_eq!(
            requested_profiles(&serde_json::json!({"profiles": null}), &none),
            vec!["default".to_string()]
        );
        assert!(requested_profiles(&serde_json::json!({"profiles": []}), &none).is_empty());
        assert_eq!(
            requested_profiles(&serde_json::json!({"profiles": ["web"]}), &listed),
            listed
        );
        assert!(check_profile_names(&["p_web".to_string()]).is_err());
        assert!(check_profile_names(&["web".to_string()]).is_ok());
    }

    #[test]
    fn if_match_headers() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(http::header::IF_MATCH, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
        assert_eq!(if_match(&h("*")).unwrap(), None);
        assert_eq!(if_match(&h("\"abc\"")).unwrap().as_deref(), Some("abc"));
        assert_eq!(if_match(&h("W/\"abc\"")).unwrap().as_deref(), Some("abc"));
        assert_eq!(if_match(&h("abc")).unwrap().as_deref(), Some("abc"));
        assert!(if_match(&h("\"a\", \"b\"")).is_err());
        assert!(if_match(&h("\"\"")).is_err());
        let e = check_if_match("instance \"web\"", Some("old"), "new").unwrap_err();
        assert_eq!(e.status, StatusCode::PRECONDITION_FAILED);
        assert!(check_if_match("x", Some("same"), "same").is_ok());
        assert!(check_if_match("x", None, "any").is_ok());
        let c = guarded(
            Command::DeleteInstance {
                name: "p_web".into(),
            },
            ObjectKey::Instance("p_web".into()),
            Some("e".into()),
        );
        assert!(matches!(c, Command::IfMatch { ref expect, .. } if expect.len() == 1));
        let c = guarded(
            Command::DeleteInstance {
                name: "p_web".into(),
            },
            ObjectKey::Instance("p_web".into()),
            None,
        );
        assert!(matches!(c, Command::DeleteInstance { .. }));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod api_tests {
    use crate::api::projects::testkit::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_over_the_quota_is_refused_before_the_agent_hears_of_it() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        let (status, body) = api
            .call(
                ADMIN,
                "PATCH",
                "/1.0/projects/a",
                Some(serde_json::json!({"config": {"limits.memory": "1GiB"}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        api.add_instance("a", "web", &[("limits.memory", "512MiB")])
            .await;
        let before = api.model().await;
        // The node's agent is not reachable: a request that got as far as calling it would
        // fail otherwise (and slowly), not with the quota's 403.
        let started = std::time::Instant::now();
        for (method, body) in [
            (
                "PATCH",
                serde_json::json!({"config": {"limits.memory": "2GiB"}}),
            ),
            (
                "PUT",
                serde_json::json!({"config": {"limits.memory": "2GiB"}}),
            ),
            (
                "PATCH",
                serde_json::json!({"config": {"limits.memory": null}}),
            ),
        ] {
            let (status, answer) = api
                .call(MEMBER_A, method, "/1.0/instances/web", Some(body))
                .await;
            assert_eq!(status, 403, "{method}: {answer}");
            assert!(
                answer.to_string().contains("limits.memory"),
                "{method}: {answer}"
            );
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
        assert_eq!(
            api.model().await.instances["a_web"],
            before.instances["a_web"]
        );
        api.cp.shutdown().await;
    }
}
