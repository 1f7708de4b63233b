//! `berth operation list|show|wait|cancel`.

use berth_proto::api::{Operation, OperationStatus};
use clap::Subcommand;
use http::Method;

use crate::client::encode_query;
use crate::output::{self, Format};
use crate::{Ctx, print, say};

/// Operation subcommands.
#[derive(Debug, Subcommand)]
pub enum OperationCommand {
    /// List background operations
    #[command(visible_alias = "ls")]
    List {
        /// REMOTE: to list
        remote: Option<String>,
        /// Format (table, compact, csv, json, yaml)
        #[arg(short = 'f', long, default_value = "table")]
        format: Format,
        /// Operations of every project (with a PROJECT column)
        #[arg(long)]
        all_projects: bool,
    },
    /// Show details of a background operation (YAML)
    Show {
        /// Operation id, optionally REMOTE:ID
        id: String,
    },
    /// Wait for a background operation to end; fails when it failed
    Wait {
        /// Operation id, optionally REMOTE:ID
        id: String,
        /// Give up after this many seconds (default: wait until it ends)
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Cancel a background operation
    #[command(visible_aliases = ["delete", "rm"])]
    Cancel {
        /// Operation id, optionally REMOTE:ID
        id: String,
    },
}

/// Operations from a `GET /1.0/operations?recursion=1` answer: LXD groups them by status
/// (`{"running": [...], "success": [...]}`); a plain list is accepted too.
pub fn flatten_operations(metadata: serde_json::Value) -> anyhow::Result<Vec<Operation>> {
    let mut ops: Vec<Operation> = match metadata {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::Array(_) => serde_json::from_value(metadata)?,
        serde_json::Value::Object(groups) => {
            let mut all = Vec::new();
            for (_, v) in groups {
                let list: Vec<Operation> = serde_json::from_value(v)?;
                all.extend(list);
            }
            all
        }
        _ => anyhow::bail!("the operation list is not a list"),
    };
    ops.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(ops)
}

/// The headers of `operation list`, with PROJECT first for `--all-projects`.
pub fn operation_header(all_projects: bool) -> Vec<&'static str> {
    let mut h = vec!["ID", "CLASS", "DESCRIPTION", "STATUS", "CREATED"];
    if all_projects {
        h.insert(0, "PROJECT");
    }
    h
}

/// Table rows of `operation list`.
pub fn operation_rows(ops: &[Operation], all_projects: bool) -> Vec<Vec<String>> {
    ops.iter()
        .map(|o| {
            let mut row = vec![
                o.id.clone(),
                o.class.to_uppercase(),
                o.description.clone(),
                format!("{:?}", o.status).to_uppercase(),
                o.created_at.clone(),
            ];
            if all_projects {
                row.insert(0, o.project.clone());
            }
            row
        })
        .collect()
}

fn operation_path(id: &str) -> String {
    format!("/1.0/operations/{}", encode_query(id))
}

/// Runs an operation subcommand.
pub async fn run(ctx: &Ctx, command: OperationCommand) -> anyhow::Result<i32> {
    match command {
        OperationCommand::List {
            remote,
            format,
            all_projects,
        } => {
            let client = ctx.client(super::remote_arg(remote.as_deref()))?;
            let path = if all_projects {
                "/1.0/operations?recursion=1&all-projects=true"
            } else {
                "/1.0/operations?recursion=1"
            };
            let meta = client.sync::<()>(Method::GET, path, None).await?;
            let ops = flatten_operations(meta)?;
            print(&output::render(
                format,
                &operation_header(all_projects),
                &operation_rows(&ops, all_projects),
                &ops,
            )?);
        }
        OperationCommand::Show { id } => {
            let (client, id) = ctx.resolve(&id)?;
            let op: Operation = client.get(&operation_path(id)).await?;
            print(&output::yaml(&op)?);
        }
        OperationCommand::Wait { id, timeout } => {
            let (client, id) = ctx.resolve(&id)?;
            if id.is_empty() {
                anyhow::bail!("no operation id given");
            }
            let op = match timeout {
                None => client.wait(id).await?,
                Some(t) => {
                    let op: Operation = client
                        .get(&format!("{}/wait?timeout={t}", operation_path(id)))
                        .await?;
                    match op.status {
                        OperationStatus::Success => op,
                        OperationStatus::Failure => anyhow::bail!(
                            "{}",
                            if op.err.is_empty() {
                                format!("operation {} failed", op.id)
                            } else {
                                op.err
                            }
                        ),
                        OperationStatus::Cancelled => {
                            anyhow::bail!("operation {} was cancelled", op.id)
                        }
                        _ => anyhow::bail!("operation {id} is still running after {t} s"),
                    }
                }
            };
            say(&format!("Operation {} succeeded", op.id));
        }
        OperationCommand::Cancel { id } => {
            let (client, id) = ctx.resolve(&id)?;
            if id.is_empty() {
                anyhow::bail!("no operation id given");
            }
            client
                .sync::<()>(Method::DELETE, &operation_path(id), None)
                .await?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: &str, created: &str) -> Operation {
        Operation {
            id: id.into(),
            class: "task".into(),
            description: "Starting instance".into(),
            created_at: created.into(),
            status: OperationStatus::Running,
            ..Default::default()
        }
    }

    #[test]
    fn grouped_and_plain_lists() {
        let grouped = serde_json::json!({
            "running": [op("b", "2")],
            "success": [op("a", "1")],
        });
        let ops = flatten_operations(grouped).unwrap();
        assert_eq!(
            ops.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let plain = serde_json::to_value(vec![op("c", "3")]).unwrap();
        assert_eq!(flatten_operations(plain).unwrap().len(), 1);
        assert!(
            flatten_operations(serde_json::Value::Null)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            operation_rows(&[op("a", "1")], false)[0],
            ["a", "TASK", "Starting instance", "RUNNING", "1"]
        );
        let mut o = op("a", "1");
        o.project = "team-a".into();
        assert_eq!(operation_rows(&[o], true)[0][0], "team-a");
        assert_eq!(operation_header(true)[0], "PROJECT");
    }
}
