//! rtnetlink link requests for the per-instance network set-up (hot paths: every start and
//! stop): one netlink round trip where `ip link ...` would cost a process (~3-15 ms each).
//! Requests act in the calling thread's network namespace, as `ip` run from it would.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REPLACE: u16 = 0x100;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFF_UP: u32 = 0x1;
/// `sizeof(struct ifinfomsg)`.
const IFINFOMSG_LEN: usize = 16;
/// `IFNAMSIZ`: names are shorter (the NUL fits).
const IFNAMSIZ: usize = 16;

/// The index of link `name` in this network namespace; None when there is no such link.
pub fn link_index(name: &str) -> io::Result<Option<u32>> {
    check_name(name)?;
    let c =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that lives across the call, which only reads it.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx != 0 {
        return Ok(Some(idx));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENODEV) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// `ip link add name HOST [master MASTER] up type veth peer name PEER [address MAC]`: a veth
/// pair whose host end is up (and a port of `master` when given); the peer stays down.
pub fn add_veth(
    host: &str,
    peer: &str,
    peer_mac: Option<[u8; 6]>,
    master: Option<u32>,
) -> io::Result<()> {
    check_name(host)?;
    check_name(peer)?;
    let mut m = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
    m.ifinfo(0, IFF_UP, IFF_UP);
    m.attr(IFLA_IFNAME, &nul_terminated(host));
    if let Some(idx) = master {
        m.attr(IFLA_MASTER, &idx.to_ne_bytes());
    }
    let info = m.begin(IFLA_LINKINFO);
    m.attr(IFLA_INFO_KIND, b"veth");
    let data = m.begin(IFLA_INFO_DATA);
    let peer_info = m.begin(VETH_INFO_PEER);
    m.ifinfo(0, 0, 0);
    m.attr(IFLA_IFNAME, &nul_terminated(peer));
    if let Some(mac) = peer_mac {
        m.attr(IFLA_ADDRESS, &mac);
    }
    m.end(peer_info);
    m.end(data);
    m.end(info);
    m.request()
}

/// `ip link set NAME address MAC`.
pub fn set_address(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let idx = existing(name)?;
    let mut m = Message::new(RTM_NEWLINK, 0);
    m.ifinfo(idx, 0, 0);
    m.attr(IFLA_ADDRESS, &mac);
    m.request()
}

/// `ip link set NAME netns NS`, the namespace given by an open fd of it (a
/// `/proc/<pid>/ns/net` or `/run/netns/<name>`).
pub fn set_netns(name: &str, netns: &OwnedFd) -> io::Result<()> {
    let idx = existing(name)?;
    let mut m = Message::new(RTM_NEWLINK, 0);
    m.ifinfo(idx, 0, 0);
    m.attr(IFLA_NET_NS_FD, &netns.as_raw_fd().to_ne_bytes());
    m.request()
}

/// `ip link del NAME`; Ok(false) when there was no such link.
pub fn delete_link(name: &str) -> io::Result<bool> {
    let Some(idx) = link_index(name)? else {
        return Ok(false);
    };
    let idx = i32::try_from(idx).map_err(|_| io::Error::other("link index out of range"))?;
    let mut m = Message::new(RTM_DELLINK, 0);
    m.ifinfo(idx, 0, 0);
    match m.request() {
        Ok(()) => Ok(true),
        // Gone in the meantime (its peer's namespace died).
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

/// An instance's address and default route inside its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestAddr {
    pub addr: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    /// The gateway is off the instance's subnet: the route says it is on the link.
    pub onlink: bool,
}

/// Inside the network namespace `netns` (an open fd of it): `lo` up, `peer` renamed `eth0`,
/// the address (replacing), `eth0` up and the default route (replacing), as
/// `ip link set lo up; ip link set PEER name eth0; ip addr replace A/P dev eth0;
/// ip link set eth0 up; ip route replace default via GW dev eth0 [onlink]` run there. The
/// calling thread enters the namespace for the requests and returns to its own; if it cannot
/// return, the process aborts rather than go on with a thread inside an instance's network.
/// Meant for single-threaded helper processes (the monitor), never a tokio worker.
pub fn configure_in_netns(netns: &OwnedFd, peer: &str, guest: Option<GuestAddr>) -> io::Result<()> {
    check_name(peer)?;
    let own = std::fs::File::open("/proc/thread-self/ns/net")?;
    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let done = (|| {
        set_up("lo")?;
        let idx = existing(peer)?;
        let mut m = Message::new(RTM_NEWLINK, 0);
        m.ifinfo(idx, 0, 0);
        m.attr(IFLA_IFNAME, &nul_terminated("eth0"));
        m.request()?;
        if let Some(g) = guest {
            let mut m = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
            // struct ifaddrmsg: family, prefixlen, flags, scope (universe), index.
            m.raw(&[libc::AF_INET as u8, g.prefix, 0, 0]);
            m.raw(&(idx as u32).to_ne_bytes());
            m.attr(IFA_LOCAL, &g.addr.octets());
            m.attr(IFA_ADDRESS, &g.addr.octets());
            m.request()?;
        }
        set_up("eth0")?;
        if let Some(g) = guest {
            let mut m = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE);
            // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
            m.raw(&[
                libc::AF_INET as u8,
                0,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                0,
                RTN_UNICAST,
            ]);
            m.raw(&(if g.onlink { RTNH_F_ONLINK } else { 0 }).to_ne_bytes());
            m.attr(RTA_GATEWAY, &g.gateway.octets());
            m.attr(RTA_OIF, &(idx as u32).to_ne_bytes());
            m.request()?;
        }
        Ok(())
    })();
    // Back to the thread's own namespace, whatever happened inside.
    let back = nix::sched::setns(&own, nix::sched::CloneFlags::CLONE_NEWNET);
    if let Err(e) = back {
        // Every later network request of this thread would act inside the instance.
        tracing::error!(error = %e, "cannot return to the own network namespace; aborting");
        std::process::abort();
    }
    done
}

/// `ip link set NAME up`.
fn set_up(name: &str) -> io::Result<()> {
    let idx = existing(name)?;
    let mut m = Message::new(RTM_NEWLINK, 0);
    m.ifinfo(idx, IFF_UP, IFF_UP);
    m.request()
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn existing(name: &str) -> io::Result<i32> {
    let idx = link_index(name)?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
    i32::try_from(idx).map_err(|_| io::Error::other("link index out of range"))
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() >= IFNAMSIZ
        || name.contains(['/', ':', '\0'])
        || name.contains(char::is_whitespace)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    Ok(())
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One rtnetlink request being built: header, ifinfomsg, attributes (nested ones by
/// [`Message::begin`]/[`Message::end`]).
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16) -> Message {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `request`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        Message { buf }
    }

    /// `struct ifinfomsg` (AF_UNSPEC).
    fn ifinfo(&mut self, index: i32, flags: u32, change: u32) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]); // family, pad
        self.buf.extend_from_slice(&0u16.to_ne_bytes()); // type
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&change.to_ne_bytes());
        debug_assert_eq!(self.buf.len() - start, IFINFOMSG_LEN);
    }

    /// A fixed header (ifaddrmsg, rtmsg) as bytes.
    fn raw(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Opens a nested attribute; returns where its header is.
    fn begin(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        // Without NLA_F_NESTED, as iproute2 sends them (VETH_INFO_PEER is not a plain nest:
        // it starts with an ifinfomsg).
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Sends the request and waits for the kernel's acknowledgement (or its error).
    fn request(mut self) -> io::Result<()> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        let sock = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        send(sock.as_raw_fd(), &self.buf, MsgFlags::empty())?;
        let mut reply = [0u8; 8192];
        loop {
            let n = recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty())?;
            let mut at = 0;
            while at + 16 <= n {
                let mlen =
                    u32::from_ne_bytes(reply[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
                let kind = u16::from_ne_bytes([reply[at + 4], reply[at + 5]]);
                if mlen < 16 || at + mlen > n {
                    return Err(io::Error::other("malformed netlink answer"));
                }
                if kind == NLMSG_ERROR {
                    if mlen < 20 {
                        return Err(io::Error::other("short netlink error answer"));
                    }
                    let code =
                        i32::from_ne_bytes(reply[at + 16..at + 20].try_into().unwrap_or([0; 4]));
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(code.wrapping_neg()))
                    };
                }
                at += (mlen + 3) & !3;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("00:16:3e:aa:0b:ff"),
            Some([0x00, 0x16, 0x3e, 0xaa, 0x0b, 0xff])
        );
        assert_eq!(parse_mac("00:16:3e:aa:0b"), None);
        assert_eq!(parse_mac("00:16:3e:aa:0b:ff:00"), None);
        assert_eq!(parse_mac("0:16:3e:aa:0b:ff"), None);
        assert_eq!(parse_mac("zz:16:3e:aa:0b:ff"), None);
    }

    #[test]
    fn nested_attributes_carry_their_length() {
        let mut m = Message::new(RTM_NEWLINK, 0);
        m.ifinfo(0, 0, 0);
        let at = m.begin(IFLA_LINKINFO);
        m.attr(IFLA_INFO_KIND, b"veth");
        m.end(at);
        // header 16 + ifinfomsg 16, then the nest: 4 + (4 + 4).
        assert_eq!(m.buf.len(), 16 + 16 + 12);
        assert_eq!(u16::from_ne_bytes([m.buf[32], m.buf[33]]), 12);
        assert_eq!(u16::from_ne_bytes([m.buf[34], m.buf[35]]), IFLA_LINKINFO);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("eth0").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a-name-far-too-long").is_err());
        assert!(check_name("a b").is_err());
    }
}
