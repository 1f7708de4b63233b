//! `berth config show|get|set|unset|edit` on an instance's writable configuration.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use berth_proto::api::{Instance, InstancePut};
use clap::{Args, Subcommand};
use http::Method;

use super::{check_instance_name, parse_key_value};
use crate::client::Client;
use crate::commands::instance::instance_path;
use crate::{Ctx, print, say};

/// Config subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show instance configuration (YAML)
    Show(NameArg),
    /// Get the value of a configuration key
    Get {
        /// Instance name, optionally REMOTE:NAME
        name: String,
        /// Configuration key
        key: String,
    },
    /// Set configuration keys (KEY VALUE, or KEY=VALUE...)
    Set {
        /// Instance name, optionally REMOTE:NAME
        name: String,
        /// KEY VALUE, or one or more KEY=VALUE
        #[arg(required = true, num_args = 1..)]
        pairs: Vec<String>,
    },
    /// Unset a configuration key
    Unset {
        /// Instance name, optionally REMOTE:NAME
        name: String,
        /// Configuration key
        key: String,
    },
    /// Edit instance configuration as YAML in $EDITOR (or read it from stdin when piped)
    Edit(NameArg),
}

/// One instance argument.
#[derive(Debug, Args)]
pub struct NameArg {
    /// Instance name, optionally REMOTE:NAME
    pub name: String,
}

/// The writable part of an instance, as `config show` prints it.
pub fn writable(i: &Instance) -> InstancePut {
    InstancePut {
        config: i.config.clone(),
        description: i.description.clone(),
        profiles: i.profiles.clone(),
        ephemeral: i.ephemeral,
    }
}

/// Turns `set` arguments into pairs: `KEY VALUE`, or `KEY=VALUE...`; each is checked locally.
pub fn set_pairs(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let pairs: Vec<(String, String)> = match args {
        [k, v] if !k.contains('=') => vec![(k.clone(), v.clone())],
        _ => args
            .iter()
            .map(|a| parse_key_value(a))
            .collect::<anyhow::Result<_>>()?,
    };
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        berth_proto::api::config::validate_key_value(&k, &v)
            .map_err(|e| anyhow::anyhow!("{}", e.0))?;
        map.insert(k, v);
    }
    Ok(map)
}

async fn fetch(ctx: &Ctx, arg: &str) -> anyhow::Result<(Client, String, Instance)> {
    let (client, name) = ctx.resolve(arg)?;
    check_instance_name(name)?;
    let inst: Instance = client.get(&instance_path(name)).await?;
    Ok((client, name.to_string(), inst))
}

/// Runs a config subcommand.
pub async fn run(ctx: &Ctx, command: ConfigCommand) -> anyhow::Result<i32> {
    match command {
        ConfigCommand::Show(a) => {
            let (_, _, inst) = fetch(ctx, &a.name).await?;
            print(&serde_yaml::to_string(&writable(&inst))?);
        }
        ConfigCommand::Get { name, key } => {
            let (_, _, inst) = fetch(ctx, &name).await?;
            say(inst.config.get(&key).map(String::as_str).unwrap_or(""));
        }
        ConfigCommand::Set { name, pairs } => {
            let map = set_pairs(&pairs)?;
            let (client, name) = ctx.resolve(&name)?;
            check_instance_name(name)?;
            let patch = serde_json::json!({ "config": map });
            client
                .run(Method::PATCH, &instance_path(name), Some(&patch))
                .await?;
        }
        ConfigCommand::Unset { name, key } => {
            if key.trim().is_empty() {
                anyhow::bail!("no config key given");
            }
            let (client, name) = ctx.resolve(&name)?;
            check_instance_name(name)?;
            let patch = serde_json::json!({ "config": { key: null } });
            client
                .run(Method::PATCH, &instance_path(name), Some(&patch))
                .await?;
        }
        ConfigCommand::Edit(a) => {
            let (client, name, inst) = fetch(ctx, &a.name).await?;
            let put = if std::io::stdin().is_terminal() {
                edit_in_editor(&serde_yaml::to_string(&writable(&inst))?)?
            } else {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                parse_put(&text)?
            };
            client
                .run(Method::PUT, &instance_path(&name), Some(&put))
                .await?;
        }
    }
    Ok(0)
}

/// Parses edited YAML into the writable config.
pub fn parse_put(text: &str) -> anyhow::Result<InstancePut> {
    serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("cannot parse the YAML: {e}"))
}

/// Opens `$VISUAL`/`$EDITOR` (default vi) on `text` until it parses or the user gives up.
fn edit_in_editor(text: &str) -> anyhow::Result<InstancePut> {
    let path = std::env::temp_dir().join(format!("berth_config_edit_{}.yaml", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    let result = (|| {
        f.write_all(text.as_bytes())?;
        drop(f);
        let editor = std::env::var("VISUAL")
            .or_else(|_| std::env::var("EDITOR"))
            .unwrap_or_else(|_| "vi".into());
        loop {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{editor} \"$1\""))
                .arg("sh")
                .arg(&path)
                .status()
                .map_err(|e| anyhow::anyhow!("cannot run the editor {editor}: {e}"))?;
            if !status.success() {
                anyhow::bail!("the editor {editor} failed ({status})");
            }
            let edited = std::fs::read_to_string(&path)?;
            match parse_put(&edited) {
                Ok(put) => return Ok(put),
                Err(e) => {
                    let mut err = std::io::stderr();
                    let _ = writeln!(err, "Config parsing error: {e}");
                    let _ = writeln!(
                        err,
                        "Press enter to open the editor again or ctrl+c to abort change"
                    );
                    let mut line = String::new();
                    if std::io::stdin().read_line(&mut line)? == 0 {
                        anyhow::bail!("configuration not changed");
                    }
                }
            }
        }
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_arguments() {
        let m = set_pairs(&["limits.cpu".into(), "2".into()]).unwrap();
        assert_eq!(m["limits.cpu"], "2");
        let m = set_pairs(&["limits.cpu=2".into(), "user.a=b=c".into()]).unwrap();
        assert_eq!(m["user.a"], "b=c");
        assert!(set_pairs(&["limits.cpu".into()]).is_err());
        assert!(set_pairs(&["limits.memory".into(), "huge".into()]).is_err());
        assert!(set_pairs(&["volatile.x=1".into()]).is_err());
    }

    #[test]
    fn show_and_parse_back() {
        let inst = Instance {
            name: "web1".into(),
            config: [("limits.cpu".to_string(), "2".to_string())].into(),
            profiles: vec!["default".into()],
            ..Default::default()
        };
        let yaml = serde_yaml::to_string(&writable(&inst)).unwrap();
        assert_eq!(
            yaml,
            "config:\n  limits.cpu: '2'\ndescription: ''\nprofiles:\n- default\nephemeral: false\n"
        );
        assert_eq!(parse_put(&yaml).unwrap(), writable(&inst));
        assert!(parse_put("name: x\n").is_err());
    }

    #[test]
    fn patch_bodies() {
        let map = set_pairs(&["limits.cpu=2".into()]).unwrap();
        assert_eq!(
            serde_json::json!({ "config": map }).to_string(),
            r#"{"config":{"limits.cpu":"2"}}"#
        );
        let key = "limits.cpu";
        assert_eq!(
            serde_json::json!({ "config": { key: null } }).to_string(),
            r#"{"config":{"limits.cpu":null}}"#
        );
    }
}
