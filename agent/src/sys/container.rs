//! The container's first process: what it does between `clone` and `execve("/sbin/init")`,
//! and the message channel between it and the monitor.
//!
//! Protocol over a SOCK_SEQPACKET pair (one message per packet):
//! 1. monitor → child `ids`: uid/gid maps written, cgroups joined.
//! 2. child → monitor `netns`: the child has its own network namespace; monitor configures it,
//!    then monitor → child `net`.
//! 3. child → monitor `console` + the console pty master (SCM_RIGHTS).
//! 4. child → monitor `ready`: mounts done, root pivoted; monitor → child `exec`.
//!
//! On failure the child sends `error: <message>` and exits 1.

use std::ffi::CString;
use std::io;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use seccompiler::BpfProgram;

use super::mount;

/// One end of the monitor/child channel.
#[derive(Debug)]
pub struct Channel(OwnedFd);

impl Channel {
    /// A connected pair (close-on-exec).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        Ok((Channel(a), Channel(b)))
    }

    /// Sends one message.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        let iov = [IoSlice::new(msg)];
        sendmsg::<()>(self.0.as_raw_fd(), &iov, &[], MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
        Ok(())
    }

    /// Sends one message carrying `fd`.
    pub fn send_fd(&self, msg: &[u8], fd: RawFd) -> io::Result<()> {
        let iov = [IoSlice::new(msg)];
        let fds = [fd];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(self.0.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
        Ok(())
    }

    /// Receives one message and any fd passed with it. An empty message means the peer closed.
    pub fn recv(&self) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
        let mut buf = vec![0u8; 4096];
        let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
        let (len, fd) = loop {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fd = None;
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(fds) = c {
                                for f in fds {
                                    // SAFETY: the kernel just installed this fd for us; nobody
                                    // else owns it.
                                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                                    if fd.is_none() {
                                        fd = Some(owned);
                                    }
                                }
                            }
                        }
                    }
                    break (msg.bytes, fd);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        buf.truncate(len);
        Ok((buf, fd))
    }

    /// Receives one message and checks it equals `want`; `error: ..` messages become errors.
    pub fn expect(&self, want: &str) -> io::Result<Option<OwnedFd>> {
        let (msg, fd) = self.recv()?;
        if msg == want.as_bytes() {
            return Ok(fd);
        }
        let text = String::from_utf8_lossy(&msg).into_owned();
        if text.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("peer closed the channel while waiting for {want}"),
            ));
        }
        Err(io::Error::other(
            text.strip_prefix("error: ").unwrap_or(&text).to_string(),
        ))
    }
}

/// What the container's first process needs to prepare and exec init.
#[derive(Debug, Clone)]
pub struct ChildConfig {
    /// The root filesystem mount (staging path in the monitor's mount namespace).
    pub rootfs: PathBuf,
    pub hostname: String,
    /// Whether the child is in a new user namespace (unprivileged).
    pub userns: bool,
    /// Where lxcfs is mounted, if it runs.
    pub lxcfs_dir: Option<PathBuf>,
    /// A fresh random UUID for /proc/sys/kernel/random/boot_id.
    pub boot_id: String,
    /// Init's path inside the root filesystem.
    pub init: String,
    /// Init's whole environment.
    pub env: Vec<String>,
    /// Precompiled seccomp filters.
    pub seccomp: Vec<BpfProgram>,
}

/// Runs in the cloned child: never returns.
pub fn child_main(cfg: &ChildConfig, chan: &Channel) -> ! {
    match child_setup(cfg, chan) {
        Ok(never) => match never {},
        Err(e) => {
            let _ = chan.send(format!("error: {e}").as_bytes());
            super::process::exit_now(1);
        }
    }
}

fn step<T>(what: &str, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn nixr<T>(r: nix::Result<T>) -> io::Result<T> {
    r.map_err(io::Error::from)
}

enum Never {}

fn child_setup(cfg: &ChildConfig, chan: &Channel) -> io::Result<Never> {
    super::process::set_parent_death_signal(libc::SIGKILL)?;
    step("waiting for id maps", chan.expect("ids"))?;
    if cfg.userns {
        let root = nix::unistd::Gid::from_raw(0);
        step("setgroups", nixr(nix::unistd::setgroups(&[])))?;
        step("setresgid", nixr(nix::unistd::setresgid(root, root, root)))?;
        let uroot = nix::unistd::Uid::from_raw(0);
        step(
            "setresuid",
            nixr(nix::unistd::setresuid(uroot, uroot, uroot)),
        )?;
    }
    step(
        "unshare network namespace",
        nixr(nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)),
    )?;
    // Not fatal: the instance's own init usually brings lo up as well.
    let _ = loopback_up();
    chan.send(b"netns")?;
    step("waiting for network setup", chan.expect("net"))?;
    step(
        "unshare cgroup namespace",
        nixr(nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)),
    )?;
    setup_mounts(cfg, chan)?;
    step("sethostname", nixr(nix::unistd::sethostname(&cfg.hostname)))?;
    step("dropping capabilities", super::caps::drop_bounding_set())?;
    super::seccomp::install_programs(&cfg.seccomp).map_err(io::Error::other)?;
    chan.send(b"ready")?;
    step("waiting for the exec go-ahead", chan.expect("exec"))?;
    exec_init(cfg)
}

/// Brings `lo` up in the caller's network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills `ifr.ifr_ifru.ifru_flags` of a valid ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reading and writing the flags member of the union SIOCGIFFLAGS just filled.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn create_file(p: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .map(drop)
}

fn mkdir_p(p: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
}

fn setup_mounts(cfg: &ChildConfig, chan: &Channel) -> io::Result<()> {
    let root = &cfg.rootfs;
    step(
        "making / a slave",
        nixr(nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        )),
    )?;
    step("binding the root filesystem", mount::bind(root, root, true))?;

    // proc and sysfs: fresh instances owned by the new pid and net namespaces.
    let proc_dir = root.join("proc");
    mkdir_p(&proc_dir, 0o555)?;
    step(
        "mounting proc",
        mount::mount_fs(
            "proc",
            &proc_dir,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
    )?;
    let sys_dir = root.join("sys");
    mkdir_p(&sys_dir, 0o555)?;
    let mut sys_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !cfg.userns {
        // Privileged: container root is host root, so the kernel's knobs stay read-only.
        sys_flags |= MsFlags::MS_RDONLY;
    }
    step(
        "mounting sysfs",
        mount::mount_fs("sysfs", &sys_dir, sys_flags, None),
    )?;
    if !cfg.userns {
        for p in ["sys", "sysrq-trigger"] {
            let path = proc_dir.join(p);
            if !path.exists() {
                continue;
            }
            step(
                &format!("making /proc/{p} read-only"),
                mount::bind(&path, &path, false).and_then(|()| mount::remount_bind_readonly(&path)),
            )?;
        }
    }

    // /dev: a small tmpfs with bind-mounted host nodes (mknod is impossible in a user ns).
    let dev = root.join("dev");
    mkdir_p(&dev, 0o755)?;
    step(
        "mounting /dev",
        mount::mount_fs(
            "tmpfs",
            &dev,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=755,size=500000"),
        ),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let dst = dev.join(node);
        create_file(&dst)?;
        step(
            &format!("binding /dev/{node}"),
            mount::bind(&Path::new("/dev").join(node), &dst, false),
        )?;
    }
    for (node, dir) in [("fuse", None), ("tun", Some("net"))] {
        let host = match dir {
            Some(d) => Path::new("/dev").join(d).join(node),
            None => Path::new("/dev").join(node),
        };
        if !host.exists() {
            continue;
        }
        let dst = match dir {
            Some(d) => {
                mkdir_p(&dev.join(d), 0o755)?;
                dev.join(d).join(node)
            }
            None => dev.join(node),
        };
        // Optional: a failure here leaves the node out.
        if create_file(&dst).is_ok() && mount::bind(&host, &dst, false).is_err() {
            let _ = std::fs::remove_file(&dst);
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts, 0o755)?;
    step(
        "mounting devpts",
        mount::mount_fs(
            "devpts",
            &pts,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,gid=5,mode=620,ptmxmode=666,max=1024"),
        ),
    )?;
    let ptmx = dev.join("ptmx");
    create_file(&ptmx)?;
    step(
        "binding /dev/ptmx",
        mount::bind(&pts.join("ptmx"), &ptmx, false),
    )?;

    // Console: a pty of the container's own devpts; the monitor keeps the master.
    let master = step("opening the console pty", open_console(&pts))?;
    let n = step(
        "reading the console pty number",
        rustix::pty::ptsname(&master.0, Vec::new()).map_err(io::Error::from),
    )?;
    let n = n
        .to_string_lossy()
        .rsplit('/')
        .next()
        .unwrap_or("0")
        .to_string();
    let console = dev.join("console");
    create_file(&console)?;
    step(
        "binding /dev/console",
        mount::bind(&pts.join(&n), &console, false),
    )?;
    chan.send_fd(b"console", master.0.as_raw_fd())?;
    drop(master);

    // lxcfs views of /proc and /sys files.
    if let Some(lxcfs) = &cfg.lxcfs_dir {
        for f in [
            "cpuinfo",
            "diskstats",
            "loadavg",
            "meminfo",
            "slabinfo",
            "stat",
            "swaps",
            "uptime",
        ] {
            let src = lxcfs.join("proc").join(f);
            let dst = proc_dir.join(f);
            if src.exists() && dst.exists() {
                step(
                    &format!("binding lxcfs /proc/{f}"),
                    mount::bind(&src, &dst, false),
                )?;
            }
        }
        let src = lxcfs.join("sys/devices/system/cpu");
        let dst = sys_dir.join("devices/system/cpu");
        if src.is_dir() && dst.is_dir() {
            step("binding lxcfs cpu view", mount::bind(&src, &dst, true))?;
        }
    }

    // A fresh boot id.
    let boot_id_file = dev.join(".berth-boot-id");
    std::fs::write(&boot_id_file, format!("{}\n", cfg.boot_id))?;
    let boot_id = proc_dir.join("sys/kernel/random/boot_id");
    step(
        "binding boot_id",
        mount::bind(&boot_id_file, &boot_id, false),
    )?;
    step(
        "making boot_id read-only",
        mount::remount_bind_readonly(&boot_id),
    )?;

    step("pivot_root", mount::pivot_into(root))?;
    Ok(())
}

struct Master(OwnedFd);

fn open_console(pts: &Path) -> io::Result<Master> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(pts.join("ptmx"))?;
    let fd = OwnedFd::from(f);
    rustix::pty::unlockpt(&fd).map_err(io::Error::from)?;
    Ok(Master(fd))
}

fn exec_init(cfg: &ChildConfig) -> io::Result<Never> {
    super::process::reset_signals()?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for target in 0..3 {
        // SAFETY: dup2 onto the standard fds; `null` stays valid for the duration.
        if unsafe { libc::dup2(null.as_raw_fd(), target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    drop(null);
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on our own fds.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    let to_c = |s: &str| {
        CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
    };
    let path = to_c(&cfg.init)?;
    let argv = [path.clone()];
    let env = cfg
        .env
        .iter()
        .map(|e| to_c(e))
        .collect::<io::Result<Vec<_>>>()?;
    let Err(err) = nix::unistd::execve(&path, &argv, &env);
    Err(io::Error::new(
        io::Error::from(err).kind(),
        format!("exec {}: {err}", cfg.init),
    ))
}
