//! Snapshots, restores, local copies, volumes adopted by create, publish and export, against
//! real storage (run as root: btrfs pools on loop files in temp dirs, and dir pools). Drop
//! guards unmount, detach and kill what a failed test leaves.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use berth_agent::cgroup::Cgroups;
use berth_agent::engine::{Engine, EngineConfig, EngineError};
use berth_agent::image::{ImageStore, ImportFormat};
use berth_agent::runtime::InstanceDir;
use berth_agent::storage::{
    BtrfsConfig, BtrfsDriver, BtrfsSource, DirDriver, StorageDriver, StorageError,
};
use berth_proto::v1::{InstanceSpec, InstanceState};
use sha2::{Digest, Sha256};

/// A btrfs loop pool in a temp dir, unmounted and detached on drop.
struct Pool {
    tmp: tempfile::TempDir,
}

impl Pool {
    fn new() -> Pool {
        let tmp = tempfile::Builder::new()
            .prefix("berth-vol-")
            .tempdir_in("/var/tmp")
            .unwrap();
        // Instances' unprivileged root must reach the rootfs through the temp dir.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Pool { tmp }
    }
    fn cfg(&self) -> BtrfsConfig {
        BtrfsConfig {
            source: BtrfsSource::LoopFile {
                path: self.tmp.path().join("pool.img"),
                size_bytes: 2 << 30,
            },
            mount_point: self.tmp.path().join("mnt"),
        }
    }
    fn open(&self) -> Arc<BtrfsDriver> {
        Arc::new(BtrfsDriver::open(self.cfg()).unwrap())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let mnt = self.tmp.path().join("mnt");
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let m = mnt.to_string_lossy();
        if info.lines().any(|l| l.split(' ').nth(4) == Some(&*m)) {
            let _ = Command::new("umount").arg(&mnt).status();
        }
        if let Ok(out) = Command::new("losetup")
            .arg("-j")
            .arg(self.tmp.path().join("pool.img"))
            .output()
        {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some((dev, _)) = l.split_once(':') {
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            }
        }
    }
}

/// A small image volume with a rootfs, as a build would leave it.
fn make_image(d: &dyn StorageDriver, fp: &str) {
    let v = d.create_image_volume(fp).unwrap();
    std::fs::create_dir_all(v.join("rootfs/etc")).unwrap();
    std::fs::write(v.join("rootfs/etc/os"), "test\n").unwrap();
    std::fs::write(
        v.join("metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1\nproperties:\n  os: test\n",
    )
    .unwrap();
    d.finish_image_volume(fp).unwrap();
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p).unwrap()
}

fn names(d: &dyn StorageDriver, inst: &str) -> Vec<String> {
    d.list_snapshots(inst)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}

/// Snapshot, list, rename, delete, restore, instance rename and delete, on any driver.
fn snapshot_lifecycle(d: &dyn StorageDriver) {
    let fp = "b".repeat(64);
    make_image(d, &fp);
    let root = d.pool_root().to_path_buf();
    let m = std::fs::metadata(root.join("snapshots")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    let vol = d.create_instance_volume("v1", &fp).unwrap();
    let f = vol.join("rootfs/etc/data");
    std::fs::write(&f, "one").unwrap();
    std::os::unix::fs::lchown(&f, Some(1000), Some(1001)).unwrap();
    std::os::unix::fs::symlink("data", vol.join("rootfs/etc/link")).unwrap();

    // Take, idempotently; bad names refused.
    let s0 = d.create_snapshot("v1", "s0").unwrap();
    assert!(s0.created_at > 1_700_000_000);
    let again = d.create_snapshot("v1", "s0").unwrap();
    assert_eq!(again, s0);
    for bad in ["", ".x", "a/b", &"x".repeat(64)] {
        assert!(
            matches!(
                d.create_snapshot("v1", bad),
                Err(StorageError::InvalidSnapshotName(..))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        d.create_snapshot("nope", "s0"),
        Err(StorageError::VolumeNotFound(_))
    ));
    let snap = d.snapshot_path("v1", "s0").unwrap();
    assert_eq!(snap, root.join("snapshots/v1/s0"));
    // Owners, links and contents kept.
    let sm = std::fs::symlink_metadata(snap.join("rootfs/etc/data")).unwrap();
    assert_eq!((sm.uid(), sm.gid()), (1000, 1001));
    assert_eq!(
        std::fs::read_link(snap.join("rootfs/etc/link")).unwrap(),
        PathBuf::from("data")
    );

    std::fs::write(&f, "two").unwrap();
    d.create_snapshot("v1", "s1").unwrap();
    assert_eq!(names(d, "v1"), ["s0", "s1"]);
    assert_eq!(read(root.join("snapshots/v1/s0/rootfs/etc/data")), "one");

    // Rename keeps the creation time; the old name is gone; a taken name is refused.
    d.rename_snapshot("v1", "s1", "s2").unwrap();
    assert_eq!(names(d, "v1"), ["s0", "s2"]);
    assert!(matches!(
        d.rename_snapshot("v1", "s2", "s0"),
        Err(StorageError::SnapshotExists { .. })
    ));
    assert!(matches!(
        d.rename_snapshot("v1", "zz", "s9"),
        Err(StorageError::SnapshotNotFound { .. })
    ));
    let listed = d.list_snapshots("v1").unwrap();
    assert_eq!(listed[0], s0);
    // A received snapshot's time can be set.
    d.set_snapshot_created_at("v1", "s2", 1_800_000_000)
        .unwrap();
    assert_eq!(d.list_snapshots("v1").unwrap()[1].created_at, 1_800_000_000);

    // Restore: the content comes back, the volume stays writable.
    std::fs::write(&f, "three").unwrap();
    d.restore_snapshot("v1", "s0").unwrap();
    let vol = d.instance_volume("v1").unwrap();
    assert_eq!(read(vol.join("rootfs/etc/data")), "one");
    std::fs::write(vol.join("rootfs/etc/data"), "four").unwrap();
    assert!(matches!(
        d.restore_snapshot("v1", "zz"),
        Err(StorageError::SnapshotNotFound { .. })
    ));
    // Nothing left next to the instance volumes.
    let leftovers: Vec<_> = std::fs::read_dir(root.join("containers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["v1"]);

    // Delete, idempotently.
    d.delete_snapshot("v1", "s2").unwrap();
    d.delete_snapshot("v1", "s2").unwrap();
    assert_eq!(names(d, "v1"), ["s0"]);

    // Renaming the instance moves its snapshots.
    d.rename_instance_volume("v1", "v2").unwrap();
    assert!(d.list_snapshots("v1").unwrap().is_empty());
    assert_eq!(names(d, "v2"), ["s0"]);
    assert_eq!(read(root.join("snapshots/v2/s0/rootfs/etc/data")), "one");

    // Deleting the instance deletes its snapshots.
    d.delete_instance_volume("v2").unwrap();
    assert!(!root.join("snapshots/v2").exists());
    assert!(d.list_snapshots("v2").unwrap().is_empty());
    d.delete_image_volume(&fp).unwrap();
}

/// Copies with and without snapshots, from a snapshot, and refreshes, on any driver.
fn copies(d: &dyn StorageDriver) {
    let fp = "c".repeat(64);
    make_image(d, &fp);
    let root = d.pool_root().to_path_buf();
    let vol = d.create_instance_volume("src", &fp).unwrap();
    std::fs::write(vol.join("rootfs/etc/data"), "a").unwrap();
    d.create_snapshot("src", "snap0").unwrap();
    std::fs::write(vol.join("rootfs/etc/data"), "b").unwrap();
    d.create_snapshot("src", "snap1").unwrap();
    std::fs::write(vol.join("rootfs/etc/data"), "c").unwrap();
    let times: Vec<i64> = d
        .list_snapshots("src")
        .unwrap()
        .iter()
        .map(|s| s.created_at)
        .collect();

    // Full copy: current content and both snapshots, with their times.
    d.copy_instance_volume("src", None, "full", false, false)
        .unwrap();
    let full = d.instance_volume("full").unwrap();
    assert_eq!(read(full.join("rootfs/etc/data")), "c");
    let snaps = d.list_snapshots("full").unwrap();
    assert_eq!(
        snaps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["snap0", "snap1"]
    );
    assert_eq!(
        snaps.iter().map(|s| s.created_at).collect::<Vec<_>>(),
        times
    );
    assert_eq!(read(root.join("snapshots/full/snap0/rootfs/etc/data")), "a");
    // The copy is independent and writable.
    std::fs::write(full.join("rootfs/etc/data"), "x").unwrap();
    assert_eq!(read(vol.join("rootfs/etc/data")), "c");
    assert!(matches!(
        d.copy_instance_volume("src", None, "full", false, false),
        Err(StorageError::VolumeExists(_))
    ));

    // Instance only: no snapshots.
    d.copy_instance_volume("src", None, "only", true, false)
        .unwrap();
    assert!(d.list_snapshots("only").unwrap().is_empty());
    // From a snapshot: its content, no snapshots.
    d.copy_instance_volume("src", Some("snap0"), "fromsnap", false, false)
        .unwrap();
    assert_eq!(
        read(
            d.instance_volume("fromsnap")
                .unwrap()
                .join("rootfs/etc/data")
        ),
        "a"
    );
    assert!(d.list_snapshots("fromsnap").unwrap().is_empty());
    assert!(matches!(
        d.copy_instance_volume("src", Some("nope"), "x", false, false),
        Err(StorageError::SnapshotNotFound { .. })
    ));

    // Refresh: the root filesystem is replaced, missing snapshots are added.
    d.copy_instance_volume("src", None, "only", false, true)
        .unwrap();
    assert_eq!(names(d, "only"), ["snap0", "snap1"]);
    assert_eq!(
        read(d.instance_volume("only").unwrap().join("rootfs/etc/data")),
        "c"
    );
    std::fs::write(vol.join("rootfs/etc/data"), "d").unwrap();
    d.create_snapshot("src", "snap2").unwrap();
    d.copy_instance_volume("src", None, "only", false, true)
        .unwrap();
    assert_eq!(names(d, "only"), ["snap0", "snap1", "snap2"]);
    assert_eq!(
        read(d.instance_volume("only").unwrap().join("rootfs/etc/data")),
        "d"
    );
    assert!(matches!(
        d.copy_instance_volume("src", None, "missing", false, true),
        Err(StorageError::VolumeNotFound(_))
    ));

    for n in ["src", "full", "only", "fromsnap"] {
        d.delete_instance_volume(n).unwrap();
    }
    assert!(
        std::fs::read_dir(root.join("snapshots"))
            .unwrap()
            .next()
            .is_none()
    );
    d.delete_image_volume(&fp).unwrap();
}

#[test]
fn btrfs_snapshots() {
    let pool = Pool::new();
    let d = pool.open();
    snapshot_lifecycle(d.as_ref());
    d.unmount().unwrap();
}

#[test]
fn btrfs_copies() {
    let pool = Pool::new();
    let d = pool.open();
    copies(d.as_ref());
    d.unmount().unwrap();
}

#[test]
fn dir_snapshots() {
    let t = tempfile::tempdir().unwrap();
    let d = DirDriver::open(t.path().join("pool")).unwrap();
    snapshot_lifecycle(&d);
}

#[test]
fn dir_copies() {
    let t = tempfile::tempdir().unwrap();
    let d = DirDriver::open(t.path().join("pool")).unwrap();
    copies(&d);
}

/// A crash in the middle of a restore or refresh loses no volume: opening the pool puts the
/// old one back, or removes what the interrupted step left.
#[test]
fn interrupted_replacement_is_repaired_at_open() {
    let pool = Pool::new();
    let d = pool.open();
    let fp = "e".repeat(64);
    make_image(d.as_ref(), &fp);
    let containers = d.pool_root().join("containers");
    d.create_instance_volume("w1", &fp).unwrap();
    d.create_instance_volume("w2", &fp).unwrap();
    // w1: moved aside, the new one never arrived. w2: swapped, the old one not yet deleted.
    std::fs::rename(containers.join("w1"), containers.join(".old-w1")).unwrap();
    d.create_instance_volume("w3", &fp).unwrap();
    std::fs::rename(containers.join("w3"), containers.join(".old-w2")).unwrap();
    std::fs::create_dir(containers.join(".new-w4")).unwrap();
    let d = pool.open();
    let mut left: Vec<String> = std::fs::read_dir(&containers)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["w1", "w2"]);
    for n in ["w1", "w2"] {
        d.delete_instance_volume(n).unwrap();
    }
    d.unmount().unwrap();
}

/// Snapshots are read-only on btrfs, their size is what only they hold, and a restore keeps
/// the volume's disk limit.
#[test]
fn btrfs_snapshot_size_readonly_and_limit() {
    let pool = Pool::new();
    let d = pool.open();
    let fp = "d".repeat(64);
    make_image(d.as_ref(), &fp);
    let vol = d.create_instance_volume("sz", &fp).unwrap();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(vol.join("rootfs/big"), &data).unwrap();
    d.create_snapshot("sz", "s0").unwrap();
    let snap = d.snapshot_path("sz", "s0").unwrap();
    let err = std::fs::write(snap.join("rootfs/new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // Shared with the instance: nearly nothing exclusive.
    Command::new("sync").status().unwrap();
    assert!(d.snapshot_size("sz", "s0").unwrap() < 1 << 20);
    // Once the instance drops the data, the snapshot alone holds it.
    std::fs::remove_file(vol.join("rootfs/big")).unwrap();
    Command::new("sync").status().unwrap();
    let size = d.snapshot_size("sz", "s0").unwrap();
    assert!(size >= 4 << 20, "{size}");
    assert!(matches!(
        d.snapshot_size("sz", "nope"),
        Err(StorageError::SnapshotNotFound { .. })
    ));

    // With quotas on (a limit), the size comes from the qgroup; the limit survives a restore.
    d.set_instance_disk_limit("sz", Some(64 << 20)).unwrap();
    let size_q = d.snapshot_size("sz", "s0").unwrap();
    assert!(size_q >= 4 << 20, "{size_q}");
    d.restore_snapshot("sz", "s0").unwrap();
    assert_eq!(
        d.instance_disk_usage("sz").and_then(|u| u.limit),
        Some(64 << 20)
    );
    assert_eq!(
        std::fs::read(d.instance_volume("sz").unwrap().join("rootfs/big")).unwrap(),
        data
    );
    // A transfer's hidden staged volume survives the last snapshot's deletion, and goes with
    // the instance.
    let staged = d.pool_root().join("snapshots/sz/.in-t1-s-x");
    let st = Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(&snap)
        .arg(&staged)
        .status()
        .unwrap();
    assert!(st.success());
    d.delete_snapshot("sz", "s0").unwrap();
    assert!(staged.is_dir());
    d.delete_instance_volume("sz").unwrap();
    assert!(!d.pool_root().join("snapshots/sz").exists());
    d.unmount().unwrap();
}

fn sha256_file(p: &Path) -> String {
    let mut h = Sha256::new();
    h.update(std::fs::read(p).unwrap());
    hex::encode(h.finalize())
}

/// Kills what an instance left when a test fails half-way.
struct InstanceGuard {
    state_dir: PathBuf,
    names: Vec<String>,
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        for name in &self.names {
            let dir = InstanceDir::new(&self.state_dir, name);
            for p in [dir.live_init(), dir.live_monitor()].into_iter().flatten() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        for name in &self.names {
            if let Ok(cg) = Cgroups::detect().map(|c| c.with_tag("voltest")) {
                let _ = cg.destroy(name);
            }
            let dir = InstanceDir::new(&self.state_dir, name);
            let _ = nix::mount::umount2(&dir.rootfs_mount(), nix::mount::MntFlags::MNT_DETACH);
        }
        // The tag's shared monitors cgroup, empty once the monitors are gone.
        if let Ok(cg) = Cgroups::detect() {
            let shared = berth_agent::runtime::monitor::monitors_cgroup(Some("voltest"));
            for h in cg.hierarchies() {
                let _ = std::fs::remove_dir(h.mount.join(&shared));
            }
        }
    }
}

fn engine(pool: &Pool, driver: Arc<BtrfsDriver>) -> Engine {
    let state = pool.tmp.path().join("state");
    let mut cfg = EngineConfig::new(state);
    cfg.helper_exe = PathBuf::from(env!("CARGO_BIN_EXE_berth-agent"));
    cfg.cgroup_tag = "voltest".into();
    cfg.start_lxcfs = false;
    Engine::without_network(cfg, driver).unwrap()
}

fn spec(name: &str, image: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        image: image.into(),
        config: Default::default(),
        network: None,
    }
}

/// The engine on a busybox image: snapshots of a running instance, restore refused while it
/// runs and done when stopped, a copy made an instance with `existing_volume` (image gone)
/// that boots under its own name, refresh, publish from instance and snapshot, export and
/// import elsewhere with the same fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_snapshots_copies_and_publish() {
    let pool = Pool::new();
    let driver = pool.open();
    let state = pool.tmp.path().join("state");
    let _guard = InstanceGuard {
        state_dir: state.clone(),
        names: vec!["vt-a".into(), "vt-b".into()],
    };
    let store = Arc::new(
        ImageStore::new(driver.clone(), state.clone(), pool.tmp.path().join("cache")).unwrap(),
    );
    let img = store.build("busybox", None).unwrap();
    let e = engine(&pool, driver.clone());
    e.create(&spec("vt-a", &img.fingerprint)).await.unwrap();
    let rootfs = driver.instance_volume("vt-a").unwrap().join("rootfs");
    std::fs::write(rootfs.join("etc/marker"), "before").unwrap();

    // A running instance can be snapshotted; it cannot be restored or published.
    let st = e.start("vt-a").await.unwrap();
    assert_eq!(st.state, InstanceState::Running as i32);
    let s0 = e.snapshot("vt-a", "s0").await.unwrap();
    assert_eq!((s0.instance.as_str(), s0.name.as_str()), ("vt-a", "s0"));
    assert!(matches!(
        e.restore("vt-a", "s0").await,
        Err(EngineError::Running(_))
    ));
    assert!(matches!(
        e.publish_source("vt-a", None).await,
        Err(EngineError::Running(_))
    ));
    assert!(matches!(
        e.snapshot("nope", "s0").await,
        Err(EngineError::NotFound(_))
    ));
    assert!(matches!(
        e.snapshot("vt-a", "../x").await,
        Err(EngineError::InvalidConfig(_))
    ));
    e.stop("vt-a", true, Duration::ZERO).await.unwrap();

    // Restore after the stop.
    std::fs::write(rootfs.join("etc/marker"), "after").unwrap();
    let st = e.restore("vt-a", "s0").await.unwrap();
    assert_eq!(st.state, InstanceState::Stopped as i32);
    assert_eq!(read(rootfs.join("etc/marker")), "before");
    assert!(matches!(
        e.restore("vt-a", "nope").await,
        Err(EngineError::Storage(StorageError::SnapshotNotFound { .. }))
    ));

    // Rename and list.
    let renamed = e.rename_snapshot("vt-a", "s0", "first").await.unwrap();
    assert_eq!(renamed.created_at, s0.created_at);
    // Repeating a done rename answers the same.
    let again = e.rename_snapshot("vt-a", "s0", "first").await.unwrap();
    assert_eq!(again.name, "first");
    let list = e.list_snapshots("vt-a").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "first");

    // Copy, then create from the existing volume (the image no longer on the node).
    e.copy_volume("vt-a", None, "vt-b", false, false)
        .await
        .unwrap();
    // A retried copy (no instance yet) redoes it.
    e.copy_volume("vt-a", None, "vt-b", false, false)
        .await
        .unwrap();
    store.delete(&img.fingerprint).unwrap();
    let mut b = spec("vt-b", &img.fingerprint);
    b.config.insert("limits.disk".into(), "256MiB".into());
    e.create_with(&b, true).await.unwrap();
    // Idempotent.
    e.create_with(&b, true).await.unwrap();
    assert!(matches!(
        e.copy_volume("vt-a", None, "vt-b", false, false).await,
        Err(EngineError::AlreadyExists(_))
    ));
    let brootfs = driver.instance_volume("vt-b").unwrap().join("rootfs");
    assert_eq!(read(brootfs.join("etc/hostname")).trim(), "vt-b");
    assert_eq!(read(brootfs.join("etc/marker")), "before");
    assert_eq!(
        e.list_snapshots("vt-b")
            .await
            .unwrap()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["first"]
    );
    assert_eq!(
        driver.instance_disk_usage("vt-b").and_then(|u| u.limit),
        Some(256 << 20)
    );
    let st = e.start("vt-b").await.unwrap();
    assert_eq!(st.state, InstanceState::Running as i32);
    // Refresh refuses a running target.
    assert!(matches!(
        e.copy_volume("vt-a", None, "vt-b", false, true).await,
        Err(EngineError::Running(_))
    ));
    e.stop("vt-b", true, Duration::ZERO).await.unwrap();
    std::fs::write(rootfs.join("etc/marker"), "refreshed").unwrap();
    e.copy_volume("vt-a", None, "vt-b", false, true)
        .await
        .unwrap();
    assert_eq!(read(brootfs.join("etc/marker")), "refreshed");
    assert_eq!(read(brootfs.join("etc/hostname")).trim(), "vt-b");
    // Without the flag the image is needed (it is gone here).
    assert!(matches!(
        e.create(&spec("vt-c", &img.fingerprint)).await,
        Err(EngineError::Storage(StorageError::ImageNotFound(_)))
    ));
    // An instance without the existing volume is refused.
    assert!(matches!(
        e.create_with(&spec("vt-c", &img.fingerprint), true).await,
        Err(EngineError::InvalidConfig(_))
    ));

    // Publish the stopped instance and its snapshot.
    let mut props = std::collections::BTreeMap::new();
    props.insert("description".to_string(), "published".to_string());
    props.insert("release".to_string(), "r1".to_string());
    let src = e.publish_source("vt-a", None).await.unwrap();
    let pubd = store.publish(&src.path, &props).unwrap();
    drop(src);
    assert_eq!(pubd.description, "published");
    assert_eq!(pubd.os, "busybox", "the source image's properties stay");
    assert_eq!(pubd.release, "r1");
    let src = e.publish_source("vt-a", Some("first")).await.unwrap();
    let from_snap = store.publish(&src.path, &props).unwrap();
    drop(src);
    assert!(store.get(&from_snap.fingerprint).unwrap().is_some());
    assert!(matches!(
        e.publish_source("vt-a", Some("nope")).await,
        Err(EngineError::Storage(StorageError::SnapshotNotFound { .. }))
    ));

    // Export: the sha256 of the tarball is the fingerprint, twice over.
    let out = pool.tmp.path().join("export.tar.gz");
    let mut bytes = Vec::new();
    let n = store
        .export(&pubd.fingerprint, |c| {
            bytes.extend_from_slice(c);
            Ok(())
        })
        .unwrap();
    assert_eq!(n as usize, bytes.len());
    assert_eq!(n, pubd.size_bytes);
    std::fs::write(&out, &bytes).unwrap();
    assert_eq!(sha256_file(&out), pubd.fingerprint);
    let listing = Command::new("tar").arg("-tvzf").arg(&out).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains(" metadata.yaml"), "{listing}");
    assert!(listing.contains(" rootfs/sbin/init"), "{listing}");
    assert!(
        listing.contains(" 0/0 "),
        "owners are container ids: {listing}"
    );

    // Import on another node's pool: same fingerprint, same content.
    let t = tempfile::tempdir().unwrap();
    let dir = Arc::new(DirDriver::open(t.path().join("pool")).unwrap());
    let other =
        ImageStore::new(dir.clone(), t.path().join("state"), t.path().join("cache")).unwrap();
    let imported = other
        .import(ImportFormat::Unified, None, &out, vec![])
        .unwrap();
    assert_eq!(imported.fingerprint, pubd.fingerprint);
    assert_eq!(imported.description, "published");
    let ivol = other.volume_path(&imported.fingerprint).unwrap().unwrap();
    assert_eq!(read(ivol.join("rootfs/etc/marker")), "refreshed");
    assert!(
        std::fs::symlink_metadata(ivol.join("rootfs/bin/sh"))
            .unwrap()
            .is_symlink()
    );

    // Delete removes snapshots too.
    e.delete("vt-b", true).await.unwrap();
    e.delete("vt-a", true).await.unwrap();
    assert!(
        std::fs::read_dir(driver.pool_root().join("snapshots"))
            .unwrap()
            .next()
            .is_none()
    );
    drop(e);
    drop(store);
    driver.unmount().unwrap();
}

/// Stops a private LXD daemon and removes its directory.
struct Lxd {
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Lxd {
    fn lxc(&self, args: &[&str]) -> std::process::Output {
        Command::new("lxc")
            .env("LXD_DIR", self.dir.path())
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Lxd {
    fn drop(&mut self) {
        let _ = Command::new("lxd")
            .env("LXD_DIR", self.dir.path())
            .args(["shutdown", "--timeout", "20"])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let shmounts = self.dir.path().join("shmounts");
        let devlxd = self.dir.path().join("devlxd");
        for m in [shmounts, devlxd] {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// LXD itself imports a published image's export under the same fingerprint (a private LXD
/// daemon in a temp dir: no networks, no storage pools).
#[test]
#[ignore = "starts a private LXD daemon (lxd must be installed); run with --ignored"]
fn lxd_imports_a_published_export() {
    let pool = Pool::new();
    let driver = pool.open();
    let state = pool.tmp.path().join("state");
    let store = ImageStore::new(driver.clone(), state, pool.tmp.path().join("cache")).unwrap();
    let img = store.build("busybox", None).unwrap();
    let vol = driver
        .create_instance_volume("lxdpub", &img.fingerprint)
        .unwrap();
    let mut props = std::collections::BTreeMap::new();
    props.insert("description".to_string(), "for lxd".to_string());
    let published = store.publish(&vol, &props).unwrap();
    let out = pool.tmp.path().join("export.tar.gz");
    let mut f = std::fs::File::create(&out).unwrap();
    store
        .export(&published.fingerprint, |c| {
            std::io::Write::write_all(&mut f, c)
        })
        .unwrap();
    drop(f);

    let dir = tempfile::Builder::new()
        .prefix("berth-lxd-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let child = Command::new("lxd")
        .env("LXD_DIR", dir.path())
        .args(["--group", "root"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lxd = Lxd { dir, child };
    let ready = Command::new("lxd")
        .env("LXD_DIR", lxd.dir.path())
        .args(["waitready", "--timeout", "60"])
        .status()
        .unwrap();
    assert!(ready.success(), "the private LXD did not come up");
    let imported = lxd.lxc(&[
        "image",
        "import",
        out.to_str().unwrap(),
        "--alias",
        "berth-pub",
    ]);
    assert!(
        imported.status.success(),
        "lxc image import: {}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let shown = lxd.lxc(&["image", "info", "berth-pub"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(&format!("Fingerprint: {}", published.fingerprint)),
        "{text}"
    );
    assert!(text.contains("for lxd"), "{text}");
    drop(lxd);
    driver.delete_instance_volume("lxdpub").unwrap();
    driver.unmount().unwrap();
}
