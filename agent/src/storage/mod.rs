//! Storage drivers behind one trait: `btrfs` (default; a sparse loop file when the operator gives
//! no device or btrfs path) and `dir` (plain directories, copy instead of snapshot).
//!
//! Pool layout (both drivers), under the pool's mount point:
//! - `images/<fingerprint>/`: an image volume: `rootfs/` and `metadata.yaml` (read-only once finished)
//! - `containers/<name>/`: an instance volume, a writable snapshot of its image volume;
//!   its root filesystem is `containers/<name>/rootfs`.
//!
//! On-disk owners are the instance's own ids (uid 0 on disk is the instance's root); the runtime
//! maps them with an idmapped mount, so nothing is ever chowned at launch.
//!
//! Disk limits (`limits.disk`): the btrfs driver limits an instance volume's qgroup (quotas are
//! enabled on the pool the first time a limit is set, since they cost some speed); the dir
//! driver cannot limit disk use and refuses a limit.
//!
//! `images/` and `containers/` are mode 0700 (host root only): an instance root can plant
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

/// Subdirectory of the pool holding image volumes.
pub const IMAGES_DIR: &str = "images";
/// Subdirectory of the pool holding instance volumes.
pub const CONTAINERS_DIR: &str = "containers";

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

    pub(crate) fn rename_instance_volume(&self, from: &str, to: &str) -> Result<(), StorageError> {
        rename_volume(
            &self.instance_path(from)?,
            &self.instance_path(to)?,
            || StorageError::VolumeNotFound(from.to_string()),
            to,
        )
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
}
