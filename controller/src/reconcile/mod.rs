//! Leader-only loops.
//!
//! **Reconciler.** Every change to an instance's lifecycle (create, start, stop, restart,
//! delete) is committed as a [`PendingAction`] on the instance, together with the operation
//! that waits for it. The leader's reconciler picks pending actions up, carries them out on
//! the instance's node (every agent call is idempotent: creating an instance that exists with
//! the same spec, starting a running one or deleting a missing one succeed) and ends them with
//! one `FinishAction` command, which also ends the operation. Because the action is replicated,
//! a leader change half-way loses nothing: the next leader sees the same pending action and
//! runs it again. An action whose node is offline, or that keeps failing, ends in failure with
//! a clear reason, so that no operation stays running forever.
//!
//! Agents always get an instance's *effective* config (its profiles' config in order, then its
//! own), read from the state when the action runs: a create sends it in the spec, a start or
//! restart sends it first, so that an instance never starts with a profile's stale config (a
//! profile changed while its node was offline reaches the instance this way).
//!
//! **Liveness.** Agents heartbeat to the leader ([`crate::liveness`]); each pass marks nodes
//! that missed heartbeats for longer than the threshold offline.
//!
//! Finished operations are dropped after an hour.

mod image_pull;
mod snapshot;
mod transfer;

pub use image_pull::ImagePulls;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::api::InstanceStatusCode;
use berth_proto::v1;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::api::AppState;
use crate::api::instances::{agent_spec, observed_from};
use crate::clock;
use crate::state::{Action, Command, NodeStatus, Observed, PendingAction};

/// How often the loops run when nothing changes (node liveness is judged this often, so a
/// silent node goes offline at most this long after the threshold).
pub const TICK: Duration = Duration::from_millis(250);

/// Finished operations are kept this long.
pub const OPERATION_TTL: Duration = Duration::from_secs(3600);

/// Wait before retrying an action that failed for a passing reason (node unreachable, busy).
const RETRY_BACKOFF: Duration = Duration::from_secs(2);

/// An action still failing for passing reasons this long after it was requested ends in
/// failure, so that no operation stays running forever.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// Deadline of one agent call for create, start and delete (a stop gets its timeout plus a
/// margin).
const ACTION_CALL: Duration = Duration::from_secs(300);

/// The observation recorded when a create cannot be settled (its node went offline, or it kept
/// failing for passing reasons): the instance may exist on its node, so its record stays (in
/// Error) instead of being removed and its name and address reused.
fn unsettled(error: &str) -> Observed {
    Observed {
        status: InstanceStatusCode::Error,
        pid: 0,
        updated_at: clock::now(),
        error: error.to_string(),
    }
}

/// Whether an action requested at `since` (RFC 3339) has run out of time.
fn expired(since: &str) -> bool {
    since < clock::ago(GIVE_UP_AFTER).as_str()
}

/// Pending actions the reconciler still has to carry out (its queue depth).
pub fn queue_depth(state: &AppState) -> usize {
    state
        .cp
        .read_local(|s| s.instances.values().filter(|i| i.pending.is_some()).count())
}

/// What the leader's reconciler has in flight (memory only; rebuilt by a new leader).
#[derive(Default)]
struct Work {
    /// Instances whose action runs right now.
    running: HashSet<String>,
    /// Instances whose action waits for a retry: when, how many attempts were made, and
    /// when the first of the failures in a row happened.
    retry: HashMap<String, (Instant, u32, Instant)>,
}

type SharedWork = Arc<Mutex<Work>>;

fn lock(work: &SharedWork) -> std::sync::MutexGuard<'_, Work> {
    work.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the leader loops until the process ends.
pub async fn run(state: Arc<AppState>) {
    let work: SharedWork = Arc::default();
    let mut changes = state.cp.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leader = false;
    let mut last_slow_pass = Instant::now();
    loop {
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
        };
        // A leader cut off from the majority keeps believing it leads for a while: it must not
        // act (its writes would fail) nor judge liveness (heartbeats go elsewhere).
        if !state.cp.leads_with_quorum() {
            if was_leader {
                info!("no longer the leader; reconciler idle");
                state.liveness.forget();
            }
            was_leader = false;
            continue;
        }
        if !was_leader {
            // Act only on a state at least as new as everything committed before this term:
            // a linearizable read waits until the leader has applied that far.
            if let Err(e) = state.cp.read(|_| ()).await {
                debug!(error = %e, "leading, but not caught up yet");
                continue;
            }
            was_leader = true;
            info!("leading: reconciler and liveness checks running");
            // Nodes get a full threshold from now before they can be marked offline: the
            // heartbeats went to the previous leader.
            state.liveness.start_grace();
        }
        dispatch(&state, &work);
        if ticked {
            check_liveness(&state).await;
            crate::schedule::tick(&state).await;
            if last_slow_pass.elapsed() >= Duration::from_secs(30) {
                last_slow_pass = Instant::now();
                prune_operations(&state).await;
                crate::api::idempotency::prune(&state).await;
                fail_orphaned_operations(&state).await;
                crate::image_cache::expire(&state).await;
            }
        }
    }
}

/// Starts a worker for every pending action that is not running or waiting for a retry.
fn dispatch(state: &Arc<AppState>, work: &SharedWork) {
    let pending: Vec<(String, PendingAction)> = state.cp.read_local(|s| {
        s.instances
            .values()
            .filter_map(|i| i.pending.clone().map(|p| (i.name.clone(), p)))
            .collect()
    });
    let now = Instant::now();
    let mut w = lock(work);
    let live: HashSet<&String> = pending.iter().map(|(n, _)| n).collect();
    w.retry.retain(|name, _| live.contains(name));
    for (name, action) in pending {
        if w.running.contains(&name) {
            continue;
        }
        let (attempts, failing_since) = match w.retry.get(&name) {
            Some((at, _, _)) if *at > now => continue,
            Some((_, n, first)) => (*n, Some(*first)),
            None => (0, None),
        };
        let is_create = matches!(action.action, Action::Create { .. });
        w.running.insert(name.clone());
        let st = state.clone();
        let wk = work.clone();
        let span = info_span!("reconcile", instance = %name, op = %action.op);
        tokio::spawn(
            async move {
                let outcome = execute(&st, &name, &action).await;
                let finish = match outcome {
                    // An action gives up only when it is old and has been failing for as long:
                    // a copy that streamed for an hour still gets its retries.
                    Outcome::Retry(reason)
                        if !expired(&action.since)
                            || failing_since.is_none_or(|t| t.elapsed() < GIVE_UP_AFTER) =>
                    {
                        debug!(%reason, attempt = attempts + 1, "will retry");
                        let mut w = lock(&wk);
                        w.running.remove(&name);
                        let first = failing_since.unwrap_or_else(Instant::now);
                        w.retry.insert(
                            name.clone(),
                            (Instant::now() + RETRY_BACKOFF, attempts + 1, first),
                        );
                        return;
                    }
                    Outcome::Retry(reason) => {
                        let error = format!(
                            "gave up after {} minutes and {} attempts: {reason}",
                            GIVE_UP_AFTER.as_secs() / 60,
                            attempts + 1
                        );
                        Some((is_create.then(|| unsettled(&error)), error))
                    }
                    Outcome::Done(observed) => Some((observed, String::new())),
                    Outcome::Failed(observed, error) => Some((observed, error)),
                    Outcome::Gone => None,
                };
                if let Some((observed, error)) = finish {
                    if error.is_empty() {
                        info!("action done");
                    } else {
                        warn!(%error, "action failed");
                    }
                    if let Err(e) = st
                        .cp
                        .write(Command::FinishAction {
                            name: name.clone(),
                            op: action.op.clone(),
                            observed,
                            error,
                            now: clock::now(),
                        })
                        .await
                    {
                        // The action stays pending; the next pass (here or on a new leader)
                        // runs it again, which is safe.
                        warn!(error = %e, "could not record the end of the action");
                    }
                }
                let mut w = lock(&wk);
                w.running.remove(&name);
                w.retry.remove(&name);
            }
            .instrument(span),
        );
    }
}

/// How one attempt at an action ended.
pub(crate) enum Outcome {
    /// Done; the instance's status as the agent reported it.
    Done(Option<Observed>),
    /// Failed for good, with one sentence.
    Failed(Option<Observed>, String),
    /// Failed for a passing reason (node unreachable, instance busy): try again.
    Retry(String),
    /// The instance or its action is gone (finished elsewhere): nothing to record.
    Gone,
}

pub(crate) fn passing(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Aborted
    )
}

/// A request with a deadline.
pub(crate) fn call<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Gives the instance `config` on its node (before a start, so that it starts with its
/// profiles' current config).
pub(crate) async fn update_config(
    client: &mut crate::agents::AgentConn,
    name: &str,
    config: &std::collections::BTreeMap<String, String>,
) -> Result<(), tonic::Status> {
    client
        .update_instance(call(
            v1::UpdateInstanceRequest {
                name: name.to_string(),
                config: config.clone().into_iter().collect(),
            },
            ACTION_CALL,
        ))
        .await
        .map(|_| ())
}

/// A profile may have changed while the action ran, after `sent` was read; its own push
/// may then have reached the node before `sent` did. Sends the committed effective config
/// again when it differs from `sent`, so the instance never keeps running with a stale one.
async fn catch_up_config(
    state: &Arc<AppState>,
    client: &mut crate::agents::AgentConn,
    name: &str,
    sent: &std::collections::BTreeMap<String, String>,
) {
    let now = state.cp.read_local(|s| {
        s.instances
            .get(name)
            .map(|i| s.effective_config(i).into_owned())
    });
    if let Some(config) = now.filter(|c| c != sent)
        && let Err(e) = update_config(client, name, &config).await
    {
        warn!(error = %e.message(), "could not give the instance its profiles' newest config");
    }
}

/// The outcome when the agent would not take the instance's config.
pub(crate) fn failed_config(e: tonic::Status) -> Outcome {
    if passing(&e) {
        Outcome::Retry(e.message().to_string())
    } else {
        Outcome::Failed(
            None,
            format!("the node refused the instance's config: {}", e.message()),
        )
    }
}

/// One attempt at `action` on the instance's node.
async fn execute(state: &Arc<AppState>, name: &str, action: &PendingAction) -> Outcome {
    // The config the instance runs with: its profiles' and its own, as committed now, so
    // that no instance is created or started with a profile's stale config.
    let found = state.cp.read_local(|s| {
        s.instances
            .get(name)
            .filter(|i| i.pending.as_ref() == Some(action))
            .map(|i| {
                (
                    i.clone(),
                    s.effective_config(i).into_owned(),
                    s.nodes.get(&i.node).cloned(),
                    s.address_home(i).cloned(),
                )
            })
    });
    let Some((inst, config, node, home)) = found else {
        return Outcome::Gone;
    };
    let Some(node) = node else {
        return Outcome::Failed(
            None,
            format!(
                "instance {name} is placed on node {}, which is gone",
                inst.node
            ),
        );
    };
    if node.status == NodeStatus::Offline {
        let error = format!(
            "node {} is offline; the instance's state is unknown until it returns",
            node.name
        );
        // A create may have happened before the node went away: keep the record.
        let observed = matches!(action.action, Action::Create { .. }).then(|| unsettled(&error));
        return Outcome::Failed(observed, error);
    }
    let mut client = match state.agents.client(&node) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(None, e.to_string()),
    };
    match &action.action {
        Action::Snapshot { .. }
        | Action::DeleteSnapshot { .. }
        | Action::RenameSnapshot { .. }
        | Action::Restore { .. } => {
            return snapshot::execute(state, &inst, &config, &node, &mut client, action).await;
        }
        Action::CopyFrom { .. } | Action::Migrate { .. } => {
            return transfer::execute(state, &inst, &config, &node, &mut client, action).await;
        }
        Action::Create { .. } => {
            // A node that lacks the image fetches it from a node that has it first.
            if let Err(outcome) = image_pull::ensure_image(state, &inst.image, &node).await {
                return outcome;
            }
        }
        _ => {}
    }
    if matches!(action.action, Action::Start | Action::Restart { .. })
        && let Err(e) = update_config(&mut client, name, &config).await
    {
        return failed_config(e);
    }
    let result: Result<v1::InstanceStatus, tonic::Status> = match action.action.clone() {
        Action::Create { start } => {
            let spec = agent_spec(&inst, &config, home.as_ref().unwrap_or(&node));
            let mut created = client
                .create_instance(call(
                    v1::CreateInstanceRequest {
                        spec: Some(spec.clone()),
                        existing_volume: false,
                    },
                    ACTION_CALL,
                ))
                .await;
            if matches!(&created, Err(e) if e.code() == tonic::Code::AlreadyExists) {
                // An earlier attempt made it, and a profile changed its config since: give it
                // the current config, then the create (idempotent for the same spec) answers.
                if let Err(e) = update_config(&mut client, name, &config).await {
                    return failed_config(e);
                }
                created = client
                    .create_instance(call(
                        v1::CreateInstanceRequest {
                            spec: Some(spec),
                            existing_volume: false,
                        },
                        ACTION_CALL,
                    ))
                    .await;
            }
            match created {
                // Leadership lost while creating: the next leader runs the action again.
                Ok(_) if start && !state.cp.leads_with_quorum() => {
                    return Outcome::Retry("no longer the leader".into());
                }
                Ok(s) if start => {
                    let created = observed_from(s.get_ref());
                    match client
                        .start_instance(call(
                            v1::InstanceRef {
                                name: name.to_string(),
                            },
                            ACTION_CALL,
                        ))
                        .await
                    {
                        Ok(s) => Ok(s.into_inner()),
                        // Created but not started: keep the instance, report the failure.
                        Err(e) if !passing(&e) => {
                            return Outcome::Failed(
                                Some(created),
                                format!(
                                    "the instance was created but did not start: {}",
                                    e.message()
                                ),
                            );
                        }
                        Err(e) => Err(e),
                    }
                }
                other => other.map(|r| r.into_inner()),
            }
        }
        Action::Start => client
            .start_instance(call(
                v1::InstanceRef {
                    name: name.to_string(),
                },
                ACTION_CALL,
            ))
            .await
            .map(|r| r.into_inner()),
        Action::Stop {
            force,
            timeout_secs,
        } => client
            .stop_instance(call(
                v1::StopInstanceRequest {
                    name: name.to_string(),
                    force,
                    timeout_secs,
                },
                Duration::from_secs(u64::from(timeout_secs) + 60),
            ))
            .await
            .map(|r| r.into_inner()),
        Action::Restart {
            force,
            timeout_secs,
        } => client
            .restart_instance(call(
                v1::StopInstanceRequest {
                    name: name.to_string(),
                    force,
                    timeout_secs,
                },
                Duration::from_secs(u64::from(timeout_secs) + 60) + ACTION_CALL,
            ))
            .await
            .map(|r| r.into_inner()),
        Action::Delete { force } => {
            let deleted = client
                .delete_instance(call(
                    v1::DeleteInstanceRequest {
                        name: name.to_string(),
                        force,
                    },
                    ACTION_CALL,
                ))
                .await;
            return match deleted {
                Ok(_) => Outcome::Done(None),
                // The agent never had it (a create that failed half-way).
                Err(e) if e.code() == tonic::Code::NotFound => Outcome::Done(None),
                // Running and not forced: the agent refuses (busy) and says why.
                Err(e) if e.code() == tonic::Code::Aborted && !force => Outcome::Failed(
                    None,
                    format!("instance {name} is running; stop it first or use --force"),
                ),
                Err(e) if passing(&e) => Outcome::Retry(e.message().to_string()),
                Err(e) => Outcome::Failed(None, e.message().to_string()),
            };
        }
        // Handed to their modules above.
        Action::Snapshot { .. }
        | Action::DeleteSnapshot { .. }
        | Action::RenameSnapshot { .. }
        | Action::Restore { .. }
        | Action::CopyFrom { .. }
        | Action::Migrate { .. } => return Outcome::Gone,
    };
    if result.is_ok() {
        catch_up_config(state, &mut client, name, &config).await;
    }
    match result {
        Ok(s) => {
            let observed = observed_from(&s);
            if matches!(
                action.action,
                Action::Start | Action::Restart { .. } | Action::Create { start: true }
            ) && observed.status != InstanceStatusCode::Running
            {
                let why = if s.error.is_empty() {
                    "init exited at once".to_string()
                } else {
                    s.error.clone()
                };
                return Outcome::Failed(
                    Some(observed),
                    format!("the instance did not start: {why}"),
                );
            }
            Outcome::Done(Some(observed))
        }
        Err(e) if passing(&e) => Outcome::Retry(e.message().to_string()),
        Err(e) => Outcome::Failed(None, e.message().to_string()),
    }
}

/// Marks nodes offline that have not heartbeat for longer than the threshold.
async fn check_liveness(state: &Arc<AppState>) {
    let nodes: Vec<String> = state.cp.read_local(|s| {
        s.nodes
            .values()
            .filter(|n| n.status == NodeStatus::Online)
            .map(|n| n.name.clone())
            .collect()
    });
    for name in nodes {
        let silent = state.liveness.silent_for(&name);
        if silent < state.liveness.threshold() {
            continue;
        }
        warn!(node = %name, silent_secs = silent.as_secs(), "no heartbeat; marking the node offline");
        if let Err(e) = state
            .cp
            .write(Command::SetNodeStatus {
                name: name.clone(),
                status: NodeStatus::Offline,
            })
            .await
        {
            warn!(node = %name, error = %e, "could not mark the node offline");
        }
    }
}

/// Run once when a controller starts: operations this controller ran in its memory (image
/// builds, renames, exec sessions) were interrupted and fail with a clear error. Operations
/// that wait for an instance's pending action are the reconciler's and stay.
/// The writes are retried until they succeed: a restarted controller often has no quorum for
/// a moment (it may even believe itself the leader of an old term), and nobody else ends
/// these operations while it stays a member.
pub async fn recover_interrupted(state: &Arc<AppState>, interrupted: Vec<String>) {
    let mut delay = Duration::from_millis(500);
    while !fail_task_operations(
        state,
        |o, _| o.location == state.name && interrupted.contains(&o.id),
        |_| "the operation was interrupted by a controller restart".to_string(),
    )
    .await
    {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Fails operations that ran in the memory of a controller that is no longer a member (image
/// builds, renames, exec sessions): nobody will ever end them otherwise.
async fn fail_orphaned_operations(state: &Arc<AppState>) {
    fail_task_operations(
        state,
        |o, s| !s.controllers.is_empty() && !s.controllers.contains_key(&o.location),
        |o| {
            format!(
                "the controller that ran the operation ({}) left the cluster",
                o.location
            )
        },
    )
    .await;
}

/// Fails, with `reason`, the unfinished operations that `pick` selects among those that ran in
/// a controller's memory (not those waiting for an instance's pending action). False when a
/// write failed (the rest are left for another try).
async fn fail_task_operations(
    state: &Arc<AppState>,
    pick: impl Fn(&berth_proto::api::Operation, &crate::state::State) -> bool,
    reason: impl Fn(&berth_proto::api::Operation) -> String,
) -> bool {
    let ops: Vec<_> = state.cp.read_local(|s| {
        let owned: HashSet<&str> = s
            .instances
            .values()
            .filter_map(|i| i.pending.as_ref().map(|p| p.op.as_str()))
            .collect();
        s.operations
            .values()
            .filter(|o| !o.status.is_final() && !owned.contains(o.id.as_str()) && pick(o, s))
            .cloned()
            .collect()
    });
    for mut op in ops {
        op.status = berth_proto::api::OperationStatus::Failure;
        op.status_code = op.status.code();
        op.err = reason(&op);
        op.updated_at = clock::now();
        info!(op = %op.id, controller = %op.location, reason = %op.err, "failing an operation");
        if let Err(e) = state
            .cp
            .write(Command::PutOperation { operation: op })
            .await
        {
            warn!(error = %e, "could not fail an operation");
            return false;
        }
    }
    true
}

async fn prune_operations(state: &Arc<AppState>) {
    let cutoff = clock::ago(OPERATION_TTL);
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
