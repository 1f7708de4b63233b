//! A busybox machine container end to end: launch, exec, uid mapping, limits, files, stop,
//! restart, delete — checked from the host and from inside.

use std::path::Path;
use std::time::Duration;

use berth_tests::{Cluster, wait_for};

/// The instance's cgroup directories in every hierarchy (named with the cluster's tag).
fn cgroup_dirs(c: &Cluster, name: &str) -> Vec<String> {
    let dir = c.cgroup_name(name);
    let mut found = vec![];
    // On a cgroup v2 host the payload cgroup sits at the root itself.
    let v2 = format!("/sys/fs/cgroup/{dir}");
    if std::path::Path::new(&v2).exists() {
        found.push(v2);
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in entries.flatten() {
            let p = h.path().join(&dir);
            if p.exists() {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[test]
fn busybox_lifecycle() -> anyhow::Result<()> {
    let c = Cluster::start()?;
    let result = run(&c);
    if result.is_err() {
        eprintln!("---- agent log ----\n{}", c.agent_log());
    }
    result
}

fn run(c: &Cluster) -> anyhow::Result<()> {
    let name = "t10-b1";
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    c.berth_ok(&["image", "build", "busybox"])?;
    c.berth_ok(&["launch", "busybox", name])?;

    // init is PID 1, and we are root inside.
    let (code, out, err) = c.exec(name, &["cat", "/proc/1/comm"])?;
    assert_eq!((code, out.trim()), (0, "init"), "stderr: {err}");
    let (_, out, _) = c.exec(name, &["id", "-u"])?;
    assert_eq!(out.trim(), "0");

    // On the host, init runs as a non-zero uid: the instance is unprivileged.
    let pid = c.init_pid(name)?;
    assert!(pid > 0, "running instance has a pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    let host_uid: u64 = uid_line.split_whitespace().nth(1).unwrap_or("0").parse()?;
    assert!(
        host_uid >= 65536,
        "init's host uid is {host_uid}, expected an unprivileged range"
    );
    let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map"))?;
    assert!(
        uid_map
            .split_whitespace()
            .eq(["0", &host_uid.to_string(), "65536"]),
        "uid_map: {uid_map}"
    );

    // Exit codes come back.
    let (code, _, _) = c.exec(name, &["sh", "-c", "exit 7"])?;
    assert_eq!(code, 7);
    // stdout and stderr stay apart.
    let (_, out, err) = c.exec(name, &["sh", "-c", "echo out; echo err >&2"])?;
    assert_eq!((out.trim(), err.trim()), ("out", "err"));
    // Hostname is the instance name, and it has an address on the bridge.
    let (_, out, _) = c.exec(name, &["hostname"])?;
    assert_eq!(out.trim(), name);
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname")?,
        host_name,
        "booting an instance changed the host's name"
    );
    let inst = c.instance_json(name)?;
    let addr = inst["state"]["network"]["eth0"]["addresses"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        addr.starts_with("10."),
        "instance has an IPv4 address: {inst}"
    );
    let (_, out, _) = c.exec(name, &["ip", "-4", "addr", "show", "eth0"])?;
    assert!(out.contains(&addr), "eth0 inside carries {addr}: {out}");
    // The host reaches the instance.
    wait_for(
        "the host to ping the instance",
        Duration::from_secs(15),
        || {
            std::process::Command::new("ping")
                .args(["-c1", "-W1", &addr])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        },
    )?;

    // Memory limit: in the cgroup and in `free`.
    c.berth_ok(&["config", "set", name, "limits.memory", "64MiB"])?;
    let cg = c.cgroup_name(name);
    let limit =
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory/{cg}/memory.limit_in_bytes"))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/{cg}/memory.max")))?;
    assert_eq!(limit.trim(), "67108864");
    let (_, out, _) = c.exec(name, &["free", "-m"])?;
    let total: u64 = out
        .lines()
        .find(|l| l.starts_with("Mem:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("0")
        .parse()?;
    assert!(
        (60..=64).contains(&total),
        "free -m total is {total}: {out}"
    );
    // CPU limit: nproc inside.
    c.berth_ok(&["config", "set", name, "limits.cpu", "1"])?;
    let (_, out, _) = c.exec(name, &["nproc"])?;
    assert_eq!(out.trim(), "1");
    c.berth_ok(&["config", "set", name, "limits.processes", "100"])?;
    let pids_max = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/{cg}/pids.max"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/{cg}/pids.max")))?;
    assert_eq!(pids_max.trim(), "100");
    // Bad values change nothing.
    let err = c.berth_err(&["config", "set", name, "limits.memory", "lots"])?;
    assert!(err.contains("limits.memory"), "{err}");
    let err = c.berth_err(&["config", "set", name, "limits.bogus", "1"])?;
    assert!(err.contains("unknown config key"), "{err}");
    let out = c.berth_ok(&["config", "get", name, "limits.memory"])?;
    assert_eq!(out.trim(), "64MiB");

    // Files: push and pull round trip, modes and owners; escapes stay inside.
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("hello.txt");
    std::fs::write(&src, "hello from the host\n")?;
    c.berth_ok(&[
        "file",
        "push",
        "--mode",
        "0640",
        "--uid",
        "1000",
        "--gid",
        "1000",
        &src.display().to_string(),
        &format!("{name}/root/hello.txt"),
    ])?;
    let (_, out, _) = c.exec(name, &["stat", "-c", "%a %u %g %s", "/root/hello.txt"])?;
    assert_eq!(out.trim(), "640 1000 1000 20");
    let back = tmp.path().join("back.txt");
    c.berth_ok(&[
        "file",
        "pull",
        &format!("{name}/root/hello.txt"),
        &back.display().to_string(),
    ])?;
    assert_eq!(std::fs::read_to_string(&back)?, "hello from the host\n");
    // A symlink inside pointing at the host's /etc resolves inside the instance.
    c.exec(name, &["ln", "-s", "/etc", "/root/evil"])?;
    c.berth_ok(&[
        "file",
        "push",
        &src.display().to_string(),
        &format!("{name}/root/evil/berth-escape-test"),
    ])?;
    assert!(
        !Path::new("/etc/berth-escape-test").exists(),
        "a push escaped the instance"
    );
    let (code, _, _) = c.exec(name, &["test", "-f", "/etc/berth-escape-test"])?;
    assert_eq!(code, 0, "the push landed inside the instance");
    let pulled = tmp.path().join("passwd");
    c.berth_ok(&[
        "file",
        "pull",
        &format!("{name}/../../../../etc/passwd"),
        &pulled.display().to_string(),
    ])?;
    let inside = std::fs::read_to_string(&pulled)?;
    let (_, inside_passwd, _) = c.exec(name, &["cat", "/etc/passwd"])?;
    assert_eq!(
        inside, inside_passwd,
        "../ resolves inside the instance root"
    );

    // Interactive exec gets a terminal from the instance's own devpts, owned by its root.
    let out = std::process::Command::new("script")
        .args([
            "-qec",
            &format!(
                "{} exec {name} -- sh -c 'tty; stat -c %u $(tty); stty size'",
                berth_tests::bin_dir().join("berth").display()
            ),
            "/dev/null",
        ])
        .env("BERTH_CONF", c.dir.join("cli"))
        .stdin(std::process::Stdio::null())
        .output()?;
    // `script` may echo a NUL it read from /dev/null as `^@` before the command's output.
    let text = String::from_utf8_lossy(&out.stdout)
        .replace('\r', "")
        .replace("^@", "");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("/dev/pts/")),
        "tty inside: {text}"
    );
    assert_eq!(
        lines.get(1).copied(),
        Some("0"),
        "the pty belongs to the instance's root: {text}"
    );

    // An exec whose client goes away does not leave its command running.
    let mut cli = std::process::Command::new(berth_tests::bin_dir().join("berth"))
        .args(["exec", name, "--", "sleep", "1234"])
        .env("BERTH_CONF", c.dir.join("cli"))
        .stdin(std::process::Stdio::null())
        .spawn()?;
    wait_for("the exec'd sleep to run", Duration::from_secs(30), || {
        c.exec(name, &["ps"])
            .map(|(_, out, _)| out.contains("sleep 1234"))
            .unwrap_or(false)
    })?;
    cli.kill()?;
    cli.wait()?;
    wait_for(
        "the abandoned command to be killed",
        Duration::from_secs(30),
        || {
            c.exec(name, &["ps"])
                .map(|(_, out, _)| !out.contains("sleep 1234"))
                .unwrap_or(false)
        },
    )?;

    // Stop leaves nothing behind; start brings it back with the same limits.
    assert!(
        !cgroup_dirs(c, name).is_empty(),
        "the running instance's cgroups are found (else their absence below proves nothing)"
    );
    c.berth_ok(&["stop", name])?;
    wait_for(
        "init to be gone after stop",
        Duration::from_secs(10),
        || !Path::new(&format!("/proc/{pid}")).exists(),
    )?;
    wait_for(
        "the cgroups to be gone after stop",
        Duration::from_secs(10),
        || cgroup_dirs(c, name).is_empty(),
    )?;
    let err = c.berth_err(&["exec", name, "--", "true"])?;
    assert!(err.contains("not running"), "{err}");
    c.berth_ok(&["start", name])?;
    let (_, out, _) = c.exec(name, &["nproc"])?;
    assert_eq!(out.trim(), "1");
    c.berth_ok(&["restart", name])?;
    let (code, _, _) = c.exec(name, &["true"])?;
    assert_eq!(code, 0);

    // Bad input: clear errors, nothing created.
    for (args, needle) in [
        (
            vec!["launch", "busybox", "1bad"],
            "must not start with a digit",
        ),
        (vec!["launch", "busybox", name], "already exists"),
        (vec!["launch", "no-such-image", "t10-x"], "not found"),
        (
            vec!["launch", "busybox", "t10-y", "-c", "limits.memory=1x"],
            "limits.memory",
        ),
    ] {
        let err = c.berth_err(&args)?;
        assert!(err.contains(needle), "berth {}: {err}", args.join(" "));
    }
    let list = c.berth_ok(&["list", "--format", "json"])?;
    assert!(!list.contains("t10-x") && !list.contains("t10-y") && !list.contains("1bad"));

    // Delete removes everything.
    c.berth_ok(&["delete", "--force", name])?;
    wait_for("cgroups to go", Duration::from_secs(30), || {
        cgroup_dirs(c, name).is_empty()
    })?;
    let err = c.berth_err(&["info", name])?;
    assert!(err.contains("not found"), "{err}");
    Ok(())
}
