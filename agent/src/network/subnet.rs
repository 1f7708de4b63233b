//! IPv4 subnet arithmetic and the choice of a free subnet (a /22 by default) for the bridge.

use std::fmt;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

/// An IPv4 network or interface address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// `prefix` is clamped to 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Ipv4Net {
        Ipv4Net {
            addr,
            prefix: prefix.min(32),
        }
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Net {
        Ipv4Net::new(
            Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            self.prefix,
        )
    }

    /// The `n`th address of the network (1 = the first host).
    pub fn nth_host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.addr) & self.mask()).wrapping_add(n))
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        let p = self.prefix.min(other.prefix);
        let m = Ipv4Net::new(self.addr, p).mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The prefix length of a bridge subnet picked for a new node: a /22 gives 1021 instance
/// addresses (a /24's 253 would stop a node short of 1000 idle instances).
pub const DEFAULT_PREFIX: u8 = 22;

/// Picks a subnet of `prefix` bits (8 to 30) in 10.0.0.0/8 overlapping none of `used`. The
/// first candidate derives from a hash of `seed` (so one host tends to get the same subnet),
/// then the search walks on from there over the aligned candidates.
pub fn pick_free_subnet(seed: &str, used: &[(Ipv4Addr, u8)], prefix: u8) -> Option<Ipv4Net> {
    if !(8..=30).contains(&prefix) {
        return None;
    }
    let used: Vec<Ipv4Net> = used
        .iter()
        .map(|(a, p)| Ipv4Net::new(*a, *p))
        // A default route (0.0.0.0/0) overlaps everything; it does not make a subnet busy.
        .filter(|n| n.prefix > 0)
        .collect();
    // Candidates are numbered by the bits between the /8 and the prefix.
    let bits = u32::from(prefix) - 8;
    let count = 1u32 << bits;
    let d = Sha256::digest(seed.as_bytes());
    let start = u32::from_be_bytes([0, d[0], d[1], d[2]]) & (count - 1);
    (0..count)
        .map(|i| (start + i) & (count - 1))
        .map(|i| Ipv4Addr::from((10u32 << 24) | (i << (32 - u32::from(prefix)))))
        // Skip 10.0.x.x and 10.255.x.x: often used by other tooling.
        .filter(|a| a.octets()[1] != 0 && a.octets()[1] != 255)
        .map(|a| Ipv4Net::new(a, prefix))
        .find(|cand| !used.iter().any(|u| u.overlaps(cand)))
}

/// Addresses from `ip -4 -o addr show` lines (`2: eth0    inet 192.0.2.2/24 brd ...`).
pub fn parse_ip_addr_output(out: &str) -> Vec<(Ipv4Addr, u8)> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.find(|w| *w == "inet")?;
            super::parse_cidr(it.next()?).ok()
        })
        .collect()
}

/// Destinations from `ip -4 route show` lines (`10.1.0.0/16 dev x`, `192.0.2.7 via ...`,
/// `local 127.0.0.0/8 dev lo table local ...`).
pub fn parse_ip_route_output(out: &str) -> Vec<(Ipv4Addr, u8)> {
    const TYPES: &[&str] = &[
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "throw",
        "unreachable",
        "prohibit",
        "blackhole",
        "nat",
        "anycast",
    ];
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().peekable();
            if it.peek().is_some_and(|w| TYPES.contains(w)) {
                it.next();
            }
            let dst = it.next()?;
            if dst == "default" {
                return None;
            }
            match dst.split_once('/') {
                Some(_) => super::parse_cidr(dst).ok(),
                None => dst.parse::<Ipv4Addr>().ok().map(|a| (a, 32)),
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn overlaps() {
        let a = Ipv4Net::new("10.1.0.0".parse().unwrap(), 16);
        let b = Ipv4Net::new("10.1.5.0".parse().unwrap(), 24);
        let c = Ipv4Net::new("10.2.5.0".parse().unwrap(), 24);
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert_eq!(b.nth_host(1), "10.1.5.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            Ipv4Net::new("10.1.5.77".parse().unwrap(), 24)
                .network()
                .to_string(),
            "10.1.5.0/24"
        );
    }

    #[test]
    fn picks_deterministic_free_subnet() {
        let first = pick_free_subnet("host/berthbr0", &[], 24).unwrap();
        assert_eq!(first, pick_free_subnet("host/berthbr0", &[], 24).unwrap());
        assert_eq!(first.addr.octets()[3], 0);
        // Occupy it: the next pick differs and avoids it.
        let used = [
            (first.addr, 24),
            ("192.0.2.2".parse().unwrap(), 24),
            ("0.0.0.0".parse().unwrap(), 0),
        ];
        let second = pick_free_subnet("host/berthbr0", &used, 24).unwrap();
        assert_ne!(first, second);
        // A /8 covering everything leaves nothing.
        assert!(pick_free_subnet("x", &[("10.0.0.0".parse().unwrap(), 8)], 24).is_none());
    }

    #[test]
    fn default_subnet_is_an_aligned_22_clear_of_used_ones() {
        let first = pick_free_subnet("host/berthbr0", &[], DEFAULT_PREFIX).unwrap();
        assert_eq!(first.prefix, 22);
        assert_eq!(first, first.network(), "aligned on a /22 boundary");
        let second1 = first.addr.octets()[1];
        assert!(second1 != 0 && second1 != 255);
        // A /24 inside the first candidate makes it busy.
        let inside = first.nth_host(2 * 256 + 5);
        let next = pick_free_subnet("host/berthbr0", &[(inside, 24)], DEFAULT_PREFIX).unwrap();
        assert_ne!(next, first);
        assert!(!next.overlaps(&Ipv4Net::new(inside, 24)));
        // 1021 host addresses: the first is .1 of the block, the broadcast is 3 /24s further.
        assert_eq!(
            u32::from(first.nth_host(1023)) - u32::from(first.nth_host(1)),
            1022
        );
        // Prefixes outside 8..=30 pick nothing.
        assert!(pick_free_subnet("x", &[], 31).is_none());
        assert!(pick_free_subnet("x", &[], 7).is_none());
    }

    #[test]
    fn parses_ip_output() {
        let addrs = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                     4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\n";
        assert_eq!(
            parse_ip_addr_output(addrs),
            vec![
                ("127.0.0.1".parse().unwrap(), 8),
                ("192.0.2.2".parse().unwrap(), 24)
            ]
        );
        let routes = "default via 192.0.2.1 dev eth0\n\
                      192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2\n\
                      local 127.0.0.0/8 dev lo table local proto kernel\n\
                      10.3.3.3 via 192.0.2.1 dev eth0\n";
        assert_eq!(
            parse_ip_route_output(routes),
            vec![
                ("192.0.2.0".parse().unwrap(), 24),
                ("127.0.0.0".parse().unwrap(), 8),
                ("10.3.3.3".parse().unwrap(), 32)
            ]
        );
    }
}
