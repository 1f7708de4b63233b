//! Heartbeats: the agent tells the leading controller, every couple of seconds, what it offers
//! (CPUs, memory, storage, architecture, labels) and how every instance is doing.
//!
//! The agent remembers the controllers' peer addresses in `<state_dir>/controllers.json`
//! (written at join, refreshed from every reply). It calls `berth.v1.Controller/Heartbeat`
//! over mutual TLS: it presents its node certificate and accepts a server only if its
//! certificate chains to the cluster CA and names [`berth_proto::CONTROLLER_TLS_NAME`]. A
//! controller that is not the leader answers `accepted = false` with the leader's address,
//! which is tried next; a controller that fails or does not answer within the call timeout is
//! skipped for the next one. Nothing here touches instances: an agent cut off from every
//! controller keeps its instances running and keeps trying until some controller leads.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth_proto::v1::{
    HeartbeatReply, HeartbeatRequest, InstanceStatus, NodeCapacity,
    controller_client::ControllerClient,
};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use crate::engine::Engine;
use crate::storage::StorageDriver;
use crate::tls::Identity;

/// Heartbeat interval until the leader asks for another.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// How long one heartbeat call (connect included) may take before the next controller is tried.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause after a round in which no controller accepted a heartbeat.
pub const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Bounds on the interval a leader may ask for (a wrong value must neither flood the
/// controllers nor let the node go offline).
const MIN_INTERVAL: Duration = Duration::from_millis(50);
const MAX_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on the calls of one round (controllers plus the leaders they name).
const MAX_CALLS_PER_ROUND: usize = 16;
/// Where heartbeats go when nothing else is known: a controller on the same host (the
/// certificate check still applies).
pub const LOCAL_CONTROLLER: &str = "127.0.0.1:8444";
/// File under the state directory with the controllers' peer addresses.
pub const CONTROLLERS_FILE: &str = "controllers.json";

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("controller address {addr} is not usable: {detail}")]
    Address { addr: String, detail: String },
    #[error("tls setup for heartbeats failed: {0}")]
    Tls(String),
}

/// The controllers an agent knows of, as persisted in [`CONTROLLERS_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownControllers {
    /// Peer addresses (host:port) of every controller.
    pub controllers: Vec<String>,
    /// The leader's peer address when last heard, empty when unknown.
    #[serde(default)]
    pub leader: String,
}

impl KnownControllers {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(CONTROLLERS_FILE)
    }

    /// Reads the file; `None` when it is absent or unreadable (the latter is logged).
    pub fn load(state_dir: &Path) -> Option<KnownControllers> {
        let path = Self::path(state_dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn!(path = %path.display(), "cannot read the known controllers: {e}");
                return None;
            }
        };
        match serde_json::from_slice(&text) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(path = %path.display(), "ignoring a damaged controllers file: {e}");
                None
            }
        }
    }

    /// The addresses to try: the file's (when it names any), then the configured `seeds` it
    /// lacks, so that a stale file never hides the configured controllers.
    pub fn merged(file: Option<KnownControllers>, seeds: &[String]) -> KnownControllers {
        let mut k = file.unwrap_or_default();
        for s in seeds {
            if !k.controllers.contains(s) {
                k.controllers.push(s.clone());
            }
        }
        k
    }

    /// Writes the file atomically (the data reaches the disk before the rename).
    pub fn save(&self, state_dir: &Path) -> Result<(), HeartbeatError> {
        let path = Self::path(state_dir);
        let tmp = state_dir.join(format!("{CONTROLLERS_FILE}.tmp"));
        let io = |p: &Path| {
            let path = p.to_path_buf();
            move |source| HeartbeatError::Io { path, source }
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| HeartbeatError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&json).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // The rename itself is durable once the directory is synced (best effort: the file
        // is only a cache of what replies tell again).
        if let Ok(dir) = std::fs::File::open(state_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// MemTotal from /proc/meminfo text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            let mut it = rest.split_whitespace();
            let n = it.next()?.parse::<u64>().ok()?;
            match it.next() {
                Some("kB") | None => n.checked_mul(1024),
                Some(_) => None,
            }
        })
}

/// CPUs this process may use (affinity and cgroup quota included), at least 1.
pub fn usable_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// The machine's architecture as uname reports it, e.g. `x86_64`.
pub fn architecture() -> String {
    rustix::system::uname()
        .machine()
        .to_string_lossy()
        .into_owned()
}

/// Builds the capacity message from gathered figures (pure).
pub fn capacity(
    cpus: u32,
    memory_bytes: u64,
    storage: Option<crate::storage::PoolUsage>,
    architecture: String,
    labels: &std::collections::BTreeMap<String, String>,
) -> NodeCapacity {
    let (total, free) = storage
        .map(|u| (u.total, u.total.saturating_sub(u.used)))
        .unwrap_or((0, 0));
    NodeCapacity {
        cpus,
        memory_bytes,
        storage_total_bytes: total,
        storage_free_bytes: free,
        architecture,
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        agent_version: berth_proto::VERSION.to_string(),
    }
}

/// What a heartbeat reports: the node's capacity and every instance's status.
pub trait Reporter: Send + Sync + 'static {
    fn report(&self) -> impl Future<Output = (NodeCapacity, Vec<InstanceStatus>)> + Send;
}

/// The real node: capacity from the host and the storage pool, statuses from the engine.
pub struct NodeReporter {
    pub storage: Arc<dyn StorageDriver>,
    pub engine: Arc<Engine>,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Reporter for NodeReporter {
    async fn report(&self) -> (NodeCapacity, Vec<InstanceStatus>) {
        let storage = self.storage.clone();
        let usage = tokio::task::spawn_blocking(move || storage.usage())
            .await
            .ok()
            .and_then(|r| r.map_err(|e| debug!("cannot read storage usage: {e}")).ok());
        let cap = capacity(
            usable_cpus(),
            crate::daemon::host_memory_bytes(),
            usage,
            architecture(),
            &self.labels,
        );
        // The leader records only each instance's state, pid and error from a heartbeat:
        // usage figures are read when asked for (at 1000 instances they were most of the
        // agent's idle CPU).
        let instances = match self.engine.list_states().await {
            Ok(l) => l,
            Err(e) => {
                warn!("cannot list instances for the heartbeat: {e}");
                Vec::new()
            }
        };
        (cap, instances)
    }
}

/// Which controller to call next: the one that last accepted (or the leader it named), else
/// the known controllers in turn, starting after the one that failed.
#[derive(Debug, Default)]
pub struct Rotation {
    known: Vec<String>,
    cursor: usize,
    preferred: Option<String>,
}

impl Rotation {
    /// A rotation over `known`, trying `leader` first when given.
    pub fn new(known: Vec<String>, leader: Option<String>) -> Rotation {
        let mut r = Rotation {
            known,
            cursor: 0,
            preferred: None,
        };
        if let Some(l) = leader.filter(|l| !l.is_empty()) {
            r.redirected(&l);
        }
        r
    }

    /// The controllers known now.
    pub fn known(&self) -> &[String] {
        &self.known
    }

    /// The next controller to call, `None` when none is known.
    pub fn next_target(&mut self) -> Option<String> {
        if let Some(p) = self.preferred.take() {
            return Some(p);
        }
        if self.known.is_empty() {
            return None;
        }
        let t = self.known[self.cursor % self.known.len()].clone();
        self.cursor = (self.cursor + 1) % self.known.len();
        Some(t)
    }

    /// `addr` accepted: call it again next time.
    pub fn accepted(&mut self, addr: &str) {
        self.preferred = Some(addr.to_string());
    }

    /// A controller named `leader` as the leader: call it next.
    pub fn redirected(&mut self, leader: &str) {
        if !self.known.iter().any(|k| k == leader) {
            self.known.push(leader.to_string());
        }
        self.preferred = Some(leader.to_string());
    }

    /// `addr` failed or does not know the leader: move on to the controller after it.
    pub fn failed(&mut self, addr: &str) {
        self.preferred = None;
        if let Some(i) = self.known.iter().position(|k| k == addr) {
            self.cursor = (i + 1) % self.known.len();
        }
    }

    /// Replaces the known list (from a reply); the preferred target stays.
    pub fn set_known(&mut self, known: Vec<String>) {
        if known.is_empty() || known == self.known {
            return;
        }
        let at = self.known.get(self.cursor).cloned();
        self.known = known;
        self.cursor = at
            .and_then(|a| self.known.iter().position(|k| *k == a))
            .unwrap_or(0);
    }
}

/// Timing of the heartbeat loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Until a leader asks for another interval.
    pub interval: Duration,
    /// Bound on one call, connection included.
    pub call_timeout: Duration,
    /// Pause after a round where no controller accepted.
    pub retry_pause: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            interval: DEFAULT_INTERVAL,
            call_timeout: CALL_TIMEOUT,
            retry_pause: RETRY_PAUSE,
        }
    }
}

/// What the loop last told the log, so that it logs transitions, not every beat.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Starting,
    Connected(String),
    Lost,
}

/// The heartbeat loop of one agent.
pub struct Heartbeat<R: Reporter> {
    node: String,
    state_dir: PathBuf,
    tls: Option<ClientTlsConfig>,
    reporter: R,
    seeds: Vec<String>,
    timing: Timing,
    channels: HashMap<String, Channel>,
    sequence: u64,
    link: Link,
    recovering: Arc<AtomicBool>,
}

/// The client TLS settings for heartbeats: the node's certificate, the cluster CA, and the
/// controllers' name.
pub fn client_tls(identity: &Identity) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&identity.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &identity.cert_pem,
            &identity.key_pem,
        ))
        .domain_name(berth_proto::CONTROLLER_TLS_NAME)
}

enum Outcome {
    Accepted(HeartbeatReply),
    Redirected(String, HeartbeatReply),
    NoLeader(HeartbeatReply),
    Failed(String),
}

impl<R: Reporter> Heartbeat<R> {
    /// A heartbeat loop for `node`. `tls` is `None` only in tests (plain HTTP/2). `seeds` are
    /// the configured controllers, used when the state directory names none.
    pub fn new(
        node: String,
        state_dir: PathBuf,
        tls: Option<ClientTlsConfig>,
        reporter: R,
        seeds: Vec<String>,
    ) -> Heartbeat<R> {
        Heartbeat {
            node,
            state_dir,
            tls,
            reporter,
            seeds,
            timing: Timing::default(),
            channels: HashMap::new(),
            sequence: initial_sequence(),
            link: Link::Starting,
            recovering: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Heartbeats say `recovering` while `flag` is set (the agent clears it once recovery has
    /// finished): until then the instances' states may be wrong and the controller ignores
    /// them.
    pub fn with_recovering(mut self, flag: Arc<AtomicBool>) -> Self {
        self.recovering = flag;
        self
    }

    /// Replaces the timing (tests use short ones).
    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    fn known(&self) -> KnownControllers {
        KnownControllers::merged(KnownControllers::load(&self.state_dir), &self.seeds)
    }

    /// Uses `addr` when neither the state directory nor the config names a controller (an
    /// agent that joined before controllers were announced; tests pass `None`).
    pub fn with_fallback(mut self, addr: Option<String>) -> Self {
        if let Some(a) = addr
            && self.seeds.is_empty()
        {
            self.seeds.push(a);
        }
        self
    }

    /// Runs forever (abort the task to stop it).
    pub async fn run(mut self) {
        let known = self.known();
        let mut saved = known.clone();
        let mut rotation = Rotation::new(known.controllers, Some(known.leader));
        let mut interval = self.timing.interval;
        let mut warned_empty = false;
        loop {
            if rotation.known().is_empty() {
                // Nothing learned yet: the file may be written later (a join by another
                // process, an operator).
                if !warned_empty {
                    warn!(node = %self.node, "no controller address known: heartbeats wait for {CONTROLLERS_FILE} in {} or `controllers` in the config", self.state_dir.display());
                    warned_empty = true;
                }
                tokio::time::sleep(self.timing.retry_pause.max(interval)).await;
                let k = self.known();
                rotation = Rotation::new(k.controllers, Some(k.leader));
                continue;
            }
            // One round: each controller (known, or named as leader) at most once, so a round
            // where every controller is silent lasts about one call timeout per controller.
            let mut tried: Vec<String> = Vec::new();
            let mut accepted = None;
            // One report per round, whichever controllers it goes to.
            let req = self.request().await;
            let mut last_error = String::new();
            while tried.len() < MAX_CALLS_PER_ROUND {
                // The rotation's choice, or, when it was tried already this round (a stale
                // leader named twice), any controller not tried yet.
                let target = match rotation.next_target() {
                    Some(t) if !tried.contains(&t) => t,
                    _ => match rotation.known().iter().find(|k| !tried.contains(k)) {
                        Some(t) => t.clone(),
                        None => break,
                    },
                };
                tried.push(target.clone());
                match self.beat(&target, req.clone()).await {
                    Outcome::Accepted(reply) => {
                        rotation.accepted(&target);
                        accepted = Some((target, reply));
                        break;
                    }
                    Outcome::Redirected(leader, reply) => {
                        debug!(node = %self.node, controller = %target, leader = %leader, "not the leader; following");
                        rotation.set_known(reply.controllers);
                        rotation.redirected(&leader);
                    }
                    Outcome::NoLeader(reply) => {
                        last_error = format!("{target} knows no leader");
                        rotation.set_known(reply.controllers);
                        rotation.failed(&target);
                    }
                    Outcome::Failed(e) => {
                        debug!(node = %self.node, controller = %target, "heartbeat failed: {e}");
                        last_error = format!("{target}: {e}");
                        self.channels.remove(&target);
                        rotation.failed(&target);
                    }
                }
            }
            match accepted {
                Some((leader, reply)) => {
                    if self.link != Link::Connected(leader.clone()) {
                        info!(node = %self.node, leader = %leader, "heartbeats accepted by the leader");
                        self.link = Link::Connected(leader.clone());
                    }
                    rotation.set_known(reply.controllers.clone());
                    let now = KnownControllers {
                        controllers: rotation.known().to_vec(),
                        leader,
                    };
                    if now != saved {
                        match now.save(&self.state_dir) {
                            Ok(()) => saved = now,
                            Err(e) => {
                                warn!(node = %self.node, "cannot remember the controllers: {e}")
                            }
                        }
                    }
                    if reply.interval_ms > 0 {
                        interval = Duration::from_millis(u64::from(reply.interval_ms))
                            .clamp(MIN_INTERVAL, MAX_INTERVAL);
                    }
                    tokio::time::sleep(interval).await;
                }
                None => {
                    if self.link != Link::Lost {
                        warn!(node = %self.node, last_error = %last_error, "no controller accepts heartbeats (no leader reachable); instances keep running, retrying");
                        self.link = Link::Lost;
                    }
                    tokio::time::sleep(self.timing.retry_pause).await;
                }
            }
        }
    }

    fn channel(&mut self, addr: &str) -> Result<Channel, HeartbeatError> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.contains("://") {
            addr.to_string()
        } else if self.tls.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let bad = |detail: String| HeartbeatError::Address {
            addr: addr.to_string(),
            detail,
        };
        let mut ep = Endpoint::from_shared(uri)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(self.timing.call_timeout)
            .timeout(self.timing.call_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| HeartbeatError::Tls(e.to_string()))?;
        }
        let ch = ep.connect_lazy();
        self.channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// This round's report.
    async fn request(&mut self) -> HeartbeatRequest {
        // Read before the report: a report gathered while recovery ran is marked as such.
        let recovering = self.recovering.load(Ordering::Acquire);
        let (capacity, instances) = self.reporter.report().await;
        self.sequence += 1;
        HeartbeatRequest {
            capacity: Some(capacity),
            instances,
            sequence: self.sequence,
            recovering,
        }
    }

    async fn beat(&mut self, target: &str, req: HeartbeatRequest) -> Outcome {
        let ch = match self.channel(target) {
            Ok(c) => c,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let call = async move {
            ControllerClient::new(ch)
                .heartbeat(req)
                .await
                .map(tonic::Response::into_inner)
        };
        match tokio::time::timeout(self.timing.call_timeout, call).await {
            Err(_) => Outcome::Failed(format!("no answer within {:?}", self.timing.call_timeout)),
            Ok(Err(status)) => Outcome::Failed(format!("{}: {}", status.code(), status.message())),
            Ok(Ok(reply)) if reply.accepted => Outcome::Accepted(reply),
            Ok(Ok(reply)) if !reply.leader.is_empty() && reply.leader != target => {
                Outcome::Redirected(reply.leader.clone(), reply)
            }
            Ok(Ok(reply)) => Outcome::NoLeader(reply),
        }
    }
}

/// The first sequence number of this process: the wall clock in milliseconds, so that a
/// restarted agent continues above its previous process (one beat per call is far slower than
/// one per millisecond) and the leader never mistakes its reports for stale ones.
fn initial_sequence() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2))
        .unwrap_or(0)
}

/// Starts the heartbeat task of a running agent; its beats say `recovering` while `recovering`
/// is set.
pub fn spawn(
    cfg: &crate::config::Config,
    identity: &Identity,
    storage: Arc<dyn StorageDriver>,
    engine: Arc<Engine>,
    recovering: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let reporter = NodeReporter {
        storage,
        engine,
        labels: cfg.labels.clone(),
    };
    let hb = Heartbeat::new(
        cfg.name.clone(),
        cfg.state_dir.clone(),
        Some(client_tls(identity)),
        reporter,
        cfg.controllers.clone(),
    )
    .with_fallback(Some(LOCAL_CONTROLLER.to_string()))
    .with_recovering(recovering);
    tokio::spawn(hb.run())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemFree:  10 kB\nMemTotal:       24559716 kB\nSwap: 0 kB\n";
        assert_eq!(parse_mem_total(text), Some(24559716 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 5 MB\n"), None);
    }

    #[test]
    fn capacity_figures() {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("rack".to_string(), "r1".to_string());
        let c = capacity(
            4,
            1 << 30,
            Some(crate::storage::PoolUsage {
                total: 100,
                used: 30,
            }),
            "x86_64".into(),
            &labels,
        );
        assert_eq!(c.storage_total_bytes, 100);
        assert_eq!(c.storage_free_bytes, 70);
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(c.agent_version, berth_proto::VERSION);
        let none = capacity(1, 0, None, "x".into(), &labels);
        assert_eq!((none.storage_total_bytes, none.storage_free_bytes), (0, 0));
        assert!(usable_cpus() >= 1);
        assert!(!architecture().is_empty());
    }

    #[test]
    fn rotation_order() {
        let k = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut r = Rotation::new(k(&["a", "b", "c"]), None);
        assert_eq!(r.next_target().as_deref(), Some("a"));
        r.failed("a");
        assert_eq!(r.next_target().as_deref(), Some("b"));
        r.accepted("b");
        assert_eq!(r.next_target().as_deref(), Some("b"));
        r.failed("b");
        assert_eq!(r.next_target().as_deref(), Some("c"));
        r.failed("c");
        assert_eq!(r.next_target().as_deref(), Some("a"));
        // A leader named by a reply goes first, and is remembered.
        r.redirected("d");
        assert_eq!(r.next_target().as_deref(), Some("d"));
        assert_eq!(r.known(), k(&["a", "b", "c", "d"]).as_slice());
        r.failed("d");
        assert_eq!(r.next_target().as_deref(), Some("a"));
        // The list from a reply replaces ours.
        r.set_known(k(&["x", "y"]));
        assert_eq!(r.known(), k(&["x", "y"]).as_slice());
        r.set_known(Vec::new());
        assert_eq!(r.known().len(), 2);
        let mut r = Rotation::new(k(&["a", "b"]), Some("b".into()));
        assert_eq!(r.next_target().as_deref(), Some("b"));
        let mut empty = Rotation::new(Vec::new(), Some(String::new()));
        assert_eq!(empty.next_target(), None);
    }

    #[test]
    fn known_controllers_file() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(KnownControllers::load(d.path()), None);
        let k = KnownControllers {
            controllers: vec!["10.0.0.1:8444".into()],
            leader: "10.0.0.1:8444".into(),
        };
        k.save(d.path()).unwrap();
        assert_eq!(KnownControllers::load(d.path()), Some(k));
        std::fs::write(d.path().join(CONTROLLERS_FILE), "{not json").unwrap();
        assert_eq!(KnownControllers::load(d.path()), None);
        assert!(!d.path().join(format!("{CONTROLLERS_FILE}.tmp")).exists());
    }

    #[test]
    fn configured_controllers_follow_the_files() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let file = KnownControllers {
            controllers: s(&["a:1", "b:1"]),
            leader: "b:1".into(),
        };
        let m = KnownControllers::merged(Some(file), &s(&["c:1", "a:1"]));
        assert_eq!(m.controllers, s(&["a:1", "b:1", "c:1"]));
        assert_eq!(m.leader, "b:1");
        let m = KnownControllers::merged(None, &s(&["c:1"]));
        assert_eq!(m.controllers, s(&["c:1"]));
        assert_eq!(m.leader, "");
    }
}
