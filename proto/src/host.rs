//! Facts about this host that both daemons need for their defaults.

use std::net::{IpAddr, UdpSocket};

/// The host's name, or "localhost" when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// This host's main address: the source address of its default route (no packet is sent);
/// `None` when there is no default route.
pub fn default_route_address() -> Option<IpAddr> {
    let probe = || -> std::io::Result<IpAddr> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect("192.0.2.1:9")?;
        Ok(s.local_addr()?.ip())
    };
    probe().ok().filter(|ip| !ip.is_unspecified())
}
