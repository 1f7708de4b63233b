//! Commands: the only way the replicated [`State`](super::State) changes.

use std::collections::BTreeMap;

use berth_proto::api::Operation;
use serde::{Deserialize, Serialize};

use super::keys::ObjectKey;
use super::model::{
    Alias, ApiKey, ControllerRecord, DesiredState, Image, Instance, JoinTokenRecord, Node,
    NodeStatus, Observed, PendingAction, Profile, Project,
};
pub use berth_proto::api::tenancy::Requestor;

/// A change to the replicated state, proposed through Raft. Times (`now`) are stamped by the
/// leader so that `apply` stays deterministic.
// Commands are built once and moved into the log; boxing variants would only complicate callers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Applies `command` on behalf of an API key: the same change, and the lifecycle events it
    /// gives name the key.
    By {
        requestor: Requestor,
        /// Set when the request carried an `Idempotency-Key`: apply records the result under
        /// the tag and, for a tag it has already applied, returns the recorded result instead
        /// of applying `command` again (so a retry, or a re-proposal after an unsure write, does
        /// nothing twice).
        #[serde(default)]
        idempotency: Option<IdempotencyTag>,
        command: Box<Command>,
    },
    /// Applies `command` only if every listed object still has the given ETag
    /// ([`State::etag`](super::State::etag)); otherwise nothing changes and the error is
    /// [`ApplyErrorKind::PreconditionFailed`]. This is `If-Match`, checked atomically.
    IfMatch {
        expect: Vec<(ObjectKey, String)>,
        command: Box<Command>,
    },
    /// Adds a project and its `default` profile.
    CreateProject {
        project: Project,
    },
    /// Replaces a project's description and config; refused when a quota would fall below
    /// what the project already uses.
    UpdateProject {
        name: String,
        description: String,
        config: BTreeMap<String, String>,
    },
    /// Renames a project; only an empty one (nothing but its default profile).
    RenameProject {
        from: String,
        to: String,
    },
    /// Removes a project: not `default`, and only when nothing is left in it (instances,
    /// profiles other than `default`, aliases, images, API keys).
    DeleteProject {
        name: String,
    },
    /// Adds a profile (`profile.name` is scoped); its project must exist.
    CreateProfile {
        profile: Profile,
    },
    /// Replaces a profile's description and config; refused when the instances using it would
    /// exceed their project's quota or break its restrictions.
    UpdateProfile {
        name: String,
        description: String,
        config: BTreeMap<String, String>,
    },
    /// Renames a profile (scoped names, same project) and the references of the instances
    /// using it; not the `default` profile.
    RenameProfile {
        from: String,
        to: String,
    },
    /// Removes a profile: not `default`, not while an instance uses it.
    DeleteProfile {
        name: String,
    },
    /// Sets the cluster identity and the first admin key; fails if already bootstrapped.
    Bootstrap {
        name: String,
        ca_cert_pem: String,
        ca_key_pem: String,
        admin_key: ApiKey,
        now: String,
    },
    /// Changes the cluster-wide settings (validated by the API before); `None` removes a key.
    SetClusterConfig {
        changes: BTreeMap<String, Option<String>>,
    },
    /// Stores a join token under the hex sha256 of its secret.
    AddJoinToken {
        hash: String,
        record: JoinTokenRecord,
    },
    /// Consumes a valid, unexpired join token and adds the node.
    JoinNode {
        token_hash: String,
        node: Node,
        now: String,
    },
    SetNodeStatus {
        name: String,
        status: NodeStatus,
    },
    /// Updates a controller's record (each controller registers itself at start); a new record
    /// is only accepted while there is none (the first controller). Its id must not belong to
    /// another name. A removed controller cannot come back this way: it joins with a new token.
    RegisterController {
        record: ControllerRecord,
    },
    /// Consumes a valid, unexpired controller join token for `name` and records the new
    /// controller with the next free Raft id (answered as [`ApplyOk::ControllerId`]).
    JoinController {
        token_hash: String,
        name: String,
        peer_address: String,
        api_address: String,
        cert_fingerprint: String,
        now: String,
    },
    /// Forgets a controller (after it left the Raft membership).
    RemoveController {
        name: String,
    },
    /// Removes a node; refused while instances are placed on it.
    RemoveNode {
        name: String,
    },
    /// Changes the node's API-set config (`scheduler.instance`, label overrides): each key is
    /// set, or removed when `None`. Merged inside apply, so concurrent edits of different keys
    /// never lose each other.
    SetNodeConfig {
        name: String,
        changes: BTreeMap<String, Option<String>>,
    },
    /// Records what the node's agent reports about itself (only written when it changed).
    UpdateNodeCapacity {
        name: String,
        capacity: NodeCapacity,
    },
    /// Adds an instance, allocating its IPv4 address on its node's subnet; stores `operation` too.
    /// An empty `instance.node` lets the scheduler choose; a set one is a target it checks.
    CreateInstance {
        instance: Instance,
        operation: Option<Operation>,
    },
    /// Replaces an instance's config and description, and its profiles when given; checked
    /// against its project's quota and restrictions.
    UpdateInstance {
        name: String,
        config: BTreeMap<String, String>,
        description: String,
        #[serde(default)]
        profiles: Option<Vec<String>>,
        now: String,
    },
    /// Renames an instance, keeping its address.
    RenameInstance {
        from: String,
        to: String,
    },
    /// Sets what the instance should be doing; stamps `last_used_at` when `Running`.
    SetDesiredState {
        name: String,
        desired: DesiredState,
        now: String,
    },
    /// Gives the reconciler work for an instance and stores the operation that waits for it;
    /// refused while another action is pending. `desired`, when set, becomes the intent.
    SetInstanceAction {
        name: String,
        pending: PendingAction,
        desired: Option<DesiredState>,
        operation: Operation,
        now: String,
    },
    /// Ends the pending action `op` of an instance: records `observed` (when given) and ends
    /// the operation, in success when `error` is empty. A finished `Delete` removes the
    /// instance; a failed `Create` removes the half-made record. Stale `op` ids are ignored.
    FinishAction {
        name: String,
        op: String,
        observed: Option<Observed>,
        error: String,
        now: String,
    },
    /// Records an agent's report. `based_on` is the `updated_at` of the observation the
    /// report was compared with: if the recorded one changed since (an action recorded a newer
    /// one) or an action is pending, the report is stale and ignored, as when the instance is
    /// gone. An instance at rest that stopped by itself (powered off from inside) is also
    /// wanted stopped from then on.
    ObserveInstance {
        name: String,
        observed: Observed,
        based_on: String,
    },
    /// The switch of a move (`Action::Migrate` of operation `op`): the instance runs on `node`
    /// now and belongs to it. Ignored unless that move is still pending and goes to `node`.
    SwitchNode {
        name: String,
        op: String,
        node: String,
    },
    /// Marks a node evacuated (no new placements; `berth cluster evacuate`) or not.
    SetNodeEvacuated {
        name: String,
        evacuated: bool,
    },
    /// Records (or, with `None`, clears) why an instance is away from its evacuated node.
    SetEvacuation {
        name: String,
        evacuation: Option<super::model::Evacuation>,
    },
    /// Removes an instance and frees its address.
    DeleteInstance {
        name: String,
    },
    /// Inserts or updates an image; locations are merged.
    PutImage {
        image: Image,
    },
    /// Replaces an image's properties and public flag (`PUT /1.0/images/{fingerprint}`).
    UpdateImage {
        fingerprint: String,
        properties: BTreeMap<String, String>,
        public: bool,
    },
    /// Records that `node` now holds the image's bytes (`present`, after a pull from a peer) or
    /// no longer does (a cached copy expired). The last location cannot be removed this way.
    SetImageLocation {
        fingerprint: String,
        node: String,
        present: bool,
    },
    /// Removes an image and the aliases pointing at it.
    DeleteImage {
        fingerprint: String,
    },
    /// Inserts or updates an alias; its target must exist.
    /// Adds an alias; refused (409) when the project already has one of that name.
    CreateAlias {
        alias: Alias,
    },
    /// Takes `project` out of an image that other projects hold too, with that project's
    /// aliases of it; the image itself stays for the others.
    UnshareImage {
        fingerprint: String,
        project: String,
    },
    PutAlias {
        alias: Alias,
    },
    DeleteAlias {
        name: String,
    },
    /// Inserts or updates an operation.
    PutOperation {
        operation: Operation,
    },
    /// Removes operations; missing ids are ignored.
    DeleteOperations {
        ids: Vec<String>,
    },
    /// Records that something happened outside the replicated state (a file pushed or
    /// deleted, a command run in an instance), so that every controller publishes the
    /// lifecycle event `action` on `source` (the object's URL, with `?project=`) of `project`.
    /// Applying it checks nothing and changes nothing.
    Record {
        project: String,
        action: String,
        source: String,
        context: BTreeMap<String, String>,
    },
    /// Adds an API key; the id and the hash must be new.
    AddApiKey {
        key: ApiKey,
    },
    /// Removes an API key; refused when it is the last admin key working at `now` (RFC 3339,
    /// stamped by the leader; empty counts every admin key as working).
    DeleteApiKey {
        id: String,
        #[serde(default)]
        now: String,
    },
    /// Gives a key a new secret (its hash) and expiry; the old secret stops working.
    RotateApiKey {
        id: String,
        hash: String,
        expires_at: Option<String>,
    },
    /// Stores the HTTP answer of the request that used the idempotency key `key` (the record
    /// is made when missing); the first stored answer stays. A record of another request
    /// (`request_hash` differs) is refused as [`ApplyErrorKind::Unprocessable`].
    CompleteIdempotency {
        key: String,
        request_hash: String,
        status: u16,
        body: String,
        #[serde(default)]
        etag: Option<String>,
        now: String,
    },
    /// Drops the idempotency records created before `before` (RFC 3339).
    PruneIdempotency {
        before: String,
    },
}

impl Command {
    /// The idempotency tag of this command, if a `By` in it carries one.
    pub fn idempotency_tag(&self) -> Option<&IdempotencyTag> {
        match self {
            Command::By {
                idempotency: Some(tag),
                ..
            } => Some(tag),
            Command::By { command, .. } | Command::IfMatch { command, .. } => {
                command.idempotency_tag()
            }
            _ => None,
        }
    }
}

/// Marks one write of a request made with an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyTag {
    /// `<api key id>/<Idempotency-Key header>`: keys of different API keys never meet.
    pub key: String,
    /// sha256 (hex) of the request: method, path, query and body.
    pub request_hash: String,
    /// The position of this write among the request's writes (0, 1, ...): a handler that
    /// writes twice gets each write deduplicated on its own.
    pub seq: u32,
    /// When the request arrived (RFC 3339), for expiring old records.
    pub now: String,
}

/// What a node's agent reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapacity {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub storage_total_bytes: u64,
    pub storage_free_bytes: u64,
    pub architecture: String,
    pub labels: BTreeMap<String, String>,
}

/// What a successful `apply` returns.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApplyOk {
    Done,
    /// The instance as stored (with its node and allocated address).
    Instance(Instance),
    /// The Raft id given to a joining controller.
    ControllerId(u64),
}

/// Why a command was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyErrorKind {
    NotFound,
    Conflict,
    Invalid,
    /// A quota or a project restriction forbids it (403).
    Forbidden,
    /// An `If-Match` ETag is stale (412).
    PreconditionFailed,
    /// Well-formed but not acceptable: an idempotency key reused for another request (422).
    Unprocessable,
}

/// A rejected command; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    pub kind: ApplyErrorKind,
    /// One lowercase sentence without a final period.
    pub message: String,
}

impl ApplyError {
    pub fn not_found(message: impl Into<String>) -> Self {
        ApplyError {
            kind: ApplyErrorKind::NotFound,
            message: message.into(),
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApplyError {
            kind: ApplyErrorKind::Conflict,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApplyError {
            kind: ApplyErrorKind::Invalid,
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApplyError {
            kind: ApplyErrorKind::Forbidden,
            message: message.into(),
        }
    }

    pub fn precondition_failed(message: impl Into<String>) -> Self {
        ApplyError {
            kind: ApplyErrorKind::PreconditionFailed,
            message: message.into(),
        }
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        ApplyError {
            kind: ApplyErrorKind::Unprocessable,
            message: message.into(),
        }
    }
}

/// The outcome of applying one command.
pub type ApplyResult = Result<ApplyOk, ApplyError>;
