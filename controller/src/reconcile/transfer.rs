//! Copy and move: `CopyFrom` (same node: btrfs snapshots; another node: a btrfs send stream
//! between the agents) and `Migrate` (stopped: send and receive; running: pre-copy passes, a
//! short stop, the final pass, a start on the target).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Outcome;
use crate::agents::AgentConn;
use crate::api::AppState;
use crate::state::{Instance, Node, PendingAction};

/// One attempt at `CopyFrom` (on the new instance, whose node is the target) or `Migrate` (on
/// the moving instance; `node` is where it is now).
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
