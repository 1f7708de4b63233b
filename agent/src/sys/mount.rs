//! Mount primitives: idmapped mounts (open_tree + mount_setattr + move_mount), bind mounts,
//! detaching, and user namespaces made only to carry an id map.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const SYS_MOUNT_SETATTR: libc::c_long = 442;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes a user namespace whose uid and gid maps are both `0 <base> <count>` and returns an fd
/// of it (the fd keeps the namespace alive). Forks a short-lived child that unshares the user
/// namespace and sleeps until it is killed; the child only makes raw async-signal-safe
/// syscalls, so this is usable from any process, also concurrently from several threads.
pub fn userns_with_map(base: u32, count: u32) -> io::Result<OwnedFd> {
    // SAFETY: the child below only calls async-signal-safe raw syscalls and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: raw syscalls only; the child ends by _exit or by the parent's SIGKILL.
        unsafe {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                libc::_exit(1);
            }
            loop {
                libc::pause();
            }
        }
    }
    let result = (|| {
        // Wait until the child's user namespace differs from ours.
        let own = std::fs::read_link("/proc/self/ns/user")?;
        let ns_path = format!("/proc/{pid}/ns/user");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match std::fs::read_link(&ns_path) {
                Ok(ns) if ns != own => break,
                Ok(_) => {}
                // The child exited: unshare failed.
                Err(_) => {
                    return Err(io::Error::other(
                        "the helper could not create a user namespace",
                    ));
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "child did not unshare its user namespace",
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let map = format!("0 {base} {count}\n");
        std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), &map)?;
        let f = std::fs::File::open(&ns_path)?;
        Ok(OwnedFd::from(f))
    })();
    // SAFETY: signalling and reaping our own child; `status` is a valid out pointer.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    result
}

/// Attaches an idmapped view of `src` at `dst` (an existing directory): the ids on disk are
/// shifted through the map of the user namespace `userns`.
pub fn idmapped_bind(src: &Path, dst: &Path, userns: &OwnedFd) -> io::Result<()> {
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        src,
        rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
            | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC
            | rustix::mount::OpenTreeFlags::AT_RECURSIVE,
    )?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: mount_setattr(2) with a valid fd, an empty NUL-terminated path, a pointer to a
    // properly laid out `struct mount_attr` and its size; the kernel only reads `attr`.
    let rc = unsafe {
        libc::syscall(
            SYS_MOUNT_SETATTR,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    rustix::mount::move_mount(
        &tree,
        "",
        rustix::fs::CWD,
        dst,
        rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

/// `mount(src, dst, NULL, MS_BIND | MS_REC [| extra], NULL)`.
pub fn bind(src: &Path, dst: &Path, recursive: bool) -> io::Result<()> {
    let mut flags = nix::mount::MsFlags::MS_BIND;
    if recursive {
        flags |= nix::mount::MsFlags::MS_REC;
    }
    nix::mount::mount(Some(src), dst, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
}

/// Remounts an existing bind mount read-only.
pub fn remount_bind_readonly(dst: &Path) -> io::Result<()> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Mounts a filesystem of type `fstype`.
pub fn mount_fs(
    fstype: &str,
    dst: &Path,
    flags: nix::mount::MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    nix::mount::mount(Some(fstype), dst, Some(fstype), flags, data).map_err(io::Error::from)
}

/// Lazily detaches whatever is mounted at `path`; a path that is not a mount point is fine.
pub fn detach(path: &Path) -> io::Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether `path` is a mount point in the caller's mount namespace (by /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|mp| unescape_mountinfo(mp).as_slice() == want)
            .unwrap_or(false)
    })
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// `pivot_root(".", ".")` in `new_root`, then detaches the old root and chdirs to "/".
pub fn pivot_into(new_root: &Path) -> io::Result<()> {
    std::env::set_current_dir(new_root)?;
    let dot = c".";
    // SAFETY: pivot_root with two valid NUL-terminated paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    std::env::set_current_dir("/")?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn userns_concurrently() {
        let threads: Vec<_> = (0..4)
            .map(|i| std::thread::spawn(move || userns_with_map(2_000_000 + i * 65536, 65536)))
            .collect();
        for t in threads {
            let fd = t.join().unwrap().unwrap();
            let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            assert!(
                std::fs::read_link(path)
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("user:")
            );
        }
    }
}
