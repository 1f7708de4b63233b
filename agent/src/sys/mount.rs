//! Mount primitives: idmapped mounts (open_tree + mount_setattr + move_mount), bind mounts,
//! detaching, and user namespaces made only to carry an id map.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
/// namespace; the child only makes raw syscalls, so this is usable from any process.
pub fn userns_with_map(base: u32, count: u32) -> io::Result<OwnedFd> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child below only calls async-signal-safe raw syscalls and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: raw syscalls on fds we own; the child ends with _exit.
        unsafe {
            libc::close(wr.as_raw_fd());
            let code = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                0
            } else {
                1
            };
            let mut b = 0u8;
            // Wait until the parent has written the maps and opened the namespace (EOF).
            libc::read(rd.as_raw_fd(), &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(code);
        }
    }
    drop(rd);
    let result = (|| {
        // Give the child time to unshare: poll its user ns until it differs from ours.
        let own = std::fs::read_link("/proc/self/ns/user")?;
        let ns_path = format!("/proc/{pid}/ns/user");
        let mut tries = 0;
        loop {
            let ns = std::fs::read_link(&ns_path)?;
            if ns != own {
                break;
            }
            tries += 1;
            if tries > 2000 {
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
    drop(wr);
    let mut status = 0;
    // SAFETY: reaping our own child; `status` is a valid out pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
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
