//! Storage drivers behind one trait: `btrfs` (default; a sparse loop file when the operator gives
//! no device or btrfs path) and `dir` (plain directories, copy instead of snapshot).
//!
//! Pool layout (both drivers), under the pool's mount point:
//! - `images/<fingerprint>/`: an image volume: `rootfs/` and `metadata.yaml` (read-only once finished)
//! - `containers/<name>/`: an instance volume, a writable snapshot of its image volume;
//!   its root filesystem is `containers/<name>/rootfs`.
//! - `snapshots/<name>/<snapshot>/`: a snapshot of an instance volume (a read-only btrfs
//!   snapshot; a plain copy on the dir driver), with its creation time in the sidecar file
//!   `snapshots/<name>/.<snapshot>.created` (unix seconds; snapshot names never start with a
//!   dot, so sidecars never collide with snapshots).
//!
//! On-disk owners are the instance's own ids (uid 0 on disk is the instance's root); the runtime
//! maps them with an idmapped mount, so nothing is ever chowned at launch.
//!
//! Disk limits (`limits.disk`): the btrfs driver limits an instance volume's qgroup (quotas are
//! enabled on the pool the first time a limit is set, since they cost some speed); the dir
//! driver cannot limit disk use and refuses a limit.
//!
//! `images/`, `containers/` and `snapshots/` are mode 0700 (host root only): an instance root can plant
//! set-uid-0 files in its own rootfs, which host users must never reach.

pub mod btrfs;
pub mod dir;
pub mod send;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use btrfs::{BtrfsConfig, BtrfsDriver, BtrfsSource};
pub use dir::DirDriver;

/// Errors from a storage driver.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("image {0} is not on this node")]
    ImageNotFound(String),
    #[error("instance volume {0} does not exist")]
    VolumeNotFound(String),
    #[error("instance volume {0} already exists")]
    VolumeExists(String),
    #[error("{op} failed: {detail}")]
    Command { op: String, detail: String },
    #[error("invalid volume name {0:?}: must be non-empty and contain no '/', '..' or NUL")]
    InvalidName(String),
    #[error("invalid snapshot name {0:?}: {1}")]
    InvalidSnapshotName(String, &'static str),
    #[error("snapshot {snapshot} of instance {instance} does not exist")]
    SnapshotNotFound { instance: String, snapshot: String },
    #[error("snapshot {snapshot} of instance {instance} already exists")]
    SnapshotExists { instance: String, snapshot: String },
    #[error("the {driver} storage driver cannot limit disk use")]
    DiskLimitUnsupported { driver: &'static str },
    #[error("storage pool {path} is unusable: {reason}")]
    BadPool { path: PathBuf, reason: String },
    #[error("storage i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Space used and available in a pool, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub total: u64,
    pub used: u64,
}

/// An instance volume's disk use and limit, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes the volume references: its own data and what it shares with its image.
    pub used: u64,
    /// The size limit, when one is set.
    pub limit: Option<u64>,
}

/// A snapshot of an instance volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub name: String,
    /// Unix seconds when it was taken.
    pub created_at: i64,
}

/// A storage driver. Every method is blocking (call it from `spawn_blocking`) and idempotent
/// where the name says so.
pub trait StorageDriver: Send + Sync {
    /// "btrfs" or "dir".
    fn name(&self) -> &'static str;
    /// Whether the runtime may attach instance root filesystems through idmapped mounts.
    fn supports_idmapped_mounts(&self) -> bool;
    fn usage(&self) -> Result<PoolUsage, StorageError>;

    /// Creates an empty image volume to be filled, and returns its directory
    /// (`images/<fingerprint>`, with an empty `rootfs/` inside).
    fn create_image_volume(&self, fingerprint: &str) -> Result<PathBuf, StorageError>;
    /// Makes a writable image volume `images/<fingerprint>` from a copy of `source` (an
    /// instance volume or a snapshot: a btrfs snapshot, a plain copy on the dir driver) and
    /// returns its directory; seal it with [`StorageDriver::finish_image_volume`]. A leftover
    /// volume of that name is replaced.
    fn create_image_volume_from(
        &self,
        fingerprint: &str,
        source: &Path,
    ) -> Result<PathBuf, StorageError>;
    /// Seals a filled image volume (read-only subvolume on btrfs).
    fn finish_image_volume(&self, fingerprint: &str) -> Result<(), StorageError>;
    fn image_volume(&self, fingerprint: &str) -> Option<PathBuf>;
    /// Removes an image volume; succeeds when it is already gone.
    fn delete_image_volume(&self, fingerprint: &str) -> Result<(), StorageError>;
    /// Renames a finished or unfinished image volume (a build learns its fingerprint only at the end).
    fn rename_image_volume(&self, from: &str, to: &str) -> Result<(), StorageError>;
    /// Names of all image volumes in the pool (finished or not). The default lists none.
    fn list_image_volumes(&self) -> Result<Vec<String>, StorageError> {
        Ok(Vec::new())
    }

    /// Makes an instance volume from an image volume (a writable snapshot on btrfs) and returns
    /// its directory (`containers/<name>`).
    fn create_instance_volume(
        &self,
        name: &str,
        fingerprint: &str,
    ) -> Result<PathBuf, StorageError>;
    fn instance_volume(&self, name: &str) -> Option<PathBuf>;
    /// Removes an instance volume; succeeds when it is already gone.
    fn delete_instance_volume(&self, name: &str) -> Result<(), StorageError>;
    fn rename_instance_volume(&self, from: &str, to: &str) -> Result<(), StorageError>;

    /// The pool root (`images/`, `containers/` and `snapshots/` are below it).
    fn pool_root(&self) -> &Path;

    /// Where a snapshot's volume is (`snapshots/<instance>/<snapshot>`), whether or not it
    /// exists; the names are checked.
    fn snapshot_path(&self, instance: &str, snapshot: &str) -> Result<PathBuf, StorageError> {
        check_volume_name(instance)?;
        check_snapshot_name(snapshot)?;
        Ok(self
            .pool_root()
            .join(SNAPSHOTS_DIR)
            .join(instance)
            .join(snapshot))
    }
    /// Takes a snapshot of an instance volume (read-only; crash-consistent when the instance
    /// runs). Taking one that exists returns it unchanged.
    fn create_snapshot(&self, instance: &str, snapshot: &str)
    -> Result<SnapshotMeta, StorageError>;
    /// Deletes a snapshot; succeeds when it is already gone.
    fn delete_snapshot(&self, instance: &str, snapshot: &str) -> Result<(), StorageError>;
    /// Renames a snapshot (its creation time stays).
    fn rename_snapshot(&self, instance: &str, from: &str, to: &str) -> Result<(), StorageError> {
        let src = self.snapshot_path(instance, from)?;
        let dst = self.snapshot_path(instance, to)?;
        if !src.is_dir() {
            return Err(StorageError::SnapshotNotFound {
                instance: instance.to_string(),
                snapshot: from.to_string(),
            });
        }
        if std::fs::symlink_metadata(&dst).is_ok() {
            return Err(StorageError::SnapshotExists {
                instance: instance.to_string(),
                snapshot: to.to_string(),
            });
        }
        let created = snapshot_created_at(&src);
        std::fs::rename(&src, &dst).map_err(io_err(&src))?;
        write_created_at(&dst, created)?;
        let _ = std::fs::remove_file(created_path(&src));
        Ok(())
    }
    /// An instance's snapshots, oldest first (then by name). None is an empty list.
    fn list_snapshots(&self, instance: &str) -> Result<Vec<SnapshotMeta>, StorageError> {
        check_volume_name(instance)?;
        list_snapshot_dir(&self.pool_root().join(SNAPSHOTS_DIR).join(instance))
    }
    /// Bytes only this snapshot holds (what deleting it would free); 0 when the driver cannot
    /// tell.
    fn snapshot_size(&self, instance: &str, snapshot: &str) -> Result<u64, StorageError> {
        let _ = (instance, snapshot);
        Ok(0)
    }
    /// Records when a snapshot was taken (for a snapshot received from another node).
    fn set_snapshot_created_at(
        &self,
        instance: &str,
        snapshot: &str,
        created_at: i64,
    ) -> Result<(), StorageError> {
        let path = self.snapshot_path(instance, snapshot)?;
        if !path.is_dir() {
            return Err(StorageError::SnapshotNotFound {
                instance: instance.to_string(),
                snapshot: snapshot.to_string(),
            });
        }
        write_created_at(&path, created_at)
    }
    /// Replaces the instance volume by a writable copy of the snapshot (the instance must be
    /// stopped); a disk limit on the volume is set again on the new one.
    fn restore_snapshot(&self, instance: &str, snapshot: &str) -> Result<(), StorageError>;
    /// Makes instance volume `dst` from instance `src` (or its snapshot `src_snapshot`), with
    /// copies of `src`'s snapshots unless `instance_only` (a copy from a snapshot takes no
    /// snapshots, as in LXD). With `refresh`, `dst` exists (stopped): its root filesystem is
    /// replaced and the snapshots it lacks are added. Without it, `dst` must not exist.
    fn copy_instance_volume(
        &self,
        src: &str,
        src_snapshot: Option<&str>,
        dst: &str,
        instance_only: bool,
        refresh: bool,
    ) -> Result<(), StorageError>;

    /// Whether the driver can limit an instance volume's size (`limits.disk`).
    fn supports_disk_limits(&self) -> bool {
        false
    }
    /// Sets (`Some(bytes)`) or removes (`None`) the size limit of an instance volume; writes
    /// beyond it fail with EDQUOT. A driver that cannot limit disk use refuses a limit with
    /// [`StorageError::DiskLimitUnsupported`] and does nothing on a removal.
    fn set_instance_disk_limit(&self, name: &str, bytes: Option<u64>) -> Result<(), StorageError> {
        let _ = name;
        match bytes {
            Some(_) => Err(StorageError::DiskLimitUnsupported {
                driver: self.name(),
            }),
            None => Ok(()),
        }
    }
    /// An instance volume's disk use and limit, when the driver tracks them (btrfs once quotas
    /// are on); `None` otherwise.
    fn instance_disk_usage(&self, name: &str) -> Option<DiskUsage> {
        let _ = name;
        None
    }
}

/// The per-driver steps that restoring a snapshot ([`restore_snapshot_with`]) and copying an
/// instance volume ([`copy_instance_volume_with`]) are made of.
pub(crate) trait VolumeSteps: StorageDriver {
    /// The pool's directory layout.
    fn layout(&self) -> &PoolLayout;
    /// Makes `dst` (which does not exist) a writable copy of the volume at `src`.
    fn clone_volume(&self, src: &Path, dst: &Path) -> Result<(), StorageError>;
    /// Copies `src`'s snapshot `snap` to `dst`'s snapshots, with its creation time.
    fn copy_snapshot(&self, src: &str, snap: &SnapshotMeta, dst: &str) -> Result<(), StorageError>;
    /// Replaces instance volume `name` (which exists) by a writable copy of `source`, keeping
    /// its disk limit.
    fn replace_instance_volume(&self, name: &str, source: &Path) -> Result<(), StorageError>;
    /// Deletes every snapshot of `instance` and `snapshots/<instance>` itself.
    fn delete_all_snapshots(&self, instance: &str) -> Result<(), StorageError>;
}

/// [`StorageDriver::restore_snapshot`] from a driver's [`VolumeSteps`].
pub(crate) fn restore_snapshot_with(
    d: &impl VolumeSteps,
    instance: &str,
    snapshot: &str,
) -> Result<(), StorageError> {
    let snap = d.layout().existing_snapshot(instance, snapshot)?;
    d.replace_instance_volume(instance, &snap)?;
    tracing::info!(instance, snapshot, "restored snapshot");
    Ok(())
}

/// [`StorageDriver::copy_instance_volume`] from a driver's [`VolumeSteps`].
pub(crate) fn copy_instance_volume_with(
    d: &impl VolumeSteps,
    src: &str,
    src_snapshot: Option<&str>,
    dst: &str,
    instance_only: bool,
    refresh: bool,
) -> Result<(), StorageError> {
    let pool = d.layout();
    let source = match src_snapshot {
        Some(s) => pool.existing_snapshot(src, s)?,
        None => pool.existing_instance(src)?,
    };
    let dst_path = pool.instance_path(dst)?;
    let snaps = if instance_only || src_snapshot.is_some() {
        Vec::new()
    } else {
        d.list_snapshots(src)?
    };
    if refresh {
        pool.existing_instance(dst)?;
        let have: Vec<String> = d.list_snapshots(dst)?.into_iter().map(|s| s.name).collect();
        for snap in snaps.iter().filter(|s| !have.contains(&s.name)) {
            d.copy_snapshot(src, snap, dst)?;
        }
        d.replace_instance_volume(dst, &source)?;
        tracing::info!(source = src, target = dst, "refreshed instance volume");
        return Ok(());
    }
    if std::fs::symlink_metadata(&dst_path).is_ok() {
        return Err(StorageError::VolumeExists(dst.to_string()));
    }
    // Snapshots left by an instance of that name that is gone belong to nobody.
    d.delete_all_snapshots(dst)?;
    d.clone_volume(&source, &dst_path)?;
    let copied = snaps
        .iter()
        .try_for_each(|snap| d.copy_snapshot(src, snap, dst));
    if let Err(e) = copied {
        let _ = d.delete_instance_volume(dst);
        return Err(e);
    }
    tracing::info!(
        source = src,
        target = dst,
        snapshots = snaps.len(),
        "copied instance volume"
    );
    Ok(())
}

/// Subdirectory of the pool holding image volumes.
pub const IMAGES_DIR: &str = "images";
/// Subdirectory of the pool holding instance volumes.
pub const CONTAINERS_DIR: &str = "containers";
/// Subdirectory of the pool holding snapshots (`snapshots/<instance>/<snapshot>`).
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Longest snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 63;

/// Refuses a snapshot name that is not a valid volume name or is longer than 63 bytes.
pub fn check_snapshot_name(name: &str) -> Result<(), StorageError> {
    if name.len() > MAX_SNAPSHOT_NAME {
        return Err(StorageError::InvalidSnapshotName(
            name.to_string(),
            "longer than 63 characters",
        ));
    }
    check_volume_name(name).map_err(|_| {
        StorageError::InvalidSnapshotName(
            name.to_string(),
            "must be non-empty, not start with '.' and contain no '/', '..' or NUL",
        )
    })
}

/// The sidecar file holding a snapshot's creation time.
pub(crate) fn created_path(snapshot: &Path) -> PathBuf {
    let name = snapshot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    snapshot.with_file_name(format!(".{name}.created"))
}

/// Writes a snapshot's creation time to its sidecar file (atomically).
pub(crate) fn write_created_at(snapshot: &Path, created_at: i64) -> Result<(), StorageError> {
    let path = created_path(snapshot);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{created_at}\n")).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&tmp))
}

/// A snapshot's creation time: its sidecar file, else the volume's modification time.
pub(crate) fn snapshot_created_at(snapshot: &Path) -> i64 {
    if let Ok(t) = std::fs::read_to_string(created_path(snapshot))
        && let Ok(v) = t.trim().parse::<i64>()
    {
        return v;
    }
    std::fs::metadata(snapshot)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The snapshots in `snapshots/<instance>` (oldest first, then by name); none when the
/// directory is missing.
pub(crate) fn list_snapshot_dir(dir: &Path) -> Result<Vec<SnapshotMeta>, StorageError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out: Vec<SnapshotMeta> = list_names(dir)?
        .into_iter()
        .filter(|n| dir.join(n).is_dir())
        .map(|name| SnapshotMeta {
            created_at: snapshot_created_at(&dir.join(&name)),
            name,
        })
        .collect();
    out.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    Ok(out)
}

/// Unix seconds now.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Refuses a volume name that could leave its parent directory (defense in depth: callers
/// validate names already).
pub fn check_volume_name(name: &str) -> Result<(), StorageError> {
    let bad = name.is_empty()
        || name == "."
        || name.contains('/')
        || name.contains("..")
        || name.contains('\0')
        || name.starts_with('.');
    if bad {
        return Err(StorageError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Wraps an i/o error with the path it happened on.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs a command to completion; returns its stdout, or a `StorageError::Command` with its
/// stderr when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<String, StorageError> {
    let op = describe(cmd);
    tracing::debug!(command = %op, "running");
    let out = cmd.output().map_err(|e| StorageError::Command {
        op: op.clone(),
        detail: format!("cannot spawn: {e}"),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(StorageError::Command {
            op,
            detail: format!("{} ({})", stderr.trim(), out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Creates `dir` (and parents) and sets its mode.
pub(crate) fn ensure_dir(dir: &Path, mode: u32) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io_err(dir))
}

/// Creates `dir` (and parents) when missing, giving the new leaf directory `mode`; leaves an
/// existing directory as it is (it may belong to the operator).
pub(crate) fn create_dir_if_missing(dir: &Path, mode: u32) -> Result<(), StorageError> {
    if dir.is_dir() {
        return Ok(());
    }
    ensure_dir(dir, mode)
}

/// The directory layout every driver's pool shares: `images/<fingerprint>` and
/// `containers/<name>` under the pool root, with the checks that go with it.
#[derive(Debug)]
pub(crate) struct PoolLayout {
    pub(crate) root: PathBuf,
}

impl PoolLayout {
    pub(crate) fn image_path(&self, fingerprint: &str) -> Result<PathBuf, StorageError> {
        check_volume_name(fingerprint)?;
        Ok(self.root.join(IMAGES_DIR).join(fingerprint))
    }

    pub(crate) fn instance_path(&self, name: &str) -> Result<PathBuf, StorageError> {
        check_volume_name(name)?;
        Ok(self.root.join(CONTAINERS_DIR).join(name))
    }

    /// The image volume's directory when it exists.
    pub(crate) fn image_volume(&self, fingerprint: &str) -> Option<PathBuf> {
        let path = self.image_path(fingerprint).ok()?;
        path.is_dir().then_some(path)
    }

    /// The instance volume's directory when it exists.
    pub(crate) fn instance_volume(&self, name: &str) -> Option<PathBuf> {
        let path = self.instance_path(name).ok()?;
        path.is_dir().then_some(path)
    }

    pub(crate) fn list_image_volumes(&self) -> Result<Vec<String>, StorageError> {
        list_names(&self.root.join(IMAGES_DIR))
    }

    /// Where a new instance volume goes and the image it is made from: the image must exist
    /// and the name must be free.
    pub(crate) fn new_instance_paths(
        &self,
        name: &str,
        fingerprint: &str,
    ) -> Result<(PathBuf, PathBuf), StorageError> {
        let src = self.image_path(fingerprint)?;
        let dst = self.instance_path(name)?;
        if !src.is_dir() {
            return Err(StorageError::ImageNotFound(fingerprint.to_string()));
        }
        if std::fs::symlink_metadata(&dst).is_ok() {
            return Err(StorageError::VolumeExists(name.to_string()));
        }
        Ok((src, dst))
    }

    pub(crate) fn rename_image_volume(&self, from: &str, to: &str) -> Result<(), StorageError> {
        rename_volume(
            &self.image_path(from)?,
            &self.image_path(to)?,
            || StorageError::ImageNotFound(from.to_string()),
            to,
        )
    }

    /// Renames an instance volume and moves its snapshots along (`snapshots/<from>` becomes
    /// `snapshots/<to>`).
    pub(crate) fn rename_instance_volume(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let snaps_from = self.snapshots_of(from)?;
        let snaps_to = self.snapshots_of(to)?;
        if snaps_from.exists() && std::fs::symlink_metadata(&snaps_to).is_ok() {
            return Err(StorageError::VolumeExists(format!(
                "{to} (its snapshot directory)"
            )));
        }
        rename_volume(
            &self.instance_path(from)?,
            &self.instance_path(to)?,
            || StorageError::VolumeNotFound(from.to_string()),
            to,
        )?;
        if snaps_from.exists()
            && let Err(e) = std::fs::rename(&snaps_from, &snaps_to)
        {
            // Put the volume back: volume and snapshots move together or not at all.
            let _ = std::fs::rename(self.instance_path(to)?, self.instance_path(from)?);
            return Err(io_err(&snaps_from)(e));
        }
        Ok(())
    }

    /// `snapshots/<instance>` (whether or not it exists).
    pub(crate) fn snapshots_of(&self, instance: &str) -> Result<PathBuf, StorageError> {
        check_volume_name(instance)?;
        Ok(self.root.join(SNAPSHOTS_DIR).join(instance))
    }

    /// A hidden scratch path next to the instance volumes (`containers/.<what>-<name>`), where
    /// a new volume is made before it takes its place.
    pub(crate) fn scratch_path(&self, what: &str, name: &str) -> Result<PathBuf, StorageError> {
        check_volume_name(name)?;
        Ok(self
            .root
            .join(CONTAINERS_DIR)
            .join(format!(".{what}-{name}")))
    }

    /// The existing snapshot's path, or `SnapshotNotFound`.
    pub(crate) fn existing_snapshot(
        &self,
        instance: &str,
        snapshot: &str,
    ) -> Result<PathBuf, StorageError> {
        check_snapshot_name(snapshot)?;
        let path = self.snapshots_of(instance)?.join(snapshot);
        if !path.is_dir() {
            return Err(StorageError::SnapshotNotFound {
                instance: instance.to_string(),
                snapshot: snapshot.to_string(),
            });
        }
        Ok(path)
    }

    /// The existing instance volume's path, or `VolumeNotFound`.
    pub(crate) fn existing_instance(&self, name: &str) -> Result<PathBuf, StorageError> {
        self.instance_volume(name)
            .ok_or_else(|| StorageError::VolumeNotFound(name.to_string()))
    }

    /// Where a new snapshot of `instance` goes, creating `snapshots/<instance>` (0700) when
    /// missing.
    pub(crate) fn new_snapshot_path(
        &self,
        instance: &str,
        snapshot: &str,
    ) -> Result<PathBuf, StorageError> {
        check_snapshot_name(snapshot)?;
        let dir = self.snapshots_of(instance)?;
        create_dir_if_missing(&dir, 0o700)?;
        Ok(dir.join(snapshot))
    }

    /// Removes `snapshots/<instance>` once it holds nothing but creation-time sidecars (a
    /// transfer may be staging hidden volumes in it).
    pub(crate) fn remove_snapshot_dir_if_empty(&self, instance: &str) -> Result<(), StorageError> {
        let dir = self.snapshots_of(instance)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut sidecars = Vec::new();
        for e in entries {
            let e = e.map_err(io_err(&dir))?;
            let n = e.file_name().to_string_lossy().into_owned();
            let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
            if !(is_file && n.starts_with('.') && n.ends_with(".created")) {
                return Ok(());
            }
            sidecars.push(e.path());
        }
        for p in sidecars {
            let _ = std::fs::remove_file(p);
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            // Something arrived meanwhile: it stays.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    /// What interrupted volume replacements left in `containers/` (a crash between the steps
    /// of [`PoolLayout::swap_instance_volume`] or a copy): an `.old-<name>` whose instance
    /// volume is missing is put back; the paths to delete are returned (`.new-*`,
    /// `.copying-*`, `.creating-*`, and `.old-*` whose swap completed).
    pub(crate) fn interrupted_swaps(&self) -> Result<Vec<PathBuf>, StorageError> {
        let dir = self.root.join(CONTAINERS_DIR);
        let mut delete = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(name) = n.strip_prefix(".old-") {
                // A name no instance can have is a leftover to delete, never a reason for the
                // pool not to open.
                let Ok(vol) = self.instance_path(name) else {
                    tracing::warn!(entry = %n, "deleting a set-aside volume with an invalid name");
                    delete.push(e.path());
                    continue;
                };
                if std::fs::symlink_metadata(&vol).is_err() {
                    tracing::warn!(
                        instance = name,
                        "putting back a volume an interrupted restore or refresh left aside"
                    );
                    std::fs::rename(e.path(), &vol).map_err(io_err(&vol))?;
                    continue;
                }
                delete.push(e.path());
            } else if [".new-", ".copying-", ".creating-"]
                .iter()
                .any(|p| n.starts_with(p))
            {
                delete.push(e.path());
            }
        }
        Ok(delete)
    }

    /// Puts the volume at `new` in place of instance volume `name`: the old one is moved aside
    /// to `old` (which the caller then deletes). On failure the old volume is back in place.
    pub(crate) fn swap_instance_volume(
        &self,
        name: &str,
        new: &Path,
        old: &Path,
    ) -> Result<(), StorageError> {
        let vol = self.existing_instance(name)?;
        std::fs::rename(&vol, old).map_err(io_err(&vol))?;
        if let Err(e) = std::fs::rename(new, &vol) {
            let _ = std::fs::rename(old, &vol);
            return Err(io_err(new)(e));
        }
        Ok(())
    }
}

/// Renames a volume directory (a subvolume too: a rename within one filesystem), refusing a
/// missing source and a taken target.
fn rename_volume(
    src: &Path,
    dst: &Path,
    not_found: impl FnOnce() -> StorageError,
    to: &str,
) -> Result<(), StorageError> {
    if !src.exists() {
        return Err(not_found());
    }
    if std::fs::symlink_metadata(dst).is_ok() {
        return Err(StorageError::VolumeExists(to.to_string()));
    }
    std::fs::rename(src, dst).map_err(io_err(src))
}

/// Names of the entries of `dir` (skipping dot-names), sorted.
pub(crate) fn list_names(dir: &Path) -> Result<Vec<String>, StorageError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if !n.starts_with('.') {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

/// Space of the filesystem holding `path`, from statvfs.
pub(crate) fn statvfs_usage(path: &Path) -> Result<PoolUsage, StorageError> {
    let st = rustix::fs::statvfs(path).map_err(|e| StorageError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let used = st
        .f_blocks
        .saturating_sub(st.f_bfree)
        .saturating_mul(st.f_frsize);
    Ok(PoolUsage { total, used })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        for ok in ["web1", "a-b_c.d", "0123abcdef"] {
            assert!(check_volume_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a..b", ".hidden", "a\0b"] {
            assert!(check_volume_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn snapshot_names() {
        for ok in ["snap0", "before-upgrade", "a.b_c", &"x".repeat(63)] {
            assert!(check_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "a/b", "..", "a..b", &"x".repeat(64)] {
            assert!(
                matches!(
                    check_snapshot_name(bad),
                    Err(StorageError::InvalidSnapshotName(..))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn snapshot_times_and_order() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        assert!(list_snapshot_dir(&dir.join("missing")).unwrap().is_empty());
        for n in ["b", "a", "c"] {
            std::fs::create_dir(dir.join(n)).unwrap();
        }
        assert_eq!(created_path(&dir.join("a")), dir.join(".a.created"));
        write_created_at(&dir.join("a"), 300).unwrap();
        write_created_at(&dir.join("b"), 100).unwrap();
        write_created_at(&dir.join("c"), 100).unwrap();
        // A sidecar without its snapshot is not listed.
        write_created_at(&dir.join("gone"), 50).unwrap();
        let list = list_snapshot_dir(dir).unwrap();
        let got: Vec<(&str, i64)> = list
            .iter()
            .map(|s| (s.name.as_str(), s.created_at))
            .collect();
        assert_eq!(got, [("b", 100), ("c", 100), ("a", 300)]);
        // Without a sidecar (or with a bad one): the directory's mtime.
        std::fs::write(created_path(&dir.join("c")), "garbage").unwrap();
        assert!(snapshot_created_at(&dir.join("c")) > 1_700_000_000);
    }
}
