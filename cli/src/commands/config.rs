//! `berth config show|get|set|unset|edit` on an instance's writable configuration.

use std::collections::BTreeMap;

use berth_proto::api::tenancy::Profile;
use berth_proto::api::{Instance, InstancePut};
use clap::{Args, Subcommand};
use http::Method;

use super::check_instance_name;
use crate::client::{Client, if_match};
use crate::commands::instance::instance_path;
use crate::{Ctx, print, say};

/// Config subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show instance configuration (YAML)
    Show {
        /// Instance name, optionally REMOTE:NAME
        name: String,
        /// Show the effective config: the profiles' config in order, then the instance's own
        #[arg(short = 'e', long)]
        expanded: bool,
    },
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
        /// KEY VALUE, or one or more KEY=VALUE (a negative number is a VALUE; any other VALUE starting with "-" goes after "--")
        #[arg(required = true, num_args = 1.., allow_negative_numbers = true)]
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
        ..Default::default()
    }
}

/// Turns `set` arguments into pairs: `KEY VALUE`, or `KEY=VALUE...`; each is checked locally.
pub fn set_pairs(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let pairs = super::set_arguments(args)?;
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
        ConfigCommand::Show { name, expanded } => {
            let (client, name) = ctx.resolve(&name)?;
            check_instance_name(name)?;
            let inst: Instance = client.get(&instance_path(name)).await?;
            let mut shown = writable(&inst);
            if expanded {
                shown.config = expanded_config(&client, &inst).await?;
            }
            print(&serde_yaml::to_string(&shown)?);
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
            let (client, name) = ctx.resolve(&a.name)?;
            check_instance_name(name)?;
            let (inst, etag) = client.get_tagged::<Instance>(&instance_path(name)).await?;
            let put = super::edit::edit(&writable(&inst))?;
            let what = format!("instance \"{name}\"");
            let (resp, _) = client
                .call_with(
                    Method::PUT,
                    &instance_path(name),
                    Some(&put),
                    if_match(etag.as_deref()),
                )
                .await
                .map_err(|e| super::edit::stale(&what, e))?;
            client.finish(resp).await?;
        }
    }
    Ok(0)
}

/// The config an instance runs with: `profiles`' config in order, then its own (later keys
/// win), as the server layers it.
pub fn layer(
    profiles: &[BTreeMap<String, String>],
    own: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in profiles {
        out.extend(p.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    out.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// The effective config of an instance: the server's `expanded_config` when it fills it,
/// else layered here from its profiles (read in the same project).
pub async fn expanded_config(
    client: &Client,
    inst: &Instance,
) -> anyhow::Result<BTreeMap<String, String>> {
    if !inst.expanded_config.is_empty() {
        return Ok(inst.expanded_config.clone());
    }
    let mut profiles = Vec::new();
    for p in &inst.profiles {
        let prof: Profile = client.get(&super::profile::profile_path(p)).await?;
        profiles.push(prof.config);
    }
    Ok(layer(&profiles, &inst.config))
}

/// Parses edited YAML into the writable config.
pub fn parse_put(text: &str) -> anyhow::Result<InstancePut> {
    serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("cannot parse the YAML: {e}"))
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
    fn layered_config() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let web = m(&[("limits.cpu", "2"), ("user.tier", "web")]);
        let small = m(&[("limits.cpu", "1"), ("limits.memory", "256MiB")]);
        let own = m(&[("limits.memory", "512MiB")]);
        assert_eq!(
            layer(&[web, small], &own),
            m(&[
                ("limits.cpu", "1"),
                ("limits.memory", "512MiB"),
                ("user.tier", "web")
            ])
        );
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
