//! Runtime integration tests: boot real containers (as root) from a busybox rootfs made from the
//! host's busybox-static, through the real engine, dir storage and cgroups.
//!
//! Run: `cargo test -p berth-agent --test runtime`
//! (the Debian/systemd test is `#[ignore]`d: it needs a debootstrapped rootfs at
//! /var/cache/berth-ci/debian12-rootfs; run it with `-- --ignored debian`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_agent::cgroup::Cgroups;
use berth_agent::engine::{Engine, EngineConfig, ExecRequest};
use berth_agent::runtime::InstanceDir;
use berth_agent::runtime::files::FileKind;
use berth_agent::storage::StorageDriver;
use berth_agent::storage::dir::DirDriver;
use berth_proto::v1::{InstanceSpec, InstanceState};
use tokio::io::AsyncReadExt;

const FP: &str = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "runtime tests need root (they boot containers)"
    );
}

/// Kills and removes whatever an instance left when a test fails half-way.
struct Guard {
    state_dir: PathBuf,
    name: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        cleanup_instance(&self.state_dir, &self.name, "");
    }
}

/// [`Guard`] for an engine with a cgroup tag.
struct TaggedGuard {
    state_dir: PathBuf,
    name: String,
    tag: String,
}

impl Drop for TaggedGuard {
    fn drop(&mut self) {
        cleanup_instance(&self.state_dir, &self.name, &self.tag);
    }
}

fn cleanup_instance(state_dir: &Path, name: &str, tag: &str) {
    let dir = InstanceDir::new(state_dir, name);
    for p in [dir.live_init(), dir.live_monitor()].into_iter().flatten() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(cg) = Cgroups::detect() {
        let cg = cg.with_tag(tag);
        let _ = cg.destroy(name);
        let _ = cg.leave_monitor(name, None);
        // The tag's shared monitors cgroup (empty once its monitors are gone).
        let shared = berth_agent::runtime::monitor::monitors_cgroup(Some(tag));
        for h in cg.hierarchies() {
            let _ = std::fs::remove_dir(h.mount.join(&shared));
        }
    }
    let _ = nix::mount::umount2(&dir.rootfs_mount(), nix::mount::MntFlags::MNT_DETACH);
}

struct Env {
    _tmp: tempfile::TempDir,
    state_dir: PathBuf,
    storage: Arc<dyn StorageDriver>,
}

impl Env {
    /// The test's own lxcfs mount point and pid file directory, so that nothing of it
    /// outlives the test (the daemon's defaults are shared by the whole host).
    fn lxcfs_dir(&self) -> PathBuf {
        self._tmp.path().join("lxcfs")
    }

    fn run_dir(&self) -> PathBuf {
        self._tmp.path().join("run")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.run_dir().join("lxcfs.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = nix::mount::umount2(&self.lxcfs_dir(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn env() -> Env {
    require_root();
    let tmp = tempfile::Builder::new()
        .prefix("berth-rt-")
        .tempdir_in("/var/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state_dir = tmp.path().join("state");
    let pool = tmp.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let storage: Arc<dyn StorageDriver> = Arc::new(DirDriver::open(&pool).unwrap());
    Env {
        state_dir,
        storage,
        _tmp: tmp,
    }
}

/// An image volume holding a busybox rootfs.
fn busybox_image(storage: &dyn StorageDriver) {
    let vol = storage.create_image_volume(FP).unwrap();
    let root = vol.join("rootfs");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
        "var",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let p = root.join(applet);
        if applet == "bin/busybox" || p.exists() {
            continue;
        }
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", &p).unwrap();
    }
    std::fs::write(
        root.join("etc/inittab"),
        "console::sysinit:/bin/echo berth-busybox-booted\nconsole::shutdown:/bin/echo berth-busybox-halting\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    storage.finish_image_volume(FP).unwrap();
}

fn engine(e: &Env) -> Engine {
    tagged_engine(e, "")
}

/// An engine whose cgroups carry `tag` ("" = none), like an agent with `[runtime] cgroup_tag`.
fn tagged_engine(e: &Env, tag: &str) -> Engine {
    let mut cfg = EngineConfig::new(e.state_dir.clone());
    cfg.helper_exe = PathBuf::from(env!("CARGO_BIN_EXE_berth-agent"));
    cfg.lxcfs_dir = e.lxcfs_dir();
    cfg.run_dir = e.run_dir();
    cfg.cgroup_tag = tag.to_string();
    Engine::without_network(cfg, e.storage.clone()).unwrap()
}

fn spec(name: &str, config: &[(&str, &str)]) -> InstanceSpec {
    InstanceSpec {
        name: name.to_string(),
        image: FP.to_string(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        network: None,
    }
}

async fn run(engine: &Engine, name: &str, cmd: &[&str]) -> (i32, String) {
    let mut s = engine
        .exec(ExecRequest {
            instance: name.to_string(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(s.take_stdin());
    let mut out = s.take_stdout().unwrap();
    let mut err = s.take_stderr().unwrap();
    let mut so = Vec::new();
    let mut se = Vec::new();
    let (a, b) = tokio::join!(out.read_to_end(&mut so), err.read_to_end(&mut se));
    a.unwrap();
    b.unwrap();
    let code = s.wait().await.unwrap();
    if !se.is_empty() {
        eprintln!("{cmd:?} stderr: {}", String::from_utf8_lossy(&se));
    }
    (code, String::from_utf8_lossy(&so).into_owned())
}

fn mounted_under(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.to_string_lossy();
    info.lines().any(|l| l.contains(p.as_ref()))
}

fn field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_unprivileged_lifecycle() {
    let e = env();
    busybox_image(e.storage.as_ref());
    let name = "rt-bb1";
    let _guard = Guard {
        state_dir: e.state_dir.clone(),
        name: name.to_string(),
    };
    let eng = engine(&e);
    let s = eng
        .create(&spec(
            name,
            &[("limits.memory", "64MiB"), ("limits.cpu", "1")],
        ))
        .await
        .unwrap();
    assert_eq!(s.state, InstanceState::Stopped as i32);
    assert!(s.idmap_base >= 1_000_000);
    // Idempotent create.
    eng.create(&spec(
        name,
        &[("limits.memory", "64MiB"), ("limits.cpu", "1")],
    ))
    .await
    .unwrap();

    let s = eng.start(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32, "{s:?}");
    let pid = s.pid as i32;
    assert!(pid > 0);
    let base = s.idmap_base;
    // Start of a running instance is a no-op.
    assert_eq!(eng.start(name).await.unwrap().pid, s.pid);

    // Host view: init runs as the instance's base uid.
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(field(&st, "Uid:"), base.to_string());
    assert_eq!(field(&st, "Gid:"), base.to_string());
    // Bounding set lacks sys_module (bit 16) and sys_time (bit 25).
    let bnd = u64::from_str_radix(&field(&st, "CapBnd:"), 16).unwrap();
    assert_eq!(bnd & (1 << 16), 0);
    assert_eq!(bnd & (1 << 25), 0);
    assert_ne!(bnd & (1 << 22), 0, "sys_boot must stay");
    assert_eq!(field(&st, "Seccomp:"), "2");
    assert_eq!(field(&st, "NoNewPrivs:"), "0");
    // Inherits no ignored or blocked signal from the Rust monitor (busybox init sets its own).
    assert_eq!(
        u64::from_str_radix(&field(&st, "SigIgn:"), 16).unwrap() & (1 << (libc::SIGPIPE - 1)),
        0
    );
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert_eq!(env, b"container=berth\0");

    // Inside.
    assert_eq!(
        run(&eng, name, &["cat", "/proc/1/comm"]).await,
        (0, "init\n".into())
    );
    assert_eq!(run(&eng, name, &["id", "-u"]).await, (0, "0\n".into()));
    assert_eq!(
        run(&eng, name, &["hostname"]).await,
        (0, format!("{name}\n"))
    );
    assert_eq!(run(&eng, name, &["sh", "-c", "exit 7"]).await.0, 7);
    // Own network namespace with only lo, up.
    let (_, links) = run(&eng, name, &["ls", "/sys/class/net"]).await;
    assert_eq!(links.trim(), "lo");
    assert_eq!(
        run(&eng, name, &["ping", "-c", "1", "-W", "2", "127.0.0.1"])
            .await
            .0,
        0
    );
    let (_, ls) = run(&eng, name, &["ls", "-ln", "/bin/busybox"]).await;
    assert!(ls.contains(" 0 ") && ls.contains("busybox"), "{ls}");

    // Limits: cgroup files and the views inside.
    let cg = Cgroups::detect().unwrap();
    let mem = cg
        .paths(name)
        .into_iter()
        .find(|p| p.starts_with("/sys/fs/cgroup/memory"))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
            .unwrap()
            .trim(),
        (64u64 << 20).to_string()
    );
    assert_eq!(run(&eng, name, &["nproc"]).await, (0, "1\n".into()));
    // lxcfs's /proc/meminfo (what procps `free` reads; busybox `free` uses sysinfo(2), which
    // lxcfs cannot virtualize).
    let (_, meminfo) = run(&eng, name, &["head", "-1", "/proc/meminfo"]).await;
    assert_eq!(
        meminfo.split_whitespace().nth(1),
        Some("65536"),
        "MemTotal inside: {meminfo}"
    );
    let s = eng.status(name).await.unwrap();
    assert_eq!(s.memory_limit_bytes, 64 << 20);
    assert_eq!(s.limits.get("limits.cpu").map(String::as_str), Some("0"));
    assert!(s.processes >= 1);

    // Live limit change.
    let mut cfg = BTreeMap::new();
    cfg.insert("limits.memory".to_string(), "128MiB".to_string());
    let s = eng.update(name, cfg).await.unwrap();
    assert_eq!(s.memory_limit_bytes, 128 << 20);
    assert!(!s.limits.contains_key("limits.cpu"), "{:?}", s.limits);

    // Files: round trip and refused escapes.
    let data: &[u8] = b"hello from the host\n";
    eng.push_file(
        name,
        "/root/hello.txt",
        FileKind::File,
        0o640,
        0,
        0,
        None,
        data,
    )
    .await
    .unwrap();
    assert_eq!(
        run(&eng, name, &["cat", "/root/hello.txt"]).await,
        (0, "hello from the host\n".into())
    );
    let (meta, content) = eng.pull_file(name, "/root/hello.txt").await.unwrap();
    assert_eq!((meta.mode, meta.uid, meta.gid), (0o640, 0, 0));
    let mut buf = Vec::new();
    content.unwrap().read_to_end(&mut buf).await.unwrap();
    assert_eq!(buf, data);
    assert!(eng.pull_file(name, "../../etc/passwd").await.is_err());
    run(&eng, name, &["ln", "-s", "/etc", "/root/hostetc"]).await;
    let (m, c) = eng.pull_file(name, "/root/hostetc/passwd").await.unwrap();
    let mut buf = Vec::new();
    c.unwrap().read_to_end(&mut buf).await.unwrap();
    assert_eq!(m.size as usize, buf.len());
    assert_eq!(
        buf, b"root:x:0:0:root:/root:/bin/sh\n",
        "must be the instance's passwd"
    );

    // Console.
    let log = eng.console_log(name, 0).await.unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("berth-busybox-booted"),
        "{}",
        String::from_utf8_lossy(&log)
    );

    // Agent restart: a new engine finds the running instance.
    drop(eng);
    let eng = engine(&e);
    eng.recover().await.unwrap();
    let s = eng.status(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32);
    assert_eq!(s.pid as i32, pid);
    assert_eq!(run(&eng, name, &["cat", "/proc/1/comm"]).await.0, 0);

    // Clean stop (busybox gets SIGPWR) leaves nothing behind.
    let s = eng
        .stop(name, false, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(s.state, InstanceState::Stopped as i32, "{s:?}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!cg.exists(name));
    for h in cg.hierarchies() {
        let m = h.mount.join(format!("berth.monitor.{name}"));
        assert!(!m.exists(), "{m:?} left behind");
    }
    assert!(!mounted_under(&e.state_dir));
    let log = eng.console_log(name, 0).await.unwrap();
    assert!(String::from_utf8_lossy(&log).contains("berth-busybox-halting"));
    // Stop of a stopped instance is a no-op; exec refuses.
    eng.stop(name, false, Duration::from_secs(1)).await.unwrap();
    assert!(matches!(
        eng.exec(ExecRequest {
            instance: name.into(),
            command: vec!["true".into()],
            ..Default::default()
        })
        .await,
        Err(berth_agent::engine::EngineError::NotRunning(_))
    ));
    // Files of a stopped instance.
    let (meta, _) = eng.pull_file(name, "/root/hello.txt").await.unwrap();
    assert_eq!(meta.size, data.len() as u64);

    // Restart and force stop, then delete.
    let s = eng
        .restart(name, false, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(s.state, InstanceState::Running as i32);
    let s = eng.stop(name, true, Duration::ZERO).await.unwrap();
    assert_eq!(s.state, InstanceState::Stopped as i32);
    assert!(!cg.exists(name));
    eng.delete(name, false).await.unwrap();
    assert!(eng.status(name).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_privileged_boots() {
    let e = env();
    busybox_image(e.storage.as_ref());
    let name = "rt-bbpriv";
    let _guard = Guard {
        state_dir: e.state_dir.clone(),
        name: name.to_string(),
    };
    let eng = engine(&e);
    eng.create(&spec(name, &[("security.privileged", "true")]))
        .await
        .unwrap();
    let s = eng.start(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32);
    assert_eq!(s.idmap_base, 0);
    let st = std::fs::read_to_string(format!("/proc/{}/status", s.pid)).unwrap();
    assert_eq!(field(&st, "Uid:"), "0");
    assert_eq!(
        run(&eng, name, &["cat", "/proc/1/comm"]).await,
        (0, "init\n".into())
    );
    // Host knobs stay read-only and raw devices closed, even for a privileged instance.
    let (code, _) = run(
        &eng,
        name,
        &["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"],
    )
    .await;
    assert_ne!(code, 0);
    let (code, _) = run(
        &eng,
        name,
        &["sh", "-c", "echo x > /sys/kernel/uevent_helper"],
    )
    .await;
    assert_ne!(code, 0);
    let (code, _) = run(
        &eng,
        name,
        &["sh", "-c", "mknod /tmp/vda b 254 0 && head -c 1 /tmp/vda"],
    )
    .await;
    assert_ne!(code, 0, "block devices must not be readable");
    eng.delete(name, true).await.unwrap();
    assert!(!Cgroups::detect().unwrap().exists(name));
}

const DEBIAN_ROOTFS: &str = "/var/cache/berth-ci/debian12-rootfs";

/// Boots Debian 12 (systemd 252) unprivileged and waits for `systemctl is-system-running`.
/// Needs `debootstrap --variant=minbase --include=systemd-sysv,udev,iproute2,iputils-ping,procps,ca-certificates bookworm /var/cache/berth-ci/debian12-rootfs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a debootstrapped rootfs at /var/cache/berth-ci/debian12-rootfs"]
async fn debian12_systemd_unprivileged() {
    boot_debian("rt-deb12", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a debootstrapped rootfs at /var/cache/berth-ci/debian12-rootfs"]
async fn debian12_systemd_privileged() {
    boot_debian("rt-deb12p", true).await;
}

async fn boot_debian(name: &str, privileged: bool) {
    assert!(
        Path::new(DEBIAN_ROOTFS).join("sbin/init").exists(),
        "no debian rootfs at {DEBIAN_ROOTFS}"
    );
    let e = env();
    let vol = e.storage.create_image_volume(FP).unwrap();
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{DEBIAN_ROOTFS}/."))
        .arg(vol.join("rootfs"))
        .status()
        .unwrap();
    assert!(st.success());
    e.storage.finish_image_volume(FP).unwrap();
    let _guard = Guard {
        state_dir: e.state_dir.clone(),
        name: name.to_string(),
    };
    let eng = engine(&e);
    let privileged = if privileged { "true" } else { "false" };
    eng.create(&spec(
        name,
        &[
            ("limits.memory", "512MiB"),
            ("security.privileged", privileged),
        ],
    ))
    .await
    .unwrap();
    let t0 = std::time::Instant::now();
    let s = eng.start(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32);
    let mut last = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::time::Instant::now() < deadline {
        let (_, out) = run(&eng, name, &["systemctl", "is-system-running"]).await;
        last = out.trim().to_string();
        if last == "running" || last == "degraded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "debian12: is-system-running = {last} after {:?}",
        t0.elapsed()
    );
    let (_, failed) = run(&eng, name, &["systemctl", "--failed", "--no-legend"]).await;
    eprintln!("failed units: {failed}");
    let (_, meminfo) = run(&eng, name, &["head", "-1", "/proc/meminfo"]).await;
    eprintln!("meminfo: {meminfo}");
    assert_eq!(last, "running", "failed units: {failed}");
    let (_, virt) = run(&eng, name, &["systemd-detect-virt"]).await;
    eprintln!("systemd-detect-virt: {virt}");
    // Live CPU pinning reaches systemd's sub-cgroups too.
    let mut cfg = BTreeMap::new();
    cfg.insert("limits.memory".to_string(), "512MiB".to_string());
    cfg.insert("security.privileged".to_string(), privileged.to_string());
    cfg.insert("limits.cpu".to_string(), "1".to_string());
    let s = eng.update(name, cfg.clone()).await.unwrap();
    assert_eq!(s.limits.get("limits.cpu").map(String::as_str), Some("0"));
    assert_eq!(run(&eng, name, &["nproc"]).await, (0, "1\n".into()));
    cfg.remove("limits.cpu");
    let s = eng.update(name, cfg).await.unwrap();
    assert!(!s.limits.contains_key("limits.cpu"));
    let (_, n) = run(&eng, name, &["nproc"]).await;
    assert_eq!(n.trim().parse::<usize>().unwrap(), num_cpus());
    let t1 = std::time::Instant::now();
    let s = eng
        .stop(name, false, Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!("debian12: clean stop took {:?}", t1.elapsed());
    let log = eng.console_log(name, 600).await.unwrap();
    eprintln!("console tail:\n{}", String::from_utf8_lossy(&log));
    let mlog = std::fs::read_to_string(InstanceDir::new(&e.state_dir, name).monitor_log_path())
        .unwrap_or_default();
    eprintln!("monitor log:\n{mlog}");
    assert_eq!(s.state, InstanceState::Stopped as i32);
    assert!(!Cgroups::detect().unwrap().exists(name));
    eng.delete(name, false).await.unwrap();
}

/// Removes the test bridge and its nftables table.
struct NetGuard(Arc<berth_agent::network::Network>);

impl Drop for NetGuard {
    fn drop(&mut self) {
        let _ = self.0.teardown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_with_network() {
    use berth_agent::network::{Network, NetworkConfig};
    let e = env();
    busybox_image(e.storage.as_ref());
    let net = Arc::new(
        Network::setup(
            NetworkConfig {
                bridge: "berthrt0".into(),
                ipv4_cidr: Some("10.252.77.1/24".into()),
                nat: false,
            },
            &e.state_dir,
        )
        .unwrap(),
    );
    let _ng = NetGuard(net.clone());
    let name = "rt-bbnet";
    let _guard = Guard {
        state_dir: e.state_dir.clone(),
        name: name.to_string(),
    };
    let mut cfg = EngineConfig::new(e.state_dir.clone());
    cfg.helper_exe = PathBuf::from(env!("CARGO_BIN_EXE_berth-agent"));
    cfg.lxcfs_dir = e.lxcfs_dir();
    cfg.run_dir = e.run_dir();
    cfg.nat = false;
    let eng = Engine::new(cfg, e.storage.clone(), net.clone()).unwrap();
    let mut sp = spec(name, &[]);
    sp.network = Some(berth_proto::v1::NetworkSpec {
        ipv4_cidr: "10.252.77.10/24".into(),
        gateway: "10.252.77.1".into(),
        nameservers: vec![],
        hwaddr: "00:16:3e:12:34:56".into(),
    });
    eng.create(&sp).await.unwrap();
    let s = eng.start(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32);
    assert_eq!(s.ipv4, "10.252.77.10");
    let (_, addr) = run(&eng, name, &["ip", "addr", "show", "eth0"]).await;
    assert!(addr.contains("10.252.77.10/24"), "{addr}");
    assert!(addr.contains("00:16:3e:12:34:56"), "{addr}");
    let (code, out) = run(&eng, name, &["ping", "-c", "1", "-W", "3", "10.252.77.1"]).await;
    assert_eq!(code, 0, "{out}");
    let host_veth = Network::host_veth_name(name);
    assert!(Path::new("/sys/class/net").join(&host_veth).exists());
    eng.stop(name, true, Duration::ZERO).await.unwrap();
    assert!(!Path::new("/sys/class/net").join(&host_veth).exists());
    eng.delete(name, false).await.unwrap();
}

async fn wait_for<F: Fn(&InstanceStatusLike) -> bool>(
    eng: &Engine,
    name: &str,
    secs: u64,
    f: F,
) -> InstanceStatusLike {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = eng.status(name).await.unwrap();
        if f(&s) || std::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type InstanceStatusLike = berth_proto::v1::InstanceStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_reboot_and_crash_recovery() {
    let e = env();
    busybox_image(e.storage.as_ref());
    let name = "rt-bbreboot";
    let _guard = Guard {
        state_dir: e.state_dir.clone(),
        name: name.to_string(),
    };
    let eng = engine(&e);
    eng.create(&spec(name, &[])).await.unwrap();
    let s = eng.start(name).await.unwrap();
    let pid1 = s.pid;

    // `reboot` inside: init dies of SIGHUP, the monitor boots the instance again.
    let _ = run(&eng, name, &["reboot"]).await;
    let s = wait_for(&eng, name, 20, |s| {
        s.state == InstanceState::Running as i32 && s.pid != 0 && s.pid != pid1
    })
    .await;
    assert_eq!(s.state, InstanceState::Running as i32, "{s:?}");
    assert_ne!(s.pid, pid1);
    assert_eq!(run(&eng, name, &["cat", "/proc/1/comm"]).await.0, 0);

    // `poweroff` inside: the instance stops and its cgroups go away.
    let _ = run(&eng, name, &["poweroff"]).await;
    let s = wait_for(&eng, name, 20, |s| s.state == InstanceState::Stopped as i32).await;
    assert_eq!(s.state, InstanceState::Stopped as i32, "{s:?}");
    let cg = Cgroups::detect().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cg.exists(name) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!cg.exists(name));

    // A monitor killed outright (as by a host crash): init dies with it; recovery cleans up and
    // starts the instance again because it was running.
    let s = eng.start(name).await.unwrap();
    let pid2 = s.pid;
    let mon = InstanceDir::new(&e.state_dir, name).live_monitor().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mon.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid2}")).exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(eng);
    let eng = engine(&e);
    eng.recover().await.unwrap();
    let s = eng.status(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32, "{s:?}");
    assert_ne!(s.pid, pid2);

    // boot.autostart=false wins over the last state.
    let mut cfg = BTreeMap::new();
    cfg.insert("boot.autostart".to_string(), "false".to_string());
    eng.update(name, cfg).await.unwrap();
    let mon = InstanceDir::new(&e.state_dir, name).live_monitor().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mon.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let eng = engine(&e);
    eng.recover().await.unwrap();
    let s = eng.status(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Stopped as i32, "{s:?}");
    assert!(!cg.exists(name));
    eng.delete(name, true).await.unwrap();
}

/// A storage driver that claims no idmapped mount support (on-disk shift fallback).
struct NoIdmap(DirDriver);

impl StorageDriver for NoIdmap {
    fn name(&self) -> &'static str {
        "dir"
    }
    fn supports_idmapped_mounts(&self) -> bool {
        false
    }
    fn usage(&self) -> Result<berth_agent::storage::PoolUsage, berth_agent::storage::StorageError> {
        self.0.usage()
    }
    fn create_image_volume(&self, f: &str) -> Result<PathBuf, berth_agent::storage::StorageError> {
        self.0.create_image_volume(f)
    }
    fn finish_image_volume(&self, f: &str) -> Result<(), berth_agent::storage::StorageError> {
        self.0.finish_image_volume(f)
    }
    fn image_volume(&self, f: &str) -> Option<PathBuf> {
        self.0.image_volume(f)
    }
    fn delete_image_volume(&self, f: &str) -> Result<(), berth_agent::storage::StorageError> {
        self.0.delete_image_volume(f)
    }
    fn rename_image_volume(
        &self,
        a: &str,
        b: &str,
    ) -> Result<(), berth_agent::storage::StorageError> {
        self.0.rename_image_volume(a, b)
    }
    fn create_instance_volume(
        &self,
        n: &str,
        f: &str,
    ) -> Result<PathBuf, berth_agent::storage::StorageError> {
        self.0.create_instance_volume(n, f)
    }
    fn instance_volume(&self, n: &str) -> Option<PathBuf> {
        self.0.instance_volume(n)
    }
    fn delete_instance_volume(&self, n: &str) -> Result<(), berth_agent::storage::StorageError> {
        self.0.delete_instance_volume(n)
    }
    fn rename_instance_volume(
        &self,
        a: &str,
        b: &str,
    ) -> Result<(), berth_agent::storage::StorageError> {
        self.0.rename_instance_volume(a, b)
    }
    fn pool_root(&self) -> &Path {
        self.0.pool_root()
    }
    fn create_image_volume_from(
        &self,
        f: &str,
        src: &Path,
    ) -> Result<PathBuf, berth_agent::storage::StorageError> {
        self.0.create_image_volume_from(f, src)
    }
    fn create_snapshot(
        &self,
        n: &str,
        s: &str,
    ) -> Result<berth_agent::storage::SnapshotMeta, berth_agent::storage::StorageError> {
        self.0.create_snapshot(n, s)
    }
    fn delete_snapshot(&self, n: &str, s: &str) -> Result<(), berth_agent::storage::StorageError> {
        self.0.delete_snapshot(n, s)
    }
    fn restore_snapshot(&self, n: &str, s: &str) -> Result<(), berth_agent::storage::StorageError> {
        self.0.restore_snapshot(n, s)
    }
    fn copy_instance_volume(
        &self,
        src: &str,
        snap: Option<&str>,
        dst: &str,
        instance_only: bool,
        refresh: bool,
    ) -> Result<(), berth_agent::storage::StorageError> {
        self.0
            .copy_instance_volume(src, snap, dst, instance_only, refresh)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_shifted_rootfs_and_rename() {
    use std::os::unix::fs::MetadataExt;
    let mut e = env();
    let pool = e.state_dir.parent().unwrap().join("pool");
    e.storage = Arc::new(NoIdmap(DirDriver::open(&pool).unwrap()));
    busybox_image(e.storage.as_ref());
    let name = "rt-bbshift";
    let _guard = Guard {
        state_dir: e.state_dir.clone(),
        name: name.to_string(),
    };
    let _guard2 = Guard {
        state_dir: e.state_dir.clone(),
        name: "rt-bbshift2".to_string(),
    };
    let eng = engine(&e);
    let s = eng.create(&spec(name, &[])).await.unwrap();
    let base = s.idmap_base;
    let rootfs = e.storage.instance_volume(name).unwrap().join("rootfs");
    let m = std::fs::metadata(rootfs.join("bin/busybox")).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (base, base),
        "owners shifted once at create"
    );
    eng.start(name).await.unwrap();
    assert_eq!(run(&eng, name, &["id", "-u"]).await, (0, "0\n".into()));
    let (_, ls) = run(&eng, name, &["stat", "-c", "%u", "/bin/busybox"]).await;
    assert_eq!(ls.trim(), "0");
    // A restart does not shift again.
    eng.restart(name, true, Duration::ZERO).await.unwrap();
    let m = std::fs::metadata(rootfs.join("bin/busybox")).unwrap();
    assert_eq!(m.uid(), base);
    // Rename needs a stopped instance.
    assert!(matches!(
        eng.rename(name, "rt-bbshift2").await,
        Err(berth_agent::engine::EngineError::Busy(_))
    ));
    eng.stop(name, true, Duration::ZERO).await.unwrap();
    // Files of a stopped shifted instance show container ids.
    let (meta, _) = eng.pull_file(name, "/bin/busybox").await.unwrap();
    assert_eq!((meta.uid, meta.gid), (0, 0));
    let s = eng.rename(name, "rt-bbshift2").await.unwrap();
    assert_eq!(s.name, "rt-bbshift2");
    assert!(eng.status(name).await.is_err());
    let s = eng.start("rt-bbshift2").await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32);
    assert_eq!(
        run(&eng, "rt-bbshift2", &["hostname"]).await.1,
        "rt-bbshift2\n"
    );
    eng.delete("rt-bbshift2", true).await.unwrap();
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().unwrap().get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_undoes_itself() {
    let e = env();
    busybox_image(e.storage.as_ref());
    let name = "rt-bbfail";
    let _guard = Guard {
        state_dir: e.state_dir.clone(),
        name: name.to_string(),
    };
    let eng = engine(&e);
    eng.create(&spec(name, &[])).await.unwrap();
    let rootfs = e.storage.instance_volume(name).unwrap().join("rootfs");
    std::fs::remove_file(rootfs.join("sbin/init")).unwrap();
    let err = eng.start(name).await.unwrap_err().to_string();
    assert!(err.contains("/sbin/init"), "{err}");
    let s = eng.status(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Error as i32, "{s:?}");
    assert!(s.error.contains("/sbin/init"), "{s:?}");
    let cg = Cgroups::detect().unwrap();
    assert!(!cg.exists(name));
    assert!(!mounted_under(&e.state_dir));
    // Fixed, it starts.
    std::os::unix::fs::symlink("/bin/busybox", rootfs.join("sbin/init")).unwrap();
    let s = eng.start(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32);
    assert!(s.error.is_empty());
    eng.delete(name, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_in_parallel() {
    let e = env();
    busybox_image(e.storage.as_ref());
    let names: Vec<String> = (0..4).map(|i| format!("rt-par{i}")).collect();
    let _guards: Vec<Guard> = names
        .iter()
        .map(|n| Guard {
            state_dir: e.state_dir.clone(),
            name: n.clone(),
        })
        .collect();
    let eng = Arc::new(engine(&e));
    let mut tasks = Vec::new();
    for n in &names {
        let (eng, n) = (eng.clone(), n.clone());
        tasks.push(tokio::spawn(async move {
            eng.create(&spec(&n, &[])).await.unwrap();
            eng.start(&n).await.unwrap()
        }));
    }
    let mut bases = Vec::new();
    for t in tasks {
        let s = t.await.unwrap();
        assert_eq!(s.state, InstanceState::Running as i32);
        bases.push(s.idmap_base);
    }
    bases.sort_unstable();
    bases.dedup();
    assert_eq!(bases.len(), names.len(), "id ranges must not be shared");
    assert_eq!(eng.list().await.unwrap().len(), names.len());
    let mut tasks = Vec::new();
    for n in &names {
        let (eng, n) = (eng.clone(), n.clone());
        tasks.push(tokio::spawn(async move {
            assert_eq!(run(&eng, &n, &["hostname"]).await.1, format!("{n}\n"));
            eng.delete(&n, true).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let cg = Cgroups::detect().unwrap();
    assert!(names.iter().all(|n| !cg.exists(n)));
}

/// Instances of a project reach the node as `project_name`: that name keys the instance on the
/// node (state, volume, cgroups) and is what the engine reports, while the instance's hostname
/// is its own name. The same name in the default project is another instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_scoped_names() {
    let e = env();
    busybox_image(e.storage.as_ref());
    let names = ["p_web", "web", "p_web2"];
    let _guards: Vec<Guard> = names
        .iter()
        .map(|n| Guard {
            state_dir: e.state_dir.clone(),
            name: n.to_string(),
        })
        .collect();
    let eng = engine(&e);
    // Names that are not scoped names are refused before anything is made.
    for bad in ["p_a_b", "_web", "p_", "1p_web", "p_-web"] {
        let err = eng.create(&spec(bad, &[])).await.unwrap_err();
        assert!(
            matches!(err, berth_agent::engine::EngineError::InvalidConfig(_)),
            "{bad}: {err}"
        );
        assert!(
            !InstanceDir::new(&e.state_dir, bad).path().exists(),
            "{bad}"
        );
    }
    let s = eng.create(&spec("p_web", &[])).await.unwrap();
    assert_eq!(s.name, "p_web");
    eng.create(&spec("web", &[])).await.unwrap();
    assert!(e.storage.instance_volume("p_web").is_some());
    assert_eq!(
        std::fs::read_to_string(
            e.storage
                .instance_volume("p_web")
                .unwrap()
                .join("rootfs/etc/hostname")
        )
        .unwrap(),
        "web\n"
    );
    let s = eng.start("p_web").await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32, "{s:?}");
    eng.start("web").await.unwrap();
    assert_eq!(run(&eng, "p_web", &["hostname"]).await, (0, "web\n".into()));
    assert_eq!(run(&eng, "web", &["hostname"]).await, (0, "web\n".into()));
    // Two instances, each in its own cgroup, both listed under their node names.
    let cg = Cgroups::detect().unwrap();
    assert!(cg.exists("p_web") && cg.exists("web"));
    let a = eng.status("p_web").await.unwrap().pid;
    let b = eng.status("web").await.unwrap().pid;
    assert_ne!(a, b);
    let mut listed: Vec<String> = eng
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    listed.sort();
    assert_eq!(listed, ["p_web", "web"]);
    // Stopping one leaves the other running.
    eng.stop("web", true, Duration::ZERO).await.unwrap();
    assert!(!cg.exists("web"));
    assert_eq!(
        eng.status("p_web").await.unwrap().state,
        InstanceState::Running as i32
    );
    // Rename within the project: the hostname follows the new own name.
    eng.stop("p_web", true, Duration::ZERO).await.unwrap();
    assert!(!cg.exists("p_web"));
    let s = eng.rename("p_web", "p_web2").await.unwrap();
    assert_eq!(s.name, "p_web2");
    eng.start("p_web2").await.unwrap();
    assert_eq!(
        run(&eng, "p_web2", &["hostname"]).await,
        (0, "web2\n".into())
    );
    let (_, hosts) = run(&eng, "p_web2", &["cat", "/etc/hosts"]).await;
    assert!(hosts.contains("127.0.1.1\tweb2\n"), "{hosts}");
    for n in ["p_web2", "web"] {
        eng.delete(n, true).await.unwrap();
        assert!(e.storage.instance_volume(n).is_none());
        assert!(!cg.exists(n));
    }
}

/// The dir driver cannot limit disk use: `limits.disk` is refused at create (nothing is made)
/// and at update (nothing changes), with one clear sentence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_driver_refuses_disk_limits() {
    let e = env();
    busybox_image(e.storage.as_ref());
    let name = "rt-disk";
    let eng = engine(&e);
    let err = eng
        .create(&spec(name, &[("limits.disk", "64MiB")]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, berth_agent::engine::EngineError::InvalidConfig(_)),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("the dir storage driver cannot limit disk use"),
        "{err}"
    );
    assert!(!InstanceDir::new(&e.state_dir, name).path().exists());
    assert!(e.storage.instance_volume(name).is_none());

    eng.create(&spec(name, &[("limits.memory", "64MiB")]))
        .await
        .unwrap();
    let mut cfg = BTreeMap::new();
    cfg.insert("limits.disk".to_string(), "1GiB".to_string());
    let err = eng.update(name, cfg).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("the dir storage driver cannot limit disk use"),
        "{err}"
    );
    let rec = InstanceDir::new(&e.state_dir, name).read_record().unwrap();
    assert_eq!(
        rec.config.get("limits.memory").map(String::as_str),
        Some("64MiB")
    );
    assert!(!rec.config.contains_key("limits.disk"));
    assert!(eng.disk_usage(name).await.unwrap().is_none());
    eng.delete(name, false).await.unwrap();
}

/// Two agents on one host (two engines with their own state, distinct cgroup tags) each run an
/// instance of the same (scoped) name: each instance has its own cgroups in every hierarchy,
/// each agent's monitors their own shared cgroup, and force-stopping one leaves the other
/// running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_engines_share_no_cgroups() {
    let ea = env();
    let eb = env();
    busybox_image(ea.storage.as_ref());
    busybox_image(eb.storage.as_ref());
    let id = std::process::id();
    let (ta, tb) = (format!("rt{id:x}a"), format!("rt{id:x}b"));
    let name = "p_twin";
    let _guards = [(&ea, &ta), (&eb, &tb)].map(|(e, t)| TaggedGuard {
        state_dir: e.state_dir.clone(),
        name: name.to_string(),
        tag: t.clone(),
    });
    let a = tagged_engine(&ea, &ta);
    let b = tagged_engine(&eb, &tb);
    a.create(&spec(name, &[("limits.memory", "64MiB")]))
        .await
        .unwrap();
    b.create(&spec(name, &[("limits.memory", "96MiB")]))
        .await
        .unwrap();
    let sa = a.start(name).await.unwrap();
    let sb = b.start(name).await.unwrap();
    assert_eq!(sa.state, InstanceState::Running as i32, "{sa:?}");
    assert_eq!(sb.state, InstanceState::Running as i32, "{sb:?}");
    let (pa, pb) = (sa.pid as i32, sb.pid as i32);
    assert_ne!(pa, pb);

    let host = Cgroups::detect().unwrap();
    let cga = host.clone().with_tag(&ta);
    let cgb = host.clone().with_tag(&tb);
    assert!(cga.exists(name) && cgb.exists(name));
    assert!(!host.exists(name), "an untagged cgroup was made");
    for h in host.hierarchies() {
        for t in [&ta, &tb] {
            let d = h.mount.join(format!("berth-{t}.payload.{name}"));
            assert!(d.is_dir(), "{d:?} missing");
            let d = h.mount.join(format!("berth-{t}.monitors"));
            assert!(d.is_dir(), "{d:?} missing");
        }
    }
    assert!(cga.pids(name).contains(&pa) && !cga.pids(name).contains(&pb));
    assert!(cgb.pids(name).contains(&pb) && !cgb.pids(name).contains(&pa));
    assert_eq!(
        cga.read_limits(name)
            .get("limits.memory")
            .map(String::as_str),
        Some("67108864")
    );
    assert_eq!(
        cgb.read_limits(name)
            .get("limits.memory")
            .map(String::as_str),
        Some("100663296")
    );
    assert_eq!(run(&b, name, &["hostname"]).await, (0, "twin\n".into()));

    // The defect this guards against: a forced stop of one killed the other.
    let s = a.stop(name, true, Duration::ZERO).await.unwrap();
    assert_eq!(s.state, InstanceState::Stopped as i32);
    assert!(!cga.exists(name));
    for h in host.hierarchies() {
        // a's monitor is gone from its agent's shared monitors cgroup; b's is still in its own.
        let procs = |t: &str| {
            std::fs::read_to_string(h.mount.join(format!("berth-{t}.monitors/cgroup.procs")))
                .unwrap_or_default()
        };
        assert!(
            procs(&ta).trim().is_empty(),
            "{:?} keeps a's monitor",
            h.mount
        );
        assert!(
            !procs(&tb).trim().is_empty(),
            "{:?} lost b's monitor",
            h.mount
        );
    }
    assert!(cgb.exists(name));
    let s = b.status(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32, "{s:?}");
    assert_eq!(s.pid as i32, pb);
    assert!(Path::new(&format!("/proc/{pb}")).exists());
    assert_eq!(run(&b, name, &["true"]).await.0, 0);

    b.stop(name, true, Duration::ZERO).await.unwrap();
    assert!(!cgb.exists(name));
    a.delete(name, false).await.unwrap();
    b.delete(name, false).await.unwrap();
}
