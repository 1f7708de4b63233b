//! `GET /1.0/events`: operation and lifecycle events over a websocket, one JSON text frame per
//! event (LXD's shape, [`berth_proto::api::tenancy::Event`]).
//!
//! Query: `type=operation,lifecycle` (default both), `project=P` (default: the key's project,
//! `default` for fleet keys) or `all-projects=true` (admin and operator keys only; adds the
//! fleet's events: cluster members and settings, and for admins API keys). A member or viewer
//! key gets only its project's events; naming another project is a 404.
//!
//! The stream ends when the client closes it, stops answering pings ([`PING_EVERY`], gone
//! after [`SILENT_LIMIT`]), cannot take a frame within [`SEND_TIMEOUT`], or when the key it
//! was opened with is revoked, rotated or expires. See `docs/events.md`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info_span, warn};

use super::{ApiError, Scope, SharedState};
use crate::events::{Audience, Published};
use crate::state::Role;

/// How often the server pings the client (and rechecks the key, which is also checked before
/// every event frame).
pub const PING_EVERY: Duration = Duration::from_secs(30);

/// A client silent (no pong, no frame) for this long is gone.
pub const SILENT_LIMIT: Duration = Duration::from_secs(75);

/// A client that cannot take one frame within this long is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, serde::Deserialize)]
pub struct EventsQuery {
    /// Comma-separated event types: `operation`, `lifecycle`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `true` for every project's events (fleet keys).
    #[serde(rename = "all-projects", default)]
    pub all_projects: String,
}

/// What one subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub operation: bool,
    pub lifecycle: bool,
    /// The project whose events it gets; `None` for all projects and the fleet's events.
    pub project: Option<String>,
    pub role: Role,
}

impl Subscription {
    /// Builds the subscription of a request; 400 for an unknown type or a malformed
    /// `all-projects`, 403 for `all-projects` with a member or viewer key.
    pub fn new(scope: &Scope, q: &EventsQuery) -> Result<Subscription, ApiError> {
        let (mut operation, mut lifecycle) = (false, false);
        for t in q.kind.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match t {
                "operation" => operation = true,
                "lifecycle" => lifecycle = true,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown event type {other:?} (expected operation or lifecycle)"
                    )));
                }
            }
        }
        if !operation && !lifecycle {
            (operation, lifecycle) = (true, true);
        }
        let all = match q.all_projects.as_str() {
            "" | "false" | "0" => false,
            "true" | "1" => true,
            other => {
                return Err(ApiError::bad_request(format!(
                    "all-projects must be true or false, not {other:?}"
                )));
            }
        };
        if all {
            scope.identity.require_fleet()?;
        }
        Ok(Subscription {
            operation,
            lifecycle,
            project: (!all).then(|| scope.project.clone()),
            role: scope.identity.role,
        })
    }

    /// Whether the subscriber gets `p`.
    pub fn wants(&self, p: &Published) -> bool {
        let kind = match p.event.kind.as_str() {
            "operation" => self.operation,
            "lifecycle" => self.lifecycle,
            _ => false,
        };
        kind && match p.audience {
            Audience::Project => self
                .project
                .as_ref()
                .is_none_or(|proj| *proj == p.event.project),
            Audience::Fleet => {
                self.project.is_none() && matches!(self.role, Role::Admin | Role::Operator)
            }
            Audience::Admin => self.project.is_none() && self.role == Role::Admin,
        }
    }
}

/// `GET /1.0/events`.
pub async fn websocket(
    State(state): State<SharedState>,
    scope: Scope,
    Query(q): Query<EventsQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let sub = Subscription::new(&scope, &q)?;
    // Subscribe now: nothing published after the answer is missed.
    let rx = state.cp.events().subscribe();
    let key_id = scope.identity.key_id.clone();
    let key_hash = state
        .cp
        .read_local(|m| m.api_keys.get(&key_id).map(|k| k.hash.clone()))
        .unwrap_or_default();
    let span = info_span!("events", key = %scope.identity.key_name, project = ?sub.project);
    Ok(ws
        .on_upgrade(move |socket| stream(state, socket, rx, sub, key_id, key_hash).instrument(span))
        .into_response())
}

/// Whether the key a stream or session was opened with still works (not revoked, rotated or
/// expired): `hash` is the key's hash when it was opened.
pub(crate) fn key_still_valid(cp: &crate::raft::ControlPlane, key_id: &str, hash: &str) -> bool {
    let now = crate::clock::now();
    cp.read_local(|m| {
        m.api_keys
            .get(key_id)
            .is_some_and(|k| k.hash == hash && k.works_at(&now))
    })
}

async fn stream(
    state: SharedState,
    socket: WebSocket,
    mut rx: broadcast::Receiver<Arc<Published>>,
    sub: Subscription,
    key_id: String,
    key_hash: String,
) {
    debug!("events subscriber connected");
    let (mut tx, mut from_client) = socket.split();
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_heard = Instant::now();
    let why = loop {
        let frame = tokio::select! {
            ev = rx.recv() => match ev {
                Ok(p) if sub.wants(&p) => {
                    // A key that stopped working gets nothing more (not only at the next ping).
                    if !key_still_valid(&state.cp, &key_id, &key_hash) {
                        break "the API key was revoked, rotated or expired";
                    }
                    let mut event = p.event.clone();
                    event.location.clone_from(&state.name);
                    match serde_json::to_string(&event) {
                        Ok(text) => Message::Text(text.into()),
                        Err(e) => {
                            warn!(error = %e, "cannot encode an event");
                            continue;
                        }
                    }
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "events subscriber too slow; oldest events dropped");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break "the controller is stopping",
            },
            msg = from_client.next() => match msg {
                None | Some(Err(_)) => break "the client went away",
                Some(Ok(Message::Close(_))) => break "the client closed the stream",
                Some(Ok(_)) => {
                    last_heard = Instant::now();
                    continue;
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > SILENT_LIMIT {
                    break "the client stopped answering pings";
                }
                if !key_still_valid(&state.cp, &key_id, &key_hash) {
                    break "the API key was revoked, rotated or expired";
                }
                Message::Ping(Vec::new().into())
            }
        };
        match tokio::time::timeout(SEND_TIMEOUT, tx.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break "the client went away",
            Err(_) => break "the client does not take events fast enough",
        }
    };
    debug!(reason = why, "events stream ended");
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(Message::Close(None))).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::future::IntoFuture as _;

    use berth_proto::api::tenancy::Event;

    use super::*;
    use crate::api::Identity;

    fn scope(role: Role, project: &str) -> Scope {
        Scope {
            identity: Identity {
                key_id: "1".into(),
                key_name: "k".into(),
                role,
                project: project.into(),
            },
            idempotency: None,
            project: project.into(),
        }
    }

    fn q(kind: &str, all: &str) -> EventsQuery {
        EventsQuery {
            kind: kind.into(),
            all_projects: all.into(),
        }
    }

    fn ev(kind: &str, project: &str, audience: Audience) -> Published {
        Published {
            event: Event {
                kind: kind.into(),
                project: project.into(),
                ..Default::default()
            },
            audience,
        }
    }

    #[test]
    fn types_and_errors() {
        let s = Subscription::new(&scope(Role::Member, "a"), &q("", "")).unwrap();
        assert!(s.operation && s.lifecycle);
        let s = Subscription::new(&scope(Role::Member, "a"), &q("lifecycle", "")).unwrap();
        assert!(!s.operation && s.lifecycle);
        let s =
            Subscription::new(&scope(Role::Member, "a"), &q("operation, lifecycle", "")).unwrap();
        assert!(s.operation && s.lifecycle);
        let e = Subscription::new(&scope(Role::Member, "a"), &q("logging", "")).unwrap_err();
        assert_eq!(e.status, 400);
        let e = Subscription::new(&scope(Role::Admin, "a"), &q("", "yes")).unwrap_err();
        assert_eq!(e.status, 400);
        let e = Subscription::new(&scope(Role::Member, "a"), &q("", "true")).unwrap_err();
        assert_eq!(e.status, 403);
        let e = Subscription::new(&scope(Role::Viewer, "a"), &q("", "1")).unwrap_err();
        assert_eq!(e.status, 403);
    }

    #[test]
    fn scoped_keys_get_their_project_only() {
        let s = Subscription::new(&scope(Role::Member, "a"), &q("", "")).unwrap();
        assert!(s.wants(&ev("lifecycle", "a", Audience::Project)));
        assert!(s.wants(&ev("operation", "a", Audience::Project)));
        assert!(!s.wants(&ev("lifecycle", "b", Audience::Project)));
        assert!(!s.wants(&ev("lifecycle", "", Audience::Fleet)));
        assert!(!s.wants(&ev("lifecycle", "", Audience::Admin)));
        assert!(!s.wants(&ev("lifecycle", "a", Audience::Admin)));
        let ops = Subscription::new(&scope(Role::Viewer, "a"), &q("operation", "")).unwrap();
        assert!(!ops.wants(&ev("lifecycle", "a", Audience::Project)));
        assert!(ops.wants(&ev("operation", "a", Audience::Project)));
        assert!(!ops.wants(&ev("other", "a", Audience::Project)));
    }

    /// Reads one server frame (unmasked) and returns its opcode and payload.
    async fn read_frame(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
        use tokio::io::AsyncReadExt as _;
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.unwrap();
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.unwrap();
            len = u64::from_be_bytes(b);
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x0f, payload)
    }

    /// Opens `/1.0/events` with `query` and `secret`; returns the stream after the 101, or
    /// the status line.
    async fn open(
        addr: std::net::SocketAddr,
        query: &str,
        secret: &str,
    ) -> Result<tokio::net::TcpStream, String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /1.0/events{query} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {secret}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let status = head.lines().next().unwrap_or("").to_string();
        if status.contains(" 101 ") {
            Ok(s)
        } else {
            Err(status)
        }
    }

    #[tokio::test]
    async fn events_stream_over_a_websocket() {
        use crate::api::{AppState, key_hash, router};
        use crate::raft::ControlPlane;
        use crate::state::{ApiKey, Command, Project, Requestor};

        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path(), 1, "127.0.0.1:1".into(), true, None)
            .await
            .unwrap();
        assert!(cp.wait_for_leader(Duration::from_secs(10)).await.is_some());
        for (id, secret, role, project) in [
            ("k1", "admin-secret", Role::Admin, ""),
            ("k2", "member-secret", Role::Member, "p1"),
        ] {
            if !project.is_empty() {
                cp.write(Command::CreateProject {
                    project: Project {
                        name: project.into(),
                        ..Default::default()
                    },
                })
                .await
                .unwrap();
            }
            cp.write(Command::AddApiKey {
                key: ApiKey {
                    id: id.into(),
                    name: format!("key-{id}"),
                    hash: key_hash(secret),
                    role,
                    project: project.into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap();
        }
        let ca = crate::tls::ClusterCa::generate("test").unwrap();
        let state = AppState::for_test(cp.clone(), ca);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(axum::serve(listener, router(state)).into_future());

        // Refusals come before the upgrade.
        assert!(open(addr, "", "nope").await.unwrap_err().contains("401"));
        let e = open(addr, "?project=default", "member-secret")
            .await
            .unwrap_err();
        assert!(e.contains("404"), "{e}");
        let e = open(addr, "?all-projects=true", "member-secret")
            .await
            .unwrap_err();
        assert!(e.contains("403"), "{e}");
        let e = open(addr, "?type=nope", "admin-secret").await.unwrap_err();
        assert!(e.contains("400"), "{e}");

        let mut member = open(addr, "?type=lifecycle", "member-secret")
            .await
            .unwrap();
        let mut admin = open(addr, "?all-projects=true", "admin-secret")
            .await
            .unwrap();
        let alice = Requestor {
            key: "alice".into(),
            key_id: "a".into(),
            role: "admin".into(),
        };
        for (project, name) in [("default", "d1"), ("p1", "w1")] {
            cp.write(Command::By {
                requestor: alice.clone(),
                idempotency: None,
                command: Box::new(Command::CreateProfile {
                    profile: crate::state::Profile {
                        name: crate::state::scoped_name(project, name),
                        project: project.into(),
                        ..Default::default()
                    },
                }),
            })
            .await
            .unwrap();
        }
        // The member sees its project's event only; the admin sees both, in order.
        let (op, payload) = read_frame(&mut member).await;
        assert_eq!(op, 1, "a text frame");
        let ev: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(ev["type"], "lifecycle");
        assert_eq!(ev["project"], "p1");
        assert_eq!(ev["location"], "c1");
        assert_eq!(ev["metadata"]["action"], "profile-created");
        assert_eq!(ev["metadata"]["source"], "/1.0/profiles/w1?project=p1");
        assert_eq!(ev["metadata"]["requestor"]["key"], "alice");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (_, payload) = read_frame(&mut admin).await;
            let ev: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            seen.push(ev["metadata"]["source"].as_str().unwrap().to_string());
        }
        assert_eq!(seen, ["/1.0/profiles/d1", "/1.0/profiles/w1?project=p1"]);

        // A revoked key gets no further event: its stream closes at the next one.
        cp.write(Command::DeleteApiKey {
            id: "k2".into(),
            now: String::new(),
        })
        .await
        .unwrap();
        cp.write(Command::By {
            requestor: alice.clone(),
            idempotency: None,
            command: Box::new(Command::CreateProfile {
                profile: crate::state::Profile {
                    name: crate::state::scoped_name("p1", "w2"),
                    project: "p1".into(),
                    ..Default::default()
                },
            }),
        })
        .await
        .unwrap();
        let (op, _) = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut member))
            .await
            .unwrap();
        assert_eq!(op, 8, "a close frame, not the event");
        server.abort();
        cp.shutdown().await;
    }

    #[test]
    fn fleet_keys_and_all_projects() {
        let admin = Subscription::new(&scope(Role::Admin, "default"), &q("", "true")).unwrap();
        let operator =
            Subscription::new(&scope(Role::Operator, "default"), &q("", "true")).unwrap();
        for s in [&admin, &operator] {
            assert!(s.wants(&ev("lifecycle", "a", Audience::Project)));
            assert!(s.wants(&ev("lifecycle", "b", Audience::Project)));
            assert!(s.wants(&ev("lifecycle", "", Audience::Fleet)));
        }
        assert!(admin.wants(&ev("lifecycle", "", Audience::Admin)));
        assert!(!operator.wants(&ev("lifecycle", "", Audience::Admin)));
        // One project, without all-projects: that project only.
        let one = Subscription::new(&scope(Role::Admin, "b"), &q("", "")).unwrap();
        assert!(one.wants(&ev("lifecycle", "b", Audience::Project)));
        assert!(!one.wants(&ev("lifecycle", "a", Audience::Project)));
        assert!(!one.wants(&ev("lifecycle", "", Audience::Admin)));
    }
}
