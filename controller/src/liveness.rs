//! Node liveness: agents heartbeat to the leader, which keeps the time of each node's last
//! heartbeat in memory. Only transitions (online, offline after [`Liveness::threshold`]) and
//! changed capacity go through Raft.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_proto::v1;

use crate::api::SharedState;

/// How often agents are asked to heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// Default time without a heartbeat after which a node is marked offline.
pub const DEFAULT_OFFLINE_THRESHOLD: Duration = Duration::from_secs(10);

/// Last heartbeat per node, in the leader's memory.
pub struct Liveness {
    threshold: Duration,
    last_seen: Mutex<HashMap<String, Instant>>,
}

impl Liveness {
    /// Liveness with the given offline threshold.
    pub fn new(threshold: Duration) -> Liveness {
        Liveness {
            threshold,
            last_seen: Mutex::new(HashMap::new()),
        }
    }

    /// The time without heartbeats after which a node is offline.
    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.last_seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat from `node` now.
    pub fn seen(&self, node: &str) {
        self.lock().insert(node.to_string(), Instant::now());
    }

    /// When `node` last heartbeat, as far as this controller knows.
    pub fn last_seen(&self, node: &str) -> Option<Instant> {
        self.lock().get(node).copied()
    }
}

/// Handles one heartbeat from the agent of `node` (the name comes from its certificate).
pub async fn heartbeat(
    state: &SharedState,
    node: &str,
    _req: v1::HeartbeatRequest,
) -> v1::HeartbeatReply {
    let controllers: Vec<String> = state.cp.read_local(|s| {
        s.controllers
            .values()
            .map(|c| c.peer_address.clone())
            .collect()
    });
    let leader = state.cp.leader().map(|(_, addr)| addr).unwrap_or_default();
    if !state.cp.is_leader() {
        return v1::HeartbeatReply {
            accepted: false,
            leader,
            controllers,
            interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
        };
    }
    state.liveness.seen(node);
    v1::HeartbeatReply {
        accepted: true,
        leader,
        controllers,
        interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
    }
}
