//! berthd: Berth's controller. It keeps the cluster's intended state in a Raft-replicated state
//! machine (openraft, persisted in sled), serves the REST API and drives node agents.
//!
//! Layout:
//! - [`state`]: the pure core: the model, the commands, and the deterministic `apply`,
//! - [`store`]: the sled-backed Raft log and state machine (the only module that knows sled),
//! - [`raft`]: openraft's type config, the node, and the Raft gRPC network and service,
//! - [`api`]: the REST API (one file per resource), auth, operations,
//! - [`agents`]: gRPC clients to node agents,
//! - [`reconcile`]: leader-only loops that drive agents towards the intended state,
//! - [`schedule`]: scheduled snapshots and snapshot expiry (cron, run by the leader),
//! - [`tls`]: the cluster CA and certificates.

pub mod agents;
pub mod api;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod events;
pub mod image_cache;
pub mod join;
pub mod liveness;
pub mod metrics;
pub mod peer;
pub mod raft;
pub mod reconcile;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod store;
pub mod tls;
