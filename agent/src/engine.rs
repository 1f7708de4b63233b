//! The instance lifecycle on this node: create, start, stop, restart, delete, status, live
//! limit updates, console log, exec and files. Async at its surface; blocking work runs in
//! `spawn_blocking` or in helper processes (`__monitor`, `__exec`, `__file`).
//!
//! Running instances outlive the agent: each has a detached monitor process (see
//! [`crate::runtime::monitor`]); an [`Engine`] built after an agent restart finds them again
//! from the files in `<state_dir>/instances/<name>/`.
//!
//! Every call is idempotent (create with the same spec, start of a running instance, stop of a
//! stopped one succeed and change nothing). Calls on one instance are serialized by a
//! per-instance lock; different instances proceed in parallel.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::v1::{InstanceSpec, InstanceState, InstanceStatus, NetworkSpec, SnapshotInfo};
use tokio::io::AsyncRead;

use crate::cgroup::{CgroupError, Cgroups, Limits};
use crate::network::{Network, NetworkError};
use crate::runtime::exec::{ExecError, ExecRequest as HelperExecRequest, ExecSession};
use crate::runtime::files::{FileError, FileKind, FileMeta, FileRoot};
use crate::runtime::monitor::{BridgeSettings, MonitorConfig};
use crate::runtime::{
    InstanceDir, InstanceRecord, NetworkRecord, Phase, RuntimeError, RuntimeState,
};
use crate::storage::{StorageDriver, StorageError};

/// Default clean-stop timeout.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `/var/lib/berth/agent`: instance dirs live in `instances/` below it.
    pub state_dir: PathBuf,
    /// Where the engine mounts lxcfs when none runs (`/var/lib/berth/lxcfs`). A running lxcfs
    /// at `/var/lib/lxcfs` is reused.
    pub lxcfs_dir: PathBuf,
    /// Start lxcfs when none is mounted.
    pub start_lxcfs: bool,
    /// Whether the host network does outbound NAT (passed on to monitors that wire veths).
    pub nat: bool,
    /// The agent binary run as `__monitor`, `__exec` and `__file` (default: this executable).
    pub helper_exe: PathBuf,
    /// Parent of instance cgroups under each hierarchy root ("" = the roots).
    pub cgroup_parent: String,
    /// `[runtime] cgroup_tag`: "" names cgroups `berth.payload.<name>`, a tag
    /// `berth-<tag>.payload.<name>` (several agents on one host need distinct tags).
    pub cgroup_tag: String,
    /// How long a start may take until init runs.
    pub start_timeout: Duration,
    /// Host ids this engine hands to unprivileged instances.
    pub idmap_range: crate::runtime::IdRange,
    /// Where the lxcfs this engine starts writes its pid file (`/run/berth`).
    pub run_dir: PathBuf,
}

impl EngineConfig {
    /// Defaults for a state directory.
    pub fn new(state_dir: PathBuf) -> EngineConfig {
        EngineConfig {
            state_dir,
            lxcfs_dir: PathBuf::from("/var/lib/berth/lxcfs"),
            start_lxcfs: true,
            nat: true,
            helper_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            cgroup_parent: String::new(),
            cgroup_tag: String::new(),
            start_timeout: Duration::from_secs(60),
            idmap_range: crate::runtime::IdRange::default(),
            run_dir: PathBuf::from("/run/berth"),
        }
    }
}

/// Errors of engine calls. The first variants are the caller's fault or a state conflict
/// (the service maps them to 4xx-like gRPC codes).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("instance {0} not found")]
    NotFound(String),
    #[error("instance {0} already exists with a different spec")]
    AlreadyExists(String),
    #[error("instance {0} is not running")]
    NotRunning(String),
    #[error("instance busy: {0}")]
    Busy(String),
    #[error("instance {0} is running (stop it first)")]
    Running(String),
    #[error("invalid path: {0}")]
    InvalidPath(String),
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("network: {0}")]
    Network(#[from] NetworkError),
    #[error("cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("exec: {0}")]
    Exec(#[from] ExecError),
    #[error("files: {0}")]
    Files(FileError),
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<RuntimeError> for EngineError {
    fn from(e: RuntimeError) -> Self {
        EngineError::Runtime(e.to_string())
    }
}

impl From<FileError> for EngineError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::InvalidPath(p) | FileError::Escape(p) => EngineError::InvalidPath(p),
            other => EngineError::Files(other),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Runtime(format!("blocking task failed: {e}")))?
}

/// What to run in an instance (the engine fills in the instance's init, cgroups and
/// environment).
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub instance: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub uid: u32,
    pub gid: u32,
    /// (cols, rows) for a pty; None for pipes.
    pub tty: Option<(u16, u16)>,
}

/// A volume being published: the instance stays locked while this lives.
pub struct PublishSource {
    /// The instance volume or snapshot directory (`rootfs/` inside).
    pub path: PathBuf,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

struct Inner {
    idmap_lock: Mutex<()>,
    cfg: EngineConfig,
    storage: Arc<dyn StorageDriver>,
    network: Option<Arc<Network>>,
    cgroups: Cgroups,
}

/// The container engine of this node. `Send + Sync`; share it with an `Arc`.
pub struct Engine {
    inner: Arc<Inner>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Engine {
    /// An engine wiring instances with an address to the host bridge of `network`.
    pub fn new(
        cfg: EngineConfig,
        storage: Arc<dyn StorageDriver>,
        network: Arc<Network>,
    ) -> Result<Engine, EngineError> {
        Self::build(cfg, storage, Some(network))
    }

    /// An engine without host networking: instances get only `lo` in their own netns.
    pub fn without_network(
        cfg: EngineConfig,
        storage: Arc<dyn StorageDriver>,
    ) -> Result<Engine, EngineError> {
        Self::build(cfg, storage, None)
    }

    fn build(
        cfg: EngineConfig,
        storage: Arc<dyn StorageDriver>,
        network: Option<Arc<Network>>,
    ) -> Result<Engine, EngineError> {
        let dir = cfg.state_dir.join("instances");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        if !cfg.cgroup_tag.is_empty() {
            crate::cgroup::validate_tag(&cfg.cgroup_tag)
                .map_err(|e| EngineError::InvalidConfig(format!("cgroup_tag {e}")))?;
        }
        let cgroups = Cgroups::detect()?
            .with_parent(&cfg.cgroup_parent)
            .with_tag(&cfg.cgroup_tag);
        Ok(Engine {
            inner: Arc::new(Inner {
                idmap_lock: Mutex::new(()),
                cfg,
                storage,
                network,
                cgroups,
            }),
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The host's cgroup layout ("v2", "v1-hybrid", "v1").
    pub fn cgroup_layout(&self) -> &'static str {
        self.inner.cgroups.layout().as_str()
    }

    /// Whether instance root filesystems are attached through idmapped mounts.
    pub fn idmapped_mounts(&self) -> bool {
        self.inner.storage.supports_idmapped_mounts()
    }

    fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    fn dir(&self, name: &str) -> InstanceDir {
        InstanceDir::new(&self.inner.cfg.state_dir, name)
    }

    /// Instance names are node-local scoped names (`project_name` outside the default project).
    fn check_name(name: &str) -> Result<(), EngineError> {
        berth_proto::api::names::validate_scoped_name(name).map_err(EngineError::InvalidConfig)
    }

    /// Refuses `limits.disk` where the storage driver cannot honour it (before anything is
    /// made or changed).
    fn check_disk_limit(&self, config: &BTreeMap<String, String>) -> Result<(), EngineError> {
        if disk_limit(config)?.is_some() && !self.inner.storage.supports_disk_limits() {
            return Err(EngineError::InvalidConfig(
                StorageError::DiskLimitUnsupported {
                    driver: self.inner.storage.name(),
                }
                .to_string(),
            ));
        }
        Ok(())
    }

    /// Refuses with [`EngineError::Running`] while instance `name` runs.
    fn refuse_running(&self, name: &str) -> Result<(), EngineError> {
        if self.dir(name).live_monitor().is_some() {
            return Err(EngineError::Running(name.to_string()));
        }
        Ok(())
    }

    fn record(&self, name: &str) -> Result<InstanceRecord, EngineError> {
        Self::check_name(name)?;
        let dir = self.dir(name);
        if !dir.record_path().is_file() {
            return Err(EngineError::NotFound(name.to_string()));
        }
        Ok(dir.read_record()?)
    }

    /// At agent start: finds running instances again, clears what crashed instances left
    /// behind, and starts instances that should run (`boot.autostart=true`, or unset and
    /// running when the host went down).
    pub async fn recover(&self) -> Result<(), EngineError> {
        let names = crate::runtime::list_instances(&self.inner.cfg.state_dir);
        for name in names {
            let lock = self.lock(&name);
            let guard = lock.lock().await;
            let dir = self.dir(&name);
            if dir.live_monitor().is_some() {
                tracing::info!(instance = %name, "found running instance");
                continue;
            }
            let state = dir.read_state();
            if matches!(
                state.phase,
                Phase::Running | Phase::Starting | Phase::Stopping
            ) {
                tracing::warn!(instance = %name, "instance monitor is gone; cleaning up");
                let inner = self.inner.clone();
                let n = name.clone();
                blocking(move || inner.cleanup_leftovers(&n)).await?;
            }
            let rec = match dir.read_record() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(instance = %name, "skipping unreadable instance: {e}");
                    continue;
                }
            };
            let autostart = match rec.config.get("boot.autostart") {
                Some(v) => {
                    berth_proto::api::config::parse_bool("boot.autostart", v).unwrap_or(false)
                }
                None => state.last_running,
            };
            drop(guard);
            if autostart {
                tracing::info!(instance = %name, "autostarting instance");
                if let Err(e) = self.start(&name).await {
                    tracing::warn!(instance = %name, "autostart failed: {e}");
                }
            }
        }
        Ok(())
    }

    /// Creates an instance: its volume from the image, its id range, the guest's identity and
    /// network config written into the rootfs, and its record. Idempotent for the same spec.
    pub async fn create(&self, spec: &InstanceSpec) -> Result<InstanceStatus, EngineError> {
        self.create_with(spec, false).await
    }

    /// [`Engine::create`], or with `existing_volume` an instance around the volume
    /// `containers/<name>` that exists already (made by [`Engine::copy_volume`] or received by
    /// a transfer): its contents are kept (the image need not be on this node), the rest is as
    /// for a create (id range, hostname and network config written into it, disk limit,
    /// record). Idempotent for the same spec; a failure leaves the volume in place.
    pub async fn create_with(
        &self,
        spec: &InstanceSpec,
        existing_volume: bool,
    ) -> Result<InstanceStatus, EngineError> {
        let name = spec.name.clone();
        Self::check_name(&name)?;
        berth_proto::api::config::validate(&spec.config.clone().into_iter().collect())
            .map_err(|e| EngineError::InvalidConfig(e.0))?;
        // Checked before anything is made: a bad spec must not cost a volume.
        if let Some(net) = &spec.network {
            crate::network::check_guest_net(net)?;
        }
        self.check_disk_limit(&spec.config.clone().into_iter().collect())?;
        let lock = self.lock(&name);
        let _g = lock.lock().await;
        let dir = self.dir(&name);
        let net = spec.network.clone().unwrap_or_default();
        let network = NetworkRecord {
            ipv4_cidr: net.ipv4_cidr.clone(),
            gateway: net.gateway.clone(),
            nameservers: net.nameservers.clone(),
            hwaddr: net.hwaddr.clone(),
        };
        let config: BTreeMap<String, String> = spec.config.clone().into_iter().collect();
        if dir.record_path().is_file() {
            let rec = dir.read_record()?;
            if rec.image == spec.image && rec.config == config && rec.network == network {
                drop(_g);
                return self.status(&name).await;
            }
            return Err(EngineError::AlreadyExists(name));
        }
        let inner = self.inner.clone();
        let image = spec.image.clone();
        let n = name.clone();
        blocking(move || inner.create_blocking(&n, &image, config, network, &net, existing_volume))
            .await?;
        drop(_g);
        self.status(&name).await
    }

    /// Starts an instance and returns once its init runs. Starting a running one returns its
    /// status.
    pub async fn start(&self, name: &str) -> Result<InstanceStatus, EngineError> {
        let lock = self.lock(name);
        let _g = lock.lock().await;
        self.start_locked(name).await?;
        drop(_g);
        self.status(name).await
    }

    async fn start_locked(&self, name: &str) -> Result<(), EngineError> {
        let mut rec = self.record(name)?;
        let dir = self.dir(name);
        if let Some(m) = dir.live_monitor() {
            if dir.live_init().is_some() {
                return Ok(());
            }
            if dir.read_state().phase == Phase::Starting {
                return self.wait_started(name).await;
            }
            // The previous boot's monitor is still tearing down: let it finish.
            let deadline = Instant::now() + Duration::from_secs(30);
            let exited = crate::runtime::ExitWatch::new(m);
            while m.alive() {
                if Instant::now() > deadline {
                    return Err(EngineError::Busy(format!("{name} is still shutting down")));
                }
                exited.wait(Duration::from_millis(25)).await;
            }
        }
        if !rec.privileged() && rec.idmap_base == 0 {
            self.inner.assign_idmap(&dir, &mut rec)?;
        }
        let inner = self.inner.clone();
        let n = name.to_string();
        let disk = disk_limit(&rec.config)?;
        blocking(move || {
            inner.ensure_disk_limit(&n, disk)?;
            inner.spawn_monitor(&n)
        })
        .await?;
        self.wait_started(name).await
    }

    async fn wait_started(&self, name: &str) -> Result<(), EngineError> {
        let dir = self.dir(name);
        let spawned = Instant::now();
        let deadline = spawned + self.inner.cfg.start_timeout;
        let mut monitor_seen = false;
        loop {
            let st = dir.read_state();
            let monitor = dir.live_monitor();
            monitor_seen |= monitor.is_some();
            match st.phase {
                // Done once init runs, as LXD's start is: an exec waits for a systemd that is
                // still coming up to open its control socket (see `Engine::exec`).
                Phase::Running if dir.live_init().is_some() => return Ok(()),
                Phase::Error => {
                    return Err(EngineError::Runtime(format!(
                        "instance {name} failed to start: {}",
                        st.error
                    )));
                }
                Phase::Stopped if monitor.is_none() => {
                    let why = if st.error.is_empty() {
                        "init exited at once".to_string()
                    } else {
                        st.error
                    };
                    return Err(EngineError::Runtime(format!(
                        "instance {name} stopped while starting: {why}"
                    )));
                }
                _ => {}
            }
            let never_came = !monitor_seen && Instant::now() > spawned + Duration::from_secs(10);
            if monitor.is_none() && (monitor_seen || never_came || Instant::now() > deadline) {
                // Give the monitor a moment to have written its pid file.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if dir.live_monitor().is_none() && dir.read_state().phase == Phase::Starting {
                    let log = tail(&dir.monitor_log_path(), 2000);
                    let inner = self.inner.clone();
                    let n = name.to_string();
                    blocking(move || inner.cleanup_leftovers(&n)).await?;
                    return Err(EngineError::Runtime(format!(
                        "instance {name}: monitor exited during start: {log}"
                    )));
                }
            }
            if Instant::now() > deadline {
                // Nothing half-started stays behind: the monitor, init, cgroups, veth and
                // staging mount all go.
                let inner = self.inner.clone();
                let n = name.to_string();
                blocking(move || inner.cleanup_leftovers(&n)).await?;
                return Err(EngineError::Runtime(format!(
                    "instance {name} did not start within {:?}",
                    self.inner.cfg.start_timeout
                )));
            }
            // The monitor writes the state file within milliseconds of init's start: look
            // often at first (a small file read), so that the start is not held up by the
            // interval, then less often, so that many parallel starts do not spin.
            let poll = if spawned.elapsed() < START_POLL_FAST_FOR {
                START_POLL
            } else {
                START_POLL_SLOW
            };
            tokio::time::sleep(poll).await;
        }
    }

    /// Stops an instance: a clean shutdown request to init (SIGRTMIN+3 for systemd, SIGPWR
    /// otherwise), SIGKILL after `timeout` (zero: the instance's `boot.stop.timeout`, else
    /// [`DEFAULT_STOP_TIMEOUT`]); `force` kills at once. Returns once everything the
    /// instance used on the host is gone. Stopping a stopped instance returns its status.
    pub async fn stop(
        &self,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<InstanceStatus, EngineError> {
        let lock = self.lock(name);
        let _g = lock.lock().await;
        self.stop_locked(name, force, timeout).await?;
        drop(_g);
        self.status(name).await
    }

    async fn stop_locked(
        &self,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        let rec = self.record(name)?;
        let timeout = if timeout.is_zero() && !force {
            rec.config
                .get("boot.stop.timeout")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_STOP_TIMEOUT)
        } else {
            timeout
        };
        let dir = self.dir(name);
        let mut st = dir.read_state();
        st.last_running = false;
        dir.write_state(&st)?;
        let Some(monitor) = dir.live_monitor() else {
            if st.phase != Phase::Stopped {
                let inner = self.inner.clone();
                let n = name.to_string();
                blocking(move || inner.cleanup_leftovers(&n)).await?;
            }
            return Ok(());
        };
        std::fs::write(dir.stop_requested_path(), b"")
            .map_err(io_err(&dir.stop_requested_path()))?;
        // The clean-stop signal init expects: SIGRTMIN+3 when it blocks it (systemd), else
        // SIGPWR (busybox, sysvinit). Every init seen during the stop gets it once (a monitor
        // between boots may still start a new one).
        let clean_signal = |pid: i32| {
            let rt3 = crate::sys::process::sigrtmin_plus(3);
            if blocks_signal(pid, rt3) {
                rt3
            } else {
                libc::SIGPWR
            }
        };
        // Once init is killed, the monitor gets this long to notice and clean up.
        const KILL_WAIT: Duration = Duration::from_secs(15);
        let mut deadline = Instant::now() + if force { KILL_WAIT } else { timeout };
        let mut killing = force;
        let mut signalled: Option<crate::runtime::ProcId> = None;
        // Wakes the loop the moment the monitor exits instead of at its next poll.
        let exited = crate::runtime::ExitWatch::new(monitor);
        loop {
            if !monitor.alive() {
                break;
            }
            if let Some(init) = dir.live_init()
                && signalled != Some(init)
            {
                let sig = if killing {
                    libc::SIGKILL
                } else {
                    clean_signal(init.pid)
                };
                tracing::info!(instance = name, signal = sig, "stopping init");
                let _ = crate::sys::process::kill(init.pid, sig);
                signalled = Some(init);
            }
            if Instant::now() > deadline {
                if !killing {
                    tracing::info!(instance = name, "clean stop timed out; killing init");
                    killing = true;
                    signalled = None;
                    deadline = Instant::now() + KILL_WAIT;
                    continue;
                }
                // The monitor is stuck: kill it and clean up here.
                tracing::warn!(instance = name, "monitor did not finish; killing it");
                let _ = crate::sys::process::kill(monitor.pid, libc::SIGKILL);
                let inner = self.inner.clone();
                let n = name.to_string();
                blocking(move || inner.cleanup_leftovers(&n)).await?;
                break;
            }
            exited.wait(Duration::from_millis(25)).await;
        }
        let _ = std::fs::remove_file(dir.stop_requested_path());
        // The monitor cleans up; make sure nothing is left if it died mid-way.
        let inner = self.inner.clone();
        let n = name.to_string();
        if blocking(move || Ok(inner.cgroups.exists(&n))).await? {
            let inner = self.inner.clone();
            let n = name.to_string();
            blocking(move || inner.cleanup_leftovers(&n)).await?;
        }
        Ok(())
    }

    /// Stop (as [`Engine::stop`]) then start.
    pub async fn restart(
        &self,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<InstanceStatus, EngineError> {
        let lock = self.lock(name);
        let _g = lock.lock().await;
        self.stop_locked(name, force, timeout).await?;
        self.start_locked(name).await?;
        drop(_g);
        self.status(name).await
    }

    /// Deletes an instance and its volume. A running instance is refused unless `force`, which
    /// kills it first. Deleting a missing instance succeeds.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), EngineError> {
        Self::check_name(name)?;
        let lock = self.lock(name);
        let _g = lock.lock().await;
        let dir = self.dir(name);
        if !dir.path().exists() {
            return Ok(());
        }
        if dir.live_monitor().is_some() {
            if !force {
                return Err(EngineError::Busy(format!(
                    "{name} is running (stop it first or delete with force)"
                )));
            }
            self.stop_locked(name, true, Duration::ZERO).await?;
        }
        let inner = self.inner.clone();
        let n = name.to_string();
        blocking(move || {
            inner.cleanup_leftovers(&n)?;
            inner.storage.delete_instance_volume(&n)?;
            let d = InstanceDir::new(&inner.cfg.state_dir, &n);
            std::fs::remove_dir_all(d.path()).map_err(io_err(d.path()))?;
            Ok(())
        })
        .await?;
        tracing::info!(instance = name, "deleted instance");
        Ok(())
    }

    /// Renames a stopped instance (its volume and snapshots, runtime files and hostname); a
    /// running one is refused ([`EngineError::Busy`]). Renaming to the same name returns the
    /// status.
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<InstanceStatus, EngineError> {
        Self::check_name(new_name)?;
        if name == new_name {
            return self.status(name).await;
        }
        let lock = self.lock(name);
        let _g = lock.lock().await;
        let lock2 = self.lock(new_name);
        let _g2 = lock2.lock().await;
        let rec = self.record(name)?;
        let dir = self.dir(name);
        if dir.live_monitor().is_some() {
            // Its monitor keeps the old name for the whole run: it tears down the cgroups
            // and host veth named after it and writes its state files under the old
            // directory, so a rename in place would leave those behind.
            return Err(EngineError::Busy(format!(
                "{name} is running and a running instance cannot be renamed (its monitor holds the name's cgroups, network device and state files); stop it first"
            )));
        }
        let new_dir = self.dir(new_name);
        if new_dir.path().exists() || self.inner.storage.instance_volume(new_name).is_some() {
            return Err(EngineError::AlreadyExists(new_name.to_string()));
        }
        let inner = self.inner.clone();
        let (from, to) = (name.to_string(), new_name.to_string());
        blocking(move || {
            inner.cleanup_leftovers(&from)?;
            inner.storage.rename_instance_volume(&from, &to)?;
            let undo_volume = |inner: &Inner| {
                let _ = inner.storage.rename_instance_volume(&to, &from);
            };
            if let Err(e) = std::fs::rename(dir.path(), new_dir.path()) {
                undo_volume(&inner);
                return Err(io_err(dir.path())(e));
            }
            let mut rec = rec;
            rec.name = to.clone();
            if let Some(vol) = inner.storage.instance_volume(&to) {
                rec.rootfs = vol.join("rootfs");
            }
            let net = NetworkSpec {
                ipv4_cidr: rec.network.ipv4_cidr.clone(),
                gateway: rec.network.gateway.clone(),
                nameservers: rec.network.nameservers.clone(),
                hwaddr: rec.network.hwaddr.clone(),
            };
            if !rec.shifted_on_disk
                && let Err(e) = crate::network::write_guest_config(&rec.rootfs, &to, &net)
            {
                tracing::warn!(instance = %to, "rewriting guest identity after rename: {e}");
            }
            new_dir.write_record(&rec)?;
            Ok(())
        })
        .await?;
        drop(_g2);
        drop(_g);
        tracing::info!(instance = name, new_name, "renamed instance");
        self.status(new_name).await
    }

    /// The instance's state, usage and effective limits.
    pub async fn status(&self, name: &str) -> Result<InstanceStatus, EngineError> {
        let rec = self.record(name)?;
        let inner = self.inner.clone();
        blocking(move || Ok(inner.status_blocking(&rec))).await
    }

    /// The disk use and limit of an instance's root filesystem, when the storage driver
    /// tracks them (btrfs once quotas are on: the first `limits.disk` turns them on).
    pub async fn disk_usage(
        &self,
        name: &str,
    ) -> Result<Option<crate::storage::DiskUsage>, EngineError> {
        let rec = self.record(name)?;
        let inner = self.inner.clone();
        blocking(move || Ok(inner.storage.instance_disk_usage(&rec.name))).await
    }

    /// Status of every instance on this node.
    pub async fn list(&self) -> Result<Vec<InstanceStatus>, EngineError> {
        self.statuses(None, |inner, rec| inner.status_blocking(rec))
            .await
    }

    /// The status of each of `names` this node has (in the order given; names that are not
    /// valid instance names or not here are left out): a listing costs what it lists.
    pub async fn list_named(&self, names: Vec<String>) -> Result<Vec<InstanceStatus>, EngineError> {
        self.statuses(Some(names), |inner, rec| inner.status_blocking(rec))
            .await
    }

    /// Every instance's state, pid, address and error, without usage figures, limits or disk
    /// use (what heartbeats report: a handful of small file reads per instance instead of
    /// every cgroup and qgroup file).
    pub async fn list_states(&self) -> Result<Vec<InstanceStatus>, EngineError> {
        self.statuses(None, |inner, rec| inner.state_blocking(rec).0)
            .await
    }

    /// `status` of each instance named (valid names only), or of every instance on this node,
    /// on a blocking thread.
    async fn statuses(
        &self,
        names: Option<Vec<String>>,
        status: fn(&Inner, &InstanceRecord) -> InstanceStatus,
    ) -> Result<Vec<InstanceStatus>, EngineError> {
        let inner = self.inner.clone();
        blocking(move || {
            let names = match names {
                Some(names) => names
                    .into_iter()
                    .filter(|n| berth_proto::api::names::validate_scoped_name(n).is_ok())
                    .collect(),
                None => crate::runtime::list_instances(&inner.cfg.state_dir),
            };
            Ok(names
                .iter()
                .filter_map(|name| {
                    let rec = InstanceDir::new(&inner.cfg.state_dir, name)
                        .read_record()
                        .ok()?;
                    Some(status(&inner, &rec))
                })
                .collect())
        })
        .await
    }

    /// Replaces the instance's config. Limits take effect at once when it runs (applied before
    /// the config is stored, so a refused limit changes nothing).
    pub async fn update(
        &self,
        name: &str,
        config: BTreeMap<String, String>,
    ) -> Result<InstanceStatus, EngineError> {
        berth_proto::api::config::validate(&config).map_err(|e| EngineError::InvalidConfig(e.0))?;
        self.check_disk_limit(&config)?;
        let lock = self.lock(name);
        let _g = lock.lock().await;
        let mut rec = self.record(name)?;
        let dir = self.dir(name);
        let inner = self.inner.clone();
        let running = dir.live_init().is_some();
        let cfg = config.clone();
        let old_disk = disk_limit(&rec.config)?;
        let new_disk = disk_limit(&config)?;
        let n = name.to_string();
        blocking(move || {
            let (cpus, mem) = crate::cgroup::host_resources(&inner.cgroups);
            let limits = Limits::from_config(&cfg, &cpus, mem)
                .map_err(|e| EngineError::InvalidConfig(e.to_string()))?;
            // The disk limit holds whether or not the instance runs.
            if new_disk != old_disk {
                inner.storage.set_instance_disk_limit(&n, new_disk)?;
            }
            if running && let Err(e) = inner.cgroups.apply_limits(&n, &limits) {
                if new_disk != old_disk
                    && let Err(undo) = inner.storage.set_instance_disk_limit(&n, old_disk)
                {
                    tracing::warn!(instance = %n, "restoring the disk limit: {undo}");
                }
                return Err(e.into());
            }
            Ok(())
        })
        .await?;
        rec.config = config;
        if let Err(e) = dir.write_record(&rec) {
            // The stored config still says the old limit: put the volume's back too.
            if new_disk != old_disk {
                let inner = self.inner.clone();
                let n = name.to_string();
                let undo = blocking(move || {
                    inner
                        .storage
                        .set_instance_disk_limit(&n, old_disk)
                        .map_err(EngineError::from)
                })
                .await;
                if let Err(undo) = undo {
                    tracing::warn!(instance = %name, "restoring the disk limit: {undo}");
                }
            }
            return Err(e.into());
        }
        drop(_g);
        self.status(name).await
    }

    /// The newest `max_bytes` of the console log (0: all that is kept, up to 2 MiB).
    pub async fn console_log(&self, name: &str, max_bytes: u64) -> Result<Vec<u8>, EngineError> {
        self.record(name)?;
        let dir = self.dir(name);
        blocking(move || {
            let cur = dir.console_log_path();
            let old = crate::runtime::monitor::rotated(&cur);
            let mut data = std::fs::read(&old).unwrap_or_default();
            data.extend(std::fs::read(&cur).unwrap_or_default());
            let max = if max_bytes == 0 { u64::MAX } else { max_bytes };
            let skip = data
                .len()
                .saturating_sub(max.min(usize::MAX as u64) as usize);
            Ok(data.split_off(skip))
        })
        .await
    }

    /// Runs a command in a running instance ([`EngineError::NotRunning`] otherwise). The
    /// instance's `environment.*` config is added to the environment (the request's own
    /// variables win).
    pub async fn exec(&self, p: ExecRequest) -> Result<ExecSession, EngineError> {
        let rec = self.record(&p.instance)?;
        let dir = self.dir(&p.instance);
        let init = dir
            .live_init()
            .ok_or_else(|| EngineError::NotRunning(p.instance.clone()))?;
        // Right after a start, systemd may not take commands yet: `systemctl` would fail.
        wait_init_ready(&p.instance, init.pid, dir.read_state().started_at).await;
        let inner = self.inner.clone();
        let n = p.instance.clone();
        let cgroup_procs = blocking(move || Ok(inner.cgroups.exec_procs_files(&n)?)).await?;
        let mut env: BTreeMap<String, String> = rec
            .config
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("environment.")?.to_string(), v.clone())))
            .collect();
        env.extend(p.env);
        let req = HelperExecRequest {
            init_pid: init.pid,
            cgroup_procs,
            command: p.command,
            env,
            cwd: p.cwd,
            uid: p.uid,
            gid: p.gid,
            tty: p.tty,
            pty_owner: if rec.privileged() {
                None
            } else {
                Some((rec.idmap_base, rec.idmap_base))
            },
            helper_exe: self.inner.cfg.helper_exe.clone(),
        };
        Ok(ExecSession::spawn(req).await?)
    }

    fn file_root(&self, name: &str) -> Result<FileRoot, EngineError> {
        let rec = self.record(name)?;
        Ok(match self.dir(name).live_init() {
            Some(init) => FileRoot::Running {
                init_pid: init.pid,
                helper_exe: self.inner.cfg.helper_exe.clone(),
            },
            None if rec.shifted_on_disk => FileRoot::StoppedShifted {
                rootfs: rec.rootfs,
                id_base: rec.idmap_base,
            },
            None => FileRoot::Stopped { rootfs: rec.rootfs },
        })
    }

    /// Pushes a file, directory or symlink into the instance (ids are container ids).
    #[allow(clippy::too_many_arguments)]
    pub async fn push_file(
        &self,
        instance: &str,
        path: &str,
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        target: Option<String>,
        data: impl AsyncRead + Unpin + Send,
    ) -> Result<FileMeta, EngineError> {
        let root = self.file_root(instance)?;
        Ok(
            crate::runtime::files::push(&root, path, kind, mode, uid, gid, target.as_deref(), data)
                .await?,
        )
    }

    /// Pulls a file's metadata and, for a regular file, its content.
    pub async fn pull_file(
        &self,
        instance: &str,
        path: &str,
    ) -> Result<(FileMeta, Option<Pin<Box<dyn AsyncRead + Send>>>), EngineError> {
        let root = self.file_root(instance)?;
        Ok(crate::runtime::files::pull(&root, path).await?)
    }

    /// Deletes a file, symlink or empty directory in the instance.
    pub async fn delete_file(&self, instance: &str, path: &str) -> Result<(), EngineError> {
        let root = self.file_root(instance)?;
        Ok(crate::runtime::files::delete(&root, path).await?)
    }

    fn check_snapshot_name(snapshot: &str) -> Result<(), EngineError> {
        crate::storage::check_snapshot_name(snapshot)
            .map_err(|e| EngineError::InvalidConfig(e.to_string()))
    }

    /// Takes a snapshot of an instance, running or not (a running one's is crash-consistent,
    /// as a power cut would leave it). Taking one that exists returns it.
    pub async fn snapshot(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo, EngineError> {
        Self::check_snapshot_name(snapshot)?;
        let lock = self.lock(name);
        let _g = lock.lock().await;
        self.record(name)?;
        let inner = self.inner.clone();
        let (n, s) = (name.to_string(), snapshot.to_string());
        blocking(move || {
            let meta = inner.storage.create_snapshot(&n, &s)?;
            Ok(inner.snapshot_info(&n, meta, false))
        })
        .await
    }

    /// Deletes a snapshot; deleting a missing one (or one of a missing instance) succeeds.
    pub async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<(), EngineError> {
        Self::check_name(name)?;
        Self::check_snapshot_name(snapshot)?;
        let lock = self.lock(name);
        let _g = lock.lock().await;
        let inner = self.inner.clone();
        let (n, s) = (name.to_string(), snapshot.to_string());
        blocking(move || Ok(inner.storage.delete_snapshot(&n, &s)?)).await?;
        tracing::info!(instance = name, snapshot, "deleted snapshot");
        Ok(())
    }

    /// Renames a snapshot. Repeating a rename that was done returns the renamed snapshot.
    pub async fn rename_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        new_name: &str,
    ) -> Result<SnapshotInfo, EngineError> {
        Self::check_snapshot_name(snapshot)?;
        Self::check_snapshot_name(new_name)?;
        let lock = self.lock(name);
        let _g = lock.lock().await;
        self.record(name)?;
        let inner = self.inner.clone();
        let (n, from, to) = (name.to_string(), snapshot.to_string(), new_name.to_string());
        blocking(move || {
            let storage = &inner.storage;
            let from_path = storage.snapshot_path(&n, &from)?;
            let to_path = storage.snapshot_path(&n, &to)?;
            // Done already when only the new name is there.
            let done = to_path.is_dir() && !from_path.exists();
            if from != to && !done {
                storage.rename_snapshot(&n, &from, &to)?;
            } else if !to_path.is_dir() {
                return Err(StorageError::SnapshotNotFound {
                    instance: n,
                    snapshot: from,
                }
                .into());
            }
            let meta = crate::storage::SnapshotMeta {
                created_at: crate::storage::snapshot_created_at(&to_path),
                name: to.clone(),
            };
            tracing::info!(instance = %n, snapshot = %from, new_name = %to, "renamed snapshot");
            Ok(inner.snapshot_info(&n, meta, false))
        })
        .await
    }

    /// The instance's snapshots, oldest first, with their sizes.
    pub async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, EngineError> {
        self.record(name)?;
        let inner = self.inner.clone();
        let n = name.to_string();
        blocking(move || {
            let list = inner.storage.list_snapshots(&n)?;
            Ok(list
                .into_iter()
                .map(|m| inner.snapshot_info(&n, m, true))
                .collect())
        })
        .await
    }

    /// Restores a stopped instance's root filesystem from one of its snapshots (refused with
    /// [`EngineError::Running`] while it runs); its hostname and network config are written
    /// again, and its disk limit holds on the restored volume.
    pub async fn restore(&self, name: &str, snapshot: &str) -> Result<InstanceStatus, EngineError> {
        Self::check_snapshot_name(snapshot)?;
        let lock = self.lock(name);
        let _g = lock.lock().await;
        let rec = self.record(name)?;
        self.refuse_running(name)?;
        let inner = self.inner.clone();
        let s = snapshot.to_string();
        let dir = self.dir(name);
        let clean = dir.read_state().phase == Phase::Stopped;
        blocking(move || {
            // What a monitor that died left (a clean stop leaves nothing: its monitor tore
            // everything down before it wrote "stopped", unless a step of that failed and it
            // only warned: the cgroups and the staging mount are the ones that would matter).
            if !clean
                || inner.cgroups.exists(&rec.name)
                || crate::sys::mount::is_mount_point(&dir.rootfs_mount())
            {
                inner.cleanup_leftovers(&rec.name)?;
            }
            inner.storage.restore_snapshot(&rec.name, &s)?;
            inner.rewrite_identity(&rec)
        })
        .await?;
        tracing::info!(instance = name, snapshot, "restored instance from snapshot");
        drop(_g);
        self.status(name).await
    }

    /// After a transfer replaced a stopped instance's volume (a cross-node `--refresh`): writes
    /// its hostname and network config again and puts its disk limit on the new volume, as a
    /// local refresh does (the received root filesystem carries the source's identity).
    pub async fn refreshed(&self, name: &str) -> Result<(), EngineError> {
        let lock = self.lock(name);
        let _g = lock.lock().await;
        let rec = self.record(name)?;
        self.refuse_running(name)?;
        let inner = self.inner.clone();
        blocking(move || {
            if let Some(bytes) = disk_limit(&rec.config)? {
                inner
                    .storage
                    .set_instance_disk_limit(&rec.name, Some(bytes))?;
            }
            inner.rewrite_identity(&rec)
        })
        .await?;
        tracing::info!(instance = name, "wrote identity of a refreshed instance");
        Ok(())
    }

    /// The volume to publish as an image: a stopped instance's (refused with
    /// [`EngineError::Running`] while it runs) or one of its snapshots. The instance stays
    /// locked (it cannot start, be restored or deleted) until the returned value is dropped.
    pub async fn publish_source(
        &self,
        name: &str,
        snapshot: Option<&str>,
    ) -> Result<PublishSource, EngineError> {
        if let Some(s) = snapshot {
            Self::check_snapshot_name(s)?;
        }
        let guard = self.lock(name).lock_owned().await;
        let rec = self.record(name)?;
        if rec.shifted_on_disk {
            return Err(EngineError::InvalidConfig(format!(
                "instance {name} has host ids on disk (its pool has no idmapped mounts), so it cannot be published"
            )));
        }
        let storage = &self.inner.storage;
        let path = match snapshot {
            Some(s) => {
                let path = storage.snapshot_path(name, s)?;
                if !path.is_dir() {
                    return Err(StorageError::SnapshotNotFound {
                        instance: name.to_string(),
                        snapshot: s.to_string(),
                    }
                    .into());
                }
                path
            }
            None => {
                self.refuse_running(name)?;
                storage
                    .instance_volume(name)
                    .ok_or_else(|| StorageError::VolumeNotFound(name.to_string()))?
            }
        };
        Ok(PublishSource {
            path,
            _guard: guard,
        })
    }

    /// Makes the volume of a new instance `target` from instance `source` on this node (or its
    /// snapshot `source_snapshot`), with its snapshots unless `instance_only`; then
    /// [`Engine::create_with`] (existing volume) makes it an instance. A volume of that name
    /// without an instance (an earlier attempt) is replaced. With `refresh`, `target` is an
    /// existing stopped instance: its root filesystem is replaced (its hostname and network
    /// config written again) and the snapshots it lacks are added.
    pub async fn copy_volume(
        &self,
        source: &str,
        source_snapshot: Option<&str>,
        target: &str,
        instance_only: bool,
        refresh: bool,
    ) -> Result<(), EngineError> {
        Self::check_name(target)?;
        if let Some(s) = source_snapshot {
            Self::check_snapshot_name(s)?;
        }
        if source == target {
            return Err(EngineError::InvalidConfig(format!(
                "cannot copy instance {source} onto itself"
            )));
        }
        if !self.inner.storage.supports_idmapped_mounts() {
            return Err(EngineError::InvalidConfig(format!(
                "copies need idmapped mounts, which the {} pool's filesystem lacks",
                self.inner.storage.name()
            )));
        }
        // Two instance locks, always in name order.
        let (first, second) = if source < target {
            (source, target)
        } else {
            (target, source)
        };
        let l1 = self.lock(first);
        let _g1 = l1.lock().await;
        let l2 = self.lock(second);
        let _g2 = l2.lock().await;
        self.record(source)?;
        let target_dir = self.dir(target);
        let target_rec = if refresh {
            let rec = self.record(target)?;
            self.refuse_running(target)?;
            Some(rec)
        } else {
            if target_dir.record_path().is_file() {
                return Err(EngineError::AlreadyExists(target.to_string()));
            }
            None
        };
        let inner = self.inner.clone();
        let (src, snap, dst) = (
            source.to_string(),
            source_snapshot.map(str::to_string),
            target.to_string(),
        );
        blocking(move || {
            let storage = &inner.storage;
            if target_rec.is_none() && storage.instance_volume(&dst).is_some() {
                tracing::warn!(instance = %dst, "replacing a volume without an instance");
                storage.delete_instance_volume(&dst)?;
            }
            storage.copy_instance_volume(&src, snap.as_deref(), &dst, instance_only, refresh)?;
            if let Some(rec) = target_rec {
                inner.cleanup_leftovers(&rec.name)?;
                inner.rewrite_identity(&rec)?;
            }
            Ok(())
        })
        .await?;
        tracing::info!(
            source,
            target,
            snapshot = source_snapshot.unwrap_or(""),
            instance_only,
            refresh,
            "copied instance volume"
        );
        Ok(())
    }
}

impl Inner {
    /// A snapshot's wire form, with its size when `with_size` (0 when it cannot be read).
    /// Sizes can cost a walk of the snapshot's tree (without btrfs quotas), so only listings
    /// read them; taking and renaming a snapshot answer 0.
    fn snapshot_info(
        &self,
        instance: &str,
        meta: crate::storage::SnapshotMeta,
        with_size: bool,
    ) -> SnapshotInfo {
        let size_bytes = if !with_size {
            0
        } else {
            match self.storage.snapshot_size(instance, &meta.name) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(instance, snapshot = %meta.name, "cannot read the snapshot size: {e}");
                    0
                }
            }
        };
        SnapshotInfo {
            instance: instance.to_string(),
            name: meta.name,
            created_at: meta.created_at,
            size_bytes,
        }
    }

    /// Writes the instance's hostname and network config into its root filesystem again
    /// (after its contents came from a snapshot or another instance).
    fn rewrite_identity(&self, rec: &InstanceRecord) -> Result<(), EngineError> {
        if rec.shifted_on_disk {
            // Owners on disk are host ids: the files are written as they were.
            return Ok(());
        }
        let net = NetworkSpec {
            ipv4_cidr: rec.network.ipv4_cidr.clone(),
            gateway: rec.network.gateway.clone(),
            nameservers: rec.network.nameservers.clone(),
            hwaddr: rec.network.hwaddr.clone(),
        };
        crate::network::write_guest_config(&rec.rootfs, &rec.name, &net)?;
        Ok(())
    }

    /// Picks a free id range for `rec` and records it at once, under a lock, so concurrent
    /// creates never pick the same range.
    fn assign_idmap(&self, dir: &InstanceDir, rec: &mut InstanceRecord) -> Result<(), EngineError> {
        let _one_at_a_time = self.idmap_lock.lock().unwrap_or_else(|p| p.into_inner());
        rec.idmap_base = self.allocate_idmap(&rec.name)?;
        dir.write_record(rec)?;
        Ok(())
    }

    fn allocate_idmap(&self, except: &str) -> Result<u32, EngineError> {
        let used: Vec<u32> = crate::runtime::list_instances(&self.cfg.state_dir)
            .iter()
            .filter(|n| n.as_str() != except)
            .filter_map(|n| InstanceDir::new(&self.cfg.state_dir, n).read_record().ok())
            .map(|r| r.idmap_base)
            .filter(|b| *b != 0)
            .collect();
        let mut reserved = Vec::new();
        for f in ["/etc/subuid", "/etc/subgid"] {
            if let Ok(t) = std::fs::read_to_string(f) {
                reserved.extend(crate::runtime::parse_subid(&t));
            }
        }
        Ok(crate::runtime::allocate_idmap(
            &used,
            &reserved,
            self.cfg.idmap_range,
        )?)
    }

    fn create_blocking(
        &self,
        name: &str,
        image: &str,
        config: BTreeMap<String, String>,
        network: NetworkRecord,
        net: &NetworkSpec,
        existing_volume: bool,
    ) -> Result<(), EngineError> {
        let dir = InstanceDir::new(&self.cfg.state_dir, name);
        if existing_volume && self.storage.instance_volume(name).is_none() {
            return Err(EngineError::InvalidConfig(format!(
                "instance {name} should be made from an existing volume, but this node has none"
            )));
        }
        let mut undo: Vec<Box<dyn FnOnce()>> = Vec::new();
        let result = (|| {
            std::fs::create_dir_all(dir.path()).map_err(io_err(dir.path()))?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                    .map_err(io_err(dir.path()))?;
            }
            let d = dir.path().to_path_buf();
            undo.push(Box::new(move || {
                let _ = std::fs::remove_dir_all(&d);
            }));
            let vol = if existing_volume {
                // Kept on failure: it is the copy or transfer the caller made, and a retry
                // uses it again.
                self.storage
                    .instance_volume(name)
                    .ok_or_else(|| StorageError::VolumeNotFound(name.to_string()))?
            } else {
                // A volume without a record is what a crash in the middle of an earlier
                // create leaves: it belongs to no instance, so it goes before the new one is
                // made.
                if self.storage.instance_volume(name).is_some() {
                    tracing::warn!(instance = %name, "removing a volume an interrupted create left");
                    self.storage.delete_instance_volume(name)?;
                }
                let vol = self.storage.create_instance_volume(name, image)?;
                let storage = self.storage.clone();
                let n = name.to_string();
                undo.push(Box::new(move || {
                    let _ = storage.delete_instance_volume(&n);
                }));
                vol
            };
            // Before anything can write into the volume (and before any start).
            if let Some(bytes) = disk_limit(&config)? {
                self.storage.set_instance_disk_limit(name, Some(bytes))?;
            }
            let rootfs = vol.join("rootfs");
            let mut rec = InstanceRecord {
                name: name.to_string(),
                image: image.to_string(),
                config,
                network,
                idmap_base: 0,
                shifted_on_disk: false,
                rootfs: rootfs.clone(),
                created_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
            };
            // Identity and network config, written with container ids (uid 0 on disk).
            crate::network::write_guest_config(&rootfs, name, net)?;
            if !rec.privileged() {
                self.assign_idmap(&dir, &mut rec)?;
                if !self.storage.supports_idmapped_mounts() {
                    if existing_volume {
                        return Err(EngineError::InvalidConfig(format!(
                            "instance {name} cannot be made from an existing volume: the {} pool has no idmapped mounts, so its owners would need shifting twice",
                            self.storage.name()
                        )));
                    }
                    tracing::info!(
                        instance = name,
                        base = rec.idmap_base,
                        "shifting rootfs owners on disk"
                    );
                    shift_tree(&rootfs, rec.idmap_base)?;
                    rec.shifted_on_disk = true;
                }
            }
            dir.write_record(&rec)?;
            dir.write_state(&RuntimeState::default())?;
            tracing::info!(
                instance = name,
                image,
                idmap_base = rec.idmap_base,
                existing_volume,
                "created instance"
            );
            Ok(())
        })();
        if result.is_err() {
            for u in undo.into_iter().rev() {
                u();
            }
        }
        result
    }

    /// Makes sure the volume carries the configured disk limit before a start (it was set at
    /// create; this repairs a pool whose quotas were turned off by hand, or a volume that
    /// arrived without its limit). Costs one sysfs read when all is in order.
    fn ensure_disk_limit(&self, name: &str, limit: Option<u64>) -> Result<(), EngineError> {
        let Some(bytes) = limit else {
            return Ok(());
        };
        // A driver without disk limits refuses in `set_instance_disk_limit` below.
        let current = self.storage.instance_disk_usage(name).and_then(|d| d.limit);
        if current != Some(bytes) {
            tracing::info!(
                instance = name,
                bytes,
                "setting the disk limit before start"
            );
            self.storage.set_instance_disk_limit(name, Some(bytes))?;
        }
        Ok(())
    }

    fn spawn_monitor(&self, name: &str) -> Result<(), EngineError> {
        let dir = InstanceDir::new(&self.cfg.state_dir, name);
        let lxcfs_dir = if self.cfg.start_lxcfs {
            ensure_lxcfs(&self.cfg.lxcfs_dir, &self.cfg.run_dir, &self.cfg.state_dir)
        } else {
            existing_lxcfs(&self.cfg.lxcfs_dir)
        };
        let mcfg = MonitorConfig {
            state_dir: self.cfg.state_dir.clone(),
            lxcfs_dir,
            bridge: self.network.as_ref().map(|n| BridgeSettings {
                name: n.bridge().to_string(),
                cidr: n.bridge_cidr(),
                nat: self.cfg.nat,
            }),
            cgroup_parent: self.cfg.cgroup_parent.clone(),
            cgroup_tag: self.cfg.cgroup_tag.clone(),
        };
        crate::runtime::write_json(&dir.monitor_config_path(), &mcfg)?;
        let _ = std::fs::remove_file(dir.stop_requested_path());
        let mut st = dir.read_state();
        st.phase = Phase::Starting;
        st.error.clear();
        st.last_running = true;
        dir.write_state(&st)?;
        let log_path = dir.monitor_log_path();
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&log_path)
                .map_err(io_err(&log_path))?
        };
        let log2 = log.try_clone().map_err(io_err(&log_path))?;
        let mut child = std::process::Command::new(&self.cfg.helper_exe)
            .arg("__monitor")
            .arg(dir.path())
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err(&self.cfg.helper_exe))?;
        // The monitor forks and its first process exits at once.
        let status = child.wait().map_err(io_err(&self.cfg.helper_exe))?;
        if !status.success() {
            st.phase = Phase::Error;
            st.error = format!("monitor failed to start: {status}");
            dir.write_state(&st)?;
            return Err(EngineError::Runtime(st.error));
        }
        Ok(())
    }

    /// Removes what a dead monitor may have left: stray processes and cgroups, the host veth,
    /// the staging mount; marks the instance stopped.
    fn cleanup_leftovers(&self, name: &str) -> Result<(), EngineError> {
        let dir = InstanceDir::new(&self.cfg.state_dir, name);
        if let Some(m) = dir.live_monitor() {
            let _ = crate::sys::process::kill(m.pid, libc::SIGKILL);
        }
        if let Some(i) = dir.live_init() {
            let _ = crate::sys::process::kill(i.pid, libc::SIGKILL);
        }
        self.cgroups.destroy(name)?;
        self.cgroups.leave_monitor(name, None)?;
        if let Some(net) = &self.network {
            net.delete_veth(&Network::host_veth_name(name))?;
        }
        let staging = dir.rootfs_mount();
        if crate::sys::mount::is_mount_point(&staging) {
            crate::sys::mount::detach(&staging).map_err(io_err(&staging))?;
        }
        let _ = std::fs::remove_file(dir.init_pid_path());
        if dir.path().exists() {
            let mut st = dir.read_state();
            if st.phase != Phase::Error {
                st.phase = Phase::Stopped;
            }
            st.init_pid = 0;
            st.started_at = 0;
            dir.write_state(&st)?;
        }
        Ok(())
    }

    fn status_blocking(&self, rec: &InstanceRecord) -> InstanceStatus {
        let (mut s, init) = self.state_blocking(rec);
        if init.is_some() {
            let u = self.cgroups.usage(&rec.name);
            let limits = self.cgroups.read_limits(&rec.name);
            s.processes = u.processes as i64;
            s.memory_usage_bytes = u.memory_bytes;
            s.cpu_usage_ns = u.cpu_ns;
            s.memory_limit_bytes = limits
                .get("limits.memory")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            s.limits = limits.into_iter().collect();
        }
        // The disk limit holds whether or not the instance runs.
        if let Some(disk) = self.storage.instance_disk_usage(&rec.name) {
            s.disk_usage_bytes = disk.used;
            if let Some(limit) = disk.limit {
                s.limits.insert("limits.disk".into(), limit.to_string());
            }
        }
        s
    }

    /// An instance's state, pid, address, error and start time (no usage figures), and its
    /// live init when it runs.
    fn state_blocking(
        &self,
        rec: &InstanceRecord,
    ) -> (InstanceStatus, Option<crate::runtime::ProcId>) {
        let dir = InstanceDir::new(&self.cfg.state_dir, &rec.name);
        let st = dir.read_state();
        let init = dir.live_init();
        let monitor = dir.live_monitor();
        let state = match (init, monitor) {
            (Some(_), _) => InstanceState::Running,
            (None, Some(_)) if st.phase == Phase::Stopping => InstanceState::Running,
            _ if st.phase == Phase::Error => InstanceState::Error,
            _ => InstanceState::Stopped,
        };
        let mut s = InstanceStatus {
            name: rec.name.clone(),
            state: state as i32,
            image: rec.image.clone(),
            idmap_base: rec.idmap_base,
            ipv4: rec
                .network
                .ipv4_cidr
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            error: st.error.clone(),
            ..Default::default()
        };
        if let Some(i) = &init {
            s.pid = i.pid as i64;
            s.started_at = st.started_at;
        }
        (s, init)
    }
}

/// The `limits.disk` of a config in bytes (None when unset).
fn disk_limit(config: &BTreeMap<String, String>) -> Result<Option<u64>, EngineError> {
    config
        .get("limits.disk")
        .map(|v| {
            berth_proto::api::config::parse_bytes(v)
                .map_err(|e| EngineError::InvalidConfig(format!("limits.disk: {e}")))
        })
        .transpose()
}

/// Whether `pid` blocks signal `sig` (SigBlk in /proc/<pid>/status).
fn blocks_signal(pid: i32, sig: i32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .map(|mask| (1..=64).contains(&sig) && mask & (1u64 << (sig - 1)) != 0)
        .unwrap_or(false)
}

fn tail(path: &Path, max: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).trim().to_string()
}

/// How often a start looks at the instance's state file, and for systemd's control socket.
const START_POLL: Duration = Duration::from_millis(5);

/// How long a start looks at its state file every [`START_POLL`]; afterwards every
/// [`START_POLL_SLOW`] (a start that takes longer is held up by something slower than that).
const START_POLL_FAST_FOR: Duration = Duration::from_millis(150);

/// The start's look at its state file after [`START_POLL_FAST_FOR`].
const START_POLL_SLOW: Duration = Duration::from_millis(25);

/// How long after its start an instance's systemd gets to accept commands before an exec
/// stops waiting for it.
const SYSTEMD_READY_WAIT: Duration = Duration::from_secs(10);

/// Waits until init can be talked to: for systemd, until its private socket (what `systemctl`
/// uses as root) exists, so that `berth exec NAME -- systemctl ...` right after a start or a
/// launch works (a start returns once init runs, before systemd has set itself up). Other
/// inits are ready when they run. Waits at most until [`SYSTEMD_READY_WAIT`] after the start
/// (`started_at`, Unix seconds); never fails: a systemd slow to come up gets the command
/// anyway, with a warning. Past that window it looks at nothing; within it, a ready instance
/// costs a readlink and an openat2 on a blocking thread.
async fn wait_init_ready(name: &str, pid: i32, started_at: i64) {
    let now = crate::storage::now_unix();
    // Whole seconds: one more, so that a start late in a second still gets the full wait.
    let left = started_at
        .saturating_add(SYSTEMD_READY_WAIT.as_secs() as i64 + 1)
        .saturating_sub(now)
        .max(0) as u64;
    if left == 0 {
        // Long after the start: no look into the instance at all.
        return;
    }
    // Off the async threads: the instance's files are the tenant's (a FUSE mount could block).
    let probe = move || -> (bool, bool) {
        let is_systemd = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().contains("systemd"))
            .unwrap_or(false);
        (is_systemd, is_systemd && systemd_socket_exists(pid))
    };
    match tokio::task::spawn_blocking(probe).await {
        Ok((true, false)) => {}
        _ => return,
    }
    let waiting = Instant::now();
    let deadline = waiting + Duration::from_secs(left).min(SYSTEMD_READY_WAIT);
    while Instant::now() < deadline {
        let poll = if waiting.elapsed() < START_POLL_FAST_FOR {
            START_POLL
        } else {
            START_POLL_SLOW
        };
        tokio::time::sleep(poll).await;
        let ready = tokio::task::spawn_blocking(move || {
            systemd_socket_exists(pid) || !Path::new(&format!("/proc/{pid}")).exists()
        })
        .await
        .unwrap_or(true);
        if ready {
            return;
        }
    }
    tracing::warn!(instance = %name, "systemd did not open its control socket within {SYSTEMD_READY_WAIT:?} of the start");
}

/// Whether systemd's private socket (`/run/systemd/private`) exists in the instance whose
/// init is `pid`, resolved inside the instance's root: its symlinks cannot point the check at
/// the host's files.
fn systemd_socket_exists(pid: i32) -> bool {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let Ok(root) = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    rustix::fs::openat2(
        &root,
        "run/systemd/private",
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .is_ok()
}

/// A mounted lxcfs: the system one at /var/lib/lxcfs, else ours at `dir`.
fn existing_lxcfs(dir: &Path) -> Option<PathBuf> {
    [Path::new("/var/lib/lxcfs"), dir]
        .into_iter()
        .find(|d| crate::sys::mount::is_mount_point(d) && d.join("proc/meminfo").exists())
        .map(Path::to_path_buf)
}

/// Returns a mounted lxcfs, starting one at `dir` when none runs. Failures are logged and
/// leave instances without lxcfs views.
fn ensure_lxcfs(dir: &Path, run_dir: &Path, state_dir: &Path) -> Option<PathBuf> {
    static STARTING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = STARTING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = existing_lxcfs(dir) {
        return Some(d);
    }
    // A mount whose lxcfs died answers nothing ("transport endpoint is not connected"):
    // detach it and start afresh.
    if crate::sys::mount::is_mount_point(dir) {
        tracing::warn!(dir = %dir.display(), "lxcfs mount is dead; remounting");
        if let Err(e) = crate::sys::mount::detach(dir) {
            tracing::warn!("cannot detach the dead lxcfs mount {}: {e}", dir.display());
            return None;
        }
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::warn!("cannot create lxcfs dir {}: {e}", dir.display());
        return None;
    }
    // By default one lxcfs serves every agent on the host, so its pid file is in the run
    // directory, not this agent's state directory (which may be removed while lxcfs keeps
    // serving).
    let _ = std::fs::create_dir_all(run_dir);
    let pidfile = run_dir.join("lxcfs.pid");
    let logfile = state_dir.join("lxcfs.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&logfile)
        .ok();
    let mut cmd = std::process::Command::new("lxcfs");
    cmd.arg("-p")
        .arg(&pidfile)
        .arg(dir)
        .stdin(std::process::Stdio::null());
    if let Some(l) = log
        && let Ok(l2) = l.try_clone()
    {
        cmd.stdout(l).stderr(l2);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot start lxcfs: {e}");
            return None;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(d) = existing_lxcfs(dir) {
            tracing::info!(dir = %d.display(), "lxcfs started");
            // Out of the agent's cgroup, so stopping the agent's service leaves it running.
            let pid = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .unwrap_or(child.id() as i32);
            if let Ok(cg) = Cgroups::detect()
                && let Err(e) = cg.enter_own("berth.lxcfs", pid)
            {
                tracing::warn!("cannot move lxcfs into its own cgroup: {e}");
            }
            // Reap it whenever it exits (it may stay in the foreground).
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Some(d);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!("lxcfs did not come up at {}", dir.display());
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Shifts every owner in `root` by `base` (for filesystems without idmapped mounts), once at
/// create time. Symlinks are not followed; setuid/setgid bits (cleared by chown) are restored.
fn shift_tree(root: &Path, base: u32) -> Result<(), EngineError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).map_err(io_err(&p))?;
        // Ids outside the instance's range (an image may carry any) become its nobody
        // (65534), never another range's ids or a wrapped-around host id.
        let shift = |id: u32| base + if id < 65536 { id } else { 65534 };
        std::os::unix::fs::lchown(&p, Some(shift(m.uid())), Some(shift(m.gid())))
            .map_err(io_err(&p))?;
        if !m.file_type().is_symlink() && m.mode() & 0o6000 != 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m.mode() & 0o7777))
                .map_err(io_err(&p))?;
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).map_err(io_err(&p))? {
                stack.push(e.map_err(io_err(&p))?.path());
            }
        }
    }
    Ok(())
}
