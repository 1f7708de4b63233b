//! One running agent per cgroup tag on a host: agents with the same `[runtime] cgroup_tag`
//! would name their instances' cgroups alike, so a second one refuses to start. The agent
//! holds an exclusive `flock` on `/run/berth/agent-<tag>.lock` (`agent-default.lock` without a
//! tag) for its life; the kernel drops it when the process ends, however it ends. Instances
//! outlive the agent and do not hold it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where agent locks live: host-wide, whatever an agent's own `run_dir` is.
pub const LOCK_DIR: &str = "/run/berth";

/// Errors taking the agent lock.
#[derive(Debug, thiserror::Error)]
pub enum AgentLockError {
    #[error(
        "another berth-agent {who} already runs on this host (it holds {path}); give this agent a different [runtime] cgroup_tag"
    )]
    Held { who: String, path: PathBuf },
    #[error("cannot take the agent lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The lock file of the agent with `tag` ("" = no tag) in `dir`.
pub fn lock_path(dir: &Path, tag: &str) -> PathBuf {
    let t = if tag.is_empty() { "default" } else { tag };
    dir.join(format!("agent-{t}.lock"))
}

/// A held agent lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
    path: PathBuf,
}

impl AgentLock {
    /// Takes the lock of the agent with `tag` ("" = no tag) in `dir` (created when missing),
    /// without waiting: fails with [`AgentLockError::Held`] when another process holds it.
    pub fn acquire(dir: &Path, tag: &str) -> Result<AgentLock, AgentLockError> {
        let path = lock_path(dir, tag);
        let io = |source| AgentLockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let who = if tag.is_empty() {
                    "without a cgroup tag".to_string()
                } else {
                    format!("with cgroup tag {tag}")
                };
                return Err(AgentLockError::Held { who, path });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // The holder's pid, for whoever wonders who holds it (the lock is what counts).
        file.set_len(0).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(AgentLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let d = Path::new("/run/berth");
        assert_eq!(lock_path(d, ""), d.join("agent-default.lock"));
        assert_eq!(lock_path(d, "dev-n1"), d.join("agent-dev-n1.lock"));
    }

    #[test]
    fn second_agent_with_same_tag_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run/berth");
        let a = AgentLock::acquire(&dir, "t1").unwrap();
        assert!(a.path().is_file());
        // flock locks belong to the open file description: a second open, even in the same
        // process, is refused like another agent would be.
        let err = AgentLock::acquire(&dir, "t1").unwrap_err().to_string();
        assert!(err.contains("cgroup tag t1"), "{err}");
        assert!(err.contains("[runtime] cgroup_tag"), "{err}");
        // Other tags (and no tag) are independent.
        let b = AgentLock::acquire(&dir, "t2").unwrap();
        let c = AgentLock::acquire(&dir, "").unwrap();
        let err = AgentLock::acquire(&dir, "").unwrap_err().to_string();
        assert!(err.contains("without a cgroup tag"), "{err}");
        drop((b, c));
        // Released on drop.
        drop(a);
        AgentLock::acquire(&dir, "t1").unwrap();
    }
}
