//! Publishing an instance or snapshot as an image, and exporting an image as an LXD/Incus
//! unified tarball.
//!
//! The tarball is made the same way every time from the same image volume, so it is
//! reproducible: GNU tar in POSIX format with entries sorted by name, numeric owners (the
//! container's own ids, as on disk), modes, xattrs and file mtimes kept, access and change times
//! left out, fixed pax header names, compressed by `gzip -n` (no name, no timestamp) at level 6.
//! A published image's fingerprint is the sha256 of exactly that tarball, which is LXD's rule
//! for unified images: `berth image export` then `berth image import` (or `lxc image import`)
//! elsewhere gives the same fingerprint. Images built or imported here keep the fingerprints
//! they were given (a built image's tree hash, an imported image's file hash), so an export of
//! those is a faithful tarball but hashes to a different value.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use sha2::{Digest, Sha256};

use super::{
    BUILD_PREFIX, ImageError, ImageRecord, ImageStore, host_architecture, import, metadata_yaml,
    now_unix, util,
};

/// Entries of an image volume that go into its tarball, in this order (those present).
const MEMBERS: &[&str] = &["metadata.yaml", "rootfs", "templates"];

/// Makes an image from `source` (an instance volume, stopped, or a snapshot: a directory with
/// `rootfs/`), with `properties` over those of the metadata.yaml it carries. The caller keeps
/// the source unchanged meanwhile.
pub(super) fn publish(
    store: &ImageStore,
    source: &Path,
    properties: &BTreeMap<String, String>,
) -> Result<ImageRecord, ImageError> {
    if !source.join("rootfs").is_dir() {
        return Err(ImageError::InvalidImage(format!(
            "{} has no rootfs/ to publish",
            source.display()
        )));
    }
    let tmp_name = format!("{BUILD_PREFIX}{}", util::random_hex(8));
    let vol = store.storage.create_image_volume_from(&tmp_name, source)?;
    let made = (|| {
        // What the source's own image said (os, release, ...), overridden by the request.
        let mut props = std::fs::read_to_string(vol.join("metadata.yaml"))
            .ok()
            .and_then(|t| import::parse_metadata(&t).ok())
            .map(|m| m.properties)
            .unwrap_or_default();
        props.extend(properties.iter().map(|(k, v)| (k.clone(), v.clone())));
        let created = now_unix();
        let architecture = props
            .get("architecture")
            .cloned()
            .unwrap_or_else(|| host_architecture().to_string());
        let yaml = metadata_yaml(&architecture, created, &props);
        let meta_path = vol.join("metadata.yaml");
        // Never through a symlink the instance may have left there.
        match std::fs::symlink_metadata(&meta_path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&meta_path),
            Ok(_) => std::fs::remove_file(&meta_path),
            Err(_) => Ok(()),
        }
        .map_err(util::io_err(&meta_path))?;
        util::write_atomic(&meta_path, yaml.as_bytes())?;
        // Only what the tarball carries stays in the volume.
        for entry in std::fs::read_dir(&vol).map_err(util::io_err(&vol))? {
            let entry = entry.map_err(util::io_err(&vol))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !MEMBERS.contains(&name.as_str()) {
                let p = entry.path();
                let removed = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                removed.map_err(util::io_err(&p))?;
            }
        }
        let templates = vol.join("templates");
        if templates.is_symlink() {
            std::fs::remove_file(&templates).map_err(util::io_err(&templates))?;
        }
        let mut hasher = Sha256::new();
        let size = write_tarball(&vol, |chunk| {
            hasher.update(chunk);
            Ok(())
        })?;
        let fp = hex::encode(hasher.finalize());
        let prop = |k: &str| props.get(k).cloned().unwrap_or_default();
        Ok(ImageRecord {
            fingerprint: fp,
            aliases: Vec::new(),
            os: prop("os"),
            release: prop("release"),
            architecture,
            description: prop("description"),
            size_bytes: size,
            created_at: created,
            properties: props,
        })
    })();
    let rec = match made {
        Ok(r) => r,
        Err(e) => {
            let _ = store.storage.delete_image_volume(&tmp_name);
            return Err(e);
        }
    };
    if let Some(existing) = store.read_record(&rec.fingerprint)? {
        store.storage.delete_image_volume(&tmp_name)?;
        return Ok(existing);
    }
    // A volume without a record is a crash leftover: replace it.
    store.storage.delete_image_volume(&rec.fingerprint)?;
    if let Err(e) = store
        .storage
        .rename_image_volume(&tmp_name, &rec.fingerprint)
    {
        let _ = store.storage.delete_image_volume(&tmp_name);
        return Err(e.into());
    }
    store.finish(rec, None)
}

/// Streams the unified tarball of image volume `vol` to `sink` chunk by chunk; returns its
/// length. A sink error stops the tar and gzip processes and is returned.
pub(super) fn write_tarball(
    vol: &Path,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<u64, ImageError> {
    let members: Vec<&str> = MEMBERS
        .iter()
        .copied()
        .filter(|m| std::fs::symlink_metadata(vol.join(m)).is_ok())
        .collect();
    let mut tar = Command::new("tar");
    tar.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .arg("-C")
        .arg(vol)
        .args([
            "--create",
            "--file=-",
            "--format=posix",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "--sort=name",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--one-file-system",
            "--",
        ])
        .args(&members)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut tar = Reaped::new(tar.spawn().map_err(|e| ImageError::Command {
        op: "tar --create".into(),
        detail: format!("cannot spawn: {e}"),
    })?);
    let tar_out = tar.0.stdout.take().ok_or_else(|| ImageError::Command {
        op: "tar --create".into(),
        detail: "no stdout".into(),
    })?;
    let mut gzip = Command::new("gzip");
    gzip.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .args(["-n", "-6", "-c"])
        .stdin(Stdio::from(tar_out))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut gzip = Reaped::new(gzip.spawn().map_err(|e| ImageError::Command {
        op: "gzip".into(),
        detail: format!("cannot spawn: {e}"),
    })?);
    let mut out = gzip.0.stdout.take().ok_or_else(|| ImageError::Command {
        op: "gzip".into(),
        detail: "no stdout".into(),
    })?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(util::io_err(vol)(e)),
        };
        sink(&buf[..n]).map_err(util::io_err(vol))?;
        total += n as u64;
    }
    drop(out);
    tar.finish("tar --create")?;
    gzip.finish("gzip")?;
    Ok(total)
}

/// A child process killed and reaped when dropped before [`Reaped::finish`]; its stderr is
/// read on a thread (so a chatty process never blocks on a full pipe).
struct Reaped(Child, Option<std::thread::JoinHandle<Vec<u8>>>);

impl Reaped {
    fn new(mut child: Child) -> Reaped {
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = e.read_to_end(&mut buf);
                buf
            })
        });
        Reaped(child, stderr)
    }

    /// Waits for the process; an error carrying its stderr unless it exited 0.
    fn finish(mut self, op: &str) -> Result<(), ImageError> {
        let status = self.0.wait().map_err(|e| ImageError::Command {
            op: op.to_string(),
            detail: format!("cannot wait: {e}"),
        })?;
        let stderr = self
            .1
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if !status.success() {
            return Err(ImageError::Command {
                op: op.to_string(),
                detail: format!("{} ({status})", util::tail(&stderr, 2000)),
            });
        }
        Ok(())
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tarball(vol: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        let n = write_tarball(vol, |c| {
            out.extend_from_slice(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(n as usize, out.len());
        out
    }

    #[test]
    fn tarball_is_reproducible_and_complete() {
        let t = tempfile::tempdir().unwrap();
        let vol = t.path();
        std::fs::create_dir_all(vol.join("rootfs/etc")).unwrap();
        std::fs::write(vol.join("rootfs/etc/b"), "b").unwrap();
        std::fs::write(vol.join("rootfs/etc/a"), "a").unwrap();
        std::os::unix::fs::symlink("a", vol.join("rootfs/etc/l")).unwrap();
        std::fs::write(vol.join("metadata.yaml"), "architecture: x86_64\n").unwrap();
        std::fs::write(vol.join("other"), "not exported").unwrap();
        let first = tarball(vol);
        // Reading the files (atime) and changing an inode (ctime) change nothing.
        let _ = std::fs::read(vol.join("rootfs/etc/a")).unwrap();
        std::os::unix::fs::lchown(vol.join("rootfs/etc/b"), Some(0), Some(0)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(tarball(vol), first);
        let out = tempfile::tempdir().unwrap();
        let f = out.path().join("image.tar.gz");
        std::fs::write(&f, &first).unwrap();
        let list = Command::new("tar").arg("-tzf").arg(&f).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout).to_string();
        let names: Vec<&str> = list.lines().collect();
        assert_eq!(
            names,
            [
                "metadata.yaml",
                "rootfs/",
                "rootfs/etc/",
                "rootfs/etc/a",
                "rootfs/etc/b",
                "rootfs/etc/l"
            ]
        );
    }
}
