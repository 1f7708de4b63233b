//! The `debian/12` recipe: debootstrap bookworm (minbase + systemd, udev, iproute2, ping, procps,
//! ca-certificates, dbus), configured for a machine container.
//!
//! The configured rootfs is kept as a tarball in the cache directory
//! (`debian-12-<arch>.tar`); later builds (and CI after a cache restore) only unpack it. The
//! fingerprint is the sha256 of that tarball.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{
    ImageError, ImageRecord, ImageStore, host_architecture, metadata_yaml, now_unix, util,
};

const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd-sysv,udev,iproute2,iputils-ping,procps,ca-certificates,dbus";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The default `eth0.network` of the image; `network::write_guest_config` replaces it with the
/// instance's static address at create time.
const ETH0_NETWORK: &str =
    "[Match]\nName=eth0\n\n[Network]\nDHCP=no\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n";

pub(super) fn build(store: &ImageStore, mirror: Option<&str>) -> Result<ImageRecord, ImageError> {
    let arch = deb_arch()?;
    let tarball = store.cache_dir.join(format!("debian-12-{arch}.tar"));
    if !tarball.is_file() {
        let mirror = match mirror.filter(|m| !m.is_empty()) {
            Some(m) => m.to_string(),
            None => host_mirror(),
        };
        check_mirror(&mirror)?;
        bootstrap_tarball(&store.cache_dir, &mirror, arch, &tarball)?;
    } else {
        tracing::info!(tarball = %tarball.display(), "using cached debian rootfs tarball");
    }
    let (fp, size) = util::sha256_files(&[&tarball])?;
    if let Some(existing) = store.read_record(&fp)? {
        return Ok(existing);
    }
    let vol = store.storage.create_image_volume(&fp)?;
    let rootfs = vol.join("rootfs");
    let extracted = util::run(
        Command::new("tar")
            .args(["-xpf"])
            .arg(&tarball)
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
            .arg(&rootfs),
    );
    if let Err(e) = extracted {
        let _ = store.storage.delete_image_volume(&fp);
        return Err(e);
    }
    let created = now_unix();
    let description = format!("Debian 12 ({SUITE}) {arch} minbase with systemd");
    let mut properties = BTreeMap::new();
    properties.insert("os".to_string(), "debian".to_string());
    properties.insert("release".to_string(), SUITE.to_string());
    properties.insert("variant".to_string(), "default".to_string());
    properties.insert("description".to_string(), description.clone());
    let rec = ImageRecord {
        fingerprint: fp,
        aliases: Vec::new(),
        os: "debian".into(),
        release: SUITE.into(),
        architecture: host_architecture().into(),
        description,
        size_bytes: size,
        created_at: created,
        properties,
    };
    let yaml = metadata_yaml(&rec.architecture, created, &rec.properties);
    store.finish(rec, Some(yaml))
}

/// Debian's name for the host architecture.
fn deb_arch() -> Result<&'static str, ImageError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("amd64"),
        "aarch64" => Ok("arm64"),
        "riscv64" => Ok("riscv64"),
        "powerpc64" => Ok("ppc64el"),
        "s390x" => Ok("s390x"),
        other => Err(ImageError::Unsupported(format!(
            "no debian architecture for {other}"
        ))),
    }
}

/// The Debian mirror the host's apt uses (deb822 `debian.sources` or `sources.list`), else
/// deb.debian.org.
fn host_mirror() -> String {
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        && let Some(m) = mirror_from_deb822(&text)
    {
        return m;
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list")
        && let Some(m) = mirror_from_list(&text)
    {
        return m;
    }
    DEFAULT_MIRROR.to_string()
}

/// First URI of a deb822 stanza that serves the `bookworm` suite.
fn mirror_from_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let mut uris = None;
        let mut suites = false;
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("URIs:") {
                uris = v.split_whitespace().next().map(str::to_string);
            } else if let Some(v) = line.strip_prefix("Suites:") {
                suites = v.split_whitespace().any(|s| s == SUITE);
            }
        }
        if suites && uris.is_some() {
            return uris;
        }
    }
    None
}

/// URL of the first `deb URL bookworm ...` line.
fn mirror_from_list(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let w: Vec<&str> = l
            .split_whitespace()
            .filter(|w| !w.starts_with('['))
            .collect();
        (w.first() == Some(&"deb") && w.get(2) == Some(&SUITE))
            .then(|| w.get(1).map(|u| u.to_string()))?
    })
}

fn check_mirror(m: &str) -> Result<(), ImageError> {
    let ok = (m.starts_with("http://") || m.starts_with("https://") || m.starts_with("file:/"))
        && !m.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidImage(format!(
            "mirror {m:?} is not an http(s) or file URL"
        )))
    }
}

/// debootstraps, configures and tars a rootfs into `tarball` (atomically).
fn bootstrap_tarball(
    cache_dir: &Path,
    mirror: &str,
    arch: &str,
    tarball: &Path,
) -> Result<(), ImageError> {
    if !util::have_tool("debootstrap") {
        return Err(ImageError::HostTool("debootstrap is not installed".into()));
    }
    let cache_dir = std::fs::canonicalize(cache_dir).map_err(util::io_err(cache_dir))?;
    let work = cache_dir.join(format!("debian-12-{arch}.build"));
    util::remove_build_dir(&work)?;
    let debs = cache_dir.join("debootstrap-debs");
    std::fs::create_dir_all(&debs).map_err(util::io_err(&debs))?;
    let log_path = cache_dir.join(format!("debian-12-{arch}.log"));
    let log = std::fs::File::create(&log_path).map_err(util::io_err(&log_path))?;
    let log_err = log.try_clone().map_err(util::io_err(&log_path))?;

    let started = Instant::now();
    tracing::info!(mirror, arch, "debootstrap bookworm (minutes)");
    let status = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={INCLUDE}"))
        .arg(format!("--arch={arch}"))
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(SUITE)
        .arg(&work)
        .arg(mirror)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .status()
        .map_err(|e| ImageError::Command {
            op: "debootstrap".into(),
            detail: format!("cannot spawn: {e}"),
        })?;
    if !status.success() {
        let logtext = std::fs::read(&log_path).unwrap_or_default();
        let _ = util::remove_build_dir(&work);
        return Err(ImageError::Command {
            op: format!("debootstrap {SUITE} {mirror}"),
            detail: format!(
                "{} ({status}; full log {})",
                util::tail(&logtext, 1500),
                log_path.display()
            ),
        });
    }
    tracing::info!(elapsed_s = started.elapsed().as_secs(), "debootstrap done");

    let res = configure(&work).and_then(|()| {
        let tmp: PathBuf = tarball.with_extension("tar.tmp");
        util::run(
            Command::new("tar")
                .args([
                    "--sort=name",
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "-C",
                ])
                .arg(&work)
                .arg("-cf")
                .arg(&tmp)
                .arg("."),
        )?;
        std::fs::rename(&tmp, tarball).map_err(util::io_err(tarball))
    });
    let cleanup = util::remove_build_dir(&work);
    res?;
    cleanup?;
    tracing::info!(tarball = %tarball.display(), elapsed_s = started.elapsed().as_secs(), "debian rootfs cached");
    Ok(())
}

fn write(root: &Path, rel: &str, contents: &str) -> Result<(), ImageError> {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(util::io_err(parent))?;
    }
    // Replace symlinks instead of writing through them.
    if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&p).map_err(util::io_err(&p))?;
    }
    std::fs::write(&p, contents).map_err(util::io_err(&p))
}

fn remove_children(dir: &Path) -> Result<(), ImageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(util::io_err(dir)(e)),
    };
    for entry in rd {
        let entry = entry.map_err(util::io_err(dir))?;
        let p = entry.path();
        let ft = entry.file_type().map_err(util::io_err(&p))?;
        if ft.is_dir() {
            std::fs::remove_dir_all(&p).map_err(util::io_err(&p))?;
        } else {
            std::fs::remove_file(&p).map_err(util::io_err(&p))?;
        }
    }
    Ok(())
}

/// Makes a debootstrapped rootfs a machine-container image.
fn configure(root: &Path) -> Result<(), ImageError> {
    // Network: systemd-networkd with a static per-instance file written at create time.
    write(root, "etc/systemd/network/eth0.network", ETH0_NETWORK)?;
    util::run(Command::new("chroot").arg(root).args([
        "systemctl",
        "enable",
        "systemd-networkd.service",
    ]))?;
    // No password login for root (exec is the way in).
    util::run(
        Command::new("chroot")
            .arg(root)
            .args(["passwd", "-l", "root"]),
    )?;
    write(root, "etc/hostname", "debian\n")?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    )?;
    // The host's resolver leaked in by debootstrap; the instance's comes at create time.
    write(root, "etc/resolv.conf", "")?;
    // Empty machine-id: systemd generates one at first boot.
    write(root, "etc/machine-id", "")?;
    let dbus_id = root.join("var/lib/dbus/machine-id");
    if std::fs::symlink_metadata(&dbus_id).is_ok() {
        std::fs::remove_file(&dbus_id).map_err(util::io_err(&dbus_id))?;
    }
    if dbus_id.parent().is_some_and(Path::is_dir) {
        symlink("/etc/machine-id", &dbus_id).map_err(util::io_err(&dbus_id))?;
    }
    // apt lists and downloaded packages: rebuilt by `apt update`.
    remove_children(&root.join("var/lib/apt/lists"))?;
    std::fs::create_dir_all(root.join("var/lib/apt/lists/partial")).map_err(util::io_err(root))?;
    for f in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = std::fs::remove_file(root.join(f));
    }
    let archives = root.join("var/cache/apt/archives");
    if let Ok(rd) = std::fs::read_dir(&archives) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // /dev comes from the runtime; the image carries no device nodes.
    remove_children(&root.join("dev"))?;
    util::remove_device_nodes(root)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mirrors() {
        let deb822 = "Types: deb\n# c\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_deb822(deb822).as_deref(),
            Some("http://deb.example/debian")
        );
        let list = "# x\ndeb [arch=amd64] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_from_list(list).as_deref(),
            Some("http://m.example/debian")
        );
        assert!(check_mirror("http://x/debian").is_ok());
        assert!(check_mirror("http://x/debian --foo").is_err());
        assert!(check_mirror("--option").is_err());
    }
}
