//! The two systems under test, driven through their command lines (`berth ...`, `lxc ...`):
//! running and timing commands with timeouts, listing and force-deleting the suite's
//! instances, importing Berth's images into LXD, and finding each system's daemons.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::host::{self, Mem, Proc};
use super::report::shorten;

/// Set when SIGINT or SIGTERM arrives: every wait gives up and the cleanup runs.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the run was interrupted.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Catches SIGINT and SIGTERM (on a thread of its own) so that an interrupted run still
/// deletes what it made; a second signal only repeats the message.
pub fn catch_interrupts() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal thread's runtime")?;
    let (mut int, mut term) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!(
                    "berth-bench: interrupted; deleting the bench-* instances before exiting"
                );
            }
        })
    });
    Ok(())
}

/// Which system a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Berth,
    Lxd,
}

impl Kind {
    /// "Berth" or "LXD".
    pub fn name(self) -> &'static str {
        match self {
            Kind::Berth => "Berth",
            Kind::Lxd => "LXD",
        }
    }

    /// "berth" or "lxd" (JSON keys).
    pub fn key(self) -> &'static str {
        match self {
            Kind::Berth => "berth",
            Kind::Lxd => "lxd",
        }
    }
}

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// One system under test and how to run its command line.
#[derive(Debug, Clone)]
pub struct Side {
    pub kind: Kind,
    /// The CLI binary (`berth` or `lxc`).
    pub bin: PathBuf,
    /// Extra environment for every command (`BERTH_REMOTE` from `--remote`).
    pub env: Vec<(OsString, OsString)>,
    /// The busybox image's name on this side (`busybox`, `berth-busybox`).
    pub busybox: String,
    /// The debian/12 image's name on this side (`debian/12`, `berth-debian12`).
    pub debian: String,
}

/// How long any one command may take before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Instances the suite makes are named with this prefix on both systems.
pub const PREFIX: &str = "bench-";

impl Side {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// The command line as text (for messages).
    pub fn show(&self, args: &[&str]) -> String {
        let prog = match self.kind {
            Kind::Berth => "berth",
            Kind::Lxd => "lxc",
        };
        format!("{prog} {}", args.join(" "))
    }

    /// Runs `args`, capturing stdout (when `capture`) and stderr; kills it after `timeout`, or
    /// at once when the run is interrupted (unless `cleanup`). The elapsed time is the
    /// wall-clock time from spawn to exit.
    pub fn run_with(
        &self,
        args: &[&str],
        timeout: Duration,
        capture: bool,
        cleanup: bool,
    ) -> Result<CmdOutput> {
        run_bounded(
            self.command(args),
            &self.show(args),
            timeout,
            capture,
            cleanup,
        )
    }

    /// Runs `args` and fails unless it exits 0; returns its output.
    pub fn ok(&self, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
        let out = self.run_with(args, timeout, true, false)?;
        if !out.status.success() {
            bail!("{}", failure(&self.show(args), &out));
        }
        Ok(out)
    }

    /// Times `args` (stdout discarded); fails unless it exits 0.
    pub fn timed(&self, args: &[&str]) -> Result<Duration> {
        let out = self.run_with(args, COMMAND_TIMEOUT, false, false)?;
        if !out.status.success() {
            bail!("{}", failure(&self.show(args), &out));
        }
        Ok(out.elapsed)
    }

    /// The names and states (upper case) of this side's instances whose names start with
    /// `prefix`.
    pub fn list_states(&self, prefix: &str, cleanup: bool) -> Result<Vec<(String, String)>> {
        let args = ["list", "--format", "csv", "-c", "ns"];
        let out = self.run_with(&args, COMMAND_TIMEOUT, true, cleanup)?;
        if !out.status.success() {
            bail!("{}", failure(&self.show(&args), &out));
        }
        Ok(parse_name_state_csv(&out.stdout)
            .into_iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .collect())
    }

    /// Force-deletes `names` (stopping running ones), `parallel` commands at a time, a few
    /// names per command; returns the errors.
    pub fn force_delete(&self, names: &[String], parallel: usize, cleanup: bool) -> Vec<String> {
        let chunks: Vec<Vec<String>> = names.chunks(10).map(<[String]>::to_vec).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let errors = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(chunk) = chunks.get(i) else { break };
                        let mut args = vec!["delete", "--force"];
                        args.extend(chunk.iter().map(String::as_str));
                        let res = self.run_with(&args, COMMAND_TIMEOUT, false, cleanup);
                        let err = match res {
                            Ok(o) if o.status.success() => None,
                            Ok(o) => Some(failure(&self.show(&args), &o)),
                            Err(e) => Some(e.to_string()),
                        };
                        if let Some(e) = err
                            && let Ok(mut v) = errors.lock()
                        {
                            v.push(e);
                        }
                    }
                });
            }
        });
        errors.into_inner().unwrap_or_default()
    }

    /// Deletes every instance named `bench-*` on this side (leftovers of this or an earlier,
    /// crashed run), then checks that none is left.
    pub fn sweep(&self) -> Result<usize> {
        let names: Vec<String> = self
            .list_states(PREFIX, true)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        if names.is_empty() {
            return Ok(0);
        }
        eprintln!(
            "{}: deleting {} bench-* instance(s)",
            self.kind.name(),
            names.len()
        );
        let mut errors = self.force_delete(&names, 4, true);
        let mut left = self.list_states(PREFIX, true)?;
        // A delete that failed half-way (or raced another) usually goes through again; an
        // instance whose interrupted start is still going on (LXD: "busy running a start
        // operation") can be deleted once that ends. One at a time, for up to a minute.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(2));
            let again: Vec<String> = left.iter().map(|(n, _)| n.clone()).collect();
            errors.extend(self.force_delete(&again, 1, true));
            left = self.list_states(PREFIX, true)?;
        }
        if !left.is_empty() {
            bail!(
                "{} bench-* instance(s) are left on {} after deleting them: {}",
                left.len(),
                self.kind.name(),
                errors
                    .first()
                    .map(|e| shorten(e, 200))
                    .unwrap_or_else(|| "no error was reported".into())
            );
        }
        Ok(names.len())
    }

    /// The image's fingerprint from `image info` (none when the image is missing).
    pub fn image_fingerprint(&self, image: &str) -> Option<String> {
        let out = self
            .run_with(
                &["image", "info", image],
                Duration::from_secs(60),
                true,
                false,
            )
            .ok()?;
        if !out.status.success() {
            return None;
        }
        fingerprint_line(&out.stdout)
    }

    /// The server's version as the CLI's `version` shows it.
    pub fn server_version(&self) -> String {
        self.run_with(&["version"], Duration::from_secs(30), true, false)
            .ok()
            .and_then(|o| {
                o.stdout.lines().find_map(|l| {
                    l.strip_prefix("Server version:")
                        .map(|v| v.trim().to_string())
                })
            })
            .unwrap_or_else(|| "unknown".into())
    }
}

/// Runs `cmd` (shown as `show` in messages), capturing stdout (when `capture`) and stderr;
/// kills it after `timeout`, or at once when the run is interrupted (unless `cleanup`). The
/// elapsed time is the wall-clock time from spawn to exit.
pub fn run_bounded(
    mut cmd: Command,
    show: &str,
    timeout: Duration,
    capture: bool,
    cleanup: bool,
) -> Result<CmdOutput> {
    cmd.stdin(Stdio::null())
        .stdout(if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot run {show}"))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        r.map(|mut s| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                buf
            })
        })
    };
    let out_reader = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_reader = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = started + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => bail!("cannot wait for {show}: {e}"),
        }
        let now = Instant::now();
        if now > deadline || (!cleanup && interrupted()) {
            let _ = child.kill();
            let _ = child.wait();
            if now > deadline {
                bail!("{show} timed out after {timeout:?}");
            }
            bail!("{show} was interrupted");
        }
        // Poll finely at first (short commands), then less often.
        std::thread::sleep(if now - started < Duration::from_secs(2) {
            Duration::from_micros(500)
        } else {
            Duration::from_millis(20)
        });
    };
    let elapsed = started.elapsed();
    let take = |r: Option<std::thread::JoinHandle<Vec<u8>>>| {
        r.and_then(|h| h.join().ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    Ok(CmdOutput {
        status,
        stdout: take(out_reader),
        stderr: take(err_reader),
        elapsed,
    })
}

/// "COMMAND failed (exit status 1): first line of stderr".
pub fn failure(cmd: &str, out: &CmdOutput) -> String {
    let text = if out.stderr.trim().is_empty() {
        out.stdout.trim()
    } else {
        out.stderr.trim()
    };
    format!("{cmd} failed ({}): {}", out.status, shorten(text, 300))
}

/// Parses `list --format csv -c ns` output (`name,STATE` per line) into (name, STATE).
pub fn parse_name_state_csv(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split(',');
            let name = it.next()?.trim();
            let state = it.next().unwrap_or("").trim();
            (!name.is_empty()).then(|| (name.to_string(), state.to_ascii_uppercase()))
        })
        .collect()
}

/// The hex fingerprint of an `image info` output's `Fingerprint:` line.
pub fn fingerprint_line(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Fingerprint:")
            .map(|f| f.trim().to_ascii_lowercase())
            .filter(|f| !f.is_empty())
    })
}

/// Finds `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Makes sure Berth has `image` (building it with `berth image build` when missing); returns
/// its fingerprint.
pub fn ensure_berth_image(berth: &Side, image: &str) -> Result<String> {
    if let Some(fp) = berth.image_fingerprint(image) {
        return Ok(fp);
    }
    eprintln!("Berth: building image {image}");
    berth.ok(&["image", "build", image], Duration::from_secs(1800))?;
    berth
        .image_fingerprint(image)
        .with_context(|| format!("berth image info {image} shows no fingerprint after the build"))
}

/// The LXD image property that records which Berth image an LXD image was exported from.
const ORIGIN_PROPERTY: &str = "berth.fingerprint";

/// Makes LXD's `alias` hold the very image Berth holds as `image`: exported from Berth (a
/// unified tarball) and imported into LXD, unless LXD has it already. LXD fingerprints the
/// tarball, which for an image Berth built differs from Berth's own fingerprint, so the
/// import records Berth's in the image property `berth.fingerprint`, which later runs check.
/// Returns LXD's fingerprint.
pub fn ensure_lxd_image(berth: &Side, lxd: &Side, image: &str, alias: &str) -> Result<String> {
    let fp = ensure_berth_image(berth, image)?;
    let t = Duration::from_secs(600);
    let origin = |lxd_image: &str| {
        lxd.run_with(
            &["image", "get-property", lxd_image, ORIGIN_PROPERTY],
            Duration::from_secs(60),
            true,
            false,
        )
        .ok()
        .filter(|o| o.status.success())
        .map(|o| o.stdout.trim().to_string())
    };
    if let Some(have) = lxd.image_fingerprint(alias) {
        if have == fp || origin(alias).as_deref() == Some(fp.as_str()) {
            return Ok(have);
        }
        // The alias points at another image: move it to ours.
        lxd.ok(&["image", "alias", "delete", alias], t)?;
    }
    eprintln!("LXD: importing Berth's {image} ({fp}) as {alias}");
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-image")
        .tempdir_in("/var/tmp")
        .context("cannot make a temporary directory in /var/tmp")?;
    let dir_s = dir.path().display().to_string();
    berth.ok(&["image", "export", image, &dir_s, "--quiet"], t)?;
    let file = std::fs::read_dir(dir.path())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_file())
        .with_context(|| format!("berth image export {image} wrote no file"))?;
    let file_s = file.display().to_string();
    let sum = run_bounded(
        {
            let mut c = Command::new("sha256sum");
            c.arg(&file);
            c
        },
        "sha256sum",
        t,
        true,
        false,
    )?;
    let lxd_fp = sum
        .stdout
        .split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("sha256sum printed nothing for {file_s}"))?;
    if lxd.image_fingerprint(&lxd_fp).is_some() {
        // LXD holds these very bytes already, under another alias or none.
        lxd.ok(&["image", "alias", "create", alias, &lxd_fp], t)?;
    } else {
        lxd.ok(&["image", "import", &file_s, "--alias", alias], t)?;
    }
    lxd.ok(&["image", "set-property", alias, ORIGIN_PROPERTY, &fp], t)?;
    match lxd.image_fingerprint(alias) {
        Some(got) if got == lxd_fp => Ok(got),
        Some(got) => {
            bail!("LXD gave the imported {image} the fingerprint {got}, not the tarball's {lxd_fp}")
        }
        None => bail!("LXD has no image {alias} after importing it"),
    }
}

/// The memory of each system's daemons and per-instance helpers.
#[derive(Debug, Clone, Default)]
pub struct DaemonMem {
    /// (label, memory) of each daemon (berthd, berth-agent; lxd, lxcfs).
    pub daemons: Vec<(String, Mem)>,
    /// The per-instance helpers of the suite's instances (`berth-agent __monitor`, `[lxc
    /// monitor]`), summed.
    pub monitors: Mem,
}

impl DaemonMem {
    /// As JSON (MiB).
    pub fn json(&self) -> serde_json::Value {
        let mut daemons = serde_json::Map::new();
        for (k, m) in &self.daemons {
            daemons.insert(k.clone(), m.json());
        }
        serde_json::json!({ "daemons": daemons, "monitors": self.monitors.json() })
    }
}

/// Whether a process is the monitor of one of the instances named `name_prefix*`.
fn monitor_of(kind: Kind, p: &Proc, name_prefix: &str) -> bool {
    match kind {
        // `berth-agent __monitor /var/lib/berth/agent/instances/NAME`
        Kind::Berth => {
            p.args.get(1).map(String::as_str) == Some("__monitor")
                && p.args.get(2).is_some_and(|d| {
                    Path::new(d)
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(name_prefix))
                })
        }
        // `[lxc monitor] /var/lib/lxd/containers NAME`
        Kind::Lxd => {
            let line = p.args.join(" ");
            line.starts_with("[lxc monitor]")
                && line
                    .split_whitespace()
                    .last()
                    .is_some_and(|n| n.starts_with(name_prefix))
        }
    }
}

/// Reads the memory of `kind`'s daemons and of the monitors of the instances named
/// `name_prefix*`. Berth's daemons are the quickstart's (pid files in /run/berth) when they
/// exist, else every `berthd` and non-monitor `berth-agent`.
pub fn daemon_mem(kind: Kind, name_prefix: &str) -> DaemonMem {
    let procs = host::processes();
    let mut out = DaemonMem::default();
    match kind {
        Kind::Berth => {
            for name in ["berthd", "berth-agent"] {
                let pid = host::pid_file(Path::new(&format!("/run/berth/{name}.pid")));
                let set: Vec<&Proc> = procs
                    .iter()
                    .filter(|p| match pid {
                        Some(pid) => p.pid == pid,
                        None => {
                            p.comm == name && p.args.get(1).map(String::as_str) != Some("__monitor")
                        }
                    })
                    .collect();
                out.daemons.push((name.to_string(), host::sum_mem(set)));
            }
        }
        Kind::Lxd => {
            let lxd: Vec<&Proc> = procs
                .iter()
                .filter(|p| {
                    p.comm == "lxd"
                        && !p.args.join(" ").starts_with("[lxc monitor]")
                        && !p.args.iter().any(|a| a.starts_with("fork"))
                })
                .collect();
            out.daemons.push(("lxd".into(), host::sum_mem(lxd)));
            let lxcfs: Vec<&Proc> = procs.iter().filter(|p| p.comm == "lxcfs").collect();
            out.daemons.push(("lxcfs".into(), host::sum_mem(lxcfs)));
        }
    }
    out.monitors = host::sum_mem(procs.iter().filter(|p| monitor_of(kind, p, name_prefix)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_states() {
        let text = "bench-a,RUNNING\ndemo1,Running\n\nbench-b,STOPPED,extra\n";
        assert_eq!(
            parse_name_state_csv(text),
            vec![
                ("bench-a".to_string(), "RUNNING".to_string()),
                ("demo1".to_string(), "RUNNING".to_string()),
                ("bench-b".to_string(), "STOPPED".to_string()),
            ]
        );
    }

    #[test]
    fn fingerprints() {
        assert_eq!(
            fingerprint_line("Fingerprint: ABC123\nSize: 2MiB\n"),
            Some("abc123".to_string())
        );
        assert_eq!(fingerprint_line("Size: 2MiB\n"), None);
    }

    #[test]
    fn monitors() {
        let p = |args: &[&str]| Proc {
            pid: 1,
            comm: "x".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        assert!(monitor_of(
            Kind::Berth,
            &p(&[
                "/usr/local/bin/berth-agent",
                "__monitor",
                "/var/lib/berth/agent/instances/bench-density-3"
            ]),
            "bench-density-"
        ));
        assert!(!monitor_of(
            Kind::Berth,
            &p(&[
                "/usr/local/bin/berth-agent",
                "__monitor",
                "/var/lib/berth/agent/instances/demo1"
            ]),
            "bench-density-"
        ));
        assert!(monitor_of(
            Kind::Lxd,
            &p(&["[lxc monitor] /var/lib/lxd/containers bench-density-7"]),
            "bench-density-"
        ));
        assert!(!monitor_of(
            Kind::Lxd,
            &p(&["lxd", "--group", "lxd"]),
            "bench-density-"
        ));
    }
}
