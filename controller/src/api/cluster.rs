//! `/1.0/cluster`: members, join tokens, and the join itself.

use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use base64::Engine as _;
use std::collections::BTreeMap;

use axum::extract::Path;
use berth_proto::api::{
    self, Cluster, ClusterController, ClusterJoinPost, ClusterJoinResponse, ClusterMember,
    ClusterMemberPatch, ClusterNode, ControllerJoinPost, ControllerJoinResponse, JoinToken,
    JoinTokenPost, JoinTokenResponse, NodeResources,
};
use http::HeaderMap;
use serde::Deserialize;
use tracing::{info, warn};

use super::operations::sync;
use super::{ApiError, JsonBody, Scope, SharedState, key_hash};
use crate::agents::agent_tls_name;
use crate::clock;
use crate::raft::WriteError;
use crate::state::{ApplyErrorKind, ApplyOk, Command, JoinKind, JoinTokenRecord, Node, NodeStatus};

/// How long a join token stays valid.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Reading the cluster (its view, members): fleet keys, and the keys of projects that are not
/// restricted (a restricted project's keys do not list nodes: 403).
fn require_cluster_read(state: &SharedState, scope: &Scope) -> Result<(), ApiError> {
    state
        .cp
        .read_local(|m| scope.require_unrestricted(m, "listing the cluster's nodes"))
}

/// `GET /1.0/cluster/members?recursion=1`: the nodes.
pub async fn members(State(state): State<SharedState>, scope: Scope) -> Result<Response, ApiError> {
    require_cluster_read(&state, &scope)?;
    let nodes: Vec<Node> = state
        .cp
        .read(|s| s.nodes.values().cloned().collect())
        .await?;
    let members: Vec<ClusterMember> = nodes
        .into_iter()
        .map(|n| ClusterMember {
            server_name: n.name.clone(),
            url: format!("https://{}", n.address),
            roles: vec!["agent".into()],
            status: format!("{:?}", n.status),
            message: String::new(),
        })
        .collect();
    Ok(sync(members))
}

/// Makes a one-time join token for the node or controller `name`, valid for
/// [`JOIN_TOKEN_TTL`]; it names `api_addresses` as the controllers to join through.
pub async fn issue_join_token(
    state: &SharedState,
    name: &str,
    kind: JoinKind,
    api_addresses: Vec<String>,
) -> Result<String, ApiError> {
    issue_join_token_as(state, None, name, kind, api_addresses).await
}

/// [`issue_join_token`] on behalf of `scope`'s key (named in the lifecycle event), when given.
async fn issue_join_token_as(
    state: &SharedState,
    scope: Option<&Scope>,
    name: &str,
    kind: JoinKind,
    api_addresses: Vec<String>,
) -> Result<String, ApiError> {
    match kind {
        JoinKind::Node => validate_node_name(name)?,
        JoinKind::Controller => validate_controller_name(name)?,
    }
    let secret = random_secret()?;
    let add = Command::AddJoinToken {
        hash: key_hash(&secret),
        record: JoinTokenRecord {
            node_name: name.to_string(),
            kind,
            created_at: clock::now(),
            expires_at: clock::after(JOIN_TOKEN_TTL),
        },
    };
    state
        .cp
        .write(match scope {
            Some(scope) => scope.by(add),
            None => add,
        })
        .await?;
    let token = JoinToken {
        addresses: api_addresses,
        fingerprint: state
            .ca
            .fingerprint()
            .map_err(|e| ApiError::internal(e.to_string()))?,
        secret,
    };
    let json = serde_json::to_vec(&token).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(json))
}

/// Every controller's API address, for tokens (this controller's own when no record exists
/// yet).
async fn controller_api_addresses(state: &SharedState) -> Result<Vec<String>, ApiError> {
    let mut addrs: Vec<String> = state
        .cp
        .read(|s| {
            s.controllers
                .values()
                .map(|c| c.api_address.clone())
                .collect()
        })
        .await?;
    if addrs.is_empty() {
        return Err(ApiError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "no controller has registered its API address yet; try again shortly",
        ));
    }
    addrs.sort();
    Ok(addrs)
}

/// `POST /1.0/cluster/join-tokens` {name} (fleet keys): a token an agent joins with.
pub async fn create_join_token(
    State(state): State<SharedState>,
    scope: Scope,
    JsonBody(body): JsonBody<JoinTokenPost>,
) -> Result<Response, ApiError> {
    scope.identity.require_fleet()?;
    validate_node_name(&body.name)?;
    if state
        .cp
        .read(|s| s.nodes.contains_key(&body.name) || s.controllers.contains_key(&body.name))
        .await?
    {
        return Err(ApiError::conflict(format!(
            "a cluster member named {} already exists",
            body.name
        )));
    }
    let addrs = controller_api_addresses(&state).await?;
    let token =
        issue_join_token_as(&state, Some(&scope), &body.name, JoinKind::Node, addrs).await?;
    // As docs/operator-guide.md says: the token in a root-only file, `berth-agent join`
    // (joins and exits), then the service starts the agent.
    let command = format!(
        "(umask 077 && echo {token} >/etc/berth/join-token) && berth-agent join --join-token-file /etc/berth/join-token && systemctl enable --now berth-agent"
    );
    Ok(sync(JoinTokenResponse {
        name: body.name,
        token,
        command,
    }))
}

/// `POST /1.0/cluster/join`: an agent presents a join token's secret and a CSR and receives a
/// certificate signed by the cluster CA. No API key: the one-time secret is the credential.
pub async fn join(
    State(state): State<SharedState>,
    JsonBody(body): JsonBody<ClusterJoinPost>,
) -> Result<Response, ApiError> {
    validate_node_name(&body.name)?;
    if body.secret.is_empty() || body.secret.len() > 256 {
        return Err(ApiError::unauthorized());
    }
    let addr: std::net::SocketAddr = body
        .address
        .parse()
        .ok()
        .filter(|a: &std::net::SocketAddr| !a.ip().is_unspecified() && a.port() != 0)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "agent address \"{}\" is not an ip:port controllers can dial",
                body.address.escape_debug()
            ))
        })?;
    if !body.bridge_ipv4_cidr.is_empty() {
        validate_cidr(&body.bridge_ipv4_cidr)?;
    }
    // Check the token before doing any signing work for an unauthenticated caller (the
    // JoinNode command checks it again, atomically, when the node is added).
    let token_hash = key_hash(&body.secret);
    let now = clock::now();
    let refusal = state
        .cp
        .read(|s| {
            token_refusal(
                s.join_tokens.get(&token_hash),
                JoinKind::Node,
                &body.name,
                &now,
            )
        })
        .await?;
    if let Some(refusal) = refusal {
        return Err(refusal);
    }
    let names = vec![agent_tls_name(&body.name), addr.ip().to_string()];
    let cert = state
        .ca
        .sign_csr(&body.csr, &body.name, &names)
        .map_err(|e| ApiError::bad_request(format!("the certificate request is not valid: {e}")))?;
    let fingerprint =
        crate::tls::cert_fingerprint(&cert).map_err(|e| ApiError::internal(e.to_string()))?;
    let now = clock::now();
    state
        .cp
        .write(Command::JoinNode {
            token_hash,
            node: Node {
                name: body.name.clone(),
                address: body.address.clone(),
                cert_fingerprint: fingerprint,
                ipv4_cidr: body.bridge_ipv4_cidr.clone(),
                status: NodeStatus::Online,
                joined_at: now.clone(),
                cpus: body.cpus,
                memory_bytes: body.memory_bytes,
                ..Default::default()
            },
            now,
        })
        .await
        .map_err(|e| match e {
            crate::raft::WriteError::Rejected(a)
                if matches!(
                    a.kind,
                    crate::state::ApplyErrorKind::NotFound | crate::state::ApplyErrorKind::Invalid
                ) =>
            {
                ApiError::new(
                    http::StatusCode::FORBIDDEN,
                    "the join token is not valid or has expired",
                )
            }
            other => other.into(),
        })?;
    info!(node = %body.name, address = %body.address, "node joined");
    Ok(sync(ClusterJoinResponse {
        certificate: cert,
        ca: state.ca.cert_pem.clone(),
        controllers: state.cp.read_local(|s| {
            s.controllers
                .values()
                .map(|c| c.peer_address.clone())
                .collect()
        }),
    }))
}

fn validate_node_name(name: &str) -> Result<(), ApiError> {
    api::names::validate_instance_name(name)
        .map_err(|e| ApiError::bad_request(e.replace("instance name", "node name")))
}

/// 32 random bytes, hex: secrets for API keys and join tokens.
pub fn random_secret() -> Result<String, ApiError> {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(hex::encode(buf))
}

/// Checks a bridge address with prefix such as "10.87.3.1/24" (prefix 8 to 30).
fn validate_cidr(cidr: &str) -> Result<(), ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "bridge address \"{cidr}\" is not an IPv4 address with a prefix from 8 to 30"
        ))
    };
    let (ip, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    ip.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?;
    match prefix.parse::<u8>() {
        Ok(p) if (8..=30).contains(&p) => Ok(()),
        _ => Err(bad()),
    }
}

/// A controller name: 1 to 63 letters, digits, dots or hyphens (the berthd `name` rule).
fn validate_controller_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(ApiError::bad_request(format!(
            "controller name \"{}\" must be 1 to 63 letters, digits, dots or hyphens",
            name.escape_debug()
        )));
    }
    Ok(())
}

/// The host of a `host:port` address, checked (a DNS name or an IP address; IPv6 in
/// brackets); `what` names the field in the error.
fn host_of(addr: &str, what: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "{what} \"{}\" is not host:port",
            addr.escape_debug()
        ))
    };
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        if sa.ip().is_unspecified() || sa.port() == 0 {
            return Err(bad());
        }
        return Ok(sa.ip().to_string());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad()),
    }
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok { Ok(host.to_string()) } else { Err(bad()) }
}

/// The refusal a joining caller gets when its secret is unknown or the token has expired
/// (never saying which).
fn bad_token() -> ApiError {
    ApiError::new(
        http::StatusCode::FORBIDDEN,
        "the join token is not valid or has expired",
    )
}

/// Why the token a caller joins with (found by its secret, `None` when unknown) does not let
/// a `kind` called `name` in at `now`; `None` when it does. A caller whose secret matches a
/// live token holds that token, so it is told which kind and name the token was issued for.
fn token_refusal(
    token: Option<&JoinTokenRecord>,
    kind: JoinKind,
    name: &str,
    now: &str,
) -> Option<ApiError> {
    let Some(t) = token.filter(|t| t.expires_at.as_str() > now) else {
        return Some(bad_token());
    };
    let what = |k: JoinKind| match k {
        JoinKind::Node => "node",
        JoinKind::Controller => "controller",
    };
    if t.kind != kind || t.node_name != name {
        return Some(ApiError::new(
            http::StatusCode::FORBIDDEN,
            format!(
                "the join token was issued for {} \"{}\", not for {} \"{name}\"",
                what(t.kind),
                t.node_name,
                what(kind)
            ),
        ));
    }
    None
}

/// `POST /1.0/cluster/controller-tokens` {name} (admin keys): a token a new controller joins
/// with.
pub async fn create_controller_token(
    State(state): State<SharedState>,
    scope: Scope,
    JsonBody(body): JsonBody<JoinTokenPost>,
) -> Result<Response, ApiError> {
    scope.identity.require_admin()?;
    validate_controller_name(&body.name)?;
    if state
        .cp
        .read(|s| s.controllers.contains_key(&body.name) || s.nodes.contains_key(&body.name))
        .await?
    {
        return Err(ApiError::conflict(format!(
            "a cluster member named {} already exists",
            body.name
        )));
    }
    let addrs = controller_api_addresses(&state).await?;
    let first = addrs.first().cloned().unwrap_or_default();
    let token = issue_join_token_as(
        &state,
        Some(&scope),
        &body.name,
        JoinKind::Controller,
        addrs,
    )
    .await?;
    let command = format!("berthd --join {first} --token {token}");
    info!(controller = %body.name, "controller join token issued");
    Ok(sync(JoinTokenResponse {
        name: body.name,
        token,
        command,
    }))
}

/// `POST /1.0/cluster/join-controller`: a new controller presents its token's secret and a
/// CSR; it gets a controller certificate and its Raft id. No API key: the one-time secret is
/// the credential. The leader then adds it as a learner and promotes it to voter once it has
/// caught up ([`crate::raft::ControlPlane::reconcile_membership`]).
pub async fn join_controller(
    State(state): State<SharedState>,
    JsonBody(body): JsonBody<ControllerJoinPost>,
) -> Result<Response, ApiError> {
    validate_controller_name(&body.name)?;
    if body.secret.is_empty() || body.secret.len() > 256 {
        return Err(bad_token());
    }
    let peer_host = host_of(&body.peer_address, "peer address")?;
    let api_host = host_of(&body.api_address, "API address")?;
    // Check the token before signing anything for an unauthenticated caller (JoinController
    // checks it again, atomically).
    let token_hash = key_hash(&body.secret);
    let now = clock::now();
    let (refusal, taken) = state
        .cp
        .read(|s| {
            (
                token_refusal(
                    s.join_tokens.get(&token_hash),
                    JoinKind::Controller,
                    &body.name,
                    &now,
                ),
                s.controllers.contains_key(&body.name),
            )
        })
        .await?;
    if let Some(refusal) = refusal {
        return Err(refusal);
    }
    if taken {
        return Err(ApiError::conflict(format!(
            "controller {} already exists",
            body.name
        )));
    }
    let mut names = vec![
        berth_proto::CONTROLLER_TLS_NAME.to_string(),
        peer_host,
        api_host,
        body.name.clone(),
    ];
    names.sort();
    names.dedup();
    let cert = state
        .ca
        .sign_csr(&body.csr, &body.name, &names)
        .map_err(|e| ApiError::bad_request(format!("the certificate request is not valid: {e}")))?;
    let result = state
        .cp
        .write(Command::JoinController {
            token_hash,
            name: body.name.clone(),
            peer_address: body.peer_address.clone(),
            api_address: body.api_address.clone(),
            cert_fingerprint: crate::tls::cert_fingerprint(&cert)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            now: clock::now(),
        })
        .await
        .map_err(|e| match e {
            WriteError::Rejected(a)
                if matches!(a.kind, ApplyErrorKind::NotFound | ApplyErrorKind::Invalid) =>
            {
                bad_token()
            }
            other => other.into(),
        })?;
    let ApplyOk::ControllerId(id) = result else {
        return Err(ApiError::internal(
            "joining the controller did not give it a raft id",
        ));
    };
    info!(controller = %body.name, node = id, peer = %body.peer_address, api = %body.api_address, "controller joined; the leader adds it to the raft membership");
    Ok(sync(ControllerJoinResponse {
        certificate: cert,
        ca: state.ca.cert_pem.clone(),
        id,
    }))
}

/// Header a controller sets when it asks the leader for its view, so that the request is not
/// forwarded again.
const FORWARDED: &str = "x-berth-forwarded";

/// The controllers as this controller sees them: roles from the Raft membership, states from
/// the leader's reachability view (`unknown` on a follower).
fn controllers_view(state: &SharedState, s: &crate::state::State) -> Vec<ClusterController> {
    let cp = &state.cp;
    let leader = cp.leader().map(|(id, _)| id);
    let voters = cp.voters();
    let members = cp.members();
    let is_leader = cp.is_leader();
    let mut out: Vec<ClusterController> = s
        .controllers
        .values()
        .map(|c| {
            let role = if Some(c.id) == leader {
                "leader"
            } else if voters.contains(&c.id) {
                "voter"
            } else if members.contains_key(&c.id) {
                "learner"
            } else {
                "joining"
            };
            let st = if c.id == cp.id() || (is_leader && cp.peer_reachable(c.id)) {
                "online"
            } else if is_leader {
                "unreachable"
            } else {
                "unknown"
            };
            ClusterController {
                name: c.name.clone(),
                id: c.id,
                peer_address: c.peer_address.clone(),
                api_address: c.api_address.clone(),
                role: role.into(),
                state: st.into(),
            }
        })
        .collect();
    // Members without a record (a cluster from before controller records, mid-removal).
    for (id, peer) in members {
        if !s.controllers.values().any(|c| c.id == id) {
            out.push(ClusterController {
                name: format!("raft-{id}"),
                id,
                peer_address: peer.addr,
                api_address: String::new(),
                role: if Some(id) == leader {
                    "leader"
                } else if voters.contains(&id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                state: if id == cp.id() || (is_leader && cp.peer_reachable(id)) {
                    "online"
                } else if is_leader {
                    "unreachable"
                } else {
                    "unknown"
                }
                .into(),
            });
        }
    }
    out
}

/// A node as the cluster API shows it.
fn node_view(node: &Node, usage: Option<&crate::scheduler::NodeUsage>) -> ClusterNode {
    ClusterNode {
        name: node.name.clone(),
        address: node.address.clone(),
        status: format!("{:?}", node.status),
        evacuated: node.evacuated,
        architecture: node.architecture.clone(),
        labels: crate::scheduler::effective_labels(node),
        config: node.config.clone(),
        total: NodeResources {
            cpus: u64::from(node.cpus),
            memory_bytes: node.memory_bytes,
            storage_bytes: node.storage_total_bytes,
        },
        allocated: NodeResources {
            cpus: usage.map_or(0, |u| u.cpus),
            memory_bytes: usage.map_or(0, |u| u.memory_bytes),
            // Instances claim no storage size; this is what the pool has in use.
            storage_bytes: node
                .storage_total_bytes
                .saturating_sub(node.storage_free_bytes),
        },
        storage_free_bytes: node.storage_free_bytes,
        instances: usage.map_or(0, |u| u.instances),
        joined_at: node.joined_at.clone(),
    }
}

/// `GET /1.0/cluster`: controllers and nodes. A follower asks the leader (whose view of
/// which controllers are reachable is the one that matters) and answers its own view, with
/// `unknown` controller states, when the leader cannot be asked.
pub async fn overview(
    State(state): State<SharedState>,
    scope: Scope,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_cluster_read(&state, &scope)?;
    if !state.cp.is_leader()
        && !headers.contains_key(FORWARDED)
        && let Some(view) = leader_overview(&state, &headers).await
    {
        return Ok(sync(view));
    }
    let (name, controllers, nodes, config) = state
        .cp
        .read(|s| {
            let usage = crate::scheduler::node_usage(s);
            let nodes: Vec<ClusterNode> = s
                .nodes
                .values()
                .map(|n| node_view(n, usage.get(&n.name)))
                .collect();
            (
                s.cluster.name.clone(),
                controllers_view(&state, s),
                nodes,
                s.cluster.config.clone(),
            )
        })
        .await?;
    Ok(sync(Cluster {
        name,
        answered_by: state.name.clone(),
        controllers,
        nodes,
        config,
    }))
}

/// The leader's `GET /1.0/cluster`, asked with the caller's API key.
async fn leader_overview(state: &SharedState, headers: &HeaderMap) -> Option<Cluster> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?
        .trim()
        .to_string();
    let (leader_id, _) = state.cp.leader()?;
    let addr = state.cp.read_local(|s| {
        s.controllers
            .values()
            .find(|c| c.id == leader_id)
            .map(|c| c.api_address.clone())
    })?;
    let verifier = crate::join::verifier_for_ca(&state.ca.cert_pem).ok()?;
    // The header tells the leader not to ask on: if this controller's idea of the leader is
    // stale, the controller asked answers its own view instead of forwarding again.
    let ask = crate::join::https_json_with(
        &addr,
        verifier,
        http::Method::GET,
        "/1.0/cluster",
        Some(&bearer),
        None,
        &[(FORWARDED, "1")],
    );
    match tokio::time::timeout(std::time::Duration::from_secs(3), ask).await {
        Ok(Ok(v)) => serde_json::from_value(v).ok(),
        Ok(Err(e)) => {
            warn!(leader = %addr, error = %e, "cannot ask the leader for the cluster view");
            None
        }
        Err(_) => {
            warn!(leader = %addr, "the leader did not answer the cluster view in time");
            None
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterPatch {
    #[serde(default)]
    pub config: BTreeMap<String, Option<String>>,
}

/// `PATCH /1.0/cluster` {config: {key: value|null}} (fleet keys): cluster-wide settings;
/// null removes.
pub async fn patch_cluster(
    State(state): State<SharedState>,
    scope: Scope,
    JsonBody(body): JsonBody<ClusterPatch>,
) -> Result<Response, ApiError> {
    scope.identity.require_fleet()?;
    for (k, v) in &body.config {
        if let Some(v) = v {
            crate::scheduler::validate_cluster_config_key(k, v).map_err(ApiError::bad_request)?;
        }
    }
    let changes: BTreeMap<String, Option<String>> = body
        .config
        .into_iter()
        .map(|(k, v)| (k, v.map(|v| v.trim().to_string())))
        .collect();
    state
        .cp
        .write(scope.by(Command::SetClusterConfig { changes }))
        .await?;
    let config = state.cp.read(|s| s.cluster.config.clone()).await?;
    info!(?config, "cluster config changed");
    Ok(sync(serde_json::json!({ "config": config })))
}

/// `GET /1.0/cluster/members/{name}`: a node (ClusterNode) or a controller (ClusterController).
pub async fn member(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    require_cluster_read(&state, &scope)?;
    enum Found {
        Node(ClusterNode),
        Controller(ClusterController),
        None,
    }
    let found = state
        .cp
        .read(|s| {
            if let Some(n) = s.nodes.get(&name) {
                let usage = crate::scheduler::node_usage(s);
                return Found::Node(node_view(n, usage.get(&n.name)));
            }
            match controllers_view(&state, s)
                .into_iter()
                .find(|c| c.name == name)
            {
                Some(c) => Found::Controller(c),
                None => Found::None,
            }
        })
        .await?;
    match found {
        Found::Node(n) => Ok(sync(n)),
        Found::Controller(c) => Ok(sync(c)),
        Found::None => Err(ApiError::not_found(format!(
            "cluster member {name} not found"
        ))),
    }
}

/// `PATCH /1.0/cluster/members/{name}` (fleet keys): node settings (`scheduler.instance`,
/// labels); a null value removes the key.
pub async fn patch_member(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<ClusterMemberPatch>,
) -> Result<Response, ApiError> {
    scope.identity.require_fleet()?;
    for (k, v) in &body.config {
        match v {
            Some(v) => crate::scheduler::validate_node_config_key(k, v),
            None => crate::scheduler::validate_node_config_key(k, "all").or_else(|e| {
                // Removing a label needs only a valid key.
                if k.starts_with("scheduler.") {
                    Err(e)
                } else {
                    Ok(())
                }
            }),
        }
        .map_err(ApiError::bad_request)?;
    }
    let current = state
        .cp
        .read(|s| {
            (
                s.nodes.get(&name).map(|n| n.config.clone()),
                s.controllers.contains_key(&name),
            )
        })
        .await?;
    match current {
        (Some(_), _) => {}
        (None, true) => {
            return Err(ApiError::bad_request(format!(
                "{name} is a controller; only nodes have settings"
            )));
        }
        (None, false) => {
            return Err(ApiError::not_found(format!(
                "cluster member {name} not found"
            )));
        }
    };
    let changes: BTreeMap<String, Option<String>> = body
        .config
        .into_iter()
        .map(|(k, v)| (k, v.map(|v| v.trim().to_string())))
        .collect();
    state
        .cp
        .write(scope.by(Command::SetNodeConfig {
            name: name.clone(),
            changes,
        }))
        .await?;
    info!(node = %name, "node config changed");
    let node = state
        .cp
        .read(|s| {
            let usage = crate::scheduler::node_usage(s);
            s.nodes.get(&name).map(|n| node_view(n, usage.get(&n.name)))
        })
        .await?
        .ok_or_else(|| ApiError::not_found(format!("cluster member {name} not found")))?;
    Ok(sync(node))
}

/// `DELETE /1.0/cluster/members/{name}`: removes a node (refused while it has instances) or
/// a controller (refused when it is the last voter or the remaining voters would not have a
/// reachable majority; the leader checks). A removed controller leaves the Raft membership.
/// Nodes need a fleet key, controllers an admin key.
pub async fn remove_member(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    scope.identity.require_fleet()?;
    let (is_node, is_controller) = state
        .cp
        .read(|s| {
            (
                s.nodes.contains_key(&name),
                s.controllers.contains_key(&name),
            )
        })
        .await?;
    if is_node {
        state
            .cp
            .write(scope.by(Command::RemoveNode { name: name.clone() }))
            .await?;
        info!(node = %name, "node removed");
        return Ok(sync(serde_json::json!({})));
    }
    if !is_controller {
        return Err(ApiError::not_found(format!(
            "cluster member {name} not found"
        )));
    }
    scope.identity.require_admin()?;
    // The leader checks RemoveController (last voter, majority) before proposing it, also
    // inside the `By` wrapper.
    state
        .cp
        .write(scope.by(Command::RemoveController { name: name.clone() }))
        .await?;
    info!(controller = %name, "controller removed; the leader takes it out of the raft membership");
    Ok(sync(serde_json::json!({})))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;
    use crate::api::projects::testkit::join_node;
    use crate::api::{AppState, router};
    use crate::raft::ControlPlane;
    use crate::state::{ApiKey, ControllerRecord, Role};
    use crate::tls::{ClusterCa, PeerRole, parse_certs, peer_role};

    struct Api {
        app: axum::Router,
        state: SharedState,
        cp: ControlPlane,
        ca: ClusterCa,
        _dir: tempfile::TempDir,
    }

    impl Api {
        async fn start() -> Api {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let dir = tempfile::tempdir().unwrap();
            let cp = ControlPlane::open(dir.path(), 1, "127.0.0.1:1".into(), true, None)
                .await
                .unwrap();
            assert!(cp.wait_for_leader(Duration::from_secs(10)).await.is_some());
            let ca = ClusterCa::generate("test").unwrap();
            cp.write(Command::Bootstrap {
                name: "test".into(),
                ca_cert_pem: ca.cert_pem.clone(),
                ca_key_pem: ca.key_pem.clone(),
                admin_key: ApiKey {
                    id: "k1".into(),
                    name: "admin".into(),
                    hash: key_hash("secret"),
                    role: Role::Admin,
                    ..Default::default()
                },
                now: clock::now(),
            })
            .await
            .unwrap();
            cp.write(Command::RegisterController {
                record: ControllerRecord {
                    name: "c1".into(),
                    id: 1,
                    peer_address: "127.0.0.1:1".into(),
                    api_address: "c1.example:8443".into(),
                    joined_at: clock::now(),
                    cert_fingerprint: String::new(),
                },
            })
            .await
            .unwrap();
            let state = AppState::for_test(cp.clone(), ca.clone());
            Api {
                app: router(state.clone()),
                state,
                cp,
                ca,
                _dir: dir,
            }
        }

        /// Sends a request; answers the status and the envelope.
        async fn call(
            &self,
            method: &str,
            path: &str,
            body: Option<serde_json::Value>,
        ) -> (u16, serde_json::Value) {
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", "Bearer secret")
                .header("content-type", "application/json")
                .body(match body {
                    Some(b) => Body::from(b.to_string()),
                    None => Body::empty(),
                })
                .unwrap();
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, serde_json::from_slice(&bytes).unwrap())
        }

        async fn token(&self, kind: &str, name: &str) -> JoinToken {
            let (status, body) = self
                .call(
                    "POST",
                    &format!("/1.0/cluster/{kind}"),
                    Some(serde_json::json!({ "name": name })),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let resp: JoinTokenResponse = serde_json::from_value(body["metadata"].clone()).unwrap();
            assert_eq!(resp.name, name);
            assert!(resp.command.contains(&resp.token), "{}", resp.command);
            crate::join::decode_token(&resp.token).unwrap()
        }
    }

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["evil.example".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    fn join_body(secret: &str, name: &str, csr: &str) -> serde_json::Value {
        serde_json::json!({
            "secret": secret,
            "name": name,
            "csr": csr,
            "peer_address": "10.0.0.2:8444",
            "api_address": "10.0.0.2:8443",
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controllers_join_with_one_time_tokens() {
        let api = Api::start().await;
        let token = api.token("controller-tokens", "c2").await;
        assert_eq!(token.addresses, ["c1.example:8443"]);
        assert_eq!(token.fingerprint, api.ca.fingerprint().unwrap());

        // A CSR that is not one: refused, the token stays valid.
        let (status, body) = api
            .call(
                "POST",
                "/1.0/cluster/join-controller",
                Some(join_body(&token.secret, "c2", "junk")),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        // The token names c2 only, and says so to the holder of its secret.
        let (status, body) = api
            .call(
                "POST",
                "/1.0/cluster/join-controller",
                Some(join_body(&token.secret, "c9", &csr())),
            )
            .await;
        assert_eq!(status, 403);
        assert_eq!(
            body["error"],
            "the join token was issued for controller \"c2\", not for controller \"c9\""
        );
        // Bad addresses.
        let mut bad = join_body(&token.secret, "c2", &csr());
        bad["peer_address"] = "0.0.0.0:8444".into();
        assert_eq!(
            api.call("POST", "/1.0/cluster/join-controller", Some(bad))
                .await
                .0,
            400
        );

        let (status, body) = api
            .call(
                "POST",
                "/1.0/cluster/join-controller",
                Some(join_body(&token.secret, "c2", &csr())),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let resp: ControllerJoinResponse =
            serde_json::from_value(body["metadata"].clone()).unwrap();
        assert_eq!(resp.id, 2);
        assert_eq!(resp.ca, api.ca.cert_pem);
        let leaf = parse_certs(&resp.certificate).unwrap().remove(0);
        assert_eq!(peer_role(&leaf), Some(PeerRole::Controller));
        let rec = api
            .cp
            .read(|s| s.controllers.get("c2").cloned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((rec.id, rec.peer_address.as_str()), (2, "10.0.0.2:8444"));

        // Used twice: refused, nothing changes.
        let before = api.cp.read(|s| s.clone()).await.unwrap();
        let (status, body) = api
            .call(
                "POST",
                "/1.0/cluster/join-controller",
                Some(join_body(&token.secret, "c2", &csr())),
            )
            .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(api.cp.read(|s| s.clone()).await.unwrap(), before);
        // The name is taken now.
        let (status, _) = api
            .call(
                "POST",
                "/1.0/cluster/controller-tokens",
                Some(serde_json::json!({ "name": "c2" })),
            )
            .await;
        assert_eq!(status, 409);
        // A node token does not let a controller in.
        let node_token = api.token("join-tokens", "c3").await;
        let (status, _) = api
            .call(
                "POST",
                "/1.0/cluster/join-controller",
                Some(join_body(&node_token.secret, "c3", &csr())),
            )
            .await;
        assert_eq!(status, 403);
        // An expired token.
        api.cp
            .write(Command::AddJoinToken {
                hash: key_hash("old"),
                record: JoinTokenRecord {
                    node_name: "c4".into(),
                    kind: JoinKind::Controller,
                    created_at: "2020-01-01T00:00:00Z".into(),
                    expires_at: "2020-01-02T00:00:00Z".into(),
                },
            })
            .await
            .unwrap();
        let (status, _) = api
            .call(
                "POST",
                "/1.0/cluster/join-controller",
                Some(join_body("old", "c4", &csr())),
            )
            .await;
        assert_eq!(status, 403);
        // Bad names.
        for name in ["", "a b", &"x".repeat(64)] {
            let (status, _) = api
                .call(
                    "POST",
                    "/1.0/cluster/controller-tokens",
                    Some(serde_json::json!({ "name": name })),
                )
                .await;
            assert_eq!(status, 400, "{name:?}");
        }
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_view_settings_and_removal() {
        let api = Api::start().await;
        let (status, body) = api.call("GET", "/1.0/cluster", None).await;
        assert_eq!(status, 200, "{body}");
        let view: Cluster = serde_json::from_value(body["metadata"].clone()).unwrap();
        assert_eq!(view.answered_by, "c1");
        assert_eq!(view.controllers.len(), 1);
        assert_eq!(
            (
                view.controllers[0].role.as_str(),
                view.controllers[0].state.as_str()
            ),
            ("leader", "online")
        );

        // Cluster config: validated, null removes.
        let patch = |v: serde_json::Value| Some(serde_json::json!({ "config": v }));
        assert_eq!(
            api.call(
                "PATCH",
                "/1.0/cluster",
                patch(serde_json::json!({"scheduler.policy": "binpack"}))
            )
            .await
            .0,
            200
        );
        assert_eq!(
            api.call(
                "PATCH",
                "/1.0/cluster",
                patch(serde_json::json!({"scheduler.policy": "random"}))
            )
            .await
            .0,
            400
        );
        assert_eq!(
            api.call(
                "PATCH",
                "/1.0/cluster",
                patch(serde_json::json!({"bogus": "1"}))
            )
            .await
            .0,
            400
        );
        let config = api.cp.read(|s| s.cluster.config.clone()).await.unwrap();
        assert_eq!(
            config.get("scheduler.policy").map(String::as_str),
            Some("binpack")
        );
        api.call(
            "PATCH",
            "/1.0/cluster",
            patch(serde_json::json!({"scheduler.policy": null})),
        )
        .await;
        assert!(api.cp.read(|s| s.cluster.config.is_empty()).await.unwrap());

        // A node, with labels from its agent.
        join_node(
            &api.cp,
            Node {
                name: "n1".into(),
                address: "10.0.0.5:8445".into(),
                cpus: 4,
                memory_bytes: 8 << 30,
                labels: BTreeMap::from([("rack".into(), "r1".into())]),
                ..Default::default()
            },
        )
        .await;
        let (status, body) = api
            .call(
                "PATCH",
                "/1.0/cluster/members/n1",
                Some(serde_json::json!({"config": {"scheduler.instance": "manual", "rack": "r2", "ssd": "true"}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = api.call("GET", "/1.0/cluster/members/n1", None).await;
        assert_eq!(status, 200);
        let node: ClusterNode = serde_json::from_value(body["metadata"].clone()).unwrap();
        assert_eq!(node.labels.get("rack").map(String::as_str), Some("r2"));
        assert_eq!(node.labels.get("ssd").map(String::as_str), Some("true"));
        assert!(!node.labels.contains_key("scheduler.instance"));
        assert_eq!(node.total.cpus, 4);
        for bad in [
            serde_json::json!({"scheduler.instance": "sometimes"}),
            serde_json::json!({"scheduler.other": "x"}),
            serde_json::json!({"Bad Key": "x"}),
        ] {
            let (status, body) = api
                .call(
                    "PATCH",
                    "/1.0/cluster/members/n1",
                    Some(serde_json::json!({ "config": bad })),
                )
                .await;
            assert_eq!(status, 400, "{body}");
        }
        api.call(
            "PATCH",
            "/1.0/cluster/members/n1",
            Some(serde_json::json!({"config": {"rack": null}})),
        )
        .await;
        let labels = api
            .cp
            .read(|s| crate::scheduler::effective_labels(&s.nodes["n1"]))
            .await
            .unwrap();
        assert_eq!(labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(
            api.call(
                "PATCH",
                "/1.0/cluster/members/c1",
                Some(serde_json::json!({"config": {}}))
            )
            .await
            .0,
            400
        );
        let (status, body) = api.call("GET", "/1.0/cluster/members/c1", None).await;
        assert_eq!(status, 200);
        assert_eq!(body["metadata"]["role"], "leader");
        assert_eq!(
            api.call("GET", "/1.0/cluster/members/nope", None).await.0,
            404
        );

        // Removal: unknown 404, the last voter refused, a node removed.
        assert_eq!(
            api.call("DELETE", "/1.0/cluster/members/nope", None)
                .await
                .0,
            404
        );
        let (status, body) = api.call("DELETE", "/1.0/cluster/members/c1", None).await;
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("last voter"),
            "{body}"
        );
        assert_eq!(
            api.call("DELETE", "/1.0/cluster/members/n1", None).await.0,
            200
        );
        assert!(api.cp.read(|s| s.nodes.is_empty()).await.unwrap());
        api.cp.shutdown().await;
    }

    #[tokio::test]
    async fn a_node_joining_under_another_name_is_told_the_tokens_name() {
        let api = Api::start().await;
        let token = api.token("join-tokens", "node1").await;
        let join = |secret: &str, name: &str| {
            serde_json::json!({
                "secret": secret,
                "name": name,
                "address": "10.0.0.9:8445",
                "csr": csr(),
                "cpus": 1,
                "memory_bytes": 1u64 << 30,
            })
        };
        let (status, body) = api
            .call(
                "POST",
                "/1.0/cluster/join",
                Some(join(&token.secret, "node2")),
            )
            .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(
            body["error"],
            "the join token was issued for node \"node1\", not for node \"node2\""
        );
        // An unknown secret learns nothing.
        let (status, body) = api
            .call("POST", "/1.0/cluster/join", Some(join("guess", "node1")))
            .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"], "the join token is not valid or has expired");
        // The right name joins.
        let (status, body) = api
            .call(
                "POST",
                "/1.0/cluster/join",
                Some(join(&token.secret, "node1")),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    #[tokio::test]
    async fn add_node_prints_the_documented_join_command() {
        let api = Api::start().await;
        let (status, body) = api
            .call(
                "POST",
                "/1.0/cluster/join-tokens",
                Some(serde_json::json!({ "name": "node1" })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let resp: JoinTokenResponse = serde_json::from_value(body["metadata"].clone()).unwrap();
        // docs/operator-guide.md: a root-only token file, `berth-agent join`, then the service.
        assert_eq!(
            resp.command,
            format!(
                "(umask 077 && echo {} >/etc/berth/join-token) && berth-agent join --join-token-file /etc/berth/join-token && systemctl enable --now berth-agent",
                resp.token
            )
        );
    }

    #[tokio::test]
    async fn a_follower_asks_the_leader_with_the_forwarded_header() {
        use std::sync::Mutex;

        let api = Api::start().await;
        // A stand-in for the leader's API that notes whether the request was marked.
        let seen: Arc<Mutex<Option<bool>>> = Arc::default();
        let noted = seen.clone();
        let leader = axum::Router::new().route(
            "/1.0/cluster",
            axum::routing::get(move |headers: HeaderMap| async move {
                *noted.lock().unwrap() = Some(headers.contains_key(FORWARDED));
                axum::Json(berth_proto::api::Response::sync(
                    serde_json::to_value(Cluster {
                        name: "from-the-leader".into(),
                        ..Default::default()
                    })
                    .unwrap(),
                ))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cert = api
            .ca
            .issue(
                "leader",
                &[
                    berth_proto::CONTROLLER_TLS_NAME.to_string(),
                    "127.0.0.1".into(),
                ],
            )
            .unwrap();
        let tls = crate::tls::api_server_config(&cert, &api.ca.cert_pem).unwrap();
        let server = tokio::spawn(crate::api::serve(listener, tls, leader));
        // The leader's record (Raft id 1) now points at the stand-in.
        api.cp
            .write(Command::RegisterController {
                record: ControllerRecord {
                    name: "c1".into(),
                    id: 1,
                    peer_address: "127.0.0.1:1".into(),
                    api_address: addr,
                    joined_at: clock::now(),
                    cert_fingerprint: String::new(),
                },
            })
            .await
            .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer secret".parse().unwrap(),
        );
        let view = leader_overview(&api.state, &headers).await.unwrap();
        assert_eq!(view.name, "from-the-leader");
        assert_eq!(*seen.lock().unwrap(), Some(true));
        server.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod role_tests {
    use crate::api::projects::testkit::*;
    use crate::state::Command;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_reads_and_writes_by_role() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        api.cp
            .write(Command::UpdateProject {
                name: "b".into(),
                description: String::new(),
                config: [("restricted".to_string(), "true".to_string())].into(),
            })
            .await
            .unwrap();
        // Reads: fleet keys and keys of unrestricted projects; not a restricted project's.
        for path in [
            "/1.0/cluster",
            "/1.0/cluster/members",
            "/1.0/cluster/members/n1",
        ] {
            for key in [ADMIN, OPERATOR, MEMBER_A, VIEWER_A] {
                let (status, body) = api.call(key, "GET", path, None).await;
                assert_eq!(status, 200, "{key} {path}: {body}");
            }
            let (status, body) = api.call(MEMBER_B, "GET", path, None).await;
            assert_eq!(status, 403, "{path}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains("restricted"),
                "{body}"
            );
        }
        // Writes: fleet keys only; controller tokens and removal: admins only.
        let before = api.model().await;
        let name = serde_json::json!({"name": "n2"});
        for key in [MEMBER_A, VIEWER_A, MEMBER_B] {
            for (method, path, body) in [
                (
                    "PATCH",
                    "/1.0/cluster",
                    Some(serde_json::json!({"config": {"scheduler.policy": "binpack"}})),
                ),
                (
                    "PATCH",
                    "/1.0/cluster/members/n1",
                    Some(serde_json::json!({"config": {"rack": "r9"}})),
                ),
                ("DELETE", "/1.0/cluster/members/n1", None),
                ("DELETE", "/1.0/cluster/members/c1", None),
                ("POST", "/1.0/cluster/join-tokens", Some(name.clone())),
                ("POST", "/1.0/cluster/controller-tokens", Some(name.clone())),
            ] {
                let (status, answer) = api.call(key, method, path, body).await;
                assert_eq!(status, 403, "{key} {method} {path}: {answer}");
            }
        }
        for (method, path, body) in [
            ("POST", "/1.0/cluster/controller-tokens", Some(name.clone())),
            ("DELETE", "/1.0/cluster/members/c1", None),
        ] {
            let (status, answer) = api.call(OPERATOR, method, path, body).await;
            assert_eq!(status, 403, "operator {method} {path}: {answer}");
        }
        assert_eq!(api.model().await, before);
        let (status, body) = api
            .call(
                OPERATOR,
                "POST",
                "/1.0/cluster/join-tokens",
                Some(name.clone()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = api
            .call(
                OPERATOR,
                "PATCH",
                "/1.0/cluster/members/n1",
                Some(serde_json::json!({"config": {"rack": "r9"}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        // The last voter is still refused when an admin asks.
        let (status, body) = api
            .call(ADMIN, "DELETE", "/1.0/cluster/members/c1", None)
            .await;
        assert_eq!(status, 409, "{body}");
        api.cp.shutdown().await;
    }
}
