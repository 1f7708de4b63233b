//! Leader-only loops.
//!
//! The observer asks every agent what runs there and records changes (an instance that powered
//! itself off, a node that stopped answering) through Raft; it also drops finished operations
//! after an hour. It is level-triggered: each pass looks at the whole picture, so running it
//! again, or on a new leader after a failover, is always safe.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::api::InstanceStatusCode;
use berth_proto::v1;
use tracing::{debug, info, warn};

use crate::api::AppState;
use crate::clock;
use crate::state::{Command, NodeStatus, Observed};

/// How often the observer runs.
pub const OBSERVE_EVERY: Duration = Duration::from_secs(5);

/// Finished operations are kept this long.
pub const OPERATION_TTL: Duration = Duration::from_secs(3600);

/// Runs the observer until the process ends.
pub async fn run(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(OBSERVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !state.cp.is_leader() {
            continue;
        }
        observe_once(&state).await;
        prune_operations(&state).await;
    }
}

/// One pass of the observer.
pub async fn observe_once(state: &Arc<AppState>) {
    let (nodes, instances) = state.cp.read_local(|s| {
        (
            s.nodes.values().cloned().collect::<Vec<_>>(),
            s.instances.values().cloned().collect::<Vec<_>>(),
        )
    });
    for node in nodes {
        let reply = match state.agents.client(&node) {
            Ok(mut c) => {
                let mut req = tonic::Request::new(v1::ListInstancesRequest {});
                req.set_timeout(Duration::from_secs(10));
                c.list_instances(req)
                    .await
                    .map(|r| r.into_inner().instances)
            }
            Err(e) => {
                warn!(node = %node.name, error = %e, "no client for the node");
                continue;
            }
        };
        let reported = match reply {
            Ok(list) => {
                if node.status != NodeStatus::Online {
                    info!(node = %node.name, "node is back online");
                    let _ = state
                        .cp
                        .write(Command::SetNodeStatus {
                            name: node.name.clone(),
                            status: NodeStatus::Online,
                        })
                        .await;
                }
                list.into_iter()
                    .map(|s| (s.name.clone(), s))
                    .collect::<BTreeMap<_, _>>()
            }
            Err(e) => {
                if node.status == NodeStatus::Online {
                    warn!(node = %node.name, error = %e.message(), "node does not answer; marking it offline");
                    let _ = state
                        .cp
                        .write(Command::SetNodeStatus {
                            name: node.name.clone(),
                            status: NodeStatus::Offline,
                        })
                        .await;
                }
                continue;
            }
        };
        for inst in instances.iter().filter(|i| i.node == node.name) {
            // Pending instances are being created by an operation; leave them to it.
            if inst.observed.status == InstanceStatusCode::Pending {
                continue;
            }
            let (status, pid, error) = match reported.get(&inst.name) {
                Some(s) => (
                    match v1::InstanceState::try_from(s.state) {
                        Ok(v1::InstanceState::Running) => InstanceStatusCode::Running,
                        Ok(v1::InstanceState::Error) => InstanceStatusCode::Error,
                        _ => InstanceStatusCode::Stopped,
                    },
                    s.pid,
                    s.error.clone(),
                ),
                None => (
                    InstanceStatusCode::Error,
                    0,
                    format!("the instance is missing on node {}", node.name),
                ),
            };
            if status != inst.observed.status
                || pid != inst.observed.pid
                || error != inst.observed.error
            {
                debug!(instance = %inst.name, ?status, pid, "observed a change");
                let _ = state
                    .cp
                    .write(Command::ObserveInstance {
                        name: inst.name.clone(),
                        observed: Observed {
                            status,
                            pid,
                            updated_at: clock::now(),
                            error,
                        },
                    })
                    .await;
            }
        }
    }
}

/// Run once when a controller takes over (today: at start, as the single voter). Work in
/// flight lived in the memory of the controller that ran it, so an operation that was
/// already running before this controller served anything (`interrupted`) fails with a
/// clear error. An instance still `Pending` (its create was
/// interrupted) is looked up on its node: if the agent has it, its status is recorded; if
/// not, the half-made record is removed, since the instance never came to be.
pub async fn recover_interrupted(state: &Arc<AppState>, interrupted: Vec<String>) {
    let (ops, pending): (Vec<_>, Vec<_>) = state.cp.read_local(|s| {
        (
            s.operations
                .values()
                .filter(|o| !o.status.is_final() && interrupted.contains(&o.id))
                .cloned()
                .collect(),
            s.instances
                .values()
                .filter(|i| i.observed.status == InstanceStatusCode::Pending)
                .map(|i| (i.clone(), s.nodes.get(&i.node).cloned()))
                .collect(),
        )
    });
    for mut op in ops {
        op.status = berth_proto::api::OperationStatus::Failure;
        op.status_code = op.status.code();
        op.err = "the operation was interrupted by a controller restart".into();
        op.updated_at = clock::now();
        info!(op = %op.id, "failing an operation interrupted by a restart");
        if let Err(e) = state
            .cp
            .write(Command::PutOperation { operation: op })
            .await
        {
            warn!(error = %e, "could not fail an interrupted operation");
        }
    }
    for (inst, node) in pending {
        let Some(node) = node else { continue };
        let reply = match state.agents.client(&node) {
            Ok(mut c) => {
                let mut req = tonic::Request::new(v1::InstanceRef {
                    name: inst.name.clone(),
                });
                req.set_timeout(Duration::from_secs(10));
                c.instance_state(req).await
            }
            Err(_) => continue,
        };
        let cmd = match reply {
            Ok(s) => {
                let s = s.into_inner();
                Command::ObserveInstance {
                    name: inst.name.clone(),
                    observed: Observed {
                        status: match v1::InstanceState::try_from(s.state) {
                            Ok(v1::InstanceState::Running) => InstanceStatusCode::Running,
                            Ok(v1::InstanceState::Error) => InstanceStatusCode::Error,
                            _ => InstanceStatusCode::Stopped,
                        },
                        pid: s.pid,
                        updated_at: clock::now(),
                        error: s.error,
                    },
                }
            }
            Err(e) if e.code() == tonic::Code::NotFound => {
                info!(instance = %inst.name, "removing an instance whose create was interrupted");
                Command::DeleteInstance {
                    name: inst.name.clone(),
                }
            }
            // The node does not answer now; the observer will keep it as it is.
            Err(_) => continue,
        };
        if let Err(e) = state.cp.write(cmd).await {
            warn!(instance = %inst.name, error = %e, "could not settle an interrupted create");
        }
    }
}

async fn prune_operations(state: &Arc<AppState>) {
    let cutoff = clock::format_unix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
            - OPERATION_TTL.as_secs() as i64,
    );
    let old: Vec<String> = state.cp.read_local(|s| {
        s.operations
            .values()
            .filter(|o| o.status.is_final() && o.updated_at < cutoff)
            .map(|o| o.id.clone())
            .collect()
    });
    if !old.is_empty()
        && let Err(e) = state.cp.write(Command::DeleteOperations { ids: old }).await
    {
        warn!(error = %e, "could not prune finished operations");
    }
}
