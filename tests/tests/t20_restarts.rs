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
    c.stop_controller();
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
    Ok(())
}
