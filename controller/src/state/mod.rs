//! The pure core: the replicated model, the commands that change it, and the deterministic
//! [`State::apply`]. No clock, no randomness, no I/O.

mod apply;
mod command;
mod keys;
mod model;
mod time;

pub use command::{ApplyError, ApplyErrorKind, ApplyOk, ApplyResult, Command, NodeCapacity};
pub use keys::{ObjectDecodeError, ObjectKey};
pub use model::{
    Action, Alias, ApiKey, ClusterInfo, ControllerRecord, DesiredState, Image, Instance, JoinKind,
    JoinTokenRecord, MIN_FINGERPRINT_PREFIX, Node, NodeStatus, Observed, PendingAction, Role,
    State,
};
pub use time::Rfc3339;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
