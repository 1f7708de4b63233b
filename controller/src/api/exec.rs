//! `POST /1.0/instances/{name}/exec` and its websocket.
//!
//! The POST answers 202 with an operation whose metadata carries a one-time secret; the client
//! then opens `GET /1.0/operations/{id}/websocket?secret=...`. On that one websocket, binary
//! frames carry data (first byte: 0 stdin, 1 stdout, 2 stderr) and text frames carry JSON
//! control messages ([`ExecControl`]). The server ends with an `exit` message and closes.
//! An exec session that nobody connects to within [`CONNECT_WINDOW`] fails. A session whose
//! API key is revoked, rotated or expires is ended (the key is checked every
//! [`KEY_CHECK_EVERY`]): the command is killed, the client gets an `exit` message (137) and the
//! operation fails with "the API key was revoked, rotated or expired". An accepted exec is
//! announced as the lifecycle event `instance-exec` (`context.command`, `context.operation`). `DELETE
//! /1.0/operations/{id}` on the controller that holds the session cancels it, waiting or
//! running (the command is killed, the client gets an `exit` message (137), the operation
//! ends `Cancelled`): exec operations say `may_cancel: true`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use berth_proto::api::{ExecControl, InstanceExecPost, Operation, exec_stream};
use berth_proto::v1::{self, exec_input, exec_output};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, debug, info_span, warn};

use super::cluster::random_secret;
use super::events::key_still_valid;
use super::instances::{instance_operation, lookup, require_member};
use super::operations::{accepted, finish, finish_cancelled};
use super::{ApiError, JsonBody, Scope, SharedState};
use crate::state::{Command, Node};

/// How long an exec session waits for its websocket.
pub const CONNECT_WINDOW: Duration = Duration::from_secs(30);

/// How often a running session checks that its API key still works.
pub const KEY_CHECK_EVERY: Duration = Duration::from_secs(30);

/// The exit code reported when the server ends a session (the command is killed: 128 + 9).
const KILLED: i32 = 137;

/// Why a session ended on the server's side.
const KEY_GONE: &str = "the API key was revoked, rotated or expired; the exec session was ended";

/// Why a cancelled session ended.
const CANCELLED: &str = "operation cancelled";

/// How long the server waits for the client's close after the exit message.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The largest command line accepted (bytes, all arguments together).
const MAX_COMMAND_BYTES: usize = 128 * 1024;

/// An exec session waiting for its client.
pub struct PendingExec {
    secret_hash: [u8; 32],
    op: Operation,
    node: Node,
    start: v1::ExecStart,
    /// The id of the API key that started the session, and its hash then.
    key_id: String,
    key_hash: String,
}

/// Exec sessions created on this controller, by operation id: waiting for their client, or
/// running (with the signal that cancels them).
#[derive(Default)]
pub struct PendingExecs {
    inner: Mutex<HashMap<String, PendingExec>>,
    running: Mutex<HashMap<String, Arc<Notify>>>,
}

/// What [`PendingExecs::cancel`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// A session nobody had connected to: dropped; the caller records the operation's end.
    Pending,
    /// A running session: told to stop; it kills the command and records the end itself.
    Running,
    /// No session of that id on this controller.
    None,
}

/// Removes a running session's entry when its websocket task ends.
struct RunningGuard<'a> {
    execs: &'a PendingExecs,
    id: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.execs.lock_running().remove(&self.id);
    }
}

impl PendingExecs {
    fn insert(&self, id: String, p: PendingExec) {
        self.lock().insert(id, p);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingExec>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the session if the secret matches.
    fn claim(&self, id: &str, secret: &str) -> Option<PendingExec> {
        let mut map = self.lock();
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let matches = map.get(id).is_some_and(|p| {
            // Compare hashes, so timing reveals nothing about the secret.
            p.secret_hash == hash
        });
        if matches { map.remove(id) } else { None }
    }

    /// Drops a session nobody connected to; true if there was one.
    fn drop_pending(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks session `id` running until the guard drops; the signal ends it.
    fn start_running(&self, id: &str) -> (RunningGuard<'_>, Arc<Notify>) {
        let stop = Arc::new(Notify::new());
        self.lock_running().insert(id.to_string(), stop.clone());
        (
            RunningGuard {
                execs: self,
                id: id.to_string(),
            },
            stop,
        )
    }

    /// Cancels session `id` (`DELETE /1.0/operations/{id}`), waiting or running.
    pub fn cancel(&self, id: &str) -> Cancelled {
        if self.drop_pending(id) {
            return Cancelled::Pending;
        }
        match self.lock_running().get(id) {
            Some(stop) => {
                // Stores a permit: the session stops even if it is not waiting right now.
                stop.notify_one();
                Cancelled::Running
            }
            None => Cancelled::None,
        }
    }
}

/// `POST /1.0/instances/{name}/exec`: not for viewer keys.
pub async fn post_exec(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<InstanceExecPost>,
) -> Result<Response, ApiError> {
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(ApiError::bad_request("the command is empty"));
    }
    let size: usize = req.command.iter().map(|a| a.len() + 1).sum::<usize>()
        + req
            .environment
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    if size > MAX_COMMAND_BYTES {
        return Err(ApiError::bad_request(
            "the command and environment are larger than 128 KiB",
        ));
    }
    if req.command.iter().any(|a| a.contains('\0'))
        || req
            .environment
            .iter()
            .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "the command or environment contains a NUL byte or an invalid variable name",
        ));
    }
    if !req.cwd.is_empty() && !req.cwd.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "cwd \"{}\" is not an absolute path",
            req.cwd
        )));
    }
    if !req.wait_for_websocket {
        return Err(ApiError::bad_request(
            "exec needs wait-for-websocket: output is streamed over the operation's websocket",
        ));
    }
    let found = lookup(&state, &scope, &name).await?;
    require_member(&scope, "running commands in an instance")?;
    let (i, node) = (found.instance, found.node);
    // Refuse early and clearly when the instance is not running.
    let status = state
        .agents
        .client(&node)?
        .instance_state(crate::agents::short(v1::InstanceRef {
            name: i.name.clone(),
        }))
        .await?
        .into_inner();
    if status.state != v1::InstanceState::Running as i32 {
        return Err(ApiError::bad_request(format!(
            "instance \"{name}\" is not running"
        )));
    }
    let mut env: HashMap<String, String> = found
        .expanded
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("environment.")
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();
    env.extend(req.environment.clone());
    let start = v1::ExecStart {
        instance: i.name.clone(),
        command: req.command.clone(),
        env,
        cwd: req.cwd.clone(),
        uid: req.user,
        gid: req.group,
        tty: req.interactive,
        width: req.width,
        height: req.height,
    };
    let secret = random_secret()?;
    let mut op = instance_operation(&state, &scope, "websocket", "Executing command", &name);
    // The secret goes to the caller only; the stored (replicated, listable) operation does
    // not carry it.
    op.metadata = serde_json::json!({ "fds": { "0": "" } });
    // DELETE /1.0/operations/{id} on this controller ends it, waiting or running.
    op.may_cancel = true;
    let mut answer_op = op.clone();
    answer_op.metadata = serde_json::json!({ "fds": { "0": secret } });
    let id = op.id.clone();
    // The operation ends when the session does; if nobody connects in time, it fails. The
    // operation and the event are proposed together (both are committed before the answer),
    // so that the exec waits for one round of Raft commits instead of two.
    let (written, ()) = tokio::join!(
        state.cp.write(scope.by(Command::PutOperation {
            operation: op.clone(),
        })),
        super::files::record_event(
            &state,
            &scope,
            "instance-exec",
            &name,
            BTreeMap::from([
                ("command".to_string(), req.command.join(" ")),
                ("operation".to_string(), id.clone()),
            ]),
        )
    );
    written?;
    let key_id = scope.identity.key_id.clone();
    let key_hash = state
        .cp
        .read_local(|m| m.api_keys.get(&key_id).map(|k| k.hash.clone()))
        .unwrap_or_default();
    state.execs.insert(
        id.clone(),
        PendingExec {
            secret_hash: Sha256::digest(secret.as_bytes()).into(),
            op: op.clone(),
            node,
            start,
            key_id,
            key_hash,
        },
    );
    let st = state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(CONNECT_WINDOW).await;
        // Still pending: nobody came. Otherwise the websocket handler records the end.
        if st.execs.drop_pending(&id) {
            finish(
                &st,
                op,
                Err(ApiError::bad_request(
                    "nobody connected to the exec websocket in time",
                )),
            )
            .await;
        }
    });
    Ok(accepted(&answer_op))
}

#[derive(Deserialize)]
pub struct WsQuery {
    secret: String,
}

/// `GET /1.0/operations/{id}/websocket?secret=...`.
pub async fn websocket(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let pending = state.execs.claim(&id, &q.secret).ok_or_else(|| {
        ApiError::new(
            http::StatusCode::FORBIDDEN,
            "no exec session with that operation and secret",
        )
    })?;
    let span = info_span!("exec", op = %id, instance = %pending.start.instance);
    let st = state.clone();
    Ok(ws
        .max_message_size(4 << 20)
        .on_upgrade(move |socket| {
            async move {
                let op = pending.op.clone();
                let (guard, stop) = st.execs.start_running(&op.id);
                let result = run_session(&st, pending, socket, &stop).await;
                drop(guard);
                match result {
                    Err(e) if e.message == CANCELLED => finish_cancelled(&st, op).await,
                    result => {
                        let result = result.map(|code| serde_json::json!({ "return": code }));
                        finish(&st, op, result).await;
                    }
                }
            }
            .instrument(span)
        })
        .into_response())
}

async fn run_session(
    state: &SharedState,
    p: PendingExec,
    socket: WebSocket,
    stop: &Notify,
) -> Result<i32, ApiError> {
    if !key_still_valid(&state.cp, &p.key_id, &p.key_hash) {
        return Err(ApiError::forbidden(KEY_GONE));
    }
    let mut client = state.agents.client(&p.node)?;
    let (to_agent, rx) = mpsc::channel::<v1::ExecInput>(64);
    to_agent
        .send(v1::ExecInput {
            msg: Some(exec_input::Msg::Start(p.start.clone())),
        })
        .await
        .map_err(|_| ApiError::internal("exec input channel closed"))?;
    let mut output = client
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let (mut ws_tx, mut ws_rx) = socket.split();

    // Client to agent.
    let input = async move {
        while let Some(msg) = ws_rx.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "websocket read failed");
                    break;
                }
            };
            let input = match msg {
                Message::Binary(b) if b.first() == Some(&exec_stream::STDIN) => {
                    exec_input::Msg::Stdin(b.slice(1..))
                }
                Message::Binary(_) => continue,
                Message::Text(t) => match serde_json::from_str::<ExecControl>(t.as_str()) {
                    Ok(ExecControl::WindowResize { width, height }) => {
                        exec_input::Msg::Resize(v1::WindowSize { width, height })
                    }
                    Ok(ExecControl::Signal { signal }) if (1..=64).contains(&signal) => {
                        exec_input::Msg::Signal(signal)
                    }
                    Ok(ExecControl::StdinEof) => exec_input::Msg::StdinEof(true),
                    Ok(_) => continue,
                    Err(e) => {
                        debug!(error = %e, "ignoring a control message that is not valid");
                        continue;
                    }
                },
                Message::Close(_) => break,
                _ => continue,
            };
            // Once the command has ended the agent stops listening; keep reading anyway so
            // that the client's close handshake completes and no data is lost to a reset.
            let _ = to_agent.send(v1::ExecInput { msg: Some(input) }).await;
        }
    };
    let input = tokio::spawn(input);

    // Agent to client.
    let mut exit_code = None;
    let mut input = input;
    let mut key_check = tokio::time::interval_at(
        tokio::time::Instant::now() + KEY_CHECK_EVERY,
        KEY_CHECK_EVERY,
    );
    loop {
        let next = tokio::select! {
            m = output.message() => Some(m),
            // The client closed the websocket (or it broke) before the command ended.
            _ = &mut input => None,
            () = stop.notified() => {
                // DELETE /1.0/operations/{id}: dropping the agent stream kills the command.
                drop(output);
                input.abort();
                debug!("exec session cancelled");
                let ctl = serde_json::to_string(&ExecControl::Exit { code: KILLED })
                    .unwrap_or_default();
                let _ = ws_tx.send(Message::Text(ctl.into())).await;
                let _ = ws_tx.send(Message::Close(None)).await;
                return Err(ApiError::bad_request(CANCELLED));
            }
            _ = key_check.tick() => {
                if key_still_valid(&state.cp, &p.key_id, &p.key_hash) {
                    continue;
                }
                // Dropping the agent stream cancels it: the agent kills the command.
                drop(output);
                input.abort();
                warn!("the exec session's API key no longer works; ending the session");
                let ctl = serde_json::to_string(&ExecControl::Exit { code: KILLED })
                    .unwrap_or_default();
                let _ = ws_tx.send(Message::Text(ctl.into())).await;
                let _ = ws_tx.send(Message::Close(None)).await;
                return Err(ApiError::forbidden(KEY_GONE));
            }
        };
        let Some(next) = next else {
            // Dropping the agent stream cancels it, and the agent kills the command.
            drop(output);
            warn!("exec client disconnected before the command ended");
            return Err(ApiError::bad_request(
                "the exec client disconnected before the command ended",
            ));
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                input.abort();
                let _ = ws_tx.send(Message::Close(None)).await;
                return Err(e.into());
            }
        };
        let frame = match msg.msg {
            Some(exec_output::Msg::Stdout(b)) => with_stream(exec_stream::STDOUT, &b),
            Some(exec_output::Msg::Stderr(b)) => with_stream(exec_stream::STDERR, &b),
            Some(exec_output::Msg::ExitCode(c)) => {
                exit_code = Some(c);
                break;
            }
            None => continue,
        };
        if ws_tx.send(Message::Binary(frame.into())).await.is_err() {
            // The client went away: dropping the agent stream cancels it (the agent kills
            // the command).
            input.abort();
            drop(output);
            warn!("exec client disconnected before the command ended");
            return Err(ApiError::bad_request(
                "the exec client disconnected before the command ended",
            ));
        }
    }
    let Some(code) = exit_code else {
        input.abort();
        let _ = ws_tx.send(Message::Close(None)).await;
        return Err(ApiError::internal("the command ended without an exit code"));
    };
    let ctl = serde_json::to_string(&ExecControl::Exit { code }).unwrap_or_default();
    let _ = ws_tx.send(Message::Text(ctl.into())).await;
    let _ = ws_tx.send(Message::Close(None)).await;
    // Wait (bounded) for the client's close, so the exit message is read before the socket goes.
    if tokio::time::timeout(CLOSE_WAIT, input).await.is_err() {
        debug!("the exec client did not close the websocket in time");
    }
    Ok(code)
}

fn with_stream(id: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(id);
    v.extend_from_slice(data);
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::projects::testkit::*;

    #[tokio::test]
    async fn sessions_are_cancelled_waiting_or_running() {
        let execs = PendingExecs::default();
        assert_eq!(execs.cancel("x"), Cancelled::None);
        let (guard, stop) = execs.start_running("r");
        assert_eq!(execs.cancel("r"), Cancelled::Running);
        // The session sees the signal even though it was not waiting when it was sent.
        tokio::time::timeout(Duration::from_secs(1), stop.notified())
            .await
            .unwrap();
        drop(guard);
        assert_eq!(
            execs.cancel("r"),
            Cancelled::None,
            "an ended session is gone"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_notices_its_key_revoked_or_rotated() {
        let api = Api::start().await;
        let hash = |id: &str| {
            api.cp
                .read_local(|m| m.api_keys.get(id).map(|k| k.hash.clone()))
                .unwrap()
        };
        let (k3, k5) = (hash("k3"), hash("k5"));
        assert!(key_still_valid(&api.cp, "k3", &k3));
        api.cp
            .write(Command::DeleteApiKey {
                id: "k3".into(),
                now: String::new(),
            })
            .await
            .unwrap();
        assert!(!key_still_valid(&api.cp, "k3", &k3));
        api.cp
            .write(Command::RotateApiKey {
                id: "k5".into(),
                hash: crate::api::key_hash("new"),
                expires_at: None,
            })
            .await
            .unwrap();
        assert!(!key_still_valid(&api.cp, "k5", &k5));
        api.cp.shutdown().await;
    }
}
