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

use std::path::PathBuf;

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

    /// Makes an instance volume from an image volume (a writable snapshot on btrfs) and returns
    /// its directory (`containers/<name>`).
    fn create_instance_volume(&self, name: &str, fingerprint: &str) -> Result<PathBuf, StorageError>;
    fn instance_volume(&self, name: &str) -> Option<PathBuf>;
    /// Removes an instance volume; succeeds when it is already gone.
    fn delete_instance_volume(&self, name: &str) -> Result<(), StorageError>;
    fn rename_instance_volume(&self, from: &str, to: &str) -> Result<(), StorageError>;
}
