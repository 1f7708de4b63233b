//! The `busybox` recipe: a tiny machine image from the host's static busybox.
//!
//! busybox init runs as PID 1 with no console interaction (no `respawn` shell). It powers off on
//! SIGPWR or SIGUSR2, halts on SIGUSR1 and reboots on SIGTERM (verified with busybox 1.35 in a
//! PID namespace: after SIGPWR the namespace's init dies "killed by SIGINT", i.e. power-off).

use std::collections::BTreeMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use super::{
    ImageError, ImageRecord, ImageStore, host_architecture, metadata_yaml, now_unix, util,
};

/// Where the host's busybox-static installs busybox.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

const INITTAB: &str = "\
# Berth busybox image: no console shell; the runtime mounts /proc, /sys, /dev.
::sysinit:/bin/hostname -F /etc/hostname
::sysinit:/bin/mkdir -p /run/lock /var/log
::shutdown:/bin/umount -a -r
::ctrlaltdel:/sbin/reboot
";

/// `free` for the image: busybox's applet asks sysinfo(2), which reports the whole host; this
/// reads /proc/meminfo, where the runtime mounts lxcfs's view of the instance's own memory
/// (docs/decisions/0009-busybox-free.md).
const FREE_SH: &str = r#"#!/bin/sh
# free for the Berth busybox image. busybox's own applet asks the kernel (sysinfo(2)), which
# reports the whole host; this one reads /proc/meminfo, which shows the instance's own memory
# limit and use (the runtime mounts lxcfs's view there), as procps' free does.
div=1024
case "$1" in
  -b) div=1 ;;
  -k|"") div=1024 ;;
  -m) div=1048576 ;;
  -g) div=1073741824 ;;
  -h|--help) echo "usage: free [-b|-k|-m|-g]"; exit 0 ;;
  *) echo "free: unknown option $1" >&2; exit 1 ;;
esac
exec awk -v div="$div" '
  { v[$1] = $2 * 1024 }
  END {
    t = v["MemTotal:"]; f = v["MemFree:"]; b = v["Buffers:"]
    c = v["Cached:"] + v["SReclaimable:"]; s = v["Shmem:"]
    a = ("MemAvailable:" in v) ? v["MemAvailable:"] : f + b + c
    u = t - f - b - c; if (u < 0) u = t - f
    st = v["SwapTotal:"]; sf = v["SwapFree:"]
    printf "%19s%12s%12s%12s%12s%12s\n", "total", "used", "free", "shared", "buff/cache", "available"
    printf "%-7s%12d%12d%12d%12d%12d%12d\n", "Mem:", int(t/div), int(u/div), int(f/div), int(s/div), int((b+c)/div), int(a/div)
    printf "%-7s%12d%12d%12d\n", "Swap:", int(st/div), int((st-sf)/div), int(sf/div)
  }' /proc/meminfo
"#;

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n";
const SHADOW: &str = "root:*:0:0:99999:7:::\nnobody:*:0:0:99999:7:::\n";

pub(super) fn build(store: &ImageStore) -> Result<ImageRecord, ImageError> {
    let busybox = Path::new(HOST_BUSYBOX);
    check_static(busybox)?;
    let version = busybox_version(busybox)?;

    let tmp_name = format!("{}{}", super::BUILD_PREFIX, util::random_hex(8));
    let vol = store.storage.create_image_volume(&tmp_name)?;
    let populated = populate(busybox, &vol.join("rootfs"))
        .and_then(|()| util::tree_fingerprint(&vol.join("rootfs")));
    let (fp, size) = match populated {
        Ok(v) => v,
        Err(e) => {
            let _ = store.storage.delete_image_volume(&tmp_name);
            return Err(e);
        }
    };
    if let Some(existing) = store.read_record(&fp)? {
        store.storage.delete_image_volume(&tmp_name)?;
        return Ok(existing);
    }
    // A volume without record is a crash leftover: replace it.
    store.storage.delete_image_volume(&fp)?;
    if let Err(e) = store.storage.rename_image_volume(&tmp_name, &fp) {
        let _ = store.storage.delete_image_volume(&tmp_name);
        return Err(e.into());
    }

    let created = now_unix();
    let mut properties = BTreeMap::new();
    properties.insert("os".to_string(), "busybox".to_string());
    properties.insert("release".to_string(), version.clone());
    properties.insert("variant".to_string(), "default".to_string());
    let description = format!("BusyBox {version} (from the host's busybox-static)");
    properties.insert("description".to_string(), description.clone());
    let rec = ImageRecord {
        fingerprint: fp,
        aliases: Vec::new(),
        os: "busybox".into(),
        release: version,
        architecture: host_architecture().into(),
        description,
        size_bytes: size,
        created_at: created,
        properties,
    };
    let yaml = metadata_yaml(&rec.architecture, created, &rec.properties);
    store.finish(rec, Some(yaml))
}

/// Refuses a dynamically linked busybox (the `busybox` package instead of `busybox-static`):
/// it would not run inside the image.
fn check_static(path: &Path) -> Result<(), ImageError> {
    let data = std::fs::read(path).map_err(|e| {
        ImageError::HostTool(format!(
            "cannot read {} ({e}); install busybox-static",
            path.display()
        ))
    })?;
    match elf_has_interpreter(&data) {
        Some(false) => Ok(()),
        Some(true) => Err(ImageError::HostTool(format!(
            "{} is dynamically linked; install busybox-static",
            path.display()
        ))),
        None => Err(ImageError::HostTool(format!(
            "{} is not a 64-bit little-endian ELF executable",
            path.display()
        ))),
    }
}

/// Whether a 64-bit little-endian ELF has a PT_INTERP program header (is dynamically linked);
/// `None` when it is not such an ELF.
pub(super) fn elf_has_interpreter(data: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if data.get(..4)? != b"\x7fELF" || *data.get(4)? != 2 || *data.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?))
    };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

fn busybox_version(busybox: &Path) -> Result<String, ImageError> {
    // `busybox --help` prints "BusyBox v1.35.0 (Debian ...) multi-call binary." and exits 0.
    let out = Command::new(busybox)
        .arg("--help")
        .output()
        .map_err(|e| ImageError::HostTool(format!("cannot run {}: {e}", busybox.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix('v')
                .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        })
        .unwrap_or("unknown")
        .to_string())
}

fn mkdir(root: &Path, rel: &str, mode: u32) -> Result<(), ImageError> {
    let p = root.join(rel);
    std::fs::create_dir_all(&p).map_err(util::io_err(&p))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(util::io_err(&p))
}

fn write(root: &Path, rel: &str, contents: &str, mode: u32) -> Result<(), ImageError> {
    let p = root.join(rel);
    std::fs::write(&p, contents).map_err(util::io_err(&p))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(util::io_err(&p))
}

fn populate(busybox: &Path, root: &Path) -> Result<(), ImageError> {
    for (d, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("var", 0o755),
        ("var/log", 0o755),
        ("var/tmp", 0o1777),
        ("home", 0o755),
        ("mnt", 0o755),
    ] {
        mkdir(root, d, mode)?;
    }
    let dst = root.join("bin/busybox");
    std::fs::copy(busybox, &dst).map_err(util::io_err(&dst))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
        .map_err(util::io_err(&dst))?;

    let list = util::run(Command::new(busybox).arg("--list-full"))?;
    for rel in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Applet paths are relative ("bin/ls", "usr/sbin/chroot"); refuse anything else.
        if rel.starts_with('/')
            || rel.split('/').any(|c| c == ".." || c.is_empty())
            || rel == "bin/busybox"
        {
            continue;
        }
        let link = root.join(rel);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(util::io_err(parent))?;
        }
        if std::fs::symlink_metadata(&link).is_err() {
            symlink("/bin/busybox", &link).map_err(util::io_err(&link))?;
        }
    }
    if std::fs::symlink_metadata(root.join("sbin/init")).is_err() {
        symlink("/bin/busybox", root.join("sbin/init"))
            .map_err(util::io_err(&root.join("sbin/init")))?;
    }
    symlink("../run", root.join("var/run")).map_err(util::io_err(&root.join("var/run")))?;
    for rel in ["usr/bin/free", "bin/free"] {
        let _ = std::fs::remove_file(root.join(rel));
    }
    write(root, "usr/bin/free", FREE_SH, 0o755)?;

    write(root, "etc/inittab", INITTAB, 0o644)?;
    write(root, "etc/passwd", PASSWD, 0o644)?;
    write(root, "etc/group", GROUP, 0o644)?;
    write(root, "etc/shadow", SHADOW, 0o640)?;
    write(root, "etc/hostname", "busybox\n", 0o644)?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1\tlocalhost\n127.0.1.1\tbusybox\n",
        0o644,
    )?;
    write(root, "etc/resolv.conf", "", 0o644)?;
    write(
        root,
        "etc/os-release",
        "NAME=\"BusyBox\"\nID=busybox\nPRETTY_NAME=\"BusyBox (Berth)\"\n",
        0o644,
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn elf_detection() {
        assert_eq!(elf_has_interpreter(b"not an elf"), None);
        // busybox-static is a prerequisite of the agent (and installed in CI).
        let data = std::fs::read("/bin/busybox").unwrap();
        assert_eq!(elf_has_interpreter(&data), Some(false));
        let data = std::fs::read("/bin/ls").unwrap();
        assert_eq!(elf_has_interpreter(&data), Some(true));
    }
}
