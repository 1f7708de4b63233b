//! `/1.0/cluster`: members, join tokens, and the join itself.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use base64::Engine as _;
use berth_proto::api::{self, ClusterJoinPost, ClusterJoinResponse, ClusterMember, JoinToken};
use serde::Deserialize;
use tracing::info;

use super::operations::sync;
use super::{ApiError, Identity, JsonBody, SharedState, key_hash};
use crate::agents::agent_tls_name;
use crate::clock;
use crate::state::{Command, JoinTokenRecord, Node, NodeStatus};

/// How long a join token stays valid.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// `GET /1.0/cluster/members?recursion=1`: the nodes.
pub async fn members(State(state): State<SharedState>) -> Result<Response, ApiError> {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenPost {
    /// The name the joining node will have.
    pub name: String,
}

/// Makes a one-time join token for node `name`, valid for [`JOIN_TOKEN_TTL`].
pub async fn issue_join_token(
    state: &SharedState,
    name: &str,
    api_addresses: Vec<String>,
) -> Result<String, ApiError> {
    validate_node_name(name)?;
    let secret = random_secret()?;
    state
        .cp
        .write(Command::AddJoinToken {
            hash: key_hash(&secret),
            record: JoinTokenRecord {
                node_name: name.to_string(),
                kind: crate::state::JoinKind::Node,
                created_at: clock::now(),
                expires_at: clock::after(JOIN_TOKEN_TTL),
            },
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

/// `POST /1.0/cluster/join-tokens` {name}: a token an agent joins with.
pub async fn create_join_token(
    State(state): State<SharedState>,
    Extension(_who): Extension<Identity>,
    JsonBody(body): JsonBody<JoinTokenPost>,
) -> Result<Response, ApiError> {
    let token = issue_join_token(&state, &body.name, vec![]).await?;
    Ok(sync(
        serde_json::json!({ "token": token, "name": body.name }),
    ))
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
    let addr: std::net::SocketAddr = body.address.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "agent address \"{}\" is not host:port",
            body.address
        ))
    })?;
    if !body.bridge_ipv4_cidr.is_empty() {
        validate_cidr(&body.bridge_ipv4_cidr)?;
    }
    // Check the token before doing any signing work for an unauthenticated caller (the
    // JoinNode command checks it again, atomically, when the node is added).
    let token_hash = key_hash(&body.secret);
    let now = clock::now();
    let valid = state
        .cp
        .read(|s| {
            s.join_tokens
                .get(&token_hash)
                .is_some_and(|t| t.node_name == body.name && t.expires_at.as_str() > now.as_str())
        })
        .await?;
    if !valid {
        return Err(ApiError::new(
            http::StatusCode::FORBIDDEN,
            "the join token is not valid or has expired",
        ));
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

// The handlers below are filled in by the replicated-control-plane work; until then they
// answer 501 so that the routes exist.

/// `GET /1.0/cluster`: controllers and nodes.
pub async fn overview(State(_state): State<SharedState>) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "not implemented yet",
    ))
}

/// `PATCH /1.0/cluster`: cluster-wide settings.
pub async fn patch_cluster(State(_state): State<SharedState>) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "not implemented yet",
    ))
}

/// `GET /1.0/cluster/members/{name}`: one node or controller.
pub async fn member(State(_state): State<SharedState>) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "not implemented yet",
    ))
}

/// `PATCH /1.0/cluster/members/{name}`: node settings.
pub async fn patch_member(State(_state): State<SharedState>) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "not implemented yet",
    ))
}

/// `DELETE /1.0/cluster/members/{name}`: remove a node or a controller.
pub async fn remove_member(State(_state): State<SharedState>) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "not implemented yet",
    ))
}

/// `POST /1.0/cluster/controller-tokens`: a token a new controller joins with.
pub async fn create_controller_token(
    State(_state): State<SharedState>,
) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "not implemented yet",
    ))
}

/// `POST /1.0/cluster/join-controller`: a new controller presents its token and a CSR.
pub async fn join_controller(State(_state): State<SharedState>) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "not implemented yet",
    ))
}
