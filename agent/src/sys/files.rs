//! Path resolution for file push/pull/delete that can never leave an instance's root:
//! every lookup goes through openat2 with RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS relative to
//! a directory fd of the root, so `..` stops at the root and absolute symlinks resolve inside.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How often a lookup is retried when the kernel reports a concurrent rename (EAGAIN).
const RESOLVE_RETRIES: usize = 16;

/// Opens `path` (absolute or relative, both are taken relative to `root`) inside `root`.
/// `flags` get O_CLOEXEC added.
pub fn open_in_root(
    root: BorrowedFd<'_>,
    path: &str,
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let mut last = Errno::AGAIN;
    for _ in 0..RESOLVE_RETRIES {
        match rustix::fs::openat2(root, path, flags | OFlags::CLOEXEC, mode, resolve) {
            Err(Errno::AGAIN) | Err(Errno::INTR) => last = Errno::AGAIN,
            other => return other,
        }
    }
    Err(last)
}

/// Opens a host directory (an instance's rootfs, or `/` in the instance's mount namespace) as
/// the root for [`open_in_root`]. The path is trusted (it comes from the agent, not a user).
pub fn open_root(path: &Path) -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Whether two open files are the same inode.
pub fn same_inode(a: impl AsFd, b: impl AsFd) -> Result<bool, Errno> {
    let sa = rustix::fs::fstat(a)?;
    let sb = rustix::fs::fstat(b)?;
    Ok(sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotdot_and_absolute_symlinks_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/marker"), b"inside").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("evil")).unwrap();
        let root = open_root(dir.path()).unwrap();
        for p in ["/../../etc/marker", "evil/marker", "/evil/../evil/marker"] {
            let fd = open_in_root(root.as_fd(), p, OFlags::RDONLY, Mode::empty()).unwrap();
            let mut f = std::fs::File::from(fd);
            let mut s = String::new();
            std::io::Read::read_to_string(&mut f, &mut s).unwrap();
            assert_eq!(s, "inside", "{p}");
        }
    }

    #[test]
    fn magic_links_are_refused() {
        // /proc/self/root is a magic link; resolving through it is refused.
        let root = open_root(Path::new("/")).unwrap();
        let err = open_in_root(
            root.as_fd(),
            "/proc/self/root/etc",
            OFlags::PATH,
            Mode::empty(),
        )
        .unwrap_err();
        assert_eq!(err, Errno::LOOP);
    }
}
