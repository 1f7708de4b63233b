//! btrfs ioctls the storage driver needs on hot paths (where running `btrfs` would cost a
//! process per call): the filesystem id, the id of the subvolume holding a path, taking a
//! snapshot and deleting a subvolume (the same ioctls `btrfs subvolume snapshot|delete` make).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// `struct btrfs_ioctl_fs_info_args` (linux/btrfs.h), 1024 bytes.
#[repr(C)]
#[allow(dead_code)] // the kernel's layout: every field must exist, few are read
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; 16],
    reserved: [u8; 944],
}

/// `struct btrfs_ioctl_ino_lookup_args` (linux/btrfs.h), 4096 bytes.
#[repr(C)]
#[allow(dead_code)] // the kernel's layout: every field must exist, few are read
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

/// `struct btrfs_ioctl_vol_args` (linux/btrfs.h), 4096 bytes.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_ioctl_vol_args_v2` (linux/btrfs.h), 4096 bytes; the qgroup-inherit union is
/// left zeroed (no inheritance), and the name union is used as `name`.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);
const _: () = assert!(std::mem::size_of::<FsInfoArgs>() == 1024);
const _: () = assert!(std::mem::size_of::<InoLookupArgs>() == 4096);

/// `BTRFS_IOCTL_MAGIC`.
const BTRFS_IOCTL_MAGIC: u8 = 0x94;
/// The first inode number of every btrfs tree (a subvolume's root directory).
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;
/// `BTRFS_SUBVOL_RDONLY`: the new snapshot is read-only.
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;

nix::ioctl_read!(ioc_fs_info, BTRFS_IOCTL_MAGIC, 31, FsInfoArgs);
nix::ioctl_write_ptr!(ioc_snap_destroy, BTRFS_IOCTL_MAGIC, 15, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_create_v2, BTRFS_IOCTL_MAGIC, 23, VolArgsV2);
nix::ioctl_readwrite!(ioc_ino_lookup, BTRFS_IOCTL_MAGIC, 18, InoLookupArgs);

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The filesystem id (UUID) of the btrfs filesystem holding directory `path`, formatted as
/// `/sys/fs/btrfs/` names it (`8-4-4-4-12` lowercase hex).
pub fn fs_uuid(path: &Path) -> io::Result<String> {
    let fd = open_dir(path)?;
    let mut args = FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        nodesize: 0,
        sectorsize: 0,
        clone_alignment: 0,
        csum_type: 0,
        csum_size: 0,
        flags: 0,
        generation: 0,
        metadata_uuid: [0; 16],
        reserved: [0; 944],
    };
    // SAFETY: `fd` is an open directory for the duration of the call, and `args` is a live,
    // exclusively borrowed `struct btrfs_ioctl_fs_info_args` of the size the request code
    // encodes; the kernel writes only within it (flags = 0 asks for nothing beyond the base
    // fields).
    unsafe { ioc_fs_info(fd.as_raw_fd(), &mut args) }.map_err(io::Error::from)?;
    let h = hex::encode(args.fsid);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// The id of the subvolume holding directory `path` (of the subvolume itself when `path` is a
/// subvolume's root), as `btrfs inspect-internal rootid` prints it.
pub fn subvolume_id(path: &Path) -> io::Result<u64> {
    let fd = open_dir(path)?;
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: BTRFS_FIRST_FREE_OBJECTID,
        name: [0; 4080],
    };
    // SAFETY: `fd` is an open directory for the duration of the call, and `args` is a live,
    // exclusively borrowed `struct btrfs_ioctl_ino_lookup_args` of the size the request code
    // encodes; with treeid 0 and the first free objectid the kernel only fills in `treeid` and
    // an empty `name`, within the struct.
    unsafe { ioc_ino_lookup(fd.as_raw_fd(), &mut args) }.map_err(io::Error::from)?;
    Ok(args.treeid)
}

/// The parent directory (opened) and the file name of `path`, checked to fit `max` bytes
/// (the kernel wants a NUL after it).
fn parent_and_name(path: &Path, max: usize) -> io::Result<(OwnedFd, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}: {}", path.display()),
        )
    };
    let name = path.file_name().ok_or_else(|| invalid("no file name"))?;
    let name = name.as_bytes();
    if name.is_empty() || name.len() >= max || name.contains(&0) {
        return Err(invalid("unusable subvolume name"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((open_dir(parent)?, name.to_vec()))
}

/// Snapshots subvolume `src` as the new subvolume `dst` (whose parent directory exists),
/// read-only with `readonly`: `btrfs subvolume snapshot [-r] src dst`.
pub fn snapshot(src: &Path, dst: &Path, readonly: bool) -> io::Result<()> {
    let source = open_dir(src)?;
    let (parent, name) = parent_and_name(dst, 4040)?;
    let mut args = VolArgsV2 {
        fd: i64::from(source.as_raw_fd()),
        transid: 0,
        flags: if readonly { BTRFS_SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; 4040],
    };
    args.name[..name.len()].copy_from_slice(&name);
    // SAFETY: `parent` and `source` are open directories for the duration of the call, and
    // `args` is a live `struct btrfs_ioctl_vol_args_v2` of the size the request code encodes,
    // with a NUL-terminated name (checked shorter than the field) and no qgroup inheritance
    // (flags carry only BTRFS_SUBVOL_RDONLY), so the kernel reads nothing beyond it.
    unsafe { ioc_snap_create_v2(parent.as_raw_fd(), &args) }.map_err(io::Error::from)?;
    Ok(())
}

/// Deletes subvolume `path`: `btrfs subvolume delete path` (without waiting for the commit).
/// Fails with `ENOTEMPTY` when subvolumes are nested in it.
pub fn delete_subvolume(path: &Path) -> io::Result<()> {
    let (parent, name) = parent_and_name(path, 4088)?;
    let mut args = VolArgs {
        fd: 0,
        name: [0; 4088],
    };
    args.name[..name.len()].copy_from_slice(&name);
    // SAFETY: `parent` is an open directory for the duration of the call, and `args` is a
    // live `struct btrfs_ioctl_vol_args` of the size the request code encodes, with a
    // NUL-terminated name (checked shorter than the field); the kernel only reads it.
    unsafe { ioc_snap_destroy(parent.as_raw_fd(), &args) }.map_err(io::Error::from)?;
    Ok(())
}
