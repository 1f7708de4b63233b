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
    pub name: String,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub created_at: String,
}

/// Whether a node's agent is reachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    #[default]
    Online,
    Offline,
}

/// A node running an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// The agent's gRPC address, `host:port`.
    pub address: String,
    /// Fingerprint of the agent's client certificate.
    pub cert_fingerprint: String,
    /// The node bridge's address with prefix, e.g. `10.87.3.1/24`.
    pub ipv4_cidr: String,
    pub status: NodeStatus,
    pub joined_at: String,
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// What the user wants an instance to be doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    Running,
    #[default]
    Stopped,
}

/// What the node's agent last reported about an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub status: InstanceStatusCode,
    pub pid: i64,
    pub updated_at: String,
    /// Empty unless the last action failed.
    pub error: String,
}

/// A machine container: intent (`desired`, placement) and last observation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub description: String,
    /// The node the instance is placed on.
    pub node: String,
    /// Fingerprint of the image it was created from.
    pub image: String,
    pub config: BTreeMap<String, String>,
    pub created_at: String,
    pub last_used_at: String,
    /// Allocated IPv4 address (no prefix), `""` if none.
    pub ipv4: String,
    pub hwaddr: String,
    pub desired: DesiredState,
    pub observed: Observed,
}

/// An image known to the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub fingerprint: String,
    pub properties: BTreeMap<String, String>,
    pub architecture: String,
    pub size: u64,
    pub created_at: String,
    pub uploaded_at: String,
    /// Names of the nodes that hold the image's bytes.
    pub locations: BTreeSet<String>,
}

/// A name for an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub name: String,
    /// Fingerprint of the target image.
    pub target: String,
    pub description: String,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Admin,
    Operator,
    ProjectMember,
    #[default]
    ProjectViewer,
}

/// An API key; only the hash of its secret is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// Hex sha256 of the secret.
    pub hash: String,
    pub role: Role,
    pub project: String,
    pub created_at: String,
    pub expires_at: Option<String>,
}

/// A one-time token that lets a node join.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// The name the joining node must use.
    pub node_name: String,
    pub created_at: String,
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
