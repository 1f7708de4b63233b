//! `berth cluster list|add`: cluster members and join tokens.

use berth_proto::api::ClusterMember;
use clap::Subcommand;
use http::Method;

use crate::output::{self, Format};
use crate::{Ctx, print, say};

/// Cluster subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// List all the cluster members
    #[command(visible_alias = "ls")]
    List {
        /// REMOTE: to list
        remote: Option<String>,
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
    },
    /// Request a join token for adding a cluster member (an agent node)
    Add {
        /// Name of the new member, optionally REMOTE:NAME
        name: String,
    },
}

/// Table rows of `cluster list`.
pub fn member_rows(members: &[ClusterMember]) -> Vec<Vec<String>> {
    members
        .iter()
        .map(|m| {
            vec![
                m.server_name.clone(),
                m.url.clone(),
                m.roles.join("\n"),
                m.status.to_uppercase(),
                m.message.clone(),
            ]
        })
        .collect()
}

/// Runs a cluster subcommand.
pub async fn run(ctx: &Ctx, command: ClusterCommand) -> anyhow::Result<i32> {
    match command {
        ClusterCommand::List { remote, format } => {
            let remote = remote.as_deref().map(|r| r.trim_end_matches(':'));
            let client = ctx.client(remote)?;
            let mut members: Vec<ClusterMember> =
                client.get("/1.0/cluster/members?recursion=1").await?;
            members.sort_by(|a, b| a.server_name.cmp(&b.server_name));
            print(&output::render(
                format,
                &["NAME", "URL", "ROLES", "STATE", "MESSAGE"],
                &member_rows(&members),
                &members,
            )?);
        }
        ClusterCommand::Add { name } => {
            let (client, name) = ctx.resolve(&name)?;
            if name.is_empty() {
                anyhow::bail!("no member name given");
            }
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
                .ok_or_else(|| anyhow::anyhow!("the server returned no join token"))?;
            say(&format!("Member {name} join token:"));
            say(token);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows() {
        let m = ClusterMember {
            server_name: "node1".into(),
            url: "https://10.0.0.1:8444".into(),
            roles: vec!["agent".into()],
            status: "Online".into(),
            message: String::new(),
        };
        assert_eq!(
            member_rows(&[m]),
            vec![vec![
                "node1".to_string(),
                "https://10.0.0.1:8444".into(),
                "agent".into(),
                "ONLINE".into(),
                String::new()
            ]]
        );
    }
}
