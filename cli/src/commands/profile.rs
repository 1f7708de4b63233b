//! `berth profile ...`: profiles (config layered under instances' own, in the order an
//! instance lists them) and which instances use them, like `lxc profile`.

use std::collections::BTreeMap;

use berth_proto::api::names::{validate_profile_name, validate_project_name};
use berth_proto::api::tenancy::{Profile, ProfilePatch, ProfilePut, ProfilesPost, RenamePost};
use berth_proto::api::{Instance, InstancePut};
use clap::Subcommand;
use http::Method;

use super::config::{set_pairs, writable};
use super::instance::instance_path;
use super::{check_instance_name, check_name, list_objects, parse_config_pairs, remote_arg};
use crate::client::{Client, encode_query, if_match};
use crate::config::split_remote;
use crate::output::{self, Format};
use crate::{Ctx, print, say};

/// Profile subcommands.
#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Create a profile
    Create {
        /// Profile name, optionally REMOTE:NAME
        name: String,
        /// Config key/value (KEY=VALUE, repeatable)
        #[arg(short = 'c', long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Profile description
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List profiles
    #[command(visible_alias = "ls")]
    List {
        /// REMOTE: to list
        remote: Option<String>,
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
        /// A server-side filter such as 'config.limits.cpu eq 2' (see docs/filtering.md)
        #[arg(long, value_name = "EXPR", allow_hyphen_values = true)]
        filter: Option<String>,
    },
    /// Show a profile (YAML)
    Show {
        /// Profile name, optionally REMOTE:NAME
        name: String,
    },
    /// Edit a profile as YAML in $EDITOR (or read it from stdin when piped)
    Edit {
        /// Profile name, optionally REMOTE:NAME
        name: String,
    },
    /// Copy a profile (to another name, project or remote)
    #[command(visible_alias = "cp")]
    Copy {
        /// Source profile, optionally REMOTE:NAME
        source: String,
        /// New profile, optionally REMOTE:NAME
        destination: String,
        /// Project to copy to (default: the source's)
        #[arg(long, value_name = "PROJECT")]
        target_project: Option<String>,
    },
    /// Rename a profile
    #[command(visible_alias = "mv")]
    Rename {
        /// Profile name, optionally REMOTE:NAME
        old: String,
        /// New name
        new: String,
    },
    /// Set profile config keys (KEY VALUE, or KEY=VALUE...)
    Set {
        /// Profile name, optionally REMOTE:NAME
        name: String,
        /// KEY VALUE, or one or more KEY=VALUE (a negative number is a VALUE; any other VALUE starting with "-" goes after "--")
        #[arg(required = true, num_args = 1.., allow_negative_numbers = true)]
        pairs: Vec<String>,
    },
    /// Unset a profile config key
    Unset {
        /// Profile name, optionally REMOTE:NAME
        name: String,
        /// Config key
        key: String,
    },
    /// Get the value of a profile config key
    Get {
        /// Profile name, optionally REMOTE:NAME
        name: String,
        /// Config key
        key: String,
    },
    /// Delete profiles
    #[command(visible_alias = "rm")]
    Delete {
        /// Profile name, optionally REMOTE:NAME
        name: String,
    },
    /// Set the profiles of an instance (comma-separated, in order; "" for none)
    Assign {
        /// Instance name, optionally REMOTE:NAME
        instance: String,
        /// PROFILE[,PROFILE...]
        profiles: String,
    },
    /// Add a profile to an instance (last, so its config wins over the others')
    Add {
        /// Instance name, optionally REMOTE:NAME
        instance: String,
        /// Profile name
        profile: String,
    },
    /// Remove a profile from an instance
    Remove {
        /// Instance name, optionally REMOTE:NAME
        instance: String,
        /// Profile name
        profile: String,
    },
}

/// The path of a profile.
pub fn profile_path(name: &str) -> String {
    format!("/1.0/profiles/{}", encode_query(name))
}

/// Splits `REMOTE:NAME` and checks the profile name.
fn profile_arg<'a>(ctx: &Ctx, arg: &'a str) -> anyhow::Result<(Client, &'a str)> {
    let (client, name) = ctx.resolve(arg)?;
    check_name(validate_profile_name, name)?;
    Ok((client, name))
}

/// Parses `assign`'s list: comma-separated profile names in order; empty for none.
pub fn parse_profile_list(list: &str) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        check_name(validate_profile_name, p)?;
        if out.iter().any(|o| o == p) {
            anyhow::bail!("profile \"{p}\" is named twice");
        }
        out.push(p.to_string());
    }
    Ok(out)
}

/// A change to an instance's profile list.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileChange {
    /// Replace the list.
    Assign(Vec<String>),
    /// Append one (it must not be there yet).
    Add(String),
    /// Take one out (it must be there).
    Remove(String),
}

/// The instance's new profile list after `change`; the error is one sentence.
pub fn change_profiles(
    instance: &str,
    current: &[String],
    change: &ProfileChange,
) -> anyhow::Result<Vec<String>> {
    match change {
        ProfileChange::Assign(list) => Ok(list.clone()),
        ProfileChange::Add(p) => {
            if current.contains(p) {
                anyhow::bail!("profile \"{p}\" is already assigned to instance \"{instance}\"");
            }
            let mut out = current.to_vec();
            out.push(p.clone());
            Ok(out)
        }
        ProfileChange::Remove(p) => {
            if !current.contains(p) {
                anyhow::bail!("profile \"{p}\" is not assigned to instance \"{instance}\"");
            }
            Ok(current.iter().filter(|c| *c != p).cloned().collect())
        }
    }
}

/// Replaces an instance's profiles: reads it, then `PUT`s its writable part with the new list
/// and `If-Match` of what it read (so a concurrent edit is not overwritten).
pub async fn put_profiles(
    client: &Client,
    name: &str,
    change: &ProfileChange,
) -> anyhow::Result<Vec<String>> {
    let (inst, etag) = client.get_tagged::<Instance>(&instance_path(name)).await?;
    let profiles = change_profiles(name, &inst.profiles, change)?;
    let put = InstancePut {
        profiles: profiles.clone(),
        ..writable(&inst)
    };
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
    Ok(profiles)
}

/// Counts the instances among `used_by` URLs.
pub fn instances_in(used_by: &[String]) -> usize {
    used_by
        .iter()
        .filter(|u| u.starts_with("/1.0/instances/"))
        .count()
}

/// Table rows of `profile list`: NAME, DESCRIPTION, USED BY (a count).
pub fn profile_rows(profiles: &[Profile]) -> Vec<Vec<String>> {
    profiles
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.description.clone(),
                p.used_by.len().to_string(),
            ]
        })
        .collect()
}

/// The writable part of a profile, as `profile edit` shows it.
pub fn profile_put(p: &Profile) -> ProfilePut {
    ProfilePut {
        description: p.description.clone(),
        config: p.config.clone(),
        devices: p.devices.clone(),
    }
}

/// A `PATCH` body that sets or removes config keys.
pub fn config_patch(changes: BTreeMap<String, Option<String>>) -> ProfilePatch {
    ProfilePatch {
        description: None,
        config: Some(changes),
    }
}

/// Runs a profile subcommand.
pub async fn run(ctx: &Ctx, command: ProfileCommand) -> anyhow::Result<i32> {
    match command {
        ProfileCommand::Create {
            name,
            config,
            description,
        } => {
            let (client, name) = profile_arg(ctx, &name)?;
            let config = parse_config_pairs(&config)?;
            let post = ProfilesPost {
                name: name.to_string(),
                description,
                config,
                devices: BTreeMap::new(),
            };
            client
                .run(Method::POST, "/1.0/profiles", Some(&post))
                .await?;
            say(&format!("Profile {name} created"));
        }
        ProfileCommand::List {
            remote,
            format,
            filter,
        } => {
            let client = ctx.client(remote_arg(remote.as_deref()))?;
            let path = super::with_filter("/1.0/profiles", filter.as_deref());
            let mut profiles: Vec<Profile> = list_objects(&client, &path).await?;
            profiles.sort_by(|a, b| a.name.cmp(&b.name));
            print(&output::render(
                format,
                &["NAME", "DESCRIPTION", "USED BY"],
                &profile_rows(&profiles),
                &profiles,
            )?);
        }
        ProfileCommand::Show { name } => {
            let (client, name) = profile_arg(ctx, &name)?;
            let p: Profile = client.get(&profile_path(name)).await?;
            print(&output::yaml(&p)?);
        }
        ProfileCommand::Edit { name } => {
            let (client, name) = profile_arg(ctx, &name)?;
            let (p, etag) = client.get_tagged::<Profile>(&profile_path(name)).await?;
            let put: ProfilePut =
                super::edit::edit_ignoring(&profile_put(&p), &["name", "project", "used_by"])?;
            berth_proto::api::config::validate(&put.config)
                .map_err(|e| anyhow::anyhow!("{}", e.0))?;
            let what = format!("profile \"{name}\"");
            let (resp, _) = client
                .call_with(
                    Method::PUT,
                    &profile_path(name),
                    Some(&put),
                    if_match(etag.as_deref()),
                )
                .await
                .map_err(|e| super::edit::stale(&what, e))?;
            client.finish(resp).await?;
        }
        ProfileCommand::Copy {
            source,
            destination,
            target_project,
        } => {
            let (src, src_name) = profile_arg(ctx, &source)?;
            let (mut dst, dst_name) = match split_remote(&destination) {
                (None, rest) => (src.clone(), rest),
                _ => profile_arg(ctx, &destination)?,
            };
            check_name(validate_profile_name, dst_name)?;
            if let Some(p) = &target_project {
                check_name(validate_project_name, p)?;
                dst = dst.with_project(Some(p.clone()));
            }
            let p: Profile = src.get(&profile_path(src_name)).await?;
            let post = ProfilesPost {
                name: dst_name.to_string(),
                description: p.description,
                config: p.config,
                devices: p.devices,
            };
            dst.run(Method::POST, "/1.0/profiles", Some(&post)).await?;
        }
        ProfileCommand::Rename { old, new } => {
            let (new_remote, new) = split_remote(&new);
            if new_remote.is_some() && new_remote != split_remote(&old).0 {
                anyhow::bail!("a profile cannot be renamed to another remote");
            }
            let (client, old) = profile_arg(ctx, &old)?;
            check_name(validate_profile_name, new)?;
            client
                .run(
                    Method::POST,
                    &profile_path(old),
                    Some(&RenamePost { name: new.into() }),
                )
                .await?;
            say(&format!("Profile {old} renamed to {new}"));
        }
        ProfileCommand::Set { name, pairs } => {
            let map = set_pairs(&pairs)?;
            let (client, name) = profile_arg(ctx, &name)?;
            let patch = config_patch(map.into_iter().map(|(k, v)| (k, Some(v))).collect());
            client
                .run(Method::PATCH, &profile_path(name), Some(&patch))
                .await?;
        }
        ProfileCommand::Unset { name, key } => {
            if key.trim().is_empty() {
                anyhow::bail!("no config key given");
            }
            let (client, name) = profile_arg(ctx, &name)?;
            let patch = config_patch([(key, None)].into());
            client
                .run(Method::PATCH, &profile_path(name), Some(&patch))
                .await?;
        }
        ProfileCommand::Get { name, key } => {
            let (client, name) = profile_arg(ctx, &name)?;
            let p: Profile = client.get(&profile_path(name)).await?;
            say(p.config.get(&key).map(String::as_str).unwrap_or(""));
        }
        ProfileCommand::Delete { name } => {
            let (client, name) = profile_arg(ctx, &name)?;
            client
                .run::<()>(Method::DELETE, &profile_path(name), None)
                .await?;
            say(&format!("Profile {name} deleted"));
        }
        ProfileCommand::Assign { instance, profiles } => {
            let list = parse_profile_list(&profiles)?;
            let (client, name) = ctx.resolve(&instance)?;
            check_instance_name(name)?;
            let now = put_profiles(&client, name, &ProfileChange::Assign(list)).await?;
            if now.is_empty() {
                say(&format!("Profiles removed from {name}"));
            } else {
                say(&format!("Profiles {} applied to {name}", now.join(",")));
            }
        }
        ProfileCommand::Add { instance, profile } => {
            check_name(validate_profile_name, &profile)?;
            let (client, name) = ctx.resolve(&instance)?;
            check_instance_name(name)?;
            put_profiles(&client, name, &ProfileChange::Add(profile.clone())).await?;
            say(&format!("Profile {profile} added to {name}"));
        }
        ProfileCommand::Remove { instance, profile } => {
            check_name(validate_profile_name, &profile)?;
            let (client, name) = ctx.resolve(&instance)?;
            check_instance_name(name)?;
            put_profiles(&client, name, &ProfileChange::Remove(profile.clone())).await?;
            say(&format!("Profile {profile} removed from {name}"));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn profile_lists() {
        assert_eq!(
            parse_profile_list("web, small").unwrap(),
            v(&["web", "small"])
        );
        assert!(parse_profile_list("").unwrap().is_empty());
        assert!(parse_profile_list("web,web").is_err());
        assert!(parse_profile_list("web,no_underscores").is_err());
    }

    #[test]
    fn changes() {
        let cur = v(&["default", "web"]);
        assert_eq!(
            change_profiles("c1", &cur, &ProfileChange::Add("small".into())).unwrap(),
            v(&["default", "web", "small"])
        );
        let e = change_profiles("c1", &cur, &ProfileChange::Add("web".into())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "profile \"web\" is already assigned to instance \"c1\""
        );
        assert_eq!(
            change_profiles("c1", &cur, &ProfileChange::Remove("default".into())).unwrap(),
            v(&["web"])
        );
        assert!(change_profiles("c1", &cur, &ProfileChange::Remove("x".into())).is_err());
        assert_eq!(
            change_profiles("c1", &cur, &ProfileChange::Assign(vec![])).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn list_output() {
        let p = Profile {
            name: "web".into(),
            description: "web tier".into(),
            config: [("limits.cpu".to_string(), "2".to_string())].into(),
            used_by: v(&["/1.0/instances/a", "/1.0/instances/b?project=p"]),
            ..Default::default()
        };
        assert_eq!(instances_in(&p.used_by), 2);
        let t = output::table(
            &["NAME", "DESCRIPTION", "USED BY"],
            &profile_rows(std::slice::from_ref(&p)),
        );
        assert!(t.contains("| web  | web tier    | 2       |"), "{t}");
        let yaml = serde_yaml::to_string(&profile_put(&p)).unwrap();
        assert_eq!(
            yaml,
            "description: web tier\nconfig:\n  limits.cpu: '2'\ndevices: {}\n"
        );
        assert_eq!(
            serde_json::to_string(&config_patch([("limits.cpu".into(), None)].into())).unwrap(),
            r#"{"description":null,"config":{"limits.cpu":null}}"#
        );
    }
}
