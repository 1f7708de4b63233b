//! The multi-node dev cluster of `deploy/cluster.sh` (three controllers, three agents, each in
//! its own network namespace), driven with the real `berth` CLI; torn down on drop, also when a
//! test fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{bin_dir, require_root, wait_for};

/// The dev cluster made by `deploy/cluster.sh`.
pub struct DevCluster {
    script: PathBuf,
    /// Its base directory (`BERTH_DEV_BASE`).
    pub base: PathBuf,
    /// The exports `deploy/cluster.sh env` printed (`BERTH_CONF`, ...).
    pub env: BTreeMap<String, String>,
}

impl DevCluster {
    /// Brings a dev cluster up under `/var/lib/berth-dev-e2e` (tearing down one a killed run
    /// left first).
    pub fn up() -> Result<DevCluster> {
        require_root();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the tests crate lives in the workspace")?
            .to_path_buf();
        let mut c = DevCluster {
            script: root.join("deploy/cluster.sh"),
            base: PathBuf::from("/var/lib/berth-dev-e2e"),
            env: BTreeMap::new(),
        };
        // A cluster left over by an earlier run that was killed.
        let _ = c.script(&["down"]);
        let out = c.script(&["up"])?;
        if !out.status.success() {
            let _ = c.script(&["down"]);
            bail!(
                "deploy/cluster.sh up failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let env = c.script(&["env"])?;
        for line in String::from_utf8_lossy(&env.stdout).lines() {
            if let Some((k, v)) = line
                .trim()
                .strip_prefix("export ")
                .and_then(|l| l.split_once('='))
            {
                c.env
                    .insert(k.to_string(), v.trim_matches(['"', '\'']).to_string());
            }
        }
        if !c.env.contains_key("BERTH_CONF") {
            bail!("deploy/cluster.sh env printed no BERTH_CONF");
        }
        Ok(c)
    }

    pub fn script(&self, args: &[&str]) -> Result<Output> {
        Command::new("bash")
            .arg(&self.script)
            .args(args)
            .env("BERTH_BIN", bin_dir())
            .env("BERTH_DEV_BASE", &self.base)
            .stdin(Stdio::null())
            .output()
            .context("cannot run deploy/cluster.sh")
    }

    pub fn script_ok(&self, args: &[&str]) -> Result<()> {
        let out = self.script(args)?;
        if !out.status.success() {
            bail!(
                "deploy/cluster.sh {} failed:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn berth(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(bin_dir().join("berth"));
        cmd.args(args).stdin(Stdio::null());
        cmd.env_remove("BERTH_REMOTE").env_remove("BERTH_URL");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().context("cannot run berth")
    }

    pub fn berth_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.berth(args)?;
        if !out.status.success() {
            bail!(
                "berth {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn berth_err(&self, args: &[&str]) -> Result<String> {
        let out = self.berth(args)?;
        if out.status.success() {
            bail!("berth {} succeeded but should have failed", args.join(" "));
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn cluster(&self) -> Result<serde_json::Value> {
        let out = self.berth_ok(&["cluster", "list", "--format", "json"])?;
        serde_json::from_str(&out).context("cluster list --format json is JSON")
    }

    pub fn leader(&self) -> Result<String> {
        let c = self.cluster()?;
        c["controllers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["role"] == "leader"))
            .and_then(|c| c["name"].as_str())
            .map(str::to_string)
            .with_context(|| format!("no leader in {c}"))
    }

    /// Waits until controller `name` is back and the leader hears from it.
    pub fn wait_controller_online(&self, name: &str) -> Result<()> {
        wait_for(
            &format!("controller {name} to rejoin"),
            Duration::from_secs(60),
            || {
                self.cluster().is_ok_and(|v| {
                    v["controllers"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|x| x["name"] == name && x["state"] == "online")
                    })
                })
            },
        )
    }

    pub fn node_status(&self, node: &str) -> Result<String> {
        let c = self.cluster()?;
        c["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node))
            .and_then(|n| n["status"].as_str())
            .map(str::to_string)
            .with_context(|| format!("no node {node} in {c}"))
    }

    pub fn instances(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.berth_ok(&["list", "--format", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    pub fn location(&self, name: &str) -> Result<String> {
        self.instances()?
            .iter()
            .find(|i| i["name"] == name)
            .and_then(|i| i["location"].as_str())
            .map(str::to_string)
            .with_context(|| format!("instance {name} not listed"))
    }
}

impl DevCluster {
    /// Runs `cmd` in instance `name` through `berth exec`: exit code, stdout, stderr.
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

    /// `berth list` entry of instance `name`.
    pub fn instance(&self, name: &str) -> Result<serde_json::Value> {
        self.instances()?
            .into_iter()
            .find(|i| i["name"] == name)
            .with_context(|| format!("instance {name} not listed"))
    }

    /// Waits until instance `name` reports `status` ("Running", "Stopped").
    pub fn wait_status(&self, name: &str, status: &str, timeout: Duration) -> Result<()> {
        wait_for(&format!("{name} to be {status}"), timeout, || {
            self.instance(name).is_ok_and(|i| i["status"] == status)
        })
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        match self.script(&["down"]) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "deploy/cluster.sh down failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("deploy/cluster.sh down: {e}"),
        }
    }
}

/// The downtime `berth move` printed (`Downtime: 123 ms`), in milliseconds.
pub fn printed_downtime(out: &str) -> Option<u64> {
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0].trim_end_matches(':').eq_ignore_ascii_case("downtime"))
        .and_then(|w| w[1].trim_end_matches("ms").parse().ok())
}
