//! `berth operation list|show|delete`.

use berth_proto::api::Operation;
use clap::Subcommand;
use http::Method;

use crate::client::encode_query;
use crate::output::{self, Format};
use crate::{Ctx, print};

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
    },
    /// Show details of a background operation (YAML)
    Show {
        /// Operation id, optionally REMOTE:ID
        id: String,
    },
    /// Cancel and delete a background operation
    #[command(visible_alias = "rm")]
    Delete {
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

/// Table rows of `operation list`.
pub fn operation_rows(ops: &[Operation]) -> Vec<Vec<String>> {
    ops.iter()
        .map(|o| {
            vec![
                o.id.clone(),
                o.class.to_uppercase(),
                o.description.clone(),
                format!("{:?}", o.status).to_uppercase(),
                if o.may_cancel { "YES" } else { "NO" }.into(),
                o.created_at.clone(),
            ]
        })
        .collect()
}

/// Runs an operation subcommand.
pub async fn run(ctx: &Ctx, command: OperationCommand) -> anyhow::Result<i32> {
    match command {
        OperationCommand::List { remote, format } => {
            let remote = remote.as_deref().map(|r| r.trim_end_matches(':'));
            let client = ctx.client(remote)?;
            let meta = client
                .sync::<()>(Method::GET, "/1.0/operations?recursion=1", None)
                .await?;
            let ops = flatten_operations(meta)?;
            print(&output::render(
                format,
                &[
                    "ID",
                    "TYPE",
                    "DESCRIPTION",
                    "STATUS",
                    "CANCELABLE",
                    "CREATED",
                ],
                &operation_rows(&ops),
                &ops,
            )?);
        }
        OperationCommand::Show { id } => {
            let (client, id) = ctx.resolve(&id)?;
            let op: Operation = client
                .get(&format!("/1.0/operations/{}", encode_query(id)))
                .await?;
            print(&output::yaml(&op)?);
        }
        OperationCommand::Delete { id } => {
            let (client, id) = ctx.resolve(&id)?;
            client
                .sync::<()>(
                    Method::DELETE,
                    &format!("/1.0/operations/{}", encode_query(id)),
                    None,
                )
                .await?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::api::OperationStatus;

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
            operation_rows(&[op("a", "1")])[0],
            ["a", "TASK", "Starting instance", "RUNNING", "NO", "1"]
        );
    }
}
