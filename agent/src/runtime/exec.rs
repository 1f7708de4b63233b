//! Exec into a running instance.
//!
//! The engine starts `berth-agent __exec` ([`helper_main`]) with pipes or a pty slave as its
//! stdio. The engine moves the helper into the instance's cgroups while it starts (the helper
//! waits for that on its ready pipe); the helper then joins the instance's user, mount, pid,
//! uts, ipc, net and cgroup namespaces, forks (the pid namespace applies to children only), and the child sets
//! up the process (instance restrictions, ids, cwd, environment, controlling tty) and execs the
//! command. The helper forwards signals to the child and exits with the child's status (exit
//! code, or 128 + signal). A command that is not found gives 127, one that cannot be executed
//! 126, like a shell.
//!
//! Helper arguments: `__exec --pid <init host pid> --uid <n> --gid <n> [--cwd <dir>]
//! [--env K=V]... [--tty] [--status-fd <fd>] [--ready-fd <fd>] -- <command> [args...]`. The status fd is a pipe: it closes without data once the command
//! is exec'd (or the command was not found); a failure to enter the instance is written to it
//! as `E<message>`. With a ready fd the helper waits, before entering the namespaces, for the
//! engine to write `G` on it (the engine has moved it into the cgroups).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::task::AtomicWaker;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use rustix::fs::{Mode, OFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::sys::exec as sys;

/// How long [`ExecSession::wait`] waits, after the helper exited, for output readers to reach
/// the end of their streams. Output is normally drained long before; only processes the
/// command left running in the background (still holding the pipes or the pty) make it wait.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long [`ExecSession::spawn`] waits for the helper to enter the instance.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit code for a command that was not found.
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit code for a command that could not be executed.
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit code of the helper when it could not set up the command.
pub const EXIT_SETUP_FAILED: i32 = 125;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_TERM: &str = "xterm-256color";

/// What to run in an instance.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Host pid of the instance's init.
    pub init_pid: i32,
    /// The `cgroup.procs` files the process must be written into (see
    /// `cgroup::Cgroups::exec_procs_files`).
    pub cgroup_procs: Vec<PathBuf>,
    /// The command and its arguments; the command is looked up in the `PATH` of the
    /// environment below.
    pub command: Vec<String>,
    /// Extra environment; it overrides the defaults (`PATH`, `HOME`, `USER`, `LANG=C.UTF-8`,
    /// `TERM` with a tty). The engine adds the instance's `environment.*` keys here.
    pub env: BTreeMap<String, String>,
    /// Working directory; default: the user's home from the instance's `/etc/passwd`, else `/`.
    pub cwd: Option<String>,
    /// Container uid.
    pub uid: u32,
    /// Container gid.
    pub gid: u32,
    /// A pty of this size (cols, rows) instead of pipes.
    pub tty: Option<(u16, u16)>,
    /// Host uid and gid of the instance's root, who owns the pty inside (`None`: host root,
    /// for privileged instances).
    pub pty_owner: Option<(u32, u32)>,
    /// The agent binary (normally `/proc/self/exe`).
    pub helper_exe: PathBuf,
}

/// Errors of exec sessions.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("invalid exec request: {0}")]
    InvalidRequest(String),
    #[error("cannot allocate a pty: {0}")]
    Pty(std::io::Error),
    #[error("cannot start the exec helper {}: {source}", exe.display())]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter the instance: {0}")]
    Setup(String),
    #[error("exec session has no terminal")]
    NoTty,
    #[error("cannot resize the terminal: {0}")]
    Resize(std::io::Error),
    #[error("cannot signal the exec helper: {0}")]
    Signal(std::io::Error),
    #[error("waiting for the exec helper failed: {0}")]
    Wait(std::io::Error),
}

/// A running exec: stdio streams, resize, signals and the exit code.
pub struct ExecSession {
    child: tokio::process::Child,
    control: ExecControl,
    stdin: Option<ExecStdin>,
    stdout: Option<ExecOutput>,
    stderr: Option<ExecOutput>,
    drains: Vec<Arc<Drain>>,
}

/// A cloneable handle to resize and signal an [`ExecSession`], usable while another task
/// awaits [`ExecSession::wait`].
#[derive(Clone)]
pub struct ExecControl {
    pidfd: Arc<OwnedFd>,
    master: Option<Arc<OwnedFd>>,
}

impl ExecControl {
    /// Sets the terminal size (TIOCSWINSZ on the pty master); the kernel sends SIGWINCH to
    /// the foreground process group.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), ExecError> {
        let master = self.master.as_ref().ok_or(ExecError::NoTty)?;
        set_winsize(master.as_fd(), cols, rows).map_err(ExecError::Resize)
    }

    /// Sends `sig` to the helper, which forwards it to the command (SIGKILL kills the helper,
    /// and the command with it). A helper that already exited is not an error.
    pub fn signal(&self, sig: i32) -> Result<(), ExecError> {
        if !(1..=64).contains(&sig) {
            return Err(ExecError::InvalidRequest(format!(
                "bad signal number {sig}"
            )));
        }
        match sys::pidfd_signal(self.pidfd.as_fd(), sig) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(ExecError::Signal(e)),
        }
    }
}

fn set_winsize(fd: std::os::fd::BorrowedFd<'_>, cols: u16, rows: u16) -> std::io::Result<()> {
    let ws = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(fd, ws)?)
}

fn validate(req: &ExecRequest) -> Result<(), ExecError> {
    let bad = |m: String| Err(ExecError::InvalidRequest(m));
    if req.init_pid <= 0 {
        return bad(format!("bad init pid {}", req.init_pid));
    }
    match req.command.first() {
        None => return bad("empty command".to_string()),
        Some(c) if c.is_empty() => return bad("empty command name".to_string()),
        _ => {}
    }
    if req.command.iter().any(|a| a.contains('\0')) {
        return bad("command contains a NUL byte".to_string());
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return bad(format!("bad environment variable {k:?}"));
        }
    }
    if let Some(cwd) = &req.cwd
        && (!cwd.starts_with('/') || cwd.contains('\0'))
    {
        return bad(format!("working directory {cwd:?} is not an absolute path"));
    }
    if let Some((cols, rows)) = req.tty
        && (cols == 0 || rows == 0)
    {
        return bad(format!("bad terminal size {cols}x{rows}"));
    }
    Ok(())
}

/// A pty master and its slave. With `instance` (init's pid and the host ids of the instance's
/// root), the pty comes from the instance's own devpts, owned by its root: inside, the command's
/// terminal is a real `/dev/pts/N` (`tty`, `ttyname`, `sudo`, `screen` work). Without it, or
/// when the instance has no devpts, it comes from the host's.
fn open_pty(
    instance: Option<(i32, Option<(u32, u32)>)>,
    cols: u16,
    rows: u16,
) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::OpenptFlags;
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let from_instance = match instance {
        Some((pid, owner)) => open_instance_ptmx(pid, owner).ok(),
        None => None,
    };
    let master = match from_instance {
        Some(m) => m,
        None => rustix::pty::openpt(flags)?,
    };
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    // The peer of this master, opened through the master itself: no path lookup, so it is the
    // right pty whichever devpts it lives in.
    let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
    set_winsize(master.as_fd(), cols, rows)?;
    rustix::io::ioctl_fionbio(&master, true)?;
    Ok((master, slave))
}

/// Opens `/dev/ptmx` of the instance whose init is `pid`. devpts gives a new pty the opener's
/// file-system ids, so the open runs with the instance root's host ids (`owner`; `None` for a
/// privileged instance, whose root is host root). File-system ids are per thread: this runs on
/// a thread of its own and restores them before it ends.
fn open_instance_ptmx(pid: i32, owner: Option<(u32, u32)>) -> std::io::Result<OwnedFd> {
    let dev = rustix::fs::open(
        format!("/proc/{pid}/root/dev"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let saved = owner.map(|(uid, gid)| {
                    (
                        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid)),
                        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid)),
                    )
                });
                let master = rustix::fs::openat(
                    &dev,
                    "ptmx",
                    OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
                    Mode::empty(),
                );
                if let Some((gid, uid)) = saved {
                    nix::unistd::setfsuid(uid);
                    nix::unistd::setfsgid(gid);
                }
                master.map_err(std::io::Error::from)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the pty thread panicked")))
    })
}

impl ExecSession {
    /// Starts the command; returns once it runs in the instance (or failed to be found,
    /// which shows as exit code 127/126), or with [`ExecError::Setup`] when entering the
    /// instance failed.
    pub async fn spawn(req: ExecRequest) -> Result<ExecSession, ExecError> {
        validate(&req)?;
        let mut cmd = tokio::process::Command::new(&req.helper_exe);
        cmd.arg("__exec").arg("--pid").arg(req.init_pid.to_string());
        if let Some(start) = crate::runtime::proc_start_time(req.init_pid) {
            cmd.arg("--start").arg(start.to_string());
        }
        cmd.arg("--uid")
            .arg(req.uid.to_string())
            .arg("--gid")
            .arg(req.gid.to_string());
        if let Some(cwd) = &req.cwd {
            cmd.arg("--cwd").arg(cwd);
        }
        for (k, v) in &req.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        if req.tty.is_some() {
            cmd.arg("--tty");
        }
        cmd.env_clear().kill_on_drop(true);

        let mut master = None;
        if let Some((cols, rows)) = req.tty {
            let (m, slave) = open_pty(Some((req.init_pid, req.pty_owner)), cols, rows)
                .map_err(ExecError::Pty)?;
            let s1 = slave.try_clone().map_err(ExecError::Pty)?;
            let s2 = slave.try_clone().map_err(ExecError::Pty)?;
            cmd.stdin(Stdio::from(slave))
                .stdout(Stdio::from(s1))
                .stderr(Stdio::from(s2));
            master = Some(m);
        } else {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }

        let (status_rx, status_tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ExecError::Spawn {
                exe: req.helper_exe.clone(),
                source: e.into(),
            })?;
        let status_fd =
            sys::attach_status_fd(&mut cmd, status_tx).map_err(|e| ExecError::Spawn {
                exe: req.helper_exe.clone(),
                source: e,
            })?;
        cmd.arg("--status-fd").arg(status_fd.to_string());
        // The engine moves the helper into the instance's cgroups itself while the helper
        // starts (exec, dynamic linking, opening the namespaces), and then says so on the
        // ready pipe, which the helper waits for before it enters the namespaces. The first
        // move into a cgroup v1 hierarchy waits for an RCU grace period (several ms on this
        // kind of host): that wait now overlaps the helper's start instead of following it.
        let ready_tx = if req.cgroup_procs.is_empty() {
            None
        } else {
            let (ready_rx, ready_tx) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ExecError::Spawn {
                    exe: req.helper_exe.clone(),
                    source: e.into(),
                })?;
            let ready_fd =
                sys::attach_status_fd(&mut cmd, ready_rx).map_err(|e| ExecError::Spawn {
                    exe: req.helper_exe.clone(),
                    source: e,
                })?;
            cmd.arg("--ready-fd").arg(ready_fd.to_string());
            Some(ready_tx)
        };
        cmd.arg("--").args(&req.command);
        let spawned = cmd.spawn();
        // Drop our copies of the pty slave and the status pipe's write end now, so that EOF
        // and EIO come when the helper side closes them.
        drop(cmd);
        let mut child = spawned.map_err(|e| ExecError::Spawn {
            exe: req.helper_exe.clone(),
            source: e,
        })?;
        let helper_pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let pidfd = sys::pidfd_open(helper_pid).map_err(|e| ExecError::Spawn {
            exe: req.helper_exe.clone(),
            source: e,
        })?;

        if let Some(ready_tx) = ready_tx {
            let procs = req.cgroup_procs.clone();
            let moved = tokio::task::spawn_blocking(move || move_to_cgroups(helper_pid, &procs))
                .await
                .unwrap_or_else(|e| Err(format!("the cgroup task failed: {e}")))
                .and_then(|()| {
                    std::fs::File::from(ready_tx)
                        .write_all(READY)
                        .map_err(|e| format!("cannot tell the exec helper to go on: {e}"))
                });
            if let Err(e) = moved {
                let _ = child.start_kill();
                let _ = child.wait().await;
                // A helper that failed on its own (say, the instance stopped) said why on the
                // status pipe: that reason beats the broken ready pipe it left behind.
                let told = match read_status(status_rx).await {
                    Ok(bytes) if !bytes.is_empty() => {
                        let msg = String::from_utf8_lossy(&bytes);
                        msg.strip_prefix('E').unwrap_or(&msg).trim().to_string()
                    }
                    _ => e,
                };
                return Err(ExecError::Setup(told));
            }
        }
        let setup = read_status(status_rx).await;
        let setup = match setup {
            Ok(bytes) if bytes.is_empty() => Ok(()),
            Ok(bytes) => {
                let msg = String::from_utf8_lossy(&bytes);
                Err(ExecError::Setup(
                    msg.strip_prefix('E').unwrap_or(&msg).trim().to_string(),
                ))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = setup {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        tracing::debug!(
            init_pid = req.init_pid,
            helper_pid,
            tty = req.tty.is_some(),
            "exec started"
        );

        let mut drains = Vec::new();
        let (stdin, stdout, stderr, master) = match master {
            Some(m) => {
                let input = m.try_clone().map_err(ExecError::Pty)?;
                let output = m.try_clone().map_err(ExecError::Pty)?;
                let stdin = ExecStdin {
                    inner: StdinInner::Pty {
                        fd: sys::async_fd(input).map_err(ExecError::Pty)?,
                        eof_sent: false,
                    },
                };
                let (out, drain) = ExecOutput::new(OutputInner::Pty(
                    sys::async_fd(output).map_err(ExecError::Pty)?,
                ));
                drains.push(drain);
                (Some(stdin), Some(out), None, Some(Arc::new(m)))
            }
            None => {
                let stdin = child.stdin.take().map(|s| ExecStdin {
                    inner: StdinInner::Pipe(s),
                });
                let stdout = child.stdout.take().map(|s| {
                    let (o, d) = ExecOutput::new(OutputInner::Stdout(s));
                    drains.push(d);
                    o
                });
                let stderr = child.stderr.take().map(|s| {
                    let (o, d) = ExecOutput::new(OutputInner::Stderr(s));
                    drains.push(d);
                    o
                });
                (stdin, stdout, stderr, None)
            }
        };
        Ok(ExecSession {
            child,
            control: ExecControl {
                pidfd: Arc::new(pidfd),
                master,
            },
            stdin,
            stdout,
            stderr,
            drains,
        })
    }

    /// The command's input. Dropping it closes stdin (with a tty: sends ^D, the terminal's
    /// end-of-file). Take it and drop it at once when there is no input to give.
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// The command's output (with a tty: everything written to the terminal).
    pub fn take_stdout(&mut self) -> Option<ExecOutput> {
        self.stdout.take()
    }

    /// The command's error output; `None` with a tty (it goes to the terminal).
    pub fn take_stderr(&mut self) -> Option<ExecOutput> {
        self.stderr.take()
    }

    /// A handle for resizing and signalling while [`ExecSession::wait`] runs elsewhere.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// Sets the terminal size (tty sessions only).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), ExecError> {
        self.control.resize(cols, rows)
    }

    /// Sends a signal to the command (through the helper).
    pub fn signal(&self, sig: i32) -> Result<(), ExecError> {
        self.control.signal(sig)
    }

    /// Waits for the command to end and returns its exit code (128 + N when killed by signal
    /// N). It returns only after the taken output streams reached their end (or, when
    /// background processes keep them open, [`DRAIN_GRACE`] after the exit; from then on the
    /// streams end as soon as no more data is buffered), so all output can be sent before the
    /// exit code.
    pub async fn wait(mut self) -> Result<i32, ExecError> {
        drop(self.stdout.take());
        drop(self.stderr.take());
        let status = self.child.wait().await.map_err(ExecError::Wait)?;
        let code = match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 128,
        };
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        for drain in &self.drains {
            let mut rx = drain.done.subscribe();
            let done = tokio::time::timeout_at(deadline, rx.wait_for(|d| *d)).await;
            if done.is_err() {
                break;
            }
        }
        for drain in &self.drains {
            drain.force_eof.store(true, Ordering::SeqCst);
            drain.waker.wake();
        }
        Ok(code)
    }
}

/// What the engine writes on the ready pipe once the helper is in the instance's cgroups.
const READY: &[u8] = b"G";

/// Writes `pid` (the engine's own child, not yet reaped, so the pid cannot be reused) into
/// each `cgroup.procs` file.
fn move_to_cgroups(pid: i32, procs_files: &[PathBuf]) -> Result<(), String> {
    let pid = u32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| "the exec helper has no pid".to_string())?;
    sys::move_to_cgroups(pid, procs_files).map_err(|e| e.to_string())
}

/// In the helper: waits until the engine says (on the ready pipe `fd`) that it moved the
/// helper into the instance's cgroups.
fn wait_ready(fd: i32) -> Result<(), String> {
    let mut ready =
        sys::take_status_fd(fd).ok_or_else(|| format!("the ready pipe {fd} is not open"))?;
    let mut byte = [0u8; 1];
    loop {
        match ready.read(&mut byte) {
            Ok(1) if byte == READY => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(_) => {
                return Err("the agent did not move the helper into the instance's cgroups".into());
            }
            Err(e) => return Err(format!("cannot read the ready pipe: {e}")),
        }
    }
}

async fn read_status(fd: OwnedFd) -> Result<Vec<u8>, ExecError> {
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
        .map_err(|e| ExecError::Setup(format!("status pipe: {e}")))?;
    let mut buf = Vec::new();
    let mut limited = rx.take(64 * 1024);
    match tokio::time::timeout(SETUP_TIMEOUT, limited.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => Ok(buf),
        Ok(Err(e)) => Err(ExecError::Setup(format!("status pipe: {e}"))),
        Err(_) => Err(ExecError::Setup(format!(
            "the helper did not start the command within {}s",
            SETUP_TIMEOUT.as_secs()
        ))),
    }
}

/// Shared between an output stream and its session: whether the reader reached the end, and
/// the session's request to end the stream after the grace period.
struct Drain {
    done: watch::Sender<bool>,
    force_eof: AtomicBool,
    waker: AtomicWaker,
}

enum OutputInner {
    Stdout(tokio::process::ChildStdout),
    Stderr(tokio::process::ChildStderr),
    Pty(AsyncFd<OwnedFd>),
}

/// An output stream of an exec (stdout or stderr pipe, or the pty master).
pub struct ExecOutput {
    inner: OutputInner,
    drain: Arc<Drain>,
}

impl ExecOutput {
    fn new(inner: OutputInner) -> (Self, Arc<Drain>) {
        let drain = Arc::new(Drain {
            done: watch::Sender::new(false),
            force_eof: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        (
            ExecOutput {
                inner,
                drain: drain.clone(),
            },
            drain,
        )
    }

    fn finished(&self) -> Poll<std::io::Result<()>> {
        self.drain.done.send_replace(true);
        Poll::Ready(Ok(()))
    }
}

impl Drop for ExecOutput {
    fn drop(&mut self) {
        self.drain.done.send_replace(true);
    }
}

fn poll_read_pty(
    fd: &AsyncFd<OwnedFd>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<std::io::Result<()>> {
    loop {
        let mut guard = ready!(fd.poll_read_ready(cx))?;
        let unfilled = buf.initialize_unfilled();
        match guard.try_io(|inner| {
            rustix::io::read(inner.get_ref(), &mut *unfilled).map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            // EIO: every slave fd is closed (the command and the helper ended): end of file.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            Err(_would_block) => continue,
        }
    }
}

impl AsyncRead for ExecOutput {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.drain.waker.register(cx.waker());
        let before = buf.filled().len();
        let res = match &mut this.inner {
            OutputInner::Stdout(s) => Pin::new(s).poll_read(cx, buf),
            OutputInner::Stderr(s) => Pin::new(s).poll_read(cx, buf),
            OutputInner::Pty(fd) => poll_read_pty(fd, cx, buf),
        };
        match res {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.finished()
            }
            Poll::Pending if this.drain.force_eof.load(Ordering::SeqCst) => this.finished(),
            other => other,
        }
    }
}

enum StdinInner {
    Pipe(tokio::process::ChildStdin),
    Pty {
        fd: AsyncFd<OwnedFd>,
        eof_sent: bool,
    },
}

/// The input of an exec (a pipe, or the pty master).
pub struct ExecStdin {
    inner: StdinInner,
}

const EOT: u8 = 0x04;

fn poll_write_pty(
    fd: &AsyncFd<OwnedFd>,
    cx: &mut Context<'_>,
    data: &[u8],
) -> Poll<std::io::Result<usize>> {
    loop {
        let mut guard = ready!(fd.poll_write_ready(cx))?;
        match guard.try_io(|inner| rustix::io::write(inner.get_ref(), data).map_err(Into::into)) {
            Ok(res) => return Poll::Ready(res),
            Err(_would_block) => continue,
        }
    }
}

impl AsyncWrite for ExecStdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().inner {
            StdinInner::Pipe(p) => Pin::new(p).poll_write(cx, data),
            StdinInner::Pty { fd, .. } => poll_write_pty(fd, cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            StdinInner::Pipe(p) => Pin::new(p).poll_flush(cx),
            StdinInner::Pty { .. } => Poll::Ready(Ok(())),
        }
    }

    /// With a pipe: closes it. With a tty: sends ^D (end of file for a reader in canonical
    /// mode at the start of a line).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().inner {
            StdinInner::Pipe(p) => Pin::new(p).poll_shutdown(cx),
            StdinInner::Pty { fd, eof_sent } => {
                if !*eof_sent {
                    ready!(poll_write_pty(fd, cx, &[EOT]))?;
                    *eof_sent = true;
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        if let StdinInner::Pty { fd, eof_sent } = &self.inner
            && !*eof_sent
        {
            // Best effort: the master is non-blocking, so this never stalls.
            let _ = rustix::io::write(fd.get_ref(), &[EOT]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The helper process.

/// Parsed `__exec` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HelperArgs {
    pid: i32,
    /// Start time of the process at `pid` when the engine chose it: checked again once the
    /// namespaces are open, so a pid reused in between is never entered.
    start: Option<u64>,
    uid: u32,
    gid: u32,
    cwd: Option<String>,
    env: Vec<(String, String)>,
    tty: bool,
    status_fd: Option<i32>,
    /// The pipe to wait on before entering the namespaces (the engine moves the helper into
    /// the cgroups itself, then writes on it).
    ready_fd: Option<i32>,
    command: Vec<String>,
}

fn parse_helper_args(args: &[String]) -> Result<HelperArgs, String> {
    let mut parsed = HelperArgs {
        pid: 0,
        start: None,
        uid: 0,
        gid: 0,
        cwd: None,
        env: Vec::new(),
        tty: false,
        status_fd: None,
        ready_fd: None,
        command: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--" {
            parsed.command = it.cloned().collect();
            break;
        }
        if flag == "--tty" {
            parsed.tty = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--pid" => parsed.pid = value.parse().map_err(|_| bad())?,
            "--start" => parsed.start = Some(value.parse().map_err(|_| bad())?),
            "--uid" => parsed.uid = value.parse().map_err(|_| bad())?,
            "--gid" => parsed.gid = value.parse().map_err(|_| bad())?,
            "--cwd" => parsed.cwd = Some(value.clone()),
            "--env" => {
                let (k, v) = value.split_once('=').ok_or_else(bad)?;
                if k.is_empty() {
                    return Err(bad());
                }
                parsed.env.push((k.to_string(), v.to_string()));
            }
            "--status-fd" => parsed.status_fd = Some(value.parse().map_err(|_| bad())?),
            "--ready-fd" => parsed.ready_fd = Some(value.parse().map_err(|_| bad())?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if parsed.pid <= 0 {
        return Err("--pid is required".to_string());
    }
    if parsed.command.is_empty() || parsed.command[0].is_empty() {
        return Err("no command given".to_string());
    }
    Ok(parsed)
}

/// A user's entry in the instance's `/etc/passwd`.
struct PasswdEntry {
    name: String,
    home: String,
}

fn lookup_passwd(contents: &str, uid: u32) -> Option<PasswdEntry> {
    contents.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[2].parse::<u32>().ok()? != uid {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0].to_string(),
            home: fields[5].to_string(),
        })
    })
}

/// Reads the instance's `/etc/passwd` (empty when it is missing or not a regular file: the
/// instance controls it, so a FIFO must not block the exec, nor a huge file exhaust memory).
fn read_passwd() -> String {
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open("/etc/passwd")
    else {
        return text;
    };
    if file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        let _ = file.take(4 << 20).read_to_string(&mut text);
    }
    text
}

/// The command's environment: defaults, overridden by the requested variables.
fn build_env(args: &HelperArgs, pw: Option<&PasswdEntry>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert("LANG".to_string(), "C.UTF-8".to_string());
    let home = match pw {
        Some(p) if !p.home.is_empty() => p.home.clone(),
        _ if args.uid == 0 => "/root".to_string(),
        _ => "/".to_string(),
    };
    env.insert("HOME".to_string(), home);
    if let Some(p) = pw {
        env.insert("USER".to_string(), p.name.clone());
    }
    if args.tty {
        env.insert("TERM".to_string(), DEFAULT_TERM.to_string());
    }
    for (k, v) in &args.env {
        env.insert(k.clone(), v.clone());
    }
    env
}

/// Entry of the `berth-agent __exec` helper. `args` are the arguments after `__exec` (a
/// leading program name and `__exec` are skipped when present). Returns the exit code: the
/// command's, 128 + N when it was killed by signal N, 125 when the helper failed.
/// Must run single-threaded (call it from `main` before any runtime starts).
pub fn helper_main(args: &[String]) -> i32 {
    let args = match args.iter().position(|a| a == "__exec") {
        Some(i) if i <= 1 => &args[i + 1..],
        _ => args,
    };
    let parsed = match parse_helper_args(args) {
        Ok(p) => p,
        Err(e) => {
            // Still report on the status pipe when its number can be found.
            let fd = args
                .iter()
                .position(|a| a == "--status-fd")
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse().ok());
            let mut status = fd.and_then(sys::take_status_fd);
            return fail(&mut status, &format!("bad arguments: {e}"));
        }
    };
    let mut status = parsed.status_fd.and_then(sys::take_status_fd);
    let ns = match sys::NamespaceFds::open(parsed.pid, sys::EXEC_NAMESPACES) {
        Ok(ns) => ns,
        Err(e) => return fail(&mut status, &e.to_string()),
    };
    if parsed.start.is_some() && crate::runtime::proc_start_time(parsed.pid) != parsed.start {
        return fail(&mut status, "the instance stopped");
    }
    if let Some(fd) = parsed.ready_fd
        && let Err(e) = wait_ready(fd)
    {
        return fail(&mut status, &e);
    }
    if let Err(e) = ns.join() {
        return fail(&mut status, &e.to_string());
    }
    drop(ns);
    let signals = sys::forwarding_sigset();
    if let Err(e) = signals.thread_block() {
        return fail(&mut status, &format!("cannot block signals: {e}"));
    }
    let helper_pid = std::process::id();
    match sys::fork_process() {
        Err(e) => fail(&mut status, &e.to_string()),
        Ok(sys::Forked::Child) => child_main(&parsed, &mut status, helper_pid),
        Ok(sys::Forked::Parent(child)) => {
            drop(status);
            forward_until_exit(child, &signals)
        }
    }
}

/// Reports a setup failure on the status pipe (and stderr) and returns the helper's code.
fn fail(status: &mut Option<std::fs::File>, msg: &str) -> i32 {
    if let Some(f) = status.as_mut() {
        let _ = f.write_all(format!("E{msg}").as_bytes());
    }
    eprintln!("berth: exec: {msg}");
    EXIT_SETUP_FAILED
}

fn forward_until_exit(child: nix::unistd::Pid, signals: &SigSet) -> i32 {
    loop {
        let sig = match signals.wait() {
            Ok(sig) => sig,
            Err(_) => continue,
        };
        if sig != Signal::SIGCHLD {
            let _ = nix::sys::signal::kill(child, sig);
            continue;
        }
        loop {
            match nix::sys::wait::waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return code,
                Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return EXIT_SETUP_FAILED,
            }
        }
    }
}

/// The forked child: set up the process and exec the command. Never returns on success.
fn child_main(args: &HelperArgs, status: &mut Option<std::fs::File>, helper_pid: u32) -> i32 {
    if let Err(e) = SigSet::empty().thread_set_mask() {
        return fail(status, &format!("cannot unblock signals: {e}"));
    }
    if let Err(e) = sys::reset_signal_dispositions() {
        return fail(status, &e.to_string());
    }
    if args.tty {
        if let Err(e) = nix::unistd::setsid() {
            return fail(status, &format!("cannot create a session: {e}"));
        }
        if let Err(e) = sys::set_controlling_tty(std::io::stdin()) {
            return fail(status, &e.to_string());
        }
    }
    if let Err(e) = sys::apply_instance_restrictions() {
        return fail(status, &e.to_string());
    }
    let pw = lookup_passwd(&read_passwd(), args.uid);
    let env = build_env(args, pw.as_ref());
    if let Err(e) = sys::set_ids(args.uid, args.gid) {
        return fail(status, &e.to_string());
    }
    match &args.cwd {
        Some(cwd) => {
            if let Err(e) = nix::unistd::chdir(cwd.as_str()) {
                return fail(status, &format!("cannot change directory to {cwd}: {e}"));
            }
        }
        None => {
            let home = env.get("HOME").map(String::as_str).unwrap_or("/");
            if nix::unistd::chdir(home).is_err() {
                let _ = nix::unistd::chdir("/");
            }
        }
    }
    // Die with the helper (its own death by SIGKILL must take the command along). Set after
    // the id change, which clears it.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return fail(status, &format!("cannot set the parent death signal: {e}"));
    }
    let ppid = nix::unistd::getppid().as_raw();
    if ppid != 0 && u32::try_from(ppid).ok() != Some(helper_pid) {
        return fail(status, "the exec helper exited");
    }
    exec_command(&args.command, &env)
}

/// execve's the command, searching `PATH` of `env` like a shell; returns 127 when it was not
/// found and 126 when it could not be executed (with a message on stderr).
fn exec_command(command: &[String], env: &BTreeMap<String, String>) -> i32 {
    let to_c = |s: &str| CString::new(s).ok();
    let Some(argv) = command.iter().map(|a| to_c(a)).collect::<Option<Vec<_>>>() else {
        eprintln!("berth: exec: argument contains a NUL byte");
        return EXIT_CANNOT_EXECUTE;
    };
    let Some(envp) = env
        .iter()
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect::<Option<Vec<_>>>()
    else {
        eprintln!("berth: exec: environment contains a NUL byte");
        return EXIT_CANNOT_EXECUTE;
    };
    let name = &command[0];
    let candidates: Vec<String> = if name.contains('/') {
        vec![name.clone()]
    } else {
        env.get("PATH")
            .map(String::as_str)
            .unwrap_or(DEFAULT_PATH)
            .split(':')
            .map(|dir| {
                let dir = if dir.is_empty() { "." } else { dir };
                format!("{}/{name}", dir.trim_end_matches('/'))
            })
            .collect()
    };
    let mut denied: Option<nix::errno::Errno> = None;
    for candidate in &candidates {
        let Some(path) = to_c(candidate) else {
            continue;
        };
        let Err(err) = nix::unistd::execve(&path, &argv, &envp);
        match err {
            nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR => {}
            other => {
                if denied.is_none() {
                    denied = Some(other);
                }
            }
        }
    }
    match denied {
        None => {
            eprintln!("berth: exec: {name}: command not found");
            EXIT_NOT_FOUND
        }
        Some(e) => {
            eprintln!("berth: exec: {name}: cannot execute: {}", e.desc());
            EXIT_CANNOT_EXECUTE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_helper_arguments() {
        let a = parse_helper_args(&strings(&[
            "--pid",
            "42",
            "--uid",
            "1000",
            "--gid",
            "100",
            "--cwd",
            "/tmp",
            "--env",
            "A=b=c",
            "--tty",
            "--status-fd",
            "9",
            "--",
            "sh",
            "-c",
            "echo --pid",
        ]))
        .unwrap();
        assert_eq!(a.pid, 42);
        assert_eq!((a.uid, a.gid), (1000, 100));
        assert_eq!(a.cwd.as_deref(), Some("/tmp"));
        assert_eq!(a.env, vec![("A".to_string(), "b=c".to_string())]);
        assert!(a.tty);
        assert!(
            parse_helper_args(&strings(&["--pid", "1", "--cgroup", "/x", "--", "ls"])).is_err()
        );
        assert_eq!(a.status_fd, Some(9));
        assert_eq!(a.command, strings(&["sh", "-c", "echo --pid"]));
        assert!(parse_helper_args(&strings(&["--pid", "1"])).is_err());
        assert!(parse_helper_args(&strings(&["--uid", "0", "--", "ls"])).is_err());
        assert!(parse_helper_args(&strings(&["--pid", "1", "--env", "=x", "--", "ls"])).is_err());
        assert!(parse_helper_args(&strings(&["--pid", "x", "--", "ls"])).is_err());
    }

    #[test]
    fn environment_defaults_and_overrides() {
        let pw = lookup_passwd(
            "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\nbroken\n",
            1000,
        );
        assert_eq!(pw.as_ref().map(|p| p.home.as_str()), Some("/home/bob"));
        let mut args = parse_helper_args(&strings(&[
            "--pid", "1", "--uid", "1000", "--env", "PATH=/x", "--", "ls",
        ]))
        .unwrap();
        let env = build_env(&args, pw.as_ref());
        assert_eq!(env["PATH"], "/x");
        assert_eq!(env["HOME"], "/home/bob");
        assert_eq!(env["USER"], "bob");
        assert_eq!(env["LANG"], "C.UTF-8");
        assert!(!env.contains_key("TERM"));
        args.tty = true;
        args.uid = 0;
        let env = build_env(&args, None);
        assert_eq!(env["HOME"], "/root");
        assert_eq!(env["TERM"], DEFAULT_TERM);
    }

    #[test]
    fn request_validation() {
        let ok = ExecRequest {
            init_pid: 1,
            cgroup_procs: vec![],
            command: strings(&["ls"]),
            env: BTreeMap::new(),
            cwd: None,
            uid: 0,
            gid: 0,
            tty: None,
            pty_owner: None,
            helper_exe: PathBuf::from("/proc/self/exe"),
        };
        assert!(validate(&ok).is_ok());
        let mut r = ok.clone();
        r.command.clear();
        assert!(validate(&r).is_err());
        let mut r = ok.clone();
        r.env.insert("A=B".into(), "x".into());
        assert!(validate(&r).is_err());
        let mut r = ok.clone();
        r.cwd = Some("rel".into());
        assert!(validate(&r).is_err());
        let mut r = ok.clone();
        r.tty = Some((0, 24));
        assert!(validate(&r).is_err());
        let mut r = ok;
        r.init_pid = 0;
        assert!(validate(&r).is_err());
    }
}
