//! The `dir` storage driver: plain directories. An instance volume is a copy of its image volume
//! (`cp -a --reflink=auto`, so it is cheap where the filesystem can share extents); so is a
//! snapshot (owners, modes, xattrs, symlinks and device nodes kept).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{
    CONTAINERS_DIR, IMAGES_DIR, PoolLayout, PoolUsage, SNAPSHOTS_DIR, SnapshotMeta, StorageDriver,
    StorageError, VolumeSteps, create_dir_if_missing, ensure_dir, io_err, now_unix, run,
    snapshot_created_at, statvfs_usage, write_created_at,
};

/// statfs magics of filesystems that support idmapped mounts on the kernels Berth targets.
const IDMAP_CAPABLE_MAGICS: &[(i64, &str)] = &[
    (0x9123_683e, "btrfs"),
    (0xef53, "ext4"),
    (0x5846_5342, "xfs"),
    (0x0102_1994, "tmpfs"),
];

/// A pool of plain directories under `root`.
#[derive(Debug)]
pub struct DirDriver {
    pool: PoolLayout,
    idmap: bool,
}

impl DirDriver {
    /// Opens (creating when missing) a directory pool rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<DirDriver, StorageError> {
        let root = root.into();
        create_dir_if_missing(&root, 0o711)?;
        ensure_dir(&root.join(IMAGES_DIR), 0o700)?;
        ensure_dir(&root.join(CONTAINERS_DIR), 0o700)?;
        ensure_dir(&root.join(SNAPSHOTS_DIR), 0o700)?;
        let idmap = probe_idmapped_mount(&root).unwrap_or_else(|e| {
            tracing::warn!(pool = %root.display(), error = %e, "idmapped mount probe failed; judging by filesystem type");
            idmap_capable_fs(&root).unwrap_or(false)
        });
        let pool = PoolLayout { root };
        for leftover in pool.interrupted_swaps()? {
            tracing::info!(volume = %leftover.display(), "removing what an interrupted volume replacement left");
            remove_tree(&leftover)?;
        }
        tracing::info!(pool = %pool.root.display(), idmapped_mounts = idmap, "dir storage pool ready");
        Ok(DirDriver { pool, idmap })
    }

    /// The pool root.
    pub fn root(&self) -> &Path {
        &self.pool.root
    }
}

/// Tries an idmapped bind mount of the pool's `images/` onto a scratch directory (then detaches
/// it). `Ok(false)` when the kernel refuses the idmapping for this filesystem; `Err` when the
/// probe itself could not run.
fn probe_idmapped_mount(root: &Path) -> std::io::Result<bool> {
    let probe = root.join(".idmap-probe");
    std::fs::create_dir_all(&probe)?;
    let result = (|| {
        let userns = crate::sys::mount::userns_with_map(100_000, 65_536)?;
        match crate::sys::mount::idmapped_bind(&root.join(IMAGES_DIR), &probe, &userns) {
            Ok(()) => {
                crate::sys::mount::detach(&probe)?;
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_dir(&probe);
    result
}

/// Whether the filesystem holding `path` is one that supports idmapped mounts.
fn idmap_capable_fs(path: &Path) -> Result<bool, StorageError> {
    let st = rustix::fs::statfs(path).map_err(|e| StorageError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    Ok(IDMAP_CAPABLE_MAGICS.iter().any(|(m, _)| *m == magic))
}

/// Copies the tree `src` to `dst` (which must not exist) under a temporary name next to it,
/// then renames it into place: a crash never leaves a half copy under the real name.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), StorageError> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".copying-{name}"));
    remove_tree(&tmp)?;
    let copied = run(Command::new("cp")
        .args(["-a", "--reflink=auto", "--no-target-directory"])
        .arg(src)
        .arg(&tmp));
    if let Err(e) = copied {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, dst) {
        let _ = remove_tree(&tmp);
        return Err(io_err(&tmp)(e));
    }
    Ok(())
}

impl VolumeSteps for DirDriver {
    fn layout(&self) -> &PoolLayout {
        &self.pool
    }

    fn clone_volume(&self, src: &Path, dst: &Path) -> Result<(), StorageError> {
        copy_tree(src, dst)
    }

    fn delete_all_snapshots(&self, instance: &str) -> Result<(), StorageError> {
        remove_tree(&self.pool.snapshots_of(instance)?)
    }

    fn replace_instance_volume(&self, name: &str, source: &Path) -> Result<(), StorageError> {
        self.pool.existing_instance(name)?;
        let new = self.pool.scratch_path("new", name)?;
        let old = self.pool.scratch_path("old", name)?;
        remove_tree(&new)?;
        remove_tree(&old)?;
        copy_tree(source, &new)?;
        if let Err(e) = self.pool.swap_instance_volume(name, &new, &old) {
            let _ = remove_tree(&new);
            return Err(e);
        }
        if let Err(e) = remove_tree(&old) {
            tracing::warn!(
                instance = name,
                "cannot delete the replaced volume {}: {e}",
                old.display()
            );
        }
        Ok(())
    }

    fn copy_snapshot(&self, src: &str, snap: &SnapshotMeta, dst: &str) -> Result<(), StorageError> {
        let from = self.pool.existing_snapshot(src, &snap.name)?;
        let to = self.pool.new_snapshot_path(dst, &snap.name)?;
        write_created_at(&to, snap.created_at)?;
        copy_tree(&from, &to)
    }
}

/// Removes a directory tree; succeeds when it is already gone.
fn remove_tree(path: &Path) -> Result<(), StorageError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

impl StorageDriver for DirDriver {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn supports_idmapped_mounts(&self) -> bool {
        self.idmap
    }

    fn usage(&self) -> Result<PoolUsage, StorageError> {
        statvfs_usage(&self.pool.root)
    }

    fn create_image_volume(&self, fingerprint: &str) -> Result<PathBuf, StorageError> {
        let path = self.pool.image_path(fingerprint)?;
        remove_tree(&path)?;
        ensure_dir(&path, 0o755)?;
        ensure_dir(&path.join("rootfs"), 0o755)?;
        Ok(path)
    }

    fn create_image_volume_from(
        &self,
        fingerprint: &str,
        source: &Path,
    ) -> Result<PathBuf, StorageError> {
        let path = self.pool.image_path(fingerprint)?;
        remove_tree(&path)?;
        copy_tree(source, &path)?;
        Ok(path)
    }

    fn finish_image_volume(&self, fingerprint: &str) -> Result<(), StorageError> {
        let path = self.pool.image_path(fingerprint)?;
        if !path.is_dir() {
            return Err(StorageError::ImageNotFound(fingerprint.to_string()));
        }
        Ok(())
    }

    fn image_volume(&self, fingerprint: &str) -> Option<PathBuf> {
        self.pool.image_volume(fingerprint)
    }

    fn delete_image_volume(&self, fingerprint: &str) -> Result<(), StorageError> {
        remove_tree(&self.pool.image_path(fingerprint)?)
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
        // Copy under a temporary name, then rename: a crash never leaves a half volume
        // under the real name.
        let tmp = self
            .pool
            .root
            .join(CONTAINERS_DIR)
            .join(format!(".creating-{name}"));
        remove_tree(&tmp)?;
        let copied = run(Command::new("cp")
            .args(["-a", "--reflink=auto", "--no-target-directory"])
            .arg(&src)
            .arg(&tmp));
        if let Err(e) = copied {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &dst).map_err(io_err(&tmp))?;
        Ok(dst)
    }

    fn instance_volume(&self, name: &str) -> Option<PathBuf> {
        self.pool.instance_volume(name)
    }

    fn delete_instance_volume(&self, name: &str) -> Result<(), StorageError> {
        let path = self.pool.instance_path(name)?;
        remove_tree(&self.pool.snapshots_of(name)?)?;
        remove_tree(&path)
    }

    fn rename_instance_volume(&self, from: &str, to: &str) -> Result<(), StorageError> {
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
        write_created_at(&dst, created_at)?;
        if let Err(e) = copy_tree(&src, &dst) {
            let _ = fs::remove_file(super::created_path(&dst));
            return Err(e);
        }
        tracing::info!(instance, snapshot, "took snapshot (copy)");
        Ok(SnapshotMeta {
            name: snapshot.to_string(),
            created_at,
        })
    }

    fn delete_snapshot(&self, instance: &str, snapshot: &str) -> Result<(), StorageError> {
        let path = self.snapshot_path(instance, snapshot)?;
        remove_tree(&path)?;
        match fs::remove_file(super::created_path(&path)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.pool.remove_snapshot_dir_if_empty(instance)
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Needs root (as CI runs): an idmapped mount of an ext4/tmpfs directory works here.
    #[test]
    fn idmap_probe_on_local_fs() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join(IMAGES_DIR)).unwrap();
        assert!(probe_idmapped_mount(t.path()).unwrap());
        assert!(!t.path().join(".idmap-probe").exists());
        assert!(idmap_capable_fs(t.path()).unwrap());
    }
}
