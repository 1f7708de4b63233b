//! Runs the real `berth` binary against a small in-process fake of the Berth REST API over
//! HTTPS (a throwaway CA and server certificate), covering the client's wire behaviour:
//! TLS trust, the envelope, operations, exec websockets, file transfers and images.

#![allow(clippy::unwrap_used)] // a test: failures should panic loudly

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use berth_proto::api::tenancy::{
    ApiKey, Event, KeyCreated, KeyRotatePost, KeysPost, LifecycleEvent, Profile, ProfilePatch,
    ProfilePut, ProfilesPost, Project, ProjectPatch, ProjectPut, ProjectResource, ProjectState,
    ProjectsPost, RenamePost, Requestor,
};
use berth_proto::api::{
    ExecControl, Image, ImageAlias, Instance, InstanceExecPost, InstanceState, InstancesPost,
    Operation, OperationStatus, Response as Envelope, Server, ServerEnvironment, file_headers,
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

const KEY: &str = "test-key-123";

#[derive(Clone, Debug)]
struct FileEntry {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    instances: BTreeMap<String, Instance>,
    ops: HashMap<String, Operation>,
    files: BTreeMap<String, FileEntry>,
    images: Vec<Image>,
    aliases: Vec<serde_json::Value>,
    execs: HashMap<String, InstanceExecPost>,
    requests: Vec<String>,
    imports: Vec<(BTreeMap<String, String>, usize)>,
    next: u64,
    /// This fake's own address (the API address of controller "c1").
    self_addr: String,
    /// API addresses of further controllers `GET /1.0/cluster` reports.
    other_controllers: Vec<String>,
    cluster_config: BTreeMap<String, String>,
    node_config: BTreeMap<String, String>,
    /// The next this many requests get 503 (no leader); with `retry_after` the answer says
    /// nothing was committed.
    unavailable: u32,
    retry_after: bool,
    projects: BTreeMap<String, Project>,
    /// Profiles by (project, name).
    profiles: BTreeMap<(String, String), Profile>,
    keys: BTreeMap<String, ApiKey>,
    /// The next this many PUTs answer 412 (someone else changed the object).
    stale_puts: u32,
    /// The If-Match headers PUTs came with.
    if_matches: Vec<String>,
    /// JSON bodies of requests, with their method and URI.
    bodies: Vec<(String, serde_json::Value)>,
    /// Running states an operation's wait answers with before its final one (progress).
    progress: HashMap<String, std::collections::VecDeque<Operation>>,
}

type Shared = Arc<Mutex<State>>;

fn json_response(status: StatusCode, env: &Envelope) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(env).unwrap())))
        .unwrap()
}

fn sync(v: serde_json::Value) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, &Envelope::sync(v))
}

fn error(code: u16, msg: &str) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        &Envelope::error(code, msg),
    )
}

/// A strong ETag of a JSON value (a hash of its text).
fn etag_of(v: &serde_json::Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

/// A sync answer with the object's ETag.
fn tagged(v: serde_json::Value) -> Response<Full<Bytes>> {
    let etag = etag_of(&v);
    let mut r = sync(v);
    r.headers_mut()
        .insert("etag", http::HeaderValue::from_str(&etag).unwrap());
    r
}

/// Checks a PUT's If-Match against the object's current ETag (and the `stale_puts` switch).
fn precondition(
    st: &mut State,
    headers: &BTreeMap<String, String>,
    current: &serde_json::Value,
) -> Option<Response<Full<Bytes>>> {
    let given = headers.get("if-match").cloned().unwrap_or_default();
    st.if_matches.push(given.clone());
    if st.stale_puts > 0 {
        st.stale_puts -= 1;
        return Some(error(412, "the object changed since it was read"));
    }
    if !given.is_empty() && given != etag_of(current) {
        return Some(error(412, "the object changed since it was read"));
    }
    None
}

fn apply_patch(
    config: &mut BTreeMap<String, String>,
    patch: Option<BTreeMap<String, Option<String>>>,
) {
    for (k, v) in patch.unwrap_or_default() {
        match v {
            Some(v) => config.insert(k, v),
            None => config.remove(&k),
        };
    }
}

/// The fake's projects, profiles and keys routes.
fn tenancy_route(
    st: &mut State,
    m: &Method,
    segs: &[&str],
    q: &HashMap<String, String>,
    headers: &BTreeMap<String, String>,
    body: &Bytes,
) -> Option<Response<Full<Bytes>>> {
    let project = q
        .get("project")
        .cloned()
        .unwrap_or_else(|| "default".into());
    Some(match (m, segs) {
        (&Method::GET, ["1.0", "projects"]) => {
            sync(serde_json::to_value(st.projects.values().collect::<Vec<_>>()).unwrap())
        }
        (&Method::POST, ["1.0", "projects"]) => {
            let post: ProjectsPost = serde_json::from_slice(body).unwrap();
            if st.projects.contains_key(&post.name) {
                return Some(error(
                    409,
                    &format!("project \"{}\" already exists", post.name),
                ));
            }
            st.projects.insert(
                post.name.clone(),
                Project {
                    name: post.name,
                    description: post.description,
                    config: post.config,
                    created_at: "2026-11-29T20:00:00Z".into(),
                    ..Default::default()
                },
            );
            sync(serde_json::Value::Null)
        }
        (m, ["1.0", "projects", name, rest @ ..]) => {
            let name = name.to_string();
            let Some(p) = st.projects.get(&name).cloned() else {
                return Some(error(404, &format!("project \"{name}\" not found")));
            };
            match (m, rest) {
                (&Method::GET, []) => tagged(serde_json::to_value(&p).unwrap()),
                (&Method::GET, ["state"]) => {
                    let count = st.instances.values().filter(|i| i.project == name).count();
                    let limit = |k: &str| -> i64 {
                        p.config
                            .get(k)
                            .map(|v| {
                                berth_proto::api::config::parse_project_limit(k, v).unwrap() as i64
                            })
                            .unwrap_or(-1)
                    };
                    let mut state = ProjectState::default();
                    state.resources.insert(
                        "instances".into(),
                        ProjectResource {
                            limit: limit("limits.instances"),
                            usage: count as i64,
                        },
                    );
                    state.resources.insert(
                        "memory".into(),
                        ProjectResource {
                            limit: limit("limits.memory"),
                            usage: 512 << 20,
                        },
                    );
                    sync(serde_json::to_value(state).unwrap())
                }
                (&Method::PATCH, []) => {
                    let patch: ProjectPatch = serde_json::from_slice(body).unwrap();
                    let p = st.projects.get_mut(&name).unwrap();
                    apply_patch(&mut p.config, patch.config);
                    if let Some(d) = patch.description {
                        p.description = d;
                    }
                    sync(serde_json::Value::Null)
                }
                (&Method::PUT, []) => {
                    if let Some(r) = precondition(st, headers, &serde_json::to_value(&p).unwrap()) {
                        return Some(r);
                    }
                    let put: ProjectPut = serde_json::from_slice(body).unwrap();
                    let p = st.projects.get_mut(&name).unwrap();
                    p.config = put.config;
                    p.description = put.description;
                    sync(serde_json::Value::Null)
                }
                (&Method::POST, []) => {
                    let post: RenamePost = serde_json::from_slice(body).unwrap();
                    let mut p = st.projects.remove(&name).unwrap();
                    p.name = post.name.clone();
                    st.projects.insert(post.name, p);
                    sync(serde_json::Value::Null)
                }
                (&Method::DELETE, []) => {
                    st.projects.remove(&name);
                    sync(serde_json::Value::Null)
                }
                _ => error(404, "no such project route"),
            }
        }
        (&Method::GET, ["1.0", "profiles"]) => {
            let list: Vec<_> = st
                .profiles
                .iter()
                .filter(|((p, _), _)| *p == project)
                .map(|(_, v)| v)
                .collect();
            match fake_filter(q, list) {
                Ok(list) => sync(serde_json::to_value(list).unwrap()),
                Err(e) => e,
            }
        }
        (&Method::POST, ["1.0", "profiles"]) => {
            let post: ProfilesPost = serde_json::from_slice(body).unwrap();
            let key = (project.clone(), post.name.clone());
            if st.profiles.contains_key(&key) {
                return Some(error(
                    409,
                    &format!("profile \"{}\" already exists", post.name),
                ));
            }
            st.profiles.insert(
                key,
                Profile {
                    name: post.name,
                    description: post.description,
                    config: post.config,
                    devices: post.devices,
                    project: project.clone(),
                    used_by: vec![],
                },
            );
            sync(serde_json::Value::Null)
        }
        (m, ["1.0", "profiles", name]) => {
            let key = (project.clone(), name.to_string());
            let Some(p) = st.profiles.get(&key).cloned() else {
                return Some(error(404, &format!("profile \"{name}\" not found")));
            };
            match *m {
                Method::GET => tagged(serde_json::to_value(&p).unwrap()),
                Method::PATCH => {
                    let patch: ProfilePatch = serde_json::from_slice(body).unwrap();
                    apply_patch(&mut st.profiles.get_mut(&key).unwrap().config, patch.config);
                    sync(serde_json::Value::Null)
                }
                Method::PUT => {
                    if let Some(r) = precondition(st, headers, &serde_json::to_value(&p).unwrap()) {
                        return Some(r);
                    }
                    let put: ProfilePut = serde_json::from_slice(body).unwrap();
                    let p = st.profiles.get_mut(&key).unwrap();
                    p.config = put.config;
                    p.description = put.description;
                    sync(serde_json::Value::Null)
                }
                Method::POST => {
                    let post: RenamePost = serde_json::from_slice(body).unwrap();
                    let mut p = st.profiles.remove(&key).unwrap();
                    p.name = post.name.clone();
                    st.profiles.insert((project, post.name), p);
                    sync(serde_json::Value::Null)
                }
                Method::DELETE => {
                    st.profiles.remove(&key);
                    sync(serde_json::Value::Null)
                }
                _ => error(405, "method not allowed"),
            }
        }
        (&Method::GET, ["1.0", "keys"]) => {
            sync(serde_json::to_value(st.keys.values().collect::<Vec<_>>()).unwrap())
        }
        (&Method::POST, ["1.0", "keys"]) => {
            let post: KeysPost = serde_json::from_slice(body).unwrap();
            st.next += 1;
            let key = ApiKey {
                name: post.name.clone(),
                id: format!("id{}", st.next),
                role: post.role,
                project: if post.project.is_empty() {
                    "default".into()
                } else {
                    post.project
                },
                created_at: "2026-11-29T21:00:00Z".into(),
                expires_at: if post.expires_in.is_empty() {
                    String::new()
                } else {
                    "2026-12-29T21:00:00Z".into()
                },
                expired: false,
            };
            st.keys.insert(post.name, key.clone());
            let secret = format!("berth_{}_{}", key.id, "5".repeat(64));
            sync(serde_json::to_value(KeyCreated { key, secret }).unwrap())
        }
        (m, ["1.0", "keys", name, rest @ ..]) => {
            let Some(k) = st.keys.get(*name).cloned() else {
                return Some(error(404, &format!("key \"{name}\" not found")));
            };
            match (m, rest) {
                (&Method::GET, []) => tagged(serde_json::to_value(&k).unwrap()),
                (&Method::DELETE, []) => {
                    st.keys.remove(*name);
                    sync(serde_json::Value::Null)
                }
                (&Method::POST, ["rotate"]) => {
                    let _: KeyRotatePost = serde_json::from_slice(body).unwrap();
                    st.next += 1;
                    let secret = format!("berth_{}_{}", k.id, "7".repeat(64));
                    sync(serde_json::to_value(KeyCreated { key: k, secret }).unwrap())
                }
                _ => error(404, "no such key route"),
            }
        }
        _ => return None,
    })
}

/// Events for `/1.0/events`: one lifecycle and one operation event, then a close.
async fn run_events(ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, project: String) {
    let (mut tx, _rx) = ws.split();
    let lifecycle = Event {
        kind: "lifecycle".into(),
        timestamp: "2026-11-29T22:00:00Z".into(),
        location: "c1".into(),
        project: project.clone(),
        metadata: serde_json::to_value(LifecycleEvent {
            action: "instance-created".into(),
            source: "/1.0/instances/w1".into(),
            context: BTreeMap::new(),
            requestor: Some(Requestor {
                key: "ci".into(),
                key_id: "id1".into(),
                role: "member".into(),
            }),
        })
        .unwrap(),
    };
    let operation = Event {
        kind: "operation".into(),
        timestamp: "2026-11-29T22:00:01Z".into(),
        location: "c1".into(),
        project,
        metadata: serde_json::to_value(Operation {
            id: "op9".into(),
            description: "Creating instance".into(),
            status: OperationStatus::Success,
            ..Default::default()
        })
        .unwrap(),
    };
    for e in [lifecycle, operation] {
        tx.send(Message::text(serde_json::to_string(&e).unwrap()))
            .await
            .unwrap();
    }
    let _ = tx
        .send(Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away,
                reason: "controller shutting down".into(),
            },
        )))
        .await;
}

/// Records a finished (or failed) operation and answers 202 with it still "Running", so the
/// client has to wait for it.
fn start_op(
    st: &mut State,
    metadata: serde_json::Value,
    err: Option<&str>,
) -> Response<Full<Bytes>> {
    st.next += 1;
    let id = format!("op{}", st.next);
    let (status, e) = match err {
        Some(e) => (OperationStatus::Failure, e.to_string()),
        None => (OperationStatus::Success, String::new()),
    };
    let done = Operation {
        id: id.clone(),
        class: "task".into(),
        status,
        status_code: status.code(),
        metadata: metadata.clone(),
        err: e,
        ..Default::default()
    };
    st.ops.insert(id.clone(), done);
    let running = Operation {
        id,
        class: "task".into(),
        status: OperationStatus::Running,
        status_code: 103,
        metadata,
        ..Default::default()
    };
    json_response(StatusCode::ACCEPTED, &Envelope::asynchronous(&running))
}

/// Like [`start_op`], with running states carrying `steps` as metadata first (what a copy or
/// move reports while it runs).
fn start_transfer_op(
    st: &mut State,
    steps: &[serde_json::Value],
    metadata: serde_json::Value,
    err: Option<&str>,
) -> Response<Full<Bytes>> {
    let resp = start_op(st, metadata, err);
    let id = format!("op{}", st.next);
    let running = steps
        .iter()
        .map(|m| Operation {
            id: id.clone(),
            class: "task".into(),
            status: OperationStatus::Running,
            status_code: 103,
            metadata: m.clone(),
            ..Default::default()
        })
        .collect();
    st.progress.insert(id, running);
    resp
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in req.uri().query().unwrap_or("").split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            out.insert(k.to_string(), decode(v));
        }
    }
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A tiny stand-in for the server's `?filter=`: only `FIELD eq VALUE` on top-level string
/// fields; anything else is a 400 with a sentence, as the real parser gives.
// The error is the fake's answer itself, built once per refused request: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn fake_filter<T: serde::Serialize>(
    q: &HashMap<String, String>,
    items: Vec<T>,
) -> Result<Vec<T>, Response<Full<Bytes>>> {
    let Some(f) = q.get("filter") else {
        return Ok(items);
    };
    let words: Vec<&str> = f.split_whitespace().collect();
    let [field, "eq", value] = words[..] else {
        return Err(error(
            400,
            &format!("expected eq or ne at position 6 of the filter {f:?}"),
        ));
    };
    Ok(items
        .into_iter()
        .filter(|i| serde_json::to_value(i).unwrap()[field].as_str() == Some(value))
        .collect())
}

fn header(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn instance(name: &str, running: bool, config: BTreeMap<String, String>) -> Instance {
    let status = if running { "Running" } else { "Stopped" };
    Instance {
        name: name.into(),
        status: status.into(),
        status_code: if running { 103 } else { 102 },
        location: "node1".into(),
        kind: "container".into(),
        architecture: "x86_64".into(),
        config,
        profiles: vec!["default".into()],
        image: "abcdef0123456789".into(),
        created_at: "2026-11-29T19:00:00Z".into(),
        ..Default::default()
    }
}

fn with_state(mut i: Instance) -> Instance {
    i.state = Some(InstanceState {
        status: i.status.clone(),
        status_code: i.status_code,
        pid: if i.status_code == 103 { 4242 } else { 0 },
        ..Default::default()
    });
    i
}

async fn handle(
    shared: Shared,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let q = query(&req);
    shared
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {}", req.uri()));
    if header(&req, "authorization") != format!("Bearer {KEY}") {
        return Ok(error(403, "not authorized"));
    }
    {
        let mut st = shared.lock().unwrap();
        if st.unavailable > 0 {
            st.unavailable -= 1;
            let mut resp = error(
                503,
                "no raft leader: this controller cannot reach a majority of the controllers",
            );
            if st.retry_after {
                resp.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("1"));
            }
            return Ok(resp);
        }
    }
    // The event stream.
    if path == "/1.0/events" {
        let project = q
            .get("project")
            .cloned()
            .unwrap_or_else(|| "default".into());
        let key = header(&req, "sec-websocket-key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = upgrade.await.unwrap();
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            run_events(ws, project).await;
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    // Websocket upgrade for exec.
    if path.ends_with("/websocket") {
        let id = path.split('/').nth(3).unwrap_or("").to_string();
        let exec = shared.lock().unwrap().execs.get(&q["secret"]).cloned();
        let Some(exec) = exec else {
            return Ok(error(403, "bad secret"));
        };
        let key = header(&req, "sec-websocket-key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = upgrade.await.unwrap();
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            run_exec(ws, exec).await;
            let _ = id;
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let uri = req.uri().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut st = shared.lock().unwrap();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
        st.bodies.push((format!("{method} {uri}"), v));
    }
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let Some(resp) = tenancy_route(&mut st, &method, segs.as_slice(), &q, &headers, &body) {
        return Ok(resp);
    }
    let resp = match (&method, segs.as_slice()) {
        (&Method::GET, ["1.0"]) => sync(
            serde_json::to_value(Server {
                environment: ServerEnvironment {
                    server_version: "9.9.9".into(),
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap(),
        ),
        (&Method::GET, ["1.0", "instances"]) => {
            let list: Vec<Instance> = st.instances.values().cloned().map(with_state).collect();
            match fake_filter(&q, list) {
                Ok(list) => sync(serde_json::to_value(list).unwrap()),
                Err(e) => e,
            }
        }
        (&Method::POST, ["1.0", "instances"]) => {
            let raw: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let post: InstancesPost = serde_json::from_value(raw.clone()).unwrap();
            if post.source.kind == "copy" {
                let (src, snap) = match post.source.source.split_once('/') {
                    Some((i, s)) => (i.to_string(), Some(s.to_string())),
                    None => (post.source.source.clone(), None),
                };
                let Some(source) = st.instances.get(&src).cloned() else {
                    return Ok(error(404, &format!("instance \"{src}\" not found")));
                };
                if let Some(snap) = &snap
                    && !source.snapshots.iter().any(|s| &s.name == snap)
                {
                    return Ok(error(404, &format!("snapshot \"{src}/{snap}\" not found")));
                }
                if st.instances.contains_key(&post.name) && !post.source.refresh {
                    return Ok(error(
                        409,
                        &format!("instance \"{}\" already exists", post.name),
                    ));
                }
                let mut copy = source.clone();
                copy.name = post.name.clone();
                copy.config.extend(post.config.clone());
                if raw.get("profiles").is_some() {
                    copy.profiles = post.profiles.clone();
                }
                if post.source.instance_only || snap.is_some() {
                    copy.snapshots.clear();
                }
                if let Some(node) = q.get("target") {
                    copy.location = node.clone();
                }
                let running = post.start;
                copy.status = if running { "Running" } else { "Stopped" }.into();
                copy.status_code = if running { 103 } else { 102 };
                st.instances.insert(post.name.clone(), copy);
                let step = |stage: &str, bytes: u64| serde_json::json!({"stage": stage, "bytes": bytes, "rate": 50u64 << 20});
                return Ok(start_transfer_op(
                    &mut st,
                    &[step("sending", 10 << 20), step("sending", 60 << 20)],
                    serde_json::json!({"stage": "done", "bytes": 64u64 << 20, "rate": 0,
                        "passes": [{"kind": "full", "bytes": 64u64 << 20, "millis": 1300}]}),
                    None,
                ));
            }
            if st.instances.contains_key(&post.name) {
                error(409, &format!("instance \"{}\" already exists", post.name))
            } else if post.source.alias.is_empty() && post.source.fingerprint != "abcdef" {
                error(404, "image not found")
            } else {
                let mut i = instance(&post.name, post.start, post.config.clone());
                i.project = q
                    .get("project")
                    .cloned()
                    .unwrap_or_else(|| "default".into());
                // As the server: the default profile only when the body names none.
                if raw.get("profiles").is_some() {
                    i.profiles = post.profiles.clone();
                }
                st.instances.insert(post.name.clone(), i);
                start_op(&mut st, serde_json::Value::Null, None)
            }
        }
        (m, ["1.0", "instances", name, rest @ ..]) => {
            let name = name.to_string();
            if !st.instances.contains_key(&name) {
                error(404, &format!("instance \"{name}\" not found"))
            } else {
                instance_route(&mut st, m, &name, rest, &q, &headers, &body)
            }
        }
        (&Method::GET, ["1.0", "operations", id, "wait"])
            if st.progress.get(*id).is_some_and(|p| !p.is_empty()) =>
        {
            let op = st.progress.get_mut(*id).unwrap().pop_front().unwrap();
            sync(serde_json::to_value(op).unwrap())
        }
        (&Method::GET, ["1.0", "operations", id, "wait"]) => match st.ops.get(*id) {
            Some(op) => sync(serde_json::to_value(op).unwrap()),
            None => error(404, "operation not found"),
        },
        (&Method::GET, ["1.0", "operations"]) => {
            let ops: Vec<Operation> = st.ops.values().cloned().collect();
            sync(serde_json::json!({ "success": ops }))
        }
        (&Method::GET, ["1.0", "images", "aliases"]) => {
            sync(serde_json::Value::Array(st.aliases.clone()))
        }
        (&Method::POST, ["1.0", "images", "aliases"]) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            st.aliases.push(v);
            sync(serde_json::Value::Null)
        }
        (&Method::DELETE, ["1.0", "images", "aliases", alias @ ..]) => {
            let alias = alias.join("/");
            let before = st.aliases.len();
            st.aliases.retain(|a| a["name"] != alias.as_str());
            if st.aliases.len() == before {
                error(404, &format!("alias \"{alias}\" not found"))
            } else {
                sync(serde_json::Value::Null)
            }
        }
        (&Method::GET, ["1.0", "images"]) => sync(serde_json::to_value(&st.images).unwrap()),
        (&Method::GET, ["1.0", "images", fp]) => {
            match st.images.iter().find(|i| i.fingerprint.starts_with(*fp)) {
                Some(i) => tagged(serde_json::to_value(i).unwrap()),
                None => error(404, "image not found"),
            }
        }
        (&Method::PUT, ["1.0", "images", fp]) => {
            let Some(n) = st.images.iter().position(|i| i.fingerprint == *fp) else {
                return Ok(error(404, "image not found"));
            };
            let current = serde_json::to_value(&st.images[n]).unwrap();
            if let Some(r) = precondition(&mut st, &headers, &current) {
                return Ok(r);
            }
            let put: berth_proto::api::ImagePut = serde_json::from_slice(&body).unwrap();
            st.images[n].properties = put.properties;
            st.images[n].public = put.public;
            sync(serde_json::Value::Null)
        }
        (&Method::GET, ["1.0", "images", fp, "export"]) => {
            if !st.images.iter().any(|i| i.fingerprint == *fp) {
                return Ok(error(404, "image not found"));
            }
            let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
            return Ok(Response::builder()
                .header("content-type", "application/octet-stream")
                .header(
                    "content-disposition",
                    format!("attachment; filename={fp}.tar.gz"),
                )
                .body(Full::new(Bytes::from(data)))
                .unwrap());
        }
        (&Method::DELETE, ["1.0", "images", fp]) => {
            let fp = fp.to_string();
            st.images.retain(|i| i.fingerprint != fp);
            start_op(&mut st, serde_json::Value::Null, None)
        }
        (&Method::POST, ["1.0", "images"]) => {
            let fp = format!("{:064x}", st.next + 0xfeed);
            let aliases: Vec<String> = if headers.get("content-type").map(String::as_str)
                == Some("application/octet-stream")
            {
                st.imports.push((headers.clone(), body.len()));
                headers
                    .get("x-berth-aliases")
                    .map(|a| a.split(',').map(str::to_string).collect())
                    .unwrap_or_default()
            } else {
                let post: berth_proto::api::ImagesPost = serde_json::from_slice(&body).unwrap();
                if post.source.kind == "instance" || post.source.kind == "snapshot" {
                    let inst = post.source.name.split('/').next().unwrap_or("");
                    match st.instances.get(inst) {
                        None => return Ok(error(404, &format!("instance \"{inst}\" not found"))),
                        Some(i) if post.source.kind == "instance" && i.status == "Running" => {
                            return Ok(error(
                                409,
                                &format!(
                                    "instance \"{inst}\" is running: stop it or publish a snapshot"
                                ),
                            ));
                        }
                        _ => {}
                    }
                }
                if post.source.recipe == "broken" {
                    return Ok(start_op(
                        &mut st,
                        serde_json::Value::Null,
                        Some("debootstrap failed: no network"),
                    ));
                }
                post.aliases.into_iter().map(|a| a.name).collect()
            };
            for a in &aliases {
                st.aliases
                    .push(serde_json::json!({"name": a, "target": fp, "description": ""}));
            }
            st.images.push(Image {
                fingerprint: fp.clone(),
                aliases: aliases
                    .iter()
                    .map(|a| ImageAlias {
                        name: a.clone(),
                        description: String::new(),
                    })
                    .collect(),
                architecture: "x86_64".into(),
                size: body.len() as u64,
                properties: serde_json::from_slice::<berth_proto::api::ImagesPost>(&body)
                    .map(|p| p.properties)
                    .unwrap_or_default(),
                public: serde_json::from_slice::<berth_proto::api::ImagesPost>(&body)
                    .is_ok_and(|p| p.public),
                ..Default::default()
            });
            start_op(&mut st, serde_json::json!({ "fingerprint": fp }), None)
        }
        (&Method::GET, ["1.0", "cluster", "members"]) => sync(serde_json::json!([
            {"server_name": "node1", "url": "https://10.0.0.1:8444", "roles": ["agent"],
             "status": "Online", "message": ""}
        ])),
        (&Method::POST, ["1.0", "cluster", "join-tokens"]) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if v["name"] == "withcmd" {
                sync(serde_json::json!({"token": "dG9rZW4=", "name": v["name"],
                    "command": "berth-agent join --token dG9rZW4="}))
            } else {
                sync(serde_json::json!({"token": "dG9rZW4=", "name": v["name"]}))
            }
        }
        (&Method::POST, ["1.0", "cluster", "controller-tokens"]) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            sync(serde_json::json!({"token": "Y3Rvaw==", "name": v["name"], "command": ""}))
        }
        (&Method::GET, ["1.0", "cluster"]) => {
            let mut controllers = vec![serde_json::json!({"name": "c1", "id": 1,
                "peer_address": "127.0.0.1:1", "api_address": st.self_addr,
                "role": "leader", "state": "online"})];
            for (i, a) in st.other_controllers.iter().enumerate() {
                controllers.push(serde_json::json!({"name": format!("c{}", i + 2),
                    "id": i + 2, "peer_address": "127.0.0.1:1", "api_address": a,
                    "role": "voter", "state": "online"}));
            }
            sync(serde_json::json!({
                "name": "berth", "answered_by": "c1", "controllers": controllers,
                "config": st.cluster_config,
                "nodes": [{"name": "node1", "address": "10.0.0.1:8444", "status": "Online",
                    "evacuated": false, "architecture": "x86_64",
                    "labels": {"rack": "r1"}, "config": st.node_config,
                    "total": {"cpus": 4, "memory_bytes": 8589934592u64, "storage_bytes": 0},
                    "allocated": {"cpus": 1, "memory_bytes": 0, "storage_bytes": 0},
                    "storage_free_bytes": 0, "instances": 1, "joined_at": ""}]
            }))
        }
        (&Method::PATCH, ["1.0", "cluster"]) => {
            let v: berth_proto::api::ClusterMemberPatch = serde_json::from_slice(&body).unwrap();
            for (k, val) in v.config {
                match val {
                    Some(val) => st.cluster_config.insert(k, val),
                    None => st.cluster_config.remove(&k),
                };
            }
            sync(serde_json::Value::Null)
        }
        (&Method::POST, ["1.0", "cluster", "members", node, "state"]) => {
            let post: berth_proto::api::ClusterMemberStatePost =
                serde_json::from_slice(&body).unwrap();
            if *node != "node1" && *node != "node2" {
                return Ok(error(404, &format!("node \"{node}\" not found")));
            }
            let (result, err) = match (post.action.as_str(), *node) {
                ("evacuate", "node2") => ("failed", "no other node can take it"),
                ("evacuate", _) if post.mode == "stop" => ("stopped", ""),
                ("evacuate", _) => ("moved", ""),
                _ => ("returned", ""),
            };
            let meta = serde_json::json!({"node": node, "action": post.action,
            "mode": post.mode, "instances": [
                {"instance": "web1", "project": "default", "result": result,
                 "node": if result == "moved" { "node3" } else { *node }, "error": err},
                {"instance": "db", "project": "team-a", "result": "left",
                 "node": node, "error": ""}
            ]});
            if result == "failed" {
                // As the server: the metadata is kept, the operation fails with a count.
                start_op(
                    &mut st,
                    meta,
                    Some("1 of 2 instances could not be evacuated; run it again to retry them"),
                )
            } else {
                start_op(&mut st, meta, None)
            }
        }
        (&Method::GET, ["1.0", "cluster", "members", "node1"]) => sync(serde_json::json!({
            "name": "node1", "status": "Online", "config": st.node_config
        })),
        (&Method::PATCH, ["1.0", "cluster", "members", "node1"]) => {
            let v: berth_proto::api::ClusterMemberPatch = serde_json::from_slice(&body).unwrap();
            for (k, val) in v.config {
                match val {
                    Some(val) => st.node_config.insert(k, val),
                    None => st.node_config.remove(&k),
                };
            }
            sync(serde_json::Value::Null)
        }
        (&Method::DELETE, ["1.0", "cluster", "members", "node1"]) => {
            start_op(&mut st, serde_json::Value::Null, None)
        }
        (_, ["1.0", "cluster", "members", name]) => {
            error(404, &format!("cluster member \"{name}\" not found"))
        }
        _ => error(404, &format!("no route for {method} {path}")),
    };
    Ok(resp)
}

fn parent(path: &str) -> String {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/".into(),
        Some((p, _)) => p.into(),
    }
}

fn instance_route(
    st: &mut State,
    m: &Method,
    name: &str,
    rest: &[&str],
    q: &HashMap<String, String>,
    headers: &BTreeMap<String, String>,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    let running = st.instances[name].status == "Running";
    match (m, rest) {
        (&Method::GET, []) => tagged(serde_json::to_value(&st.instances[name]).unwrap()),
        (&Method::GET, ["state"]) => {
            sync(serde_json::to_value(with_state(st.instances[name].clone()).state).unwrap())
        }
        (&Method::PUT, ["state"]) => {
            let put: berth_proto::api::InstanceStatePut = serde_json::from_slice(body).unwrap();
            let i = st.instances.get_mut(name).unwrap();
            let run = put.action != "stop";
            i.status = if run { "Running" } else { "Stopped" }.into();
            i.status_code = if run { 103 } else { 102 };
            start_op(st, serde_json::Value::Null, None)
        }
        (&Method::DELETE, []) if running => error(
            400,
            &format!("instance \"{name}\" is running: stop it first or use --force"),
        ),
        (&Method::DELETE, []) => {
            st.instances.remove(name);
            start_op(st, serde_json::Value::Null, None)
        }
        (&Method::POST, []) if q.contains_key("target") => {
            let post: berth_proto::api::InstancePost = serde_json::from_slice(body).unwrap();
            if post.name != name {
                return error(
                    400,
                    "a move cannot rename the instance at the same time; move it, then rename it",
                );
            }
            let node = q["target"].clone();
            if node == "node9" {
                return error(404, "node \"node9\" not found");
            }
            st.instances.get_mut(name).unwrap().location = node;
            let step = |stage: &str, bytes: u64| serde_json::json!({"stage": stage, "bytes": bytes, "rate": 80u64 << 20});
            start_transfer_op(
                st,
                &[
                    step("pre-copy 1", 100 << 20),
                    step("pre-copy 2", 400 << 20),
                    step("final pass", 402 << 20),
                ],
                serde_json::json!({"stage": "done", "bytes": 402u64 << 20, "rate": 0,
                    "passes": [
                        {"kind": "pre-copy", "bytes": 400u64 << 20, "millis": 5200},
                        {"kind": "final", "bytes": 2u64 << 20, "millis": 120}],
                    "downtime_ms": 312}),
                None,
            )
        }
        (&Method::POST, ["snapshots"]) => {
            let post: berth_proto::api::InstanceSnapshotsPost =
                serde_json::from_slice(body).unwrap();
            let i = st.instances.get_mut(name).unwrap();
            let snap = if post.name.is_empty() {
                (0..)
                    .map(|n| format!("snap{n}"))
                    .find(|n| !i.snapshots.iter().any(|s| &s.name == n))
                    .unwrap()
            } else {
                post.name.clone()
            };
            if i.snapshots.iter().any(|s| s.name == snap) {
                return error(409, &format!("snapshot \"{name}/{snap}\" already exists"));
            }
            i.snapshots.push(berth_proto::api::InstanceSnapshot {
                name: snap,
                created_at: "2026-11-30T02:05:09Z".into(),
                expires_at: post.expires_at,
                ..Default::default()
            });
            start_op(st, serde_json::Value::Null, None)
        }
        (&Method::GET, ["snapshots"]) => {
            let snaps: Vec<_> = st.instances[name]
                .snapshots
                .iter()
                .cloned()
                .map(|mut s| {
                    s.size = 3 << 20;
                    s
                })
                .collect();
            sync(serde_json::to_value(snaps).unwrap())
        }
        (m, ["snapshots", snap]) => {
            let snap = decode(snap);
            let i = st.instances.get_mut(name).unwrap();
            let Some(n) = i.snapshots.iter().position(|s| s.name == snap) else {
                return error(404, &format!("snapshot \"{name}/{snap}\" not found"));
            };
            match *m {
                Method::DELETE => {
                    i.snapshots.remove(n);
                }
                Method::POST => {
                    let post: berth_proto::api::InstanceSnapshotPost =
                        serde_json::from_slice(body).unwrap();
                    i.snapshots[n].name = post.name;
                }
                _ => return error(405, "method not allowed"),
            }
            start_op(st, serde_json::Value::Null, None)
        }
        (&Method::POST, []) => {
            let post: berth_proto::api::InstancePost = serde_json::from_slice(body).unwrap();
            let mut i = st.instances.remove(name).unwrap();
            i.name = post.name.clone();
            st.instances.insert(post.name, i);
            start_op(st, serde_json::Value::Null, None)
        }
        (&Method::PATCH, []) => {
            let patch: berth_proto::api::InstancePatch = serde_json::from_slice(body).unwrap();
            let i = st.instances.get_mut(name).unwrap();
            for (k, v) in patch.config.unwrap_or_default() {
                match v {
                    Some(v) => i.config.insert(k, v),
                    None => i.config.remove(&k),
                };
            }
            start_op(st, serde_json::Value::Null, None)
        }
        (&Method::PUT, []) => {
            let current = serde_json::to_value(&st.instances[name]).unwrap();
            if let Some(r) = precondition(st, headers, &current) {
                return r;
            }
            let put: berth_proto::api::InstancePut = serde_json::from_slice(body).unwrap();
            if !put.restore.is_empty() {
                if !st.instances[name]
                    .snapshots
                    .iter()
                    .any(|s| s.name == put.restore)
                {
                    return error(
                        404,
                        &format!("snapshot \"{name}/{}\" not found", put.restore),
                    );
                }
                return start_op(st, serde_json::Value::Null, None);
            }
            let i = st.instances.get_mut(name).unwrap();
            i.config = put.config;
            i.description = put.description;
            i.profiles = put.profiles;
            start_op(st, serde_json::Value::Null, None)
        }
        (&Method::GET, ["console"]) => Response::new(Full::new(Bytes::from_static(
            b"[  OK  ] Reached target Multi-User System.\n",
        ))),
        (&Method::POST, ["exec"]) => {
            let post: InstanceExecPost = serde_json::from_slice(body).unwrap();
            st.next += 1;
            let secret = format!("secret-{}", st.next);
            st.execs.insert(secret.clone(), post);
            st.next += 1;
            let op = Operation {
                id: format!("op{}", st.next),
                class: "websocket".into(),
                status: OperationStatus::Running,
                status_code: 103,
                metadata: serde_json::json!({"fds": {"0": secret, "control": "unused"}}),
                ..Default::default()
            };
            json_response(StatusCode::ACCEPTED, &Envelope::asynchronous(&op))
        }
        (&Method::GET, ["files"]) => {
            let path = &q["path"];
            let Some(f) = st.files.get(path.as_str()).cloned() else {
                return error(404, &format!("{path} not found"));
            };
            let builder = Response::builder()
                .header(file_headers::TYPE, f.kind.as_str())
                .header(file_headers::UID, f.uid)
                .header(file_headers::GID, f.gid)
                .header(file_headers::MODE, format!("{:04o}", f.mode));
            if f.kind == "directory" {
                let prefix = if path == "/" {
                    "/".to_string()
                } else {
                    format!("{path}/")
                };
                let names: Vec<String> = st
                    .files
                    .keys()
                    .filter(|k| {
                        k.starts_with(&prefix) && *k != path && !k[prefix.len()..].contains('/')
                    })
                    .map(|k| k[prefix.len()..].to_string())
                    .collect();
                let env = Envelope::sync(serde_json::to_value(names).unwrap());
                builder
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(serde_json::to_vec(&env).unwrap())))
                    .unwrap()
            } else {
                builder.body(Full::new(Bytes::from(f.data))).unwrap()
            }
        }
        (&Method::POST, ["files"]) => {
            let path = q["path"].clone();
            let par = parent(&path);
            if st.files.get(&par).map(|f| f.kind.as_str()) != Some("directory") {
                return error(404, &format!("parent directory of {path} does not exist"));
            }
            let get = |k: &str| headers.get(&k.to_lowercase()).cloned().unwrap_or_default();
            let entry = FileEntry {
                kind: get(file_headers::TYPE),
                mode: u32::from_str_radix(&get(file_headers::MODE), 8).unwrap_or(0o644),
                uid: get(file_headers::UID).parse().unwrap_or(0),
                gid: get(file_headers::GID).parse().unwrap_or(0),
                data: body.to_vec(),
            };
            st.files.insert(path, entry);
            sync(serde_json::Value::Null)
        }
        (&Method::DELETE, ["files"]) => {
            // Like the agent: a directory must be empty.
            let prefix = format!("{}/", q["path"]);
            if st.files.keys().any(|k| k.starts_with(&prefix)) {
                return error(400, &format!("{}: directory not empty", q["path"]));
            }
            match st.files.remove(&q["path"]) {
                Some(_) => sync(serde_json::Value::Null),
                None => error(404, "not found"),
            }
        }
        _ => error(404, "no such instance route"),
    }
}

async fn run_exec(ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, exec: InstanceExecPost) {
    let (mut tx, mut rx) = ws.split();
    let frame = |stream: u8, data: &[u8]| {
        let mut v = vec![stream];
        v.extend_from_slice(data);
        Message::binary(v)
    };
    let exit =
        |code: i32| Message::text(serde_json::to_string(&ExecControl::Exit { code }).unwrap());
    match exec.command[0].as_str() {
        "cat" => {
            while let Some(Ok(msg)) = rx.next().await {
                match msg {
                    Message::Binary(b) if b.first() == Some(&0) => {
                        tx.send(frame(1, &b[1..])).await.unwrap();
                    }
                    Message::Text(t)
                        if serde_json::from_str::<ExecControl>(t.as_str()).unwrap()
                            == ExecControl::StdinEof =>
                    {
                        break;
                    }
                    _ => {}
                }
            }
            tx.send(exit(0)).await.unwrap();
        }
        "fail" => {
            tx.send(frame(2, b"oops\n")).await.unwrap();
            tx.send(exit(3)).await.unwrap();
        }
        "env" => {
            let mut out = String::new();
            for (k, v) in &exec.environment {
                out.push_str(&format!("{k}={v}\n"));
            }
            out.push_str(&format!(
                "interactive={} cwd={} user={} args={}\n",
                exec.interactive,
                exec.cwd,
                exec.user,
                exec.command[1..].join(" ")
            ));
            tx.send(frame(1, out.as_bytes())).await.unwrap();
            tx.send(exit(0)).await.unwrap();
        }
        "wait-signal" => {
            tx.send(frame(1, b"ready\n")).await.unwrap();
            while let Some(Ok(msg)) = rx.next().await {
                if let Message::Text(t) = msg
                    && let Ok(ExecControl::Signal { signal }) =
                        serde_json::from_str::<ExecControl>(t.as_str())
                {
                    tx.send(exit(128 + signal)).await.unwrap();
                    break;
                }
            }
        }
        _ => {
            tx.send(exit(127)).await.unwrap();
        }
    }
    let _ = tx.close().await;
}

struct Fake {
    addr: SocketAddr,
    state: Shared,
    /// Its TLS setup, to serve a second "controller" with the same CA and certificate.
    acceptor: tokio_rustls::TlsAcceptor,
    dir: tempfile::TempDir,
    ca: PathBuf,
    key: PathBuf,
}

/// Starts the fake on 127.0.0.1 with a controller certificate signed by a fresh CA, with the
/// SANs `sans` besides the controller name.
async fn start(sans: &[&str]) -> Fake {
    start_as(sans, true).await
}

/// Like [`start`]; with `controller` false the certificate lacks the controller name (an
/// agent's certificate from the same CA).
async fn start_as(sans: &[&str], controller: bool) -> Fake {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    if controller {
        names.push(berth_proto::CONTROLLER_TLS_NAME.to_string());
    }
    let params = rcgen::CertificateParams::new(names).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let key_path = dir.path().join("key");
    std::fs::write(&key_path, format!("{KEY}\n")).unwrap();

    let server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let (addr, state) = serve(acceptor.clone()).await;
    Fake {
        addr,
        state,
        acceptor,
        ca: ca_path,
        key: key_path,
        dir,
    }
}

/// Serves the fake API with `acceptor`'s certificate on a new port, with a state of its own.
async fn serve(acceptor: tokio_rustls::TlsAcceptor) -> (SocketAddr, Shared) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state: Shared = Arc::new(Mutex::new(State {
        self_addr: addr.to_string(),
        ..State::default()
    }));
    state.lock().unwrap().projects.insert(
        "default".into(),
        Project {
            name: "default".into(),
            description: "Default Berth project".into(),
            ..Default::default()
        },
    );
    state.lock().unwrap().files.insert(
        "/".into(),
        FileEntry {
            kind: "directory".into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
            data: vec![],
        },
    );
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let st = st.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, state)
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Fake {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    fn command(&self, args: &[&str], use_env_url: bool) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"));
        c.args(args)
            .env("BERTH_CONF", self.conf_dir())
            .env_remove("BERTH_REMOTE")
            .env_remove("BERTH_KEY")
            .env_remove("BERTH_URL")
            .env_remove("BERTH_KEY_FILE")
            .env_remove("BERTH_CA")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if use_env_url {
            c.env("BERTH_URL", self.url())
                .env("BERTH_KEY_FILE", &self.key)
                .env("BERTH_CA", &self.ca);
        }
        c
    }

    async fn run_with(&self, args: &[&str], stdin: &[u8], use_env_url: bool) -> Out {
        let mut child = self.command(args, use_env_url).spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).await.unwrap();
        drop(input);
        let out =
            tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
                .await
                .expect("berth did not finish in 60s")
                .unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Out {
        self.run_with(args, b"", true).await
    }

    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert_eq!(o.code, 0, "berth {args:?} failed: {}{}", o.stdout, o.stderr);
        o.stdout
    }

    fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_instances_lifecycle() {
    let f = start(&["127.0.0.1", "localhost"]).await;
    assert!(f.ok(&["version"]).await.contains("Server version: 9.9.9"));

    // Empty list: just the header.
    assert_eq!(
        f.ok(&["list"]).await,
        "+------+-------+------+------+-----------+\n| NAME | STATE | IPV4 | TYPE | SNAPSHOTS |\n+------+-------+------+------+-----------+\n"
    );
    assert_eq!(f.ok(&["list", "--format", "json"]).await, "[]\n");

    f.state
        .lock()
        .unwrap()
        .aliases
        .push(serde_json::json!({"name": "busybox", "target": "abcdef"}));
    let out = f
        .ok(&["launch", "busybox", "web1", "-c", "limits.cpu=1"])
        .await;
    assert_eq!(out, "Creating web1\nStarting web1\n");
    assert_eq!(f.ok(&["init", "abcdef", "db"]).await, "Creating db\n");
    let o = f.run(&["init", "nosuchimage", "db2"]).await;
    assert_eq!((o.code, o.stderr.as_str()), (1, "Error: image not found\n"));

    assert_eq!(
        f.ok(&["list", "-c", "ns", "--format", "csv"]).await,
        "db,STOPPED\nweb1,RUNNING\n"
    );
    let list: Vec<Instance> =
        serde_json::from_str(&f.ok(&["list", "--format", "json"]).await).unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[1].state.is_some());
    assert_eq!(
        f.ok(&["list", "we", "-c", "n", "-f", "csv"]).await,
        "web1\n"
    );
    // --filter goes to the server, URL-encoded; its 400 sentence is shown as it is.
    assert_eq!(
        f.ok(&[
            "list",
            "--filter",
            "status eq Stopped",
            "-c",
            "n",
            "-f",
            "csv"
        ])
        .await,
        "db\n"
    );
    assert!(
        f.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .any(|r| r
                == "GET /1.0/instances?recursion=2&filter=status%20eq%20Stopped&fields=state.network,state.status")
    );
    let o = f.run(&["list", "--filter", "name is web1"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (
            1,
            "Error: expected eq or ne at position 6 of the filter \"name is web1\"\n"
        )
    );

    let info = f.ok(&["info", "web1", "--show-log"]).await;
    assert!(info.starts_with("Name: web1\nStatus: Running\n"), "{info}");
    assert!(info.contains("PID: 4242"), "{info}");
    assert!(info.contains("Log:\n\n[  OK  ] Reached target"), "{info}");

    // Config.
    f.ok(&["config", "set", "web1", "limits.memory", "256MiB"])
        .await;
    f.ok(&["config", "set", "web1", "user.a=1", "user.b=2"])
        .await;
    assert_eq!(f.ok(&["config", "get", "web1", "user.b"]).await, "2\n");
    f.ok(&["config", "unset", "web1", "user.b"]).await;
    let show = f.ok(&["config", "show", "web1"]).await;
    assert!(show.contains("limits.memory: 256MiB"), "{show}");
    assert!(!show.contains("user.b"), "{show}");
    let edited = show.replace("user.a: '1'", "user.a: edited");
    f.run_with(&["config", "edit", "web1"], edited.as_bytes(), true)
        .await;
    assert_eq!(f.ok(&["config", "get", "web1", "user.a"]).await, "edited\n");
    let o = f
        .run_with(&["config", "edit", "web1"], b"# emptied\n", true)
        .await;
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        "Error: the edited text is empty; nothing was changed\n"
    );
    assert_eq!(f.ok(&["config", "get", "web1", "user.a"]).await, "edited\n");

    // Bad local input never reaches the server.
    let before = f.request_count();
    let o = f
        .run(&["config", "set", "web1", "limits.memory", "lots"])
        .await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.starts_with("Error: "), "{}", o.stderr);
    let o = f.run(&["launch", "busybox", "x", "-c", "nokey"]).await;
    assert_eq!(o.stderr, "Error: bad key=value pair \"nokey\"\n");
    let o = f.run(&["list", "--format", "xml"]).await;
    assert_eq!(o.code, 1);
    let o = f.run(&["list", "-c", "nZ"]).await;
    assert_eq!(o.stderr, "Error: unknown column \"Z\"\n");
    let o = f.run(&["start", "bad_name"]).await;
    assert_eq!(o.code, 1);
    assert_eq!(f.request_count(), before);

    // Errors from the server are one sentence.
    let o = f.run(&["info", "nope"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: instance \"nope\" not found\n")
    );
    let o = f.run(&["delete", "web1"]).await;
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        "Error: instance \"web1\" is running: stop it first or use --force\n"
    );

    f.ok(&["stop", "web1", "--timeout", "5"]).await;
    assert_eq!(
        f.ok(&["list", "web1", "-c", "s", "-f", "csv"]).await,
        "STOPPED\n"
    );
    f.ok(&["start", "web1", "db"]).await;
    f.ok(&["restart", "web1", "--force"]).await;
    let o = f.run(&["stop", "web1", "ghost"]).await;
    assert_eq!(o.code, 1);
    assert_eq!(o.stderr, "Error: ghost: instance \"ghost\" not found\n");
    f.ok(&["rename", "db", "db2"]).await;
    f.ok(&["move", "db2", "db3"]).await;
    f.ok(&["delete", "--force", "web1", "db3"]).await;
    assert_eq!(f.ok(&["list", "-f", "csv"]).await, "");
    // A stopped instance gets no stop request before the delete.
    let reqs = f.state.lock().unwrap().requests.clone();
    assert!(reqs.iter().any(|r| r == "PATCH /1.0/instances/web1"));
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /1.0/operations/op") && r.ends_with("/wait?timeout=30"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_exec() {
    let f = start(&["127.0.0.1"]).await;
    f.state
        .lock()
        .unwrap()
        .instances
        .insert("c1".into(), instance("c1", true, BTreeMap::new()));
    let o = f
        .run_with(&["exec", "c1", "--", "cat"], b"hello\nworld\n", true)
        .await;
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "hello\nworld\n"),
        "{}",
        o.stderr
    );
    let o = f.run(&["exec", "c1", "--", "fail"]).await;
    assert_eq!((o.code, o.stderr.as_str()), (3, "oops\n"));
    let o = f
        .run(&[
            "exec", "c1", "-T", "--env", "A=b", "--cwd", "/tmp", "--user", "7", "--", "env", "-x",
            "y",
        ])
        .await;
    assert_eq!(
        o.stdout,
        "A=b\ninteractive=false cwd=/tmp user=7 args=-x y\n"
    );
    let o = f.run(&["exec", "c1", "--", "unknown"]).await;
    assert_eq!(o.code, 127);

    // On a terminal (script(1) provides one) exec is interactive, passes TERM and a size,
    // and puts the terminal back the way it was.
    let bin = env!("CARGO_BIN_EXE_berth");
    let shell = format!(
        "stty -g > {dir}/before; {bin} exec c1 -- env; code=$?; stty -g > {dir}/after; exit $code",
        dir = f.dir.path().display()
    );
    let out = tokio::process::Command::new("script")
        .args(["-qec", &shell, "/dev/null"])
        .env("BERTH_CONF", f.conf_dir())
        .env("BERTH_URL", f.url())
        .env("BERTH_KEY_FILE", &f.key)
        .env("BERTH_CA", &f.ca)
        .env("TERM", "xterm-test")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("TERM=xterm-test"), "{text}");
    assert!(text.contains("interactive=true"), "{text}");
    let before = std::fs::read_to_string(f.dir.path().join("before")).unwrap();
    let after = std::fs::read_to_string(f.dir.path().join("after")).unwrap();
    assert_eq!(before, after, "terminal settings restored");

    // SIGINT is forwarded to the command when not interactive.
    let mut child = f
        .command(&["exec", "c1", "--", "wait-signal"], true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    tokio::io::AsyncReadExt::read_exact(&mut stdout, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"ready\n");
    let pid = child.id().unwrap().to_string();
    let st = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(130));
}

/// Recursive push and pull keep modes, owners (we run as root) and symlinks; `file edit`
/// from stdin keeps mode and owner and writes only a change; `file delete -f` takes a tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_files_keep_modes_owners_symlinks() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert!(
        rustix::process::geteuid().is_root(),
        "this test checks owners and must run as root"
    );
    let f = start(&["127.0.0.1"]).await;
    f.state
        .lock()
        .unwrap()
        .instances
        .insert("c1".into(), instance("c1", true, BTreeMap::new()));
    let tree = f.dir.path().join("local/tree");
    std::fs::create_dir_all(tree.join("priv")).unwrap();
    std::fs::write(tree.join("priv/secret"), b"s3cret").unwrap();
    std::fs::set_permissions(tree.join("priv/secret"), PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(tree.join("priv/secret"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(tree.join("priv"), PermissionsExt::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("priv/secret", tree.join("link")).unwrap();
    std::os::unix::fs::lchown(tree.join("link"), Some(1000), Some(1001)).unwrap();
    std::fs::create_dir(tree.join("ro")).unwrap();
    std::fs::write(tree.join("ro/inside"), b"x").unwrap();
    std::fs::set_permissions(tree.join("ro"), PermissionsExt::from_mode(0o555)).unwrap();

    f.ok(&[
        "file",
        "push",
        "-r",
        "-p",
        tree.to_str().unwrap(),
        "c1/root/",
    ])
    .await;
    {
        let st = f.state.lock().unwrap();
        let e = &st.files["/root/tree/priv"];
        assert_eq!((e.kind.as_str(), e.mode, e.uid), ("directory", 0o750, 0));
        let e = &st.files["/root/tree/priv/secret"];
        assert_eq!((e.mode, e.uid, e.gid), (0o600, 1000, 1000));
        let e = &st.files["/root/tree/link"];
        assert_eq!(
            (e.kind.as_str(), e.uid, e.gid, e.data.as_slice()),
            ("symlink", 1000, 1001, &b"priv/secret"[..])
        );
        assert_eq!(st.files["/root/tree/ro"].mode, 0o555);
    }
    // --uid/--gid override the local owners.
    f.ok(&[
        "file",
        "push",
        "-r",
        "--uid",
        "7",
        "--gid",
        "8",
        tree.join("priv").to_str().unwrap(),
        "c1/root/",
    ])
    .await;
    {
        let st = f.state.lock().unwrap();
        let e = &st.files["/root/priv/secret"];
        assert_eq!((e.mode, e.uid, e.gid), (0o600, 7, 8));
        assert_eq!(st.files["/root/priv"].uid, 7);
    }

    // Pull back: modes, owners and the symlink as it was; the read-only directory is filled.
    let dest = f.dir.path().join("back");
    f.ok(&["file", "pull", "-r", "c1/root/tree", dest.to_str().unwrap()])
        .await;
    let md = std::fs::symlink_metadata(dest.join("priv/secret")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o600, 1000, 1000)
    );
    assert_eq!(std::fs::read(dest.join("priv/secret")).unwrap(), b"s3cret");
    let md = std::fs::symlink_metadata(dest.join("priv")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o750);
    let md = std::fs::symlink_metadata(dest.join("link")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!((md.uid(), md.gid()), (1000, 1001));
    assert_eq!(
        std::fs::read_link(dest.join("link")).unwrap(),
        Path::new("priv/secret")
    );
    assert_eq!(std::fs::read(dest.join("ro/inside")).unwrap(), b"x");
    let md = std::fs::symlink_metadata(dest.join("ro")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o555);

    // Edit from stdin: new content, same mode and owner; no change, no write.
    let o = f
        .run_with(
            &["file", "edit", "c1/root/tree/priv/secret"],
            b"changed\n",
            true,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    {
        let st = f.state.lock().unwrap();
        let e = &st.files["/root/tree/priv/secret"];
        assert_eq!(
            (e.data.as_slice(), e.mode, e.uid, e.gid),
            (&b"changed\n"[..], 0o600, 1000, 1000)
        );
    }
    let before = f.request_count();
    let o = f
        .run_with(
            &["file", "edit", "c1/root/tree/priv/secret"],
            b"changed\n",
            true,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let reqs = f.state.lock().unwrap().requests[before..].to_vec();
    assert!(reqs.iter().all(|r| !r.starts_with("POST")), "{reqs:?}");
    let o = f
        .run_with(&["file", "edit", "c1/root/tree/priv"], b"x", true)
        .await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (
            1,
            "Error: /root/tree/priv is a directory; only files can be edited\n"
        )
    );

    // Delete: a file, an empty directory; a full one needs -f, which takes everything.
    f.ok(&["file", "delete", "c1/root/tree/ro/inside"]).await;
    f.ok(&["file", "delete", "c1/root/tree/ro"]).await;
    let o = f.run(&["file", "delete", "c1/root/tree"]).await;
    assert_eq!(o.code, 1, "a full directory needs -f");
    assert!(
        f.state
            .lock()
            .unwrap()
            .files
            .contains_key("/root/tree/link")
    );
    f.ok(&["file", "delete", "-f", "c1/root/tree"]).await;
    {
        let st = f.state.lock().unwrap();
        assert!(
            st.files.keys().all(|k| !k.starts_with("/root/tree")),
            "{:?}",
            st.files.keys().collect::<Vec<_>>()
        );
        assert!(st.files.contains_key("/root/priv/secret"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_files() {
    let f = start(&["127.0.0.1"]).await;
    f.state
        .lock()
        .unwrap()
        .instances
        .insert("c1".into(), instance("c1", true, BTreeMap::new()));
    let local = f.dir.path().join("local");
    std::fs::create_dir_all(local.join("tree/sub")).unwrap();
    std::fs::write(local.join("a.txt"), b"alpha").unwrap();
    std::fs::set_permissions(
        local.join("a.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    std::fs::write(local.join("tree/sub/b.txt"), b"beta").unwrap();
    std::os::unix::fs::symlink("sub/b.txt", local.join("tree/link")).unwrap();
    let a = local.join("a.txt");
    let a = a.to_str().unwrap();

    // Parent missing without -p.
    let o = f.run(&["file", "push", a, "c1/root/x/a.txt"]).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("parent directory"), "{}", o.stderr);
    f.ok(&["file", "push", "-p", a, "c1/root/x/"]).await;
    f.ok(&[
        "file",
        "push",
        "--mode",
        "0600",
        "--uid",
        "1000",
        "--gid",
        "5",
        a,
        "c1/root/x/renamed",
    ])
    .await;
    {
        let st = f.state.lock().unwrap();
        let e = &st.files["/root/x/a.txt"];
        assert_eq!(
            (e.kind.as_str(), e.mode, e.uid, e.data.as_slice()),
            ("file", 0o640, 0, &b"alpha"[..])
        );
        let e = &st.files["/root/x/renamed"];
        assert_eq!((e.mode, e.uid, e.gid), (0o600, 1000, 5));
        assert_eq!(st.files["/root"].kind, "directory");
    }
    let tree = local.join("tree");
    let o = f
        .run(&["file", "push", tree.to_str().unwrap(), "c1/root/"])
        .await;
    assert_eq!(o.code, 1, "directories need -r");
    f.ok(&["file", "push", "-r", tree.to_str().unwrap(), "c1/root/"])
        .await;
    {
        let st = f.state.lock().unwrap();
        assert_eq!(st.files["/root/tree/sub/b.txt"].data, b"beta");
        assert_eq!(st.files["/root/tree/link"].kind, "symlink");
        assert_eq!(st.files["/root/tree/link"].data, b"sub/b.txt");
    }

    // Pull: to stdout, to a file, into a directory, recursively.
    assert_eq!(
        f.ok(&["file", "pull", "c1/root/x/a.txt", "-"]).await,
        "alpha"
    );
    let dest = f.dir.path().join("pulled");
    std::fs::create_dir(&dest).unwrap();
    f.ok(&["file", "pull", "c1/root/x/renamed", dest.to_str().unwrap()])
        .await;
    assert_eq!(std::fs::read(dest.join("renamed")).unwrap(), b"alpha");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dest.join("renamed"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let single = dest.join("single.txt");
    f.ok(&["file", "pull", "c1/root/x/a.txt", single.to_str().unwrap()])
        .await;
    assert_eq!(std::fs::read(&single).unwrap(), b"alpha");
    let o = f
        .run(&["file", "pull", "c1/root/tree", dest.to_str().unwrap()])
        .await;
    assert_eq!(o.code, 1, "directories need -r");
    f.ok(&["file", "pull", "-r", "c1/root/tree", dest.to_str().unwrap()])
        .await;
    assert_eq!(std::fs::read(dest.join("tree/sub/b.txt")).unwrap(), b"beta");
    assert_eq!(
        std::fs::read_link(dest.join("tree/link")).unwrap(),
        Path::new("sub/b.txt")
    );

    f.ok(&["file", "delete", "c1/root/x/renamed"]).await;
    let o = f.run(&["file", "pull", "c1/root/x/renamed", "-"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: /root/x/renamed not found\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_images_and_operations() {
    let f = start(&["127.0.0.1"]).await;
    let out = f.ok(&["image", "build", "busybox"]).await;
    assert!(out.contains("Image built with fingerprint: "), "{out}");
    let o = f.run(&["image", "build", "broken"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: debootstrap failed: no network\n")
    );
    let o = f
        .run(&["image", "build", "debian/12", "--alias", "../bad"])
        .await;
    assert_eq!(o.code, 1);
    // --target names the one node that builds it.
    let from = f.request_count();
    let out = f
        .ok(&[
            "image", "build", "busybox", "--target", "node2", "--alias", "bb2",
        ])
        .await;
    assert!(out.contains("Image built with fingerprint: "), "{out}");
    assert_eq!(
        f.requests_since(from).first().map(String::as_str),
        Some("POST /1.0/images?target=node2")
    );

    let meta = f.dir.path().join("meta.tar");
    let rootfs = f.dir.path().join("rootfs.squashfs");
    std::fs::write(&meta, vec![7u8; 1000]).unwrap();
    std::fs::write(&rootfs, vec![9u8; 3 << 20]).unwrap();
    let out = f
        .ok(&[
            "image",
            "import",
            meta.to_str().unwrap(),
            rootfs.to_str().unwrap(),
            "--alias",
            "mine/1",
            "--alias",
            "m2",
        ])
        .await;
    assert!(out.contains("Image imported with fingerprint: "), "{out}");
    {
        let st = f.state.lock().unwrap();
        let (h, len) = &st.imports[0];
        assert_eq!(*len, 1000 + (3 << 20));
        assert_eq!(h["x-berth-image-format"], "split");
        assert_eq!(h["x-berth-metadata-size"], "1000");
        assert_eq!(h["x-berth-aliases"], "mine/1,m2");
    }
    let csv = f.ok(&["image", "list", "-f", "csv"]).await;
    assert!(csv.contains("busybox,"), "{csv}");
    assert!(csv.contains("\"mine/1\nm2\","), "{csv}");
    let info = f.ok(&["image", "info", "mine/1"]).await;
    assert!(
        info.contains("Aliases:\n    - mine/1\n    - m2\n"),
        "{info}"
    );
    let fp = info
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("Fingerprint: ")
        .to_string();

    f.ok(&["image", "alias", "create", "other", &fp[..12]])
        .await;
    let aliases = f.ok(&["image", "alias", "list", "-f", "csv"]).await;
    assert!(
        aliases.contains(&format!("other,{},", &fp[..12])),
        "{aliases}"
    );
    f.ok(&["image", "alias", "delete", "mine/1"]).await;
    assert!(
        f.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .any(|r| r == "DELETE /1.0/images/aliases/mine/1")
    );
    f.ok(&["image", "delete", "m2"]).await;
    assert!(!f.ok(&["image", "list", "-f", "csv"]).await.contains("m2"));

    assert_eq!(
        f.ok(&["cluster", "add", "node2"]).await,
        "Member node2 join token:\ndG9rZW4=\n\nOn the new node run:\n  (umask 077 && echo dG9rZW4= >/etc/berth/join-token) && berth-agent join --join-token-file /etc/berth/join-token && systemctl enable --now berth-agent\n"
    );
    let ops = f.ok(&["operation", "list", "-f", "csv"]).await;
    assert!(ops.contains(",TASK,"), "{ops}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_remotes_and_trust() {
    // The certificate names another host: trusted through the CA and the controller name.
    let f = start(&["node-a.internal"]).await;
    let url = f.url();
    let key = f.key.to_str().unwrap().to_string();
    let ca = f.ca.to_str().unwrap().to_string();
    let o = f
        .run_with(
            &[
                "remote",
                "add",
                "r1",
                &url,
                "--key-file",
                &key,
                "--ca-file",
                &ca,
            ],
            b"",
            false,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    // No terminal and no --accept-certificate: refused.
    let o = f
        .run_with(
            &["remote", "add", "r2", &url, "--key-file", &key],
            b"",
            false,
        )
        .await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("--accept-certificate"), "{}", o.stderr);
    let o = f
        .run_with(
            &[
                "remote",
                "add",
                "r2",
                &url,
                "--key-file",
                &key,
                "--accept-certificate",
            ],
            b"",
            false,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let conf = std::fs::read_to_string(f.conf_dir().join("config.toml")).unwrap();
    assert!(conf.contains("fingerprint = "), "{conf}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(f.conf_dir().join("config.toml"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A pinned fingerprint that does not match is refused.
    let mut conf = std::fs::read_to_string(f.conf_dir().join("config.toml")).unwrap();
    conf.push_str(&format!(
        "\n[remotes.r3]\nurl = \"{url}\"\nkey-file = \"{key}\"\nfingerprint = \"{}\"\n",
        "00".repeat(32)
    ));
    std::fs::write(f.conf_dir().join("config.toml"), conf).unwrap();
    let o = f.run_with(&["list", "r3:"], b"", false).await;
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("was pinned; if it was replaced on purpose"),
        "{}",
        o.stderr
    );
    f.run_with(&["remote", "remove", "r3"], b"", false).await;

    let o = f.run_with(&["list", "r1:", "-f", "csv"], b"", false).await;
    assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{}", o.stderr);
    let o = f.run_with(&["list", "r2:", "-f", "csv"], b"", false).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = f.run_with(&["info", "r2:nope"], b"", false).await;
    assert_eq!(o.stderr, "Error: instance \"nope\" not found\n");
    let o = f.run_with(&["list"], b"", false).await;
    assert_eq!(o.stderr, "Error: remote \"local\" does not exist\n");
    f.run_with(&["remote", "switch", "r2"], b"", false).await;
    let o = f.run_with(&["remote", "get-default"], b"", false).await;
    assert_eq!(o.stdout, "r2\n");
    let o = f
        .run_with(&["remote", "list", "-f", "csv"], b"", false)
        .await;
    assert!(o.stdout.starts_with(&format!("r1,{url},")), "{}", o.stdout);
    let o = f.run_with(&["remote", "remove", "r2"], b"", false).await;
    assert_eq!(o.code, 1, "the default remote cannot be removed");
    f.run_with(&["remote", "remove", "r1"], b"", false).await;
    let o = f.run_with(&["list", "r1:"], b"", false).await;
    assert_eq!(o.stderr, "Error: remote \"r1\" does not exist\n");

    // A CA that did not sign the server certificate is refused.
    let other = start(&["127.0.0.1"]).await;
    let o = f
        .command(&["list"], false)
        .env("BERTH_URL", f.url())
        .env("BERTH_KEY_FILE", &f.key)
        .env("BERTH_CA", &other.ca)
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with(&format!("Error: cannot connect to {}", f.url())),
        "{err}"
    );
    // A wrong key gets the server's answer.
    let bad = f.dir.path().join("badkey");
    std::fs::write(&bad, "nope").unwrap();
    let o = f
        .command(&["list"], true)
        .env("BERTH_KEY_FILE", &bad)
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "Error: not authorized\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t51_agent_certificate_is_not_a_controller() {
    // Same CA, right address, but not a controller's certificate: refused.
    let f = start_as(&["127.0.0.1"], false).await;
    let o = f
        .command(&["list"], false)
        .env("BERTH_URL", f.url())
        .env("BERTH_KEY_FILE", &f.key)
        .env("BERTH_CA", &f.ca)
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a controller"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_cluster_commands() {
    let f = start(&["127.0.0.1"]).await;
    let list = f.ok(&["cluster", "list"]).await;
    assert!(list.starts_with("Controllers:\n"), "{list}");
    assert!(list.contains("| c1   | 1  | leader | ONLINE |"), "{list}");
    assert!(list.contains("| node1 | ONLINE | 1/4 "), "{list}");
    assert_eq!(
        f.ok(&["cluster", "list", "-f", "csv"]).await,
        format!(
            "controller,c1,1,leader,ONLINE,{},127.0.0.1:1\nnode,node1,ONLINE,1/4,0B/8.00GiB,,1,rack=r1\n",
            f.addr
        )
    );
    let json: serde_json::Value =
        serde_json::from_str(&f.ok(&["cluster", "list", "-f", "json"]).await).unwrap();
    assert_eq!(json["nodes"][0]["name"], "node1");

    // Node settings.
    f.ok(&["cluster", "set", "node1", "scheduler.instance", "manual"])
        .await;
    f.ok(&["cluster", "set", "node1", "ssd", "true"]).await;
    assert!(
        f.ok(&["cluster", "list", "-f", "csv"])
            .await
            .contains("node,node1,ONLINE (MANUAL),")
    );
    f.ok(&["cluster", "unset", "node1", "ssd"]).await;
    let show = f.ok(&["cluster", "show", "node1"]).await;
    assert_eq!(
        show,
        "config:\n  scheduler.instance: manual\nname: node1\nstatus: Online\n"
    );
    let o = f.run(&["cluster", "show", "ghost"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: cluster member \"ghost\" not found\n")
    );

    // Cluster-wide settings.
    assert_eq!(
        f.ok(&["cluster", "get-config", "scheduler.policy"]).await,
        "\n"
    );
    f.ok(&["cluster", "set-config", "scheduler.policy", "binpack"])
        .await;
    assert_eq!(
        f.ok(&["cluster", "get-config", "scheduler.policy"]).await,
        "binpack\n"
    );
    f.ok(&["cluster", "unset-config", "scheduler.policy"]).await;
    assert!(f.state.lock().unwrap().cluster_config.is_empty());

    // Tokens.
    let out = f.ok(&["cluster", "add-controller", "c2"]).await;
    assert_eq!(
        out,
        format!(
            "Controller c2 join token:\nY3Rvaw==\n\nOn the new controller, set join = \"127.0.0.1:{}\" at the top of /etc/berth/berthd.toml, then run:\n  (umask 077 && echo BERTHD_JOIN_TOKEN=Y3Rvaw== >/etc/berth/berthd.env) && systemctl enable --now berthd\nRemove the token from /etc/berth/berthd.env once `berth cluster list` shows the controller.\n",
            f.addr.port()
        )
    );
    let out = f.ok(&["cluster", "add-node", "withcmd"]).await;
    assert!(
        out.ends_with("On the new node run:\n  berth-agent join --token dG9rZW4=\n"),
        "{out}"
    );

    // Remove: without a terminal only with --force.
    let before = f.request_count();
    let o = f.run(&["cluster", "remove", "node1"]).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("--force"), "{}", o.stderr);
    assert_eq!(f.request_count(), before);
    assert_eq!(
        f.ok(&["cluster", "remove", "node1", "--force"]).await,
        "Member node1 removed\n"
    );

    // launch --target passes ?target=.
    f.state
        .lock()
        .unwrap()
        .aliases
        .push(serde_json::json!({"name": "busybox", "target": "abcdef"}));
    f.ok(&["launch", "busybox", "w1", "--target", "node1"])
        .await;
    assert!(
        f.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .any(|r| r == "POST /1.0/instances?target=node1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t61_several_addresses_and_503() {
    let f = start(&["127.0.0.1"]).await;
    // An address where nothing listens.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    let key = f.key.to_str().unwrap().to_string();
    let ca = f.ca.to_str().unwrap().to_string();
    let urls = format!("{dead},{}", f.url());
    f.state
        .lock()
        .unwrap()
        .other_controllers
        .push("127.0.0.1:9".into());
    let o = f
        .run_with(
            &[
                "remote",
                "add",
                "c",
                &urls,
                "--key-file",
                &key,
                "--ca-file",
                &ca,
            ],
            b"",
            false,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    // The remote learned the third controller from GET /1.0/cluster.
    let remotes: serde_json::Value = serde_json::from_str(
        &f.run_with(&["remote", "list", "-f", "json"], b"", false)
            .await
            .stdout,
    )
    .unwrap();
    assert_eq!(remotes[0]["url"], dead.as_str());
    assert_eq!(
        remotes[0]["addresses"],
        serde_json::json!([f.url(), "https://127.0.0.1:9"])
    );
    // The dead first address is skipped.
    f.run_with(&["remote", "switch", "c"], b"", false).await;
    let o = f.run_with(&["list", "-f", "csv"], b"", false).await;
    assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{}", o.stderr);
    // So is it with BERTH_URL.
    let o = f
        .command(&["list", "-f", "csv"], true)
        .env("BERTH_URL", &urls)
        .output()
        .await
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Every address dead: one error naming them all (a repeated address counts once).
    let dead2 = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    let o = f
        .command(&["list"], true)
        .env("BERTH_URL", format!("{dead},{dead2},{dead}/"))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("Error: cannot connect to any address of remote \"env\": cannot connect to https://127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains(&dead2), "{err}");
    // One address can be set again.
    f.run_with(&["remote", "set-url", "c", &f.url()], b"", false)
        .await;
    let conf = std::fs::read_to_string(f.conf_dir().join("config.toml")).unwrap();
    assert!(!conf.contains("addresses"), "{conf}");
    // Several addresses need a CA.
    let o = f
        .run_with(
            &[
                "remote",
                "add",
                "p",
                &urls,
                "--key-file",
                &key,
                "--accept-certificate",
            ],
            b"",
            false,
        )
        .await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("need --ca-file"), "{}", o.stderr);

    // A read that meets 503 is retried.
    f.state.lock().unwrap().unavailable = 2;
    let o = f.run(&["list", "-f", "csv"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    // A write that meets 503 without Retry-After is not: the server's sentence is shown.
    f.state
        .lock()
        .unwrap()
        .aliases
        .push(serde_json::json!({"name": "busybox", "target": "abcdef"}));
    let before = f.request_count();
    {
        let mut st = f.state.lock().unwrap();
        st.unavailable = 1;
        st.retry_after = false;
    }
    let o = f
        .run(&["cluster", "set-config", "scheduler.policy", "binpack"])
        .await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (
            1,
            "Error: no raft leader: this controller cannot reach a majority of the controllers\n"
        )
    );
    assert_eq!(f.request_count(), before + 1);
    // With Retry-After (nothing committed) it is retried.
    {
        let mut st = f.state.lock().unwrap();
        st.unavailable = 2;
        st.retry_after = true;
    }
    f.ok(&["cluster", "set-config", "scheduler.policy", "binpack"])
        .await;
    assert_eq!(
        f.state.lock().unwrap().cluster_config["scheduler.policy"],
        "binpack"
    );
    // A read that keeps failing gives up after the retry window with the server's sentence.
    // A controller that answers 503 (minority side) is left for the next address, which
    // serves the read.
    let (addr2, state2) = serve(f.acceptor.clone()).await;
    f.state.lock().unwrap().unavailable = 1000;
    let o = f
        .command(&["list", "-f", "csv"], true)
        .env("BERTH_URL", format!("{},https://{addr2}", f.url()))
        .output()
        .await
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        state2.lock().unwrap().requests,
        ["GET /1.0/instances?recursion=2&fields=state.network,state.status"]
    );
    let started = std::time::Instant::now();
    let o = f.run(&["list"]).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("no raft leader"), "{}", o.stderr);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    f.state.lock().unwrap().unavailable = 0;
}

impl Fake {
    /// The requests the fake has seen since `from` (method and URI).
    fn requests_since(&self, from: usize) -> Vec<String> {
        self.state.lock().unwrap().requests[from..].to_vec()
    }

    /// Adds this fake as remote `name` (trusted through its CA) and makes it the default.
    async fn add_ca_remote(&self, name: &str) {
        let key = self.key.to_str().unwrap().to_string();
        let ca = self.ca.to_str().unwrap().to_string();
        let o = self
            .run_with(
                &[
                    "remote",
                    "add",
                    name,
                    &self.url(),
                    "--key-file",
                    &key,
                    "--ca-file",
                    &ca,
                ],
                b"",
                false,
            )
            .await;
        assert_eq!(o.code, 0, "{}", o.stderr);
        let o = self.run_with(&["remote", "switch", name], b"", false).await;
        assert_eq!(o.code, 0, "{}", o.stderr);
    }

    /// Runs `berth` against the configured remotes (not BERTH_URL); expects success.
    async fn conf_ok(&self, args: &[&str]) -> String {
        let o = self.run_with(args, b"", false).await;
        assert_eq!(o.code, 0, "berth {args:?} failed: {}{}", o.stdout, o.stderr);
        o.stdout
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_projects_and_the_current_project() {
    let f = start(&["127.0.0.1"]).await;
    f.add_ca_remote("r").await;

    // Bad values are refused before any request.
    let before = f.request_count();
    for (args, err) in [
        (
            &["project", "create", "bad_name"][..],
            "Error: project name \"bad_name\" contains '_'; only letters, digits and hyphens are allowed\n",
        ),
        (
            &["project", "create", "p", "-c", "limits.instances=-1"],
            "Error: limits.instances \"-1\" must be a whole number of 0 or more\n",
        ),
        (&["project", "set", "p", "limits.memory", "lots"], ""),
        (
            &["project", "set", "auda", "limits.cpu", "-1"],
            "Error: limits.cpu \"-1\" must be a whole number of 0 or more\n",
        ),
        (&["list", "--project", "Not_ok"], ""),
    ] {
        let o = f.run_with(args, b"", false).await;
        assert_eq!(o.code, 1, "{args:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{args:?}: {}", o.stderr);
        if !err.is_empty() {
            assert_eq!(o.stderr, err, "{args:?}");
        }
    }
    assert_eq!(f.request_count(), before, "no request for bad input");

    f.conf_ok(&[
        "project",
        "create",
        "team-a",
        "-c",
        "limits.instances=2",
        "-c",
        "limits.memory=1GiB",
        "--description",
        "Team A",
    ])
    .await;
    f.conf_ok(&[
        "project",
        "set",
        "team-a",
        "restricted=true",
        "user.owner=ops",
    ])
    .await;
    assert_eq!(
        f.conf_ok(&["project", "get", "team-a", "limits.memory"])
            .await,
        "1GiB\n"
    );
    f.conf_ok(&["project", "unset", "team-a", "user.owner"])
        .await;
    let show = f.conf_ok(&["project", "show", "team-a"]).await;
    assert!(show.contains("name: team-a\n"), "{show}");
    assert!(!show.contains("user.owner"), "{show}");

    let table = f.conf_ok(&["project", "list"]).await;
    assert!(table.contains("| default (current) |"), "{table}");
    assert!(
        table.contains("| team-a            | 0         | instances=2 | YES        | Team A "),
        "{table}"
    );
    let csv = f.conf_ok(&["project", "list", "-f", "csv"]).await;
    assert_eq!(
        csv,
        "default,0,,NO,Default Berth project\nteam-a,0,\"instances=2\nmemory=1GiB\",YES,Team A\n"
    );

    // switch stores the project in the remote; requests then name it, except fleet endpoints.
    f.conf_ok(&["project", "switch", "team-a"]).await;
    let conf = std::fs::read_to_string(f.conf_dir().join("config.toml")).unwrap();
    assert!(conf.contains("project = \"team-a\""), "{conf}");
    assert!(
        f.conf_ok(&["project", "list"])
            .await
            .contains("| team-a (current) |")
    );
    let from = f.request_count();
    f.conf_ok(&["list", "-f", "csv"]).await;
    f.conf_ok(&["key", "list"]).await;
    f.conf_ok(&["list", "--project", "default", "-f", "csv"])
        .await;
    f.conf_ok(&["operation", "list", "--all-projects"]).await;
    let o = f
        .command(&["list", "-f", "csv"], false)
        .env("BERTH_PROJECT", "team-b")
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        f.requests_since(from),
        [
            "GET /1.0/instances?recursion=2&fields=state.network,state.status&project=team-a",
            "GET /1.0/keys?recursion=1",
            "GET /1.0/instances?recursion=2&fields=state.network,state.status&project=default",
            "GET /1.0/operations?recursion=1&all-projects=true",
            "GET /1.0/instances?recursion=2&fields=state.network,state.status&project=team-b",
        ]
    );
    let o = f.run(&["project", "switch", "team-a"]).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("BERTH_URL is set"), "{}", o.stderr);
    let o = f.run_with(&["project", "switch", "nope"], b"", false).await;
    assert_eq!(o.stderr, "Error: project \"nope\" not found\n");

    // info: use against quota.
    let info = f.conf_ok(&["project", "info", "team-a"]).await;
    assert!(
        info.contains("| instances | 2       | 0         |"),
        "{info}"
    );
    assert!(
        info.contains("| memory    | 1.00GiB | 512.00MiB |"),
        "{info}"
    );

    // edit: PUT with If-Match of what was read; a stale read is refused with a sentence.
    let o = f
        .run_with(
            &["project", "edit", "team-a"],
            b"description: Team A, edited\nconfig:\n  limits.instances: '5'\n",
            false,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    {
        let st = f.state.lock().unwrap();
        assert!(st.if_matches.last().unwrap().starts_with('"'));
        assert_eq!(st.projects["team-a"].config["limits.instances"], "5");
        assert_eq!(st.projects["team-a"].description, "Team A, edited");
    }
    f.state.lock().unwrap().stale_puts = 1;
    let o = f
        .run_with(
            &["project", "edit", "team-a"],
            b"description: late\nconfig: {}\n",
            false,
        )
        .await;
    assert_eq!(
        o.stderr,
        "Error: project \"team-a\" was changed by someone else since it was read; nothing was saved, edit it again\n"
    );
    let o = f
        .run_with(
            &["project", "edit", "team-a"],
            b"description: x\nconfig:\n  limits.instances: many\n",
            false,
        )
        .await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("limits.instances"), "{}", o.stderr);
    let o = f
        .run_with(&["project", "edit", "team-a"], b"nonsense: [\n", false)
        .await;
    assert!(
        o.stderr.starts_with("Error: cannot parse the YAML"),
        "{}",
        o.stderr
    );
    // An empty edit (no input, or only comments) changes nothing instead of wiping the project.
    let before = f.request_count();
    for input in [&b""[..], b"  \n", b"# nothing here\n"] {
        let o = f
            .run_with(&["project", "edit", "team-a"], input, false)
            .await;
        assert_eq!(o.code, 1, "{input:?}");
        assert_eq!(
            o.stderr,
            "Error: the edited text is empty; nothing was changed\n"
        );
    }
    assert!(
        f.requests_since(before)
            .iter()
            .all(|r| !r.starts_with("PUT")),
        "{:?}",
        f.requests_since(before)
    );
    assert_eq!(
        f.state.lock().unwrap().projects["team-a"].description,
        "Team A, edited"
    );

    // rename and delete keep the current project right.
    f.conf_ok(&["project", "rename", "team-a", "team-b"]).await;
    let conf = std::fs::read_to_string(f.conf_dir().join("config.toml")).unwrap();
    assert!(conf.contains("project = \"team-b\""), "{conf}");
    f.conf_ok(&["project", "delete", "team-b"]).await;
    let conf = std::fs::read_to_string(f.conf_dir().join("config.toml")).unwrap();
    assert!(!conf.contains("project ="), "{conf}");
    assert!(
        f.requests_since(from)
            .iter()
            .any(|r| r == "DELETE /1.0/projects/team-b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t71_profiles_and_launch() {
    let f = start(&["127.0.0.1"]).await;
    f.add_ca_remote("r").await;
    f.conf_ok(&["project", "create", "p1"]).await;
    f.conf_ok(&["project", "switch", "p1"]).await;

    let before = f.request_count();
    let o = f
        .run_with(
            &["profile", "create", "web", "-c", "limits.cpu=lots"],
            b"",
            false,
        )
        .await;
    assert_eq!(o.code, 1);
    let o = f
        .run_with(&["launch", "abcdef", "w0", "-p", "bad_profile"], b"", false)
        .await;
    assert_eq!(o.code, 1);
    assert_eq!(f.request_count(), before);

    f.conf_ok(&[
        "profile",
        "create",
        "web",
        "-c",
        "limits.cpu=2",
        "-c",
        "user.tier=web",
    ])
    .await;
    f.conf_ok(&["profile", "create", "small", "-c", "limits.memory=256MiB"])
        .await;
    f.conf_ok(&["profile", "set", "small", "limits.cpu", "1"])
        .await;
    f.conf_ok(&["profile", "unset", "web", "user.tier"]).await;
    assert_eq!(
        f.conf_ok(&["profile", "get", "small", "limits.cpu"]).await,
        "1\n"
    );
    assert_eq!(
        f.conf_ok(&["profile", "list", "-f", "csv"]).await,
        "small,,0\nweb,,0\n"
    );
    assert!(
        f.conf_ok(&["profile", "show", "web"])
            .await
            .contains("limits.cpu: '2'")
    );
    f.conf_ok(&["profile", "copy", "web", "web2"]).await;
    f.conf_ok(&["profile", "rename", "web2", "web3"]).await;
    f.conf_ok(&["profile", "delete", "web3"]).await;
    {
        let st = f.state.lock().unwrap();
        let names: Vec<_> = st.profiles.keys().cloned().collect();
        assert_eq!(
            names,
            [
                ("p1".to_string(), "small".to_string()),
                ("p1".into(), "web".into())
            ]
        );
    }
    let o = f
        .run_with(
            &["profile", "edit", "web"],
            b"description: web tier\nconfig:\n  limits.cpu: '3'\ndevices: {}\n",
            false,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        f.state.lock().unwrap().profiles[&("p1".to_string(), "web".to_string())].config["limits.cpu"],
        "3"
    );
    let at_filter = f.request_count();
    assert_eq!(
        f.conf_ok(&["profile", "list", "--filter", "name eq web", "-f", "csv"])
            .await
            .lines()
            .map(|l| l.split(',').next().unwrap())
            .collect::<Vec<_>>(),
        ["web"]
    );
    assert_eq!(
        f.requests_since(at_filter),
        ["GET /1.0/profiles?filter=name%20eq%20web&recursion=1&project=p1"]
    );
    let at_edit = f.request_count();
    let o = f.run_with(&["profile", "edit", "web"], b"", false).await;
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        "Error: the edited text is empty; nothing was changed\n"
    );
    assert!(
        f.requests_since(at_edit)
            .iter()
            .all(|r| !r.starts_with("PUT"))
    );

    // launch -p, in order; then assign/add/remove with If-Match.
    f.conf_ok(&[
        "launch",
        "abcdef",
        "w1",
        "-p",
        "web",
        "-p",
        "small",
        "-c",
        "limits.memory=512MiB",
    ])
    .await;
    let profiles = |f: &Fake, name: &str| f.state.lock().unwrap().instances[name].profiles.clone();
    assert_eq!(profiles(&f, "w1"), ["web", "small"]);
    assert_eq!(f.state.lock().unwrap().instances["w1"].project, "p1");
    let info = f.conf_ok(&["info", "w1"]).await;
    assert!(
        info.contains("Project: p1\nProfiles: web, small\n"),
        "{info}"
    );
    let expanded = f.conf_ok(&["config", "show", "w1", "--expanded"]).await;
    assert!(
        expanded.starts_with("config:\n  limits.cpu: '1'\n  limits.memory: 512MiB\n"),
        "{expanded}"
    );
    let own = f.conf_ok(&["config", "show", "w1"]).await;
    assert!(
        own.starts_with("config:\n  limits.memory: 512MiB\n"),
        "{own}"
    );

    f.conf_ok(&["profile", "remove", "w1", "web"]).await;
    assert_eq!(profiles(&f, "w1"), ["small"]);
    f.conf_ok(&["profile", "add", "w1", "web"]).await;
    assert_eq!(profiles(&f, "w1"), ["small", "web"]);
    let o = f
        .run_with(&["profile", "add", "w1", "web"], b"", false)
        .await;
    assert_eq!(
        o.stderr,
        "Error: profile \"web\" is already assigned to instance \"w1\"\n"
    );
    f.conf_ok(&["profile", "assign", "w1", "web,small"]).await;
    assert_eq!(profiles(&f, "w1"), ["web", "small"]);
    f.conf_ok(&["profile", "assign", "w1", ""]).await;
    assert!(profiles(&f, "w1").is_empty());
    assert!(
        f.state
            .lock()
            .unwrap()
            .if_matches
            .iter()
            .all(|m| m.starts_with('"'))
    );
    f.state.lock().unwrap().stale_puts = 1;
    let o = f
        .run_with(&["profile", "add", "w1", "web"], b"", false)
        .await;
    assert_eq!(
        o.stderr,
        "Error: instance \"w1\" was changed by someone else since it was read; nothing was saved, edit it again\n"
    );

    // Without -p the server applies "default"; --no-profiles asks for none.
    f.conf_ok(&["launch", "abcdef", "w3"]).await;
    assert_eq!(profiles(&f, "w3"), ["default"]);
    f.conf_ok(&["launch", "abcdef", "w2", "--no-profiles"])
        .await;
    {
        let st = f.state.lock().unwrap();
        assert!(st.instances["w2"].profiles.is_empty());
        assert_eq!(st.instances["w2"].status, "Running");
    }
    let reqs = f.requests_since(before);
    assert!(
        reqs.iter().any(|r| r == "POST /1.0/profiles?project=p1"),
        "{reqs:?}"
    );
    assert!(
        reqs.iter().any(|r| r == "POST /1.0/instances?project=p1"),
        "{reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t72_keys_and_monitor() {
    let f = start(&["127.0.0.1"]).await;
    f.add_ca_remote("r").await;
    f.conf_ok(&["project", "create", "team-a"]).await;

    let before = f.request_count();
    for (args, err) in [
        (
            &["key", "create", "ci", "--role", "root"][..],
            "Error: role \"root\" is not valid: use admin, operator, member or viewer\n",
        ),
        (
            &["key", "create", "ci", "--role", "viewer", "--expires", "3y"],
            "Error: --expires: \"3y\" is not a duration (expected a number with s, m, h, d or w, such as 30d)\n",
        ),
        (
            &["key", "rotate", "ci", "--expires", "0d"],
            "Error: --expires: duration \"0d\" must be more than zero\n",
        ),
        (
            &["key", "create", "k", "--role", "member", "--expires", "-1d"],
            "Error: --expires: \"-1d\" is not a duration (expected a number with s, m, h, d or w, such as 30d)\n",
        ),
        (
            &["key", "rotate", "k", "--expires", "-1d"],
            "Error: --expires: \"-1d\" is not a duration (expected a number with s, m, h, d or w, such as 30d)\n",
        ),
        (
            &["monitor", "--type", "logging"],
            "Error: event type \"logging\" is not valid: use lifecycle or operation\n",
        ),
        (
            &["monitor", "--format", "xml"],
            "Error: invalid format \"xml\": use pretty, json or yaml\n",
        ),
    ] {
        let o = f.run_with(args, b"", false).await;
        assert_eq!((o.code, o.stderr.as_str()), (1, err), "{args:?}");
    }
    assert_eq!(f.request_count(), before);

    let o = f
        .run_with(
            &[
                "key",
                "create",
                "ci",
                "--role",
                "member",
                "--project",
                "team-a",
                "--expires",
                "30d",
            ],
            b"",
            false,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let secret = format!("berth_id1_{}\n", "5".repeat(64));
    assert_eq!(o.stdout, secret, "only the secret on stdout");
    assert_eq!(
        o.stderr,
        "Key \"ci\" created (member of project \"team-a\", expires 2026-12-29T21:00:00Z): store its secret now, it is not shown again\n"
    );
    let o = f
        .run_with(&["key", "create", "ops", "--role", "operator"], b"", false)
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Without --project a member or viewer key is made in the current project (here none:
    // default), and stderr says which.
    let o = f
        .run_with(&["key", "create", "look", "--role", "viewer"], b"", false)
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stderr,
        "Key \"look\" created (viewer of project \"default\", no expiry): store its secret now, it is not shown again\n"
    );
    f.conf_ok(&["key", "revoke", "look"]).await;
    {
        let st = f.state.lock().unwrap();
        assert_eq!(st.keys["ci"].project, "team-a");
        assert_eq!(st.keys["ops"].project, "default");
    }
    let list = f.conf_ok(&["key", "list", "-f", "csv"]).await;
    assert_eq!(
        list,
        "ci,member,team-a,2026-11-29T21:00:00Z,2026-12-29T21:00:00Z\nops,operator,,2026-11-29T21:00:00Z,never\n"
    );
    let json = f.conf_ok(&["key", "list", "-f", "json"]).await;
    assert!(!json.contains("berth_id"), "{json}");
    let show = f.conf_ok(&["key", "show", "ci"]).await;
    assert!(show.contains("role: member\n"), "{show}");
    let o = f.run_with(&["key", "rotate", "ci"], b"", false).await;
    assert_eq!(o.stdout, format!("berth_id1_{}\n", "7".repeat(64)));
    assert!(o.stderr.starts_with("Key \"ci\" rotated"), "{}", o.stderr);
    f.conf_ok(&["key", "revoke", "ci"]).await;
    let o = f.run_with(&["key", "show", "ci"], b"", false).await;
    assert_eq!(o.stderr, "Error: key \"ci\" not found\n");
    let reqs = f.requests_since(before);
    assert!(
        reqs.iter().all(|r| !r.contains("project=")),
        "keys name no project: {reqs:?}"
    );

    // monitor prints each event, then exits with an error when the stream ends.
    let o = f
        .run_with(&["monitor", "--project", "team-a"], b"", false)
        .await;
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stdout,
        "2026-11-29T22:00:00Z team-a instance-created /1.0/instances/w1 key=ci\n\
         2026-11-29T22:00:01Z team-a operation-success /1.0/operations/op9 \"Creating instance\"\n"
    );
    assert_eq!(
        o.stderr,
        "Error: the server of remote \"r\" closed the event stream: controller shutting down\n"
    );
    let o = f
        .run_with(
            &[
                "monitor",
                "--type",
                "operation",
                "--all-projects",
                "-f",
                "json",
            ],
            b"",
            false,
        )
        .await;
    assert_eq!(o.stdout.lines().count(), 1, "{}", o.stdout);
    let e: Event = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(e.kind, "operation");
    let reqs = f.requests_since(before);
    assert!(
        reqs.iter().any(|r| r == "GET /1.0/events?project=team-a"),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r == "GET /1.0/events?type=operation&all-projects=true"),
        "{reqs:?}"
    );

    // operation wait and cancel.
    f.ok(&["launch", "abcdef", "w1"]).await;
    let id = f.state.lock().unwrap().ops.keys().next().unwrap().clone();
    assert_eq!(
        f.ok(&["operation", "wait", &id]).await,
        format!("Operation {id} succeeded\n")
    );
    assert_eq!(
        f.ok(&["operation", "wait", &id, "--timeout", "1"]).await,
        format!("Operation {id} succeeded\n")
    );
    let o = f.run(&["operation", "cancel", "nope"]).await;
    assert_eq!(o.code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t73_remote_key_from_stdin_and_pinning() {
    let f = start(&["127.0.0.1"]).await;
    let other = start(&["127.0.0.1"]).await;
    let url = f.url();
    let o = f
        .run_with(
            &[
                "remote",
                "add",
                "r4",
                &url,
                "--key",
                "-",
                "--accept-certificate",
            ],
            format!("{KEY}\n").as_bytes(),
            false,
        )
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.starts_with("Certificate fingerprint: "),
        "{}",
        o.stdout
    );
    let stored = f.conf_dir().join("keys").join("r4.key");
    assert_eq!(
        std::fs::read_to_string(&stored).unwrap(),
        format!("{KEY}\n")
    );
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&stored), 0o600);
    let conf = std::fs::read_to_string(f.conf_dir().join("config.toml")).unwrap();
    assert!(!conf.contains(KEY), "the key is not in the config: {conf}");
    assert!(conf.contains("r4.key"), "{conf}");
    f.conf_ok(&["list", "r4:"]).await;

    // --key takes only "-"; a key the server refuses is not added.
    let o = f
        .run_with(
            &[
                "remote",
                "add",
                "r5",
                &url,
                "--key",
                "secret",
                "--accept-certificate",
            ],
            b"",
            false,
        )
        .await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("--key only takes"), "{}", o.stderr);
    let o = f
        .run_with(
            &[
                "remote",
                "add",
                "r5",
                &url,
                "--key",
                "-",
                "--accept-certificate",
            ],
            b"wrong-key\n",
            false,
        )
        .await;
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        "Error: the server refused the API key: not authorized\n"
    );
    assert!(!f.conf_dir().join("keys").join("r5.key").exists());

    // rename moves the stored key; the default remote follows.
    f.conf_ok(&["remote", "switch", "r4"]).await;
    f.conf_ok(&["remote", "rename", "r4", "r6"]).await;
    assert_eq!(f.conf_ok(&["remote", "get-default"]).await, "r6\n");
    assert!(!stored.exists());
    assert!(f.conf_dir().join("keys").join("r6.key").exists());
    f.conf_ok(&["list"]).await;

    // The server behind the pinned address now has another certificate: refused, and said so.
    let conf_path = f.conf_dir().join("config.toml");
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    std::fs::write(&conf_path, conf.replace(&f.url(), &other.url())).unwrap();
    let before = other.request_count();
    let o = f.run_with(&["list"], b"", false).await;
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.starts_with(&format!(
            "Error: the certificate of remote \"r6\" at {} has changed: its sha256 fingerprint is now ",
            other.url()
        )),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("remove the remote and add it again"),
        "{}",
        o.stderr
    );
    assert_eq!(other.request_count(), before, "nothing was sent");

    f.conf_ok(&[
        "remote",
        "add",
        "r7",
        &url,
        "--key-file",
        f.key.to_str().unwrap(),
        "--accept-certificate",
    ])
    .await;
    f.conf_ok(&["remote", "switch", "r7"]).await;
    f.conf_ok(&["remote", "remove", "r6"]).await;
    assert!(!f.conf_dir().join("keys").join("r6.key").exists());
}

impl Fake {
    /// The JSON bodies sent since the `from`th one, with their method and URI.
    fn bodies_since(&self, from: usize) -> Vec<(String, serde_json::Value)> {
        self.state.lock().unwrap().bodies[from..].to_vec()
    }

    fn body_count(&self) -> usize {
        self.state.lock().unwrap().bodies.len()
    }

    fn add_instance(&self, name: &str, running: bool) {
        self.state
            .lock()
            .unwrap()
            .instances
            .insert(name.into(), instance(name, running, BTreeMap::new()));
    }

    /// Adds remotes "one" (this fake, the default) and "two" (`other`, same CA and key).
    async fn two_remotes(&self, other: SocketAddr) {
        self.add_ca_remote("one").await;
        let key = self.key.to_str().unwrap().to_string();
        let ca = self.ca.to_str().unwrap().to_string();
        let url2 = format!("https://127.0.0.1:{}", other.port());
        self.conf_ok(&[
            "remote",
            "add",
            "two",
            &url2,
            "--key-file",
            &key,
            "--ca-file",
            &ca,
        ])
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_snapshots() {
    let f = start(&["127.0.0.1"]).await;
    f.add_instance("web1", true);
    // No name: the server picks one.
    let from = f.body_count();
    assert_eq!(f.ok(&["snapshot", "web1"]).await, "");
    let bodies = f.bodies_since(from);
    assert_eq!(bodies[0].0, "POST /1.0/instances/web1/snapshots");
    assert_eq!(bodies[0].1["name"], "");
    assert_eq!(bodies[0].1["stateful"], false);
    f.ok(&["snapshot", "web1", "before-upgrade"]).await;
    let o = f.run(&["snapshot", "web1", "snap0"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: snapshot \"web1/snap0\" already exists\n")
    );
    let o = f.run(&["snapshot", "web1", "a/b"]).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("may not contain"), "{}", o.stderr);

    // berth list counts them; berth info lists them as lxc does.
    let csv = f.ok(&["list", "-f", "csv", "-c", "nS"]).await;
    assert_eq!(csv, "web1,2\n");
    let info = f.ok(&["info", "web1"]).await;
    assert!(info.contains("\nSnapshots:\n+"), "{info}");
    assert!(
        info.contains(
            "|      NAME      |       TAKEN AT       | EXPIRES AT |  SIZE   | STATEFUL |"
        ),
        "{info}"
    );
    assert!(
        info.contains(
            "| before-upgrade | 2026/11/30 02:05 UTC |            | 3.00MiB | NO       |"
        ),
        "{info}"
    );

    // Restore: a PUT with "restore"; lxc's `NAME NAME/SNAP` spelling works too.
    let from = f.body_count();
    f.ok(&["restore", "web1", "snap0"]).await;
    f.ok(&["restore", "web1", "web1/snap0"]).await;
    let bodies = f.bodies_since(from);
    assert_eq!(bodies.len(), 2);
    for (req, body) in &bodies {
        assert_eq!(req, "PUT /1.0/instances/web1");
        assert_eq!(body["restore"], "snap0");
    }
    let o = f.run(&["restore", "web1", "nope"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: snapshot \"web1/nope\" not found\n")
    );

    // Rename with move and rename; delete mixes instances and snapshots.
    let from = f.body_count();
    f.ok(&["move", "web1/snap0", "web1/first"]).await;
    f.ok(&["rename", "web1/first", "one"]).await;
    let bodies = f.bodies_since(from);
    assert_eq!(
        bodies[0],
        (
            "POST /1.0/instances/web1/snapshots/snap0".to_string(),
            serde_json::json!({"name": "first"})
        )
    );
    assert_eq!(
        bodies[1],
        (
            "POST /1.0/instances/web1/snapshots/first".to_string(),
            serde_json::json!({"name": "one"})
        )
    );
    let o = f.run(&["move", "web1/one", "web2/one"]).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("stays with its instance"), "{}", o.stderr);
    f.add_instance("old", false);
    let from = f.request_count();
    f.ok(&["delete", "web1/one", "old", "web1/before-upgrade"])
        .await;
    let reqs = f.requests_since(from);
    for r in [
        "DELETE /1.0/instances/web1/snapshots/one",
        "DELETE /1.0/instances/old",
        "DELETE /1.0/instances/web1/snapshots/before-upgrade",
    ] {
        assert!(reqs.contains(&r.to_string()), "{reqs:?}");
    }
    let csv = f.ok(&["list", "-f", "csv", "-c", "nS"]).await;
    assert_eq!(csv, "web1,0\n");
    let info = f.ok(&["info", "web1"]).await;
    assert!(!info.contains("Snapshots:"), "{info}");
    let o = f.run(&["delete", "web1/gone"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: snapshot \"web1/gone\" not found\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t81_copy_and_move() {
    let f = start(&["127.0.0.1"]).await;
    f.add_instance("web1", true);
    f.ok(&["snapshot", "web1", "s1"]).await;
    let from = f.body_count();
    let o = f
        .run(&[
            "copy",
            "web1/s1",
            "web2",
            "--target",
            "node2",
            "-c",
            "user.role=clone",
            "--start",
        ])
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, "");
    // Not a terminal: one plain line per stage, no bar.
    assert_eq!(o.stderr, "Transferring instance: sending\n");
    let (req, body) = &f.bodies_since(from)[0];
    assert_eq!(req, "POST /1.0/instances?target=node2");
    assert_eq!(body["name"], "web2");
    assert_eq!(body["source"]["type"], "copy");
    assert_eq!(body["source"]["source"], "web1/s1");
    assert_eq!(body["source"]["instance_only"], false);
    assert_eq!(body["source"]["refresh"], false);
    assert_eq!(body["config"], serde_json::json!({"user.role": "clone"}));
    assert_eq!(body["start"], true);
    assert!(body.get("profiles").is_none(), "{body}");
    // Polled with a short wait while it runs.
    let polls = f
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.contains("/wait?timeout=1"))
        .count();
    assert_eq!(polls, 3);

    let from = f.body_count();
    let o = f
        .run(&[
            "copy",
            "web1",
            "web3",
            "--instance-only",
            "--no-profiles",
            "-q",
        ])
        .await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    let (_, body) = &f.bodies_since(from)[0];
    assert_eq!(body["source"]["instance_only"], true);
    assert_eq!(body["profiles"], serde_json::json!([]));
    let o = f.run(&["copy", "web1", "web3"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: instance \"web3\" already exists\n")
    );
    let from = f.body_count();
    f.ok(&["copy", "web1", "web3", "--refresh", "-q"]).await;
    assert_eq!(f.bodies_since(from)[0].1["source"]["refresh"], true);
    let o = f.run(&["copy", "nope", "web4"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: instance \"nope\" not found\n")
    );

    // A live move: progress, then the downtime and the passes.
    let from = f.body_count();
    let o = f.run(&["move", "web1", "--target", "node2"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout,
        "Downtime: 312 ms\nPasses: 2 (pre-copy 400.00MiB in 5.2 s, final 2.00MiB in 0.1 s)\n"
    );
    assert_eq!(
        o.stderr,
        "Transferring instance: pre-copy 1\nTransferring instance: pre-copy 2\nTransferring instance: final pass\n"
    );
    assert_eq!(
        f.bodies_since(from)[0],
        (
            "POST /1.0/instances/web1?target=node2".to_string(),
            serde_json::json!({"name": "web1", "migration": true, "live": true})
        )
    );
    assert_eq!(f.state.lock().unwrap().instances["web1"].location, "node2");
    // Move and rename: the move first, then the rename.
    let from = f.body_count();
    let o = f
        .run(&["move", "web1", "web9", "--target", "node3", "--quiet"])
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stderr, "");
    let bodies = f.bodies_since(from);
    assert_eq!(bodies[0].0, "POST /1.0/instances/web1?target=node3");
    assert_eq!(
        bodies[1],
        (
            "POST /1.0/instances/web1".to_string(),
            serde_json::json!({"name": "web9", "migration": false, "live": false})
        )
    );
    let o = f.run(&["move", "web9", "--target", "node9"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: node \"node9\" not found\n")
    );
    // A plain rename prints nothing.
    assert_eq!(f.ok(&["move", "web9", "web1"]).await, "");
    let o = f.run(&["move", "web1", "web1"]).await;
    assert_eq!(o.code, 1);

    // Two remotes: refused with a sentence before any request.
    let (addr2, _state2) = serve(f.acceptor.clone()).await;
    f.two_remotes(addr2).await;
    let from = f.request_count();
    let o = f
        .run_with(&["copy", "one:web1", "two:web1"], b"", false)
        .await;
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        "Error: copying between remotes (\"one\" to \"two\") is not supported: copying within one remote, or publish an image and use `berth image copy`\n"
    );
    let o = f.run_with(&["move", "web1", "two:web1"], b"", false).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("moving between remotes"), "{}", o.stderr);
    assert_eq!(f.request_count(), from);
    // As lxc: no prefix is the default remote ("one" here), so these stay on one remote.
    f.conf_ok(&["copy", "one:web1", "one:web5", "-q"]).await;
    f.conf_ok(&["copy", "one:web1", "web6", "-q"]).await;
    f.conf_ok(&["move", "web6", "one:web7"]).await;
    let o = f.run_with(&["copy", "two:web1", "web8"], b"", false).await;
    assert!(o.stderr.contains("(\"two\" to \"one\")"), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t82_evacuate_and_restore() {
    let f = start(&["127.0.0.1"]).await;
    // stdin is not a terminal: no question (as lxc).
    let from = f.body_count();
    let out = f.ok(&["cluster", "evacuate", "node1"]).await;
    assert_eq!(
        out,
        "web1: moved to node3\ndb (project team-a): left on node1\n"
    );
    assert_eq!(
        f.bodies_since(from)[0],
        (
            "POST /1.0/cluster/members/node1/state".to_string(),
            serde_json::json!({"action": "evacuate", "mode": "move"})
        )
    );
    let out = f
        .ok(&[
            "cluster", "evacuate", "node1", "--action", "stop", "--force",
        ])
        .await;
    assert!(out.starts_with("web1: stopped on node1\n"), "{out}");
    let from = f.body_count();
    let out = f.ok(&["cluster", "restore", "node1"]).await;
    assert!(out.starts_with("web1: returned to node1\n"), "{out}");
    assert_eq!(
        f.bodies_since(from)[0].1,
        serde_json::json!({"action": "restore", "mode": ""})
    );
    // A partial failure: the results, then the server's sentence.
    let o = f.run(&["cluster", "evacuate", "node2"]).await;
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stdout,
        "web1: failed on node2 (no other node can take it)\ndb (project team-a): left on node2\n"
    );
    assert_eq!(
        o.stderr,
        "Error: 1 of 2 instances could not be evacuated; run it again to retry them\n"
    );
    let o = f.run(&["cluster", "evacuate", "node7"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: node \"node7\" not found\n")
    );
    let o = f
        .run(&["cluster", "evacuate", "node1", "--action", "drop"])
        .await;
    assert_eq!(o.code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t83_publish_and_image_properties() {
    let f = start(&["127.0.0.1"]).await;
    f.add_instance("web1", false);
    f.add_instance("live", true);
    let from = f.body_count();
    let out = f
        .ok(&[
            "publish",
            "web1",
            "os=Debian",
            "release=12",
            "--alias",
            "web-img",
            "--public",
        ])
        .await;
    assert!(
        out.starts_with("Instance published with fingerprint: "),
        "{out}"
    );
    let fp = out.trim().rsplit(' ').next().unwrap().to_string();
    let (req, body) = &f.bodies_since(from)[0];
    assert_eq!(req, "POST /1.0/images");
    assert_eq!(body["source"]["type"], "instance");
    assert_eq!(body["source"]["name"], "web1");
    assert_eq!(
        body["aliases"],
        serde_json::json!([{"name": "web-img", "description": ""}])
    );
    assert_eq!(body["public"], true);
    assert_eq!(
        body["properties"],
        serde_json::json!({"os": "Debian", "release": "12"})
    );
    let from = f.body_count();
    f.ok(&["snapshot", "live", "s0"]).await;
    f.ok(&["publish", "live/s0", "--alias", "live-img"]).await;
    let (_, body) = &f.bodies_since(from)[1];
    assert_eq!(body["source"]["type"], "snapshot");
    assert_eq!(body["source"]["name"], "live/s0");
    let o = f.run(&["publish", "live"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (
            1,
            "Error: instance \"live\" is running: stop it or publish a snapshot\n"
        )
    );
    let o = f.run(&["publish", "web1", "bogus"]).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("neither a remote"), "{}", o.stderr);

    // Properties: read, set and unset through PUT with the ETag read.
    assert_eq!(
        f.ok(&["image", "get-property", "web-img", "os"]).await,
        "Debian\n"
    );
    assert_eq!(
        f.ok(&["image", "get-property", "web-img", "nope"]).await,
        "\n"
    );
    let from = f.body_count();
    f.ok(&[
        "image",
        "set-property",
        "web-img",
        "description",
        "Web server",
    ])
    .await;
    let (req, body) = &f.bodies_since(from)[0];
    assert_eq!(req, &format!("PUT /1.0/images/{fp}"));
    assert_eq!(
        body,
        &serde_json::json!({"properties": {"description": "Web server", "os": "Debian",
            "release": "12"}, "public": true})
    );
    assert!(
        f.state
            .lock()
            .unwrap()
            .if_matches
            .last()
            .unwrap()
            .starts_with('"')
    );
    f.ok(&["image", "unset-property", "web-img", "release"])
        .await;
    let o = f
        .run(&["image", "unset-property", "web-img", "release"])
        .await;
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("has no property \"release\""),
        "{}",
        o.stderr
    );
    let show = f.ok(&["image", "show", "web-img"]).await;
    assert!(show.contains("public: true\n"), "{show}");
    assert!(show.contains("last_used_at: ''\n"), "{show}");
    assert!(show.contains("  description: Web server\n"), "{show}");
    assert!(!show.contains("release"), "{show}");
    let info = f.ok(&["image", "info", "web-img"]).await;
    assert!(info.contains("Public: yes\n"), "{info}");
    assert!(info.contains("    Last used: never\n"), "{info}");
    let csv = f.ok(&["image", "list", "-f", "csv"]).await;
    assert!(
        csv.contains(&format!("web-img,{},yes,Web server,", &fp[..12])),
        "{csv}"
    );
    assert!(csv.contains(",no,"), "live-img is not public: {csv}");

    // Edit from stdin (what `image show | edit` gives): only the writable part is sent.
    let edited = show.replace("public: true", "public: false");
    let o = f
        .run_with(&["image", "edit", "web-img"], edited.as_bytes(), true)
        .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let (_, body) = f.bodies_since(f.body_count() - 1).pop().unwrap();
    assert_eq!(
        body,
        serde_json::json!({"properties": {"description": "Web server", "os": "Debian"},
            "public": false})
    );
    // A stale change is refused with a sentence.
    f.state.lock().unwrap().stale_puts = 1;
    let o = f
        .run(&["image", "set-property", "web-img", "os", "Ubuntu"])
        .await;
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("was changed by someone else"),
        "{}",
        o.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t84_image_export_and_copy() {
    let f = start(&["127.0.0.1"]).await;
    let out = f.ok(&["image", "build", "busybox"]).await;
    let fp = out.trim().rsplit(' ').next().unwrap().to_string();
    let expected: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();

    // Into a directory: named by the server's Content-Disposition.
    let dir = f.dir.path().join("exports");
    std::fs::create_dir(&dir).unwrap();
    let out = f
        .ok(&["image", "export", "busybox", dir.to_str().unwrap()])
        .await;
    let file = dir.join(format!("{fp}.tar.gz"));
    assert_eq!(
        out,
        format!("Image exported successfully to {}\n", file.display())
    );
    assert_eq!(std::fs::read(&file).unwrap(), expected);
    // To a file name.
    let named = f.dir.path().join("bb.tar.gz");
    f.ok(&["image", "export", &fp[..12], named.to_str().unwrap()])
        .await;
    assert_eq!(std::fs::read(&named).unwrap(), expected);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no .partial left"
    );
    let o = f.run(&["image", "export", "nope"]).await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "Error: image \"nope\" not found\n")
    );

    // Copy to another remote: streamed through the import path, aliases and --public.
    let (addr2, state2) = serve(f.acceptor.clone()).await;
    f.two_remotes(addr2).await;
    let out = f
        .conf_ok(&[
            "image",
            "copy",
            "one:busybox",
            "two:",
            "--alias",
            "bb",
            "--alias",
            "busybox",
            "--public",
        ])
        .await;
    assert!(
        out.starts_with("Image copied successfully with fingerprint: "),
        "{out}"
    );
    {
        let st = state2.lock().unwrap();
        let (h, len) = &st.imports[0];
        assert_eq!(*len, 3 << 20);
        assert_eq!(h["x-berth-image-format"], "unified");
        assert_eq!(h["x-berth-aliases"], "bb,busybox");
        assert_eq!(h["content-length"], (3u32 << 20).to_string());
        assert!(st.images[0].public, "--public is set after the import");
        assert_eq!(
            st.requests
                .iter()
                .filter(|r| r.starts_with("PUT /1.0/images/"))
                .count(),
            1
        );
    }
    let o = f
        .run_with(&["image", "copy", "one:busybox", "one:"], b"", false)
        .await;
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("already on remote \"one\""),
        "{}",
        o.stderr
    );
    let o = f
        .run_with(&["image", "copy", "one:busybox", "nowhere:"], b"", false)
        .await;
    assert_eq!(o.code, 1);
}
