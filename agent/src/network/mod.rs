//! The host side of instance networking: one bridge per host (default `berthbr0`), a veth pair
//! per instance, outbound NAT with nftables, and the configuration of `eth0` inside an
//! instance's network namespace.
//!
//! Addresses come from the controller's allocation; this module only configures what it is given
//! (apart from the bridge's own subnet, picked once per host when not configured).
//!
//! An instance whose address lies outside the bridge's subnet (it moved here from another node
//! and kept its address, MAC and gateway) is *routed* instead of bridged: its host veth is not a
//! bridge port; a /32 route points at it, proxy ARP on it answers the guest's ARP for its old
//! gateway (and any other address), and a per-instance nftables table `inet berthrt_<host veth>`
//! masquerades its outbound traffic. See [`Wiring`].
//!
//! Everything shells out to `ip` (iproute2) and `nft`, as LXD does; every call blocks.

mod guest;
mod subnet;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

pub use guest::{check_guest_net, write_guest_config};
pub use subnet::Ipv4Net;

/// Errors from host network setup.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{op} failed: {detail}")]
    Command { op: String, detail: String },
    #[error("invalid network setting {what}: {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error(
        "no free /22 in 10.0.0.0/8 for the bridge: every candidate collides with a host route or address"
    )]
    NoFreeSubnet,
    #[error("network i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to write {path} in the instance rootfs: {reason}")]
    UnsafePath { path: String, reason: String },
}

/// Host network settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Bridge name (default `berthbr0`).
    pub bridge: String,
    /// The bridge's address with prefix, e.g. `10.87.4.1/22`; `None` picks a free /22 once and
    /// remembers it in the state directory (a node that picked a /24 before keeps it: set this
    /// to a wider subnet holding the old one to widen it).
    pub ipv4_cidr: Option<String>,
    /// Masquerade traffic from the bridge's subnet leaving through other interfaces.
    pub nat: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "berthbr0".into(),
            ipv4_cidr: None,
            nat: true,
        }
    }
}

/// Interface group of the host veths of routed instances (`bert` in ASCII). The node's NAT
/// leaves traffic towards them alone, so bridged instances keep their source address.
pub const ROUTED_IFGROUP: u32 = 0x6265_7274;

/// How an instance's host veth is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wiring {
    /// A port of the bridge: the instance's address is in the bridge's subnet, or it has none.
    Bridged,
    /// Not a bridge port: the address (outside the bridge's subnet) is routed as a /32 to the host
    /// veth, which has proxy ARP on and belongs to [`ROUTED_IFGROUP`].
    Routed(Ipv4Addr),
}

/// A veth pair: `host` is a port of the bridge (or routed), `peer` goes into the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPair {
    pub host: String,
    pub peer: String,
}

/// The host's instance network: a bridge with an address, forwarding and NAT.
#[derive(Debug)]
pub struct Network {
    bridge: String,
    /// Gateway (bridge) address and prefix.
    gateway: Ipv4Addr,
    prefix: u8,
    nft_table: String,
    /// Outbound NAT on (routed instances get it too).
    nat: bool,
}

impl Network {
    /// Creates or adopts the bridge (up, with its address), enables IPv4 forwarding and installs
    /// the nftables table (`inet berth` for the default bridge, `inet berth_<bridge>` otherwise).
    /// Idempotent: running it again changes nothing.
    pub fn setup(cfg: NetworkConfig, state_dir: &Path) -> Result<Network, NetworkError> {
        check_ifname(&cfg.bridge)?;
        let (gateway, prefix) = match &cfg.ipv4_cidr {
            Some(c) => parse_cidr(c)?,
            None => remembered_or_pick(&cfg.bridge, state_dir)?,
        };
        if prefix == 0 || prefix > 30 {
            return Err(NetworkError::Invalid {
                what: "bridge prefix length",
                value: prefix.to_string(),
            });
        }
        if !link_exists(&cfg.bridge)? {
            ip(&["link", "add", "name", &cfg.bridge, "type", "bridge"])?;
            tracing::info!(bridge = %cfg.bridge, "created bridge");
        }
        let cidr = format!("{gateway}/{prefix}");
        // Drop other IPv4 addresses (a changed configuration), then set ours.
        for (addr, p) in link_ipv4_addrs(&cfg.bridge)? {
            if (addr, p) != (gateway, prefix) {
                ip(&["addr", "del", &format!("{addr}/{p}"), "dev", &cfg.bridge])?;
            }
        }
        ip(&["addr", "replace", &cidr, "dev", &cfg.bridge])?;
        ip(&["link", "set", &cfg.bridge, "up"])?;
        let fwd = Path::new("/proc/sys/net/ipv4/ip_forward");
        std::fs::write(fwd, "1").map_err(|source| NetworkError::Io {
            path: fwd.to_path_buf(),
            source,
        })?;
        let net = Network {
            nft_table: nft_table_name(&cfg.bridge),
            bridge: cfg.bridge,
            gateway,
            prefix,
            nat: cfg.nat,
        };
        net.install_nft(cfg.nat)?;
        tracing::info!(bridge = %net.bridge, cidr = %cidr, nat = cfg.nat, "host network ready");
        Ok(net)
    }

    /// The host network the agent set up ([`Network::setup`] at its start), for an instance's
    /// monitor: when the bridge exists and forwarding is on, nothing is changed (no `ip` or
    /// `nft` process on every instance start); when the bridge is missing (deleted behind the
    /// agent's back) or forwarding was turned off, it is set up again. A flushed firewall
    /// ruleset is not noticed here: the agent's restart sets it up again.
    pub fn adopt(cfg: NetworkConfig, state_dir: &Path) -> Result<Network, NetworkError> {
        check_ifname(&cfg.bridge)?;
        let Some(cidr) = cfg.ipv4_cidr.as_deref() else {
            return Self::setup(cfg, state_dir);
        };
        let (gateway, prefix) = parse_cidr(cidr)?;
        let forwarding =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1");
        if prefix == 0 || prefix > 30 || !forwarding || !link_exists(&cfg.bridge)? {
            return Self::setup(cfg, state_dir);
        }
        Ok(Network {
            nft_table: nft_table_name(&cfg.bridge),
            bridge: cfg.bridge,
            gateway,
            prefix,
            nat: cfg.nat,
        })
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The gateway address with prefix, e.g. `10.87.3.1/24`.
    pub fn bridge_cidr(&self) -> String {
        format!("{}/{}", self.gateway, self.prefix)
    }

    /// The subnet served by the bridge, e.g. `10.87.3.0/24`.
    pub fn subnet(&self) -> Ipv4Net {
        Ipv4Net::new(self.gateway, self.prefix).network()
    }

    /// The bridge's address: the instances' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The nftables table this network installed (family `inet`).
    pub fn nft_table(&self) -> &str {
        &self.nft_table
    }

    /// IPv4 nameservers for instances: the host's from /etc/resolv.conf without loopback stubs,
    /// else systemd-resolved's upstream list, else none.
    pub fn nameservers(&self) -> Vec<String> {
        for f in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
            if let Ok(text) = std::fs::read_to_string(f) {
                let ns = parse_nameservers(&text);
                if !ns.is_empty() {
                    return ns;
                }
            }
        }
        Vec::new()
    }

    /// The host-side veth name of an instance: `vb` + 8 hex digits of a hash of its name.
    pub fn host_veth_name(instance: &str) -> String {
        format!("vb{}", short_hash(instance))
    }

    /// The in-host name of the instance end before it moves into the instance (`vp` + hash).
    pub fn peer_veth_name(instance: &str) -> String {
        format!("vp{}", short_hash(instance))
    }

    /// Creates the veth pair of an instance (replacing a stale one), sets the peer's MAC
    /// address, and attaches the host end to the bridge, up. The peer stays in the host namespace.
    pub fn create_veth(&self, instance: &str, hwaddr: &str) -> Result<VethPair, NetworkError> {
        let pair = VethPair {
            host: Self::host_veth_name(instance),
            peer: Self::peer_veth_name(instance),
        };
        // A stale pair: removed whole (with a routed one's nft table) only when it exists, so
        // that the usual start runs no `nft` process.
        if link_exists(&pair.host)? {
            self.delete_veth(&pair.host)?;
        }
        netlink(
            &format!("ip link del {}", pair.peer),
            crate::sys::netlink::delete_link(&pair.peer),
        )?;
        let mac = if hwaddr.is_empty() {
            None
        } else {
            check_hwaddr(hwaddr)?;
            Some(
                crate::sys::netlink::parse_mac(hwaddr).ok_or_else(|| NetworkError::Invalid {
                    what: "MAC address",
                    value: hwaddr.to_string(),
                })?,
            )
        };
        let master = netlink(
            &format!("ip link show {}", self.bridge),
            crate::sys::netlink::link_index(&self.bridge),
        )?
        .ok_or_else(|| NetworkError::Command {
            op: format!("ip link set {} master {}", pair.host, self.bridge),
            detail: format!("the bridge {} does not exist", self.bridge),
        })?;
        // One request (the kernel undoes it whole when a part fails): the pair, the peer's
        // MAC, the host end a port of the bridge, up.
        netlink(
            &format!(
                "ip link add name {} master {} up type veth peer name {}",
                pair.host, self.bridge, pair.peer
            ),
            crate::sys::netlink::add_veth(&pair.host, &pair.peer, mac, Some(master)),
        )?;
        tracing::debug!(instance, host = %pair.host, "created veth pair");
        Ok(pair)
    }

    /// How an instance with address `ipv4_cidr` (`a.b.c.d/len`, or empty for none) is wired
    /// here: [`Wiring::Routed`] when the address lies outside the bridge's subnet.
    pub fn wiring_for(&self, ipv4_cidr: &str) -> Result<Wiring, NetworkError> {
        if ipv4_cidr.trim().is_empty() {
            return Ok(Wiring::Bridged);
        }
        let (addr, _) = parse_cidr(ipv4_cidr)?;
        Ok(routed_or_bridged(self.subnet(), addr))
    }

    /// Creates the veth pair of an instance wired as [`Network::wiring_for`] decides:
    /// [`Network::create_veth`] for a bridged one, [`Network::create_routed_veth`] for a routed
    /// one.
    pub fn wire_veth(
        &self,
        instance: &str,
        hwaddr: &str,
        ipv4_cidr: &str,
    ) -> Result<(VethPair, Wiring), NetworkError> {
        let wiring = self.wiring_for(ipv4_cidr)?;
        let pair = match wiring {
            Wiring::Bridged => self.create_veth(instance, hwaddr)?,
            Wiring::Routed(addr) => self.create_routed_veth(instance, hwaddr, addr)?,
        };
        Ok((pair, wiring))
    }

    /// Creates the veth pair of an instance whose address `addr` lies outside the bridge's
    /// subnet (replacing a stale pair): the host end is not a bridge port but joins
    /// [`ROUTED_IFGROUP`], gets proxy ARP (without delay) and forwarding, is up, and carries the
    /// route `addr/32`; the table `inet berthrt_<host>` accepts its forwarded traffic and, with
    /// NAT on, masquerades what it sends out of the node. [`Network::delete_veth`] undoes it all.
    pub fn create_routed_veth(
        &self,
        instance: &str,
        hwaddr: &str,
        addr: Ipv4Addr,
    ) -> Result<VethPair, NetworkError> {
        let pair = VethPair {
            host: Self::host_veth_name(instance),
            peer: Self::peer_veth_name(instance),
        };
        self.delete_veth(&pair.host)?;
        if link_exists(&pair.peer)? {
            ip(&["link", "del", &pair.peer])?;
        }
        ip(&[
            "link", "add", "name", &pair.host, "type", "veth", "peer", "name", &pair.peer,
        ])?;
        let host = pair.host.as_str();
        let rest = (|| {
            if !hwaddr.is_empty() {
                check_hwaddr(hwaddr)?;
                ip(&["link", "set", &pair.peer, "address", hwaddr])?;
            }
            ip(&["link", "set", host, "group", &ROUTED_IFGROUP.to_string()])?;
            write_sysctl(&format!("/proc/sys/net/ipv4/conf/{host}/forwarding"), "1")?;
            write_sysctl(&format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp"), "1")?;
            // Answer at once rather than after a random delay of up to 0.8 s.
            write_sysctl(&format!("/proc/sys/net/ipv4/neigh/{host}/proxy_delay"), "0")?;
            ip(&["link", "set", host, "up"])?;
            ip(&["route", "replace", &format!("{addr}/32"), "dev", host])?;
            let script =
                routed_nft_script(&routed_nft_table(host), host, &self.bridge, addr, self.nat);
            run_with_stdin(Command::new("nft").args(["-f", "-"]), &script).map(drop)
        })();
        if let Err(e) = rest {
            let _ = self.delete_veth(host);
            return Err(e);
        }
        tracing::info!(instance, host, address = %addr, bridge = %self.bridge,
            "created routed veth pair (address outside the bridge subnet)");
        Ok(pair)
    }

    /// Moves `peer` into the network namespace of `pid`, renames it `eth0`, sets its MAC (when
    /// given), address and state, brings `lo` up and adds the default route via the gateway.
    /// An empty `net.ipv4_cidr` only moves and renames the interface and brings it up.
    pub fn configure_in_netns(
        &self,
        pid: i32,
        peer: &str,
        net: &berth_proto::v1::NetworkSpec,
    ) -> Result<(), NetworkError> {
        if pid <= 0 {
            return Err(NetworkError::Invalid {
                what: "pid",
                value: pid.to_string(),
            });
        }
        self.configure_in_netns_path(Path::new(&format!("/proc/{pid}/ns/net")), peer, net)
    }

    /// As [`Network::configure_in_netns`], for a namespace given by a path (e.g. a
    /// `/proc/<pid>/ns/net` or `/run/netns/<name>`).
    pub fn configure_in_netns_path(
        &self,
        netns: &Path,
        peer: &str,
        net: &berth_proto::v1::NetworkSpec,
    ) -> Result<(), NetworkError> {
        check_ifname(peer)?;
        let guest = guest_addr(net, self.gateway)?;
        if !net.hwaddr.is_empty() {
            check_hwaddr(&net.hwaddr)?;
            let mac = crate::sys::netlink::parse_mac(&net.hwaddr).ok_or_else(|| {
                NetworkError::Invalid {
                    what: "MAC address",
                    value: net.hwaddr.clone(),
                }
            })?;
            netlink(
                &format!("ip link set {peer} address {}", net.hwaddr),
                crate::sys::netlink::set_address(peer, mac),
            )?;
        }
        let ns = netns.to_string_lossy().into_owned();
        // Checked as `ip link set X netns` would take it: a pid or a /run/netns name.
        netns_target(netns)?;
        let ns_fd = std::fs::File::open(netns).map_err(|source| NetworkError::Io {
            path: netns.to_path_buf(),
            source,
        })?;
        let ns_fd = std::os::fd::OwnedFd::from(ns_fd);
        netlink(
            &format!("ip link set {peer} netns {ns}"),
            crate::sys::netlink::set_netns(peer, &ns_fd),
        )?;
        netlink(
            &format!("configuring eth0 in {ns}"),
            crate::sys::netlink::configure_in_netns(&ns_fd, peer, guest),
        )
    }

    /// Deletes an instance's veth pair by its host-side name, with what routed it (its /32
    /// route goes with the link; the table `inet berthrt_<host>` is deleted); succeeds when
    /// it is already gone.
    pub fn delete_veth(&self, host_name: &str) -> Result<(), NetworkError> {
        check_ifname(host_name)?;
        // Succeeds when the link is gone already (or in the meantime: its peer's namespace died).
        netlink(
            &format!("ip link del {host_name}"),
            crate::sys::netlink::delete_link(host_name),
        )?;
        let table = routed_nft_table(host_name);
        if nft_table_exists(&table)? {
            match run_with_stdin(
                Command::new("nft").args(["-f", "-"]),
                &format!("delete table inet {table}\n"),
            ) {
                Ok(_) => {}
                Err(_) if !nft_table_exists(&table)? => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Deletes the host veth of an instance known to be bridged (no nft table of its own to
    /// look for); succeeds when it is already gone (its peer's namespace died).
    pub fn delete_bridged_veth(&self, host_name: &str) -> Result<(), NetworkError> {
        check_ifname(host_name)?;
        netlink(
            &format!("ip link del {host_name}"),
            crate::sys::netlink::delete_link(host_name),
        )
        .map(drop)
    }

    /// The nftables table (family `inet`) of a routed instance's host veth.
    pub fn routed_nft_table(host_name: &str) -> String {
        routed_nft_table(host_name)
    }

    /// Removes the bridge and the nftables table (for tests and decommissioning).
    pub fn teardown(&self) -> Result<(), NetworkError> {
        if link_exists(&self.bridge)? {
            ip(&["link", "del", &self.bridge])?;
        }
        if nft_table_exists(&self.nft_table)? {
            run_with_stdin(
                Command::new("nft").args(["-f", "-"]),
                &format!("delete table inet {}\n", self.nft_table),
            )?;
        }
        Ok(())
    }

    fn install_nft(&self, nat: bool) -> Result<(), NetworkError> {
        let script = nft_script(&self.nft_table, &self.bridge, self.subnet(), nat);
        run_with_stdin(Command::new("nft").args(["-f", "-"]), &script)?;
        Ok(())
    }
}

/// A random MAC address in LXD's `00:16:3e` range.
pub fn random_hwaddr() -> String {
    let mut b = [0u8; 3];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: fall back to the clock (uniqueness, not secrecy, matters here).
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
    }
    format!("00:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn short_hash(s: &str) -> String {
    // 48 bits: "vb" + 12 hex digits fits the kernel's 15-character limit, and collisions (which
    // would make one instance's start delete another's veth) are out of reach.
    let d = Sha256::digest(s.as_bytes());
    hex::encode(&d[..6])
}

/// The nftables table name for a bridge.
fn nft_table_name(bridge: &str) -> String {
    if bridge == "berthbr0" {
        "berth".into()
    } else {
        format!(
            "berth_{}",
            bridge.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        )
    }
}

/// [`Wiring::Routed`] for an address outside `subnet`, else [`Wiring::Bridged`].
fn routed_or_bridged(subnet: Ipv4Net, addr: Ipv4Addr) -> Wiring {
    if subnet.overlaps(&Ipv4Net::new(addr, 32)) {
        Wiring::Bridged
    } else {
        Wiring::Routed(addr)
    }
}

/// The nftables table name of a routed instance's host veth (never a bridge table's name,
/// which is `berth` or starts with `berth_`).
fn routed_nft_table(host: &str) -> String {
    format!(
        "berthrt_{}",
        host.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

/// The start of an nftables script that (re)defines `table` atomically, up to its open last
/// brace: a forward chain that accepts what comes in through `iface` and the replies to it.
fn nft_table_head(table: &str, iface: &str) -> String {
    format!(
        "table inet {table}\n\
         flush table inet {table}\n\
         table inet {table} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{iface}\" accept\n\
         \t\toifname \"{iface}\" ct state established,related accept\n\
         \t}}\n"
    )
}

/// The nftables script that (re)defines a routed instance's table atomically: accept what it
/// forwards (and the replies), and with `nat` masquerade what it sends out of the node (not
/// towards the bridge or another routed instance).
fn routed_nft_script(table: &str, host: &str, bridge: &str, addr: Ipv4Addr, nat: bool) -> String {
    let mut s = nft_table_head(table, host);
    if nat {
        s.push_str(&format!(
            "\tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {addr} oifname != \"{bridge}\" oifgroup != {ROUTED_IFGROUP} masquerade\n\
             \t}}\n"
        ));
    }
    s.push_str("}\n");
    s
}

/// Writes a sysctl under /proc/sys (of this process's network namespace).
fn write_sysctl(path: &str, value: &str) -> Result<(), NetworkError> {
    std::fs::write(path, value).map_err(|source| NetworkError::Io {
        path: PathBuf::from(path),
        source,
    })
}

/// The nftables script that (re)defines the table atomically.
fn nft_script(table: &str, bridge: &str, subnet: Ipv4Net, nat: bool) -> String {
    let mut s = nft_table_head(table, bridge);
    if nat {
        s.push_str(&format!(
            "\tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifgroup {ROUTED_IFGROUP} accept\n\
             \t\tip saddr {subnet} ip daddr != {subnet} oifname != \"{bridge}\" masquerade\n\
             \t}}\n"
        ));
    }
    s.push_str("}\n");
    s
}

/// The address and default route an instance gets inside its namespace (None without an
/// address: only `lo` and `eth0` come up).
fn guest_addr(
    net: &berth_proto::v1::NetworkSpec,
    default_gw: Ipv4Addr,
) -> Result<Option<crate::sys::netlink::GuestAddr>, NetworkError> {
    if net.ipv4_cidr.is_empty() {
        return Ok(None);
    }
    let (addr, prefix) = parse_cidr(&net.ipv4_cidr)?;
    let gw = if net.gateway.is_empty() {
        default_gw
    } else {
        net.gateway
            .parse::<Ipv4Addr>()
            .map_err(|_| NetworkError::Invalid {
                what: "gateway",
                value: net.gateway.clone(),
            })?
    };
    // A routed instance without a gateway of its own gets the node's bridge address, which
    // is off its subnet: the route says it is on the link (the host answers its ARP).
    let onlink =
        net.gateway.is_empty() && !Ipv4Net::new(addr, prefix).overlaps(&Ipv4Net::new(gw, 32));
    Ok(Some(crate::sys::netlink::GuestAddr {
        addr,
        prefix,
        gateway: gw,
        onlink,
    }))
}

/// What `ip link set X netns` should be given for a namespace path: a pid for
/// `/proc/<pid>/ns/net`, a name for `/run/netns/<name>`.
fn netns_target(netns: &Path) -> Result<String, NetworkError> {
    let s = netns.to_string_lossy();
    if let Some(pid) = s
        .strip_prefix("/proc/")
        .and_then(|r| r.strip_suffix("/ns/net"))
        .filter(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
    {
        return Ok(pid.to_string());
    }
    if let Some(name) = s.strip_prefix("/run/netns/").filter(|n| !n.contains('/')) {
        return Ok(name.to_string());
    }
    Err(NetworkError::Invalid {
        what: "network namespace path",
        value: s.into_owned(),
    })
}

fn parse_nameservers(resolv: &str) -> Vec<String> {
    resolv
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("nameserver"))
                .then(|| it.next())
                .flatten()
        })
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .map(|a| a.to_string())
        .collect()
}

/// Parses `a.b.c.d/len`.
pub(crate) fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), NetworkError> {
    let bad = || NetworkError::Invalid {
        what: "IPv4 CIDR",
        value: s.to_string(),
    };
    let (a, p) = s.trim().split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok((addr, prefix))
}

fn check_ifname(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Invalid {
            what: "interface name",
            value: name.to_string(),
        })
    }
}

fn check_hwaddr(mac: &str) -> Result<(), NetworkError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()));
    // The least significant bit of the first octet marks multicast: not valid for a NIC.
    let unicast = u8::from_str_radix(parts.first().copied().unwrap_or("01"), 16)
        .map(|b| b & 1 == 0)
        .unwrap_or(false);
    if ok && unicast {
        Ok(())
    } else {
        Err(NetworkError::Invalid {
            what: "MAC address",
            value: mac.to_string(),
        })
    }
}

/// Runs `ip ARGS`; returns stdout.
fn ip(args: &[&str]) -> Result<String, NetworkError> {
    run_with_stdin(Command::new("ip").args(args), "")
}

/// Whether a link exists in this process's network namespace. Asks the kernel (netlink,
/// through `ip`) rather than /sys/class/net, which shows the namespace sysfs was mounted in:
/// an agent running in its own network namespace on a shared host would see the host's links.
fn link_exists(name: &str) -> Result<bool, NetworkError> {
    netlink(
        &format!("ip link show dev {name}"),
        crate::sys::netlink::link_index(name),
    )
    .map(|i| i.is_some())
}

/// A netlink request's result, its failure worded as the `ip` command it stands for.
fn netlink<T>(op: &str, r: std::io::Result<T>) -> Result<T, NetworkError> {
    r.map_err(|e| NetworkError::Command {
        op: op.to_string(),
        detail: e.to_string(),
    })
}

/// The IPv4 addresses of a link.
fn link_ipv4_addrs(name: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetworkError> {
    let out = ip(&["-4", "-o", "addr", "show", "dev", name])?;
    Ok(subnet::parse_ip_addr_output(&out))
}

fn nft_table_exists(table: &str) -> Result<bool, NetworkError> {
    let out = run_with_stdin(Command::new("nft").args(["list", "tables", "inet"]), "")?;
    Ok(out
        .lines()
        .any(|l| l.trim() == format!("table inet {table}")))
}

/// Runs a command with `input` on stdin; returns stdout or a `NetworkError::Command`.
fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<String, NetworkError> {
    use std::io::Write;
    let mut op = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        op.push(' ');
        op.push_str(&a.to_string_lossy());
    }
    tracing::debug!(command = %op, "running");
    let spawn_err = |e: std::io::Error| NetworkError::Command {
        op: op.clone(),
        detail: format!("cannot spawn: {e}"),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that ignores stdin may close it early; its exit status tells the story.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetworkError::Command {
            op: op.clone(),
            detail: format!("cannot wait: {e}"),
        })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            op,
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bridge subnet remembered for this bridge in `state_dir`, or a free one picked now and
/// remembered. An address already on the bridge wins (the agent restarted).
fn remembered_or_pick(bridge: &str, state_dir: &Path) -> Result<(Ipv4Addr, u8), NetworkError> {
    let file = state_dir.join(format!("network-{bridge}.cidr"));
    let io = |source| NetworkError::Io {
        path: file.clone(),
        source,
    };
    if let Ok(text) = std::fs::read_to_string(&file) {
        return parse_cidr(text.trim());
    }
    let chosen = if link_exists(bridge)? {
        link_ipv4_addrs(bridge)?.into_iter().next()
    } else {
        None
    };
    let chosen = match chosen {
        Some(c) => c,
        None => {
            let mut used = subnet::parse_ip_addr_output(&ip(&["-4", "-o", "addr", "show"])?);
            used.extend(subnet::parse_ip_route_output(&ip(&[
                "-4", "route", "show", "table", "all",
            ])?));
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            let seed = format!("{}/{}", host.trim(), bridge);
            let net = subnet::pick_free_subnet(&seed, &used, subnet::DEFAULT_PREFIX)
                .ok_or(NetworkError::NoFreeSubnet)?;
            (net.nth_host(1), net.prefix)
        }
    };
    std::fs::create_dir_all(state_dir).map_err(|source| NetworkError::Io {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let tmp = file.with_extension("cidr.tmp");
    std::fs::write(&tmp, format!("{}/{}\n", chosen.0, chosen.1)).map_err(io)?;
    std::fs::rename(&tmp, &file).map_err(io)?;
    tracing::info!(bridge, cidr = %format!("{}/{}", chosen.0, chosen.1), "picked bridge subnet");
    Ok(chosen)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn veth_names() {
        let h = Network::host_veth_name("web1");
        assert_eq!(h.len(), 14);
        assert!(h.starts_with("vb"));
        assert_eq!(h, Network::host_veth_name("web1"));
        assert_ne!(h, Network::host_veth_name("web2"));
        assert_eq!(&Network::peer_veth_name("web1")[2..], &h[2..]);
        let long = "a".repeat(63);
        assert!(Network::host_veth_name(&long).len() <= 15);
    }

    #[test]
    fn veth_names_of_scoped_instances() {
        // Names are hashed, so the longest scoped name (63 + 1 + 63) still fits the kernel's
        // 15 characters, and the same name in two projects gives two pairs.
        let longest = format!("{}_{}", "p".repeat(63), "w".repeat(63));
        berth_proto::api::names::validate_scoped_name(&longest).unwrap();
        for n in [longest.as_str(), "acme_web1", "web1"] {
            assert_eq!(Network::host_veth_name(n).len(), 14, "{n}");
            assert_eq!(Network::peer_veth_name(n).len(), 14, "{n}");
            check_ifname(&Network::host_veth_name(n)).unwrap();
        }
        let names = ["web1", "acme_web1", "other_web1", "acme-web1"];
        let mut hosts: Vec<String> = names.iter().map(|n| Network::host_veth_name(n)).collect();
        hosts.sort();
        hosts.dedup();
        assert_eq!(hosts.len(), names.len());
    }

    #[test]
    fn hwaddr() {
        let m = random_hwaddr();
        assert!(m.starts_with("00:16:3e:"));
        assert!(check_hwaddr(&m).is_ok());
        assert!(check_hwaddr("01:00:00:00:00:00").is_err());
        assert!(check_hwaddr("00:16:3e:zz:00:00").is_err());
        assert!(check_hwaddr("00:16:3e:00:00").is_err());
    }

    #[test]
    fn nameservers() {
        let r = "# c\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\nsearch x\nnameserver 1.1.1.1\n";
        assert_eq!(parse_nameservers(r), vec!["10.255.255.53", "1.1.1.1"]);
    }

    #[test]
    fn guest_address_and_cidr() {
        let net = berth_proto::v1::NetworkSpec {
            ipv4_cidr: "10.9.8.7/24".into(),
            gateway: String::new(),
            nameservers: vec![],
            hwaddr: String::new(),
        };
        let g = guest_addr(&net, "10.9.8.1".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!((g.addr, g.prefix), ("10.9.8.7".parse().unwrap(), 24));
        assert_eq!(g.gateway, "10.9.8.1".parse::<Ipv4Addr>().unwrap());
        assert!(!g.onlink);
        let bad = berth_proto::v1::NetworkSpec {
            ipv4_cidr: "10.9.8.7/24; rm -rf /".into(),
            ..net.clone()
        };
        assert!(guest_addr(&bad, "10.9.8.1".parse().unwrap()).is_err());
        let bad_gw = berth_proto::v1::NetworkSpec {
            gateway: "10.9.8.x".into(),
            ..net.clone()
        };
        assert!(guest_addr(&bad_gw, "10.9.8.1".parse().unwrap()).is_err());
        let none = berth_proto::v1::NetworkSpec {
            ipv4_cidr: String::new(),
            ..net.clone()
        };
        assert!(
            guest_addr(&none, "10.9.8.1".parse().unwrap())
                .unwrap()
                .is_none()
        );
        // No gateway given, and the node's is off the instance's subnet (a moved instance):
        // the route is on the link.
        let moved = berth_proto::v1::NetworkSpec {
            ipv4_cidr: "10.100.1.20/24".into(),
            ..net
        };
        let g = guest_addr(&moved, "10.100.2.1".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(g.gateway, "10.100.2.1".parse::<Ipv4Addr>().unwrap());
        assert!(g.onlink);
        assert!(parse_cidr("10.0.0.1/33").is_err());
        assert!(check_ifname("eth0 up").is_err());
        assert!(check_ifname("berthtest0").is_ok());
    }

    #[test]
    fn netns_targets() {
        assert_eq!(netns_target(Path::new("/proc/42/ns/net")).unwrap(), "42");
        assert_eq!(netns_target(Path::new("/run/netns/t1")).unwrap(), "t1");
        assert!(netns_target(Path::new("/tmp/x")).is_err());
    }

    #[test]
    fn nft() {
        let s = nft_script(
            "berth",
            "berthbr0",
            Ipv4Net::new("10.1.2.0".parse().unwrap(), 24),
            true,
        );
        assert!(s.contains(
            "ip saddr 10.1.2.0/24 ip daddr != 10.1.2.0/24 oifname != \"berthbr0\" masquerade"
        ));
        assert!(
            !nft_script(
                "t",
                "b",
                Ipv4Net::new("10.1.2.0".parse().unwrap(), 24),
                false
            )
            .contains("masquerade")
        );
        assert_eq!(nft_table_name("berthbr0"), "berth");
        assert_eq!(nft_table_name("berthtest0"), "berth_berthtest0");
    }

    #[test]
    fn routed_or_bridged_by_subnet() {
        let subnet = Ipv4Net::new("10.100.2.0".parse().unwrap(), 24);
        assert_eq!(
            routed_or_bridged(subnet, "10.100.2.20".parse().unwrap()),
            Wiring::Bridged
        );
        assert_eq!(
            routed_or_bridged(subnet, "10.100.1.20".parse().unwrap()),
            Wiring::Routed("10.100.1.20".parse().unwrap())
        );
        assert_eq!(
            routed_or_bridged(subnet, "10.100.3.0".parse().unwrap()),
            Wiring::Routed("10.100.3.0".parse().unwrap())
        );
    }

    #[test]
    fn routed_nft() {
        let host = Network::host_veth_name("web1");
        let table = routed_nft_table(&host);
        assert_eq!(table, format!("berthrt_{host}"));
        assert!(!table.starts_with("berth_") && table != "berth");
        let s = routed_nft_script(
            &table,
            &host,
            "berthbr0",
            "10.100.1.20".parse().unwrap(),
            true,
        );
        assert!(s.starts_with(&format!("table inet {table}\nflush table inet {table}\n")));
        assert!(s.contains(&format!("iifname \"{host}\" accept")));
        assert!(s.contains(&format!(
            "ip saddr 10.100.1.20 oifname != \"berthbr0\" oifgroup != {ROUTED_IFGROUP} masquerade"
        )));
        let no_nat = routed_nft_script(
            &table,
            &host,
            "berthbr0",
            "10.100.1.20".parse().unwrap(),
            false,
        );
        assert!(!no_nat.contains("masquerade"));
        // The node's NAT leaves traffic towards routed instances alone, before masquerading.
        let main = nft_script(
            "berth",
            "berthbr0",
            Ipv4Net::new("10.1.2.0".parse().unwrap(), 24),
            true,
        );
        let keep = main
            .find(&format!("oifgroup {ROUTED_IFGROUP} accept"))
            .unwrap();
        assert!(keep < main.find("masquerade").unwrap());
    }
}
