//! Writes an instance's identity and network configuration into its root filesystem.
//!
//! The rootfs comes from an image and is untrusted input: every path is resolved with openat2
//! `RESOLVE_IN_ROOT` (symlinks, absolute or `..`, cannot leave the rootfs) and files are replaced
//! by an atomic rename, so a symlink at the final component is replaced, never followed.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::{NetworkError, parse_cidr};

/// Writes `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf` (when nameservers are given) and,
/// when the rootfs has systemd-networkd and `net` has an address,
/// `/etc/systemd/network/eth0.network` with the static address, gateway and DNS. Files are
/// created with mode 0644 and owner 0:0 on disk (the instance's root).
///
/// `instance` is the node-local (scoped) name, `project_name` outside the default project; the
/// hostname is the instance's own name without the project (see
/// [`crate::runtime::hostname_of`]).
pub fn write_guest_config(
    rootfs: &Path,
    instance: &str,
    net: &berth_proto::v1::NetworkSpec,
) -> Result<(), NetworkError> {
    berth_proto::api::names::validate_scoped_name(instance).map_err(|_| NetworkError::Invalid {
        what: "instance name (hostname)",
        value: instance.to_string(),
    })?;
    let hostname = crate::runtime::hostname_of(instance);
    let GuestNet {
        nameservers,
        address,
        gateway,
    } = parse_guest_net(net)?;
    let root = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(&rootfs.display().to_string(), e))?;
    write_guest_files(&root, hostname, &nameservers, address, gateway)?;
    tracing::debug!(instance, rootfs = %rootfs.display(), "wrote guest configuration");
    Ok(())
}

/// A network spec, checked.
struct GuestNet {
    nameservers: Vec<std::net::IpAddr>,
    address: Option<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
}

/// Checks a network spec without writing anything: callers run it before they make an
/// instance's volume, so that a bad spec costs nothing.
pub fn check_guest_net(net: &berth_proto::v1::NetworkSpec) -> Result<(), NetworkError> {
    parse_guest_net(net).map(|_| ())
}

fn parse_guest_net(net: &berth_proto::v1::NetworkSpec) -> Result<GuestNet, NetworkError> {
    let nameservers = net
        .nameservers
        .iter()
        .map(|n| {
            n.parse::<std::net::IpAddr>()
                .map_err(|_| NetworkError::Invalid {
                    what: "nameserver",
                    value: n.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let address = if net.ipv4_cidr.is_empty() {
        None
    } else {
        Some(parse_cidr(&net.ipv4_cidr)?)
    };
    let gateway = if net.gateway.is_empty() {
        None
    } else {
        Some(
            net.gateway
                .parse::<Ipv4Addr>()
                .map_err(|_| NetworkError::Invalid {
                    what: "gateway",
                    value: net.gateway.clone(),
                })?,
        )
    };

    Ok(GuestNet {
        nameservers,
        address,
        gateway,
    })
}

fn write_guest_files(
    root: &OwnedFd,
    hostname: &str,
    nameservers: &[std::net::IpAddr],
    address: Option<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetworkError> {
    write_file(root, "etc/hostname", &format!("{hostname}\n"))?;
    write_file(root, "etc/hosts", &hosts_file(hostname))?;
    if !nameservers.is_empty() {
        let mut s = String::new();
        for n in nameservers {
            s.push_str(&format!("nameserver {n}\n"));
        }
        write_file(root, "etc/resolv.conf", &s)?;
    }
    if let Some((addr, prefix)) = address
        && has_networkd(root)
    {
        let mut s = format!("[Match]\nName=eth0\n\n[Network]\nAddress={addr}/{prefix}\n");
        if let Some(gw) = gateway {
            s.push_str(&format!("Gateway={gw}\n"));
        }
        for n in nameservers {
            s.push_str(&format!("DNS={n}\n"));
        }
        s.push_str("LinkLocalAddressing=no\nIPv6AcceptRA=no\n");
        write_file(root, "etc/systemd/network/eth0.network", &s)?;
    }
    Ok(())
}

fn hosts_file(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
}

fn io_err(path: &str, e: Errno) -> NetworkError {
    NetworkError::Io {
        path: path.into(),
        source: e.into(),
    }
}

fn resolve() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// Opens directory `rel` (relative, `/`-separated) under `root` as an O_PATH fd, creating
/// missing components (mode 0755).
fn open_dir_creating(root: &OwnedFd, rel: &str) -> Result<OwnedFd, NetworkError> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    let mut dir = rustix::fs::openat2(root, ".", flags, Mode::empty(), resolve())
        .map_err(|e| io_err(".", e))?;
    for i in 0..comps.len() {
        let sub = comps[..=i].join("/");
        dir = match rustix::fs::openat2(root, sub.as_str(), flags, Mode::empty(), resolve()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&dir, comps[i], Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err(&sub, e)),
                }
                rustix::fs::openat2(root, sub.as_str(), flags, Mode::empty(), resolve()).map_err(
                    |e| NetworkError::UnsafePath {
                        path: format!("/{sub}"),
                        reason: format!("a dangling symlink or not a directory ({e})"),
                    },
                )?
            }
            Err(e) => {
                return Err(NetworkError::UnsafePath {
                    path: format!("/{sub}"),
                    reason: format!("not a directory inside the rootfs ({e})"),
                });
            }
        };
    }
    Ok(dir)
}

/// Replaces file `rel` under `root` with `contents` (mode 0644) through a temporary file and a
/// rename in the same directory.
fn write_file(root: &OwnedFd, rel: &str, contents: &str) -> Result<(), NetworkError> {
    let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let dir = open_dir_creating(root, parent)?;
    let tmp = format!(".{name}.berth-tmp");
    let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
    let fd = rustix::fs::openat(
        &dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| io_err(rel, e))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o644)).map_err(|e| io_err(rel, e))?;
    let mut f = std::fs::File::from(fd);
    let written = f.write_all(contents.as_bytes()).and_then(|()| f.sync_all());
    if let Err(source) = written {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
        return Err(NetworkError::Io {
            path: rel.into(),
            source,
        });
    }
    rustix::fs::renameat(&dir, tmp.as_str(), &dir, name).map_err(|e| {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
        io_err(rel, e)
    })
}

/// Whether the rootfs ships systemd-networkd.
fn has_networkd(root: &OwnedFd) -> bool {
    [
        "lib/systemd/systemd-networkd",
        "usr/lib/systemd/systemd-networkd",
    ]
    .iter()
    .any(|p| {
        rustix::fs::openat2(
            root,
            *p,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            resolve(),
        )
        .is_ok()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn spec(cidr: &str) -> berth_proto::v1::NetworkSpec {
        berth_proto::v1::NetworkSpec {
            ipv4_cidr: cidr.into(),
            gateway: "10.5.5.1".into(),
            nameservers: vec!["10.255.255.53".into()],
            hwaddr: String::new(),
        }
    }

    #[test]
    fn writes_files_and_networkd() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
        std::fs::write(r.join("usr/lib/systemd/systemd-networkd"), "").unwrap();
        // usrmerge-style /lib -> usr/lib
        symlink("usr/lib", r.join("lib")).unwrap();
        write_guest_config(r, "web1", &spec("10.5.5.20/24")).unwrap();
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "web1\n"
        );
        assert!(
            std::fs::read_to_string(r.join("etc/hosts"))
                .unwrap()
                .contains("127.0.1.1\tweb1\n")
        );
        assert_eq!(
            std::fs::read_to_string(r.join("etc/resolv.conf")).unwrap(),
            "nameserver 10.255.255.53\n"
        );
        let n = std::fs::read_to_string(r.join("etc/systemd/network/eth0.network")).unwrap();
        assert!(n.contains("Address=10.5.5.20/24\nGateway=10.5.5.1\nDNS=10.255.255.53\n"));
        // Idempotent.
        write_guest_config(r, "web1", &spec("10.5.5.20/24")).unwrap();
    }

    #[test]
    fn project_instances_get_their_own_name_as_hostname() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write_guest_config(r, "acme_web1", &spec("")).unwrap();
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "web1\n"
        );
        let hosts = std::fs::read_to_string(r.join("etc/hosts")).unwrap();
        assert!(hosts.contains("127.0.1.1\tweb1\n"), "{hosts}");
        assert!(!hosts.contains("acme"), "{hosts}");
    }

    #[test]
    fn symlinks_stay_inside() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("opt/sd")).unwrap();
        std::fs::write(outside.path().join("hostname"), "host\n").unwrap();
        std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
        std::fs::write(r.join("usr/lib/systemd/systemd-networkd"), "").unwrap();
        // Final-component symlink to a host file: replaced, not followed.
        symlink(outside.path().join("hostname"), r.join("etc/hostname")).unwrap();
        // Absolute directory symlink: resolved inside the rootfs.
        symlink("/opt/sd", r.join("etc/systemd")).unwrap();
        // `..` cannot climb out either.
        symlink("../../../../../../../../etc", r.join("etc/hosts-dir")).unwrap();
        write_guest_config(r, "web2", &spec("10.5.5.21/24")).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.path().join("hostname")).unwrap(),
            "host\n"
        );
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "web2\n"
        );
        assert!(r.join("opt/sd/network/eth0.network").exists());

        // A symlink to a host directory that does not exist inside the rootfs: refused, and
        // nothing is written on the host.
        std::fs::remove_file(r.join("etc/systemd")).unwrap();
        symlink(outside.path(), r.join("etc/systemd")).unwrap();
        let err = write_guest_config(r, "web2", &spec("10.5.5.21/24")).unwrap_err();
        assert!(matches!(err, NetworkError::UnsafePath { .. }), "{err}");
        assert!(!outside.path().join("network").exists());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(check_guest_net(&spec("10.5.5.20/24")).is_ok());
        assert!(check_guest_net(&spec("10.5.5.20/99")).is_err());
        let mut bad_gw = spec("10.5.5.20/24");
        bad_gw.gateway = "nope".into();
        assert!(check_guest_net(&bad_gw).is_err());
        let t = tempfile::tempdir().unwrap();
        assert!(write_guest_config(t.path(), "bad/name", &spec("")).is_err());
        assert!(write_guest_config(t.path(), "p_a_b", &spec("")).is_err());
        assert!(write_guest_config(t.path(), "_web", &spec("")).is_err());
        assert!(write_guest_config(t.path(), "p_", &spec("")).is_err());
        assert!(write_guest_config(t.path(), "ok", &spec("10.5.5.20/99")).is_err());
        let mut s = spec("");
        s.nameservers = vec!["1.2.3.4\nnameserver 6.6.6.6".into()];
        assert!(write_guest_config(t.path(), "ok", &s).is_err());
        // No networkd: no eth0.network.
        write_guest_config(t.path(), "ok", &spec("10.5.5.22/24")).unwrap();
        assert!(!t.path().join("etc/systemd/network/eth0.network").exists());
    }
}
