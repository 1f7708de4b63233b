//! The pure core: the replicated model, the commands that change it, and the deterministic
//! [`State::apply`]. No clock, no randomness, no I/O.

mod apply;
mod command;
mod keys;
mod model;
mod tenancy;
mod time;

pub use command::{ApplyError, ApplyErrorKind, ApplyOk, ApplyResult, Command, NodeCapacity};
pub use command::{IdempotencyTag, Requestor};
pub use keys::{ObjectDecodeError, ObjectKey};
pub use model::{
    Action, Alias, ApiKey, ClusterInfo, ControllerRecord, DEFAULT_PROFILE, DEFAULT_PROJECT,
    DesiredState, Evacuation, IdempotencyRecord, Image, Instance, JoinKind, JoinTokenRecord,
    MIN_FINGERPRINT_PREFIX, Node, NodeStatus, Observed, PendingAction, Profile, Project, Role,
    Snapshot, State, StoredResponse, alias_key, scoped_name, split_scoped_name,
};
pub use tenancy::{Change, QUOTAS, Usage, project_limit, project_restricted};
pub use time::Rfc3339;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tenancy_tests;
