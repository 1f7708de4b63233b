//! `berth cluster ...`: controllers and nodes, join tokens, member settings and cluster-wide
//! settings.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use berth_proto::api::{
    Cluster, ClusterController, ClusterMemberPatch, ClusterMemberStatePost, ClusterNode,
    JoinTokenResponse,
};
use clap::Subcommand;
use http::Method;

use crate::client::{Client, encode_query};
use crate::config::split_remote;
use crate::output::{self, Format, human_bytes};
use crate::{Ctx, print, say};

/// Cluster subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// List the controllers and the nodes
    #[command(visible_alias = "ls")]
    List {
        /// REMOTE: to list
        remote: Option<String>,
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
    },
    /// Show a node or a controller
    Show {
        /// Member name, optionally REMOTE:NAME
        name: String,
    },
    /// Request a join token for a new controller and print the berthd command that uses it
    AddController {
        /// Name of the new controller, optionally REMOTE:NAME
        name: String,
    },
    /// Request a join token for a new node (agent) and print the command that uses it
    #[command(visible_alias = "add")]
    AddNode {
        /// Name of the new node, optionally REMOTE:NAME
        name: String,
    },
    /// Remove a node or a controller from the cluster
    #[command(visible_alias = "rm")]
    Remove {
        /// Member name, optionally REMOTE:NAME
        name: String,
        /// Do not ask for confirmation
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Set a node setting: a label (KEY VALUE) or scheduler.instance (all or manual)
    Set {
        /// Node name, optionally REMOTE:NAME
        name: String,
        key: String,
        value: String,
    },
    /// Remove a node setting
    Unset {
        /// Node name, optionally REMOTE:NAME
        name: String,
        key: String,
    },
    /// Move every instance off a node (or stop them) and place nothing new on it
    Evacuate {
        /// Node name, optionally REMOTE:NAME
        name: String,
        /// What happens to its instances: move (running ones move live) or stop
        #[arg(long, value_name = "ACTION", default_value = "move", value_parser = ["move", "stop"])]
        action: String,
        /// Do not ask for confirmation
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Bring an evacuated node's instances back and let it take new ones
    Restore {
        /// Node name, optionally REMOTE:NAME
        name: String,
        /// Do not ask for confirmation
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Show a cluster-wide setting (KEY, or REMOTE:KEY)
    GetConfig { key: String },
    /// Set a cluster-wide setting, e.g. scheduler.policy binpack (KEY may be REMOTE:KEY)
    SetConfig { key: String, value: String },
    /// Remove a cluster-wide setting (KEY, or REMOTE:KEY)
    UnsetConfig { key: String },
}

/// Header of the controllers table.
pub const CONTROLLER_HEADER: [&str; 6] = ["NAME", "ID", "ROLE", "STATE", "API", "PEER"];

/// Header of the nodes table.
pub const NODE_HEADER: [&str; 7] = [
    "NAME",
    "STATUS",
    "CPU (USED/TOTAL)",
    "MEMORY (USED/TOTAL)",
    "STORAGE (FREE/TOTAL)",
    "INSTANCES",
    "LABELS",
];

/// Rows of the controllers table: the leader first, then by name.
pub fn controller_rows(controllers: &[ClusterController]) -> Vec<Vec<String>> {
    let mut list: Vec<&ClusterController> = controllers.iter().collect();
    list.sort_by(|a, b| (a.role != "leader", &a.name).cmp(&(b.role != "leader", &b.name)));
    list.iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.id.to_string(),
                c.role.clone(),
                c.state.to_uppercase(),
                c.api_address.clone(),
                c.peer_address.clone(),
            ]
        })
        .collect()
}

/// Rows of the nodes table, by name.
pub fn node_rows(nodes: &[ClusterNode]) -> Vec<Vec<String>> {
    let mut list: Vec<&ClusterNode> = nodes.iter().collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list.iter()
        .map(|n| {
            let mut status = n.status.to_uppercase();
            if n.evacuated {
                status.push_str(" (EVACUATED)");
            }
            if n.config.get("scheduler.instance").map(String::as_str) == Some("manual") {
                status.push_str(" (MANUAL)");
            }
            vec![
                n.name.clone(),
                status,
                format!("{}/{}", n.allocated.cpus, n.total.cpus),
                format!(
                    "{}/{}",
                    human_bytes(n.allocated.memory_bytes),
                    human_bytes(n.total.memory_bytes)
                ),
                if n.total.storage_bytes == 0 {
                    String::new()
                } else {
                    format!(
                        "{}/{}",
                        human_bytes(n.storage_free_bytes),
                        human_bytes(n.total.storage_bytes)
                    )
                },
                n.instances.to_string(),
                n.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ]
        })
        .collect()
}

/// Renders `cluster list`: two tables (controllers, then nodes) for table and compact; for
/// csv one line per member whose first field is `controller` or `node`; the whole answer for
/// json and yaml.
pub fn render_list(cluster: &Cluster, format: Format) -> anyhow::Result<String> {
    let controllers = controller_rows(&cluster.controllers);
    let nodes = node_rows(&cluster.nodes);
    Ok(match format {
        Format::Table | Format::Compact => {
            let mut out = String::from("Controllers:\n");
            out.push_str(&output::render(
                format,
                &CONTROLLER_HEADER,
                &controllers,
                &(),
            )?);
            out.push_str("\nNodes:\n");
            out.push_str(&output::render(format, &NODE_HEADER, &nodes, &())?);
            out
        }
        Format::Csv => {
            let tagged = |kind: &str, rows: Vec<Vec<String>>| -> Vec<Vec<String>> {
                rows.into_iter()
                    .map(|r| {
                        std::iter::once(kind.to_string())
                            .chain(r.into_iter().map(|c| c.replace('\n', ",")))
                            .collect()
                    })
                    .collect()
            };
            let mut rows = tagged("controller", controllers);
            rows.extend(tagged("node", nodes));
            output::csv(&rows)
        }
        Format::Json => output::json(cluster)?,
        Format::Yaml => output::yaml(cluster)?,
    })
}

/// `https://` URLs of the controllers' APIs, leaving out addresses a client cannot use
/// (unspecified hosts such as `0.0.0.0`).
pub fn controller_urls(controllers: &[ClusterController]) -> Vec<String> {
    controllers
        .iter()
        .filter_map(|c| {
            let a = c.api_address.trim();
            if a.is_empty() {
                return None;
            }
            if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
                if sa.ip().is_unspecified() || sa.port() == 0 {
                    return None;
                }
                return Some(format!("https://{sa}"));
            }
            let host = a.rsplit_once(':').map(|(h, _)| h).unwrap_or(a);
            if host.is_empty() {
                return None;
            }
            Some(format!("https://{a}"))
        })
        .collect()
}

/// Asks the cluster for its controllers' API addresses.
pub async fn learn_urls(client: &Client) -> anyhow::Result<Vec<String>> {
    let cluster: Cluster = client.get("/1.0/cluster").await?;
    Ok(controller_urls(&cluster.controllers))
}

/// Adds addresses of `remote` learned from the cluster to the configuration (a remote
/// trusted by a CA only: controllers have certificates of their own). Best effort: a failure
/// to save is not the command's failure.
fn remember_urls(ctx: &Ctx, remote: Option<&str>, learned: Vec<String>) {
    let Ok(target) = ctx.config.target(remote, &ctx.env) else {
        return;
    };
    if target.name == "env" || learned.is_empty() {
        return;
    }
    let mut config = ctx.config.clone();
    let Some(r) = config.remotes.get_mut(&target.name) else {
        return;
    };
    if r.ca_file.is_none() {
        return;
    }
    let before = r.urls();
    let mut all = before.clone();
    all.extend(learned);
    r.set_urls(&all);
    if r.urls() != before {
        let _ = config.save(&ctx.config_path);
    }
}

/// Splits `[REMOTE:]NAME` and checks that the name is there.
fn member_arg<'a>(ctx: &Ctx, arg: &'a str) -> anyhow::Result<(Client, &'a str)> {
    let (client, name) = ctx.resolve(arg)?;
    if name.is_empty() {
        anyhow::bail!("no member name given");
    }
    Ok((client, name))
}

/// Asks a yes/no question; without a terminal it is an error telling to use --force.
fn confirm(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("cannot ask for confirmation without a terminal: pass --force");
    }
    let mut out = std::io::stdout();
    let _ = out.write_all(question.as_bytes());
    let _ = out.flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

/// `host:port` of a client's URL (what `berthd --join` takes).
/// The address after `--join` in a `berthd --join ADDRESS ...` command.
fn join_address(command: &str) -> Option<String> {
    let mut words = command.split_whitespace();
    words.find(|w| *w == "--join")?;
    words.next().map(str::to_string)
}

/// What to do on a new controller (as docs/operator-guide.md says): the token goes in the
/// service's environment file, not on a command line where `ps` shows it.
fn controller_join_steps(join: &str, token: &str) -> Vec<String> {
    vec![
        format!("On the new controller, set join = \"{join}\" at the top of /etc/berth/berthd.toml, then run:"),
        format!(
            "  (umask 077 && echo BERTHD_JOIN_TOKEN={token} >/etc/berth/berthd.env) && systemctl enable --now berthd"
        ),
        "Remove the token from /etc/berth/berthd.env once `berth cluster list` shows the controller."
            .to_string(),
    ]
}

/// The agent's join command (as docs/operator-guide.md says), for a server that gives none.
fn agent_join_command(token: &str) -> String {
    format!(
        "(umask 077 && echo {token} >/etc/berth/join-token) && berth-agent join --join-token-file /etc/berth/join-token && systemctl enable --now berth-agent"
    )
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

/// A cluster-wide setting's value as GET /1.0/cluster reports it.
fn config_value(cluster: &serde_json::Value, key: &str) -> anyhow::Result<Option<String>> {
    let Some(config) = cluster.get("config") else {
        anyhow::bail!("the server does not report the cluster-wide settings");
    };
    let config: BTreeMap<String, String> = serde_json::from_value(config.clone())
        .map_err(|e| anyhow::anyhow!("cannot decode the cluster-wide settings: {e}"))?;
    Ok(config.get(key).cloned())
}

async fn patch_cluster_config(
    client: &Client,
    key: &str,
    value: Option<String>,
) -> anyhow::Result<()> {
    let body = ClusterMemberPatch {
        config: BTreeMap::from([(key.to_string(), value)]),
    };
    let resp = client
        .call(Method::PATCH, "/1.0/cluster", Some(&body))
        .await?;
    client.finish(resp).await?;
    Ok(())
}

async fn patch_member(
    client: &Client,
    name: &str,
    key: &str,
    value: Option<String>,
) -> anyhow::Result<()> {
    if key.trim().is_empty() {
        anyhow::bail!("no key given");
    }
    let body = ClusterMemberPatch {
        config: BTreeMap::from([(key.to_string(), value)]),
    };
    let resp = client
        .call(
            Method::PATCH,
            &format!("/1.0/cluster/members/{}", encode_query(name)),
            Some(&body),
        )
        .await?;
    client.finish(resp).await?;
    Ok(())
}

/// `POST /1.0/cluster/members/NAME/state`, waits, and prints what happened to each instance.
async fn change_member_state(
    client: &Client,
    name: &str,
    body: &ClusterMemberStatePost,
) -> anyhow::Result<()> {
    let resp = client
        .call(
            Method::POST,
            &format!("/1.0/cluster/members/{}/state", encode_query(name)),
            Some(body),
        )
        .await?;
    let op = match resp.kind {
        berth_proto::api::ResponseType::Async => {
            let id = crate::client::operation_of(&resp)?.id;
            super::transfer::poll_until_done(client, &id, Duration::from_secs(30), |_| {}).await?
        }
        _ => client.finish(resp).await?,
    };
    // The results first, also when some failed: they say which ones and why.
    for line in member_state_results(&op.metadata) {
        say(&line);
    }
    super::transfer::operation_result(op)?;
    Ok(())
}

/// One instance's result as a short phrase: its outcome, the node, and an error if any.
fn describe_result(v: &serde_json::Value) -> String {
    let text = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str()).filter(|x| !x.is_empty()))
            .map(str::to_string)
    };
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(_) => {
            let mut parts = Vec::new();
            let result = text(&["result", "status", "action", "outcome"]);
            let went = matches!(result.as_deref(), Some("moved" | "returned"));
            if let Some(r) = result {
                parts.push(r);
            }
            if let Some(n) = text(&["node", "target", "location"]) {
                parts.push(if went {
                    format!("to {n}")
                } else {
                    format!("on {n}")
                });
            }
            if let Some(e) = text(&["error", "err", "message"]) {
                parts.push(format!("({e})"));
            }
            if parts.is_empty() {
                v.to_string()
            } else {
                parts.join(" ")
            }
        }
        other => other.to_string(),
    }
}

/// The per-instance lines of an evacuation or restore (`NAME: RESULT`), from the operation's
/// metadata: a map of instance to result, or a list of results naming their instance, either
/// at the top or under `instances`/`results`.
pub fn member_state_results(meta: &serde_json::Value) -> Vec<String> {
    let inner = meta
        .get("instances")
        .or_else(|| meta.get("results"))
        .unwrap_or(meta);
    match inner {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(name, v)| format!("{name}: {}", describe_result(v)))
            .collect(),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|item| {
                let name = ["name", "instance"]
                    .iter()
                    .find_map(|k| item.get(*k).and_then(|x| x.as_str()))
                    .map(|n| match item.get("project").and_then(|p| p.as_str()) {
                        Some(p) if !p.is_empty() && p != "default" => format!("{n} (project {p})"),
                        _ => n.to_string(),
                    });
                match name {
                    Some(n) => format!("{n}: {}", describe_result(item)),
                    None => describe_result(item),
                }
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs a cluster subcommand.
pub async fn run(ctx: &Ctx, command: ClusterCommand) -> anyhow::Result<i32> {
    match command {
        ClusterCommand::List { remote, format } => {
            let remote = remote.as_deref().map(|r| r.trim_end_matches(':'));
            let client = ctx.client(remote)?;
            let cluster: Cluster = client.get("/1.0/cluster").await?;
            print(&render_list(&cluster, format)?);
            remember_urls(ctx, remote, controller_urls(&cluster.controllers));
        }
        ClusterCommand::Show { name } => {
            let (client, name) = member_arg(ctx, &name)?;
            let member: serde_json::Value = client
                .get(&format!("/1.0/cluster/members/{}", encode_query(name)))
                .await?;
            print(&output::yaml(&member)?);
        }
        ClusterCommand::AddController { name } => {
            let (client, name) = member_arg(ctx, &name)?;
            let meta = client
                .sync(
                    Method::POST,
                    "/1.0/cluster/controller-tokens",
                    Some(&serde_json::json!({ "name": name })),
                )
                .await?;
            let resp: JoinTokenResponse = crate::client::decode_metadata(meta)?;
            if resp.token.is_empty() {
                anyhow::bail!("the server returned no join token");
            }
            // The address to join through: the one the server's command names, else ours.
            let join = join_address(&resp.command).unwrap_or_else(|| host_port(&client.url()));
            say(&format!("Controller {name} join token:"));
            say(&resp.token);
            say("");
            for line in controller_join_steps(&join, &resp.token) {
                say(&line);
            }
        }
        ClusterCommand::AddNode { name } => {
            let (client, name) = member_arg(ctx, &name)?;
            let meta = client
                .sync(
                    Method::POST,
                    "/1.0/cluster/join-tokens",
                    Some(&serde_json::json!({ "name": name })),
                )
                .await?;
            let token = meta
                .get("token")
                .and_then(|t| t.as_str())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| anyhow::anyhow!("the server returned no join token"))?;
            let command = meta
                .get("command")
                .and_then(|c| c.as_str())
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| agent_join_command(token));
            say(&format!("Member {name} join token:"));
            say(token);
            say("");
            say("On the new node run:");
            say(&format!("  {command}"));
        }
        ClusterCommand::Remove { name, force } => {
            let (client, name) = member_arg(ctx, &name)?;
            if !force && !confirm(&format!("Remove cluster member {name}? (y/N) "))? {
                anyhow::bail!("not removed");
            }
            let resp = client
                .call::<()>(
                    Method::DELETE,
                    &format!("/1.0/cluster/members/{}", encode_query(name)),
                    None,
                )
                .await?;
            client.finish(resp).await?;
            say(&format!("Member {name} removed"));
        }
        ClusterCommand::Set { name, key, value } => {
            let (client, name) = member_arg(ctx, &name)?;
            patch_member(&client, name, &key, Some(value)).await?;
        }
        ClusterCommand::Unset { name, key } => {
            let (client, name) = member_arg(ctx, &name)?;
            patch_member(&client, name, &key, None).await?;
        }
        ClusterCommand::Evacuate {
            name,
            action,
            force,
        } => {
            let (client, name) = member_arg(ctx, &name)?;
            let question = format!(
                "Are you sure you want to evacuate cluster member \"{name}\"? (yes/no) [default=no]: "
            );
            if !force && std::io::stdin().is_terminal() && !confirm(&question)? {
                anyhow::bail!("not evacuated");
            }
            let body = ClusterMemberStatePost {
                action: "evacuate".into(),
                mode: action,
            };
            change_member_state(&client, name, &body).await?;
        }
        ClusterCommand::Restore { name, force } => {
            let (client, name) = member_arg(ctx, &name)?;
            let question = format!(
                "Are you sure you want to restore cluster member \"{name}\"? (yes/no) [default=no]: "
            );
            if !force && std::io::stdin().is_terminal() && !confirm(&question)? {
                anyhow::bail!("not restored");
            }
            let body = ClusterMemberStatePost {
                action: "restore".into(),
                mode: String::new(),
            };
            change_member_state(&client, name, &body).await?;
        }
        ClusterCommand::GetConfig { key } => {
            let (client, key) = config_key_arg(ctx, &key)?;
            let cluster: serde_json::Value = client.get("/1.0/cluster").await?;
            say(&config_value(&cluster, key)?.unwrap_or_default());
        }
        ClusterCommand::SetConfig { key, value } => {
            let (client, key) = config_key_arg(ctx, &key)?;
            patch_cluster_config(&client, key, Some(value)).await?;
        }
        ClusterCommand::UnsetConfig { key } => {
            let (client, key) = config_key_arg(ctx, &key)?;
            patch_cluster_config(&client, key, None).await?;
        }
    }
    Ok(0)
}

/// Splits `[REMOTE:]KEY` (a prefix that is not a configured remote stays part of the key).
fn config_key_arg<'a>(ctx: &Ctx, arg: &'a str) -> anyhow::Result<(Client, &'a str)> {
    let (client, key) = match split_remote(arg) {
        (Some(r), rest) if ctx.config.remotes.contains_key(r) => (ctx.client(Some(r))?, rest),
        _ => (ctx.client(None)?, arg),
    };
    if key.trim().is_empty() {
        anyhow::bail!("no key given");
    }
    Ok((client, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::api::NodeResources;

    #[test]
    fn join_address_from_the_servers_command() {
        assert_eq!(
            join_address("berthd --join 10.0.0.1:8443 --token T").as_deref(),
            Some("10.0.0.1:8443")
        );
        assert_eq!(join_address(""), None);
        assert_eq!(join_address("berthd --join"), None);
        let steps = controller_join_steps("a:1", "TOK").join("\n");
        assert!(
            steps.contains("BERTHD_JOIN_TOKEN=TOK >/etc/berth/berthd.env"),
            "{steps}"
        );
        assert!(!steps.contains("--token"), "{steps}");
    }

    fn sample() -> Cluster {
        Cluster {
            name: "berth".into(),
            answered_by: "c2".into(),
            controllers: vec![
                ClusterController {
                    name: "c2".into(),
                    id: 2,
                    peer_address: "10.0.0.2:8444".into(),
                    api_address: "10.0.0.2:8443".into(),
                    role: "voter".into(),
                    state: "online".into(),
                },
                ClusterController {
                    name: "c1".into(),
                    id: 1,
                    peer_address: "10.0.0.1:8444".into(),
                    api_address: "0.0.0.0:8443".into(),
                    role: "leader".into(),
                    state: "online".into(),
                },
            ],
            nodes: vec![ClusterNode {
                name: "n1".into(),
                address: "10.0.1.1:8445".into(),
                status: "Online".into(),
                labels: BTreeMap::from([
                    ("rack".into(), "r1".into()),
                    ("ssd".into(), "true".into()),
                ]),
                config: BTreeMap::from([("scheduler.instance".into(), "manual".into())]),
                total: NodeResources {
                    cpus: 8,
                    memory_bytes: 16 << 30,
                    storage_bytes: 100 << 30,
                },
                allocated: NodeResources {
                    cpus: 3,
                    memory_bytes: 1 << 30,
                    storage_bytes: 0,
                },
                storage_free_bytes: 60 << 30,
                instances: 3,
                ..Default::default()
            }],
            config: BTreeMap::new(),
        }
    }

    #[test]
    fn list_tables() {
        let text = render_list(&sample(), Format::Table).unwrap();
        let expected = "\
Controllers:
+------+----+--------+--------+---------------+---------------+
| NAME | ID |  ROLE  | STATE  |      API      |     PEER      |
+------+----+--------+--------+---------------+---------------+
| c1   | 1  | leader | ONLINE | 0.0.0.0:8443  | 10.0.0.1:8444 |
+------+----+--------+--------+---------------+---------------+
| c2   | 2  | voter  | ONLINE | 10.0.0.2:8443 | 10.0.0.2:8444 |
+------+----+--------+--------+---------------+---------------+

Nodes:
+------+-----------------+------------------+---------------------+----------------------+-----------+----------+
| NAME |     STATUS      | CPU (USED/TOTAL) | MEMORY (USED/TOTAL) | STORAGE (FREE/TOTAL) | INSTANCES |  LABELS  |
+------+-----------------+------------------+---------------------+----------------------+-----------+----------+
| n1   | ONLINE (MANUAL) | 3/8              | 1.00GiB/16.00GiB    | 60.00GiB/100.00GiB   | 3         | rack=r1  |
|      |                 |                  |                     |                      |           | ssd=true |
+------+-----------------+------------------+---------------------+----------------------+-----------+----------+
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn list_csv_and_json() {
        assert_eq!(
            render_list(&sample(), Format::Csv).unwrap(),
            "controller,c1,1,leader,ONLINE,0.0.0.0:8443,10.0.0.1:8444\n\
             controller,c2,2,voter,ONLINE,10.0.0.2:8443,10.0.0.2:8444\n\
             node,n1,ONLINE (MANUAL),3/8,1.00GiB/16.00GiB,60.00GiB/100.00GiB,3,\"rack=r1,ssd=true\"\n"
        );
        let json = render_list(&sample(), Format::Json).unwrap();
        let back: Cluster = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn urls_of_controllers() {
        let mut s = sample();
        s.controllers.push(ClusterController {
            name: "c3".into(),
            api_address: "[fd00::3]:8443".into(),
            ..Default::default()
        });
        s.controllers.push(ClusterController {
            name: "c4".into(),
            api_address: "ctl4.example:8443".into(),
            ..Default::default()
        });
        assert_eq!(
            controller_urls(&s.controllers),
            [
                "https://10.0.0.2:8443",
                "https://[fd00::3]:8443",
                "https://ctl4.example:8443"
            ]
        );
    }

    #[test]
    fn evacuation_results() {
        // The server's shape (controller/src/api/evacuate.rs, EvacuationMetadata).
        let meta = serde_json::json!({"node": "node1", "action": "evacuate", "mode": "move",
            "instances": [
                {"instance": "web1", "project": "default", "result": "moved", "node": "node2", "error": ""},
                {"instance": "db", "project": "a", "result": "failed", "node": "node1",
                 "error": "node3 is offline"},
                {"instance": "batch", "project": "default", "result": "stopped", "node": "node1", "error": ""}
        ]});
        assert_eq!(
            member_state_results(&meta),
            [
                "web1: moved to node2",
                "db (project a): failed on node1 (node3 is offline)",
                "batch: stopped on node1"
            ]
        );
        let map =
            serde_json::json!({"web1": "moved", "db": {"status": "returned", "target": "n1"}});
        assert_eq!(
            member_state_results(&map),
            ["db: returned to n1", "web1: moved"]
        );
        assert!(member_state_results(&serde_json::Value::Null).is_empty());
    }

    #[test]
    fn cluster_config_values() {
        let v = serde_json::json!({"config": {"scheduler.policy": "binpack"}});
        assert_eq!(
            config_value(&v, "scheduler.policy").unwrap().as_deref(),
            Some("binpack")
        );
        assert_eq!(config_value(&v, "other").unwrap(), None);
        assert!(config_value(&serde_json::json!({}), "x").is_err());
    }
}
