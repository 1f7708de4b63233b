//! The container runtime: per-instance files, the id map allocation, and the monitor process
//! ([`monitor`]) that creates, watches and tears down one running instance.
//!
//! Instance directory `<state_dir>/instances/<name>/`:
//! - `instance.json`: the [`InstanceRecord`] (spec, id map base, whether the rootfs was shifted)
//! - `state.json`: the [`RuntimeState`] written by the monitor
//! - `monitor.pid`, `init.pid`: `<pid> <start time>` (start time = field 22 of /proc/<pid>/stat)
//! - `stop-requested`: present while the engine stops the instance (a reboot then ends it)
//! - `console.log` (+ `console.log.1`), `monitor.log`
//! - `rootfs-mnt/`: staging mount point of the root filesystem while starting
//!
//! Instance names on a node are scoped names ([`berth_proto::api::names::scoped_name`]): the
//! instance's own name in the default project, `project_name` in any other. That name keys
//! everything on the node (directory, volume, cgroups, veth hash) and goes back to the controller
//! unchanged; only the hostname the instance sees is its own name ([`hostname_of`]).

pub mod exec;
pub mod files;
pub mod monitor;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Runs a hidden helper subcommand (`__monitor`, `__exec`, `__file`) when `args[1]` names one,
/// returning its exit code; `None` for any other command line. Call it first thing in `main`,
/// before any tokio runtime or thread exists.
pub fn dispatch_hidden(args: &[String]) -> Option<i32> {
    let cmd = args.get(1)?;
    if !cmd.starts_with("__") {
        return None;
    }
    let rest = &args[2..];
    Some(match cmd.as_str() {
        "__monitor" => monitor::main(rest),
        "__exec" => exec::helper_main(rest),
        "__file" => files::helper_main(rest),
        other => {
            eprintln!("berth-agent: unknown helper {other}");
            2
        }
    })
}

/// The hostname of an instance: its own name, without the project prefix of a scoped name
/// (`acme_web1` gives `web1`, `web1` gives `web1`).
pub fn hostname_of(instance: &str) -> &str {
    berth_proto::api::names::split_scoped_name(instance).1
}

/// Errors of the runtime's file handling.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bad runtime file {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("no free id range for a new instance")]
    IdRangeExhausted,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Size of each instance's id range.
pub const IDMAP_SIZE: u32 = 65536;
/// First host id handed to instances by default.
pub const IDMAP_START: u32 = 1_000_000;

/// The host ids one agent hands to its instances: `[start, start + count)`. Agents sharing a
/// host must be given ranges that do not overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

impl Default for IdRange {
    /// From [`IDMAP_START`] to the top of the id space.
    fn default() -> Self {
        IdRange {
            start: IDMAP_START,
            count: u32::MAX - IDMAP_START,
        }
    }
}

/// The network part of an instance record (mirrors `berth_proto::v1::NetworkSpec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub ipv4_cidr: String,
    pub gateway: String,
    pub nameservers: Vec<String>,
    pub hwaddr: String,
}

/// What the agent knows about an instance, persistent across agent and host restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub name: String,
    /// Image fingerprint.
    pub image: String,
    pub config: BTreeMap<String, String>,
    pub network: NetworkRecord,
    /// First host id of the instance's range; 0 when privileged.
    pub idmap_base: u32,
    /// The rootfs owners were shifted on disk by `idmap_base` (no idmapped mounts).
    pub shifted_on_disk: bool,
    /// The instance's root filesystem (raw path, container ids on disk unless shifted).
    pub rootfs: PathBuf,
    pub created_at: i64,
}

impl InstanceRecord {
    /// `security.privileged=true`.
    pub fn privileged(&self) -> bool {
        self.config
            .get("security.privileged")
            .map(|v| {
                berth_proto::api::config::parse_bool("security.privileged", v).unwrap_or(false)
            })
            .unwrap_or(false)
    }
}

/// Runtime state as last written by the monitor (or the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Stopped,
    Starting,
    Running,
    Stopping,
    Error,
}

/// The `state.json` of an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeState {
    pub phase: Phase,
    pub init_pid: i32,
    pub started_at: i64,
    pub error: String,
    /// Whether the instance was running when last seen by a clean agent (for autostart after a
    /// host reboot).
    pub last_running: bool,
}

/// A process identity that survives pid reuse: pid plus its start time in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

impl ProcId {
    /// Identity of a running process now.
    pub fn of(pid: i32) -> Option<ProcId> {
        Some(ProcId {
            pid,
            start: proc_start_time(pid)?,
        })
    }

    /// Whether this very process still exists (and is not a zombie).
    pub fn alive(&self) -> bool {
        if self.pid <= 0 {
            return false;
        }
        match proc_stat(self.pid) {
            Some((state, start)) => start == self.start && state != 'Z' && state != 'X',
            None => false,
        }
    }

    fn parse(s: &str) -> Option<ProcId> {
        let mut it = s.split_whitespace();
        Some(ProcId {
            pid: it.next()?.parse().ok()?,
            start: it.next()?.parse().ok()?,
        })
    }

    fn render(&self) -> String {
        format!("{} {}\n", self.pid, self.start)
    }
}

/// Waits for a process to exit without polling for it: a pidfd, readable once the process is
/// gone (any process, not only a child: monitors are daemonized).
pub struct ExitWatch(Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>);

impl ExitWatch {
    /// Watches `process`. Without a pidfd (the process is gone or its pid was reused already)
    /// [`ExitWatch::wait`] just sleeps, so callers keep checking [`ProcId::alive`].
    /// Must be called within a tokio runtime.
    pub fn new(process: ProcId) -> ExitWatch {
        let fd = crate::sys::process::pidfd(process.pid)
            .ok()
            // The pid may have been reused between reading it and opening the pidfd.
            .filter(|_| process.alive())
            .and_then(|fd| crate::sys::process::async_pidfd(fd).ok());
        ExitWatch(fd)
    }

    /// Returns once the process has exited, or after `max`, whichever comes first.
    pub async fn wait(&self, max: std::time::Duration) {
        match &self.0 {
            Some(fd) => {
                let _ = tokio::time::timeout(max, fd.readable()).await;
            }
            None => tokio::time::sleep(max).await,
        }
    }
}

/// (state char, start time) from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parens: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22 => index 19.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Start time of a process (field 22 of /proc/<pid>/stat).
pub fn proc_start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, s)| s)
}

/// Paths of one instance's runtime files.
#[derive(Debug, Clone)]
pub struct InstanceDir(pub PathBuf);

impl InstanceDir {
    pub fn new(state_dir: &Path, name: &str) -> InstanceDir {
        InstanceDir(state_dir.join("instances").join(name))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn record_path(&self) -> PathBuf {
        self.0.join("instance.json")
    }
    pub fn state_path(&self) -> PathBuf {
        self.0.join("state.json")
    }
    pub fn monitor_pid_path(&self) -> PathBuf {
        self.0.join("monitor.pid")
    }
    pub fn init_pid_path(&self) -> PathBuf {
        self.0.join("init.pid")
    }
    pub fn stop_requested_path(&self) -> PathBuf {
        self.0.join("stop-requested")
    }
    pub fn console_log_path(&self) -> PathBuf {
        self.0.join("console.log")
    }
    pub fn monitor_log_path(&self) -> PathBuf {
        self.0.join("monitor.log")
    }
    pub fn rootfs_mount(&self) -> PathBuf {
        self.0.join("rootfs-mnt")
    }

    pub fn read_record(&self) -> Result<InstanceRecord, RuntimeError> {
        read_json(&self.record_path())
    }
    pub fn write_record(&self, r: &InstanceRecord) -> Result<(), RuntimeError> {
        write_json(&self.record_path(), r)
    }
    /// The state; a missing file reads as stopped.
    pub fn read_state(&self) -> RuntimeState {
        read_json(&self.state_path()).unwrap_or_default()
    }
    pub fn write_state(&self, s: &RuntimeState) -> Result<(), RuntimeError> {
        write_json(&self.state_path(), s)
    }

    pub fn read_monitor(&self) -> Option<ProcId> {
        read_procid(&self.monitor_pid_path())
    }
    pub fn read_init(&self) -> Option<ProcId> {
        read_procid(&self.init_pid_path())
    }
    pub fn write_monitor(&self, id: ProcId) -> Result<(), RuntimeError> {
        write_atomic(&self.monitor_pid_path(), id.render().as_bytes())
    }
    pub fn write_init(&self, id: ProcId) -> Result<(), RuntimeError> {
        write_atomic(&self.init_pid_path(), id.render().as_bytes())
    }

    /// The live monitor of this instance, if one runs.
    pub fn live_monitor(&self) -> Option<ProcId> {
        self.read_monitor().filter(ProcId::alive)
    }
    /// The live init of this instance, if it runs.
    pub fn live_init(&self) -> Option<ProcId> {
        self.read_init().filter(ProcId::alive)
    }
}

fn read_procid(p: &Path) -> Option<ProcId> {
    ProcId::parse(&std::fs::read_to_string(p).ok()?)
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T, RuntimeError> {
    let data = std::fs::read(p).map_err(io_err(p))?;
    serde_json::from_slice(&data).map_err(|e| RuntimeError::Corrupt {
        path: p.to_path_buf(),
        detail: e.to_string(),
    })
}

pub(crate) fn write_json<T: Serialize>(p: &Path, v: &T) -> Result<(), RuntimeError> {
    let data = serde_json::to_vec_pretty(v).map_err(|e| RuntimeError::Corrupt {
        path: p.to_path_buf(),
        detail: e.to_string(),
    })?;
    write_atomic(p, &data)
}

/// Writes a file through a temp file and rename, so readers never see half of it.
pub(crate) fn write_atomic(p: &Path, data: &[u8]) -> Result<(), RuntimeError> {
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, p).map_err(io_err(p))
}

/// Host pid of a running instance's init (None when it is not running). Checks the recorded
/// start time so a reused pid is never mistaken for the instance's init.
pub fn init_pid(state_dir: &Path, name: &str) -> Option<i32> {
    InstanceDir::new(state_dir, name).live_init().map(|p| p.pid)
}

/// Id map base of an instance (0 when privileged or unknown).
pub fn idmap_base(state_dir: &Path, name: &str) -> u32 {
    InstanceDir::new(state_dir, name)
        .read_record()
        .map(|r| r.idmap_base)
        .unwrap_or(0)
}

/// Ranges (start, count) from /etc/subuid-style text.
pub fn parse_subid(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.trim().split(':');
            let _user = it.next()?;
            let start = it.next()?.trim().parse().ok()?;
            let count = it.next()?.trim().parse().ok()?;
            Some((start, count))
        })
        .collect()
}

/// Picks the base of a free id range: `range.start + slot * IDMAP_SIZE` for the lowest slot
/// that lies inside `range`, is not used by another instance and does not overlap any
/// `reserved` range.
pub fn allocate_idmap(
    used: &[u32],
    reserved: &[(u64, u64)],
    range: IdRange,
) -> Result<u32, RuntimeError> {
    let size = IDMAP_SIZE as u64;
    let end = (range.start as u64 + range.count as u64).min(u32::MAX as u64);
    for slot in 0u64.. {
        let base = range.start as u64 + slot * size;
        if base + size > end {
            break;
        }
        if used.iter().any(|u| *u as u64 == base) {
            continue;
        }
        if reserved
            .iter()
            .any(|(s, c)| base < s + c && *s < base + size)
        {
            continue;
        }
        return Ok(base as u32);
    }
    Err(RuntimeError::IdRangeExhausted)
}

/// Names of all instances with a directory under `state_dir`.
pub fn list_instances(state_dir: &Path) -> Vec<String> {
    let dir = state_dir.join("instances");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("instance.json").is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_drop_the_project() {
        assert_eq!(hostname_of("web1"), "web1");
        assert_eq!(hostname_of("acme_web1"), "web1");
        assert_eq!(hostname_of("p_web"), "web");
    }

    #[test]
    fn idmap_lowest_free_slot() {
        let r = IdRange::default();
        assert_eq!(allocate_idmap(&[], &[], r).unwrap(), IDMAP_START);
        assert_eq!(
            allocate_idmap(&[IDMAP_START], &[], r).unwrap(),
            IDMAP_START + IDMAP_SIZE
        );
        assert_eq!(
            allocate_idmap(&[IDMAP_START + IDMAP_SIZE], &[], r).unwrap(),
            IDMAP_START
        );
    }

    #[test]
    fn idmap_stays_inside_its_range() {
        let r = IdRange {
            start: 5_000_000,
            count: 2 * IDMAP_SIZE,
        };
        assert_eq!(allocate_idmap(&[], &[], r).unwrap(), 5_000_000);
        let one = allocate_idmap(&[5_000_000], &[], r).unwrap();
        assert_eq!(one, 5_000_000 + IDMAP_SIZE);
        assert!(matches!(
            allocate_idmap(&[5_000_000, one], &[], r),
            Err(RuntimeError::IdRangeExhausted)
        ));
        // A reserved range inside it takes those slots away.
        assert!(allocate_idmap(&[], &[(5_000_000, 2 * IDMAP_SIZE as u64)], r).is_err());
        // The top of the id space is never passed.
        let top = IdRange {
            start: u32::MAX - IDMAP_SIZE + 1,
            count: IDMAP_SIZE,
        };
        assert!(allocate_idmap(&[], &[], top).is_err());
    }

    #[test]
    fn idmap_avoids_subuid_ranges() {
        let reserved = parse_subid("root:100000:10000001\n# x\nbad line\n");
        assert_eq!(reserved, vec![(100000, 10000001)]);
        let base = allocate_idmap(&[], &reserved, IdRange::default()).unwrap();
        assert!(base as u64 >= 100000 + 10000001, "{base}");
        assert_eq!((base - IDMAP_START) % IDMAP_SIZE, 0);
    }

    #[test]
    fn procid_of_self_is_alive() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let stale = ProcId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!stale.alive());
        assert_eq!(ProcId::parse(&me.render()), Some(me));
    }

    #[test]
    fn init_pid_of_unknown_instance_is_none() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(init_pid(d.path(), "nope"), None);
    }
}
