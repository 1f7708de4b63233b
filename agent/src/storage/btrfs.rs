//! The `btrfs` storage driver: image volumes are subvolumes (read-only once finished), instance
//! volumes are writable snapshots of them, so a launch copies nothing.
//!
//! The pool is a directory on a btrfs filesystem: one the operator gives, a block device mounted
//! at the pool mount point, or (the default) a sparse loop file formatted and mounted there.
//!
//! Disk limits are qgroup limits on the referenced size of an instance subvolume (what the
//! instance sees as its root filesystem, its image's shared data included). Quotas slow some
//! btrfs operations (snapshot deletion above all), so they are enabled on the pool only when the
//! first limit is set, and stay on. Usage and limits are read from `/sys/fs/btrfs/<fsid>/qgroups`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use super::{
    CONTAINERS_DIR, DiskUsage, IMAGES_DIR, PoolLayout, PoolUsage, SNAPSHOTS_DIR, SnapshotMeta,
    StorageDriver, StorageError, VolumeSteps, create_dir_if_missing, ensure_dir, io_err, now_unix,
    run, snapshot_created_at, statvfs_usage, write_created_at,
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
    /// Held while quotas are being enabled, so two first limits do not both enable them.
    quota_lock: Mutex<()>,
    /// The pool filesystem's directory in `/sys/fs/btrfs`, found on first use.
    sysfs: OnceLock<Option<PathBuf>>,
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
        ensure_dir(&root.join(SNAPSHOTS_DIR), 0o700)?;
        let driver = BtrfsDriver {
            cfg,
            pool: PoolLayout { root },
            quota_lock: Mutex::new(()),
            sysfs: OnceLock::new(),
        };
        for leftover in driver.pool.interrupted_swaps()? {
            tracing::info!(volume = %leftover.display(), "removing what an interrupted volume replacement left");
            if is_subvolume(&leftover) {
                driver.delete_subvolume_tree(&leftover)?;
            } else if let Err(e) = fs::remove_dir_all(&leftover) {
                return Err(io_err(&leftover)(e));
            }
        }
        tracing::info!(pool = %driver.pool.root.display(), "btrfs storage pool ready");
        Ok(driver)
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
    /// ones writable first, then their qgroups when quotas are on (btrfs leaves them behind).
    /// Succeeds when `path` does not exist.
    fn delete_subvolume_tree(&self, path: &Path) -> Result<(), StorageError> {
        if fs::symlink_metadata(path).is_err() {
            return Ok(());
        }
        let quotas = self.quotas_enabled();
        // Most subvolumes hold no others: one ioctl deletes them (the kernel refuses with
        // ENOTEMPTY when some are nested; then they are found and deleted deepest first).
        let id = if quotas {
            crate::sys::btrfs::subvolume_id(path).ok()
        } else {
            None
        };
        match crate::sys::btrfs::delete_subvolume(path) {
            Ok(()) => return self.destroy_qgroups(&id.into_iter().collect::<Vec<_>>()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(e) => {
                tracing::debug!(subvolume = %path.display(), "deleting by ioctl failed, trying btrfs: {e}")
            }
        }
        let mut nested = nested_subvolumes(path)?;
        // Deepest first.
        nested.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        let mut ids = Vec::new();
        for sub in nested.iter().chain(std::iter::once(&path.to_path_buf())) {
            if quotas {
                match crate::sys::btrfs::subvolume_id(sub) {
                    Ok(id) => ids.push(id),
                    Err(e) => tracing::warn!(
                        subvolume = %sub.display(),
                        "cannot read the subvolume id; its qgroup may stay behind: {e}"
                    ),
                }
            }
            // A read-only subvolume with nothing nested deletes as it is; one holding nested
            // subvolumes must be writable to lose them. (Received snapshots refuse to become
            // writable, and never hold nested subvolumes.)
            if !nested.is_empty() {
                set_readonly(sub, false)?;
            }
            run(Command::new("btrfs").args(["subvolume", "delete"]).arg(sub))?;
        }
        self.destroy_qgroups(&ids)
    }

    /// Snapshots subvolume `src` at `dst` (read-only with `readonly`).
    fn snapshot_subvolume(src: &Path, dst: &Path, readonly: bool) -> Result<(), StorageError> {
        crate::sys::btrfs::snapshot(src, dst, readonly).map_err(|e| StorageError::Command {
            op: format!(
                "btrfs subvolume snapshot{} {} {}",
                if readonly { " -r" } else { "" },
                src.display(),
                dst.display()
            ),
            detail: e.to_string(),
        })
    }

    /// Deletes the read-only bases transfers keep for `instance` (`bases/<instance>/`, see
    /// [`crate::transfer`]) and the directory itself.
    fn delete_bases(&self, instance: &str) -> Result<(), StorageError> {
        super::check_volume_name(instance)?;
        self.delete_volume_dir(&self.pool.root.join("bases").join(instance))
    }

    /// Deletes the subvolumes in `dir` (with theirs) and then `dir`; succeeds when it is gone.
    fn delete_volume_dir(&self, dir: &Path) -> Result<(), StorageError> {
        if !dir.is_dir() {
            return Ok(());
        }
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let path = e.map_err(io_err(dir))?.path();
            if is_subvolume(&path) {
                self.delete_subvolume_tree(&path)?;
            }
        }
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(dir)(e)),
        }
    }

    /// `/sys/fs/btrfs/<fsid>` of the pool's filesystem (None when it cannot be found: quotas
    /// are then judged by asking `btrfs`, and usage is not reported).
    fn sysfs_dir(&self) -> Option<&Path> {
        self.sysfs
            .get_or_init(|| match crate::sys::btrfs::fs_uuid(&self.pool.root) {
                Ok(uuid) => {
                    let dir = Path::new("/sys/fs/btrfs").join(uuid);
                    dir.is_dir().then_some(dir)
                }
                Err(e) => {
                    tracing::warn!(pool = %self.pool.root.display(), "cannot read the btrfs filesystem id: {e}");
                    None
                }
            })
            .as_deref()
    }

    /// Whether quotas (qgroups) are on for the pool's filesystem.
    pub fn quotas_enabled(&self) -> bool {
        match self.sysfs_dir() {
            Some(dir) => dir.join("qgroups").is_dir(),
            None => Command::new("btrfs")
                .args(["qgroup", "show"])
                .arg(&self.pool.root)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false),
        }
    }

    /// Turns quotas on (once; they stay on) and waits for the initial scan, so that limits count
    /// the data already there.
    fn ensure_quotas(&self) -> Result<(), StorageError> {
        let _one_at_a_time = self.quota_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.quotas_enabled() {
            return Ok(());
        }
        tracing::info!(pool = %self.pool.root.display(), "enabling btrfs quotas for the first disk limit");
        run(Command::new("btrfs")
            .args(["quota", "enable"])
            .arg(&self.pool.root))?;
        run(Command::new("btrfs")
            .args(["quota", "rescan", "-W"])
            .arg(&self.pool.root))?;
        Ok(())
    }

    /// Removes the level-0 qgroups of deleted subvolumes. The kernel refuses (EBUSY) while a
    /// deleted subvolume's data is still being dropped, so then this wakes the cleaner (`btrfs
    /// filesystem sync`; otherwise it waits for the next commit, up to 30 s), waits for it
    /// (`btrfs subvolume sync`) and tries again; newer kernels remove the qgroup themselves once
    /// the subvolume is gone.
    fn destroy_qgroups(&self, ids: &[u64]) -> Result<(), StorageError> {
        if ids.is_empty() {
            return Ok(());
        }
        let root = &self.pool.root;
        let destroy = |id: u64| -> Result<bool, StorageError> {
            if !self.qgroup_exists(id) {
                return Ok(true);
            }
            let out = Command::new("btrfs")
                .args(["qgroup", "destroy", &format!("0/{id}")])
                .arg(root)
                .output()
                .map_err(|e| StorageError::Command {
                    op: "btrfs qgroup destroy".into(),
                    detail: format!("cannot spawn: {e}"),
                })?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            Ok(out.status.success() || stderr.contains("No such file"))
        };
        let mut busy = Vec::new();
        for &id in ids {
            if !destroy(id)? {
                busy.push(id);
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        let fs_sync = || run(Command::new("btrfs").args(["filesystem", "sync"]).arg(root));
        fs_sync()?;
        let mut sync = Command::new("btrfs");
        sync.args(["subvolume", "sync"]).arg(root);
        for id in &busy {
            sync.arg(id.to_string());
        }
        run(&mut sync)?;
        for id in busy {
            // The subvolume is gone; its qgroup goes at the latest with the next commit.
            let mut tries = 0;
            while !destroy(id)? {
                tries += 1;
                if tries == 3 {
                    return Err(StorageError::Command {
                        op: format!("btrfs qgroup destroy 0/{id} {}", root.display()),
                        detail: "the qgroup of the deleted subvolume is still in use".into(),
                    });
                }
                fs_sync()?;
            }
        }
        Ok(())
    }

    /// Whether the level-0 qgroup of subvolume `id` exists (true when it cannot be told).
    fn qgroup_exists(&self, id: u64) -> bool {
        match self.sysfs_dir() {
            Some(dir) => dir.join("qgroups").join(format!("0_{id}")).exists(),
            None => true,
        }
    }
}

impl VolumeSteps for BtrfsDriver {
    fn layout(&self) -> &PoolLayout {
        &self.pool
    }

    fn clone_volume(&self, src: &Path, dst: &Path) -> Result<(), StorageError> {
        Self::snapshot_subvolume(src, dst, false)
    }

    fn delete_all_snapshots(&self, instance: &str) -> Result<(), StorageError> {
        // Hidden ones too: volumes a transfer to this instance was staging.
        self.delete_volume_dir(&self.pool.snapshots_of(instance)?)
    }

    // The copy is a read-only snapshot of the subvolume.
    fn copy_snapshot(&self, src: &str, snap: &SnapshotMeta, dst: &str) -> Result<(), StorageError> {
        let from = self.pool.existing_snapshot(src, &snap.name)?;
        let to = self.pool.new_snapshot_path(dst, &snap.name)?;
        write_created_at(&to, snap.created_at)?;
        Self::snapshot_subvolume(&from, &to, true)
    }

    fn replace_instance_volume(&self, name: &str, source: &Path) -> Result<(), StorageError> {
        self.pool.existing_instance(name)?;
        let limit = self.instance_disk_usage(name).and_then(|d| d.limit);
        let new = self.pool.scratch_path("new", name)?;
        let old = self.pool.scratch_path("old", name)?;
        // Leftovers of an interrupted replacement.
        self.delete_subvolume_tree(&new)?;
        self.delete_subvolume_tree(&old)?;
        Self::snapshot_subvolume(source, &new, false)?;
        if let Err(e) = self.pool.swap_instance_volume(name, &new, &old) {
            let _ = self.delete_subvolume_tree(&new);
            return Err(e);
        }
        if let Err(e) = self.delete_subvolume_tree(&old) {
            tracing::warn!(
                instance = name,
                "cannot delete the replaced volume {}: {e}",
                old.display()
            );
        }
        if let Some(bytes) = limit {
            self.set_instance_disk_limit(name, Some(bytes))?;
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

    fn create_image_volume_from(
        &self,
        fingerprint: &str,
        source: &Path,
    ) -> Result<PathBuf, StorageError> {
        let path = self.pool.image_path(fingerprint)?;
        self.delete_subvolume_tree(&path)?;
        Self::snapshot_subvolume(source, &path, false)?;
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
        // A snapshot of a read-only subvolume is writable unless asked read-only.
        Self::snapshot_subvolume(&src, &dst, false)?;
        Ok(dst)
    }

    fn instance_volume(&self, name: &str) -> Option<PathBuf> {
        self.pool.instance_volume(name)
    }

    fn delete_instance_volume(&self, name: &str) -> Result<(), StorageError> {
        let path = self.pool.instance_path(name)?;
        self.delete_all_snapshots(name)?;
        self.delete_bases(name)?;
        self.delete_subvolume_tree(&path)
    }

    fn rename_instance_volume(&self, from: &str, to: &str) -> Result<(), StorageError> {
        // Bases kept for incremental sends belong to the old name's transfers: a later copy
        // sends in full once.
        self.delete_bases(from)?;
        self.pool.rename_instance_volume(from, to)
    }

    fn pool_root(&self) -> &Path {
        &self.pool.root
    }

    fn create_snapshot(
        &self,
        instance: &str,
        snapshot: &str,
    ) -> Result<SnapshotMeta, StorageError> {
        let src = self.pool.existing_instance(instance)?;
        let dst = self.pool.new_snapshot_path(instance, snapshot)?;
        if dst.is_dir() {
            return Ok(SnapshotMeta {
                name: snapshot.to_string(),
                created_at: snapshot_created_at(&dst),
            });
        }
        let created_at = now_unix();
        // The time first: a snapshot never exists without it.
        write_created_at(&dst, created_at)?;
        if let Err(e) = Self::snapshot_subvolume(&src, &dst, true) {
            let _ = fs::remove_file(super::created_path(&dst));
            return Err(e);
        }
        tracing::info!(instance, snapshot, "took snapshot");
        Ok(SnapshotMeta {
            name: snapshot.to_string(),
            created_at,
        })
    }

    fn delete_snapshot(&self, instance: &str, snapshot: &str) -> Result<(), StorageError> {
        let path = self.snapshot_path(instance, snapshot)?;
        self.delete_subvolume_tree(&path)?;
        match fs::remove_file(super::created_path(&path)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.pool.remove_snapshot_dir_if_empty(instance)
    }

    fn snapshot_size(&self, instance: &str, snapshot: &str) -> Result<u64, StorageError> {
        let path = self.pool.existing_snapshot(instance, snapshot)?;
        if let Some(dir) = self.sysfs_dir()
            && dir.join("qgroups").is_dir()
            && let Ok(id) = crate::sys::btrfs::subvolume_id(&path)
            && let Ok(t) = fs::read_to_string(
                dir.join("qgroups")
                    .join(format!("0_{id}"))
                    .join("exclusive"),
            )
            && let Ok(v) = t.trim().parse::<u64>()
        {
            return Ok(v);
        }
        let out = run(Command::new("btrfs")
            .args(["filesystem", "du", "-s", "--raw"])
            .arg(&path))?;
        parse_du_exclusive(&out).ok_or_else(|| StorageError::Command {
            op: format!("btrfs filesystem du -s --raw {}", path.display()),
            detail: format!("unexpected output {:?}", out.trim()),
        })
    }

    fn restore_snapshot(&self, instance: &str, snapshot: &str) -> Result<(), StorageError> {
        super::restore_snapshot_with(self, instance, snapshot)
    }

    fn copy_instance_volume(
        &self,
        src: &str,
        src_snapshot: Option<&str>,
        dst: &str,
        instance_only: bool,
        refresh: bool,
    ) -> Result<(), StorageError> {
        super::copy_instance_volume_with(self, src, src_snapshot, dst, instance_only, refresh)
    }

    fn supports_disk_limits(&self) -> bool {
        true
    }

    fn set_instance_disk_limit(&self, name: &str, bytes: Option<u64>) -> Result<(), StorageError> {
        let path = self
            .pool
            .instance_volume(name)
            .ok_or_else(|| StorageError::VolumeNotFound(name.to_string()))?;
        let size = match bytes {
            Some(b) => {
                self.ensure_quotas()?;
                b.to_string()
            }
            // No quotas: nothing is limited, nothing to remove.
            None if !self.quotas_enabled() => return Ok(()),
            None => "none".to_string(),
        };
        run(Command::new("btrfs")
            .args(["qgroup", "limit", &size])
            .arg(&path))?;
        tracing::info!(instance = name, limit = %size, "set disk limit");
        Ok(())
    }

    fn instance_disk_usage(&self, name: &str) -> Option<DiskUsage> {
        let qgroups = self.sysfs_dir()?.join("qgroups");
        if !qgroups.is_dir() {
            return None;
        }
        let path = self.pool.instance_volume(name)?;
        let id = crate::sys::btrfs::subvolume_id(&path).ok()?;
        read_qgroup(&qgroups.join(format!("0_{id}")))
    }
}

/// Whether `path` is the root of a btrfs subvolume (its inode is always 256 there).
fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == 256)
}

/// The Exclusive column of `btrfs filesystem du -s --raw` output (header line, then
/// `Total Exclusive Set-shared Filename`).
fn parse_du_exclusive(out: &str) -> Option<u64> {
    out.lines()
        .skip(1)
        .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// `BTRFS_QGROUP_LIMIT_MAX_RFER` in a qgroup's `limit_flags`.
const LIMIT_MAX_RFER: u64 = 1;

/// Usage and referenced-size limit of one qgroup from its sysfs directory.
fn read_qgroup(dir: &Path) -> Option<DiskUsage> {
    let num =
        |f: &str| -> Option<u64> { fs::read_to_string(dir.join(f)).ok()?.trim().parse().ok() };
    let used = num("referenced")?;
    let flags = num("limit_flags").unwrap_or(0);
    let limit = if flags & LIMIT_MAX_RFER != 0 {
        num("max_referenced").filter(|l| *l > 0)
    } else {
        None
    };
    Some(DiskUsage { used, limit })
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
    fn qgroup_from_sysfs() {
        let t = tempfile::tempdir().unwrap();
        let q = t.path();
        fs::write(q.join("referenced"), "5259264\n").unwrap();
        fs::write(q.join("limit_flags"), "0\n").unwrap();
        fs::write(q.join("max_referenced"), "0\n").unwrap();
        assert_eq!(
            read_qgroup(q),
            Some(DiskUsage {
                used: 5259264,
                limit: None
            })
        );
        fs::write(q.join("limit_flags"), "1\n").unwrap();
        fs::write(q.join("max_referenced"), "67108864\n").unwrap();
        assert_eq!(read_qgroup(q).unwrap().limit, Some(64 << 20));
        // Only an exclusive-size limit (flag 2): no referenced limit.
        fs::write(q.join("limit_flags"), "2\n").unwrap();
        assert_eq!(read_qgroup(q).unwrap().limit, None);
        fs::remove_file(q.join("referenced")).unwrap();
        assert_eq!(read_qgroup(q), None);
    }

    #[test]
    fn du_exclusive() {
        let out = "     Total   Exclusive  Set shared  Filename\n   1064960       16384     1048576  /p/snapshots/a/s0\n";
        assert_eq!(parse_du_exclusive(out), Some(16384));
        assert_eq!(
            parse_du_exclusive("     Total   Exclusive  Set shared  Filename\n"),
            None
        );
        assert_eq!(parse_du_exclusive(""), None);
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
