//! Snapshot actions on an instance's node: take, delete, rename, restore.
//!
//! Each attempt is safe to repeat (a new leader runs the action again): the agent takes a
//! snapshot that exists and deletes a missing one without complaint, a rename that already
//! happened is recognised from the node's list, and a restore stops, restores and starts by
//! what the user wants (`desired`), not by what an earlier attempt left.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::api::InstanceStatusCode;
use berth_proto::v1;
use tracing::info;

use super::{Outcome, call, failed_config, passing, update_config};
use crate::agents::AgentConn;
use crate::api::AppState;
use crate::api::instances::observed_from;
use crate::state::{Action, DesiredState, Instance, Node, PendingAction};

/// Deadline of one snapshot call (taking, deleting and restoring are btrfs snapshot
/// operations; on the dir driver they copy the filesystem, which takes longer).
const SNAPSHOT_CALL: Duration = Duration::from_secs(300);

/// Deadline of the forced stop before a restore (the agent kills init, then waits up to 15 s
/// for the instance's monitor to clean up).
const FORCED_STOP_CALL: Duration = Duration::from_secs(60);

/// The outcome of a failed agent call: passing failures are retried.
fn failed(e: &tonic::Status, what: &str) -> Outcome {
    if passing(e) {
        Outcome::Retry(e.message().to_string())
    } else {
        Outcome::Failed(None, format!("{what}: {}", e.message()))
    }
}

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
    let name = inst.name.clone();
    let request = |snapshot: &str| v1::SnapshotRequest {
        instance: name.clone(),
        snapshot: snapshot.to_string(),
    };
    match &action.action {
        Action::Snapshot { name: snap, .. } => {
            match client
                .create_snapshot(call(request(snap), SNAPSHOT_CALL))
                .await
            {
                Ok(_) => Outcome::Done(None),
                // An earlier attempt took it and its answer was lost: apply refused the name
                // if the state knew it, so it is this action's.
                Err(e) if e.code() == tonic::Code::AlreadyExists => Outcome::Done(None),
                Err(e) => failed(&e, &format!("could not take snapshot {snap:?}")),
            }
        }
        Action::DeleteSnapshot { name: snap } => {
            match client
                .delete_snapshot(call(request(snap), SNAPSHOT_CALL))
                .await
            {
                Ok(_) => Outcome::Done(None),
                Err(e) if e.code() == tonic::Code::NotFound => Outcome::Done(None),
                Err(e) => failed(&e, &format!("could not delete snapshot {snap:?}")),
            }
        }
        Action::RenameSnapshot { from, to } => rename(client, &name, from, to).await,
        Action::Restore { snapshot } => restore(state, inst, config, node, client, snapshot).await,
        other => Outcome::Failed(
            None,
            format!("{} is not a snapshot action", other.describe()),
        ),
    }
}

/// Renames snapshot `from` to `to`; a rename an earlier attempt made counts as done.
async fn rename(client: &mut AgentConn, name: &str, from: &str, to: &str) -> Outcome {
    let renamed = client
        .rename_snapshot(call(
            v1::RenameSnapshotRequest {
                instance: name.to_string(),
                snapshot: from.to_string(),
                new_name: to.to_string(),
            },
            SNAPSHOT_CALL,
        ))
        .await;
    let e = match renamed {
        Ok(_) => return Outcome::Done(None),
        Err(e) => e,
    };
    if e.code() == tonic::Code::NotFound {
        // Done already when the node has `to` and not `from`.
        if let Ok(list) = client
            .list_snapshots(crate::agents::short(v1::InstanceRef {
                name: name.to_string(),
            }))
            .await
        {
            let names: Vec<&str> = list
                .get_ref()
                .snapshots
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            if names.contains(&to) && !names.contains(&from) {
                return Outcome::Done(None);
            }
        }
    }
    failed(&e, &format!("could not rename snapshot {from:?} to {to:?}"))
}

/// Stops the instance if it runs (forced: its disk state is replaced anyway), puts its root
/// filesystem back to `snapshot`, and starts it again when the user wants it running.
async fn restore(
    state: &Arc<AppState>,
    inst: &Instance,
    config: &BTreeMap<String, String>,
    node: &Node,
    client: &mut AgentConn,
    snapshot: &str,
) -> Outcome {
    let name = inst.name.clone();
    let reference = || v1::InstanceRef { name: name.clone() };
    let now = match client
        .instance_state(crate::agents::short(reference()))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return failed(&e, "could not read the instance's state"),
    };
    if now.state == v1::InstanceState::Running as i32 {
        // Killed, not shut down cleanly (as LXD does): the restore throws the disk's state
        // away, so a clean shutdown would only make the restore wait for it.
        info!(node = %node.name, snapshot, "stopping the instance to restore it");
        if let Err(e) = client
            .stop_instance(call(
                v1::StopInstanceRequest {
                    name: name.clone(),
                    force: true,
                    timeout_secs: 0,
                },
                FORCED_STOP_CALL,
            ))
            .await
        {
            return failed(&e, "could not stop the instance to restore it");
        }
    }
    let restored = match client
        .restore_snapshot(call(
            v1::SnapshotRequest {
                instance: name.clone(),
                snapshot: snapshot.to_string(),
            },
            SNAPSHOT_CALL,
        ))
        .await
    {
        Ok(s) => observed_from(s.get_ref()),
        Err(e) => {
            // Stopped but not restored: say so, and what it is now.
            let observed = stopped_now(client, &name).await;
            return match failed(&e, &format!("could not restore snapshot {snapshot:?}")) {
                Outcome::Failed(_, why) => Outcome::Failed(observed, why),
                other => other,
            };
        }
    };
    if inst.desired != DesiredState::Running {
        return Outcome::Done(Some(restored));
    }
    // Started with the instance's current effective config, as every start is.
    if !state.cp.leads_with_quorum() {
        return Outcome::Retry("no longer the leader".into());
    }
    if let Err(e) = update_config(client, &name, config).await {
        return match failed_config(e) {
            Outcome::Failed(_, why) => Outcome::Failed(
                Some(restored),
                format!("restored, but not started again: {why}"),
            ),
            other => other,
        };
    }
    match client
        .start_instance(call(reference(), SNAPSHOT_CALL))
        .await
    {
        Ok(s) => {
            let observed = observed_from(s.get_ref());
            if observed.status == InstanceStatusCode::Running {
                Outcome::Done(Some(observed))
            } else {
                let why = if s.get_ref().error.is_empty() {
                    "init exited at once".to_string()
                } else {
                    s.get_ref().error.clone()
                };
                Outcome::Failed(
                    Some(observed),
                    format!("restored, but the instance did not start again: {why}"),
                )
            }
        }
        Err(e) if passing(&e) => Outcome::Retry(e.message().to_string()),
        Err(e) => Outcome::Failed(
            Some(restored),
            format!(
                "restored, but the instance did not start again: {}",
                e.message()
            ),
        ),
    }
}

/// The instance's state as its node reports it now, if it answers.
async fn stopped_now(client: &mut AgentConn, name: &str) -> Option<crate::state::Observed> {
    client
        .instance_state(crate::agents::short(v1::InstanceRef {
            name: name.to_string(),
        }))
        .await
        .ok()
        .map(|s| observed_from(s.get_ref()))
}
