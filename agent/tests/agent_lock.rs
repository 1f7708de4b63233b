//! The agent lock, end to end: a `berth-agent` whose cgroup tag is taken on this host refuses
//! to start, with one sentence naming the tag and the setting, before touching anything.
//!
//! Run: `cargo test -p berth-agent --test agent_lock` (as root: the lock lives in /run/berth).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use berth_agent::agent_lock::{AgentLock, LOCK_DIR, lock_path};

/// Removes the test's lock file, also when the test fails.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn second_agent_with_the_same_tag_is_refused() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the agent lock test needs root (it writes to /run/berth)"
    );
    let tag = format!("lt{:x}", std::process::id());
    let _rm = RemoveOnDrop(lock_path(Path::new(LOCK_DIR), &tag));
    let held = AgentLock::acquire(Path::new(LOCK_DIR), &tag).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state_dir = tmp.path().join("state");
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"locktest\"\nstate_dir = \"{}\"\nrun_dir = \"{}\"\nlisten = \"127.0.0.1:1\"\n\
             [storage]\ndriver = \"dir\"\nsource = \"{}\"\n\
             [runtime]\ncgroup_tag = \"{tag}\"\n",
            state_dir.display(),
            tmp.path().join("run").display(),
            tmp.path().join("pool").display(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second agent started: {err}");
    assert!(err.contains(&format!("cgroup tag {tag}")), "{err}");
    assert!(err.contains("[runtime] cgroup_tag"), "{err}");
    // Refused before anything was set up.
    assert!(!state_dir.exists(), "the refused agent made its state dir");
    drop(held);
}
