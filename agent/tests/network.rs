//! Host networking against the real kernel (run as root): a test bridge, veth pairs into two
//! fresh network namespaces, pings between them and to the gateway, and the nft NAT table.
//! Drop guards remove processes, veths, the bridge and the nft table even when a test fails.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

use berth_agent::network::{Network, NetworkConfig, random_hwaddr};
use berth_proto::v1::NetworkSpec;

/// A process sleeping in its own network namespace (like an instance's init).
struct NetnsProc(Child);

impl NetnsProc {
    fn spawn() -> NetnsProc {
        let child = Command::new("unshare")
            .args(["--net", "--", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the namespace differs from ours (unshare has exec'd sleep).
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
}

impl Drop for NetnsProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the bridge, nft table and named veths on drop.
struct NetGuard {
    bridge: String,
    table: String,
    veths: Vec<String>,
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        for v in &self.veths {
            if Path::new("/sys/class/net").join(v).exists() {
                let _ = Command::new("ip").args(["link", "del", v]).status();
            }
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge])
                .status();
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .stderr(Stdio::null())
            .status();
    }
}

fn ping(p: &NetnsProc, ip: &str) -> (bool, String) {
    p.exec(&["/bin/busybox", "ping", "-c", "1", "-W", "2", ip])
}

#[test]
fn bridge_veth_netns_ping_and_nat() {
    let state = tempfile::tempdir().unwrap();
    let a_name = "berth-nettest-a";
    let b_name = "berth-nettest-b";
    let mut guard = NetGuard {
        bridge: "berthtest0".into(),
        table: "berth_berthtest0".into(),
        veths: vec![
            Network::host_veth_name(a_name),
            Network::host_veth_name(b_name),
            Network::peer_veth_name(a_name),
            Network::peer_veth_name(b_name),
        ],
    };
    let cfg = NetworkConfig {
        bridge: "berthtest0".into(),
        ipv4_cidr: Some("10.254.77.1/24".into()),
        nat: true,
    };
    let net = Network::setup(cfg.clone(), state.path()).unwrap();
    // Idempotent.
    let net = {
        drop(net);
        Network::setup(cfg, state.path()).unwrap()
    };
    guard.table = net.nft_table().to_string();
    assert_eq!(net.bridge_cidr(), "10.254.77.1/24");
    assert_eq!(net.gateway().to_string(), "10.254.77.1");
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", "berthtest0"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert_eq!(addrs.matches("inet ").count(), 1, "{addrs}");
    assert!(addrs.contains("10.254.77.1/24"));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );
    let rules = Command::new("nft")
        .args(["list", "table", "inet", net.nft_table()])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("ip saddr 10.254.77.0/24 ip daddr != 10.254.77.0/24 oifname != \"berthtest0\" masquerade"),
        "{rules}"
    );
    assert!(rules.contains("iifname \"berthtest0\" accept"), "{rules}");
    assert_eq!(rules.matches("masquerade").count(), 1, "{rules}");

    let a = NetnsProc::spawn();
    let b = NetnsProc::spawn();
    let spec = |ip: &str, mac: &str| NetworkSpec {
        ipv4_cidr: format!("{ip}/24"),
        gateway: "10.254.77.1".into(),
        nameservers: vec![],
        hwaddr: mac.into(),
    };
    let mac_a = random_hwaddr();
    let va = net.create_veth(a_name, &mac_a).unwrap();
    assert_eq!(va.host, Network::host_veth_name(a_name));
    net.configure_in_netns(a.pid(), &va.peer, &spec("10.254.77.10", &mac_a))
        .unwrap();
    let vb = net.create_veth(b_name, "").unwrap();
    net.configure_in_netns(b.pid(), &vb.peer, &spec("10.254.77.11", ""))
        .unwrap();
    // The host end is a bridge port, up.
    let master = std::fs::read_link(format!("/sys/class/net/{}/master", va.host)).unwrap();
    assert!(master.ends_with("berthtest0"));

    let (ok, link) = a.exec(&["ip", "-o", "link", "show", "eth0"]);
    assert!(ok, "{link}");
    assert!(link.contains(&mac_a), "{link}");
    let (_, route) = a.exec(&["ip", "-4", "route"]);
    assert!(
        route.contains("default via 10.254.77.1 dev eth0"),
        "{route}"
    );
    let (_, lo) = a.exec(&["ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");

    let (ok, out) = ping(&a, "10.254.77.11");
    assert!(ok, "a -> b: {out}");
    let (ok, out) = ping(&b, "10.254.77.10");
    assert!(ok, "b -> a: {out}");
    let (ok, out) = ping(&a, "10.254.77.1");
    assert!(ok, "a -> gateway: {out}");

    // Delete: the pair disappears; deleting again is fine.
    net.delete_veth(&va.host).unwrap();
    assert!(!Path::new("/sys/class/net").join(&va.host).exists());
    let (ok, _) = a.exec(&["ip", "link", "show", "eth0"]);
    assert!(!ok, "the peer should go with its host end");
    net.delete_veth(&va.host).unwrap();
    // Re-creating for the same instance replaces a stale pair.
    let vb2 = net.create_veth(b_name, "").unwrap();
    assert_eq!(vb2, vb);
    net.delete_veth(&vb.host).unwrap();

    net.teardown().unwrap();
    assert!(!Path::new("/sys/class/net/berthtest0").exists());
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains(net.nft_table()));
}

#[test]
fn picked_subnet_is_remembered() {
    let state = tempfile::tempdir().unwrap();
    let _guard = NetGuard {
        bridge: "berthtest1".into(),
        table: "berth_berthtest1".into(),
        veths: vec![],
    };
    let cfg = NetworkConfig {
        bridge: "berthtest1".into(),
        ipv4_cidr: None,
        nat: false,
    };
    let net = Network::setup(cfg.clone(), state.path()).unwrap();
    let cidr = net.bridge_cidr();
    assert!(cidr.starts_with("10.") && cidr.ends_with(".1/22"), "{cidr}");
    // No NAT asked: no masquerade rule.
    let rules = Command::new("nft")
        .args(["list", "table", "inet", net.nft_table()])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("masquerade"));
    net.teardown().unwrap();
    // After the bridge is gone (e.g. a host reboot), the same subnet comes back.
    let net2 = Network::setup(cfg, state.path()).unwrap();
    assert_eq!(net2.bridge_cidr(), cidr);
    net2.teardown().unwrap();
}
