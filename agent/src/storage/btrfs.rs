//! The `btrfs` storage driver: image volumes are subvolumes (read-only once finished), instance
//! volumes are writable snapshots of them, so a launch copies nothing.
//!
//! The pool is a directory on a btrfs filesystem: one the operator gives, a block device mounted
//! at the pool mount point, or (the default) a sparse loop file formatted and mounted there.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{
    CONTAINERS_DIR, IMAGES_DIR, PoolLayout, PoolUsage, StorageDriver, StorageError,
    create_dir_if_missing, ensure_dir, io_err, run, statvfs_usage,
};

/// statfs magic of btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// Default loop file backing the pool when no device or path is configured.
pub const DEFAULT_LOOP_FILE: &str = "/var/lib/berth/disks/default.img";
/// Default pool mount point.
pub const DEFAULT_MOUNT_POINT: &str = "/var/lib/berth/storage/default";
/// Default size of the sparse loop file: 30 GiB.
pub const DEFAULT_LOOP_SIZE: u64 = 30 << 30;

/// Where the btrfs pool lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BtrfsSource {
    /// A sparse file, created (and formatted) when missing, attached to a loop device and
    /// mounted at the mount point.
    LoopFile { path: PathBuf, size_bytes: u64 },
    /// A block device, formatted only when it carries no filesystem, mounted at the mount point.
    Device(PathBuf),
    /// A directory on an already mounted btrfs filesystem; it is the pool root (no mount).
    Directory(PathBuf),
}

/// Configuration of a btrfs pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtrfsConfig {
    pub source: BtrfsSource,
    /// Where a loop file or device is mounted (ignored for [`BtrfsSource::Directory`]).
    pub mount_point: PathBuf,
}

impl Default for BtrfsConfig {
    fn default() -> Self {
        BtrfsConfig {
            source: BtrfsSource::LoopFile {
                path: PathBuf::from(DEFAULT_LOOP_FILE),
                size_bytes: DEFAULT_LOOP_SIZE,
            },
            mount_point: PathBuf::from(DEFAULT_MOUNT_POINT),
        }
    }
}

/// A btrfs storage pool.
#[derive(Debug)]
pub struct BtrfsDriver {
    cfg: BtrfsConfig,
    pool: PoolLayout,
}

impl BtrfsDriver {
    /// Opens the pool: creates, formats, attaches and mounts what is missing. Opening a pool that
    /// is already mounted is a no-op apart from checking it.
    pub fn open(cfg: BtrfsConfig) -> Result<BtrfsDriver, StorageError> {
        let root = match &cfg.source {
            BtrfsSource::Directory(dir) => {
                create_dir_if_missing(dir, 0o711)?;
                dir.clone()
            }
            BtrfsSource::LoopFile { path, size_bytes } => {
                if !is_mount_point(&cfg.mount_point)? {
                    let dev = attach_loop_file(path, *size_bytes)?;
                    mount_device(&dev, &cfg.mount_point)?;
                }
                cfg.mount_point.clone()
            }
            BtrfsSource::Device(dev) => {
                if !is_mount_point(&cfg.mount_point)? {
                    format_if_blank(dev)?;
                    mount_device(dev, &cfg.mount_point)?;
                }
                cfg.mount_point.clone()
            }
        };
        check_btrfs(&root)?;
        ensure_dir(&root.join(IMAGES_DIR), 0o700)?;
        ensure_dir(&root.join(CONTAINERS_DIR), 0o700)?;
        tracing::info!(pool = %root.display(), "btrfs storage pool ready");
        Ok(BtrfsDriver {
            cfg,
            pool: PoolLayout { root },
        })
    }

    /// The pool root (the mount point, or the configured directory).
    pub fn root(&self) -> &Path {
        &self.pool.root
    }

    /// Unmounts the pool and detaches its loop device (for tests and decommissioning). Does
    /// nothing for a [`BtrfsSource::Directory`] pool; succeeds when already unmounted.
    pub fn unmount(&self) -> Result<(), StorageError> {
        match &self.cfg.source {
            BtrfsSource::Directory(_) => Ok(()),
            BtrfsSource::Device(_) => {
                if is_mount_point(&self.cfg.mount_point)? {
                    run(Command::new("umount").arg(&self.cfg.mount_point))?;
                }
                Ok(())
            }
            BtrfsSource::LoopFile { path, .. } => {
                if is_mount_point(&self.cfg.mount_point)? {
                    run(Command::new("umount").arg(&self.cfg.mount_point))?;
                }
                for dev in loop_devices_of(path)? {
                    run(Command::new("losetup").arg("-d").arg(&dev))?;
                }
                Ok(())
            }
        }
    }

    /// Deletes a subvolume and every subvolume nested in it (deepest first), making read-only
    /// ones writable first. Succeeds when `path` does not exist.
    fn delete_subvolume_tree(&self, path: &Path) -> Result<(), StorageError> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        let mut nested = nested_subvolumes(path)?;
        // Deepest first.
        nested.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for sub in nested.iter().chain(std::iter::once(&path.to_path_buf())) {
            set_readonly(sub, false)?;
            run(Command::new("btrfs").args(["subvolume", "delete"]).arg(sub))?;
        }
        Ok(())
    }
}

impl StorageDriver for BtrfsDriver {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn supports_idmapped_mounts(&self) -> bool {
        true
    }

    fn usage(&self) -> Result<PoolUsage, StorageError> {
        statvfs_usage(&self.pool.root)
    }

    fn create_image_volume(&self, fingerprint: &str) -> Result<PathBuf, StorageError> {
        let path = self.pool.image_path(fingerprint)?;
        if path.exists() {
            // A leftover of an interrupted build: start afresh.
            self.delete_subvolume_tree(&path)?;
        }
        run(Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&path))?;
        ensure_dir(&path.join("rootfs"), 0o755)?;
        Ok(path)
    }

    fn finish_image_volume(&self, fingerprint: &str) -> Result<(), StorageError> {
        let path = self.pool.image_path(fingerprint)?;
        if !path.exists() {
            return Err(StorageError::ImageNotFound(fingerprint.to_string()));
        }
        set_readonly(&path, true)
    }

    fn image_volume(&self, fingerprint: &str) -> Option<PathBuf> {
        self.pool.image_volume(fingerprint)
    }

    fn delete_image_volume(&self, fingerprint: &str) -> Result<(), StorageError> {
        let path = self.pool.image_path(fingerprint)?;
        self.delete_subvolume_tree(&path)
    }

    fn rename_image_volume(&self, from: &str, to: &str) -> Result<(), StorageError> {
        self.pool.rename_image_volume(from, to)
    }

    fn list_image_volumes(&self) -> Result<Vec<String>, StorageError> {
        self.pool.list_image_volumes()
    }

    fn create_instance_volume(
        &self,
        name: &str,
        fingerprint: &str,
    ) -> Result<PathBuf, StorageError> {
        let (src, dst) = self.pool.new_instance_paths(name, fingerprint)?;
        // A snapshot of a read-only subvolume is writable unless `-r` is given.
        run(Command::new("btrfs")
            .args(["subvolume", "snapshot"])
            .arg(&src)
            .arg(&dst))?;
        Ok(dst)
    }

    fn instance_volume(&self, name: &str) -> Option<PathBuf> {
        self.pool.instance_volume(name)
    }

    fn delete_instance_volume(&self, name: &str) -> Result<(), StorageError> {
        let path = self.pool.instance_path(name)?;
        self.delete_subvolume_tree(&path)
    }

    fn rename_instance_volume(&self, from: &str, to: &str) -> Result<(), StorageError> {
        self.pool.rename_instance_volume(from, to)
    }
}

/// Sets or clears the read-only property of a subvolume.
fn set_readonly(path: &Path, ro: bool) -> Result<(), StorageError> {
    run(Command::new("btrfs")
        .args(["property", "set", "-ts"])
        .arg(path)
        .args(["ro", if ro { "true" } else { "false" }]))?;
    Ok(())
}

/// Absolute paths of all subvolumes below `path` (itself a subvolume), at any depth.
fn nested_subvolumes(path: &Path) -> Result<Vec<PathBuf>, StorageError> {
    // `btrfs subvolume show` prints the path relative to the filesystem's top level first;
    // `btrfs subvolume list -o` lists the subvolumes directly below the one holding its
    // argument, with paths relative to that same top level.
    let show = run(Command::new("btrfs").args(["subvolume", "show"]).arg(path))?;
    let own = show
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('/')
        .to_string();
    let mut found: Vec<PathBuf> = Vec::new();
    let mut todo: Vec<PathBuf> = vec![path.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let list = run(Command::new("btrfs")
            .args(["subvolume", "list", "-o"])
            .arg(&dir))?;
        for rel in parse_nested(&own, &list) {
            let abs = path.join(rel);
            if !found.contains(&abs) {
                found.push(abs.clone());
                todo.push(abs);
            }
        }
    }
    Ok(found)
}

/// From `btrfs subvolume list -o` output, the paths (relative to the subvolume at top-level path
/// `own`) of subvolumes nested below it.
fn parse_nested(own: &str, list: &str) -> Vec<String> {
    let prefix = if own.is_empty() {
        String::new()
    } else {
        format!("{own}/")
    };
    list.lines()
        .filter_map(|l| l.split_once(" path ").map(|(_, p)| p.trim()))
        .map(|p| p.strip_prefix("<FS_TREE>/").unwrap_or(p))
        .filter_map(|p| p.strip_prefix(prefix.as_str()))
        .filter(|rel| !rel.is_empty())
        .map(str::to_string)
        .collect()
}

fn check_btrfs(root: &Path) -> Result<(), StorageError> {
    let st = rustix::fs::statfs(root).map_err(|e| StorageError::Io {
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    #[allow(clippy::unnecessary_cast)]
    if st.f_type as i64 != BTRFS_SUPER_MAGIC {
        return Err(StorageError::BadPool {
            path: root.to_path_buf(),
            reason: "not on a btrfs filesystem".into(),
        });
    }
    Ok(())
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
fn is_mount_point(path: &Path) -> Result<bool, StorageError> {
    let info_path = Path::new("/proc/self/mountinfo");
    let info = fs::read_to_string(info_path).map_err(io_err(info_path))?;
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(mount_points(&info).iter().any(|m| Path::new(m) == want))
}

/// Mount points listed in a mountinfo text, with octal escapes decoded.
pub(crate) fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Loop devices currently backed by `file` (`losetup -j`).
fn loop_devices_of(file: &Path) -> Result<Vec<String>, StorageError> {
    if !file.exists() {
        return Ok(Vec::new());
    }
    let out = run(Command::new("losetup").arg("-j").arg(file))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(':').map(|(dev, _)| dev.trim().to_string()))
        .filter(|d| !d.is_empty())
        .collect())
}

/// Creates the sparse file (when missing), formats it (when blank) and attaches it to a loop
/// device, reusing one already backed by it. Returns the loop device.
fn attach_loop_file(file: &Path, size: u64) -> Result<PathBuf, StorageError> {
    if !file.exists() {
        if let Some(parent) = file.parent() {
            create_dir_if_missing(parent, 0o700)?;
        }
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
            .map_err(io_err(file))?;
        f.set_len(size).map_err(io_err(file))?;
        tracing::info!(file = %file.display(), size, "created sparse pool file");
    }
    format_if_blank(file)?;
    if let Some(dev) = loop_devices_of(file)?.into_iter().next() {
        return Ok(PathBuf::from(dev));
    }
    let out = run(Command::new("losetup").args(["--find", "--show"]).arg(file))?;
    let dev = out.trim();
    if dev.is_empty() {
        return Err(StorageError::Command {
            op: format!("losetup --find --show {}", file.display()),
            detail: "printed no device".into(),
        });
    }
    Ok(PathBuf::from(dev))
}

/// Runs mkfs.btrfs on `target` when it carries no filesystem signature; refuses one that
/// carries a filesystem other than btrfs.
fn format_if_blank(target: &Path) -> Result<(), StorageError> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(target)
        .output()
        .map_err(|e| StorageError::Command {
            op: "blkid".into(),
            detail: format!("cannot spawn: {e}"),
        })?;
    let fstype = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // blkid exits 2 when it finds no signature.
    match (out.status.code(), fstype.as_str()) {
        (Some(0), "btrfs") => Ok(()),
        (Some(0), other) => Err(StorageError::BadPool {
            path: target.to_path_buf(),
            reason: format!("it holds a {other} filesystem, not btrfs; refusing to format it"),
        }),
        (Some(2), _) => {
            tracing::info!(target = %target.display(), "formatting with mkfs.btrfs");
            run(Command::new("mkfs.btrfs")
                .args(["-q", "-L", "berth"])
                .arg(target))?;
            Ok(())
        }
        (code, _) => Err(StorageError::Command {
            op: format!("blkid -p {}", target.display()),
            detail: format!(
                "{} (exit {code:?})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
    }
}

fn mount_device(dev: &Path, mount_point: &Path) -> Result<(), StorageError> {
    create_dir_if_missing(mount_point, 0o711)?;
    run(Command::new("mount")
        .args(["-t", "btrfs", "-o", "user_subvol_rm_allowed"])
        .arg(dev)
        .arg(mount_point))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nested_from_list() {
        let list = "ID 256 gen 9 top level 5 path images/abc\n\
                    ID 257 gen 10 top level 5 path containers/web1\n\
                    ID 258 gen 11 top level 257 path containers/web1/rootfs/var/lib/machines\n\
                    ID 259 gen 12 top level 258 path containers/web1/rootfs/var/lib/machines/x\n\
                    ID 260 gen 12 top level 5 path containers/web10\n";
        assert_eq!(
            parse_nested("containers/web1", list),
            vec!["rootfs/var/lib/machines", "rootfs/var/lib/machines/x"]
        );
        assert!(parse_nested("containers/web10", list).is_empty());
        let list_a = "ID 258 gen 11 top level 257 path <FS_TREE>/pool/containers/a/rootfs/s\n";
        assert_eq!(parse_nested("pool/containers/a", list_a), vec!["rootfs/s"]);
    }

    #[test]
    fn mountinfo_escapes() {
        let info = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /var/lib/berth/storage/default rw - btrfs /dev/loop0 rw\n";
        assert_eq!(
            mount_points(info),
            vec!["/mnt/with space", "/var/lib/berth/storage/default"]
        );
    }
}
