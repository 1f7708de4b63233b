//! Kernel calls for `berth-agent __exec` and `__file`: joining an instance's namespaces,
//! forking inside them, signal plumbing, the seccomp/capability restrictions applied to
//! processes started in an instance, and the status pipe between the engine and a helper.
//!
//! Everything here runs in a short-lived, single-threaded helper process (never on a tokio
//! worker), except [`attach_status_fd`], [`pidfd_open`], [`pidfd_signal`] and [`async_fd`],
//! which the engine uses.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{ForkResult, Pid};

/// Namespaces joined by exec, in the order they must be joined (user first: it grants the
/// capabilities needed for the others).
pub const EXEC_NAMESPACES: &[(&str, CloneFlags)] = &[
    ("user", CloneFlags::CLONE_NEWUSER),
    ("mnt", CloneFlags::CLONE_NEWNS),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("net", CloneFlags::CLONE_NEWNET),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
];

/// Namespaces joined by the file helper: user and mount only.
pub const FILE_NAMESPACES: &[(&str, CloneFlags)] = &[
    ("user", CloneFlags::CLONE_NEWUSER),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Errors of the low-level exec/file plumbing.
#[derive(Debug, thiserror::Error)]
pub enum SysExecError {
    #[error("cannot open namespace {ns} of process {pid}: {source}")]
    OpenNamespace {
        ns: String,
        pid: i32,
        source: std::io::Error,
    },
    #[error("cannot join namespace {ns}: {source}")]
    JoinNamespace { ns: String, source: nix::Error },
    #[error("cannot join cgroup {}: {source}", path.display())]
    JoinCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {what}: {source}")]
    Call { what: String, source: nix::Error },
    #[error("{0}")]
    Restrict(String),
}

fn call_err(what: &str) -> impl FnOnce(nix::Error) -> SysExecError + '_ {
    move |source| SysExecError::Call {
        what: what.to_string(),
        source,
    }
}

/// Namespace file descriptors of a process, opened before any of them is joined (after
/// joining the mount namespace the host's /proc is no longer reachable). Namespaces that
/// are the same as the caller's are left out: joining them is pointless, and joining one's
/// own user namespace fails (privileged instances have no user namespace of their own).
pub struct NamespaceFds {
    fds: Vec<(&'static str, CloneFlags, File)>,
}

impl NamespaceFds {
    /// Opens `/proc/<pid>/ns/<kind>` for each of `kinds`.
    pub fn open(pid: i32, kinds: &[(&'static str, CloneFlags)]) -> Result<Self, SysExecError> {
        let mut fds = Vec::new();
        for &(name, flag) in kinds {
            let target = format!("/proc/{pid}/ns/{name}");
            let open_err = |source| SysExecError::OpenNamespace {
                ns: name.to_string(),
                pid,
                source,
            };
            let file = File::open(&target).map_err(open_err)?;
            let theirs = file.metadata().map_err(open_err)?;
            let ours = std::fs::metadata(format!("/proc/self/ns/{name}")).map_err(open_err)?;
            if theirs.dev() == ours.dev() && theirs.ino() == ours.ino() {
                continue;
            }
            fds.push((name, flag, file));
        }
        Ok(NamespaceFds { fds })
    }

    /// Whether the target has a user namespace different from ours.
    pub fn has_user_namespace(&self) -> bool {
        self.fds
            .iter()
            .any(|(_, flag, _)| *flag == CloneFlags::CLONE_NEWUSER)
    }

    /// Joins all opened namespaces in order. The caller must be single-threaded (setns of a
    /// user or mount namespace fails otherwise). Joining the pid namespace only affects
    /// children forked afterwards.
    pub fn join(&self) -> Result<(), SysExecError> {
        for (name, flag, file) in &self.fds {
            nix::sched::setns(file.as_fd(), *flag).map_err(|source| {
                SysExecError::JoinNamespace {
                    ns: name.to_string(),
                    source,
                }
            })?;
        }
        Ok(())
    }
}

/// Moves process `pid` into each cgroup whose `cgroup.procs` file is given.
pub fn move_to_cgroups(pid: u32, procs_files: &[PathBuf]) -> Result<(), SysExecError> {
    let pid = pid.to_string();
    for path in procs_files {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(pid.as_bytes()))
            .map_err(|source| SysExecError::JoinCgroup {
                path: path.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Becomes root (id 0) of the current user namespace, with no supplementary groups. Used
/// after joining an instance's user namespace, where the host's root is unmapped.
pub fn become_namespace_root() -> Result<(), SysExecError> {
    set_ids(0, 0)
}

/// Sets real, effective and saved ids and clears supplementary groups (besides `gid`).
pub fn set_ids(uid: u32, gid: u32) -> Result<(), SysExecError> {
    let gid = nix::unistd::Gid::from_raw(gid);
    let uid = nix::unistd::Uid::from_raw(uid);
    nix::unistd::setgroups(&[gid]).map_err(call_err("set supplementary groups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(call_err("set group id"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(call_err("set user id"))?;
    Ok(())
}

/// Signals an exec helper forwards to its child.
pub const FORWARDED_SIGNALS: &[Signal] = &[
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The set waited on by the forwarding loop: the forwarded signals plus SIGCHLD.
pub fn forwarding_sigset() -> SigSet {
    let mut set = SigSet::empty();
    for sig in FORWARDED_SIGNALS {
        set.add(*sig);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// Outcome of [`fork_process`].
pub enum Forked {
    /// In the parent: the child's pid (in the parent's pid namespace).
    Parent(Pid),
    /// In the child.
    Child,
}

/// Forks the calling process.
///
/// Only call this from a single-threaded process (the `__exec` helper, before any thread is
/// started): the child then has a consistent copy of all memory, allocator included.
pub fn fork_process() -> Result<Forked, SysExecError> {
    // SAFETY: the helpers that call this are single-threaded (they run from `main` before any
    // runtime or thread is started), so no lock can be held by another thread at the time of
    // the fork and the child may allocate and run arbitrary code until it execs.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Parent { child }) => Ok(Forked::Parent(child)),
        Ok(ForkResult::Child) => Ok(Forked::Child),
        Err(e) => Err(SysExecError::Call {
            what: "fork".to_string(),
            source: e,
        }),
    }
}

/// Restores default dispositions for signals the Rust runtime changes (SIGPIPE is ignored in
/// every Rust program, and ignored dispositions survive exec).
pub fn reset_signal_dispositions() -> Result<(), SysExecError> {
    // SAFETY: installing SIG_DFL involves no handler code, so no signal-safety requirement
    // applies; the process is single-threaded.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) }
        .map_err(call_err("reset SIGPIPE"))?;
    Ok(())
}

/// Makes the tty on `fd` the controlling terminal of the calling process, which must have
/// just become a session leader with `setsid`.
pub fn set_controlling_tty(fd: impl AsFd) -> Result<(), SysExecError> {
    rustix::process::ioctl_tiocsctty(fd).map_err(|e| SysExecError::Call {
        what: "set controlling terminal".to_string(),
        source: nix::Error::from_raw(e.raw_os_error()),
    })
}

/// Applies what every process of an instance gets, the same as its init: the capability
/// bounding-set drop and the seccomp deny-list (task R's [`super::caps`] and
/// [`super::seccomp`]). Call it as root of the instance's user namespace, before changing ids.
pub fn apply_instance_restrictions() -> Result<(), SysExecError> {
    super::caps::drop_bounding_set().map_err(|e| {
        SysExecError::Restrict(format!(
            "cannot drop capabilities from the bounding set: {e}"
        ))
    })?;
    super::seccomp::install_deny_filter().map_err(|e| SysExecError::Restrict(e.to_string()))
}

/// Makes `fd` (a status pipe's write end, close-on-exec) inheritable by the helper that `cmd`
/// spawns, and only by it; returns the descriptor number the helper finds it under. The fd is
/// first moved to a number above 2 so that setting up the child's stdio cannot clobber it.
pub fn attach_status_fd(cmd: &mut tokio::process::Command, fd: OwnedFd) -> std::io::Result<i32> {
    let fd = rustix::io::fcntl_dupfd_cloexec(&fd, 3)?;
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe. `fd` is moved into the closure, so `raw` stays open in the parent
    // until the command is dropped, and therefore is open in the child.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            let flags = libc::fcntl(raw, libc::F_GETFD);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(raw)
}

/// Takes ownership of the status pipe a helper inherited as descriptor `fd`, if it is open.
/// It is marked close-on-exec so the command the helper finally runs does not inherit it.
pub fn take_status_fd(fd: i32) -> Option<File> {
    if fd <= 2 {
        return None;
    }
    // SAFETY: F_GETFD on an arbitrary descriptor number only reads its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return None;
    }
    // SAFETY: as above; setting FD_CLOEXEC changes no memory.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open (F_GETFD succeeded) and by the helper protocol it was
    // handed to this process to own (`--status-fd`); nothing else in the helper uses it.
    Some(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Sends signal `sig` (any number, real-time ones included) to the process behind `pidfd`.
pub fn pidfd_signal(pidfd: BorrowedFd<'_>, sig: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal takes a descriptor we borrow for the duration of the call, a
    // plain signal number, a null siginfo pointer (the kernel fills in a default) and flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pidfd for `pid` (a child that has not been reaped yet, so the pid is still ours).
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Registers an owned descriptor (a pty master) with tokio's reactor.
pub fn async_fd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that it alone closes, and its
    // `as_raw_fd` always returns the same number, so the descriptor stays open and refers to
    // the same file description for the whole life of the `AsyncFd`, which owns it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_set_contains_sigchld() {
        let set = forwarding_sigset();
        assert!(set.contains(Signal::SIGCHLD));
        assert!(set.contains(Signal::SIGTERM));
        assert!(!set.contains(Signal::SIGKILL));
    }
}
