//! Storage drivers against the real kernel (run as root): a btrfs pool on a sparse loop file in
//! a temp dir, and a dir pool. Drop guards unmount and detach even when a test fails.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_agent::storage::{
    BtrfsConfig, BtrfsDriver, BtrfsSource, DirDriver, StorageDriver, StorageError,
};

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn loops_of(file: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .arg("-j")
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(':').map(|(d, _)| d.to_string()))
        .collect()
}

fn is_mounted(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// A btrfs loop pool in a temp dir, torn down on drop.
struct Pool {
    tmp: tempfile::TempDir,
}

impl Pool {
    fn new() -> Pool {
        Pool {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    fn file(&self) -> PathBuf {
        self.tmp.path().join("disks/pool.img")
    }
    fn mnt(&self) -> PathBuf {
        self.tmp.path().join("mnt")
    }
    fn cfg(&self) -> BtrfsConfig {
        BtrfsConfig {
            source: BtrfsSource::LoopFile {
                path: self.file(),
                size_bytes: 2 << 30,
            },
            mount_point: self.mnt(),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if is_mounted(&self.mnt()) {
            let _ = Command::new("umount").arg(self.mnt()).status();
        }
        for dev in loops_of(&self.file()) {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
}

#[test]
fn btrfs_loop_pool_lifecycle() {
    let pool = Pool::new();
    let d = BtrfsDriver::open(pool.cfg()).unwrap();
    assert_eq!(d.name(), "btrfs");
    assert!(d.supports_idmapped_mounts());
    assert!(is_mounted(&pool.mnt()));
    // Sparse: 2 GiB apparent, little allocated.
    let meta = std::fs::metadata(pool.file()).unwrap();
    assert_eq!(meta.len(), 2 << 30);
    assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 512 << 20);
    let usage = d.usage().unwrap();
    assert!(
        usage.total > 1 << 30 && usage.used < usage.total,
        "{usage:?}"
    );
    for sub in ["images", "containers"] {
        let m = std::fs::metadata(pool.mnt().join(sub)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{sub}");
    }

    // Opening again while mounted is a no-op (same loop device, no second mount).
    let loops = loops_of(&pool.file());
    assert_eq!(loops.len(), 1);
    let d2 = BtrfsDriver::open(pool.cfg()).unwrap();
    assert_eq!(loops_of(&pool.file()), loops);

    // Image volume: filled, renamed (a build learns its fingerprint at the end), sealed.
    let v = d.create_image_volume("build-1").unwrap();
    assert!(v.join("rootfs").is_dir());
    std::fs::create_dir_all(v.join("rootfs/etc")).unwrap();
    std::fs::write(v.join("rootfs/etc/hostname"), "img\n").unwrap();
    let fp = "a".repeat(64);
    d.rename_image_volume("build-1", &fp).unwrap();
    d.finish_image_volume(&fp).unwrap();
    let iv = d.image_volume(&fp).unwrap();
    let ro = run(&[
        "btrfs",
        "property",
        "get",
        "-ts",
        iv.to_str().unwrap(),
        "ro",
    ]);
    assert_eq!(ro.trim(), "ro=true");
    assert_eq!(
        std::fs::write(iv.join("rootfs/etc/x"), "x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    // A finished (read-only) volume can still be renamed.
    let fp2 = "b".repeat(64);
    d.rename_image_volume(&fp, &fp2).unwrap();
    d.rename_image_volume(&fp2, &fp).unwrap();

    // Instance volume: a writable snapshot, independent of the image.
    let inst = d.create_instance_volume("web1", &fp).unwrap();
    assert_eq!(
        std::fs::read_to_string(inst.join("rootfs/etc/hostname")).unwrap(),
        "img\n"
    );
    std::fs::write(inst.join("rootfs/etc/hostname"), "web1\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(iv.join("rootfs/etc/hostname")).unwrap(),
        "img\n"
    );
    let show = run(&["btrfs", "subvolume", "show", inst.to_str().unwrap()]);
    assert!(show.contains("Parent UUID"), "{show}");
    assert!(matches!(
        d.create_instance_volume("web1", &fp),
        Err(StorageError::VolumeExists(_))
    ));
    assert!(matches!(
        d.create_instance_volume("web2", &"c".repeat(64)),
        Err(StorageError::ImageNotFound(_))
    ));

    // Nested subvolumes (as systemd makes for /var/lib/machines), one read-only, one deeper.
    let machines = inst.join("rootfs/var/lib/machines");
    std::fs::create_dir_all(machines.parent().unwrap()).unwrap();
    run(&["btrfs", "subvolume", "create", machines.to_str().unwrap()]);
    let deeper = machines.join("deeper");
    run(&["btrfs", "subvolume", "create", deeper.to_str().unwrap()]);
    run(&[
        "btrfs",
        "property",
        "set",
        "-ts",
        deeper.to_str().unwrap(),
        "ro",
        "true",
    ]);
    let portables = inst.join("rootfs/var/lib/portables");
    run(&["btrfs", "subvolume", "create", portables.to_str().unwrap()]);

    // Rename, then delete: nested ones go first.
    d.rename_instance_volume("web1", "web1b").unwrap();
    assert!(d.instance_volume("web1").is_none());
    d.delete_instance_volume("web1b").unwrap();
    assert!(d.instance_volume("web1b").is_none());
    d.delete_instance_volume("web1b").unwrap(); // already gone: fine
    let list = run(&["btrfs", "subvolume", "list", pool.mnt().to_str().unwrap()]);
    assert!(!list.contains("containers/"), "{list}");

    // Read-only image volume deletion.
    d.delete_image_volume(&fp).unwrap();
    assert!(d.image_volume(&fp).is_none());
    d.delete_image_volume(&fp).unwrap();

    // Names that could leave the pool are refused.
    for bad in ["../x", "a/b", "..", ""] {
        assert!(matches!(
            d.create_instance_volume(bad, &fp),
            Err(StorageError::InvalidName(_))
        ));
        assert!(matches!(
            d.create_image_volume(bad),
            Err(StorageError::InvalidName(_))
        ));
    }

    // Unmount detaches the loop device; opening again re-attaches the same file, data kept.
    d.create_image_volume("keep").unwrap();
    drop(d2);
    d.unmount().unwrap();
    assert!(!is_mounted(&pool.mnt()));
    assert!(loops_of(&pool.file()).is_empty());
    d.unmount().unwrap(); // idempotent
    let d3 = BtrfsDriver::open(pool.cfg()).unwrap();
    assert!(d3.image_volume("keep").is_some());
    d3.unmount().unwrap();
    assert!(loops_of(&pool.file()).is_empty());
}

#[test]
fn btrfs_refuses_foreign_filesystem() {
    let pool = Pool::new();
    std::fs::create_dir_all(pool.file().parent().unwrap()).unwrap();
    let f = std::fs::File::create(pool.file()).unwrap();
    f.set_len(64 << 20).unwrap();
    run(&["mkfs.ext4", "-q", "-F", pool.file().to_str().unwrap()]);
    let err = BtrfsDriver::open(pool.cfg()).unwrap_err();
    assert!(matches!(err, StorageError::BadPool { .. }), "{err}");
    assert!(loops_of(&pool.file()).is_empty());
    assert!(!is_mounted(&pool.mnt()));
}

#[test]
fn btrfs_directory_source() {
    // A directory inside a mounted btrfs filesystem (here: our own loop pool).
    let pool = Pool::new();
    let outer = BtrfsDriver::open(pool.cfg()).unwrap();
    let dir = pool.mnt().join("nested-pool");
    let d = BtrfsDriver::open(BtrfsConfig {
        source: BtrfsSource::Directory(dir.clone()),
        mount_point: PathBuf::from("/nonexistent"),
    })
    .unwrap();
    assert_eq!(d.root(), dir.as_path());
    d.create_image_volume(&"d".repeat(64)).unwrap();
    d.finish_image_volume(&"d".repeat(64)).unwrap();
    let inst = d.create_instance_volume("i1", &"d".repeat(64)).unwrap();
    let nested = inst.join("rootfs/sub");
    run(&["btrfs", "subvolume", "create", nested.to_str().unwrap()]);
    d.delete_instance_volume("i1").unwrap();
    d.delete_image_volume(&"d".repeat(64)).unwrap();
    d.unmount().unwrap(); // no-op for a directory pool
    assert!(is_mounted(&pool.mnt()));
    outer.unmount().unwrap();

    // A directory on a non-btrfs filesystem is refused.
    let plain = tempfile::tempdir().unwrap();
    let err = BtrfsDriver::open(BtrfsConfig {
        source: BtrfsSource::Directory(plain.path().to_path_buf()),
        mount_point: PathBuf::from("/nonexistent"),
    })
    .unwrap_err();
    assert!(matches!(err, StorageError::BadPool { .. }), "{err}");
}

#[test]
fn dir_pool_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let d = DirDriver::open(tmp.path().join("pool")).unwrap();
    assert_eq!(d.name(), "dir");
    // /tmp is ext4 (or tmpfs) here: idmapped mounts are supported.
    assert!(d.supports_idmapped_mounts());
    let fp = "e".repeat(64);
    let v = d.create_image_volume(&fp).unwrap();
    std::fs::create_dir_all(v.join("rootfs/etc")).unwrap();
    std::fs::write(v.join("rootfs/etc/hostname"), "img\n").unwrap();
    std::os::unix::fs::symlink("/bin/busybox", v.join("rootfs/init")).unwrap();
    std::fs::set_permissions(
        v.join("rootfs/etc/hostname"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    d.finish_image_volume(&fp).unwrap();
    let inst = d.create_instance_volume("c1", &fp).unwrap();
    // cp -a keeps links and modes.
    assert_eq!(
        std::fs::read_link(inst.join("rootfs/init")).unwrap(),
        Path::new("/bin/busybox")
    );
    let m = std::fs::metadata(inst.join("rootfs/etc/hostname")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    std::fs::write(inst.join("rootfs/etc/hostname"), "c1\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(v.join("rootfs/etc/hostname")).unwrap(),
        "img\n"
    );
    assert!(matches!(
        d.create_instance_volume("c1", &fp),
        Err(StorageError::VolumeExists(_))
    ));
    d.rename_instance_volume("c1", "c2").unwrap();
    d.delete_instance_volume("c2").unwrap();
    d.delete_instance_volume("c2").unwrap();
    d.delete_image_volume(&fp).unwrap();
    assert!(d.image_volume(&fp).is_none());
    assert!(d.usage().unwrap().total > 0);
    assert!(matches!(
        d.create_instance_volume("../../etc", &fp),
        Err(StorageError::InvalidName(_))
    ));
}

#[test]
fn btrfs_block_device_source() {
    // A loop device we attach ourselves stands in for a disk.
    let pool = Pool::new();
    std::fs::create_dir_all(pool.file().parent().unwrap()).unwrap();
    let f = std::fs::File::create(pool.file()).unwrap();
    f.set_len(1 << 30).unwrap();
    let dev = run(&["losetup", "--find", "--show", pool.file().to_str().unwrap()]);
    let dev = PathBuf::from(dev.trim());
    let cfg = BtrfsConfig {
        source: BtrfsSource::Device(dev.clone()),
        mount_point: pool.mnt(),
    };
    let d = BtrfsDriver::open(cfg.clone()).unwrap();
    assert!(is_mounted(&pool.mnt()));
    let fstype = run(&["blkid", "-o", "value", "-s", "TYPE", dev.to_str().unwrap()]);
    assert_eq!(fstype.trim(), "btrfs");
    d.create_image_volume("v").unwrap();
    d.unmount().unwrap();
    assert!(!is_mounted(&pool.mnt()));
    // Already formatted: opened again without mkfs, data kept.
    let d = BtrfsDriver::open(cfg).unwrap();
    assert!(d.image_volume("v").is_some());
    d.unmount().unwrap();
    // The Pool guard detaches the device.
}

fn write_mib(path: &Path, mib: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&chunk)?;
    }
    f.sync_all()
}

fn qgroup_dir(vol: &Path) -> PathBuf {
    let id = berth_agent::sys::btrfs::subvolume_id(vol).unwrap();
    let uuid = berth_agent::sys::btrfs::fs_uuid(vol).unwrap();
    PathBuf::from(format!("/sys/fs/btrfs/{uuid}/qgroups/0_{id}"))
}

#[test]
fn btrfs_disk_limits() {
    let pool = Pool::new();
    let d = BtrfsDriver::open(pool.cfg()).unwrap();
    assert!(d.supports_disk_limits());
    let v = d.create_image_volume("img").unwrap();
    write_mib(&v.join("rootfs/base"), 4).unwrap();
    d.finish_image_volume("img").unwrap();
    let inst = d.create_instance_volume("p_c1", "img").unwrap();

    // No limit, no quotas: removing a limit that was never set turns nothing on.
    assert!(!d.quotas_enabled());
    d.set_instance_disk_limit("p_c1", None).unwrap();
    assert!(!d.quotas_enabled());
    assert_eq!(d.instance_disk_usage("p_c1"), None);
    assert!(matches!(
        d.set_instance_disk_limit("missing", Some(32 << 20)),
        Err(StorageError::VolumeNotFound(_))
    ));

    // The first limit turns quotas on; the image's shared data counts.
    d.set_instance_disk_limit("p_c1", Some(32 << 20)).unwrap();
    assert!(d.quotas_enabled());
    let u = d.instance_disk_usage("p_c1").unwrap();
    assert_eq!(u.limit, Some(32 << 20));
    assert!(u.used >= 4 << 20, "{u:?}");
    let err = write_mib(&inst.join("rootfs/big"), 40).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    std::fs::remove_file(inst.join("rootfs/big")).unwrap();

    // A rename keeps the subvolume and so its limit.
    d.rename_instance_volume("p_c1", "p_c2").unwrap();
    let inst = d.instance_volume("p_c2").unwrap();
    assert_eq!(d.instance_disk_usage("p_c2").unwrap().limit, Some(32 << 20));
    d.set_instance_disk_limit("p_c2", None).unwrap();
    assert_eq!(d.instance_disk_usage("p_c2").unwrap().limit, None);
    write_mib(&inst.join("rootfs/big"), 40).unwrap();

    // Deleting removes the qgroups of the volume and of subvolumes nested in it.
    run(&[
        "btrfs",
        "subvolume",
        "create",
        &inst.join("rootfs/nested").to_string_lossy(),
    ]);
    let own = qgroup_dir(&inst);
    let nested = qgroup_dir(&inst.join("rootfs/nested"));
    assert_ne!(own, nested);
    assert!(own.is_dir() && nested.is_dir());
    d.delete_instance_volume("p_c2").unwrap();
    assert!(!own.exists(), "{} left behind", own.display());
    assert!(!nested.exists(), "{} left behind", nested.display());
    // Image volumes too.
    let img = qgroup_dir(&v);
    assert!(img.is_dir());
    d.delete_image_volume("img").unwrap();
    assert!(!img.exists());
    d.unmount().unwrap();
}

#[test]
fn dir_refuses_disk_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let d = DirDriver::open(tmp.path().join("pool")).unwrap();
    assert!(!d.supports_disk_limits());
    let err = d.set_instance_disk_limit("c1", Some(1 << 30)).unwrap_err();
    assert!(matches!(err, StorageError::DiskLimitUnsupported { .. }));
    assert_eq!(
        err.to_string(),
        "the dir storage driver cannot limit disk use"
    );
    d.set_instance_disk_limit("c1", None).unwrap();
    assert_eq!(d.instance_disk_usage("c1"), None);
}
