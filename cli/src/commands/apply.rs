//! `berth apply -f stack.yaml [--plan] [--detailed-exitcode]` and `berth destroy -f stack.yaml`:
//! read what exists, plan with [`crate::stack::plan`], print one line per object, then make
//! the changes in dependency order and wait for each.

use std::collections::BTreeMap;
use std::path::PathBuf;

use berth_proto::api::tenancy::{
    Profile, ProfilePut, ProfilesPost, Project, ProjectPut, ProjectsPost,
};
use berth_proto::api::{
    ImageAliasesPost, Instance, InstancePut, InstanceSource, InstanceStatePut, InstancesPost,
};
use clap::Args;
use http::Method;

use crate::client::{Client, ClientError, encode_query, scoped_path};
use crate::stack::{
    self, Action, Actual, ActualAlias, ActualInstance, ActualObject, Change, DesiredState, Kind,
    Stack,
};
use crate::{Ctx, say};

/// `apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The stack file (YAML); `-` reads standard input
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Only print what would change
    #[arg(long)]
    pub plan: bool,
    /// With --plan: exit 2 when there are changes (0 when none, 1 on error)
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// REMOTE: to apply to (default: the default remote)
    #[arg(long, value_name = "REMOTE")]
    pub remote: Option<String>,
}

/// `destroy`.
#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// The stack file (YAML) whose objects to delete; `-` reads standard input
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Only print what would be deleted
    #[arg(long)]
    pub plan: bool,
    /// REMOTE: to destroy on (default: the default remote)
    #[arg(long, value_name = "REMOTE")]
    pub remote: Option<String>,
}

fn read_stack(path: &PathBuf) -> anyhow::Result<Stack> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
    };
    stack::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn in_project(path: &str, project: &str) -> String {
    scoped_path(path, Some(project))
}

/// What a lookup the key may not make (403) or that finds nothing (404) means: unknown. Any
/// other failure (the network, the server) stops the plan rather than silently changing it.
fn unknown_if_refused<T>(r: Result<T, ClientError>) -> Result<Option<T>, ClientError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if matches!(e.status(), Some(403 | 404)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads what exists in every project the key can see.
async fn read_actual(client: &Client) -> anyhow::Result<Actual> {
    // Node names when this key may list them (restricted keys may not: targets are then
    // checked by the server only).
    let nodes = unknown_if_refused(
        client
            .get::<Vec<serde_json::Value>>("/1.0/cluster/members?recursion=1")
            .await,
    )?
    .map(|members| {
        members
            .iter()
            .filter_map(|m| m.get("server_name").and_then(|n| n.as_str()))
            .map(str::to_string)
            .collect()
    });
    let mut actual = Actual {
        nodes,
        ..Actual::default()
    };
    let projects: Vec<Project> = client.get("/1.0/projects?recursion=1").await?;
    for p in &projects {
        actual.projects.push(ActualObject {
            project: p.name.clone(),
            name: p.name.clone(),
            description: p.description.clone(),
            config: p.config.clone(),
        });
    }
    for project in projects.iter().map(|p| &p.name) {
        let profiles: Vec<Profile> = client
            .get(&in_project("/1.0/profiles?recursion=1", project))
            .await?;
        for p in profiles {
            actual.profiles.push(ActualObject {
                project: project.clone(),
                name: p.name,
                description: p.description,
                config: p.config,
            });
        }
        let instances: Vec<Instance> = client
            .get(&in_project("/1.0/instances?recursion=1", project))
            .await?;
        for i in instances {
            actual.instances.push(ActualInstance {
                project: project.clone(),
                name: i.name,
                description: i.description,
                config: i.config,
                profiles: i.profiles,
                image: i.image,
                status: i.status,
                location: i.location,
            });
        }
        let aliases: Vec<serde_json::Value> = client
            .get(&in_project("/1.0/images/aliases?recursion=1", project))
            .await?;
        for a in aliases {
            let field = |k: &str| {
                a.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            actual.aliases.push(ActualAlias {
                project: project.clone(),
                name: field("name"),
                target: field("target"),
                description: field("description"),
            });
        }
    }
    Ok(actual)
}

/// Resolves every image the stack names to a fingerprint, where the server can. A project the
/// stack has yet to create would see the shared images of the default project: those are
/// asked for there.
async fn resolve_images(
    client: &Client,
    s: &Stack,
    actual: &Actual,
) -> Result<BTreeMap<(String, String), String>, ClientError> {
    let mut out = BTreeMap::new();
    let wanted = s
        .instances
        .iter()
        .map(|i| (i.project.clone(), i.image.clone()))
        .chain(
            s.image_aliases
                .iter()
                .map(|a| (a.project.clone(), a.image.clone())),
        );
    for (project, image) in wanted {
        if out.contains_key(&(project.clone(), image.clone())) {
            continue;
        }
        let asked = if actual.projects.iter().any(|p| p.name == project) {
            project.clone()
        } else {
            stack::DEFAULT_PROJECT.to_string()
        };
        let field =
            |v: serde_json::Value, k: &str| v.get(k).and_then(|t| t.as_str()).map(str::to_string);
        let alias = unknown_if_refused(
            client
                .get::<serde_json::Value>(&in_project(
                    &format!("/1.0/images/aliases/{}", encode_query(&image)),
                    &asked,
                ))
                .await,
        )?;
        let fp = match alias {
            Some(v) => field(v, "target"),
            None => unknown_if_refused(
                client
                    .get::<serde_json::Value>(&in_project(
                        &format!("/1.0/images/{}", encode_query(&image)),
                        &asked,
                    ))
                    .await,
            )?
            .and_then(|v| field(v, "fingerprint")),
        };
        if let Some(fp) = fp {
            out.insert((project, image), fp);
        }
    }
    Ok(out)
}

async fn plan_for(client: &Client, s: &Stack) -> anyhow::Result<(Vec<Change>, Actual)> {
    let actual = read_actual(client).await?;
    let fps = resolve_images(client, s, &actual).await?;
    let resolve =
        |project: &str, image: &str| fps.get(&(project.to_string(), image.to_string())).cloned();
    stack::check(s, &actual, &resolve).map_err(|e| anyhow::anyhow!("{e}; nothing was changed"))?;
    Ok((stack::plan(s, &actual, &resolve), actual))
}

/// `berth apply`.
pub async fn apply(ctx: &Ctx, a: ApplyArgs) -> anyhow::Result<i32> {
    let s = read_stack(&a.file)?;
    let client = ctx.client(a.remote.as_deref())?;
    let (changes, actual) = plan_for(&client, &s).await?;
    for c in &changes {
        say(&c.to_string());
    }
    say(&stack::summary(&changes));
    if a.plan {
        return Ok(if a.detailed_exitcode && stack::has_changes(&changes) {
            2
        } else {
            0
        });
    }
    if !stack::has_changes(&changes) {
        return Ok(0);
    }
    execute(&client, &s, &actual, &changes).await?;
    say("Applied.");
    Ok(0)
}

/// `berth destroy`: deletes every object of the file that the stack manages.
pub async fn destroy(ctx: &Ctx, a: DestroyArgs) -> anyhow::Result<i32> {
    let s = read_stack(&a.file)?;
    let client = ctx.client(a.remote.as_deref())?;
    // Destroying is applying an empty stack of the same name.
    let empty = Stack {
        stack: s.stack.clone(),
        projects: Vec::new(),
        profiles: Vec::new(),
        image_aliases: Vec::new(),
        instances: Vec::new(),
    };
    let (changes, actual) = plan_for(&client, &empty).await?;
    for c in &changes {
        say(&c.to_string());
    }
    say(&stack::summary(&changes));
    if a.plan || !stack::has_changes(&changes) {
        return Ok(0);
    }
    execute(&client, &empty, &actual, &changes).await?;
    say("Destroyed.");
    Ok(0)
}

/// Makes the changes: creates and updates from projects down to instances, then deletes from
/// instances up to projects.
async fn execute(
    client: &Client,
    s: &Stack,
    actual: &Actual,
    changes: &[Change],
) -> anyhow::Result<()> {
    let order = [Kind::Project, Kind::Profile, Kind::Alias, Kind::Instance];
    for kind in order {
        for c in changes.iter().filter(|c| c.kind == kind) {
            let done = match &c.action {
                Action::Create => create(client, s, c).await,
                Action::Update(_) => update(client, s, actual, c).await,
                Action::Replace(_) => match delete(client, actual, c).await {
                    Ok(()) => create(client, s, c).await,
                    Err(e) => Err(e),
                },
                Action::Delete | Action::Nothing => continue,
            };
            done.map_err(|e| anyhow::anyhow!("{} {}: {e}", c.kind, c.label()))?;
            say(&format!("done     {} {}", c.kind, c.label()));
        }
    }
    for kind in order.iter().rev() {
        for c in changes
            .iter()
            .filter(|c| c.kind == *kind && c.action == Action::Delete)
        {
            delete(client, actual, c)
                .await
                .map_err(|e| anyhow::anyhow!("{} {}: {e}", c.kind, c.label()))?;
            say(&format!("deleted  {} {}", c.kind, c.label()));
        }
    }
    Ok(())
}

async fn create(client: &Client, s: &Stack, c: &Change) -> anyhow::Result<()> {
    match c.kind {
        Kind::Project => {
            let p = s
                .projects
                .iter()
                .find(|p| p.name == c.name)
                .ok_or_else(missing)?;
            let body = ProjectsPost {
                name: p.name.clone(),
                description: p.description.clone(),
                config: stack::managed_config(&s.stack, &p.config),
            };
            client
                .sync(Method::POST, "/1.0/projects", Some(&body))
                .await?;
        }
        Kind::Profile => {
            let p = s
                .profiles
                .iter()
                .find(|p| p.project == c.project && p.name == c.name)
                .ok_or_else(missing)?;
            let body = ProfilesPost {
                name: p.name.clone(),
                description: p.description.clone(),
                config: stack::managed_config(&s.stack, &p.config),
                devices: BTreeMap::new(),
            };
            client
                .sync(
                    Method::POST,
                    &in_project("/1.0/profiles", &c.project),
                    Some(&body),
                )
                .await?;
        }
        Kind::Alias => {
            let a = s
                .image_aliases
                .iter()
                .find(|a| a.project == c.project && a.name == c.name)
                .ok_or_else(missing)?;
            let body = ImageAliasesPost {
                name: a.name.clone(),
                description: stack::alias_description(&s.stack, &a.description),
                target: a.image.clone(),
            };
            client
                .sync(
                    Method::POST,
                    &in_project("/1.0/images/aliases", &c.project),
                    Some(&body),
                )
                .await?;
        }
        Kind::Instance => {
            let i = s
                .instances
                .iter()
                .find(|i| i.project == c.project && i.name == c.name)
                .ok_or_else(missing)?;
            let mut config = stack::managed_config(&s.stack, &i.config);
            config.insert(stack::IMAGE_KEY.into(), i.image.clone());
            let body = InstancesPost {
                name: i.name.clone(),
                description: i.description.clone(),
                source: InstanceSource {
                    kind: "image".into(),
                    alias: i.image.clone(),
                    fingerprint: String::new(),
                    ..Default::default()
                },
                config,
                profiles: i.profiles.clone(),
                start: i.state == DesiredState::Running,
                target: i.target.clone(),
                kind: String::new(),
            };
            client
                .run(
                    Method::POST,
                    &in_project("/1.0/instances", &c.project),
                    Some(&body),
                )
                .await?;
        }
    }
    Ok(())
}

async fn update(client: &Client, s: &Stack, actual: &Actual, c: &Change) -> anyhow::Result<()> {
    match c.kind {
        Kind::Project => {
            let p = s
                .projects
                .iter()
                .find(|p| p.name == c.name)
                .ok_or_else(missing)?;
            let config = if p.name == stack::DEFAULT_PROJECT {
                p.config.clone()
            } else {
                stack::managed_config(&s.stack, &p.config)
            };
            let body = ProjectPut {
                description: p.description.clone(),
                config,
            };
            client
                .sync(
                    Method::PUT,
                    &format!("/1.0/projects/{}", encode_query(&p.name)),
                    Some(&body),
                )
                .await?;
        }
        Kind::Profile => {
            let p = s
                .profiles
                .iter()
                .find(|p| p.project == c.project && p.name == c.name)
                .ok_or_else(missing)?;
            let config = if p.name == "default" {
                p.config.clone()
            } else {
                stack::managed_config(&s.stack, &p.config)
            };
            let body = ProfilePut {
                description: p.description.clone(),
                config,
                devices: BTreeMap::new(),
            };
            client
                .run(
                    Method::PUT,
                    &in_project(
                        &format!("/1.0/profiles/{}", encode_query(&p.name)),
                        &c.project,
                    ),
                    Some(&body),
                )
                .await?;
        }
        Kind::Alias => {
            // Aliases have no PUT: delete and create again (the same name, new target).
            delete(client, actual, c).await?;
            create(client, s, c).await?;
        }
        Kind::Instance => {
            let i = s
                .instances
                .iter()
                .find(|i| i.project == c.project && i.name == c.name)
                .ok_or_else(missing)?;
            let x = actual
                .instances
                .iter()
                .find(|x| x.project == c.project && x.name == c.name)
                .ok_or_else(missing)?;
            let path = in_project(
                &format!("/1.0/instances/{}", encode_query(&i.name)),
                &c.project,
            );
            let mut config = stack::managed_config(&s.stack, &i.config);
            config.insert(stack::IMAGE_KEY.into(), i.image.clone());
            let own: BTreeMap<String, String> = x
                .config
                .iter()
                .filter(|(k, _)| !k.starts_with("image.") && !k.starts_with("volatile."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if own != config || x.description != i.description || x.profiles != i.profiles {
                let body = InstancePut {
                    config,
                    description: i.description.clone(),
                    profiles: i.profiles.clone(),
                    ephemeral: false,
                    ..Default::default()
                };
                client.run(Method::PUT, &path, Some(&body)).await?;
            }
            let status = x.status.to_ascii_lowercase();
            if status != i.state.as_str() {
                let action = match i.state {
                    DesiredState::Running => "start",
                    DesiredState::Stopped => "stop",
                };
                let body = InstanceStatePut {
                    action: action.into(),
                    timeout: 30,
                    force: false,
                    stateful: false,
                };
                let state_path = in_project(
                    &format!("/1.0/instances/{}/state", encode_query(&i.name)),
                    &c.project,
                );
                client.run(Method::PUT, &state_path, Some(&body)).await?;
            }
        }
    }
    Ok(())
}

async fn delete(client: &Client, actual: &Actual, c: &Change) -> anyhow::Result<()> {
    let path = match c.kind {
        Kind::Project => format!("/1.0/projects/{}", encode_query(&c.name)),
        Kind::Profile => in_project(
            &format!("/1.0/profiles/{}", encode_query(&c.name)),
            &c.project,
        ),
        Kind::Alias => in_project(
            &format!("/1.0/images/aliases/{}", encode_query(&c.name)),
            &c.project,
        ),
        Kind::Instance => {
            let path = in_project(
                &format!("/1.0/instances/{}", encode_query(&c.name)),
                &c.project,
            );
            let running = actual.instances.iter().any(|x| {
                x.project == c.project
                    && x.name == c.name
                    && !x.status.eq_ignore_ascii_case("stopped")
            });
            if running {
                let body = InstanceStatePut {
                    action: "stop".into(),
                    timeout: 30,
                    force: true,
                    stateful: false,
                };
                let state_path = in_project(
                    &format!("/1.0/instances/{}/state", encode_query(&c.name)),
                    &c.project,
                );
                client.run(Method::PUT, &state_path, Some(&body)).await?;
            }
            path
        }
    };
    client.run::<()>(Method::DELETE, &path, None).await?;
    Ok(())
}

fn missing() -> anyhow::Error {
    anyhow::anyhow!("the plan names an object the stack does not hold")
}
