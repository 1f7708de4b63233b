//! cgroups for instances, on cgroup v2 (unified only), v1 hybrid (v1 controllers plus an empty
//! cgroup2 at `unified`, like this project's hosts) and pure v1.
//!
//! Every instance gets `berth.payload.<name>` (`berth-<tag>.payload.<name>` when the agent has a
//! `[runtime] cgroup_tag`, so several agents on one host never share a cgroup) in EVERY mounted hierarchy (each v1 controller,
//! `name=systemd` and the unified one), directly under the hierarchy root (or under a configured
//! parent), never under the agent's own cgroup, so it outlives the agent. Ownership follows
//! RUNTIME-NOTES §2: directory `0:<root gid>` mode 0775, `cgroup.procs`/`tasks` (v1) and
//! `cgroup.procs`/`cgroup.threads`/`cgroup.subtree_control` (v2) `0:<root gid>` mode 0664, so the
//! instance's root (a member of that group) may manage its own subtree.
//!
//! Everything works on paths: tests inject a temp dir as the hierarchy mounts.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_proto::api::config::{
    CpuAllowance, CpuLimit, format_cpu_set, parse_cpu, parse_cpu_allowance, parse_cpu_set,
    parse_memory, parse_processes,
};

/// Errors from cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy is mounted")]
    NoHierarchy,
    #[error("cgroup i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    #[error("cgroup {path} still has processes after killing them")]
    Busy { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup layout of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// cgroup2 only.
    V2,
    /// v1 controllers plus a cgroup2 hierarchy.
    V1Hybrid,
    /// v1 only.
    V1,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Layout {
    /// The layout of this host (from /proc/self/mountinfo).
    pub fn detect() -> Result<Layout, CgroupError> {
        Ok(Cgroups::detect()?.layout())
    }

    /// "v2", "v1-hybrid" or "v1" (as in `NodeInfo.cgroup_layout`).
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::V2 => "v2",
            Layout::V1Hybrid => "v1-hybrid",
            Layout::V1 => "v1",
        }
    }
}

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted (its root cgroup).
    pub mount: PathBuf,
    /// `None` for cgroup2; the v1 controllers (and `name=...`) otherwise.
    pub controllers: Option<Vec<String>>,
}

impl Hierarchy {
    fn is_v2(&self) -> bool {
        self.controllers.is_none()
    }
    fn has(&self, ctrl: &str) -> bool {
        match &self.controllers {
            Some(c) => c.iter().any(|x| x == ctrl),
            None => std::fs::read_to_string(self.mount.join("cgroup.controllers"))
                .map(|s| s.split_whitespace().any(|x| x == ctrl))
                .unwrap_or(false),
        }
    }
}

/// Resource usage of an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: u64,
    pub cpu_ns: u64,
    pub processes: u64,
}

/// Limits to apply; `None` means unlimited (a removed key resets the limit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPUs the instance may run on.
    pub cpus: Option<Vec<u32>>,
    /// (quota_us, period_us).
    pub cpu_quota: Option<(u64, u64)>,
    pub memory_bytes: Option<u64>,
    pub processes: Option<u64>,
}

impl Limits {
    /// Reads `limits.*` keys of an instance config. `host_cpus` are the CPUs available to
    /// instances, `host_memory` the host's memory in bytes.
    pub fn from_config(
        config: &BTreeMap<String, String>,
        host_cpus: &[u32],
        host_memory: u64,
    ) -> Result<Limits, CgroupError> {
        let bad = |e: berth_proto::api::config::ConfigError| CgroupError::InvalidLimit(e.0);
        let mut l = Limits::default();
        if let Some(v) = config.get("limits.cpu") {
            l.cpus = Some(match parse_cpu(v).map_err(bad)? {
                CpuLimit::Count(n) => {
                    let n = (n as usize).min(host_cpus.len());
                    host_cpus[..n].to_vec()
                }
                CpuLimit::Set(set) => {
                    if let Some(c) = set.iter().find(|c| !host_cpus.contains(c)) {
                        return Err(CgroupError::InvalidLimit(format!(
                            "limits.cpu names CPU {c}, which this host does not have"
                        )));
                    }
                    set
                }
            });
        }
        if let Some(v) = config.get("limits.cpu.allowance") {
            l.cpu_quota = Some(match parse_cpu_allowance(v).map_err(bad)? {
                CpuAllowance::Percent(p) => {
                    let ncpu = l
                        .cpus
                        .as_ref()
                        .map(|c| c.len())
                        .unwrap_or(host_cpus.len())
                        .max(1);
                    let period = 100_000u64;
                    (period * p as u64 * ncpu as u64 / 100, period)
                }
                CpuAllowance::Quota {
                    quota_us,
                    period_us,
                } => (quota_us, period_us),
            });
        }
        if let Some(v) = config.get("limits.memory") {
            l.memory_bytes = Some(parse_memory(v).map_err(bad)?.bytes(host_memory));
        }
        if let Some(v) = config.get("limits.processes") {
            l.processes = Some(parse_processes(v).map_err(bad)?);
        }
        Ok(l)
    }
}

/// The longest `[runtime] cgroup_tag`.
pub const TAG_MAX: usize = 32;

/// Checks a `[runtime] cgroup_tag`: 1 to 32 characters of `a-z`, `0-9` and `-`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > TAG_MAX {
        return Err(format!("\"{tag}\" must be 1 to {TAG_MAX} characters long"));
    }
    if !tag
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "\"{tag}\" may only contain lowercase letters, digits and -"
        ));
    }
    Ok(())
}

/// The first component of every cgroup name of an agent: `berth` without a tag (the one agent
/// of a normal host), `berth-<tag>` with one.
pub fn name_prefix(tag: Option<&str>) -> String {
    match tag {
        None => "berth".to_string(),
        Some(t) => format!("berth-{t}"),
    }
}

/// The cgroup directory name of an instance: `berth.payload.<name>` or
/// `berth-<tag>.payload.<name>`.
pub fn payload_name(tag: Option<&str>, instance: &str) -> String {
    format!("{}.payload.{instance}", name_prefix(tag))
}

/// The cgroup directory name of an instance's monitor process: `berth.monitor.<name>` or
/// `berth-<tag>.monitor.<name>`.
pub fn monitor_name(tag: Option<&str>, instance: &str) -> String {
    format!("{}.monitor.{instance}", name_prefix(tag))
}

/// The instance whose payload cgroup `dirname` is, for the agent with `tag`; `None` for
/// other agents' cgroups, monitors and anything else.
pub fn parse_payload_name<'a>(tag: Option<&str>, dirname: &'a str) -> Option<&'a str> {
    parse_kind(tag, "payload", dirname)
}

/// The instance whose monitor cgroup `dirname` is, for the agent with `tag`.
pub fn parse_monitor_name<'a>(tag: Option<&str>, dirname: &'a str) -> Option<&'a str> {
    parse_kind(tag, "monitor", dirname)
}

fn parse_kind<'a>(tag: Option<&str>, kind: &str, dirname: &'a str) -> Option<&'a str> {
    // Tags hold no '.', so the prefix ends at the first '.': `berth-a` never matches a
    // `berth-a-b.*` or `berth.*` directory.
    let (prefix, rest) = dirname.split_once('.')?;
    let name = rest.strip_prefix(kind)?.strip_prefix('.')?;
    (prefix == name_prefix(tag) && !name.is_empty() && !name.contains('/')).then_some(name)
}

/// Device rules of privileged instances (see [`Cgroups::restrict_devices`]).
pub const DEVICE_ALLOW: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:229 rwm",
    "c 10:200 rwm",
];

/// The leaf inside the unified payload cgroup that exec'd processes join (like LXD's `.lxc`).
pub const EXEC_LEAF: &str = ".berth";

/// The instance cgroups of a host.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hierarchies: Vec<Hierarchy>,
    /// Relative parent under each hierarchy root ("" = the root).
    parent: PathBuf,
    /// Real cgroupfs (files cannot be unlinked, rmdir removes a cgroup with its files).
    real: bool,
    /// The agent's `cgroup_tag` (`None`: the untagged `berth.*` names).
    tag: Option<String>,
}

impl Cgroups {
    /// Detects the mounted hierarchies from /proc/self/mountinfo.
    pub fn detect() -> Result<Cgroups, CgroupError> {
        let p = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(p).map_err(io_err(p))?;
        let hierarchies = parse_mountinfo(&text);
        if hierarchies.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        Ok(Cgroups {
            hierarchies,
            parent: PathBuf::new(),
            real: true,
            tag: None,
        })
    }

    /// Uses the given hierarchies (tests: directories in a temp dir standing for cgroupfs).
    pub fn with_hierarchies(hierarchies: Vec<Hierarchy>, real: bool) -> Cgroups {
        Cgroups {
            hierarchies,
            parent: PathBuf::new(),
            real,
            tag: None,
        }
    }

    /// Puts instance cgroups under `parent` (relative to each hierarchy root) instead of the root.
    pub fn with_parent(mut self, parent: impl Into<PathBuf>) -> Cgroups {
        self.parent = parent.into();
        self
    }

    /// Names cgroups with the agent's `cgroup_tag` (see [`payload_name`]); `""` means no tag.
    /// The caller validated the tag ([`validate_tag`]).
    pub fn with_tag(mut self, tag: &str) -> Cgroups {
        self.tag = (!tag.is_empty()).then(|| tag.to_string());
        self
    }

    /// The tag this agent's cgroup names carry.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The instance's payload cgroup directory name (see [`payload_name`]).
    pub fn payload_name(&self, instance: &str) -> String {
        payload_name(self.tag(), instance)
    }

    /// The instance's monitor cgroup directory name (see [`monitor_name`]).
    pub fn monitor_name(&self, instance: &str) -> String {
        monitor_name(self.tag(), instance)
    }

    /// The instances that have a payload cgroup of this agent's tag in any hierarchy (others'
    /// cgroups are never listed), sorted.
    pub fn list_instances(&self) -> Vec<String> {
        let mut out = Vec::new();
        for h in &self.hierarchies {
            let Ok(rd) = std::fs::read_dir(self.parent_dir(h)) else {
                continue;
            };
            for e in rd.flatten() {
                let f = e.file_name();
                if let Some(n) = f.to_str().and_then(|f| parse_payload_name(self.tag(), f))
                    && e.file_type().map(|t| t.is_dir()).unwrap_or(false)
                {
                    out.push(n.to_string());
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    pub fn hierarchies(&self) -> &[Hierarchy] {
        &self.hierarchies
    }

    pub fn layout(&self) -> Layout {
        let v2 = self.hierarchies.iter().any(|h| h.is_v2());
        let v1 = self.hierarchies.iter().any(|h| !h.is_v2());
        match (v1, v2) {
            (true, true) => Layout::V1Hybrid,
            (true, false) => Layout::V1,
            _ => Layout::V2,
        }
    }

    fn parent_dir(&self, h: &Hierarchy) -> PathBuf {
        h.mount.join(&self.parent)
    }

    /// The instance's cgroup directory in every hierarchy.
    pub fn paths(&self, instance: &str) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| self.parent_dir(h).join(self.payload_name(instance)))
            .collect()
    }

    /// Whether any of the instance's cgroup directories exists.
    pub fn exists(&self, instance: &str) -> bool {
        self.paths(instance).iter().any(|p| p.is_dir())
    }

    fn dir_for(&self, instance: &str, ctrl: &str) -> Option<(PathBuf, bool)> {
        let h = self
            .hierarchies
            .iter()
            .find(|h| !h.is_v2() && h.has(ctrl))
            .or_else(|| self.hierarchies.iter().find(|h| h.is_v2() && h.has(ctrl)))?;
        Some((
            self.parent_dir(h).join(self.payload_name(instance)),
            h.is_v2(),
        ))
    }

    /// Creates the instance cgroups in every hierarchy (idempotent). `root_gid` is the host gid
    /// of the instance's root (None when privileged: no ownership change).
    pub fn create(&self, instance: &str, root_gid: Option<u32>) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            let parent = self.parent_dir(h);
            if !parent.is_dir() {
                std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
                if h.has("cpuset") && !h.is_v2() {
                    copy_cpuset(&h.mount, &parent)?;
                }
            }
            let dir = parent.join(self.payload_name(instance));
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&dir)(e)),
            }
            if !h.is_v2() && h.has("cpuset") {
                copy_cpuset(&parent, &dir)?;
                write(&dir.join("cgroup.clone_children"), "1")?;
            }
            if h.is_v2() && self.layout() == Layout::V2 {
                // Delegate the usual controllers down to the instance (errors: controller absent).
                let _ = std::fs::write(
                    parent.join("cgroup.subtree_control"),
                    "+cpu +cpuset +memory +pids",
                );
            }
            if let Some(gid) = root_gid {
                chown(&dir, gid, 0o775)?;
                let files: &[&str] = if h.is_v2() {
                    &["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"]
                } else {
                    &["cgroup.procs", "tasks"]
                };
                for f in files {
                    let p = dir.join(f);
                    if p.exists() {
                        chown(&p, gid, 0o664)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves the monitor process `pid` into its own monitor cgroup ([`monitor_name`]) in every
    /// hierarchy, out of the agent's cgroup (so a service manager stopping the agent does not
    /// take running instances with it).
    pub fn enter_monitor(&self, instance: &str, pid: i32) -> Result<(), CgroupError> {
        self.enter_own(&self.monitor_name(instance), pid)
    }

    /// Moves `pid` into a cgroup `dirname` (under the configured parent) in every hierarchy,
    /// created when missing (cpuset values copied from the parent).
    pub fn enter_own(&self, dirname: &str, pid: i32) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            let parent = self.parent_dir(h);
            if !parent.is_dir() {
                std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
                if h.has("cpuset") && !h.is_v2() {
                    copy_cpuset(&h.mount, &parent)?;
                }
            }
            let dir = parent.join(dirname);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&dir)(e)),
            }
            if !h.is_v2() && h.has("cpuset") {
                copy_cpuset(&parent, &dir)?;
            }
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Moves the monitor `pid` back to the hierarchy roots and removes its cgroups (also when
    /// the monitor is gone: then only the directories are removed).
    pub fn leave_monitor(&self, instance: &str, pid: Option<i32>) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            if let Some(pid) = pid {
                let _ = std::fs::write(h.mount.join("cgroup.procs"), pid.to_string());
            }
            let dir = self.parent_dir(h).join(self.monitor_name(instance));
            if dir.is_dir() {
                self.remove_one(&dir)?;
            }
        }
        Ok(())
    }

    /// Restricts device access of a privileged instance (v1 `devices` controller) to the nodes a
    /// machine container needs: the standard character devices, ttys and ptys, fuse and tun;
    /// mknod stays allowed, but opening other devices is refused. Without a v1 devices
    /// hierarchy (cgroup2 needs a BPF program for this) nothing is written.
    pub fn restrict_devices(&self, instance: &str) -> Result<(), CgroupError> {
        let Some((dir, false)) = self.dir_for(instance, "devices") else {
            return Ok(());
        };
        write(&dir.join("devices.deny"), "a")?;
        for rule in DEVICE_ALLOW {
            write(&dir.join("devices.allow"), rule)?;
        }
        Ok(())
    }

    /// Moves `pid` into the instance cgroup of every hierarchy.
    pub fn attach(&self, instance: &str, pid: i32) -> Result<(), CgroupError> {
        for dir in self.paths(instance) {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files an exec'd process is written into: the payload root in v1
    /// hierarchies, the [`EXEC_LEAF`] in cgroup2 (created when missing).
    pub fn exec_procs_files(&self, instance: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let mut out = Vec::new();
        for h in &self.hierarchies {
            let dir = self.parent_dir(h).join(self.payload_name(instance));
            if h.is_v2() {
                let leaf = dir.join(EXEC_LEAF);
                match std::fs::create_dir(&leaf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(&leaf)(e)),
                }
                out.push(leaf.join("cgroup.procs"));
            } else {
                out.push(dir.join("cgroup.procs"));
            }
        }
        Ok(out)
    }

    /// Writes the limits (all of them: `None` resets to unlimited). Works while running.
    pub fn apply_limits(&self, instance: &str, limits: &Limits) -> Result<(), CgroupError> {
        if let Some((dir, v2)) = self.dir_for(instance, "cpuset") {
            if v2 {
                // cgroup2: an empty cpuset.cpus means "the parent's"; children stay the
                // instance's own business.
                let cpus = limits
                    .cpus
                    .as_deref()
                    .map(format_cpu_set)
                    .unwrap_or_default();
                write(&dir.join("cpuset.cpus"), &cpus)?;
            } else {
                let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
                let cpus = match &limits.cpus {
                    Some(c) => format_cpu_set(c),
                    None => read(&parent.join("cpuset.cpus"))?,
                };
                write_cpuset_tree(&dir, cpus.trim())?;
            }
        } else if limits.cpus.is_some() {
            return Err(CgroupError::InvalidLimit(
                "limits.cpu needs the cpuset controller, which this host lacks".into(),
            ));
        }
        if let Some((dir, v2)) = self.dir_for(instance, "cpu") {
            if v2 {
                let v = match limits.cpu_quota {
                    Some((q, p)) => format!("{q} {p}"),
                    None => "max 100000".into(),
                };
                write(&dir.join("cpu.max"), &v)?;
            } else {
                match limits.cpu_quota {
                    Some((q, p)) => {
                        // Period first, so the quota is valid against it.
                        write(&dir.join("cpu.cfs_quota_us"), "-1")?;
                        write(&dir.join("cpu.cfs_period_us"), &p.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
                    }
                    None => write(&dir.join("cpu.cfs_quota_us"), "-1")?,
                }
            }
        } else if limits.cpu_quota.is_some() {
            return Err(CgroupError::InvalidLimit(
                "limits.cpu.allowance needs the cpu controller, which this host lacks".into(),
            ));
        }
        if let Some((dir, v2)) = self.dir_for(instance, "memory") {
            let (file, unlimited) = if v2 {
                ("memory.max", "max")
            } else {
                ("memory.limit_in_bytes", "-1")
            };
            let v = limits
                .memory_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| unlimited.to_string());
            write(&dir.join(file), &v)?;
        } else if limits.memory_bytes.is_some() {
            return Err(CgroupError::InvalidLimit(
                "limits.memory needs the memory controller, which this host lacks".into(),
            ));
        }
        if let Some((dir, _)) = self.dir_for(instance, "pids") {
            let v = limits
                .processes
                .map(|n| n.to_string())
                .unwrap_or_else(|| "max".into());
            write(&dir.join("pids.max"), &v)?;
        } else if limits.processes.is_some() {
            return Err(CgroupError::InvalidLimit(
                "limits.processes needs the pids controller, which this host lacks".into(),
            ));
        }
        Ok(())
    }

    /// The effective limits as read back from the kernel, as config-style keys (absent =
    /// unlimited): `limits.cpu` (a CPU list), `limits.cpu.allowance` ("Qms/Pms"),
    /// `limits.memory` (bytes), `limits.processes`.
    pub fn read_limits(&self, instance: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some((dir, v2)) = self.dir_for(instance, "cpuset") {
            let f = if v2 {
                "cpuset.cpus.effective"
            } else {
                "cpuset.cpus"
            };
            if let Ok(v) = read(&dir.join(f)) {
                let v = v.trim().to_string();
                let parent = dir
                    .parent()
                    .and_then(|p| read(&p.join(f)).ok())
                    .map(|s| s.trim().to_string());
                if !v.is_empty() && Some(&v) != parent.as_ref() {
                    out.insert("limits.cpu".into(), v);
                }
            }
        }
        if let Some((dir, v2)) = self.dir_for(instance, "cpu") {
            let q = if v2 {
                read(&dir.join("cpu.max")).ok().and_then(|s| {
                    let mut it = s.split_whitespace();
                    let q = it.next()?.parse::<u64>().ok()?;
                    let p = it.next()?.parse::<u64>().ok()?;
                    Some((q, p))
                })
            } else {
                let q = read(&dir.join("cpu.cfs_quota_us"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i64>().ok());
                let p = read(&dir.join("cpu.cfs_period_us"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok());
                match (q, p) {
                    (Some(q), Some(p)) if q > 0 => Some((q as u64, p)),
                    _ => None,
                }
            };
            if let Some((q, p)) = q {
                out.insert(
                    "limits.cpu.allowance".into(),
                    format!("{}ms/{}ms", q / 1000, p / 1000),
                );
            }
        }
        if let Some((dir, v2)) = self.dir_for(instance, "memory") {
            let f = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            if let Ok(v) = read(&dir.join(f))
                && let Ok(n) = v.trim().parse::<u64>()
                && n < (1u64 << 62)
            {
                out.insert("limits.memory".into(), n.to_string());
            }
        }
        if let Some((dir, _)) = self.dir_for(instance, "pids")
            && let Ok(v) = read(&dir.join("pids.max"))
            && v.trim() != "max"
        {
            out.insert("limits.processes".into(), v.trim().to_string());
        }
        out
    }

    /// Memory, CPU time and process count of the instance (0 where unreadable).
    pub fn usage(&self, instance: &str) -> Usage {
        let num = |p: PathBuf| -> u64 {
            read(&p)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut u = Usage::default();
        if let Some((dir, v2)) = self.dir_for(instance, "memory") {
            u.memory_bytes = num(dir.join(if v2 {
                "memory.current"
            } else {
                "memory.usage_in_bytes"
            }));
        }
        if let Some((dir, false)) = self.dir_for(instance, "cpuacct") {
            u.cpu_ns = num(dir.join("cpuacct.usage"));
        } else if let Some((dir, true)) = self.dir_for(instance, "cpu") {
            u.cpu_ns = read(&dir.join("cpu.stat"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
                })
                .unwrap_or(0)
                * 1000;
        }
        if let Some((dir, _)) = self.dir_for(instance, "pids") {
            u.processes = num(dir.join("pids.current"));
        }
        u
    }

    /// All pids in the instance's cgroups (any hierarchy, recursively), deduplicated.
    pub fn pids(&self, instance: &str) -> Vec<i32> {
        let mut out = Vec::new();
        for dir in self.paths(instance) {
            for d in subtree(&dir) {
                if let Ok(s) = read(&d.join("cgroup.procs")) {
                    out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Kills whatever is left in the instance's cgroups and removes them bottom-up in every
    /// hierarchy (systemd inside makes sub-cgroups). Succeeds when they are already gone.
    pub fn destroy(&self, instance: &str) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids(instance);
            if pids.is_empty() || !self.real {
                break;
            }
            for p in &pids {
                // SIGKILL leftovers; a pid that vanished meanwhile is fine.
                let _ = crate::sys::process::kill(*p, libc::SIGKILL);
            }
            if Instant::now() > deadline {
                let path = self.paths(instance).into_iter().next().unwrap_or_default();
                return Err(CgroupError::Busy { path });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in self.paths(instance) {
            let mut dirs = subtree(&dir);
            dirs.reverse();
            for d in dirs {
                self.remove_one(&d)?;
            }
        }
        Ok(())
    }

    fn remove_one(&self, dir: &Path) -> Result<(), CgroupError> {
        if !self.real
            && let Ok(rd) = std::fs::read_dir(dir)
        {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                // A cgroup whose last task is still exiting is briefly busy.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io_err(dir)(e)),
            }
        }
    }
}

/// The directory and all cgroup directories below it, parents before children (empty when
/// `dir` does not exist).
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return out;
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            let mut kids: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect();
            kids.sort();
            stack.extend(kids.into_iter().rev());
        }
        out.push(d);
    }
    out
}

fn read(p: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(p).map_err(io_err(p))
}

fn write(p: &Path, v: &str) -> Result<(), CgroupError> {
    std::fs::write(p, v).map_err(io_err(p))
}

fn chown(p: &Path, gid: u32, mode: u32) -> Result<(), CgroupError> {
    std::os::unix::fs::chown(p, Some(0), Some(gid)).map_err(io_err(p))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io_err(p))
}

fn copy_cpuset(from: &Path, to: &Path) -> Result<(), CgroupError> {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let cur = std::fs::read_to_string(to.join(f)).unwrap_or_default();
        if cur.trim().is_empty() {
            let v = read(&from.join(f))?;
            write(&to.join(f), v.trim())?;
        }
    }
    Ok(())
}

/// Writes `cpuset.cpus` to a cgroup and its descendants. v1 refuses a parent set that excludes
/// a child's CPUs and a child set outside its parent's, so write children-first then
/// parents-first; the second pass fixes whatever the first could not.
fn write_cpuset_tree(dir: &Path, cpus: &str) -> Result<(), CgroupError> {
    parse_cpu_set(cpus).map_err(|e| CgroupError::InvalidLimit(e.0))?;
    let tree = subtree(dir);
    for d in tree.iter().rev() {
        let _ = std::fs::write(d.join("cpuset.cpus"), cpus);
    }
    for d in tree.iter().skip(1) {
        let _ = std::fs::write(d.join("cpuset.cpus"), cpus);
    }
    write(&dir.join("cpuset.cpus"), cpus)
}

/// Parses /proc/self/mountinfo into the mounted cgroup hierarchies (first mount of each).
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rfields: Vec<&str> = right.split(' ').collect();
        if fields.len() < 5 || rfields.len() < 3 {
            continue;
        }
        let mount = PathBuf::from(fields[4]);
        let controllers = match rfields[0] {
            "cgroup2" => None,
            "cgroup" => Some(
                rfields[2]
                    .split(',')
                    .filter(|o| {
                        !matches!(
                            *o,
                            "rw" | "ro"
                                | "xattr"
                                | "noprefix"
                                | "clone_children"
                                | "cpuset_v2_mode"
                        ) && !o.starts_with("release_agent=")
                    })
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            ),
            _ => continue,
        };
        if out.iter().any(|h| h.controllers == controllers) {
            continue;
        }
        out.push(Hierarchy { mount, controllers });
    }
    out
}

/// The CPUs and memory instances may use on this host: the root cpuset and total RAM.
pub fn host_resources(cg: &Cgroups) -> (Vec<u32>, u64) {
    let cpus = cg
        .hierarchies
        .iter()
        .find(|h| h.has("cpuset"))
        .and_then(|h| {
            let f = if h.is_v2() {
                "cpuset.cpus.effective"
            } else {
                "cpuset.cpus"
            };
            read(&h.mount.join(f)).ok()
        })
        .and_then(|s| parse_cpu_set(s.trim()).ok())
        .unwrap_or_else(|| {
            let n = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1) as u32;
            (0..n).collect()
        });
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .unwrap_or(0)
        * 1024;
    (cpus, mem)
}

#[cfg(test)]
mod tests;
