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
const TEST_NAME: &str = "routed_instances_in_a_node_namespace";

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

/// Outside the node namespace: re-runs this test under `unshare --net` and checks it passed.
#[test]
fn routed_instances_in_a_node_namespace() {
    let me = std::fs::read_link("/proc/self/ns/net").unwrap();
    if let Some(parent) = std::env::var_os(NODE_ENV) {
        assert_ne!(
            me.as_os_str(),
            parent,
            "the node test must run in its own network namespace"
        );
        node_body();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
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
        "test in the node namespace failed:\n{text}"
    );
    assert!(
        text.contains("1 passed"),
        "the node test did not run:\n{text}"
    );
}

/// The test proper, inside the node namespace.
fn node_body() {
    node(&["ip", "link", "set", "lo", "up"]);

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
