//! The per-instance monitor process (`berth-agent __monitor <instance dir>`).
//!
//! Started detached by the engine; single-threaded (no tokio), so it may fork and clone. It
//! creates the container, keeps the console pty master and copies the console to
//! `console.log`, waits for init, restarts the container when init reports a reboot (killed by
//! SIGHUP) unless a stop was requested, and on exit removes everything the instance used on the
//! host (cgroups in every hierarchy, the host veth, the staging mount) before writing the final
//! state.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};

use super::{InstanceDir, InstanceRecord, Phase, ProcId, RuntimeError};
use crate::cgroup::{Cgroups, Limits};
use crate::sys::container::{Channel, ChildConfig, child_main};
use crate::sys::process::{ExitStatus, clone_fork, wait_pid};
use crate::sys::{mount, seccomp};

/// Console log size cap: beyond it, the log is rotated to `console.log.1`.
pub const CONSOLE_LOG_MAX: u64 = 1024 * 1024;

/// Host bridge settings the monitor needs to wire the instance's veth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeSettings {
    pub name: String,
    /// e.g. "10.87.3.1/24".
    pub cidr: String,
    pub nat: bool,
}

/// What the engine tells the monitor beyond the instance record (`monitor.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub state_dir: PathBuf,
    /// Where lxcfs is mounted (used when it is a mount point at start).
    pub lxcfs_dir: Option<PathBuf>,
    /// None: the host network is not set up; instances get only `lo`.
    pub bridge: Option<BridgeSettings>,
    /// Parent of instance cgroups under each hierarchy root ("" = the root).
    pub cgroup_parent: String,
    /// The agent's `cgroup_tag` ("" = none; absent in files of agents that had no tags).
    #[serde(default)]
    pub cgroup_tag: String,
}

impl InstanceDir {
    pub fn monitor_config_path(&self) -> PathBuf {
        self.0.join("monitor.json")
    }
}

/// Errors of one container start.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    #[error("cgroup setup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("network setup: {0}")]
    Network(#[from] crate::network::NetworkError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn ctx<T>(what: &str, r: std::io::Result<T>) -> Result<T, MonitorError> {
    r.map_err(|source| MonitorError::Io {
        what: what.to_string(),
        source,
    })
}

/// Entry point of `berth-agent __monitor <instance dir>`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let Some(dir) = args.first() else {
        eprintln!("usage: berth-agent __monitor <instance dir>");
        return 2;
    };
    if let Err(e) = crate::sys::process::daemonize() {
        eprintln!("monitor: daemonize: {e}");
        return 1;
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let dir = InstanceDir(PathBuf::from(dir));
    match run(&dir) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(dir = %dir.0.display(), "monitor failed: {e}");
            1
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn run(dir: &InstanceDir) -> Result<(), MonitorError> {
    let me = ProcId::of(std::process::id() as i32).ok_or_else(|| MonitorError::Io {
        what: "reading own start time".into(),
        source: std::io::Error::other("no /proc/self/stat"),
    })?;
    dir.write_monitor(me)?;
    let loaded = dir.read_record().and_then(|rec| {
        let cfg: MonitorConfig = super::read_json(&dir.monitor_config_path())?;
        Ok((rec, cfg))
    });
    let (rec, cfg) = match loaded {
        Ok(v) => v,
        Err(e) => {
            let mut st = dir.read_state();
            st.phase = Phase::Error;
            st.error = e.to_string();
            let _ = dir.write_state(&st);
            let _ = std::fs::remove_file(dir.monitor_pid_path());
            return Err(e.into());
        }
    };
    let name = rec.name.clone();
    let own_cgroups =
        Cgroups::detect().map(|c| c.with_parent(&cfg.cgroup_parent).with_tag(&cfg.cgroup_tag));
    // Every monitor of this agent shares one cgroup per hierarchy (`berth[-<tag>].monitors`),
    // out of the agent's: a cgroup of its own in each of the ten hierarchies cost each
    // instance about 230 KiB of kernel memory (a v1 memory cgroup alone about 185 KiB).
    if let Ok(cg) = &own_cgroups
        && let Err(e) = cg.enter_own(&monitors_cgroup(cg.tag()), me.pid)
    {
        tracing::warn!(instance = %name, "cannot move the monitor into the monitors' cgroup: {e}");
    }
    let result = loop {
        match boot_once(dir, &rec, &cfg) {
            Ok(BootEnd::Reboot) if !dir.stop_requested_path().exists() => {
                tracing::info!(instance = %name, "instance rebooting");
                continue;
            }
            Ok(end) => {
                tracing::info!(instance = %name, ?end, "instance stopped");
                break Ok(end);
            }
            Err(e) => break Err(e),
        }
    };
    let _ = std::fs::remove_file(dir.init_pid_path());
    let mut st = dir.read_state();
    st.init_pid = 0;
    st.started_at = 0;
    match &result {
        Ok(BootEnd::Crashed(msg)) => {
            st.phase = Phase::Stopped;
            st.error = msg.clone();
        }
        Ok(_) => {
            st.phase = Phase::Stopped;
            st.error.clear();
        }
        Err(e) => {
            st.phase = Phase::Error;
            st.error = e.to_string();
        }
    }
    dir.write_state(&st)?;
    // A monitor of an earlier agent had a cgroup of its own: remove it if one is left.
    if let Ok(cg) = &own_cgroups
        && let Err(e) = cg.leave_monitor(&name, None)
    {
        tracing::warn!(instance = %name, "cannot remove an old monitor cgroup: {e}");
    }
    let _ = std::fs::remove_file(dir.monitor_pid_path());
    result.map(drop)
}

/// The cgroup directory name (in every hierarchy) that all monitors of the agent with `tag`
/// share: `berth.monitors` or `berth-<tag>.monitors`.
pub fn monitors_cgroup(tag: Option<&str>) -> String {
    format!("{}.monitors", crate::cgroup::name_prefix(tag))
}

/// How one boot ended.
#[derive(Debug)]
enum BootEnd {
    /// init was killed by SIGHUP: `reboot`.
    Reboot,
    /// halt/poweroff (SIGINT) or killed by the engine.
    Halt,
    /// init exited on its own or died of another signal.
    Crashed(String),
}

/// What one boot set up on the host, torn down in reverse by [`Teardown::run`].
struct Teardown<'a> {
    name: &'a str,
    cgroups: Option<&'a Cgroups>,
    staging: Option<PathBuf>,
    /// The network, the host veth's name, and whether it was routed (then it has an nft
    /// table of its own to delete too).
    veth: Option<(crate::network::Network, String, bool)>,
    child: Option<i32>,
}

impl Teardown<'_> {
    fn run(&mut self) {
        if let Some(pid) = self.child.take() {
            let _ = crate::sys::process::kill(pid, libc::SIGKILL);
            let _ = wait_pid(pid, true);
        }
        if let Some((net, host, routed)) = self.veth.take()
            && let Err(e) = if routed {
                net.delete_veth(&host)
            } else {
                net.delete_bridged_veth(&host)
            }
        {
            tracing::warn!(instance = self.name, "removing veth {host}: {e}");
        }
        if let Some(p) = self.staging.take()
            && let Err(e) = mount::detach(&p)
        {
            tracing::warn!(instance = self.name, "detaching {}: {e}", p.display());
        }
        if let Some(cg) = self.cgroups.take()
            && let Err(e) = cg.destroy(self.name)
        {
            tracing::warn!(instance = self.name, "removing cgroups: {e}");
        }
    }
}

fn boot_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = n.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn boot_once(
    dir: &InstanceDir,
    rec: &InstanceRecord,
    cfg: &MonitorConfig,
) -> Result<BootEnd, MonitorError> {
    let name = rec.name.as_str();
    let cgroups = Cgroups::detect()?
        .with_parent(&cfg.cgroup_parent)
        .with_tag(&cfg.cgroup_tag);
    let mut td = Teardown {
        name,
        cgroups: None,
        staging: None,
        veth: None,
        child: None,
    };
    let r = boot_inner(dir, rec, cfg, &cgroups, &mut td);
    td.run();
    r
}

fn boot_inner<'a>(
    dir: &InstanceDir,
    rec: &InstanceRecord,
    cfg: &MonitorConfig,
    cgroups: &'a Cgroups,
    td: &mut Teardown<'a>,
) -> Result<BootEnd, MonitorError> {
    let name = rec.name.as_str();
    let userns = !rec.privileged();
    let base = rec.idmap_base;

    // cgroups, with limits, before anything runs in them.
    cgroups.destroy(name)?;
    td.cgroups = Some(cgroups);
    cgroups.create(name, userns.then_some(base))?;
    let (host_cpus, host_mem) = crate::cgroup::host_resources(cgroups);
    let limits = Limits::from_config(&rec.config, &host_cpus, host_mem)?;
    cgroups.apply_limits(name, &limits)?;
    if !userns {
        cgroups.restrict_devices(name)?;
    }

    // The root filesystem at the staging path: idmapped unless privileged or shifted on disk.
    let staging = dir.rootfs_mount();
    mount::detach(&staging).ok();
    ctx("creating staging dir", std::fs::create_dir_all(&staging))?;
    if userns && !rec.shifted_on_disk {
        let ns = ctx(
            "making the id-map user namespace",
            mount::userns_with_map(base, super::IDMAP_SIZE),
        )?;
        ctx(
            "idmapped mount of the root filesystem",
            mount::idmapped_bind(&rec.rootfs, &staging, &ns),
        )?;
    } else {
        ctx(
            "bind mount of the root filesystem",
            mount::bind(&rec.rootfs, &staging, true),
        )?;
    }
    td.staging = Some(staging.clone());

    // Network: a veth pair when the instance has an address and the host bridge is set up;
    // bridged, or routed when the address is outside the bridge's subnet.
    let net_spec = berth_proto::v1::NetworkSpec {
        ipv4_cidr: rec.network.ipv4_cidr.clone(),
        gateway: rec.network.gateway.clone(),
        nameservers: rec.network.nameservers.clone(),
        hwaddr: rec.network.hwaddr.clone(),
    };
    let mut peer = None;
    if !rec.network.ipv4_cidr.is_empty()
        && let Some(b) = &cfg.bridge
    {
        let net = crate::network::Network::adopt(
            crate::network::NetworkConfig {
                bridge: b.name.clone(),
                ipv4_cidr: Some(b.cidr.clone()),
                nat: b.nat,
            },
            &cfg.state_dir,
        )?;
        // An address outside the bridge's subnet (the instance moved here and kept it) is
        // routed to the host veth instead of bridged; `delete_veth` undoes either.
        let (pair, wiring) = net.wire_veth(name, &rec.network.hwaddr, &rec.network.ipv4_cidr)?;
        let routed = matches!(wiring, crate::network::Wiring::Routed(_));
        if let crate::network::Wiring::Routed(addr) = wiring {
            tracing::info!(instance = name, address = %addr, bridge = %b.name, "instance address is outside the bridge subnet: routed");
        }
        peer = Some(pair.peer.clone());
        td.veth = Some((net, pair.host, routed));
    }

    let lxcfs_dir = cfg.lxcfs_dir.clone().filter(|d| mount::is_mount_point(d));
    let child_cfg = ChildConfig {
        rootfs: staging.clone(),
        hostname: super::hostname_of(name).to_string(),
        userns,
        lxcfs_dir,
        boot_id: boot_id(),
        init: "/sbin/init".into(),
        env: vec!["container=berth".into()],
        seccomp: seccomp::compile_filters()?,
    };

    let (parent_chan, child_chan) = ctx("socketpair", Channel::pair())?;
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if userns {
        flags |= libc::CLONE_NEWUSER;
    }
    let pid = ctx("clone", clone_fork(flags))?;
    if pid == 0 {
        drop(parent_chan);
        child_main(&child_cfg, &child_chan);
    }
    drop(child_chan);
    td.child = Some(pid);

    if userns {
        let map = format!("0 {base} {}\n", super::IDMAP_SIZE);
        ctx(
            "writing uid_map",
            std::fs::write(format!("/proc/{pid}/uid_map"), &map),
        )?;
        ctx(
            "writing gid_map",
            std::fs::write(format!("/proc/{pid}/gid_map"), &map),
        )?;
    }
    cgroups.attach(name, pid)?;
    ctx("sending ids", parent_chan.send(b"ids"))?;
    ctx("container setup", parent_chan.expect("netns"))?;
    if let (Some(peer), Some((net, _, _))) = (&peer, &td.veth) {
        net.configure_in_netns(pid, peer, &net_spec)?;
    }
    ctx("sending net", parent_chan.send(b"net"))?;
    let master =
        ctx("container setup", parent_chan.expect("console"))?.ok_or_else(|| MonitorError::Io {
            what: "console".into(),
            source: std::io::Error::other("no console fd received"),
        })?;
    ctx("container setup", parent_chan.expect("ready"))?;
    // The child has pivoted into its copy; the host copy of the staging mount can go.
    if let Some(p) = td.staging.take() {
        let _ = mount::detach(&p);
    }
    ctx("sending exec", parent_chan.send(b"exec"))?;
    let (msg, _) = ctx("waiting for exec", parent_chan.recv())?;
    if !msg.is_empty() {
        let text = String::from_utf8_lossy(&msg).into_owned();
        return Err(MonitorError::Io {
            what: "starting init".into(),
            source: std::io::Error::other(text.trim_start_matches("error: ").to_string()),
        });
    }
    drop(parent_chan);

    let init = ProcId::of(pid).ok_or_else(|| MonitorError::Io {
        what: "init".into(),
        source: std::io::Error::other("init died at once"),
    })?;
    dir.write_init(init)?;
    let mut st = dir.read_state();
    st.phase = Phase::Running;
    st.init_pid = pid;
    st.started_at = now();
    st.error.clear();
    dir.write_state(&st)?;
    tracing::info!(instance = name, pid, "instance running");

    let status = watch(dir, pid, master);
    td.child = None;
    tracing::info!(instance = name, pid, ?status, "init exited");
    let end = match status {
        Ok(ExitStatus::Signaled(libc::SIGHUP)) => BootEnd::Reboot,
        Ok(ExitStatus::Signaled(libc::SIGINT)) | Ok(ExitStatus::Signaled(libc::SIGKILL)) => {
            BootEnd::Halt
        }
        Ok(ExitStatus::Exited(0)) => BootEnd::Halt,
        Ok(ExitStatus::Exited(c)) => BootEnd::Crashed(format!("init exited with status {c}")),
        Ok(ExitStatus::Signaled(s)) => BootEnd::Crashed(format!("init died of signal {s}")),
        Err(e) => BootEnd::Crashed(format!("waiting for init: {e}")),
    };
    Ok(end)
}

/// Copies console output to the log until init exits; returns init's exit status. Init's exit
/// wakes the loop at once (a pidfd in the poll set), so a stop is not delayed by a poll interval.
fn watch(dir: &InstanceDir, pid: i32, master: OwnedFd) -> std::io::Result<ExitStatus> {
    let mut log = ConsoleLog::open(dir.console_log_path());
    let mut master = std::fs::File::from(master);
    let mut buf = vec![0u8; 64 * 1024];
    let mut hup = false;
    // Without a pidfd, exits are seen at the next poll timeout.
    let exit_fd = crate::sys::process::pidfd(pid).ok();
    loop {
        if let Some(st) = wait_pid(pid, false)? {
            drain(&mut master, &mut buf, &mut log);
            return Ok(st);
        }
        if hup {
            // Nobody has the console open: wait for init's exit, and look again later.
            hup = false;
            match &exit_fd {
                Some(fd) => {
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::from(100u16)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
            continue;
        }
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = &exit_fd {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) => continue,
            Ok(_) => {
                let re = fds[0].revents().unwrap_or(PollFlags::empty());
                if re.contains(PollFlags::POLLIN) {
                    match master.read(&mut buf) {
                        Ok(0) => hup = true,
                        Ok(n) => log.write(&buf[..n]),
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => hup = true,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => hup = true,
                    }
                } else if !re.is_empty() {
                    hup = true;
                }
                // Otherwise init exited: the next turn reaps it.
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn drain(master: &mut std::fs::File, buf: &mut [u8], log: &mut ConsoleLog) {
    loop {
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n)
                if n > 0
                    && fds[0]
                        .revents()
                        .unwrap_or(PollFlags::empty())
                        .contains(PollFlags::POLLIN) =>
            {
                match master.read(buf) {
                    Ok(n) if n > 0 => log.write(&buf[..n]),
                    _ => return,
                }
            }
            _ => return,
        }
    }
}

/// The console log file, rotated at [`CONSOLE_LOG_MAX`].
struct ConsoleLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
}

impl ConsoleLog {
    fn open(path: PathBuf) -> ConsoleLog {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0);
        ConsoleLog { path, file, size }
    }

    fn write(&mut self, data: &[u8]) {
        if self.size + data.len() as u64 > CONSOLE_LOG_MAX {
            let _ = std::fs::rename(&self.path, rotated(&self.path));
            *self = ConsoleLog::open(self.path.clone());
        }
        if let Some(f) = &mut self.file
            && f.write_all(data).is_ok()
        {
            self.size += data.len() as u64;
        }
    }
}

/// The path of the rotated console log.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitors_share_one_cgroup_per_agent() {
        assert_eq!(monitors_cgroup(None), "berth.monitors");
        assert_eq!(monitors_cgroup(Some("dev-n1")), "berth-dev-n1.monitors");
        // Never an instance's payload or monitor cgroup, whatever the instance is called.
        for tag in [None, Some("dev-n1")] {
            let m = monitors_cgroup(tag);
            assert_eq!(crate::cgroup::parse_payload_name(tag, &m), None);
            assert_eq!(crate::cgroup::parse_monitor_name(tag, &m), None);
        }
    }
}
