//! End-to-end harness: starts the real `berthd` and `berth-agent` on a private btrfs loop file,
//! bridge and ports, drives them with the real `berth` CLI, and tears everything down again,
//! also when a test fails.
//!
//! These tests need root and the kernel features a machine container needs. Without root they
//! fail with a message saying so (never skip silently: CI runs as root).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod bench;
pub mod dev;

/// Where the workspace's binaries are: next to the test binary's `deps/` directory, or
/// `$BERTH_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BERTH_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("the test binary has a path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(Path::to_path_buf)
        .expect("the test binary lives in target/<profile>/deps")
}

/// Polls `cond` until it is true or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on loopback")
}

fn random_hex(n: usize) -> String {
    let mut s = String::new();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        ^ (std::process::id() as u128) << 64;
    let mut x = seed as u64 ^ (seed >> 64) as u64;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(char::from_digit((x % 16) as u32, 16).unwrap_or('0'));
    }
    s
}

/// Fails the test unless we are root: the engine needs it, and CI runs as root.
pub fn require_root() {
    // SAFETY-free check: read our effective uid from /proc.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("1");
    assert_eq!(
        euid, "0",
        "end-to-end tests boot real containers and must run as root (CI does); run them with sudo"
    );
}

/// A running single-node cluster for one test.
pub struct Cluster {
    pub dir: PathBuf,
    pub api_port: u16,
    pub bridge: String,
    /// The agent's `[runtime] cgroup_tag` (`e2e<id>`), unique per test cluster, so tests never
    /// touch the cgroups of another agent on this host (see [`Cluster::cgroup_name`]).
    pub cgroup_tag: String,
    controller: Option<Child>,
    agent: Option<Child>,
    controller_config: PathBuf,
    agent_config: PathBuf,
    cli_conf: PathBuf,
    pool_mount: PathBuf,
    loop_file: PathBuf,
}

impl Cluster {
    /// Starts berthd and berth-agent, joins the agent, and points a private CLI config at them.
    pub fn start() -> Result<Cluster> {
        require_root();
        let id = random_hex(6);
        let dir = PathBuf::from(format!("/tmp/berth-e2e-{id}"));
        std::fs::create_dir_all(&dir)?;
        let api_port = free_port();
        let peer_port = free_port();
        let agent_port = free_port();
        let bridge = format!("bte{id}");
        let cgroup_tag = format!("e2e{id}");
        let pool_mount = dir.join("pool");
        let loop_file = dir.join("pool.img");
        let controller_config = dir.join("berthd.toml");
        std::fs::write(
            &controller_config,
            format!(
                "name = \"ctl\"\nstate_dir = \"{}\"\napi_listen = \"127.0.0.1:{api_port}\"\npeer_listen = \"127.0.0.1:{peer_port}\"\n",
                dir.join("controller").display()
            ),
        )?;
        let agent_config = dir.join("agent.toml");
        std::fs::write(
            &agent_config,
            format!(
                "name = \"{node}\"\nstate_dir = \"{}\"\nrun_dir = \"{}\"\nlisten = \"127.0.0.1:{agent_port}\"\n\
                 [storage]\ndriver = \"btrfs\"\nloop_file = \"{}\"\nloop_size = \"8GiB\"\nmount = \"{}\"\n\
                 [network]\nbridge = \"{bridge}\"\n\
                 [images]\ncache_dir = \"/var/cache/berth-ci/images\"\n\
                 [runtime]\nlxcfs_dir = \"{}\"\ncgroup_tag = \"{cgroup_tag}\"\n",
                dir.join("agent").display(),
                dir.join("agent/run").display(),
                loop_file.display(),
                pool_mount.display(),
                dir.join("agent/lxcfs").display(),
                node = node_name(),
            ),
        )?;
        let mut c = Cluster {
            dir: dir.clone(),
            api_port,
            bridge,
            cgroup_tag,
            controller: None,
            agent: None,
            controller_config,
            agent_config,
            cli_conf: dir.join("cli"),
            pool_mount,
            loop_file,
        };
        c.start_controller()?;
        let ctl = dir.join("controller");
        wait_for("berthd to bootstrap", Duration::from_secs(60), || {
            ctl.join("admin.key").exists() && ctl.join("join-token").exists()
        })?;
        c.start_agent(Some(&ctl.join("join-token")))?;
        std::fs::create_dir_all(&c.cli_conf)?;
        c.berth_ok(&[
            "remote",
            "add",
            "e2e",
            &format!("https://127.0.0.1:{api_port}"),
            "--key-file",
            &ctl.join("admin.key").display().to_string(),
            "--ca-file",
            &ctl.join("cluster.crt").display().to_string(),
        ])?;
        c.berth_ok(&["remote", "switch", "e2e"])?;
        wait_for("the node to join", Duration::from_secs(60), || {
            c.berth(&["cluster", "list"])
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&node_name()))
                .unwrap_or(false)
        })?;
        Ok(c)
    }

    /// The cgroup directory name (in every hierarchy) of this cluster's instance with the given
    /// scoped name (`web` in the default project, `project_web` elsewhere).
    pub fn cgroup_name(&self, scoped_instance_name: &str) -> String {
        format!("berth-{}.payload.{scoped_instance_name}", self.cgroup_tag)
    }

    fn log(&self, name: &str) -> Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))?)
    }

    /// Starts (or restarts) berthd.
    pub fn start_controller(&mut self) -> Result<()> {
        let log = self.log("berthd.log")?;
        let child = Command::new(bin_dir().join("berthd"))
            .arg("--config")
            .arg(&self.controller_config)
            .env("BERTH_LOG", "info,berth_controller=debug")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context(
                "cannot start berthd (build the workspace binaries first: cargo build --workspace)",
            )?;
        self.controller = Some(child);
        Ok(())
    }

    /// Starts (or restarts) berth-agent, joining with `token` when given.
    pub fn start_agent(&mut self, token: Option<&Path>) -> Result<()> {
        let log = self.log("agent.log")?;
        let mut cmd = Command::new(bin_dir().join("berth-agent"));
        cmd.arg("--config").arg(&self.agent_config);
        if let Some(t) = token {
            cmd.arg("--join-token-file").arg(t);
        }
        let child = cmd
            .env("BERTH_LOG", "info,berth_agent=debug")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start berth-agent")?;
        self.agent = Some(child);
        Ok(())
    }

    fn stop_child(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the agent process (SIGTERM); instances keep running.
    pub fn stop_agent(&mut self) {
        Self::stop_child(&mut self.agent);
    }

    /// Stops berthd (SIGTERM).
    pub fn stop_controller(&mut self) {
        Self::stop_child(&mut self.controller);
    }

    /// Runs `berth ARGS` with this cluster's CLI config.
    pub fn berth(&self, args: &[&str]) -> Result<Output> {
        Command::new(bin_dir().join("berth"))
            .args(args)
            .env("BERTH_CONF", &self.cli_conf)
            .env_remove("BERTH_REMOTE")
            .stdin(Stdio::null())
            .output()
            .context("cannot run berth")
    }

    /// Starts `berth ARGS` in the background with this cluster's CLI config and `env`, stdout
    /// piped (for `berth monitor`). The caller kills it.
    pub fn berth_spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Child> {
        Command::new(bin_dir().join("berth"))
            .args(args)
            .env("BERTH_CONF", &self.cli_conf)
            .env_remove("BERTH_REMOTE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run berth")
    }

    /// Runs `berth ARGS` and fails unless it succeeds; returns stdout.
    pub fn berth_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.berth(args)?;
        if !out.status.success() {
            bail!(
                "berth {} failed ({}):\nstdout: {}\nstderr: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `berth ARGS`, expecting failure; returns stderr.
    pub fn berth_err(&self, args: &[&str]) -> Result<String> {
        let out = self.berth(args)?;
        if out.status.success() {
            bail!(
                "berth {} succeeded but should have failed:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `berth exec NAME -- CMD...`: (exit code, stdout, stderr).
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
        let mut args = vec!["exec", name, "--"];
        args.extend_from_slice(cmd);
        let out = self.berth(&args)?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `berth exec --project PROJECT NAME -- CMD...`: (exit code, stdout, stderr).
    pub fn exec_in(
        &self,
        project: &str,
        name: &str,
        cmd: &[&str],
    ) -> Result<(i32, String, String)> {
        let mut args = vec!["exec", "--project", project, name, "--"];
        args.extend_from_slice(cmd);
        let out = self.berth(&args)?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The instance as `berth list --format json` shows it.
    pub fn instance_json(&self, name: &str) -> Result<serde_json::Value> {
        let out = self.berth_ok(&["list", "--format", "json"])?;
        let list: serde_json::Value = serde_json::from_str(&out).context("list output is JSON")?;
        list.as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name).cloned())
            .with_context(|| format!("instance {name} is not in the list"))
    }

    /// Host PID of an instance's init (0 when stopped).
    pub fn init_pid(&self, name: &str) -> Result<i64> {
        Ok(self.instance_json(name)?["state"]["pid"]
            .as_i64()
            .unwrap_or(0))
    }

    /// The API's base URL, for raw HTTP checks.
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// One HTTP request to the API with `curl`, as `key` (none: no Authorization header),
    /// with extra `headers` ("Name: value"): (HTTP status, response headers lowercased,
    /// body as JSON or a JSON string when it is not JSON).
    pub fn curl(
        &self,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[&str],
    ) -> Result<(u16, BTreeMap<String, String>, serde_json::Value)> {
        let head = tempfile::NamedTempFile::new()?;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method, "-D"])
            .arg(head.path())
            .arg("--cacert")
            .arg(self.ca_file())
            .arg(format!("{}{path}", self.api_url()));
        if let Some(k) = key {
            cmd.args(["-H", &format!("Authorization: Bearer {k}")]);
        }
        for h in headers {
            cmd.args(["-H", h]);
        }
        let file = tempfile::NamedTempFile::new()?;
        if let Some(b) = body {
            std::fs::write(file.path(), b)?;
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(format!("@{}", file.path().display()));
        }
        let out = cmd.output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let value =
            serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string()));
        let headers = std::fs::read_to_string(head.path())?
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok((code.trim().parse()?, headers, value))
    }

    /// The admin key.
    pub fn admin_key(&self) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.dir.join("controller/admin.key"))?
                .trim()
                .to_string(),
        )
    }

    /// The cluster CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("controller/cluster.crt")
    }

    /// The agent's log so far (to print when a test fails).
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Runs `berth ARGS`, killing it after `limit` (cleanup must never hang a test run).
    fn berth_bounded(&self, args: &[&str], limit: Duration) -> Option<Output> {
        let mut child = Command::new(bin_dir().join("berth"))
            .args(args)
            .env("BERTH_CONF", &self.cli_conf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return child.wait_with_output().ok(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    /// Deletes every instance of every project (stopping it first), each step bounded in time.
    pub fn delete_all(&self) {
        let limit = Duration::from_secs(60);
        if let Some(out) =
            self.berth_bounded(&["list", "--all-projects", "--format", "json"], limit)
            && let Ok(serde_json::Value::Array(list)) = serde_json::from_slice(&out.stdout)
        {
            for i in list {
                if let Some(name) = i["name"].as_str() {
                    let project = i["project"].as_str().unwrap_or("default");
                    let _ = self
                        .berth_bounded(&["delete", "--force", "--project", project, name], limit);
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Instances outlive their agent, so delete them while the daemons still run.
        if self.controller.is_some() && self.agent.is_some() {
            self.delete_all();
        }
        Self::stop_child(&mut self.agent);
        Self::stop_child(&mut self.controller);
        // Anything still running from this cluster (a test that killed a daemon early): its
        // monitors are `berth-agent __monitor <dir>/agent/...` processes.
        let agent_dir = self.dir.join("agent");
        // That includes this cluster's own lxcfs (its mount point is under the agent's dir).
        kill_processes_mentioning(&agent_dir);
        kill_leftover_cgroups(&self.cgroup_tag);
        // The agent's lock file (its agent is gone; the tag is never used again).
        let _ = std::fs::remove_file(format!("/run/berth/agent-{}.lock", self.cgroup_tag));
        let _ = Command::new("umount")
            .arg("-l")
            .arg(agent_dir.join("lxcfs"))
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.pool_mount)
            .status();
        if let Ok(out) = Command::new("losetup")
            .arg("-j")
            .arg(&self.loop_file)
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(dev) = line.split(':').next() {
                    let _ = Command::new("losetup").arg("-d").arg(dev).status();
                }
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &format!("berth_{}", self.bridge)])
            .stderr(Stdio::null())
            .status();
        if std::env::var_os("BERTH_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A minimal machine rootfs from the host's static busybox, with LXD's metadata.yaml, as a
/// unified tarball (`unified.tar.xz`) and a split one (`meta.tar`, `rootfs.tar.gz`) in `dir`.
pub fn make_image(dir: &Path) -> Result<()> {
    let root = dir.join("rootfs");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    for applet in [
        "sh", "cat", "id", "hostname", "sleep", "ls", "mkdir", "umount",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/init"))?;
    std::fs::write(
        root.join("etc/inittab"),
        "::sysinit:/bin/hostname -F /etc/hostname\n::shutdown:/bin/umount -a -r\n",
    )?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(root.join("etc/hostname"), "imported\n")?;
    std::fs::write(
        dir.join("metadata.yaml"),
        format!(
            "architecture: {}\ncreation_date: 1700000000\nproperties:\n  os: testos\n  release: \"1\"\n  description: an imported test image\n",
            std::env::consts::ARCH
        ),
    )?;
    let tar = |args: &[&str]| -> Result<()> {
        let ok = Command::new("tar")
            .current_dir(dir)
            .args(args)
            .status()?
            .success();
        anyhow::ensure!(ok, "tar {args:?} failed");
        Ok(())
    };
    tar(&[
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "-cJf",
        "unified.tar.xz",
        "metadata.yaml",
        "rootfs",
    ])?;
    tar(&["-cf", "meta.tar", "metadata.yaml"])?;
    tar(&[
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "-czf",
        "rootfs.tar.gz",
        "-C",
        "rootfs",
        ".",
    ])?;
    Ok(())
}

/// The name the first node gets: the one berthd's bootstrap join token is made for.
pub fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    berth_proto::api::names::node_name_from_host(host.trim())
}

/// Kills whatever still runs in this cluster's cgroups (instances and their monitors, left
/// when a test failed before it could delete them) and removes those cgroups, deepest first.
/// Only cgroups named with this cluster's own tag (`berth-<tag>.*`) are touched.
fn kill_leftover_cgroups(tag: &str) {
    let prefix = format!("berth-{tag}.");
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = hierarchies.flatten().map(|h| h.path()).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    let mut ours = Vec::new();
    for root in &roots {
        let Ok(rd) = std::fs::read_dir(root) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) && e.path().is_dir() {
                ours.push(e.path());
            }
        }
    }
    for _ in 0..3 {
        let mut killed = false;
        for cg in &ours {
            for d in cgroup_subtree(cg) {
                if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    for pid in procs.split_whitespace() {
                        killed = true;
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
            }
        }
        if !killed {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for cg in &ours {
        for d in cgroup_subtree(cg).iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A cgroup directory and all below it, parents first.
fn cgroup_subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Kills processes whose command line mentions `path`.
fn kill_processes_mentioning(path: &Path) {
    let needle = path.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(&needle)
        {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}
