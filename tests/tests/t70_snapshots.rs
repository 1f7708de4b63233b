//! Snapshots, copies on one node and publishing, on a real busybox instance: snapshot a running
//! instance, restore it (stopped, restored, started again), rename and delete snapshots;
//! scheduled snapshots that expire; copies (whole, instance-only, from a snapshot, refreshed)
//! with a new identity; publish, export and import back; and the bad input the issue names.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use berth_tests::{Cluster, wait_for};

#[test]
fn snapshots_copies_and_publish() -> Result<()> {
    let c = Cluster::start()?;
    let result = run(&c);
    if result.is_err() {
        eprintln!("---- agent log ----\n{}", c.agent_log());
    }
    result
}

/// The names of an instance's snapshots, from `berth list --format json`.
fn snapshot_names(c: &Cluster, name: &str) -> Result<Vec<String>> {
    let i = c.instance_json(name)?;
    Ok(i["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn read_inside(c: &Cluster, name: &str, path: &str) -> Result<String> {
    let (code, out, err) = c.exec(name, &["cat", path])?;
    ensure!(code == 0, "cat {path} in {name} failed ({code}): {err}");
    Ok(out.trim().to_string())
}

fn write_inside(c: &Cluster, name: &str, path: &str, text: &str) -> Result<()> {
    let (code, _, err) = c.exec(name, &["sh", "-c", &format!("echo {text} > {path}; sync")])?;
    ensure!(code == 0, "writing {path} in {name} failed ({code}): {err}");
    Ok(())
}

fn run(c: &Cluster) -> Result<()> {
    let name = "t70-s1";
    c.berth_ok(&["image", "build", "busybox"])?;
    c.berth_ok(&["launch", "busybox", name])?;
    write_inside(c, name, "/root/data", "one")?;

    // Snapshots of a running instance: a named one and a default-named one.
    c.berth_ok(&["snapshot", name, "first"])?;
    c.berth_ok(&["snapshot", name])?;
    assert_eq!(snapshot_names(c, name)?, ["first", "snap0"]);
    let info = c.berth_ok(&["info", name])?;
    assert!(
        info.contains("Snapshots:") && info.contains("first") && info.contains("snap0"),
        "berth info lists the snapshots:\n{info}"
    );
    let err = c.berth_err(&["snapshot", name, "first"])?;
    assert!(err.contains("already has a snapshot"), "{err}");

    // Restore: the running instance is stopped, restored and started again.
    write_inside(c, name, "/root/data", "two")?;
    let pid_before = c.init_pid(name)?;
    c.berth_ok(&["restore", name, "first"])?;
    assert_eq!(c.instance_json(name)?["status"], "Running");
    assert_ne!(c.init_pid(name)?, pid_before, "the instance was restarted");
    assert_eq!(read_inside(c, name, "/root/data")?, "one");
    let err = c.berth_err(&["restore", name, "nosuch"])?;
    assert!(err.contains("no snapshot"), "{err}");

    // Rename and delete.
    c.berth_ok(&["move", &format!("{name}/snap0"), &format!("{name}/second")])?;
    assert_eq!(snapshot_names(c, name)?, ["first", "second"]);
    c.berth_ok(&["delete", &format!("{name}/second")])?;
    assert_eq!(snapshot_names(c, name)?, ["first"]);

    // Copies on one node: a new identity, the data and (unless --instance-only) the snapshots.
    write_inside(c, name, "/root/data", "three")?;
    c.berth_ok(&["copy", name, "t70-c1"])?;
    c.berth_ok(&["copy", name, "t70-c2", "--instance-only"])?;
    c.berth_ok(&["copy", &format!("{name}/first"), "t70-c3"])?;
    assert_eq!(snapshot_names(c, "t70-c1")?, ["first"]);
    assert!(snapshot_names(c, "t70-c2")?.is_empty());
    for copy in ["t70-c1", "t70-c2", "t70-c3"] {
        assert_eq!(c.instance_json(copy)?["status"], "Stopped", "{copy}");
        c.berth_ok(&["start", copy])?;
    }
    assert_eq!(read_inside(c, "t70-c1", "/root/data")?, "three");
    assert_eq!(read_inside(c, "t70-c2", "/root/data")?, "three");
    assert_eq!(read_inside(c, "t70-c3", "/root/data")?, "one");
    let (src, cp) = (c.instance_json(name)?, c.instance_json("t70-c1")?);
    assert_ne!(
        src["state"]["network"]["eth0"]["hwaddr"], cp["state"]["network"]["eth0"]["hwaddr"],
        "a copy gets its own MAC"
    );
    let addr = |i: &serde_json::Value| -> String {
        i["state"]["network"]["eth0"]["addresses"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_ne!(addr(&src), addr(&cp), "a copy gets its own address");
    assert_eq!(read_inside(c, "t70-c1", "/etc/hostname")?, "t70-c1");
    let err = c.berth_err(&["copy", name, "t70-c1"])?;
    assert!(err.contains("already exists"), "{err}");

    // --refresh brings a stopped copy up to date.
    write_inside(c, name, "/root/data", "four")?;
    c.berth_ok(&["stop", "--force", "t70-c1"])?;
    c.berth_ok(&["copy", name, "t70-c1", "--refresh"])?;
    c.berth_ok(&["start", "t70-c1"])?;
    assert_eq!(read_inside(c, "t70-c1", "/root/data")?, "four");
    assert_eq!(
        read_inside(c, "t70-c1", "/etc/hostname")?,
        "t70-c1",
        "a refreshed copy keeps its own identity"
    );

    // A running instance is renamed (stopped, renamed, started again) and keeps its data.
    c.berth_ok(&["move", "t70-c3", "t70-c3r"])?;
    assert_eq!(c.instance_json("t70-c3r")?["status"], "Running");
    assert_eq!(read_inside(c, "t70-c3r", "/root/data")?, "one");
    assert!(c.instance_json("t70-c3").is_err(), "the old name is gone");

    // Publish a stopped instance; an alias that exists is refused; export and import back.
    c.berth_ok(&["stop", "--force", "t70-c2"])?;
    let out = c.berth_ok(&["publish", "t70-c2", "--alias", "t70img", "os=busybox"])?;
    let fingerprint = out
        .split_whitespace()
        .last()
        .context("publish prints the fingerprint")?
        .to_string();
    let err = c.berth_err(&["publish", "t70-c2", "--alias", "t70img"])?;
    assert!(err.contains("already exists"), "{err}");
    // A running instance is published from a snapshot taken for it, deleted afterwards.
    c.berth_ok(&["publish", "t70-c1", "--alias", "t70live"])?;
    assert!(
        !snapshot_names(c, "t70-c1")?
            .iter()
            .any(|n| n.starts_with("publish-")),
        "the snapshot taken to publish is gone"
    );
    assert_eq!(c.instance_json("t70-c1")?["status"], "Running");
    c.berth_ok(&["launch", "t70img", "t70-p1"])?;
    assert_eq!(read_inside(c, "t70-p1", "/root/data")?, "three");
    let dir = tempfile::tempdir()?;
    c.berth_ok(&[
        "image",
        "export",
        "t70img",
        &dir.path().display().to_string(),
    ])?;
    let tarball = dir.path().join(format!("{fingerprint}.tar.gz"));
    ensure!(tarball.is_file(), "export wrote {}", tarball.display());
    let listing = std::process::Command::new("tar")
        .arg("tzf")
        .arg(&tarball)
        .output()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.trim_start_matches("./") == "metadata.yaml"),
        "{listing}"
    );
    c.berth_ok(&["delete", "--force", "t70-p1"])?;
    c.berth_ok(&["image", "delete", "t70img"])?;
    c.berth_ok(&[
        "image",
        "import",
        &tarball.display().to_string(),
        "--alias",
        "t70back",
    ])?;
    let images: serde_json::Value =
        serde_json::from_str(&c.berth_ok(&["image", "list", "--format", "json"])?)?;
    let back = images
        .as_array()
        .and_then(|a| {
            a.iter().find(|i| {
                i["aliases"]
                    .as_array()
                    .is_some_and(|al| al.iter().any(|x| x["name"] == "t70back"))
            })
        })
        .context("the imported image is listed")?;
    assert_eq!(
        back["fingerprint"], fingerprint,
        "export then import gives the same fingerprint"
    );

    // Scheduled snapshots every minute that expire after a minute.
    c.berth_ok(&["config", "set", name, "snapshots.schedule", "* * * * *"])?;
    c.berth_ok(&["config", "set", name, "snapshots.expiry", "1M"])?;
    c.berth_ok(&["config", "set", name, "snapshots.pattern", "auto%d"])?;
    let err = c.berth_err(&["config", "set", name, "snapshots.schedule", "61 * * * *"])?;
    assert!(err.contains("snapshots.schedule"), "{err}");
    let mut scheduled = String::new();
    wait_for(
        "a scheduled snapshot",
        Duration::from_secs(90),
        || match snapshot_names(c, name) {
            Ok(names) => match names.into_iter().find(|n| n.starts_with("auto")) {
                Some(n) => {
                    scheduled = n;
                    true
                }
                None => false,
            },
            Err(_) => false,
        },
    )?;
    let snap = c.instance_json(name)?["snapshots"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == scheduled.as_str()).cloned())
        .context("the scheduled snapshot is listed")?;
    assert!(
        !snap["expires_at"].as_str().unwrap_or_default().is_empty(),
        "{snap}"
    );
    wait_for(
        "the scheduled snapshot to expire",
        Duration::from_secs(150),
        || snapshot_names(c, name).is_ok_and(|n| !n.contains(&scheduled)),
    )?;
    c.berth_ok(&["config", "unset", name, "snapshots.schedule"])?;
    Ok(())
}
