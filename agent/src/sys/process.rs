//! Process-level primitives: daemonizing, cloning into new namespaces, waiting, signals.

use std::io;

/// Forks; the parent exits at once (status 0) and the child continues in a new session, so it
/// is reparented away from its caller and never needs reaping by it. Call only while the process
/// is single-threaded (at the very start of a helper subcommand).
pub fn daemonize() -> io::Result<()> {
    // SAFETY: the caller guarantees the process is single-threaded, so fork is sound.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        // SAFETY: leaving the parent at once, without running destructors shared with the child.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: setsid has no memory arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `clone(flags | SIGCHLD)` without a new stack: behaves like fork with new namespaces.
/// Returns 0 in the child and the child's pid in the parent. The caller must be single-threaded.
pub fn clone_fork(flags: libc::c_int) -> io::Result<libc::pid_t> {
    // SAFETY: a raw clone without CLONE_VM or a stack duplicates the address space like fork;
    // the caller guarantees single-threadedness, so no lock can be held by another thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as libc::pid_t)
}

/// A pidfd for `pid` (any process): it becomes readable when the process exits.
pub fn pidfd(pid: libc::pid_t) -> io::Result<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Registers a pidfd with the current tokio runtime, to await the process's exit
/// (`readable()`). Must be called within a tokio runtime.
pub fn async_pidfd(
    fd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the `OwnedFd` is open and owned by the `AsyncFd` from here on, so it stays open
    // and refers to the same pidfd until the `AsyncFd` is dropped; `as_raw_fd` of an
    // `OwnedFd` always returns that one descriptor.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

/// Waits for `pid`; `block = false` returns `Ok(None)` when it is still running.
pub fn wait_pid(pid: libc::pid_t, block: bool) -> io::Result<Option<ExitStatus>> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, if block { 0 } else { libc::WNOHANG }) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Ok(None);
        }
        if libc::WIFEXITED(status) {
            return Ok(Some(ExitStatus::Exited(libc::WEXITSTATUS(status))));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Some(ExitStatus::Signaled(libc::WTERMSIG(status))));
        }
    }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Terminates the calling process at once, without destructors or atexit handlers
/// (for forked children).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no memory.
    unsafe { libc::_exit(code) }
}

/// The real-time signal systemd uses for "halt" (glibc's SIGRTMIN + 3).
pub fn sigrtmin_plus(n: i32) -> i32 {
    libc::SIGRTMIN() + n
}

/// Sets the signal the calling process gets when its parent dies.
pub fn set_parent_death_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Restores the default disposition of every catchable signal and unblocks all signals, so
/// what the calling process execs next starts clean (Rust ignores SIGPIPE in every binary,
/// and an ignored signal survives execve).
pub fn reset_signals() -> io::Result<()> {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no handler code; invalid numbers (reserved glibc
        // real-time signals) just fail with EINVAL, which is ignored.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: `set` is a valid sigset_t initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
