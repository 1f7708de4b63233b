//! Debian 12 with systemd boots to `running`, unprivileged, and stops cleanly.

use std::time::Instant;

use berth_tests::Cluster;

#[test]
fn debian12_boots_systemd() -> anyhow::Result<()> {
    let c = Cluster::start()?;
    let result = run(&c);
    if result.is_err() {
        eprintln!("---- agent log ----\n{}", c.agent_log());
        if let Ok(out) = c.berth(&["console", "t30-d1", "--show-log"]) {
            eprintln!(
                "---- console ----\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    result
}

fn run(c: &Cluster) -> anyhow::Result<()> {
    let t = Instant::now();
    c.berth_ok(&["image", "build", "debian/12"])?;
    eprintln!("debian/12 image ready in {:?}", t.elapsed());
    let t = Instant::now();
    c.berth_ok(&["launch", "debian/12", "t30-d1"])?;
    // A launch returns once init runs; an exec right after it waits for systemd to accept
    // commands (decision 0030), so this works at once, as a person types it.
    let (code, out, err) = c.exec("t30-d1", &["systemctl", "is-system-running", "--wait"])?;
    let state = out.trim().to_string();
    eprintln!("debian/12 reached {state} {:?} after launch", t.elapsed());
    if code != 0 || state != "running" {
        let (_, failed, _) = c.exec("t30-d1", &["systemctl", "--failed", "--no-legend"])?;
        panic!("systemd is {state} (exit {code}: {err}); failed units:\n{failed}");
    }
    let (_, out, _) = c.exec("t30-d1", &["id", "-u"])?;
    assert_eq!(out.trim(), "0");
    let inst = c.instance_json("t30-d1")?;
    let addr = inst["state"]["network"]["eth0"]["addresses"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (_, out, _) = c.exec("t30-d1", &["ip", "-4", "-o", "addr", "show", "eth0"])?;
    assert!(
        !addr.is_empty() && out.contains(&addr),
        "networkd kept {addr}: {out}"
    );
    let t = Instant::now();
    c.berth_ok(&["restart", "t30-d1"])?;
    eprintln!("debian/12 restart took {:?}", t.elapsed());
    c.berth_ok(&["stop", "t30-d1"])?;
    c.berth_ok(&["delete", "t30-d1"])?;
    Ok(())
}
