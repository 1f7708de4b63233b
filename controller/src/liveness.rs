//! Node liveness: agents heartbeat to the leader, which keeps the time of each node's last
//! heartbeat in memory. Only transitions (online, offline after [`Liveness::threshold`]),
//! changed capacity and changed instance states go through Raft.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_proto::api::InstanceStatusCode;
use berth_proto::v1;
use tracing::{info, warn};

use crate::api::SharedState;
use crate::api::instances::observed_from;
use crate::clock;
use crate::state::{Command, Node, NodeCapacity, NodeStatus};

/// How often agents are asked to heartbeat (more often when the offline threshold is short:
/// at least four beats fit in it).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// Most labels a node may report.
const MAX_LABELS: usize = 64;

/// Longest architecture name and instance error message kept from a report.
const MAX_ARCH_LEN: usize = 32;
const MAX_ERROR_LEN: usize = 512;

/// Default time without a heartbeat after which a node is marked offline.
pub const DEFAULT_OFFLINE_THRESHOLD: Duration = Duration::from_secs(10);

/// A recorded observation newer than this is not overwritten by a heartbeat: the report may
/// have been made before the action that recorded it finished.
const FRESH_OBSERVATION_SECS: i64 = 3;

/// Storage free space is written again when it moved by more than this share of the total.
const STORAGE_FREE_SLACK: u64 = 100; // 1 %

/// Last heartbeat per node, in the leader's memory.
pub struct Liveness {
    threshold: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    last_seen: HashMap<String, Instant>,
    /// Nodes that have not heartbeat to this leader are judged from here.
    grace_from: Instant,
    /// Last heartbeat sequence per node, to ignore reordered reports.
    sequence: HashMap<String, u64>,
}

impl Liveness {
    /// Liveness with the given offline threshold.
    pub fn new(threshold: Duration) -> Liveness {
        Liveness {
            threshold,
            inner: Mutex::new(Inner {
                last_seen: HashMap::new(),
                grace_from: Instant::now(),
                sequence: HashMap::new(),
            }),
        }
    }

    /// The time without heartbeats after which a node is offline.
    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat from `node` now; false if `sequence` is older than one already
    /// seen from the same agent process (a reordered report, to be ignored).
    pub fn seen(&self, node: &str, sequence: u64) -> bool {
        let mut inner = self.lock();
        inner.last_seen.insert(node.to_string(), Instant::now());
        let last = inner.sequence.entry(node.to_string()).or_insert(0);
        // Each agent awaits one heartbeat before the next, so only a retried or slightly
        // delayed report can come late; a large step back is a restarted agent.
        let fresh = sequence > *last || *last - sequence >= 10 || sequence == 0;
        if fresh {
            *last = sequence;
        }
        fresh
    }

    /// How long `node` has been silent, as far as this leader knows: since its last heartbeat,
    /// or since this controller started leading when it has not heard from it.
    pub fn silent_for(&self, node: &str) -> Duration {
        let inner = self.lock();
        let since = match inner.last_seen.get(node) {
            Some(t) if *t > inner.grace_from => *t,
            _ => inner.grace_from,
        };
        since.elapsed()
    }

    /// Called when this controller becomes the leader: silence is counted from now.
    pub fn start_grace(&self) {
        self.lock().grace_from = Instant::now();
    }

    /// Called when this controller stops leading.
    pub fn forget(&self) {
        let mut inner = self.lock();
        inner.last_seen.clear();
        inner.sequence.clear();
    }
}

fn reply(state: &SharedState, accepted: bool) -> v1::HeartbeatReply {
    let controllers: Vec<String> = state.cp.read_local(|s| {
        s.controllers
            .values()
            .map(|c| c.peer_address.clone())
            .collect()
    });
    v1::HeartbeatReply {
        accepted,
        leader: state.cp.leader().map(|(_, addr)| addr).unwrap_or_default(),
        controllers,
        interval_ms: HEARTBEAT_INTERVAL
            .min(state.liveness.threshold() / 4)
            .as_millis() as u32,
    }
}

/// The capacity an agent reported, as the state stores it. What comes from the network is
/// checked before it reaches Raft: labels that are not valid are dropped (with a warning), at
/// most [`MAX_LABELS`] are kept, and an architecture name that is not one is left out.
fn capacity(node: &str, c: &v1::NodeCapacity) -> NodeCapacity {
    let mut labels = std::collections::BTreeMap::new();
    for (k, v) in &c.labels {
        match berth_proto::api::config::validate_label(k, v) {
            Ok(()) if labels.len() < MAX_LABELS => {
                labels.insert(k.clone(), v.clone());
            }
            Ok(()) => warn!(%node, label = %k, "too many labels; dropping the rest"),
            Err(e) => warn!(%node, error = %e.0, "dropping a label the agent reported"),
        }
    }
    let arch_ok = c.architecture.len() <= MAX_ARCH_LEN
        && c.architecture
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    NodeCapacity {
        cpus: c.cpus,
        memory_bytes: c.memory_bytes,
        storage_total_bytes: c.storage_total_bytes,
        storage_free_bytes: c.storage_free_bytes.min(c.storage_total_bytes),
        architecture: if arch_ok {
            c.architecture.clone()
        } else {
            String::new()
        },
        labels,
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncated(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Whether the reported capacity differs enough from the stored one to be written.
fn capacity_changed(node: &Node, c: &NodeCapacity) -> bool {
    let slack = c.storage_total_bytes / STORAGE_FREE_SLACK;
    node.cpus != c.cpus
        || node.memory_bytes != c.memory_bytes
        || node.storage_total_bytes != c.storage_total_bytes
        || node.architecture != c.architecture
        || node.labels != c.labels
        || node.storage_free_bytes.abs_diff(c.storage_free_bytes) > slack
}

/// Handles one heartbeat from the agent of `node` (the name comes from its certificate).
/// Only the leader accepts heartbeats; a follower answers with the leader's address.
pub async fn heartbeat(
    state: &SharedState,
    node: &str,
    req: v1::HeartbeatRequest,
) -> v1::HeartbeatReply {
    // A leader cut off from the majority still believes it leads until it hears of a newer
    // term; it must not take heartbeats (nor judge liveness) then.
    if !state.cp.leads_with_quorum() {
        return reply(state, false);
    }
    if !state.liveness.seen(node, req.sequence) {
        return reply(state, true);
    }
    let found = state.cp.read_local(|s| {
        s.nodes.get(node).cloned().map(|n| {
            let instances: Vec<_> = s
                .instances
                .values()
                .filter(|i| i.node == node)
                .cloned()
                .collect();
            (n, instances)
        })
    });
    let Some((record, instances)) = found else {
        warn!(%node, "heartbeat from a node that is not a member");
        return reply(state, true);
    };
    let mut commands = Vec::new();
    if record.status != NodeStatus::Online {
        info!(%node, "heartbeat received; node is online");
        commands.push(Command::SetNodeStatus {
            name: node.to_string(),
            status: NodeStatus::Online,
        });
    }
    if let Some(c) = &req.capacity {
        let c = capacity(node, c);
        if capacity_changed(&record, &c) {
            commands.push(Command::UpdateNodeCapacity {
                name: node.to_string(),
                capacity: c,
            });
        }
    }
    // While the agent is still finding its instances after a start, "stopped" means "not found
    // yet", not "powered off": only its capacity and liveness count.
    if req.recovering {
        for cmd in commands {
            if let Err(e) = state.cp.write(cmd).await {
                warn!(%node, error = %e, "could not record what the heartbeat reported");
                break;
            }
        }
        return reply(state, true);
    }
    let reported: BTreeMap<&str, &v1::InstanceStatus> =
        req.instances.iter().map(|s| (s.name.as_str(), s)).collect();
    let fresh_after = clock::format_unix(unix_now() - FRESH_OBSERVATION_SECS);
    for inst in &instances {
        // Instances with work in flight are the reconciler's to record.
        if inst.pending.is_some()
            || inst.observed.status == InstanceStatusCode::Pending
            || inst.observed.updated_at >= fresh_after
        {
            continue;
        }
        let observed = match reported.get(inst.name.as_str()) {
            Some(s) => {
                let mut o = observed_from(s);
                o.error = truncated(&o.error, MAX_ERROR_LEN);
                o
            }
            None => crate::state::Observed {
                status: InstanceStatusCode::Error,
                pid: 0,
                updated_at: clock::now(),
                error: format!("the instance is missing on node {node}"),
            },
        };
        if observed.status != inst.observed.status
            || observed.pid != inst.observed.pid
            || observed.error != inst.observed.error
        {
            info!(instance = %inst.name, %node, status = ?observed.status, "observed a change");
            commands.push(Command::ObserveInstance {
                name: inst.name.clone(),
                observed,
                based_on: inst.observed.updated_at.clone(),
            });
        }
    }
    for cmd in commands {
        if let Err(e) = state.cp.write(cmd).await {
            warn!(%node, error = %e, "could not record what the heartbeat reported");
            break;
        }
    }
    reply(state, true)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_from_grace_then_heartbeats() {
        let l = Liveness::new(Duration::from_secs(10));
        assert!(l.silent_for("n1") < Duration::from_secs(1));
        assert!(l.seen("n1", 1));
        assert!(!l.seen("n1", 1), "a repeated sequence is stale");
        assert!(l.seen("n1", 2));
        assert!(l.seen("n1", 0), "a restarted agent may start from zero");
        assert!(l.silent_for("n1") < Duration::from_secs(1));
        l.forget();
        assert!(l.seen("n1", 5));
    }

    #[test]
    fn reported_capacity_is_checked() {
        let mut c = v1::NodeCapacity {
            cpus: 4,
            storage_total_bytes: 100,
            storage_free_bytes: 500,
            architecture: "x86_64".into(),
            ..Default::default()
        };
        c.labels.insert("rack".into(), "r1".into());
        c.labels.insert("bad key!".into(), "x".into());
        let got = capacity("n1", &c);
        assert_eq!(got.labels.len(), 1);
        assert_eq!(got.labels["rack"], "r1");
        assert_eq!(got.storage_free_bytes, 100, "free is never above total");
        assert_eq!(got.architecture, "x86_64");
        c.architecture = "x".repeat(100);
        assert_eq!(capacity("n1", &c).architecture, "");
        assert_eq!(truncated("héllo", 2), "h...");
        assert_eq!(truncated("ok", 10), "ok");
    }

    #[test]
    fn capacity_change_ignores_small_free_space_moves() {
        let node = Node {
            cpus: 2,
            memory_bytes: 1 << 30,
            storage_total_bytes: 10_000,
            storage_free_bytes: 5_000,
            architecture: "x86_64".into(),
            ..Default::default()
        };
        let mut c = NodeCapacity {
            cpus: 2,
            memory_bytes: 1 << 30,
            storage_total_bytes: 10_000,
            storage_free_bytes: 5_050,
            architecture: "x86_64".into(),
            labels: Default::default(),
        };
        assert!(!capacity_changed(&node, &c));
        c.storage_free_bytes = 5_200;
        assert!(capacity_changed(&node, &c));
        c.storage_free_bytes = 5_000;
        c.labels.insert("rack".into(), "r1".into());
        assert!(capacity_changed(&node, &c));
    }
}
