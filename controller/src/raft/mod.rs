//! Raft: openraft's type config ([`TypeConfig`]), the [`ControlPlane`] handle the rest of the
//! controller uses, and the gRPC network ([`Network`]) and service ([`RaftService`]) between
//! controllers.

mod codec;
mod control;
mod network;
mod service;
mod types;

pub use codec::MAX_MESSAGE_BYTES;
pub use control::{
    APPLY_WAIT, COMMIT_TIMEOUT, ControlPlane, ELECTION_TIMEOUT_MAX, ELECTION_TIMEOUT_MIN,
    HEARTBEAT_INTERVAL, LEADER_WAIT, PeerTls, RaftSetupError, ReadError, ServeError, Unavailable,
    WriteError,
};
pub(crate) use control::{Attempt, LEADER_UNAVAILABLE, LEADER_UNSURE};
pub use network::{
    InjectedFault, Network, NetworkFaults, PeerClient, PeerConnectError, PeerHealth,
};
pub use service::RaftService;
pub use types::{
    Entry, LogId, NodeId, Raft, RaftPeer, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
    Vote,
};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
