//! The replicated model: everything the controller cluster agrees on through Raft.

use std::collections::{BTreeMap, BTreeSet};

use berth_proto::api::{InstanceStatusCode, Operation};
use serde::{Deserialize, Serialize};

/// The whole replicated state. Changed only by [`State::apply`](crate::state::Command).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Cluster identity, set once by `Bootstrap`.
    pub cluster: ClusterInfo,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Instances by name.
    pub instances: BTreeMap<String, Instance>,
    /// Images by fingerprint.
    pub images: BTreeMap<String, Image>,
    /// Image aliases by alias name.
    pub aliases: BTreeMap<String, Alias>,
    /// Operations by id.
    pub operations: BTreeMap<String, Operation>,
    /// API keys by key id.
    pub api_keys: BTreeMap<String, ApiKey>,
    /// Pending join tokens by the hex sha256 of their secret.
    pub join_tokens: BTreeMap<String, JoinTokenRecord>,
}

/// The cluster's identity and CA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// True once `Bootstrap` has been applied.
    pub bootstrapped: bool,
    /// The cluster's name.
    pub name: String,
    /// The cluster CA certificate (PEM).
    pub ca_cert_pem: String,
    /// The cluster CA private key (PEM); replicated so any leader can sign.
    pub ca_key_pem: String,
    /// When the cluster was bootstrapped (RFC 3339).
    pub created_at: String,
}

/// Whether a node's agent is reachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    /// The agent is reachable.
    #[default]
    Online,
    /// The agent missed its heartbeats.
    Offline,
}

/// A node running an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's unique name.
    pub name: String,
    /// The agent's gRPC address, `host:port`.
    pub address: String,
    /// Fingerprint of the agent's client certificate.
    pub cert_fingerprint: String,
    /// The node bridge's address with prefix, e.g. `10.87.3.1/24`.
    pub ipv4_cidr: String,
    /// Whether the agent is reachable (only transitions are written).
    pub status: NodeStatus,
    /// When the node joined (RFC 3339).
    pub joined_at: String,
    /// CPUs the node reported at join.
    pub cpus: u32,
    /// Memory the node reported at join.
    pub memory_bytes: u64,
}

/// What the user wants an instance to be doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    /// The instance should be running.
    Running,
    /// The instance should be stopped.
    #[default]
    Stopped,
}

/// What the node's agent last reported about an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The status the agent reported.
    pub status: InstanceStatusCode,
    /// PID of the instance's init on the node, 0 if not running.
    pub pid: i64,
    /// When this was observed (RFC 3339).
    pub updated_at: String,
    /// Empty unless the last action failed.
    pub error: String,
}

/// A machine container: intent (`desired`, placement) and last observation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The instance's unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The node the instance is placed on.
    pub node: String,
    /// Fingerprint of the image it was created from.
    pub image: String,
    /// Config keys (`limits.cpu`, ...).
    pub config: BTreeMap<String, String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it was last asked to run (RFC 3339), `""` if never.
    pub last_used_at: String,
    /// Allocated IPv4 address (no prefix), `""` if none.
    pub ipv4: String,
    /// MAC address of its interface.
    pub hwaddr: String,
    /// What the user wants.
    pub desired: DesiredState,
    /// What the agent last reported.
    pub observed: Observed,
}

/// An image known to the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// sha256 of the image, lowercase hex.
    pub fingerprint: String,
    /// Free-form properties (`os`, `release`, ...).
    pub properties: BTreeMap<String, String>,
    /// CPU architecture, e.g. `x86_64`.
    pub architecture: String,
    /// Size in bytes.
    pub size: u64,
    /// When the image was built (RFC 3339).
    pub created_at: String,
    /// When the cluster got it (RFC 3339).
    pub uploaded_at: String,
    /// Names of the nodes that hold the image's bytes.
    pub locations: BTreeSet<String>,
}

/// A name for an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    /// The alias, e.g. `debian/12`.
    pub name: String,
    /// Fingerprint of the target image.
    pub target: String,
    /// Free text.
    pub description: String,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Full control of the cluster.
    Admin,
    /// Operates resources across projects (the API decides the exact rights).
    Operator,
    /// Manages the objects of one project.
    ProjectMember,
    /// Reads the objects of one project.
    #[default]
    ProjectViewer,
}

/// An API key; only the hash of its secret is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public key id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Hex sha256 of the secret.
    pub hash: String,
    /// What the key may do.
    pub role: Role,
    /// The project a project-scoped role is limited to.
    pub project: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it stops working (RFC 3339), never if `None`.
    pub expires_at: Option<String>,
}

/// A one-time token that lets a node join.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// The name the joining node must use.
    pub node_name: String,
    /// When the token was issued (RFC 3339).
    pub created_at: String,
    /// When the token stops working (RFC 3339).
    pub expires_at: String,
}

/// Minimum length of a fingerprint prefix accepted by [`State::resolve_image`].
pub const MIN_FINGERPRINT_PREFIX: usize = 12;

impl State {
    /// Finds an image by exact alias, exact fingerprint, or a unique fingerprint prefix of at
    /// least [`MIN_FINGERPRINT_PREFIX`] hex characters.
    pub fn resolve_image(&self, alias_or_fingerprint_prefix: &str) -> Option<&Image> {
        let key = alias_or_fingerprint_prefix;
        if let Some(alias) = self.aliases.get(key) {
            return self.images.get(&alias.target);
        }
        if let Some(image) = self.images.get(key) {
            return Some(image);
        }
        if key.len() < MIN_FINGERPRINT_PREFIX || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut matches = self
            .images
            .range(key.to_string()..)
            .take_while(|(fp, _)| fp.starts_with(key))
            .map(|(_, image)| image);
        let first = matches.next()?;
        match matches.next() {
            Some(_) => None,
            None => Some(first),
        }
    }

    /// Finds the API key whose secret hashes to `hash` (hex sha256).
    pub fn api_key_by_hash(&self, hash: &str) -> Option<&ApiKey> {
        self.api_keys.values().find(|k| k.hash == hash)
    }
}
