//! Instances outlive their agent, and the controller keeps every instance across a restart.

use std::time::Duration;

use berth_tests::{Cluster, wait_for};

#[test]
fn instances_survive_daemon_restarts() -> anyhow::Result<()> {
    let mut c = Cluster::start()?;
    let result = run(&mut c);
    if result.is_err() {
        eprintln!("---- agent log ----\n{}", c.agent_log());
    }
    result
}

fn run(c: &mut Cluster) -> anyhow::Result<()> {
    c.berth_ok(&["image", "build", "busybox"])?;
    c.berth_ok(&["launch", "busybox", "t20-a"])?;
    c.berth_ok(&["init", "busybox", "t20-b"])?;
    let pid = c.init_pid("t20-a")?;
    assert!(pid > 0);

    // Agent restart: the instance keeps running with the same init, and is found again.
    c.stop_agent();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "init survived the agent"
    );
    c.start_agent(None)?;
    wait_for("the agent to answer again", Duration::from_secs(30), || {
        c.exec("t20-a", &["true"])
            .map(|(code, _, _)| code == 0)
            .unwrap_or(false)
    })?;
    assert_eq!(
        c.init_pid("t20-a")?,
        pid,
        "same init after the agent restart"
    );

    // Controller restart: every instance, with its config and state, is still there.
    c.berth_ok(&["config", "set", "t20-b", "user.note", "kept"])?;
    // An exec in flight when the controller goes: its operation must not stay running.
    let mut cli = std::process::Command::new(berth_tests::bin_dir().join("berth"))
        .args(["exec", "t20-a", "--", "sleep", "300"])
        .env("BERTH_CONF", c.dir.join("cli"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_for("the exec to run", Duration::from_secs(30), || {
        c.exec("t20-a", &["ps"])
            .map(|(_, out, _)| out.contains("sleep 300"))
            .unwrap_or(false)
    })?;
    c.stop_controller();
    let _ = cli.kill();
    let _ = cli.wait();
    c.start_controller()?;
    wait_for("berthd to answer again", Duration::from_secs(30), || {
        c.berth(&["list"])
            .map(|o| o.status.success())
            .unwrap_or(false)
    })?;
    let a = c.instance_json("t20-a")?;
    assert_eq!(a["status"], "Running", "{a}");
    let b = c.instance_json("t20-b")?;
    assert_eq!(b["status"], "Stopped", "{b}");
    assert_eq!(
        c.berth_ok(&["config", "get", "t20-b", "user.note"])?.trim(),
        "kept"
    );
    let (code, out, _) = c.exec("t20-a", &["cat", "/proc/1/comm"])?;
    assert_eq!((code, out.trim()), (0, "init"));
    let ops = c.berth_ok(&["operation", "list", "--format", "json"])?;
    let ops: serde_json::Value = serde_json::from_str(&ops)?;
    let running: Vec<_> = ops
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|o| o["status"] == "Running" && o["description"] == "Executing command")
                .collect()
        })
        .unwrap_or_default();
    // Only the exec just above may still be finishing; the interrupted one has failed.
    assert!(running.len() <= 1, "interrupted exec still running: {ops}");
    assert!(
        ops.as_array().is_some_and(|a| a.iter().any(|o| o["err"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"))),
        "the interrupted operation failed with a reason: {ops}"
    );
    Ok(())
}
