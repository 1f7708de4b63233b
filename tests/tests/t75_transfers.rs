//! Copy, move and evacuation between the nodes of `deploy/cluster.sh`, with real busybox and
//! debian/12 instances: images pulled by the nodes that lack them, a cross-node copy with its
//! data and a new identity, a stopped move, live moves that keep the address (debian/12 keeps
//! systemd running; its services are started again on the target), a target agent killed half
//! way (the source keeps running, the target keeps nothing), evacuation of five instances and
//! their return, and the bad input the issue names.
//!
//! One test function runs the phases in order on one dev cluster, torn down at the end (also
//! when a phase fails).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use berth_tests::dev::{DevCluster, printed_downtime};
use berth_tests::{bin_dir, wait_for};

#[test]
fn copy_move_and_evacuate_across_nodes() -> Result<()> {
    let c = DevCluster::up()?;
    let result = phases(&c);
    if result.is_err() {
        let _ = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "tail -n 60 {}/logs/*.log 2>/dev/null",
                c.base.display()
            ))
            .status();
    }
    result
}

fn phases(c: &DevCluster) -> Result<()> {
    // Images are built on n1 only: the other nodes pull them when a launch needs them.
    c.berth_ok(&["image", "build", "busybox", "--target", "n1"])?;
    image_pulled_on_demand(c)?;
    copy_across_nodes(c)?;
    stopped_move(c)?;
    live_move_busybox(c)?;
    bad_input(c)?;
    target_agent_killed_half_way(c)?;
    evacuate_and_restore(c)?;
    live_move_debian(c)?;
    Ok(())
}

fn read_inside(c: &DevCluster, name: &str, path: &str) -> Result<String> {
    let (code, out, err) = c.exec(name, &["cat", path])?;
    ensure!(code == 0, "cat {path} in {name} failed ({code}): {err}");
    Ok(out.trim().to_string())
}

fn sh_inside(c: &DevCluster, name: &str, script: &str) -> Result<String> {
    let (code, out, err) = c.exec(name, &["sh", "-c", script])?;
    ensure!(code == 0, "{script:?} in {name} failed ({code}): {err}");
    Ok(out.trim().to_string())
}

/// The instance's IPv4 address as the API shows it.
fn address(c: &DevCluster, name: &str) -> Result<String> {
    let i = c.instance(name)?;
    i["state"]["network"]["eth0"]["addresses"][0]["address"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{name} has no address: {i}"))
}

/// The address the instance's own `eth0` carries, from inside.
fn address_inside(c: &DevCluster, name: &str) -> Result<String> {
    let out = sh_inside(c, name, "ip -4 -o addr show dev eth0")?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .with_context(|| format!("no inet address in {out:?}"))
}

fn image_pulled_on_demand(c: &DevCluster) -> Result<()> {
    // Two launches on n3 at once share one pull of the image from n1.
    let spawn = |name: &str| {
        let mut cmd = Command::new(bin_dir().join("berth"));
        cmd.args(["launch", "busybox", name, "--target", "n3"]);
        for (k, v) in &c.env {
            cmd.env(k, v);
        }
        cmd.output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn("pull-a"));
        let b = s.spawn(|| spawn("pull-b"));
        (a.join(), b.join())
    });
    for out in [a, b] {
        let out = out.map_err(|_| anyhow::anyhow!("launch thread panicked"))??;
        ensure!(
            out.status.success(),
            "launch on n3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(c.location("pull-a")?, "n3");
    let images: serde_json::Value =
        serde_json::from_str(&c.berth_ok(&["image", "list", "--format", "json"])?)?;
    let image = images
        .as_array()
        .and_then(|a| {
            a.iter().find(|i| {
                i["aliases"]
                    .as_array()
                    .is_some_and(|al| al.iter().any(|x| x["name"] == "busybox"))
            })
        })
        .cloned()
        .context("the busybox image is listed")?;
    let locations: Vec<&str> = image["locations"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
        .unwrap_or_default();
    assert!(
        locations.contains(&"n1") && locations.contains(&"n3"),
        "{image}"
    );
    for n in ["pull-a", "pull-b"] {
        c.berth_ok(&["delete", "--force", n])?;
    }
    Ok(())
}

fn copy_across_nodes(c: &DevCluster) -> Result<()> {
    c.berth_ok(&["launch", "busybox", "m1", "--target", "n1"])?;
    sh_inside(c, "m1", "echo before-copy > /root/data; sync")?;
    c.berth_ok(&["snapshot", "m1", "s1"])?;
    sh_inside(c, "m1", "echo after-snapshot > /root/data; sync")?;
    // A running source is copied from a snapshot of it; the copy lands on n2, stopped.
    c.berth_ok(&["copy", "m1", "m1c", "--target", "n2"])?;
    assert_eq!(c.location("m1c")?, "n2");
    assert_eq!(c.instance("m1c")?["status"], "Stopped");
    let snaps = c.instance("m1c")?["snapshots"].clone();
    assert_eq!(snaps[0]["name"], "s1", "{snaps}");
    c.berth_ok(&["start", "m1c"])?;
    assert_eq!(read_inside(c, "m1c", "/root/data")?, "after-snapshot");
    assert_eq!(read_inside(c, "m1c", "/etc/hostname")?, "m1c");
    assert_ne!(address(c, "m1c")?, address(c, "m1")?);
    // --refresh sends only what changed: a stopped target is brought up to date.
    sh_inside(c, "m1", "echo refreshed > /root/data; sync")?;
    c.berth_ok(&["stop", "--force", "m1c"])?;
    c.berth_ok(&["copy", "m1", "m1c", "--refresh"])?;
    c.berth_ok(&["start", "m1c"])?;
    assert_eq!(read_inside(c, "m1c", "/root/data")?, "refreshed");
    // The refreshed copy keeps its own identity (the stream carried m1's).
    assert_eq!(read_inside(c, "m1c", "/etc/hostname")?, "m1c");
    Ok(())
}

fn stopped_move(c: &DevCluster) -> Result<()> {
    c.berth_ok(&["stop", "--force", "m1c"])?;
    c.berth_ok(&["move", "m1c", "--target", "n3"])?;
    assert_eq!(c.location("m1c")?, "n3");
    c.berth_ok(&["start", "m1c"])?;
    assert_eq!(read_inside(c, "m1c", "/root/data")?, "refreshed");
    let snaps = c.instance("m1c")?["snapshots"].clone();
    assert_eq!(snaps[0]["name"], "s1", "snapshots move along: {snaps}");
    // Nothing of it is left on n2.
    let pool = c.base.join("n2/pool");
    ensure!(
        !pool.join("containers/m1c").exists(),
        "n2 still has m1c's volume"
    );
    Ok(())
}

fn live_move_busybox(c: &DevCluster) -> Result<()> {
    let before = address(c, "m1")?;
    let node = c.location("m1")?;
    let to = if node == "n1" { "n2" } else { "n1" };
    sh_inside(c, "m1", "echo live > /root/data; sync")?;
    let out = c.berth_ok(&["move", "m1", "--target", to])?;
    eprintln!("live move of busybox: {}", out.trim());
    assert_eq!(c.location("m1")?, to);
    assert_eq!(c.instance("m1")?["status"], "Running");
    assert_eq!(address(c, "m1")?, before, "the address stays");
    assert_eq!(address_inside(c, "m1")?, before, "inside too");
    assert_eq!(read_inside(c, "m1", "/root/data")?, "live");
    let downtime = printed_downtime(&out).with_context(|| format!("no downtime in {out:?}"))?;
    eprintln!("busybox live move downtime: {downtime} ms");
    // It reaches out through its new node.
    sh_inside(c, "m1", "ping -c 1 -W 2 10.99.0.1 >/dev/null")?;
    Ok(())
}

fn bad_input(c: &DevCluster) -> Result<()> {
    let err = c.berth_err(&["move", "m1", "--target", "nosuch"])?;
    assert!(err.contains("not found"), "{err}");
    let err = c.berth_err(&["copy", "m1", "m1c"])?;
    assert!(err.contains("already exists"), "{err}");
    let err = c.berth_err(&["restore", "m1", "nosuch"])?;
    assert!(err.contains("no snapshot"), "{err}");
    let here = c.location("m1")?;
    let err = c.berth_err(&["move", "m1", "--target", &here])?;
    assert!(err.contains("already on node"), "{err}");
    // An offline node.
    c.script_ok(&["kill", "n3"])?;
    wait_for("n3 offline", Duration::from_secs(60), || {
        c.node_status("n3").is_ok_and(|s| s == "Offline")
    })?;
    let err = c.berth_err(&["move", "m1", "--target", "n3"])?;
    assert!(err.contains("offline"), "{err}");
    c.script_ok(&["start", "n3"])?;
    wait_for("n3 online", Duration::from_secs(60), || {
        c.node_status("n3").is_ok_and(|s| s == "Online")
    })?;
    assert_eq!(c.instance("m1")?["status"], "Running", "m1 was not touched");
    Ok(())
}

/// No volume, snapshot, base or staged (`.in-*`) volume of `name` on a node's pool.
fn nothing_left(pool: &Path, name: &str) -> Result<()> {
    for dir in ["containers", "snapshots", "bases"] {
        ensure!(
            !pool.join(dir).join(name).exists(),
            "{} still has {dir}/{name}",
            pool.display()
        );
    }
    Ok(())
}

/// Whether a transfer to `name` is staging volumes on a node's pool (received volumes land
/// under hidden `.in-<ticket>-...` names until the commit).
fn staging(pool: &Path, name: &str) -> bool {
    ["snapshots", "bases"].iter().any(|dir| {
        std::fs::read_dir(pool.join(dir).join(name)).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".in-"))
        })
    })
}

fn target_agent_killed_half_way(c: &DevCluster) -> Result<()> {
    c.berth_ok(&["launch", "busybox", "big", "--target", "n1"])?;
    // Incompressible data, so the stream takes long enough to be cut.
    sh_inside(
        c,
        "big",
        "dd if=/dev/urandom of=/root/blob bs=1M count=1024 2>/dev/null; sync",
    )?;
    let mut cmd = Command::new(bin_dir().join("berth"));
    cmd.args(["move", "big", "--target", "n3"]);
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    let child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    // Kill n3's agent once bytes flow: when its pool stages a volume of the instance.
    let pool = c.base.join("n3/pool");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !staging(&pool, "big") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    c.script_ok(&["kill", "n3"])?;
    ensure!(
        Instant::now() < deadline,
        "the transfer never started staging on n3"
    );
    let out = child.wait_with_output()?;
    ensure!(!out.status.success(), "the move should have failed");
    assert_eq!(c.location("big")?, "n1", "the instance stays on its node");
    assert_eq!(c.instance("big")?["status"], "Running", "and keeps running");
    c.script_ok(&["start", "n3"])?;
    wait_for("n3 online", Duration::from_secs(60), || {
        c.node_status("n3").is_ok_and(|s| s == "Online")
    })?;
    // The agent cleans its staging area when it starts; the controller aborts the transfer.
    wait_for("n3 to be clean", Duration::from_secs(30), || {
        nothing_left(&c.base.join("n3/pool"), "big").is_ok()
    })?;
    c.berth_ok(&["delete", "--force", "big"])?;
    Ok(())
}

fn evacuate_and_restore(c: &DevCluster) -> Result<()> {
    // Five instances on n2: three running, two stopped.
    let names = ["ev1", "ev2", "ev3", "ev4", "ev5"];
    for (i, n) in names.iter().enumerate() {
        if i < 3 {
            c.berth_ok(&["launch", "busybox", n, "--target", "n2"])?;
            sh_inside(c, n, &format!("echo {n} > /root/who; sync"))?;
        } else {
            c.berth_ok(&["init", "busybox", n, "--target", "n2"])?;
        }
    }
    let t = Instant::now();
    c.berth_ok(&["cluster", "evacuate", "n2", "--force"])?;
    eprintln!("evacuated 5 instances in {:?}", t.elapsed());
    for (i, n) in names.iter().enumerate() {
        assert_ne!(c.location(n)?, "n2", "{n} left n2");
        let want = if i < 3 { "Running" } else { "Stopped" };
        assert_eq!(c.instance(n)?["status"], want, "{n}");
    }
    assert_eq!(read_inside(c, "ev1", "/root/who")?, "ev1");
    let cluster = c.cluster()?;
    let n2 = cluster["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == "n2"))
        .context("n2 listed")?;
    assert_eq!(n2["evacuated"], true, "{n2}");
    // Nothing new lands on an evacuated node.
    c.berth_ok(&["launch", "busybox", "ev-new"])?;
    assert_ne!(c.location("ev-new")?, "n2");
    c.berth_ok(&["delete", "--force", "ev-new"])?;
    // Evacuating again changes nothing (resumable, idempotent).
    let before: Vec<(String, String)> = names
        .iter()
        .map(|n| Ok((c.location(n)?, c.instance(n)?["status"].to_string())))
        .collect::<Result<_>>()?;
    c.berth_ok(&["cluster", "evacuate", "n2", "--force"])?;
    let after: Vec<(String, String)> = names
        .iter()
        .map(|n| Ok((c.location(n)?, c.instance(n)?["status"].to_string())))
        .collect::<Result<_>>()?;
    assert_eq!(before, after, "a second evacuation moved nothing");
    c.berth_ok(&["cluster", "restore", "n2", "--force"])?;
    for (i, n) in names.iter().enumerate() {
        assert_eq!(c.location(n)?, "n2", "{n} came back");
        let want = if i < 3 { "Running" } else { "Stopped" };
        assert_eq!(c.instance(n)?["status"], want, "{n}");
    }
    assert_eq!(read_inside(c, "ev2", "/root/who")?, "ev2");
    for n in names {
        c.berth_ok(&["delete", "--force", n])?;
    }
    Ok(())
}

fn live_move_debian(c: &DevCluster) -> Result<()> {
    c.berth_ok(&["image", "build", "debian/12", "--target", "n1"])?;
    c.berth_ok(&["launch", "debian/12", "d1", "--target", "n1"])?;
    let running = || {
        c.exec("d1", &["systemctl", "is-system-running"])
            .is_ok_and(|(_, out, _)| out.trim() == "running")
    };
    wait_for("debian/12 to boot", Duration::from_secs(120), running)?;
    // A service that runs until stopped: systemd starts it again on the target.
    sh_inside(
        c,
        "d1",
        "printf '[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n' \
         > /etc/systemd/system/probe.service && systemctl enable --now probe.service",
    )?;
    let pid_before = sh_inside(c, "d1", "systemctl show -p MainPID --value probe.service")?;
    let before = address(c, "d1")?;
    let out = c.berth_ok(&["move", "d1", "--target", "n2"])?;
    eprintln!("live move of debian/12: {}", out.trim());
    assert_eq!(c.location("d1")?, "n2");
    wait_for("systemd running on n2", Duration::from_secs(120), running)?;
    assert_eq!(address(c, "d1")?, before);
    assert_eq!(address_inside(c, "d1")?, before);
    let active = sh_inside(c, "d1", "systemctl is-active probe.service")?;
    assert_eq!(active, "active");
    let pid_after = sh_inside(c, "d1", "systemctl show -p MainPID --value probe.service")?;
    assert_ne!(
        pid_before, pid_after,
        "the service was started again, not carried over"
    );
    let downtime = printed_downtime(&out).with_context(|| format!("no downtime in {out:?}"))?;
    eprintln!("debian/12 live move downtime: {downtime} ms");
    c.berth_ok(&["delete", "--force", "d1"])?;
    Ok(())
}
