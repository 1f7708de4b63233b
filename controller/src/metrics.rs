//! Metrics in the Prometheus text format (0.0.4), written by hand: API request counts and
//! latencies kept per controller, Raft figures of this controller, and cluster-wide figures
//! read from the replicated state (so any controller answers for the whole cluster).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use berth_proto::api::InstanceStatusCode;

use crate::api::SharedState;
use crate::raft::{NodeId, Raft, RaftPeer};
use crate::state::NodeStatus;

/// Upper bounds (seconds) of the API latency histogram buckets; `+Inf` follows.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Route label of requests that matched no route (so that unknown paths cannot grow the
/// number of series).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// A latency histogram with [`LATENCY_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, seconds: f64) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

/// What the API has answered, by (method, route template, status) and by (method, route).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApiFigures {
    pub requests: BTreeMap<(String, String, u16), u64>,
    pub latency: BTreeMap<(String, String), Histogram>,
}

/// Request counts and latencies of this controller's API, and the leader changes it has seen.
#[derive(Default)]
pub struct ApiMetrics {
    figures: Mutex<ApiFigures>,
    leader_changes: Arc<AtomicU64>,
    watching: AtomicBool,
}

impl ApiMetrics {
    /// Records one answered request.
    pub fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut f = self
            .figures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *f.requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        f.latency
            .entry((method.to_string(), route.to_string()))
            .or_default()
            .observe(seconds);
    }

    /// A copy of the request figures.
    pub fn api_figures(&self) -> ApiFigures {
        self.figures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Leader changes this controller has seen since it started watching.
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.load(Ordering::Relaxed)
    }

    /// Starts (once; later calls do nothing) a task that counts leader changes in `raft`'s
    /// metrics: every time the known leader becomes a different, known node. The daemon
    /// calls it at start; the request middleware calls it too, as a fallback. Must run inside
    /// a tokio runtime. The task ends when Raft shuts down.
    pub fn watch_raft(&self, raft: &Raft) {
        if self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut rx = raft.metrics();
        let counter = self.leader_changes.clone();
        tokio::spawn(async move {
            let mut last = rx.borrow_and_update().current_leader;
            if last.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            while rx.changed().await.is_ok() {
                let now = rx.borrow_and_update().current_leader;
                if now.is_some() && now != last {
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(leader = ?now, "raft leader changed");
                }
                if now.is_some() {
                    last = now;
                }
            }
        });
    }
}

/// Keeps method labels to a known set.
fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Middleware that records each request in [`ApiMetrics`], labelled with its route template
/// (`/1.0/instances/{name}`), never the raw path.
pub async fn track_requests(
    State(state): State<SharedState>,
    req: Request,
    next: Next,
) -> Response {
    state.metrics.watch_raft(state.cp.raft());
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_string());
    let started = Instant::now();
    let resp = next.run(req).await;
    state.metrics.record(
        method,
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// This controller's Raft figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftFigures {
    pub id: u64,
    /// "Leader", "Follower", "Candidate", "Learner" or "Shutdown".
    pub state: String,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// Known only on the leader: the highest index a quorum of voters has.
    pub commit_index: Option<u64>,
    pub leader_id: Option<u64>,
    pub is_leader: bool,
    pub millis_since_quorum_ack: Option<u64>,
    pub leader_changes: u64,
    pub voters: u64,
    pub learners: u64,
}

impl RaftFigures {
    /// Reads the figures from openraft's metrics.
    pub fn from_metrics(m: &openraft::RaftMetrics<NodeId, RaftPeer>, leader_changes: u64) -> Self {
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners = membership.learner_ids().count() as u64;
        let is_leader = m.state == openraft::ServerState::Leader && m.current_leader == Some(m.id);
        let commit_index = if is_leader {
            let own = m.last_log_index.unwrap_or(0);
            let mut matched: Vec<u64> = voters
                .iter()
                .map(|v| {
                    if *v == m.id {
                        own
                    } else {
                        m.replication
                            .as_ref()
                            .and_then(|r| r.get(v).cloned().flatten())
                            .map(|l| l.index)
                            .unwrap_or(0)
                    }
                })
                .collect();
            quorum_index(&mut matched)
        } else {
            None
        };
        RaftFigures {
            id: m.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            commit_index,
            leader_id: m.current_leader,
            is_leader,
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            leader_changes,
            voters: voters.len() as u64,
            learners,
        }
    }
}

/// The highest index held by a majority of `matched` (one entry per voter).
pub fn quorum_index(matched: &mut [u64]) -> Option<u64> {
    if matched.is_empty() {
        return None;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    Some(matched[matched.len() / 2])
}

/// One node's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFigures {
    pub status: String,
    pub instances: u64,
    pub cpus_total: u64,
    pub cpus_allocated: u64,
    pub memory_total_bytes: u64,
    pub memory_allocated_bytes: u64,
    pub storage_total_bytes: u64,
    pub storage_free_bytes: u64,
}

/// Cluster-wide figures from the replicated state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterFigures {
    pub controllers: u64,
    pub nodes: BTreeMap<String, NodeFigures>,
    /// Instances by status (an instance on an offline node counts as "Unknown").
    pub instances_by_status: BTreeMap<String, u64>,
    pub operations_by_status: BTreeMap<String, u64>,
    pub images: u64,
}

impl ClusterFigures {
    /// Counts what `state` holds.
    pub fn from_state(state: &crate::state::State) -> Self {
        let usage = crate::scheduler::node_usage(state);
        let mut f = ClusterFigures {
            controllers: state.controllers.len() as u64,
            images: state.images.len() as u64,
            ..Default::default()
        };
        for n in state.nodes.values() {
            let u = usage.get(&n.name).cloned().unwrap_or_default();
            f.nodes.insert(
                n.name.clone(),
                NodeFigures {
                    status: format!("{:?}", n.status),
                    instances: u64::from(u.instances),
                    cpus_total: u64::from(n.cpus),
                    cpus_allocated: u.cpus,
                    memory_total_bytes: n.memory_bytes,
                    memory_allocated_bytes: u.memory_bytes,
                    storage_total_bytes: n.storage_total_bytes,
                    storage_free_bytes: n.storage_free_bytes,
                },
            );
        }
        for i in state.instances.values() {
            *f.instances_by_status
                .entry(instance_status(state, i).as_str().to_string())
                .or_default() += 1;
        }
        for op in state.operations.values() {
            *f.operations_by_status
                .entry(format!("{:?}", op.status))
                .or_default() += 1;
        }
        f
    }
}

/// Every instance status, as `berth_instances` labels them: a status no instance has is
/// reported as 0, so that its series does not vanish (and alerts on it do not go stale).
const INSTANCE_STATUSES: [&str; 7] = [
    "Stopped", "Running", "Starting", "Stopping", "Error", "Pending", "Unknown",
];

/// Every operation status, as `berth_operations` labels them (their `Debug` names).
const OPERATION_STATUSES: [&str; 5] = ["Pending", "Running", "Success", "Failure", "Cancelled"];

/// `counts` with every status of `all` present (0 when absent).
fn every_status(counts: &BTreeMap<String, u64>, all: &[&str]) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = all.iter().map(|s| (s.to_string(), 0)).collect();
    out.extend(counts.iter().map(|(k, v)| (k.clone(), *v)));
    out
}

/// A per-node gauge: name, help text, and how to read it.
type NodeGauge = (&'static str, &'static str, fn(&NodeFigures) -> u64);

/// Escapes a label value (backslash, double quote, newline).
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample; `labels` are already formatted (`a="b",c="d"`), possibly empty.
fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A float as Prometheus writes it.
fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Renders every figure in the Prometheus text format 0.0.4. Per-controller series (Raft, API)
/// carry `controller="<name>"`; cluster-wide series do not, so scraping any one controller is
/// enough. `queue_depth` is the number of instance actions waiting for the reconciler (from
/// the replicated state, so cluster-wide), when known.
pub fn render(
    controller: &str,
    cluster: &ClusterFigures,
    raft: &RaftFigures,
    api: &ApiFigures,
    queue_depth: Option<u64>,
) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let c = format!("controller=\"{}\"", escape_label(controller));

    family(
        &mut out,
        "berth_controllers",
        "gauge",
        "Controllers in the cluster.",
    );
    sample(&mut out, "berth_controllers", "", cluster.controllers);

    family(
        &mut out,
        "berth_nodes",
        "gauge",
        "Nodes (agents) by status.",
    );
    let mut by_status: BTreeMap<&str, u64> = BTreeMap::from([("Online", 0), ("Offline", 0)]);
    for n in cluster.nodes.values() {
        *by_status.entry(n.status.as_str()).or_default() += 1;
    }
    for (s, n) in &by_status {
        sample(
            &mut out,
            "berth_nodes",
            &format!("status=\"{}\"", escape_label(s)),
            n,
        );
    }

    family(&mut out, "berth_instances", "gauge", "Instances by status.");
    for (s, n) in &every_status(&cluster.instances_by_status, &INSTANCE_STATUSES) {
        sample(
            &mut out,
            "berth_instances",
            &format!("status=\"{}\"", escape_label(s)),
            n,
        );
    }

    let per_node: [NodeGauge; 7] = [
        (
            "berth_node_instances",
            "Instances placed on the node.",
            |n| n.instances,
        ),
        ("berth_node_cpus", "CPUs the node has.", |n| n.cpus_total),
        (
            "berth_node_cpus_allocated",
            "CPUs claimed by the limits.cpu of the node's instances (as the scheduler counts them).",
            |n| n.cpus_allocated,
        ),
        ("berth_node_memory_bytes", "Memory the node has.", |n| {
            n.memory_total_bytes
        }),
        (
            "berth_node_memory_allocated_bytes",
            "Memory claimed by the limits.memory of the node's instances (as the scheduler counts it).",
            |n| n.memory_allocated_bytes,
        ),
        (
            "berth_node_storage_bytes",
            "Size of the node's storage pool.",
            |n| n.storage_total_bytes,
        ),
        (
            "berth_node_storage_free_bytes",
            "Free space in the node's storage pool, as last reported.",
            |n| n.storage_free_bytes,
        ),
    ];
    for (name, help, get) in per_node {
        family(&mut out, name, "gauge", help);
        for (node, f) in &cluster.nodes {
            sample(
                &mut out,
                name,
                &format!("node=\"{}\"", escape_label(node)),
                get(f),
            );
        }
    }
    family(
        &mut out,
        "berth_node_online",
        "gauge",
        "1 if the node is online, else 0.",
    );
    for (node, f) in &cluster.nodes {
        sample(
            &mut out,
            "berth_node_online",
            &format!("node=\"{}\"", escape_label(node)),
            u8::from(f.status == "Online"),
        );
    }

    family(
        &mut out,
        "berth_operations",
        "gauge",
        "Operations by status.",
    );
    for (s, n) in &every_status(&cluster.operations_by_status, &OPERATION_STATUSES) {
        sample(
            &mut out,
            "berth_operations",
            &format!("status=\"{}\"", escape_label(s)),
            n,
        );
    }

    family(&mut out, "berth_images", "gauge", "Images in the cluster.");
    sample(&mut out, "berth_images", "", cluster.images);

    // Raft, as this controller sees it.
    family(
        &mut out,
        "berth_raft_id",
        "gauge",
        "This controller's Raft id.",
    );
    sample(&mut out, "berth_raft_id", &c, raft.id);
    family(
        &mut out,
        "berth_raft_state",
        "gauge",
        "1 for this controller's Raft state (Leader, Follower, Candidate, Learner, Shutdown).",
    );
    sample(
        &mut out,
        "berth_raft_state",
        &format!("{c},state=\"{}\"", escape_label(&raft.state)),
        1,
    );
    family(&mut out, "berth_raft_term", "gauge", "Current Raft term.");
    sample(&mut out, "berth_raft_term", &c, raft.term);
    family(
        &mut out,
        "berth_raft_last_log_index",
        "gauge",
        "Index of the last entry in this controller's Raft log.",
    );
    sample(
        &mut out,
        "berth_raft_last_log_index",
        &c,
        raft.last_log_index,
    );
    family(
        &mut out,
        "berth_raft_applied_index",
        "gauge",
        "Index of the last entry applied to this controller's state.",
    );
    sample(&mut out, "berth_raft_applied_index", &c, raft.applied_index);
    if let Some(ci) = raft.commit_index {
        family(
            &mut out,
            "berth_raft_commit_index",
            "gauge",
            "Highest log index held by a quorum of voters (reported by the leader only).",
        );
        sample(&mut out, "berth_raft_commit_index", &c, ci);
    }
    family(
        &mut out,
        "berth_raft_leader_id",
        "gauge",
        "Raft id of the leader this controller knows (0 when it knows none).",
    );
    sample(
        &mut out,
        "berth_raft_leader_id",
        &c,
        raft.leader_id.unwrap_or(0),
    );
    family(
        &mut out,
        "berth_raft_is_leader",
        "gauge",
        "1 if this controller is the leader.",
    );
    sample(
        &mut out,
        "berth_raft_is_leader",
        &c,
        u8::from(raft.is_leader),
    );
    family(
        &mut out,
        "berth_raft_leader_changes_total",
        "counter",
        "Leader changes this controller has seen since it started.",
    );
    sample(
        &mut out,
        "berth_raft_leader_changes_total",
        &c,
        raft.leader_changes,
    );
    if let Some(ms) = raft.millis_since_quorum_ack {
        family(
            &mut out,
            "berth_raft_millis_since_quorum_ack",
            "gauge",
            "Milliseconds since a quorum last acknowledged the leader (leader only).",
        );
        sample(&mut out, "berth_raft_millis_since_quorum_ack", &c, ms);
    }
    family(
        &mut out,
        "berth_raft_voters",
        "gauge",
        "Voters in the Raft membership.",
    );
    sample(&mut out, "berth_raft_voters", &c, raft.voters);
    family(
        &mut out,
        "berth_raft_learners",
        "gauge",
        "Learners in the Raft membership.",
    );
    sample(&mut out, "berth_raft_learners", &c, raft.learners);

    if let Some(depth) = queue_depth {
        family(
            &mut out,
            "berth_reconcile_queue_depth",
            "gauge",
            "Instance actions (start, stop, delete, ...) the leader's reconciler has still to finish.",
        );
        sample(&mut out, "berth_reconcile_queue_depth", "", depth);
    }

    // The API of this controller.
    family(
        &mut out,
        "berth_api_requests_total",
        "counter",
        "API requests answered by this controller, by method, route template and status.",
    );
    for ((method, route, status), n) in &api.requests {
        sample(
            &mut out,
            "berth_api_requests_total",
            &format!(
                "{c},method=\"{}\",route=\"{}\",status=\"{status}\"",
                escape_label(method),
                escape_label(route)
            ),
            n,
        );
    }
    family(
        &mut out,
        "berth_api_request_duration_seconds",
        "histogram",
        "Time to answer API requests (until the response head), by method and route template.",
    );
    for ((method, route), h) in &api.latency {
        let labels = format!(
            "{c},method=\"{}\",route=\"{}\"",
            escape_label(method),
            escape_label(route)
        );
        let mut cumulative = 0;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            let le = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            sample(
                &mut out,
                "berth_api_request_duration_seconds_bucket",
                &format!("{labels},le=\"{}\"", float(le)),
                cumulative,
            );
        }
        sample(
            &mut out,
            "berth_api_request_duration_seconds_sum",
            &labels,
            float(h.sum_seconds),
        );
        sample(
            &mut out,
            "berth_api_request_duration_seconds_count",
            &labels,
            h.count,
        );
    }
    out
}

/// One project's figures: its instances by status and its use against its quotas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectFigures {
    pub project: String,
    /// Instances by status (an instance on an offline node counts as "Unknown").
    pub instances_by_status: BTreeMap<String, u64>,
    /// Use by resource (`instances`, `cpu`, `memory`, `disk`, `processes`).
    pub usage: BTreeMap<String, u64>,
    /// Quotas by resource; a resource without a quota is absent.
    pub limits: BTreeMap<String, u64>,
}

impl ProjectFigures {
    /// Counts what project `project` holds in `state`.
    pub fn from_state(state: &crate::state::State, project: &str) -> Self {
        let mut f = ProjectFigures {
            project: project.to_string(),
            ..Default::default()
        };
        for i in state.instances.values().filter(|i| i.project == project) {
            *f.instances_by_status
                .entry(instance_status(state, i).as_str().to_string())
                .or_default() += 1;
        }
        let usage = state.project_usage(project);
        let record = state.projects.get(project);
        for q in crate::state::QUOTAS {
            let resource = q.strip_prefix("limits.").unwrap_or(q).to_string();
            f.usage.insert(resource.clone(), usage.get(q));
            if let Some(limit) = crate::state::project_limit(record, q) {
                f.limits.insert(resource, limit);
            }
        }
        f
    }

    /// The figures of every project of `state` (`default` included).
    pub fn all(state: &crate::state::State) -> Vec<Self> {
        let mut names: Vec<&str> = state.projects.keys().map(String::as_str).collect();
        if !state.projects.contains_key(crate::state::DEFAULT_PROJECT) {
            names.insert(0, crate::state::DEFAULT_PROJECT);
        }
        names
            .into_iter()
            .map(|p| Self::from_state(state, p))
            .collect()
    }
}

/// An instance's status for the figures: "Unknown" while its node is offline.
fn instance_status(state: &crate::state::State, i: &crate::state::Instance) -> InstanceStatusCode {
    let offline = state
        .nodes
        .get(&i.node)
        .is_some_and(|n| n.status != NodeStatus::Online);
    if offline {
        InstanceStatusCode::Unknown
    } else {
        i.observed.status
    }
}

/// Renders per-project figures in the Prometheus text format: `berth_project_instances`
/// (by status), `berth_project_usage` and `berth_project_limit` (by resource; no sample for
/// a resource without quota). What a project-scoped key sees of `/1.0/metrics` is this for
/// its own project alone.
pub fn render_projects(projects: &[ProjectFigures]) -> String {
    let mut out = String::with_capacity(1024 + 512 * projects.len());
    family(
        &mut out,
        "berth_project_instances",
        "gauge",
        "Instances of the project by status.",
    );
    for p in projects {
        let project = escape_label(&p.project);
        for (s, n) in &every_status(&p.instances_by_status, &INSTANCE_STATUSES) {
            sample(
                &mut out,
                "berth_project_instances",
                &format!("project=\"{project}\",status=\"{}\"", escape_label(s)),
                n,
            );
        }
    }
    family(
        &mut out,
        "berth_project_usage",
        "gauge",
        "What the project's instances use, by resource (a count, CPUs or bytes).",
    );
    for p in projects {
        let project = escape_label(&p.project);
        for (r, n) in &p.usage {
            sample(
                &mut out,
                "berth_project_usage",
                &format!("project=\"{project}\",resource=\"{}\"", escape_label(r)),
                n,
            );
        }
    }
    family(
        &mut out,
        "berth_project_limit",
        "gauge",
        "The project's quota by resource (absent: no quota).",
    );
    for p in projects {
        let project = escape_label(&p.project);
        for (r, n) in &p.limits {
            sample(
                &mut out,
                "berth_project_limit",
                &format!("project=\"{project}\",resource=\"{}\"", escape_label(r)),
                n,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let mut h = Histogram::default();
        h.observe(0.0005);
        h.observe(0.001);
        h.observe(0.3);
        h.observe(100.0);
        assert_eq!(h.count, 4);
        assert_eq!(h.buckets[0], 2);
        assert_eq!(h.buckets[8], 1); // 0.5
        assert_eq!(h.buckets[LATENCY_BUCKETS.len()], 1); // +Inf
        assert!((h.sum_seconds - 100.3015).abs() < 1e-9);
    }

    #[test]
    fn quorum() {
        assert_eq!(quorum_index(&mut []), None);
        assert_eq!(quorum_index(&mut [7]), Some(7));
        assert_eq!(quorum_index(&mut [10, 3, 8]), Some(8));
        assert_eq!(quorum_index(&mut [10, 3, 8, 9, 1]), Some(8));
        assert_eq!(quorum_index(&mut [10, 0, 0]), Some(0));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn renders_text_format() {
        let mut cluster = ClusterFigures {
            controllers: 3,
            images: 1,
            ..Default::default()
        };
        cluster.nodes.insert(
            "n1".into(),
            NodeFigures {
                status: "Online".into(),
                instances: 2,
                cpus_total: 4,
                cpus_allocated: 2,
                memory_total_bytes: 8 << 30,
                memory_allocated_bytes: 1 << 30,
                storage_total_bytes: 100,
                storage_free_bytes: 40,
            },
        );
        cluster.instances_by_status.insert("Running".into(), 2);
        cluster.operations_by_status.insert("Success".into(), 5);
        let raft = RaftFigures {
            id: 1,
            state: "Leader".into(),
            term: 4,
            last_log_index: 20,
            applied_index: 19,
            commit_index: Some(19),
            leader_id: Some(1),
            is_leader: true,
            millis_since_quorum_ack: Some(12),
            leader_changes: 2,
            voters: 3,
            learners: 0,
        };
        let metrics = ApiMetrics::default();
        metrics.record("GET", "/1.0/instances/{name}", 200, 0.003);
        metrics.record("GET", "/1.0/instances/{name}", 404, 0.0001);
        let text = render("c1", &cluster, &raft, &metrics.api_figures(), Some(3));
        for line in [
            "# TYPE berth_instances gauge",
            "berth_controllers 3",
            "berth_nodes{status=\"Offline\"} 0",
            "berth_nodes{status=\"Online\"} 1",
            "berth_instances{status=\"Running\"} 2",
            "berth_instances{status=\"Stopped\"} 0",
            "berth_instances{status=\"Unknown\"} 0",
            "berth_instances{status=\"Error\"} 0",
            "berth_operations{status=\"Running\"} 0",
            "berth_operations{status=\"Cancelled\"} 0",
            "berth_node_cpus_allocated{node=\"n1\"} 2",
            "berth_node_memory_bytes{node=\"n1\"} 8589934592",
            "berth_node_storage_free_bytes{node=\"n1\"} 40",
            "berth_node_online{node=\"n1\"} 1",
            "berth_operations{status=\"Success\"} 5",
            "berth_raft_state{controller=\"c1\",state=\"Leader\"} 1",
            "berth_raft_term{controller=\"c1\"} 4",
            "berth_raft_commit_index{controller=\"c1\"} 19",
            "berth_raft_is_leader{controller=\"c1\"} 1",
            "berth_raft_leader_changes_total{controller=\"c1\"} 2",
            "berth_raft_millis_since_quorum_ack{controller=\"c1\"} 12",
            "berth_reconcile_queue_depth 3",
            "# TYPE berth_api_requests_total counter",
            "berth_api_requests_total{controller=\"c1\",method=\"GET\",route=\"/1.0/instances/{name}\",status=\"404\"} 1",
            "# TYPE berth_api_request_duration_seconds histogram",
            "berth_api_request_duration_seconds_bucket{controller=\"c1\",method=\"GET\",route=\"/1.0/instances/{name}\",le=\"0.001\"} 1",
            "berth_api_request_duration_seconds_bucket{controller=\"c1\",method=\"GET\",route=\"/1.0/instances/{name}\",le=\"0.005\"} 2",
            "berth_api_request_duration_seconds_bucket{controller=\"c1\",method=\"GET\",route=\"/1.0/instances/{name}\",le=\"+Inf\"} 2",
            "berth_api_request_duration_seconds_count{controller=\"c1\",method=\"GET\",route=\"/1.0/instances/{name}\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every line is a comment or `name{labels} value`, and every family is declared once.
        let mut types = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                assert!(
                    types.insert(rest.split(' ').next().unwrap().to_string()),
                    "{l}"
                );
            } else if !l.starts_with("# HELP ") {
                let value = l.rsplit(' ').next().unwrap();
                assert!(
                    value == "+Inf" || value.parse::<f64>().is_ok(),
                    "bad sample line {l:?}"
                );
            }
        }
        // Without a queue depth or leader-only figures those series are left out.
        let follower = RaftFigures {
            commit_index: None,
            millis_since_quorum_ack: None,
            ..raft
        };
        let text = render("c1", &cluster, &follower, &ApiFigures::default(), None);
        assert!(!text.contains("berth_reconcile_queue_depth"));
        assert!(!text.contains("berth_raft_commit_index"));
    }

    #[test]
    fn every_status_is_listed() {
        use InstanceStatusCode as I;
        use berth_proto::api::OperationStatus as O;
        // The matches fail to compile when a status is added: list it above too.
        let label = |i: I| match i {
            I::Stopped
            | I::Running
            | I::Starting
            | I::Stopping
            | I::Error
            | I::Pending
            | I::Unknown => i.as_str().to_string(),
        };
        let op = |o: O| match o {
            O::Pending | O::Running | O::Success | O::Failure | O::Cancelled => format!("{o:?}"),
        };
        for i in [
            I::Stopped,
            I::Running,
            I::Starting,
            I::Stopping,
            I::Error,
            I::Pending,
            I::Unknown,
        ] {
            assert!(INSTANCE_STATUSES.contains(&label(i).as_str()), "{i:?}");
        }
        for o in [O::Pending, O::Running, O::Success, O::Failure, O::Cancelled] {
            assert!(OPERATION_STATUSES.contains(&op(o).as_str()), "{o:?}");
        }
    }
}
