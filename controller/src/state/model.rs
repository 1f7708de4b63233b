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
    /// Controllers (Raft members) by name.
    #[serde(default)]
    pub controllers: BTreeMap<String, ControllerRecord>,
    /// Projects by name.
    #[serde(default)]
    pub projects: BTreeMap<String, Project>,
    /// Profiles by scoped name ([`scoped_name`]: `name` in the default project,
    /// `project_name` in others).
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
    /// What requests made with an `Idempotency-Key` did, by `<api key id>/<header>`; dropped
    /// after a day (`PruneIdempotency`).
    #[serde(default)]
    pub idempotency: BTreeMap<String, IdempotencyRecord>,
}

/// The replicated memory of one `Idempotency-Key`: the request it was first used for, the
/// result of each of that request's writes, and the HTTP answer once it was given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// sha256 (hex) of method, path, query and body of the first request.
    pub request_hash: String,
    /// When the first request arrived (RFC 3339).
    pub created_at: String,
    /// The result of each write of the request, by its position (`IdempotencyTag::seq`).
    #[serde(default)]
    pub results: BTreeMap<u32, super::command::ApplyResult>,
    /// The answer the first request got, once stored (`CompleteIdempotency`).
    #[serde(default)]
    pub response: Option<StoredResponse>,
}

/// An HTTP answer kept for replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    /// The JSON body.
    pub body: String,
    /// The `ETag` header, if the answer had one.
    #[serde(default)]
    pub etag: Option<String>,
}

pub use berth_proto::api::names::{scoped_name, split_scoped_name};
pub use berth_proto::api::tenancy::{DEFAULT_PROFILE, DEFAULT_PROJECT};

fn default_project() -> String {
    DEFAULT_PROJECT.to_string()
}

fn default_profiles() -> Vec<String> {
    vec![DEFAULT_PROFILE.to_string()]
}

/// A tenant's slice of the cluster: its instances, profiles and image aliases, with quotas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    pub description: String,
    /// Quotas (`limits.*`), `restricted`, `user.*`; validated by the API.
    pub config: BTreeMap<String, String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// Config shared by instances: applied in the order an instance lists its profiles, then the
/// instance's own config wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The scoped name ([`scoped_name`]), which is also its key.
    pub name: String,
    /// The project it belongs to.
    pub project: String,
    pub description: String,
    pub config: BTreeMap<String, String>,
}

impl Profile {
    /// The name as its project knows it.
    pub fn short_name(&self) -> &str {
        split_scoped_name(&self.name).1
    }
}

/// A controller: its Raft id and where it is reached. The Raft membership is the authority on
/// who votes; this record gives members names and API addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerRecord {
    /// The controller's unique name.
    pub name: String,
    /// Its Raft node id.
    pub id: u64,
    /// `host:port` of its peer (Raft and agent heartbeat) listener.
    pub peer_address: String,
    /// `host:port` of its REST API.
    pub api_address: String,
    /// When it joined (RFC 3339).
    pub joined_at: String,
    /// sha256 of its certificate (DER, hex): the peer port takes controller calls only from
    /// the certificates of current members.
    #[serde(default)]
    pub cert_fingerprint: String,
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
    /// Cluster-wide settings (`scheduler.policy`, ...), changed through `PATCH /1.0/cluster`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// The lowest Raft id never given to a controller: ids are not reused after a removal.
    #[serde(default)]
    pub next_controller_id: u64,
    /// Certificate fingerprints of removed controllers: the peer port refuses them, Raft
    /// messages included, so a removed controller left running cannot disturb elections.
    #[serde(default)]
    pub removed_controllers: BTreeSet<String>,
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
    /// CPUs the node reported (at join, then in heartbeats).
    pub cpus: u32,
    /// Memory the node reported.
    pub memory_bytes: u64,
    /// Size of the node's storage pool.
    #[serde(default)]
    pub storage_total_bytes: u64,
    /// Free space in the node's storage pool, as last written (updated when it changes by
    /// more than a small margin, not on every heartbeat).
    #[serde(default)]
    pub storage_free_bytes: u64,
    /// CPU architecture, e.g. `x86_64`.
    #[serde(default)]
    pub architecture: String,
    /// Labels from the agent's config file (`rack=r1`, `ssd=true`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Settings made through the API (`berth cluster set`): `scheduler.instance`
    /// (`all` or `manual`) and label overrides, which win over the agent's labels.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// True while the node is evacuated: no new instances are placed on it.
    #[serde(default)]
    pub evacuated: bool,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The scoped name ([`scoped_name`]: `web1` in the default project, `p_web1` in project
    /// `p`): its key in the state and its name on the node.
    pub name: String,
    /// The project it belongs to.
    #[serde(default = "default_project")]
    pub project: String,
    /// Profiles of its project, applied in this order before `config`.
    #[serde(default = "default_profiles")]
    pub profiles: Vec<String>,
    /// Free text.
    pub description: String,
    /// The node the instance is placed on.
    pub node: String,
    /// Fingerprint of the image it was created from.
    pub image: String,
    /// Its own config keys (`limits.cpu`, ...); see [`State::effective_config`] for the
    /// config it runs with.
    pub config: BTreeMap<String, String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it was last asked to run (RFC 3339), `""` if never.
    pub last_used_at: String,
    /// Allocated IPv4 address (no prefix), `""` if none.
    pub ipv4: String,
    /// The node whose subnet `ipv4` came from: the instance keeps its address (and this) when
    /// it moves to another node. `""` means `node` (records made before moves existed).
    #[serde(default)]
    pub address_node: String,
    /// MAC address of its interface.
    pub hwaddr: String,
    /// What the user wants.
    pub desired: DesiredState,
    /// What the agent last reported.
    pub observed: Observed,
    /// Work the reconciler still has to do for the instance, with the operation that waits
    /// for it; `None` when the instance is at rest.
    #[serde(default)]
    pub pending: Option<PendingAction>,
    /// Its snapshots by name (the name as given, without the instance's).
    #[serde(default)]
    pub snapshots: BTreeMap<String, Snapshot>,
    /// When the last scheduled snapshot was due (RFC 3339), `""` if none was taken yet: the
    /// schedule fires for the first due time after it.
    #[serde(default)]
    pub last_scheduled_snapshot: String,
    /// Set while the instance is away from its node because that node was evacuated: where
    /// `berth cluster restore` brings it back to.
    #[serde(default)]
    pub evacuated_from: Option<Evacuation>,
}

/// A read-only snapshot of an instance's root filesystem, held on the instance's node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    /// When it was taken (RFC 3339).
    pub created_at: String,
    /// When it is deleted by itself (RFC 3339), `""` never.
    #[serde(default)]
    pub expires_at: String,
    /// Taken by `snapshots.schedule`, not by a person.
    #[serde(default)]
    pub scheduled: bool,
}

/// Why an instance is not on its home node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evacuation {
    /// The evacuated node it came from.
    pub node: String,
    /// `move` (it was moved away) or `stop` (it was stopped where it is).
    pub mode: String,
    /// Whether it was running when the evacuation reached it (restore starts it again).
    pub was_running: bool,
}

impl Default for Instance {
    /// An empty instance of the default project with the default profile.
    fn default() -> Self {
        Instance {
            name: String::new(),
            project: default_project(),
            profiles: default_profiles(),
            description: String::new(),
            node: String::new(),
            image: String::new(),
            config: BTreeMap::new(),
            created_at: String::new(),
            last_used_at: String::new(),
            ipv4: String::new(),
            address_node: String::new(),
            hwaddr: String::new(),
            desired: DesiredState::default(),
            observed: Observed::default(),
            pending: None,
            snapshots: BTreeMap::new(),
            last_scheduled_snapshot: String::new(),
            evacuated_from: None,
        }
    }
}

/// A change the leader's reconciler carries out on the instance's node. It is replicated, so
/// a new leader finishes what the old one started; every action is idempotent on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAction {
    /// The operation that ends when the action does.
    pub op: String,
    /// What to do.
    pub action: Action,
    /// When it was requested (RFC 3339).
    pub since: String,
}

/// What a [`PendingAction`] does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Create the instance on its node, then start it when `start`.
    Create { start: bool },
    /// Start it.
    Start,
    /// Stop it: cleanly within `timeout_secs`, then by force (or at once with `force`).
    Stop { force: bool, timeout_secs: u32 },
    /// Stop it (as `Stop`), then start it.
    Restart { force: bool, timeout_secs: u32 },
    /// Remove it from its node and from the state; `force` stops it first when running.
    Delete { force: bool },
    /// Take a snapshot `name` (running or stopped); recorded when done. `scheduled` ones move
    /// `last_scheduled_snapshot` to `due`.
    Snapshot {
        name: String,
        /// RFC 3339, `""` never.
        expires_at: String,
        scheduled: bool,
        /// For scheduled snapshots: the due time the schedule fired for.
        due: String,
    },
    /// Delete the snapshot `name`; forgotten when done.
    DeleteSnapshot { name: String },
    /// Rename a snapshot; recorded when done.
    RenameSnapshot { from: String, to: String },
    /// Put the instance's root filesystem back to the snapshot: a running instance is stopped,
    /// restored and started again.
    Restore { snapshot: String },
    /// Make this (new) instance a copy of `source` (a scoped instance name of the same
    /// project), or of its snapshot `snapshot`: a btrfs snapshot on the same node, a btrfs
    /// send stream to another. With `refresh` the instance exists already and is brought up
    /// to date. A failed copy of a new instance removes its record (and whatever the target
    /// node received); the source is never changed.
    CopyFrom {
        source: String,
        snapshot: String,
        instance_only: bool,
        refresh: bool,
        start: bool,
    },
    /// Move the instance from node `from` to node `to`, keeping its name, address, MAC and
    /// snapshots. A running instance moves live: pre-copy passes while it runs, then a short
    /// stop for the final pass and a start on `to`. `Command::SwitchNode` marks the switch:
    /// before it the instance belongs to `from` (a failure leaves it there, running as it
    /// was); after it, to `to`, and a re-run only removes what is left on `from`.
    Migrate {
        from: String,
        to: String,
        live: bool,
    },
}

impl Action {
    /// The action's name in operations and logs.
    pub fn describe(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Start => "start",
            Action::Stop { .. } => "stop",
            Action::Restart { .. } => "restart",
            Action::Delete { .. } => "delete",
            Action::Snapshot { .. } => "snapshot",
            Action::DeleteSnapshot { .. } => "delete snapshot",
            Action::RenameSnapshot { .. } => "rename snapshot",
            Action::Restore { .. } => "restore",
            Action::CopyFrom { .. } => "copy",
            Action::Migrate { .. } => "move",
        }
    }
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
    /// When an instance was last made from it (RFC 3339), `""` never; nodes that hold a
    /// copy they did not build drop it after `images.remote_cache_expiry` days unused.
    #[serde(default)]
    pub last_used_at: String,
    /// Seen by every project (`--public`; only fleet keys set it).
    #[serde(default)]
    pub public: bool,
    /// The nodes that built, imported or published it (the others hold cached copies).
    #[serde(default)]
    pub origins: BTreeSet<String>,
    /// Names of the nodes that hold the image's bytes.
    pub locations: BTreeSet<String>,
    /// Projects that built or imported it. Images of the default project (or of none) are
    /// shared: every project can launch them; other images are seen only by their projects.
    #[serde(default)]
    pub projects: BTreeSet<String>,
}

/// A name for an image, in a project.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    /// The alias key ([`alias_key`]): `debian/12` in the default project, `p@debian/12` in
    /// project `p`.
    pub name: String,
    /// The project it belongs to.
    #[serde(default = "default_project")]
    pub project: String,
    /// Fingerprint of the target image.
    pub target: String,
    /// Free text.
    pub description: String,
}

/// The key of an alias of `project` in [`State::aliases`]: the alias itself in the default
/// project, `project@alias` in others (`@` is in neither names nor aliases).
pub fn alias_key(project: &str, alias: &str) -> String {
    if project == DEFAULT_PROJECT || project.is_empty() {
        alias.to_string()
    } else {
        format!("{project}@{alias}")
    }
}

impl Alias {
    /// The alias as its project knows it.
    pub fn short_name(&self) -> &str {
        self.name
            .split_once('@')
            .map(|(_, a)| a)
            .unwrap_or(&self.name)
    }
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Everything, key management included.
    Admin,
    /// The fleet: nodes and every project's objects; no key management.
    Operator,
    /// Reads and changes the objects of its project.
    #[serde(alias = "ProjectMember")]
    Member,
    /// Reads the objects of its project.
    #[default]
    #[serde(alias = "ProjectViewer")]
    Viewer,
}

impl Role {
    /// The role as the API and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    /// Parses `admin`, `operator`, `member` or `viewer`.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "member" => Role::Member,
            "viewer" => Role::Viewer,
            _ => return None,
        })
    }

    /// Whether the key is confined to its project.
    pub fn is_project_scoped(self) -> bool {
        matches!(self, Role::Member | Role::Viewer)
    }
}

/// An API key; only the hash of its secret is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public key id (the `<id>` of a `berth_<id>_<secret>` key).
    pub id: String,
    /// Human-readable name, unique in the cluster.
    pub name: String,
    /// Hex sha256 of the whole key as sent in `Authorization: Bearer`.
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

impl ApiKey {
    /// Whether the key has not expired at `now` (RFC 3339).
    pub fn works_at(&self, now: &str) -> bool {
        self.expires_at.as_deref().is_none_or(|e| e > now)
    }
}

/// What a join token lets join.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinKind {
    /// A node agent.
    #[default]
    Node,
    /// A controller (a new Raft member).
    Controller,
}

/// A one-time token that lets a node or a controller join.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// The name the joining node (or controller) must use.
    pub node_name: String,
    /// Whether the token is for an agent or a controller.
    #[serde(default)]
    pub kind: JoinKind,
    /// When the token was issued (RFC 3339).
    pub created_at: String,
    /// When the token stops working (RFC 3339).
    pub expires_at: String,
}

/// Minimum length of a fingerprint prefix accepted by [`State::resolve_image`].
pub const MIN_FINGERPRINT_PREFIX: usize = 12;

impl State {
    /// The node whose subnet the instance's address belongs to (its gateway and prefix).
    pub fn address_home(&self, i: &Instance) -> Option<&Node> {
        let name = if i.address_node.is_empty() {
            &i.node
        } else {
            &i.address_node
        };
        self.nodes.get(name)
    }

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

    /// Whether removing `key` would leave no admin key working at `now` (RFC 3339; an empty
    /// `now` counts every admin key as working).
    pub fn is_last_admin(&self, key: &ApiKey, now: &str) -> bool {
        let live_admin = |k: &ApiKey| k.role == Role::Admin && k.works_at(now);
        live_admin(key)
            && !self
                .api_keys
                .values()
                .any(|k| k.id != key.id && live_admin(k))
    }

    /// Finds the API key named `name`.
    pub fn api_key_by_name(&self, name: &str) -> Option<&ApiKey> {
        self.api_keys.values().find(|k| k.name == name)
    }
}
