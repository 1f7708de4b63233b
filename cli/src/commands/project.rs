//! `berth project ...`: projects (a tenant's slice: instances, profiles, image aliases, with
//! quotas) and the current project of each remote.

use std::collections::BTreeMap;

use berth_proto::api::config::{PROJECT_KEYS, validate_project, validate_project_key_value};
use berth_proto::api::names::validate_project_name;
use berth_proto::api::tenancy::{
    DEFAULT_PROJECT, Project, ProjectPatch, ProjectPut, ProjectResource, ProjectState,
    ProjectsPost, RenamePost,
};
use clap::Subcommand;
use http::Method;
use serde::Serialize;

use super::profile::instances_in;
use super::{check_name, list_objects, parse_key_value, remote_arg, set_arguments};
use crate::client::{Client, encode_query, if_match};
use crate::config::split_remote;
use crate::output::{self, Format, human_bytes};
use crate::{Ctx, print, say};

/// Project subcommands.
#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a project
    Create {
        /// Project name, optionally REMOTE:NAME
        name: String,
        /// Config key/value (KEY=VALUE, repeatable): limits.instances, limits.cpu,
        /// limits.memory, limits.disk, limits.processes, restricted, user.*
        #[arg(short = 'c', long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Project description
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List projects (the current one is marked)
    #[command(visible_alias = "ls")]
    List {
        /// REMOTE: to list
        remote: Option<String>,
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
        /// A server-side filter such as 'config.restricted eq true' (see docs/filtering.md)
        #[arg(long, value_name = "EXPR", allow_hyphen_values = true)]
        filter: Option<String>,
    },
    /// Show a project (YAML)
    Show {
        /// Project name, optionally REMOTE:NAME
        name: String,
    },
    /// Set project config keys (KEY VALUE, or KEY=VALUE...)
    Set {
        /// Project name, optionally REMOTE:NAME
        name: String,
        /// KEY VALUE, or one or more KEY=VALUE (a negative number is a VALUE; any other VALUE starting with "-" goes after "--")
        #[arg(required = true, num_args = 1.., allow_negative_numbers = true)]
        pairs: Vec<String>,
    },
    /// Unset a project config key
    Unset {
        /// Project name, optionally REMOTE:NAME
        name: String,
        /// Config key
        key: String,
    },
    /// Get the value of a project config key
    Get {
        /// Project name, optionally REMOTE:NAME
        name: String,
        /// Config key
        key: String,
    },
    /// Edit a project as YAML in $EDITOR (or read it from stdin when piped)
    Edit {
        /// Project name, optionally REMOTE:NAME
        name: String,
    },
    /// Rename a project
    #[command(visible_alias = "mv")]
    Rename {
        /// Project name, optionally REMOTE:NAME
        old: String,
        /// New name
        new: String,
    },
    /// Delete a project (it must be empty)
    #[command(visible_alias = "rm")]
    Delete {
        /// Project name, optionally REMOTE:NAME
        name: String,
    },
    /// Make a project the current one of its remote
    Switch {
        /// Project name, optionally REMOTE:NAME
        name: String,
    },
    /// Show a project's use against its quotas
    Info {
        /// Project name, optionally REMOTE:NAME
        name: String,
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
    },
}

/// The path of a project.
pub fn project_path(name: &str) -> String {
    format!("/1.0/projects/{}", encode_query(name))
}

/// Splits `REMOTE:NAME` and checks the project name.
fn project_arg<'a>(ctx: &Ctx, arg: &'a str) -> anyhow::Result<(Client, &'a str)> {
    let (client, name) = ctx.resolve(arg)?;
    check_name(validate_project_name, name)?;
    Ok((client, name))
}

/// `set` arguments checked against the project key rules.
pub fn project_pairs(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (k, v) in set_arguments(args)? {
        validate_project_key_value(&k, &v).map_err(|e| anyhow::anyhow!("{}", e.0))?;
        map.insert(k, v);
    }
    Ok(map)
}

/// The short name of a quota key (`limits.memory` gives `memory`).
fn resource_name(key: &str) -> &str {
    key.strip_prefix("limits.").unwrap_or(key)
}

/// One line per quota set, in the order of [`PROJECT_KEYS`] (`memory=2GiB`).
pub fn quota_summary(config: &BTreeMap<String, String>) -> String {
    PROJECT_KEYS
        .iter()
        .filter(|k| k.starts_with("limits."))
        .filter_map(|k| config.get(*k).map(|v| format!("{}={v}", resource_name(k))))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A project as `project list --format json|yaml` shows it.
#[derive(Debug, Serialize)]
pub struct ProjectEntry {
    #[serde(flatten)]
    pub project: Project,
    /// Whether it is the current project of the remote.
    pub current: bool,
}

/// Table rows of `project list`: NAME (with "(current)"), INSTANCES, LIMITS, RESTRICTED,
/// DESCRIPTION.
pub fn project_rows(entries: &[ProjectEntry], format: Format) -> Vec<Vec<String>> {
    entries
        .iter()
        .map(|e| {
            let p = &e.project;
            let restricted = p
                .config
                .get("restricted")
                .is_some_and(|v| berth_proto::api::config::parse_bool("restricted", v) == Ok(true));
            vec![
                if e.current && matches!(format, Format::Table | Format::Compact) {
                    format!("{} (current)", p.name)
                } else {
                    p.name.clone()
                },
                instances_in(&p.used_by).to_string(),
                quota_summary(&p.config),
                if restricted { "YES" } else { "NO" }.into(),
                p.description.clone(),
            ]
        })
        .collect()
}

/// The order resources are shown in by `project info`.
const RESOURCE_ORDER: [&str; 5] = ["instances", "cpu", "memory", "disk", "processes"];

/// A limit or a use in the resource's unit: bytes for memory and disk, else a count.
pub fn resource_value(resource: &str, n: i64) -> String {
    match (resource, u64::try_from(n)) {
        (_, Err(_)) => "UNLIMITED".into(),
        ("memory" | "disk", Ok(b)) => human_bytes(b),
        (_, Ok(v)) => v.to_string(),
    }
}

/// Table rows of `project info`: RESOURCE, LIMIT, USAGE, known resources first.
pub fn info_rows(state: &ProjectState) -> Vec<Vec<String>> {
    let mut names: Vec<&String> = state.resources.keys().collect();
    names.sort_by_key(|n| {
        (
            RESOURCE_ORDER
                .iter()
                .position(|o| o == n)
                .unwrap_or(RESOURCE_ORDER.len()),
            n.to_string(),
        )
    });
    names
        .into_iter()
        .map(|n| {
            let r: ProjectResource = state.resources[n];
            vec![
                n.clone(),
                resource_value(n, r.limit),
                resource_value(n, r.usage.max(0)),
            ]
        })
        .collect()
}

/// The project requests work in, for marking it: the one named (`--project`, the remote's
/// current one), else `default` when it is listed, else a key's only project (the server uses
/// a member or viewer key's own project when none is named).
pub fn current_project(named: Option<&str>, listed: &[&str]) -> String {
    match (named, listed) {
        (Some(p), _) => p.to_string(),
        (None, l) if l.contains(&DEFAULT_PROJECT) => DEFAULT_PROJECT.to_string(),
        (None, [only]) => only.to_string(),
        (None, _) => DEFAULT_PROJECT.to_string(),
    }
}

/// The configured remote a command names (for the current project); `BERTH_URL` has none.
fn config_remote(ctx: &Ctx, explicit: Option<&str>) -> anyhow::Result<String> {
    let target = ctx.config.target(explicit, &ctx.env)?;
    if target.name == "env" {
        anyhow::bail!(
            "BERTH_URL is set, so there is no configured remote to remember a project for: use --project or BERTH_PROJECT"
        );
    }
    Ok(target.name)
}

/// Runs a project subcommand.
pub async fn run(ctx: &Ctx, command: ProjectCommand) -> anyhow::Result<i32> {
    match command {
        ProjectCommand::Create {
            name,
            config,
            description,
        } => {
            let (client, name) = project_arg(ctx, &name)?;
            let mut map = BTreeMap::new();
            for pair in &config {
                let (k, v) = parse_key_value(pair)?;
                map.insert(k, v);
            }
            validate_project(&map).map_err(|e| anyhow::anyhow!("{}", e.0))?;
            let post = ProjectsPost {
                name: name.to_string(),
                description,
                config: map,
            };
            client
                .run(Method::POST, "/1.0/projects", Some(&post))
                .await?;
            say(&format!("Project {name} created"));
        }
        ProjectCommand::List {
            remote,
            format,
            filter,
        } => {
            let remote = remote_arg(remote.as_deref());
            let client = ctx.client(remote)?;
            let path = super::with_filter("/1.0/projects", filter.as_deref());
            let mut projects: Vec<Project> = list_objects(&client, &path).await?;
            projects.sort_by(|a, b| a.name.cmp(&b.name));
            let names: Vec<&str> = projects.iter().map(|p| p.name.as_str()).collect();
            let current = current_project(client.project(), &names);
            let entries: Vec<ProjectEntry> = projects
                .into_iter()
                .map(|p| ProjectEntry {
                    current: p.name == current,
                    project: p,
                })
                .collect();
            print(&output::render(
                format,
                &["NAME", "INSTANCES", "LIMITS", "RESTRICTED", "DESCRIPTION"],
                &project_rows(&entries, format),
                &entries,
            )?);
        }
        ProjectCommand::Show { name } => {
            let (client, name) = project_arg(ctx, &name)?;
            let p: Project = client.get(&project_path(name)).await?;
            print(&output::yaml(&p)?);
        }
        ProjectCommand::Set { name, pairs } => {
            let map = project_pairs(&pairs)?;
            let (client, name) = project_arg(ctx, &name)?;
            let patch = ProjectPatch {
                description: None,
                config: Some(map.into_iter().map(|(k, v)| (k, Some(v))).collect()),
            };
            client
                .run(Method::PATCH, &project_path(name), Some(&patch))
                .await?;
        }
        ProjectCommand::Unset { name, key } => {
            if key.trim().is_empty() {
                anyhow::bail!("no config key given");
            }
            let (client, name) = project_arg(ctx, &name)?;
            let patch = ProjectPatch {
                description: None,
                config: Some([(key, None)].into()),
            };
            client
                .run(Method::PATCH, &project_path(name), Some(&patch))
                .await?;
        }
        ProjectCommand::Get { name, key } => {
            let (client, name) = project_arg(ctx, &name)?;
            let p: Project = client.get(&project_path(name)).await?;
            say(p.config.get(&key).map(String::as_str).unwrap_or(""));
        }
        ProjectCommand::Edit { name } => {
            let (client, name) = project_arg(ctx, &name)?;
            let (p, etag) = client.get_tagged::<Project>(&project_path(name)).await?;
            let put: ProjectPut = super::edit::edit_ignoring(
                &ProjectPut {
                    description: p.description,
                    config: p.config,
                },
                &["name", "used_by", "created_at"],
            )?;
            validate_project(&put.config).map_err(|e| anyhow::anyhow!("{}", e.0))?;
            let what = format!("project \"{name}\"");
            let (resp, _) = client
                .call_with(
                    Method::PUT,
                    &project_path(name),
                    Some(&put),
                    if_match(etag.as_deref()),
                )
                .await
                .map_err(|e| super::edit::stale(&what, e))?;
            client.finish(resp).await?;
        }
        ProjectCommand::Rename { old, new } => {
            let (new_remote, new) = split_remote(&new);
            if new_remote.is_some() && new_remote != split_remote(&old).0 {
                anyhow::bail!("a project cannot be renamed to another remote");
            }
            let (client, old_name) = project_arg(ctx, &old)?;
            check_name(validate_project_name, new)?;
            client
                .run(
                    Method::POST,
                    &project_path(old_name),
                    Some(&RenamePost { name: new.into() }),
                )
                .await?;
            say(&format!("Project {old_name} renamed to {new}"));
            remember_current(ctx, split_remote(&old).0, old_name, Some(new));
        }
        ProjectCommand::Delete { name } => {
            let (client, name_only) = project_arg(ctx, &name)?;
            client
                .run::<()>(Method::DELETE, &project_path(name_only), None)
                .await?;
            say(&format!("Project {name_only} deleted"));
            remember_current(ctx, split_remote(&name).0, name_only, None);
        }
        ProjectCommand::Switch { name } => {
            let remote = split_remote(&name).0;
            let remote_name = config_remote(ctx, remote)?;
            let (client, project) = project_arg(ctx, &name)?;
            // It must exist (and be visible to the key) before it becomes the current one.
            let _: Project = client.get(&project_path(project)).await?;
            let mut config = ctx.config.clone();
            if let Some(r) = config.remotes.get_mut(&remote_name) {
                r.project = Some(project.to_string());
            }
            config.save(&ctx.config_path)?;
        }
        ProjectCommand::Info { name, format } => {
            let (client, name) = project_arg(ctx, &name)?;
            let state: ProjectState = client.get(&format!("{}/state", project_path(name))).await?;
            print(&output::render(
                format,
                &["RESOURCE", "LIMIT", "USAGE"],
                &info_rows(&state),
                &state,
            )?);
        }
    }
    Ok(0)
}

/// After a rename (`new` set) or a delete (`new` none) of `old`: a remote whose current project
/// was `old` follows it (or goes back to none). Best effort: the change itself is done.
fn remember_current(ctx: &Ctx, remote: Option<&str>, old: &str, new: Option<&str>) {
    let Ok(remote_name) = config_remote(ctx, remote) else {
        return;
    };
    let mut config = ctx.config.clone();
    let Some(r) = config.remotes.get_mut(&remote_name) else {
        return;
    };
    if r.project.as_deref() != Some(old) {
        return;
    }
    r.project = new.map(str::to_string);
    if let Err(e) = config.save(&ctx.config_path) {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("Warning: cannot update the current project: {e}\n").as_bytes(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn set_arguments_are_checked() {
        let m = project_pairs(&["limits.instances".into(), "10".into()]).unwrap();
        assert_eq!(m["limits.instances"], "10");
        let m = project_pairs(&["limits.memory=2GiB".into(), "restricted=true".into()]).unwrap();
        assert_eq!(m.len(), 2);
        for bad in [
            vec!["limits.instances".to_string(), "-1".to_string()],
            vec!["limits.memory=lots".into()],
            vec!["limits.bogus=1".into()],
            vec!["restricted=maybe".into()],
        ] {
            assert!(project_pairs(&bad).is_err(), "{bad:?}");
        }
        let e = project_pairs(&["limits.cpu".into(), "two".into()]).unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn list_rows() {
        let p = Project {
            name: "team-a".into(),
            description: "Team A".into(),
            config: cfg(&[
                ("limits.memory", "2GiB"),
                ("limits.instances", "10"),
                ("restricted", "true"),
                ("user.owner", "ops"),
            ]),
            used_by: vec![
                "/1.0/instances/web1?project=team-a".into(),
                "/1.0/profiles/default?project=team-a".into(),
            ],
            ..Default::default()
        };
        let entries = vec![ProjectEntry {
            project: p,
            current: true,
        }];
        assert_eq!(
            project_rows(&entries, Format::Table)[0],
            [
                "team-a (current)",
                "1",
                "instances=10\nmemory=2GiB",
                "YES",
                "Team A"
            ]
        );
        assert_eq!(project_rows(&entries, Format::Csv)[0][0], "team-a");
        let json = output::json(&entries).unwrap();
        assert!(json.contains("\"current\": true"), "{json}");
        assert!(json.contains("\"name\": \"team-a\""), "{json}");
    }

    #[test]
    fn current_marker() {
        assert_eq!(current_project(Some("b"), &["a", "b"]), "b");
        assert_eq!(current_project(None, &["a", "default"]), "default");
        assert_eq!(current_project(None, &["team-a"]), "team-a");
        assert_eq!(current_project(None, &[]), "default");
    }

    #[test]
    fn info_table() {
        let mut state = ProjectState::default();
        for (k, limit, usage) in [
            ("processes", -1, 40),
            ("memory", 2 << 30, 512 << 20),
            ("instances", 10, 2),
            ("disk", -1, 0),
            ("cpu", 4, 1),
        ] {
            state
                .resources
                .insert(k.into(), ProjectResource { limit, usage });
        }
        let t = output::table(&["RESOURCE", "LIMIT", "USAGE"], &info_rows(&state));
        let expected = "\
+-----------+-----------+-----------+
| RESOURCE  |   LIMIT   |   USAGE   |
+-----------+-----------+-----------+
| instances | 10        | 2         |
+-----------+-----------+-----------+
| cpu       | 4         | 1         |
+-----------+-----------+-----------+
| memory    | 2.00GiB   | 512.00MiB |
+-----------+-----------+-----------+
| disk      | UNLIMITED | 0B        |
+-----------+-----------+-----------+
| processes | UNLIMITED | 40        |
+-----------+-----------+-----------+
";
        assert_eq!(t, expected);
    }
}
