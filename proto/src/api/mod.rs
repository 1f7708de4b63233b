//! The REST API's JSON types, shaped after LXD's `/1.0` API so that its users feel at home.
//!
//! Every answer is a [`Response`] envelope: `sync` (a result), `async` (an [`Operation`] was
//! started; 202) or `error`.

pub mod config;
pub mod names;
pub mod tenancy;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The API version in every path.
pub const API_VERSION: &str = "1.0";

/// Append-only list of API extensions this server implements.
pub const API_EXTENSIONS: &[&str] = &[
    "berth_api_keys",
    "berth_operations_wait",
    "berth_exec_single_websocket",
    "berth_image_build",
    "berth_console_log",
    "berth_cluster_controllers",
    "berth_instance_placement",
    "berth_metrics",
    "berth_retry_after",
    "projects",
    "berth_project_quotas",
    "berth_api_key_roles",
    "profiles",
    "snapshots",
    "snapshot_schedule",
    "berth_instance_copy",
    "berth_instance_live_move",
    "berth_cluster_evacuation",
    "berth_image_publish",
    "berth_image_export",
    "berth_image_pull",
    "instances_state_selective_recursion",
];

/// The response envelope of every answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    #[serde(rename = "type")]
    pub kind: ResponseType,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub status_code: u16,
    /// For `async`: the operation's path, `/1.0/operations/{id}`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operation: String,
    /// For `error`: the HTTP status.
    #[serde(default)]
    pub error_code: u16,
    /// For `error`: one sentence saying what was wrong.
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResponseType {
    Sync,
    Async,
    Error,
}

impl Response {
    pub fn sync(metadata: serde_json::Value) -> Self {
        Response {
            kind: ResponseType::Sync,
            status: "Success".into(),
            status_code: 200,
            operation: String::new(),
            error_code: 0,
            error: String::new(),
            metadata,
        }
    }

    pub fn asynchronous(op: &Operation) -> Self {
        Response {
            kind: ResponseType::Async,
            status: "Operation created".into(),
            status_code: 100,
            operation: format!("/{API_VERSION}/operations/{}", op.id),
            error_code: 0,
            error: String::new(),
            metadata: serde_json::to_value(op).unwrap_or_default(),
        }
    }

    pub fn error(code: u16, message: impl Into<String>) -> Self {
        Response {
            kind: ResponseType::Error,
            status: String::new(),
            status_code: 0,
            operation: String::new(),
            error_code: code,
            error: message.into(),
            metadata: serde_json::Value::Null,
        }
    }
}

/// `GET /1.0`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Server {
    pub api_extensions: Vec<String>,
    pub api_status: String,
    pub api_version: String,
    pub auth: String,
    pub auth_methods: Vec<String>,
    pub environment: ServerEnvironment,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ServerEnvironment {
    pub server: String,
    pub server_name: String,
    pub server_version: String,
    pub server_clustered: bool,
    pub server_pid: u32,
    pub kernel: String,
    pub storage: String,
    /// The identity of the key that made the request.
    pub auth_user_name: String,
    pub auth_role: String,
    /// The project the request worked in.
    #[serde(default)]
    pub project: String,
}

/// Instance statuses, with LXD's status codes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum InstanceStatusCode {
    #[default]
    Stopped,
    Running,
    Starting,
    Stopping,
    Error,
    Pending,
    /// The instance's node is offline: its real state cannot be known (a Berth addition).
    Unknown,
}

impl InstanceStatusCode {
    pub fn code(self) -> u16 {
        match self {
            InstanceStatusCode::Stopped => 102,
            InstanceStatusCode::Running => 103,
            InstanceStatusCode::Starting => 106,
            InstanceStatusCode::Stopping => 107,
            InstanceStatusCode::Error => 400,
            InstanceStatusCode::Pending => 105,
            InstanceStatusCode::Unknown => 118,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatusCode::Stopped => "Stopped",
            InstanceStatusCode::Running => "Running",
            InstanceStatusCode::Starting => "Starting",
            InstanceStatusCode::Stopping => "Stopping",
            InstanceStatusCode::Error => "Error",
            InstanceStatusCode::Pending => "Pending",
            InstanceStatusCode::Unknown => "Unknown",
        }
    }
}

/// An instance as the API shows it (`GET /1.0/instances/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Instance {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub status: String,
    pub status_code: u16,
    /// The node the instance is placed on.
    pub location: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub architecture: String,
    /// The instance's own config (what PUT replaces).
    pub config: BTreeMap<String, String>,
    /// The config it runs with: its profiles' config in order, then its own on top.
    #[serde(default)]
    pub expanded_config: BTreeMap<String, String>,
    pub profiles: Vec<String>,
    pub ephemeral: bool,
    pub stateful: bool,
    pub created_at: String,
    pub last_used_at: String,
    /// Fingerprint of the image the instance was made from.
    pub image: String,
    /// The project the instance belongs to.
    #[serde(default)]
    pub project: String,
    /// Filled when `?recursion=2` is asked for (and by `GET /1.0/instances/{name}/state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<InstanceState>,
    /// Its snapshots, oldest first (sizes are filled only by the snapshot endpoints).
    #[serde(default)]
    pub snapshots: Vec<InstanceSnapshot>,
}

/// A snapshot (`GET /1.0/instances/{name}/snapshots/{snapshot}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceSnapshot {
    pub name: String,
    pub created_at: String,
    /// When it is deleted by itself; `""` never.
    #[serde(default)]
    pub expires_at: String,
    /// Bytes only this snapshot holds (what deleting it frees); 0 when unknown.
    #[serde(default)]
    pub size: u64,
    /// Always false: snapshots hold the filesystem, not the memory.
    #[serde(default)]
    pub stateful: bool,
    /// Taken by `snapshots.schedule`.
    #[serde(default)]
    pub scheduled: bool,
}

/// `POST /1.0/instances/{name}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstanceSnapshotsPost {
    /// The snapshot's name; `""` takes the next from `snapshots.pattern` (default `snap%d`).
    #[serde(default)]
    pub name: String,
    /// When it expires (RFC 3339); `""` takes `snapshots.expiry`, if set.
    #[serde(default)]
    pub expires_at: String,
    /// Refused when true: snapshots never hold the memory.
    #[serde(default)]
    pub stateful: bool,
}

/// `POST /1.0/instances/{name}/snapshots/{snapshot}`: rename.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstanceSnapshotPost {
    pub name: String,
}

/// What a copy or move puts in its operation's metadata, updated as it runs (about once a
/// second) and complete when it ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TransferMetadata {
    /// What runs now: "sending", "pre-copy 2", "final pass", "starting", ...
    #[serde(default)]
    pub stage: String,
    /// Bytes of btrfs send data sent so far, over all passes.
    #[serde(default)]
    pub bytes: u64,
    /// Bytes per second over the last second.
    #[serde(default)]
    pub rate: u64,
    /// One entry per send pass (a copy or a stopped move has one).
    #[serde(default)]
    pub passes: Vec<TransferPass>,
    /// A live move: milliseconds from the stop on the source to running on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TransferPass {
    /// "full", "pre-copy", "final".
    pub kind: String,
    pub bytes: u64,
    pub millis: u64,
}

/// `GET /1.0/instances/{name}/state`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceState {
    pub status: String,
    pub status_code: u16,
    pub pid: i64,
    pub processes: i64,
    pub memory: InstanceStateMemory,
    pub cpu: InstanceStateCpu,
    pub network: BTreeMap<String, InstanceStateNetwork>,
    /// Unix seconds of the last start, 0 when stopped.
    #[serde(default)]
    pub started_at: i64,
    /// Effective limits as read back from the kernel.
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
    /// Disk use by device, LXD's shape: `root` when it is known (btrfs quotas on, which the
    /// first `limits.disk` on a node turns on).
    #[serde(default)]
    pub disk: BTreeMap<String, InstanceStateDisk>,
}

/// One disk of [`InstanceState::disk`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct InstanceStateDisk {
    /// Bytes used.
    pub usage: u64,
    /// The limit in bytes, 0 when unlimited.
    pub total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceStateMemory {
    pub usage: u64,
    pub usage_peak: u64,
    /// 0 when unlimited.
    pub total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceStateCpu {
    /// CPU time used, in nanoseconds.
    pub usage: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceStateNetwork {
    pub addresses: Vec<InstanceStateNetworkAddress>,
    pub hwaddr: String,
    pub host_name: String,
    pub state: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct InstanceStateNetworkAddress {
    pub family: String,
    pub address: String,
    pub netmask: String,
    pub scope: String,
}

/// `POST /1.0/instances`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstancesPost {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub source: InstanceSource,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Start the instance once it is created (what `berth launch` asks for).
    #[serde(default)]
    pub start: bool,
    /// Place the instance on this node (`?target=` does the same).
    #[serde(default)]
    pub target: String,
    #[serde(default, rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstanceSource {
    /// "image" (the only kind for now).
    #[serde(rename = "type")]
    pub kind: String,
    /// An image alias, such as "debian/12".
    #[serde(default)]
    pub alias: String,
    /// An image fingerprint, or a unique prefix of one.
    #[serde(default)]
    pub fingerprint: String,
    /// For "copy": the instance to copy, or `instance/snapshot`.
    #[serde(default)]
    pub source: String,
    /// For "copy": leave the snapshots behind.
    #[serde(default)]
    pub instance_only: bool,
    /// For "copy": the target exists; bring it up to date with what changed since.
    #[serde(default)]
    pub refresh: bool,
}

/// `PUT /1.0/instances/{name}`: the whole writable part. `PATCH` takes the same shape and merges.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstancePut {
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
    /// The whole list of profiles, in order: absent or empty means none (PUT replaces).
    #[serde(default)]
    pub profiles: Vec<String>,
    #[serde(default)]
    pub ephemeral: bool,
    /// When set, the PUT restores this snapshot (as LXD does) and the other fields are ignored:
    /// a running instance is stopped, restored and started again.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub restore: String,
}

/// `PATCH /1.0/instances/{name}`: only what is present changes; a config key set to `null` is removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstancePatch {
    #[serde(default)]
    pub config: Option<BTreeMap<String, Option<String>>>,
    #[serde(default)]
    pub description: Option<String>,
    /// When present, replaces the list of profiles (in order).
    #[serde(default)]
    pub profiles: Option<Vec<String>>,
}

/// `POST /1.0/instances/{name}`: rename (`name`), or move to another node (`migration`, with
/// `?target=NODE`; a running instance moves live).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstancePost {
    /// The new name; the current one (or `""`) for a move that keeps it.
    #[serde(default)]
    pub name: String,
    /// Move the instance to the node `?target=` names.
    #[serde(default)]
    pub migration: bool,
    /// Accepted for LXD clients; a running instance always moves live.
    #[serde(default)]
    pub live: bool,
}

/// `PUT /1.0/instances/{name}/state`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstanceStatePut {
    /// start, stop or restart.
    pub action: String,
    /// Seconds to wait for a clean stop before killing; -1 or 0 means the default (30).
    #[serde(default)]
    pub timeout: i64,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub stateful: bool,
}

/// `POST /1.0/instances/{name}/exec`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InstanceExecPost {
    pub command: Vec<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default, rename = "wait-for-websocket")]
    pub wait_for_websocket: bool,
    #[serde(default)]
    pub interactive: bool,
    #[serde(default)]
    pub width: u32,
    #[serde(default)]
    pub height: u32,
    #[serde(default)]
    pub user: u32,
    #[serde(default)]
    pub group: u32,
    #[serde(default)]
    pub cwd: String,
    /// Collect stdout and stderr in the operation's metadata instead of a websocket (at most 1 MiB each).
    #[serde(default, rename = "record-output")]
    pub record_output: bool,
}

/// Control messages on the exec websocket (text frames, JSON). Data travels in binary frames
/// whose first byte is the stream: 0 stdin (client to server), 1 stdout, 2 stderr.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum ExecControl {
    WindowResize {
        width: u32,
        height: u32,
    },
    Signal {
        signal: i32,
    },
    /// The client has no more stdin.
    StdinEof,
    /// Server to client, last message: the command's exit code (128+N when killed by signal N).
    Exit {
        code: i32,
    },
}

/// Exec websocket stream ids (first byte of each binary frame).
pub mod exec_stream {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
}

/// Operation statuses, with LXD's codes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum OperationStatus {
    #[default]
    Pending,
    Running,
    Success,
    Failure,
    Cancelled,
}

impl OperationStatus {
    pub fn code(self) -> u16 {
        match self {
            OperationStatus::Pending => 105,
            OperationStatus::Running => 103,
            OperationStatus::Success => 200,
            OperationStatus::Failure => 400,
            OperationStatus::Cancelled => 401,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            OperationStatus::Success | OperationStatus::Failure | OperationStatus::Cancelled
        )
    }
}

/// A long-running piece of work (`/1.0/operations/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Operation {
    pub id: String,
    /// "task" or "websocket".
    pub class: String,
    pub description: String,
    pub created_at: String,
    pub updated_at: String,
    pub status: OperationStatus,
    pub status_code: u16,
    /// Affected objects by kind, e.g. {"instances": ["/1.0/instances/web1"]}.
    pub resources: BTreeMap<String, Vec<String>>,
    pub metadata: serde_json::Value,
    pub may_cancel: bool,
    /// Empty unless the operation failed: one sentence.
    pub err: String,
    pub location: String,
    /// The project of the objects it works on.
    #[serde(default)]
    pub project: String,
}

/// An image (`/1.0/images/{fingerprint}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Image {
    pub fingerprint: String,
    pub aliases: Vec<ImageAlias>,
    pub architecture: String,
    pub properties: BTreeMap<String, String>,
    pub size: u64,
    pub created_at: String,
    pub uploaded_at: String,
    /// Nodes that hold the image's bytes.
    #[serde(default)]
    pub locations: Vec<String>,
    /// Seen by every project (`--public`).
    #[serde(default)]
    pub public: bool,
    /// When an instance was last made from it; `""` never.
    #[serde(default)]
    pub last_used_at: String,
}

/// `PUT /1.0/images/{fingerprint}`: the writable part (`PATCH` merges properties).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ImagePut {
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ImageAlias {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// `POST /1.0/images` with a JSON body: build an image on a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ImagesPost {
    pub source: ImageSource,
    #[serde(default)]
    pub aliases: Vec<ImageAlias>,
    /// Seen by every project.
    #[serde(default)]
    pub public: bool,
    /// Properties of a published image (os, release, description, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ImageSource {
    /// "build".
    #[serde(rename = "type")]
    pub kind: String,
    /// For "build": "busybox" or "debian/12".
    #[serde(default)]
    pub recipe: String,
    /// For "build": the Debian mirror to use.
    #[serde(default)]
    pub mirror: String,
    /// For "instance": the instance to publish (stopped); for "snapshot": `instance/snapshot`.
    #[serde(default)]
    pub name: String,
}

/// `POST /1.0/images/aliases`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ImageAliasesPost {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub target: String,
}

/// What `GET /1.0/instances/{name}/files?path=` answers for a directory (files come raw).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct DirectoryListing {
    pub entries: Vec<String>,
}

/// Headers that carry file metadata on `/1.0/instances/{name}/files` (LXD's names).
pub mod file_headers {
    pub const UID: &str = "X-LXD-uid";
    pub const GID: &str = "X-LXD-gid";
    pub const MODE: &str = "X-LXD-mode";
    /// file, directory or symlink.
    pub const TYPE: &str = "X-LXD-type";
    /// For pushes: "overwrite" (default).
    pub const WRITE: &str = "X-LXD-write";
}

/// `POST /1.0/cluster/join`: an agent presents its one-time token and a CSR.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterJoinPost {
    /// The secret part of the join token.
    pub secret: String,
    /// The node's name.
    pub name: String,
    /// Where the agent's gRPC service listens, host:port.
    pub address: String,
    /// PEM certificate signing request for the agent's key.
    pub csr: String,
    /// The node's bridge address and prefix ("10.87.3.1/24"): its instances' subnet.
    #[serde(default)]
    pub bridge_ipv4_cidr: String,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_bytes: u64,
}

/// The answer to a join.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClusterJoinResponse {
    /// PEM certificate for the agent, signed by the cluster CA.
    pub certificate: String,
    /// PEM cluster CA certificate.
    pub ca: String,
    /// Peer addresses (host:port) of the controllers, where the agent sends heartbeats.
    #[serde(default)]
    pub controllers: Vec<String>,
}

/// `POST /1.0/cluster/join-controller`: a new controller presents its one-time token and a
/// CSR (`berthd --join ADDRESS --token TOKEN`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ControllerJoinPost {
    /// The secret part of the join token.
    pub secret: String,
    /// The new controller's name.
    pub name: String,
    /// PEM certificate signing request for the controller's key.
    pub csr: String,
    /// Where its peer (Raft) listener is reached, host:port.
    pub peer_address: String,
    /// Where its REST API is reached, host:port.
    pub api_address: String,
}

/// The answer to a controller join: its certificate and Raft id. The controller is added as a
/// learner and promoted to voter once it has caught up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ControllerJoinResponse {
    /// PEM certificate for the controller, signed by the cluster CA.
    pub certificate: String,
    /// PEM cluster CA certificate.
    pub ca: String,
    /// The controller's Raft id.
    pub id: u64,
}

/// `POST /1.0/cluster/join-tokens` and `/1.0/cluster/controller-tokens`: who the token is for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenPost {
    /// The name the joining node or controller will have.
    pub name: String,
}

/// The answer to a token request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct JoinTokenResponse {
    pub name: String,
    /// The token (base64 of [`JoinToken`]); shown once.
    pub token: String,
    /// The command to run on the new machine.
    #[serde(default)]
    pub command: String,
}

/// A controller as `GET /1.0/cluster` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClusterController {
    pub name: String,
    /// Raft id.
    pub id: u64,
    pub peer_address: String,
    pub api_address: String,
    /// "leader", "voter" or "learner".
    pub role: String,
    /// "online", "unreachable" (the leader has not heard from it lately) or "unknown" (asked
    /// of a controller that cannot see the leader).
    pub state: String,
}

/// Resource figures of a node.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct NodeResources {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub storage_bytes: u64,
}

/// A node (agent) as `GET /1.0/cluster` and `GET /1.0/cluster/members/{name}` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClusterNode {
    pub name: String,
    /// The agent's gRPC address.
    pub address: String,
    /// "Online" or "Offline".
    pub status: String,
    pub evacuated: bool,
    pub architecture: String,
    /// Effective labels: the agent's, overridden by those set through the API.
    pub labels: BTreeMap<String, String>,
    /// Settings made through the API (`scheduler.instance`, label overrides).
    pub config: BTreeMap<String, String>,
    /// What the node has.
    pub total: NodeResources,
    /// What its instances' limits claim.
    pub allocated: NodeResources,
    /// Free space in its storage pool, as last reported.
    pub storage_free_bytes: u64,
    pub instances: u32,
    pub joined_at: String,
}

/// `GET /1.0/cluster`: the controllers and the nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Cluster {
    pub name: String,
    /// The controller that answered.
    pub answered_by: String,
    pub controllers: Vec<ClusterController>,
    pub nodes: Vec<ClusterNode>,
    /// Cluster-wide settings (`scheduler.policy`, ...), as `PATCH /1.0/cluster` sets them.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// `PATCH /1.0/cluster/members/{name}`: node settings; a null value removes the key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterMemberPatch {
    #[serde(default)]
    pub config: BTreeMap<String, Option<String>>,
}

/// `POST /1.0/cluster/members/{name}/state`: evacuate a node or bring its instances back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterMemberStatePost {
    /// "evacuate" or "restore".
    pub action: String,
    /// For "evacuate": "move" (default: running instances move live, stopped ones by
    /// send/receive) or "stop" (they stay, stopped).
    #[serde(default)]
    pub mode: String,
}

/// A join token as handed to an operator: base64 of this JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct JoinToken {
    /// Controller addresses (host:port of the REST API).
    pub addresses: Vec<String>,
    /// sha256 of the cluster CA certificate (DER), hex.
    pub fingerprint: String,
    pub secret: String,
}

impl JoinToken {
    /// Decodes and checks a token as an operator pasted it; the error says what is wrong with
    /// it, as the end of "the join token is not valid: ...".
    pub fn decode(token: &str) -> Result<JoinToken, String> {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .map_err(|_| "it is not base64".to_string())?;
        let t: JoinToken = serde_json::from_slice(&raw)
            .map_err(|e| format!("it does not hold the expected fields: {e}"))?;
        if t.addresses.is_empty() {
            return Err("it names no controller address".into());
        }
        if t.fingerprint.len() != 64 || !t.fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("its CA fingerprint is not a sha256".into());
        }
        if t.secret.is_empty() || t.secret.len() > 256 {
            return Err("it has no valid secret".into());
        }
        Ok(t)
    }
}

/// A cluster member (`/1.0/cluster/members/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClusterMember {
    pub server_name: String,
    pub url: String,
    pub roles: Vec<String>,
    pub status: String,
    pub message: String,
}
