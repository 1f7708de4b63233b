//! Moved instances (run as root): an instance whose address lies outside the node bridge's
//! subnet is routed, not bridged. The test runs inside a fresh network namespace, the "node"
//! (it re-executes itself under `unshare --net`), with an "outside" namespace behind the node's
//! uplink and NAT, a bridged instance and two routed instances. Drop guards remove processes,
//! veths, the bridge and the nft tables even when the test fails; the node namespace itself
//! disappears with the test process.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};

use berth_agent::network::{Network, NetworkConfig, ROUTED_IFGROUP, Wiring, random_hwaddr};
use berth_proto::v1::NetworkSpec;

/// Set in the re-executed test process that runs inside the node namespace.
const NODE_ENV: &str = "BERTH_TEST_MOVED_NODE_NETNS";

/// A process sleeping in its own network namespace (like an instance's init).
struct NetnsProc(Child);

impl NetnsProc {
    fn spawn() -> NetnsProc {
        let child = Command::new("unshare")
            .args(["--net", "--", "sleep", "300"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let me = std::fs::read_link("/proc/self/ns/net").unwrap();
        for _ in 0..100 {
            let ns = std::fs::read_link(format!("/proc/{}/ns/net", child.id()));
            if ns.is_ok_and(|n| n != me) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        NetnsProc(child)
    }
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
    /// Runs a command inside the namespace; returns whether it succeeded, and its output.
    fn exec(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.pid()))
            .arg("--")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
    fn must(&self, args: &[&str]) -> String {
        let (ok, out) = self.exec(args);
        assert!(ok, "{args:?} in netns {}: {out}", self.pid());
        out
    }
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for NetnsProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Removes links and nft tables (family inet) of the node namespace on drop.
struct NodeGuard {
    links: Vec<String>,
    tables: Vec<String>,
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = Command::new("ip")
                .args(["link", "del", l])
                .stderr(Stdio::null())
                .status();
        }
        for t in &self.tables {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", t])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs a command in the node namespace (this process's); returns its stdout.
fn node(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn nft_tables() -> String {
    node(&["nft", "list", "tables", "inet"])
}

/// Pings `ip` from inside `p` (a second try covers a slow first ARP answer).
fn ping(p: &NetnsProc, ip: &str) {
    let mut last = String::new();
    for _ in 0..2 {
        let (ok, out) = p.exec(&["/bin/busybox", "ping", "-c", "1", "-W", "3", ip]);
        if ok {
            return;
        }
        last = out;
    }
    panic!("ping {ip} from netns {} failed: {last}", p.pid());
}

fn spec(cidr: &str, gateway: &str, mac: &str) -> NetworkSpec {
    NetworkSpec {
        ipv4_cidr: cidr.into(),
        gateway: gateway.into(),
        nameservers: vec![],
        hwaddr: mac.into(),
    }
}

/// Whether this process is the re-executed test inside its own "node" network namespace (then
/// the caller runs the test body). Otherwise re-runs `test` under `unshare --net`, asserts it
/// passed there, and returns false.
fn in_node_netns(test: &str) -> bool {
    let me = std::fs::read_link("/proc/self/ns/net").unwrap();
    if let Some(parent) = std::env::var_os(NODE_ENV) {
        assert_ne!(
            me.as_os_str(),
            parent,
            "the node test must run in its own network namespace"
        );
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(NODE_ENV, &me)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{test} in the node namespace failed:\n{text}"
    );
    assert!(text.contains("1 passed"), "{test} did not run:\n{text}");
    false
}

#[test]
fn routed_instances_in_a_node_namespace() {
    if in_node_netns("routed_instances_in_a_node_namespace") {
        node_body();
    }
}

/// The test proper, inside the node namespace.
fn node_body() {
    node(&["ip", "link", "set", "lo", "up"]);
    // Strict reverse-path filtering (a common host setting): routed traffic must pass it.
    for f in ["all", "default"] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{f}/rp_filter"), "1").unwrap();
    }

    let bridge = "berthmv0";
    let (b_name, r_name, r2_name) = ("mv-bridged", "mv-routed", "mv-routed2");
    let mut guard = NodeGuard {
        links: vec![
            "mvup0".into(),
            bridge.into(),
            Network::host_veth_name(b_name),
            Network::host_veth_name(r_name),
            Network::host_veth_name(r2_name),
        ],
        tables: vec![
            Network::routed_nft_table(&Network::host_veth_name(r_name)),
            Network::routed_nft_table(&Network::host_veth_name(r2_name)),
        ],
    };

    // The node's uplink: 192.0.2.1 here, 192.0.2.2 in "outside", which has no route back to
    // any instance subnet (so only NATed traffic gets answers). Default route via outside.
    let outside = NetnsProc::spawn();
    node(&[
        "ip", "link", "add", "mvup0", "type", "veth", "peer", "name", "mvup1",
    ]);
    node(&[
        "ip",
        "link",
        "set",
        "mvup1",
        "netns",
        &outside.pid().to_string(),
    ]);
    node(&["ip", "addr", "add", "192.0.2.1/24", "dev", "mvup0"]);
    node(&["ip", "link", "set", "mvup0", "up"]);
    node(&["ip", "route", "add", "default", "via", "192.0.2.2"]);
    outside.must(&["ip", "link", "set", "lo", "up"]);
    outside.must(&["ip", "addr", "add", "192.0.2.2/24", "dev", "mvup1"]);
    outside.must(&["ip", "link", "set", "mvup1", "up"]);

    // The node bridge: subnet 10.100.2.0/24 ("n2").
    let state = tempfile::tempdir().unwrap();
    let cfg = NetworkConfig {
        bridge: bridge.into(),
        ipv4_cidr: Some("10.100.2.1/24".into()),
        nat: true,
    };
    let net = Network::setup(cfg.clone(), state.path()).unwrap();
    guard.tables.push(net.nft_table().to_string());

    // A bridged instance, and two instances that moved here from "n1" (10.100.1.0/24) with
    // their address, MAC and gateway.
    let b = NetnsProc::spawn();
    let (vb, wb) = net
        .wire_veth(b_name, &random_hwaddr(), "10.100.2.5/24")
        .unwrap();
    assert_eq!(wb, Wiring::Bridged);
    net.configure_in_netns(b.pid(), &vb.peer, &spec("10.100.2.5/24", "", ""))
        .unwrap();
    let master = node(&["ip", "-o", "link", "show", "dev", &vb.host]);
    assert!(master.contains(&format!("master {bridge}")), "{master}");

    let r = NetnsProc::spawn();
    let r_mac = random_hwaddr();
    let r_spec = spec("10.100.1.20/24", "10.100.1.1", &r_mac);
    let (vr, wr) = net.wire_veth(r_name, &r_mac, &r_spec.ipv4_cidr).unwrap();
    assert_eq!(wr, Wiring::Routed("10.100.1.20".parse().unwrap()));
    net.configure_in_netns(r.pid(), &vr.peer, &r_spec).unwrap();

    let r2 = NetnsProc::spawn();
    // No gateway of its own: the node's bridge address, off its subnet, on-link.
    let r2_spec = spec("10.100.1.21/24", "", "");
    let (vr2, _) = net.wire_veth(r2_name, "", &r2_spec.ipv4_cidr).unwrap();
    net.configure_in_netns(r2.pid(), &vr2.peer, &r2_spec)
        .unwrap();

    // Host side of a routed instance: no bridge port, in the routed group, proxy ARP, /32 route.
    let link = node(&["ip", "-d", "-o", "link", "show", "dev", &vr.host]);
    assert!(!link.contains("master"), "{link}");
    assert!(link.contains(&format!("group {ROUTED_IFGROUP}")), "{link}");
    let proxy = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", vr.host));
    assert_eq!(proxy.unwrap().trim(), "1");
    let route = node(&["ip", "-4", "route", "show", "10.100.1.20/32"]);
    assert!(route.contains(&format!("dev {}", vr.host)), "{route}");
    let table = Network::routed_nft_table(&vr.host);
    let rules = node(&["nft", "list", "table", "inet", &table]);
    assert!(rules.contains("ip saddr 10.100.1.20"), "{rules}");

    // Inside the guest nothing changed: address, MAC, gateway as on the old node.
    let addr = r.must(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("10.100.1.20/24"), "{addr}");
    let mac = r.must(&["ip", "-o", "link", "show", "dev", "eth0"]);
    assert!(mac.contains(&r_mac), "{mac}");
    let routes = r.must(&["ip", "-4", "route", "show", "default"]);
    assert!(
        routes.contains("default via 10.100.1.1 dev eth0"),
        "{routes}"
    );

    // A count of what reaches the routed instance from the bridged one, with its own source
    // address (not masqueraded).
    r.must(&["nft", "add", "table", "ip", "seen"]);
    r.must(&[
        "nft",
        "add chain ip seen input { type filter hook input priority 0; }",
    ]);
    r.must(&[
        "nft",
        "add rule ip seen input ip saddr 10.100.2.5 icmp type echo-request counter",
    ]);

    let check_all = || {
        ping(&r, "10.100.2.1"); // the node's bridge address
        ping(&r, "192.0.2.2"); // behind the node's NAT
        ping(&r, "10.100.2.5"); // routed -> bridged
        ping(&b, "10.100.1.20"); // bridged -> routed
        ping(&r, "10.100.1.21"); // routed -> routed (on-link for the guest: proxy ARP)
        ping(&b, "192.0.2.2"); // the bridged path still works
        ping(&r2, "192.0.2.2"); // routed without a gateway of its own
        ping(&r2, "10.100.2.5");
    };
    check_all();
    let seen = r.must(&["nft", "list", "table", "ip", "seen"]);
    assert!(
        seen.contains("counter packets") && !seen.contains("counter packets 0 "),
        "bridged -> routed traffic arrived masqueraded: {seen}"
    );
    let outside_routes = outside.must(&["ip", "-4", "route"]);
    assert!(!outside_routes.contains("10.100."), "{outside_routes}");

    // The agent restarts: the host network is set up again; the wiring of running instances
    // stays (routes, per-instance tables), and a fresh Network finds it by instance name.
    drop(net);
    let net = Network::setup(cfg, state.path()).unwrap();
    assert!(nft_tables().contains(&format!("table inet {table}")));
    check_all();

    let routes2 = r2.must(&["ip", "-4", "route", "show", "default"]);
    assert!(
        routes2.contains("default via 10.100.2.1 dev eth0 onlink"),
        "{routes2}"
    );

    // Stop of the routed instance: its netns goes (the veth with it), then the monitor's
    // teardown runs; nothing is left.
    let mut r2 = r2;
    r2.kill();
    for _ in 0..100 {
        if !link_exists(&vr2.host) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    net.delete_veth(&vr2.host).unwrap();
    // Delete with the instance still running.
    net.delete_veth(&vr.host).unwrap();
    for host in [&vr.host, &vr2.host] {
        assert!(!link_exists(host), "{host} left");
        assert!(!nft_tables().contains(&Network::routed_nft_table(host)));
    }
    assert!(!link_exists(&vr.peer) && !link_exists(&vr2.peer));
    let routes = node(&["ip", "-4", "route", "show", "table", "all"]);
    assert!(!routes.contains("10.100.1."), "{routes}");
    let ruleset = node(&["nft", "list", "ruleset"]);
    assert!(!ruleset.contains("10.100.1."), "{ruleset}");
    // Deleting again is fine.
    net.delete_veth(&vr.host).unwrap();
    // The bridged instance still reaches out.
    ping(&b, "192.0.2.2");

    net.delete_veth(&vb.host).unwrap();
    net.teardown().unwrap();
    assert!(!nft_tables().contains("berth"), "{}", nft_tables());
    let links = node(&["ip", "-o", "link", "show"]);
    assert!(!links.contains(" vb") && !links.contains(" vp"), "{links}");
}

// --- the monitor wires a moved instance (a busybox container through the real engine) -------

const FP: &str = "b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1";

/// The engine's state and pool in a temporary directory; kills the instance's processes and
/// lxcfs, and unmounts what they left, on drop.
struct EngineEnv {
    tmp: tempfile::TempDir,
    instance: String,
}

impl EngineEnv {
    fn state_dir(&self) -> std::path::PathBuf {
        self.tmp.path().join("state")
    }
    fn lxcfs_dir(&self) -> std::path::PathBuf {
        self.tmp.path().join("lxcfs")
    }
    fn run_dir(&self) -> std::path::PathBuf {
        self.tmp.path().join("run")
    }
}

impl Drop for EngineEnv {
    fn drop(&mut self) {
        use berth_agent::runtime::InstanceDir;
        let dir = InstanceDir::new(&self.state_dir(), &self.instance);
        for p in [dir.live_init(), dir.live_monitor()].into_iter().flatten() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        if let Ok(cg) = berth_agent::cgroup::Cgroups::detect() {
            let _ = cg.destroy(&self.instance);
            let _ = cg.leave_monitor(&self.instance, None);
        }
        let _ = nix::mount::umount2(&dir.rootfs_mount(), nix::mount::MntFlags::MNT_DETACH);
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

/// An image volume holding a busybox rootfs made from the host's busybox.
fn busybox_image(storage: &dyn berth_agent::storage::StorageDriver) {
    let vol = storage.create_image_volume(FP).unwrap();
    let root = vol.join("rootfs");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
        "var",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox")
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
        "console::sysinit:/bin/echo booted\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    storage.finish_image_volume(FP).unwrap();
}

async fn exec(engine: &berth_agent::engine::Engine, name: &str, cmd: &[&str]) -> (i32, String) {
    use tokio::io::AsyncReadExt;
    let mut s = engine
        .exec(berth_agent::engine::ExecRequest {
            instance: name.to_string(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(s.take_stdin());
    let mut out = s.take_stdout().unwrap();
    let mut err = s.take_stderr().unwrap();
    let (mut so, mut se) = (Vec::new(), Vec::new());
    let (a, b) = tokio::join!(out.read_to_end(&mut so), err.read_to_end(&mut se));
    a.unwrap();
    b.unwrap();
    let code = s.wait().await.unwrap();
    (
        code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&so),
            String::from_utf8_lossy(&se)
        ),
    )
}

/// The routed wiring of `host` on the node: (link exists, /32 route to `addr`, nft table).
fn wiring_of(host: &str, addr: &str) -> (bool, bool, bool) {
    let route = node(&["ip", "-4", "route", "show", &format!("{addr}/32")]);
    (
        link_exists(host),
        route.contains(&format!("dev {host}")),
        nft_tables().contains(&format!("table inet {}", Network::routed_nft_table(host))),
    )
}

#[test]
fn monitor_wires_a_moved_instance_routed() {
    if in_node_netns("monitor_wires_a_moved_instance_routed") {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(monitor_body());
    }
}

async fn monitor_body() {
    use berth_agent::engine::{Engine, EngineConfig};
    use berth_agent::storage::StorageDriver;
    use berth_proto::v1::InstanceState;
    use std::sync::Arc;

    node(&["ip", "link", "set", "lo", "up"]);
    // A node has a default route; proxy ARP answers only for addresses it can route.
    node(&[
        "ip", "link", "add", "mvdflt0", "type", "veth", "peer", "name", "mvdflt1",
    ]);
    node(&["ip", "link", "set", "mvdflt1", "up"]);
    node(&["ip", "link", "set", "mvdflt0", "up"]);
    node(&["ip", "route", "add", "default", "dev", "mvdflt0"]);

    let name = "mv-moved";
    let tmp = tempfile::Builder::new()
        .prefix("berth-mv-")
        .tempdir_in("/var/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = EngineEnv {
        tmp,
        instance: name.into(),
    };
    let pool = env.tmp.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let storage: Arc<dyn StorageDriver> =
        Arc::new(berth_agent::storage::dir::DirDriver::open(&pool).unwrap());
    busybox_image(storage.as_ref());

    let host = Network::host_veth_name(name);
    let _guard = NodeGuard {
        links: vec!["mvdflt0".into(), "berthmv1".into(), host.clone()],
        tables: vec![Network::routed_nft_table(&host), "berth_berthmv1".into()],
    };
    let net_cfg = NetworkConfig {
        bridge: "berthmv1".into(),
        ipv4_cidr: Some("10.100.2.1/24".into()),
        nat: true,
    };
    let net = Arc::new(Network::setup(net_cfg.clone(), &env.state_dir()).unwrap());
    let engine_cfg = || {
        let mut cfg = EngineConfig::new(env.state_dir());
        cfg.helper_exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_berth-agent"));
        cfg.lxcfs_dir = env.lxcfs_dir();
        cfg.run_dir = env.run_dir();
        cfg.nat = true;
        cfg
    };
    let eng = Engine::new(engine_cfg(), storage.clone(), net.clone()).unwrap();

    // The spec the controller sends for an instance that moved here from n1 (10.100.1.0/24).
    let mac = "00:16:3e:4d:0e:2a";
    let spec = berth_proto::v1::InstanceSpec {
        name: name.into(),
        image: FP.into(),
        config: Default::default(),
        network: Some(berth_proto::v1::NetworkSpec {
            ipv4_cidr: "10.100.1.20/24".into(),
            gateway: "10.100.1.1".into(),
            nameservers: vec![],
            hwaddr: mac.into(),
        }),
    };
    eng.create(&spec).await.unwrap();
    let s = eng.start(name).await.unwrap();
    assert_eq!(s.state, InstanceState::Running as i32);
    assert_eq!(wiring_of(&host, "10.100.1.20"), (true, true, true));
    let link = node(&["ip", "-o", "link", "show", "dev", &host]);
    assert!(!link.contains("master"), "{link}");

    let check_guest = async |eng: &Engine| {
        let (_, addr) = exec(eng, name, &["ip", "addr", "show", "eth0"]).await;
        assert!(addr.contains("10.100.1.20/24"), "{addr}");
        assert!(addr.contains(mac), "{addr}");
        let (_, route) = exec(eng, name, &["ip", "route"]).await;
        assert!(route.contains("default via 10.100.1.1"), "{route}");
        let (code, out) = exec(eng, name, &["ping", "-c", "1", "-W", "3", "10.100.2.1"]).await;
        assert_eq!(code, 0, "ping of the node's bridge address: {out}");
    };
    check_guest(&eng).await;

    // The agent restarts while the instance runs: the host network is set up again and a new
    // engine recovers; the wiring is still there and works.
    drop(eng);
    let net = Arc::new(Network::setup(net_cfg, &env.state_dir()).unwrap());
    let eng = Engine::new(engine_cfg(), storage.clone(), net.clone()).unwrap();
    eng.recover().await.unwrap();
    assert_eq!(
        eng.status(name).await.unwrap().state,
        InstanceState::Running as i32
    );
    assert_eq!(wiring_of(&host, "10.100.1.20"), (true, true, true));
    check_guest(&eng).await;

    // Stop undoes it all; a new start wires it again; delete leaves nothing.
    eng.stop(name, true, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(wiring_of(&host, "10.100.1.20"), (false, false, false));
    eng.start(name).await.unwrap();
    assert_eq!(wiring_of(&host, "10.100.1.20"), (true, true, true));
    eng.stop(name, true, std::time::Duration::ZERO)
        .await
        .unwrap();
    eng.delete(name, false).await.unwrap();
    assert_eq!(wiring_of(&host, "10.100.1.20"), (false, false, false));
    net.teardown().unwrap();
}
