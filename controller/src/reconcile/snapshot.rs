//! Snapshot actions on an instance's node: take, delete, rename, restore.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Outcome;
use crate::agents::AgentConn;
use crate::api::AppState;
use crate::state::{Instance, Node, PendingAction};

/// One attempt at a snapshot action (`Snapshot`, `DeleteSnapshot`, `RenameSnapshot`,
/// `Restore`) of `inst` on its node.
pub(super) async fn execute(
    state: &Arc<AppState>,
    inst: &Instance,
    config: &BTreeMap<String, String>,
    node: &Node,
    client: &mut AgentConn,
    action: &PendingAction,
) -> Outcome {
    let _ = (state, inst, config, node, client);
    Outcome::Failed(
        None,
        format!("{} is not available yet", action.action.describe()),
    )
}
