//! `berth exec`: run a command in an instance, streamed over the operation's websocket.
//!
//! Binary frames carry data, first byte = stream (0 stdin, 1 stdout, 2 stderr); text frames carry
//! JSON [`ExecControl`] messages (`window-resize`, `signal`, `stdin-eof` from us; `exit` last from
//! the server).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use berth_proto::api::{
    ExecControl, InstanceExecPost, Operation, Response, ResponseType, exec_stream,
};
use bytes::Bytes;
use clap::Args;
use futures::{SinkExt, StreamExt};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{check_instance_name, parse_key_value};
use crate::Ctx;
use crate::client::{ClientError, encode_query, operation_of};
use crate::commands::instance::instance_path;

/// `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Instance name, optionally REMOTE:NAME
    pub name: String,
    /// Force a terminal (pseudo-tty) even when not attached to one
    #[arg(short = 't', long = "force-interactive", conflicts_with = "no_tty")]
    pub force_tty: bool,
    /// Never allocate a terminal
    #[arg(short = 'T', long = "force-noninteractive")]
    pub no_tty: bool,
    /// Environment variable to set (KEY=VALUE, repeatable)
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Directory to run the command in
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// User ID to run the command as
    #[arg(long, value_name = "UID")]
    pub user: Option<u32>,
    /// Group ID to run the command as
    #[arg(long, value_name = "GID")]
    pub group: Option<u32>,
    /// The command and its arguments (after --)
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// A binary stdin frame for `data`.
pub fn stdin_frame(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(exec_stream::STDIN);
    v.extend_from_slice(data);
    v
}

/// A control message as a websocket text frame.
pub fn control_frame(c: &ExecControl) -> Message {
    Message::text(serde_json::to_string(c).unwrap_or_default())
}

/// What a frame from the server means.
#[derive(Debug, PartialEq)]
pub enum ServerFrame {
    Stdout(Bytes),
    Stderr(Bytes),
    Control(ExecControl),
    Closed,
    /// Pings, pongs and frames for streams we do not know.
    Ignored,
}

/// Decodes one websocket message from the server.
pub fn decode_frame(msg: Message) -> Result<ServerFrame, String> {
    match msg {
        Message::Binary(b) => match b.first() {
            Some(&exec_stream::STDOUT) => Ok(ServerFrame::Stdout(b.slice(1..))),
            Some(&exec_stream::STDERR) => Ok(ServerFrame::Stderr(b.slice(1..))),
            _ => Ok(ServerFrame::Ignored),
        },
        Message::Text(t) => serde_json::from_str::<ExecControl>(t.as_str())
            .map(ServerFrame::Control)
            .map_err(|e| format!("bad control message from the server: {e}")),
        Message::Close(_) => Ok(ServerFrame::Closed),
        _ => Ok(ServerFrame::Ignored),
    }
}

/// Puts stdin in raw mode; restores the saved settings when dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enable() -> std::io::Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = rustix::termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// The terminal's size (columns, rows), from stdout or stdin.
fn window_size() -> Option<(u32, u32)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then(|| (u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// Runs `exec`; the exit code is the command's.
pub async fn exec(ctx: &Ctx, args: ExecArgs) -> anyhow::Result<i32> {
    let (client, name) = ctx.resolve(&args.name)?;
    check_instance_name(name)?;
    let mut environment = BTreeMap::new();
    for e in &args.env {
        let (k, v) = parse_key_value(e)?;
        environment.insert(k, v);
    }
    let interactive = if args.force_tty {
        true
    } else if args.no_tty {
        false
    } else {
        std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
    };
    let (width, height) = if interactive {
        window_size().unwrap_or((80, 24))
    } else {
        (0, 0)
    };
    if interactive && !environment.contains_key("TERM") {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        environment.insert("TERM".into(), term);
    }
    let req = InstanceExecPost {
        command: args.command,
        environment,
        wait_for_websocket: true,
        interactive,
        width,
        height,
        user: args.user.unwrap_or(0),
        group: args.group.unwrap_or(0),
        cwd: args.cwd.unwrap_or_default(),
        record_output: false,
    };
    // The POST's connection carries the websocket too.
    let (resp, ws) = client
        .call_then_websocket(
            Method::POST,
            &format!("{}/exec", instance_path(name)),
            Some(&req),
            |resp| {
                let (op, secret) = exec_session(resp)?;
                Ok(format!(
                    "/1.0/operations/{}/websocket?secret={}",
                    encode_query(&op.id),
                    encode_query(&secret)
                ))
            },
        )
        .await?;
    let (op, _) = exec_session(&resp)?;

    let code = {
        let _raw = if interactive {
            RawMode::enable()?
        } else {
            None
        };
        pump(ws, interactive).await?
    };
    if let Some(code) = code {
        return Ok(code);
    }
    // The stream ended without an exit message: the operation says how it went.
    let done = client.wait(&op.id).await?;
    match done.metadata.get("return").and_then(|r| r.as_i64()) {
        Some(code) => Ok(i32::try_from(code).unwrap_or(1)),
        None => anyhow::bail!("the exec stream closed before the command's exit code arrived"),
    }
}

/// The exec operation of the server's answer, and the secret of its websocket.
fn exec_session(resp: &Response) -> Result<(Operation, String), ClientError> {
    if resp.kind != ResponseType::Async {
        return Err(ClientError::Decode(
            "the server did not start an exec operation".into(),
        ));
    }
    let op = operation_of(resp)?;
    let secret = op
        .metadata
        .get("fds")
        .and_then(|f| f.get("0"))
        .and_then(|s| s.as_str())
        .ok_or_else(|| {
            ClientError::Decode("the exec operation carries no websocket secret".into())
        })?
        .to_string();
    Ok((op, secret))
}

async fn forward_stdin(tx: mpsc::Sender<Message>) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = tx.send(control_frame(&ExecControl::StdinEof)).await;
                return;
            }
            Ok(n) => {
                if tx
                    .send(Message::binary(stdin_frame(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Forwards SIGINT, SIGTERM and SIGHUP to the command, and SIGWINCH as a resize when
/// interactive. Returns on the third SIGINT (like lxc: the user insists on leaving); never
/// returns when the handlers cannot be installed.
async fn forward_signals(tx: mpsc::Sender<Message>, interactive: bool) {
    let (Ok(mut int), Ok(mut term), Ok(mut hup), Ok(mut winch)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::window_change()),
    ) else {
        return std::future::pending().await;
    };
    let mut interrupts = 0;
    loop {
        let msg = tokio::select! {
            _ = int.recv() => {
                interrupts += 1;
                if interrupts >= 3 {
                    return;
                }
                ExecControl::Signal { signal: libc_signal::SIGINT }
            }
            _ = term.recv() => ExecControl::Signal { signal: libc_signal::SIGTERM },
            _ = hup.recv() => ExecControl::Signal { signal: libc_signal::SIGHUP },
            _ = winch.recv(), if interactive => match window_size() {
                Some((width, height)) => ExecControl::WindowResize { width, height },
                None => continue,
            },
        };
        if tx.send(control_frame(&msg)).await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Linux signal numbers forwarded to the command.
mod libc_signal {
    pub const SIGHUP: i32 = 1;
    pub const SIGINT: i32 = 2;
    pub const SIGTERM: i32 = 15;
}

/// Moves data both ways until the server's `exit` message (its code) or the end of the stream.
async fn pump(ws: crate::client::WebSocket, interactive: bool) -> anyhow::Result<Option<i32>> {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let closing = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let stdin_task = tokio::spawn(forward_stdin(tx.clone()));
    let mut signal_task = tokio::spawn(forward_signals(tx.clone(), interactive));
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut code = None;
    let mut failure = None;
    loop {
        let next = tokio::select! {
            m = stream.next() => m,
            _ = &mut signal_task => {
                failure = Some("interrupted; the command may still be running".to_string());
                break;
            }
        };
        let Some(msg) = next else { break };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                failure = Some(format!("exec stream failed: {e}"));
                break;
            }
        };
        match decode_frame(msg) {
            Ok(ServerFrame::Stdout(b)) => {
                let _ = stdout.write_all(&b).await;
                let _ = stdout.flush().await;
            }
            Ok(ServerFrame::Stderr(b)) => {
                let _ = stderr.write_all(&b).await;
                let _ = stderr.flush().await;
            }
            Ok(ServerFrame::Control(ExecControl::Exit { code: c })) => {
                code = Some(c);
                break;
            }
            Ok(ServerFrame::Control(_)) | Ok(ServerFrame::Ignored) => {}
            Ok(ServerFrame::Closed) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    stdin_task.abort();
    signal_task.abort();
    let _ = tx.send(Message::Close(None)).await;
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    match (code, failure) {
        (Some(c), _) => Ok(Some(c)),
        (None, Some(f)) => Err(anyhow::anyhow!(f)),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_frames() {
        assert_eq!(stdin_frame(b"hi"), vec![0, b'h', b'i']);
        assert_eq!(stdin_frame(b""), vec![0]);
    }

    #[test]
    fn server_frames() {
        assert_eq!(
            decode_frame(Message::binary(vec![1, b'o', b'k'])).unwrap(),
            ServerFrame::Stdout(Bytes::from_static(b"ok"))
        );
        assert_eq!(
            decode_frame(Message::binary(vec![2, b'e'])).unwrap(),
            ServerFrame::Stderr(Bytes::from_static(b"e"))
        );
        assert_eq!(
            decode_frame(Message::binary(vec![9, 1])).unwrap(),
            ServerFrame::Ignored
        );
        assert_eq!(
            decode_frame(Message::binary(Vec::new())).unwrap(),
            ServerFrame::Ignored
        );
        assert_eq!(
            decode_frame(Message::text(r#"{"command":"exit","code":3}"#)).unwrap(),
            ServerFrame::Control(ExecControl::Exit { code: 3 })
        );
        assert!(decode_frame(Message::text("{")).is_err());
        assert_eq!(
            decode_frame(Message::Close(None)).unwrap(),
            ServerFrame::Closed
        );
    }

    #[test]
    fn control_frames() {
        let text = |c: &ExecControl| match control_frame(c) {
            Message::Text(t) => t.as_str().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            text(&ExecControl::WindowResize {
                width: 80,
                height: 24
            }),
            r#"{"command":"window-resize","width":80,"height":24}"#
        );
        assert_eq!(
            text(&ExecControl::Signal { signal: 2 }),
            r#"{"command":"signal","signal":2}"#
        );
        assert_eq!(text(&ExecControl::StdinEof), r#"{"command":"stdin-eof"}"#);
    }
}
