//! Copy and move: `CopyFrom` (same node: btrfs snapshots; another node: a btrfs send stream
//! between the agents) and `Migrate` (stopped: send and receive; running: pre-copy passes, a
//! short stop, the final pass, a start on the target).
//!
//! **Tickets.** A transfer's ticket is derived from its operation ([`ticket_for`]), so every
//! attempt (and a new leader's) names the same ticket: each attempt first aborts it on both
//! sides, dropping whatever an interrupted attempt left, then announces it again.
//!
//! **Copies.** The new record's observation stays `Pending` until the agent has created the
//! instance, so a copy that fails earlier ends with its record removed (`FinishAction`); what
//! the target node received is aborted. A refresh replaces the target's volume (it is stopped).
//!
//! **Moves.** Before `Command::SwitchNode` the instance belongs to `from`: a failure aborts the
//! transfer on `to`, removes what was created there and starts the instance again on `from` if
//! this move stopped it. After the switch it belongs to `to`, and what is left on `from` (the
//! instance and the sender's bases) is removed; a failure there only delays that cleanup (a
//! re-run with the instance on `to` does nothing else). A failed write of the switch undoes
//! nothing (it may have been applied): the re-run starts over from whichever side the state
//! names, removing leftovers on `to` first.
//!
//! Progress goes into the operation's metadata ([`TransferMetadata`]) at most once a second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::api::{TransferMetadata, TransferPass};
use berth_proto::v1;
use tracing::{debug, info, warn};

use super::{Outcome, call, passing, update_config};
use crate::agents::AgentConn;
use crate::api::AppState;
use crate::api::instances::{agent_spec, observed_from};
use crate::clock;
use crate::state::{Action, Command, Instance, Node, NodeStatus, Observed, PendingAction};

/// A pre-copy pass that sends less than this is the last one before the stop.
pub(crate) const PRECOPY_ENOUGH_BELOW: u64 = 8 << 20;

/// At most this many pre-copy passes run (a busy instance dirties data faster than it goes).
pub(crate) const MAX_PRECOPY_PASSES: u32 = 4;

/// A live move waits at most this long for a clean stop before forcing it.
pub(crate) const LIVE_STOP_CAP_SECS: u32 = 10;

/// Deadline of one send call (the whole stream).
const TRANSFER_CALL: Duration = Duration::from_secs(6 * 3600);

/// Deadline of the other calls (announce, commit, create, start, delete).
const STEP_CALL: Duration = Duration::from_secs(300);

/// Progress is written to the operation at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The transfer ticket of operation `op`: the same for every attempt, so that a new attempt
/// (or a new leader) can abort what an earlier one left.
pub(crate) fn ticket_for(op: &str) -> String {
    format!("op-{op}")
}

/// Whether pre-copy is done after pass `pass` (1-based) sent `bytes`.
pub(crate) fn precopy_enough(pass: u32, bytes: u64) -> bool {
    bytes < PRECOPY_ENOUGH_BELOW || pass >= MAX_PRECOPY_PASSES
}

/// The clean-stop timeout of a live move: the instance's `boot.stop.timeout` (30 s when
/// unset), capped at [`LIVE_STOP_CAP_SECS`].
pub(crate) fn live_stop_timeout(config: &BTreeMap<String, String>) -> u32 {
    config
        .get("boot.stop.timeout")
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(30)
        .min(LIVE_STOP_CAP_SECS)
}

/// Whether a live move shuts the instance down cleanly before its final pass
/// (`migration.stop=clean`) instead of stopping it at once.
pub(crate) fn clean_stop(config: &BTreeMap<String, String>) -> bool {
    config.get("migration.stop").map(|v| v.trim()) == Some("clean")
}

/// Milliseconds from the stop on the source to running on the target.
pub(crate) fn downtime_ms(stop_began: Instant, running_at: Instant) -> u64 {
    u64::try_from(running_at.saturating_duration_since(stop_began).as_millis()).unwrap_or(u64::MAX)
}

/// A failed step.
#[derive(Debug)]
struct StepError {
    /// One sentence.
    message: String,
    /// The cause may pass by itself (node unreachable, busy): try again.
    passing: bool,
    /// Undo nothing: the step may have taken effect (an unsure write of the switch).
    keep: bool,
}

impl StepError {
    fn status(what: &str, e: &tonic::Status) -> Self {
        StepError {
            message: format!("{what}: {}", e.message()),
            passing: passing(e),
            keep: false,
        }
    }

    fn fatal(message: impl Into<String>) -> Self {
        StepError {
            message: message.into(),
            passing: false,
            keep: false,
        }
    }

    fn outcome(self, observed: Option<Observed>) -> Outcome {
        if self.passing {
            Outcome::Retry(self.message)
        } else {
            Outcome::Failed(observed, self.message)
        }
    }
}

/// The operation's metadata as the transfer goes.
struct Progress {
    state: Arc<AppState>,
    op: String,
    meta: TransferMetadata,
    /// Bytes of the passes that ended.
    earlier: u64,
    last: Option<Instant>,
    /// While set (the downtime of a live move), nothing is written: every write through Raft
    /// would lengthen the stop.
    hold: bool,
}

impl Progress {
    fn new(state: &Arc<AppState>, op: &str) -> Progress {
        Progress {
            state: state.clone(),
            op: op.to_string(),
            meta: TransferMetadata::default(),
            earlier: 0,
            last: None,
            hold: false,
        }
    }

    async fn stage(&mut self, stage: impl Into<String>) {
        self.meta.stage = stage.into();
        self.meta.rate = 0;
        debug!(stage = %self.meta.stage, "transfer stage");
        self.publish(true).await;
    }

    /// Writes the metadata into the operation (unless written less than a second ago and
    /// not `force`d). Best effort: a lost update only delays the progress shown.
    async fn publish(&mut self, force: bool) {
        if self.hold || (!force && self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY)) {
            return;
        }
        self.last = Some(Instant::now());
        let Some(mut op) = self
            .state
            .cp
            .read_local(|s| s.operations.get(&self.op).cloned())
        else {
            return;
        };
        if op.status.is_final() {
            return;
        }
        op.metadata = serde_json::to_value(&self.meta).unwrap_or_default();
        op.updated_at = clock::now();
        if let Err(e) = self
            .state
            .cp
            .write(Command::PutOperation { operation: op })
            .await
        {
            debug!(error = %e, "could not record transfer progress");
        }
    }
}

/// Runs one send call and follows its progress; `kind` names the pass in the metadata.
async fn send_pass(
    source: &mut AgentConn,
    req: v1::SendInstanceRequest,
    kind: &str,
    progress: &mut Progress,
) -> Result<TransferPass, StepError> {
    let started = Instant::now();
    let what = format!("could not send instance {}", req.instance);
    let mut stream = source
        .send_instance(call(req, TRANSFER_CALL))
        .await
        .map_err(|e| StepError::status(&what, &e))?
        .into_inner();
    let bytes = loop {
        match stream.message().await {
            Ok(Some(p)) => {
                progress.meta.bytes = progress.earlier + p.bytes_sent;
                progress.meta.rate = p.rate;
                if p.done {
                    break p.bytes_sent;
                }
                progress.publish(false).await;
            }
            Ok(None) => {
                return Err(StepError {
                    message: format!("{what}: the sending node ended the stream before the end"),
                    passing: true,
                    keep: false,
                });
            }
            Err(e) => return Err(StepError::status(&what, &e)),
        }
    };
    let pass = TransferPass {
        kind: kind.to_string(),
        bytes,
        millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    info!(kind, bytes, millis = pass.millis, "transfer pass done");
    progress.earlier += bytes;
    progress.meta.bytes = progress.earlier;
    progress.meta.rate = 0;
    progress.meta.passes.push(pass.clone());
    progress.publish(true).await;
    Ok(pass)
}

/// Drops what transfer `ticket` left on `node` (best effort, logged).
async fn abort(client: &mut AgentConn, ticket: &str, node: &str) {
    if let Err(e) = client
        .abort_transfer(call(
            v1::TransferRef {
                ticket: ticket.to_string(),
            },
            STEP_CALL,
        ))
        .await
    {
        warn!(node, ticket, error = %e.message(), "could not abort a transfer");
    }
}

/// Removes instance `name` from `node` (force); a missing one is fine.
async fn discard(client: &mut AgentConn, name: &str, node: &str) -> Result<(), StepError> {
    match client
        .delete_instance(call(
            v1::DeleteInstanceRequest {
                name: name.to_string(),
                force: true,
            },
            STEP_CALL,
        ))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
        Err(e) => Err(StepError::status(
            &format!("could not remove instance {name} from node {node}"),
            &e,
        )),
    }
}

/// Drops stale state of `ticket` on both sides, then announces it to the receiver.
async fn announce(
    target: &mut AgentConn,
    target_node: &str,
    source: &mut AgentConn,
    source_node: &str,
    ticket: &str,
    name: &str,
    refresh: bool,
) -> Result<(), StepError> {
    abort(target, ticket, target_node).await;
    abort(source, ticket, source_node).await;
    target
        .expect_transfer(call(
            v1::ExpectTransferRequest {
                ticket: ticket.to_string(),
                kind: v1::TransferKind::Instance as i32,
                name: name.to_string(),
                source_node: source_node.to_string(),
                refresh,
            },
            STEP_CALL,
        ))
        .await
        .map_err(|e| {
            StepError::status(
                &format!("node {target_node} would not take the transfer"),
                &e,
            )
        })?;
    Ok(())
}

/// Commits transfer `ticket` on the receiving node.
async fn commit(target: &mut AgentConn, ticket: &str, node: &str) -> Result<(), StepError> {
    target
        .commit_transfer(call(
            v1::TransferRef {
                ticket: ticket.to_string(),
            },
            STEP_CALL,
        ))
        .await
        .map(|_| ())
        .map_err(|e| StepError::status(&format!("node {node} could not commit the transfer"), &e))
}

/// Makes the received (or copied) volume instance `spec` on the node.
async fn create_existing(
    client: &mut AgentConn,
    spec: v1::InstanceSpec,
    config: &BTreeMap<String, String>,
    node: &str,
) -> Result<v1::InstanceStatus, StepError> {
    let name = spec.name.clone();
    let what = format!("node {node} could not create instance {name} from its volume");
    let req = v1::CreateInstanceRequest {
        spec: Some(spec),
        existing_volume: true,
    };
    let mut created = client.create_instance(call(req.clone(), STEP_CALL)).await;
    if matches!(&created, Err(e) if e.code() == tonic::Code::AlreadyExists) {
        // An earlier attempt made it and its config changed since (as in a plain create).
        update_config(client, &name, config)
            .await
            .map_err(|e| StepError::status(&what, &e))?;
        created = client.create_instance(call(req, STEP_CALL)).await;
    }
    created
        .map(|r| r.into_inner())
        .map_err(|e| StepError::status(&what, &e))
}

/// Starts instance `name`; fails unless it runs afterwards.
async fn start(
    client: &mut AgentConn,
    name: &str,
    node: &str,
) -> Result<v1::InstanceStatus, StepError> {
    let s = client
        .start_instance(call(
            v1::InstanceRef {
                name: name.to_string(),
            },
            STEP_CALL,
        ))
        .await
        .map_err(|e| StepError::status(&format!("instance did not start on node {node}"), &e))?
        .into_inner();
    if s.state != v1::InstanceState::Running as i32 {
        let why = if s.error.is_empty() {
            "init exited at once".to_string()
        } else {
            s.error.clone()
        };
        return Err(StepError::fatal(format!(
            "instance did not start on node {node}: {why}"
        )));
    }
    Ok(s)
}

/// Stops instance `name` for the final pass: cleanly within `timeout_secs` (none when 0),
/// then by force.
async fn stop_for_move(
    client: &mut AgentConn,
    name: &str,
    timeout_secs: u32,
) -> Result<(), StepError> {
    let stopped = |r: &Result<tonic::Response<v1::InstanceStatus>, tonic::Status>| matches!(r, Ok(s) if s.get_ref().state != v1::InstanceState::Running as i32);
    if timeout_secs > 0 {
        let clean = client
            .stop_instance(call(
                v1::StopInstanceRequest {
                    name: name.to_string(),
                    force: false,
                    timeout_secs,
                },
                Duration::from_secs(u64::from(timeout_secs) + 30),
            ))
            .await;
        if stopped(&clean) {
            return Ok(());
        }
        if let Err(e) = &clean {
            debug!(error = %e.message(), "clean stop failed; forcing");
        }
    }
    let forced = client
        .stop_instance(call(
            v1::StopInstanceRequest {
                name: name.to_string(),
                force: true,
                timeout_secs: 0,
            },
            Duration::from_secs(60),
        ))
        .await;
    match forced {
        r if stopped(&r) => Ok(()),
        Ok(_) => Err(StepError::fatal(
            "the instance kept running after a forced stop",
        )),
        Err(e) => Err(StepError::status("could not stop the instance", &e)),
    }
}

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
    match &action.action {
        Action::CopyFrom {
            source,
            snapshot,
            instance_only,
            refresh,
            start,
        } => {
            let c = Copy {
                source,
                snapshot,
                instance_only: *instance_only,
                refresh: *refresh,
                start: *start,
            };
            copy(state, inst, config, node, client, &action.op, &c).await
        }
        Action::Migrate { from, to, live } => {
            migrate(
                state, inst, config, node, client, &action.op, from, to, *live,
            )
            .await
        }
        other => Outcome::Failed(
            None,
            format!("{} is not a copy or a move", other.describe()),
        ),
    }
}

/// The fields of a `CopyFrom`.
struct Copy<'a> {
    source: &'a str,
    snapshot: &'a str,
    instance_only: bool,
    refresh: bool,
    start: bool,
}

async fn copy(
    state: &Arc<AppState>,
    inst: &Instance,
    config: &BTreeMap<String, String>,
    node: &Node,
    client: &mut AgentConn,
    op: &str,
    c: &Copy<'_>,
) -> Outcome {
    let (found, home) = state.cp.read_local(|s| {
        (
            s.instances
                .get(c.source)
                .map(|src| s.nodes.get(&src.node).cloned()),
            s.address_home(inst).cloned(),
        )
    });
    let shown = crate::state::split_scoped_name(c.source).1;
    let src_node = match found {
        None => return Outcome::Failed(None, format!("the source instance {shown:?} is gone")),
        Some(None) => {
            return Outcome::Failed(
                None,
                format!("the node of the source instance {shown:?} is gone"),
            );
        }
        Some(Some(n)) => n,
    };
    if src_node.status == NodeStatus::Offline {
        return Outcome::Failed(
            None,
            format!(
                "node {} of the source instance {shown:?} is offline",
                src_node.name
            ),
        );
    }
    let home = home.unwrap_or_else(|| node.clone());
    let mut progress = Progress::new(state, op);
    if !c.refresh {
        // Whatever an interrupted attempt left under the new name goes first.
        if let Err(e) = discard(client, &inst.name, &node.name).await {
            return e.outcome(None);
        }
    }
    if src_node.name == node.name {
        progress.stage("copying").await;
        let copied = client
            .copy_volume(call(
                v1::CopyVolumeRequest {
                    source: c.source.to_string(),
                    source_snapshot: c.snapshot.to_string(),
                    target: inst.name.clone(),
                    instance_only: c.instance_only,
                    refresh: c.refresh,
                },
                TRANSFER_CALL,
            ))
            .await;
        match copied {
            Ok(_) => {}
            // Made by an earlier attempt (the name was free when the copy was accepted).
            Err(e) if e.code() == tonic::Code::AlreadyExists && !c.refresh => {}
            Err(e) => {
                return StepError::status(&format!("could not copy instance {shown:?}"), &e)
                    .outcome(None);
            }
        }
    } else {
        let mut source = match state.agents.client(&src_node) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(None, e.to_string()),
        };
        let ticket = ticket_for(op);
        let sent = async {
            announce(
                client,
                &node.name,
                &mut source,
                &src_node.name,
                &ticket,
                &inst.name,
                c.refresh,
            )
            .await?;
            progress.stage("sending").await;
            send_pass(
                &mut source,
                v1::SendInstanceRequest {
                    ticket: ticket.clone(),
                    instance: c.source.to_string(),
                    source_snapshot: c.snapshot.to_string(),
                    instance_only: c.instance_only,
                    mode: v1::SendMode::Full as i32,
                    target_address: node.address.clone(),
                    target_node: node.name.clone(),
                    target_instance: inst.name.clone(),
                },
                "full",
                &mut progress,
            )
            .await?;
            progress.stage("committing").await;
            commit(client, &ticket, &node.name).await
        }
        .await;
        if let Err(e) = sent {
            if !state.cp.leads_with_quorum() {
                // The new leader's attempt uses the same ticket: leave it alone.
                return Outcome::Retry(format!("no longer the leader ({})", e.message));
            }
            abort(client, &ticket, &node.name).await;
            abort(&mut source, &ticket, &src_node.name).await;
            return e.outcome(None);
        }
    }
    progress
        .stage(if c.refresh { "refreshing" } else { "creating" })
        .await;
    let spec = agent_spec(inst, config, &home);
    let created = match create_existing(client, spec, config, &node.name).await {
        Ok(s) => s,
        Err(e) => {
            if !c.refresh
                && !e.passing
                && let Err(d) = discard(client, &inst.name, &node.name).await
            {
                warn!(error = %d.message, "could not remove the half-made copy");
            }
            return e.outcome(None);
        }
    };
    let mut observed = observed_from(&created);
    if c.start {
        if !state.cp.leads_with_quorum() {
            return Outcome::Retry("no longer the leader".into());
        }
        progress.stage("starting").await;
        match start(client, &inst.name, &node.name).await {
            Ok(s) => observed = observed_from(&s),
            Err(e) if e.passing => return Outcome::Retry(e.message),
            Err(e) => {
                return Outcome::Failed(
                    Some(observed),
                    format!("the copy was made but did not start: {}", e.message),
                );
            }
        }
    }
    progress.stage("done").await;
    Outcome::Done(Some(observed))
}

/// What a move attempt did that a failure must undo.
#[derive(Default)]
struct Undo {
    /// When this attempt began stopping the instance on `from`.
    stopped_at: Option<Instant>,
}

#[allow(clippy::too_many_arguments)]
async fn migrate(
    state: &Arc<AppState>,
    inst: &Instance,
    config: &BTreeMap<String, String>,
    node: &Node,
    client: &mut AgentConn,
    op: &str,
    from: &str,
    to: &str,
    live: bool,
) -> Outcome {
    let ticket = ticket_for(op);
    if inst.node == to {
        // The switch happened in an earlier attempt: only the cleanup of `from` is left.
        return match clean_source(state, &inst.name, from, &ticket).await {
            Ok(()) => Outcome::Done(None),
            Err(e) => Outcome::Retry(e.message),
        };
    }
    if inst.node != from {
        return Outcome::Failed(
            None,
            format!(
                "the instance is on node {}, neither {from} nor {to}",
                inst.node
            ),
        );
    }
    let (to_node, home) = state
        .cp
        .read_local(|s| (s.nodes.get(to).cloned(), s.address_home(inst).cloned()));
    let Some(to_node) = to_node else {
        return Outcome::Failed(None, format!("node {to} is gone"));
    };
    if to_node.status == NodeStatus::Offline {
        return Outcome::Failed(None, format!("node {to} is offline"));
    }
    let mut target = match state.agents.client(&to_node) {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(None, e.to_string()),
    };
    let home = home.unwrap_or_else(|| node.clone());
    let mut progress = Progress::new(state, op);
    let mut undo = Undo::default();
    let moved = move_to(
        state,
        inst,
        config,
        &home,
        node,
        client,
        &to_node,
        &mut target,
        &ticket,
        live,
        op,
        &mut progress,
        &mut undo,
    )
    .await;
    let observed = match moved {
        Ok(observed) => observed,
        Err(e) if e.keep => return Outcome::Retry(e.message),
        // A deposed leader undoes nothing: the new leader's attempt uses the same ticket and
        // the same names on both nodes.
        Err(e) if !state.cp.leads_with_quorum() => {
            return Outcome::Retry(format!("no longer the leader ({})", e.message));
        }
        Err(e) => {
            warn!(error = %e.message, "move failed; the instance stays on {from}");
            abort(&mut target, &ticket, to).await;
            if let Err(d) = discard(&mut target, &inst.name, to).await {
                warn!(error = %d.message, "could not remove the instance's copy from {to}");
            }
            abort(client, &ticket, from).await;
            let mut observed = None;
            if undo.stopped_at.is_some() {
                match start(client, &inst.name, from).await {
                    Ok(s) => observed = Some(observed_from(&s)),
                    Err(s) => {
                        warn!(error = %s.message, "could not start the instance again on {from}");
                        observed = Some(Observed {
                            status: berth_proto::api::InstanceStatusCode::Stopped,
                            pid: 0,
                            updated_at: clock::now(),
                            error: s.message,
                        });
                    }
                }
            }
            return StepError {
                message: format!("could not move the instance to node {to}: {}", e.message),
                ..e
            }
            .outcome(observed);
        }
    };
    progress.stage("cleaning up").await;
    if let Err(e) = clean_source(state, &inst.name, from, &ticket).await {
        // The instance runs on `to`; the re-run removes what is left on `from`.
        return Outcome::Retry(e.message);
    }
    progress.stage("done").await;
    Outcome::Done(Some(observed))
}

/// Sends the instance to `to`, makes it there (started when `live`) and records the switch.
#[allow(clippy::too_many_arguments)]
async fn move_to(
    state: &Arc<AppState>,
    inst: &Instance,
    config: &BTreeMap<String, String>,
    home: &Node,
    from: &Node,
    source: &mut AgentConn,
    to: &Node,
    target: &mut AgentConn,
    ticket: &str,
    live: bool,
    op: &str,
    progress: &mut Progress,
    undo: &mut Undo,
) -> Result<Observed, StepError> {
    let name = inst.name.as_str();
    // Before the switch nothing of this instance belongs on `to`: drop what an interrupted
    // attempt left there.
    discard(target, name, &to.name).await?;
    announce(target, &to.name, source, &from.name, ticket, name, false).await?;
    let request = |mode: v1::SendMode| v1::SendInstanceRequest {
        ticket: ticket.to_string(),
        instance: name.to_string(),
        source_snapshot: String::new(),
        instance_only: false,
        mode: mode as i32,
        target_address: to.address.clone(),
        target_node: to.name.clone(),
        target_instance: name.to_string(),
    };
    if live {
        let mut pass = 0;
        loop {
            pass += 1;
            progress.stage(format!("pre-copy {pass}")).await;
            let sent =
                send_pass(source, request(v1::SendMode::Precopy), "pre-copy", progress).await?;
            if precopy_enough(pass, sent.bytes) {
                break;
            }
        }
        progress.stage("stopping").await;
        progress.hold = true;
        undo.stopped_at = Some(Instant::now());
        // By default at once: the final snapshot is crash-consistent (everything written
        // before the stop is in it) and the instance boots on the target; `migration.stop=clean`
        // shuts it down cleanly first, at the cost of its shutdown time.
        let timeout = if clean_stop(config) {
            live_stop_timeout(config)
        } else {
            0
        };
        stop_for_move(source, name, timeout).await?;
        progress.stage("final pass").await;
        send_pass(source, request(v1::SendMode::Final), "final", progress).await?;
    } else {
        progress.stage("sending").await;
        send_pass(source, request(v1::SendMode::Full), "full", progress).await?;
    }
    progress.stage("committing").await;
    commit(target, ticket, &to.name).await?;
    progress.stage("creating").await;
    let created = create_existing(target, agent_spec(inst, config, home), config, &to.name).await?;
    let mut observed = observed_from(&created);
    if live {
        progress.stage("starting").await;
        let s = start(target, name, &to.name).await?;
        observed = observed_from(&s);
        if let Some(began) = undo.stopped_at {
            let ms = downtime_ms(began, Instant::now());
            info!(downtime_ms = ms, "instance runs on the target");
            progress.meta.downtime_ms = Some(ms);
        }
        progress.hold = false;
    }
    if !state.cp.leads_with_quorum() {
        return Err(StepError {
            message: "no longer the leader".into(),
            passing: true,
            keep: false,
        });
    }
    progress.stage("switching").await;
    if let Err(e) = state
        .cp
        .write(Command::SwitchNode {
            name: name.to_string(),
            op: op.to_string(),
            node: to.name.clone(),
        })
        .await
    {
        // It may have been applied: undo nothing; the re-run looks at the state.
        return Err(StepError {
            message: format!("could not record the switch to node {}: {e}", to.name),
            passing: true,
            keep: true,
        });
    }
    let switched = state
        .cp
        .read_local(|s| s.instances.get(name).map(|i| i.node == to.name))
        .unwrap_or(false);
    if !switched {
        // The move is no longer pending (ended elsewhere): leave everything as it is.
        return Err(StepError {
            message: "the move was ended elsewhere before the switch".into(),
            passing: true,
            keep: true,
        });
    }
    info!(from = %from.name, to = %to.name, "instance switched nodes");
    Ok(observed)
}

/// Removes what a move left on `from` (the instance, the sender's bases of the ticket).
async fn clean_source(
    state: &Arc<AppState>,
    name: &str,
    from: &str,
    ticket: &str,
) -> Result<(), StepError> {
    let Some(node) = state.cp.read_local(|s| s.nodes.get(from).cloned()) else {
        // The node left the cluster: nothing to clean.
        return Ok(());
    };
    if node.status == NodeStatus::Offline {
        return Err(StepError {
            message: format!(
                "node {from} is offline; the instance's old copy there is removed when it returns"
            ),
            passing: true,
            keep: false,
        });
    }
    let mut client = state
        .agents
        .client(&node)
        .map_err(|e| StepError::fatal(e.to_string()))?;
    discard(&mut client, name, from).await?;
    abort(&mut client, ticket, from).await;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "transfer_tests.rs"]
mod fake_agent_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precopy_stops_when_a_pass_is_small_or_after_four() {
        assert!(!precopy_enough(1, 500 << 20));
        assert!(precopy_enough(1, (8 << 20) - 1));
        assert!(!precopy_enough(3, 8 << 20));
        assert!(precopy_enough(4, 1 << 30));
        assert!(precopy_enough(2, 0));
    }

    #[test]
    fn live_stop_timeout_is_capped() {
        let mut c = BTreeMap::new();
        assert_eq!(live_stop_timeout(&c), LIVE_STOP_CAP_SECS);
        c.insert("boot.stop.timeout".to_string(), "3".to_string());
        assert_eq!(live_stop_timeout(&c), 3);
        c.insert("boot.stop.timeout".to_string(), "600".to_string());
        assert_eq!(live_stop_timeout(&c), LIVE_STOP_CAP_SECS);
        c.insert("boot.stop.timeout".to_string(), "x".to_string());
        assert_eq!(live_stop_timeout(&c), LIVE_STOP_CAP_SECS);
    }

    #[test]
    fn downtime_is_stop_to_running() {
        let began = Instant::now();
        let running = began + Duration::from_millis(1234);
        assert_eq!(downtime_ms(began, running), 1234);
        // A clock that does not move forward never gives a negative downtime.
        assert_eq!(downtime_ms(running, began), 0);
    }

    #[test]
    fn tickets_are_per_operation_and_stable() {
        let a = ticket_for("6f1c2d3e-0000-4000-8000-000000000001");
        assert_eq!(a, ticket_for("6f1c2d3e-0000-4000-8000-000000000001"));
        assert_ne!(a, ticket_for("6f1c2d3e-0000-4000-8000-000000000002"));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn metadata_shape() {
        let meta = TransferMetadata {
            stage: "final pass".into(),
            bytes: 10,
            rate: 0,
            passes: vec![TransferPass {
                kind: "pre-copy".into(),
                bytes: 10,
                millis: 5,
            }],
            downtime_ms: Some(800),
        };
        let v = serde_json::to_value(&meta).unwrap();
        assert_eq!(v["stage"], "final pass");
        assert_eq!(v["passes"][0]["kind"], "pre-copy");
        assert_eq!(v["downtime_ms"], 800);
        let copy = serde_json::to_value(TransferMetadata::default()).unwrap();
        assert!(copy.get("downtime_ms").is_none());
    }
}
