//! `/1.0/instances/{name}/snapshots`: list, take, show, rename, delete; and restore (`PUT
//! /1.0/instances/{name}` with `restore`).
//!
//! Every change is an instance action ([`crate::state::Action`]) carried out by the leader's
//! reconciler on the instance's node, with an operation to wait for (202). The replicated
//! state checks each action when it is committed (a snapshot that exists, or is missing, or
//! an instance busy with another action, is refused there too), so two racing requests cannot
//! both pass. Snapshots belong to their instance: a key that cannot see the instance gets 404,
//! a viewer key sees snapshots and changes none (403).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use berth_proto::api::{self, InstanceSnapshotPost, InstanceSnapshotsPost};
use berth_proto::v1;
use http::StatusCode;
use serde::Deserialize;
use tracing::{debug, info};

use super::instances::{Found, check_if_match, guarded, instance_operation, lookup};
use super::operations::{accepted, sync};
use super::{ApiError, JsonBody, Scope, SharedState};
use crate::clock;
use crate::schedule;
use crate::state::{
    Action, Command, Instance, Node, NodeStatus, ObjectKey, PendingAction, Snapshot,
};

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub recursion: u8,
}

/// The API shape of a stored snapshot with `size` bytes (0 when unknown).
pub fn view(s: &Snapshot, size: u64) -> api::InstanceSnapshot {
    api::InstanceSnapshot {
        name: s.name.clone(),
        created_at: s.created_at.clone(),
        expires_at: s.expires_at.clone(),
        size,
        stateful: false,
        scheduled: s.scheduled,
    }
}

/// An instance's snapshots, oldest first (ties by name).
pub fn ordered(i: &Instance) -> Vec<&Snapshot> {
    let mut all: Vec<&Snapshot> = i.snapshots.values().collect();
    all.sort_by(|a, b| (&a.created_at, &a.name).cmp(&(&b.created_at, &b.name)));
    all
}

/// An instance's snapshots as [`api::Instance::snapshots`] shows them (sizes unknown: 0).
pub fn views(i: &Instance) -> Vec<api::InstanceSnapshot> {
    ordered(i).into_iter().map(|s| view(s, 0)).collect()
}

/// The URL of snapshot `snap` of the instance `name` (its own name) of `project`.
fn snapshot_url(project: &str, name: &str, snap: &str) -> String {
    format!(
        "/1.0/instances/{name}/snapshots/{snap}{}",
        super::instances::project_suffix(project)
    )
}

/// Sizes of the instance's snapshots by name, from its node; empty when the node is offline
/// or does not answer (the sizes are then shown as 0).
async fn sizes(state: &SharedState, i: &Instance, n: &Node) -> HashMap<String, u64> {
    if n.status == NodeStatus::Offline || i.snapshots.is_empty() {
        return HashMap::new();
    }
    let client = state.agents.client(n);
    let listed = match client {
        Ok(mut c) => c
            .list_snapshots(crate::agents::short(v1::InstanceRef {
                name: i.name.clone(),
            }))
            .await
            .map_err(|e| e.message().to_string()),
        Err(e) => Err(e.to_string()),
    };
    match listed {
        Ok(r) => r
            .into_inner()
            .snapshots
            .into_iter()
            .map(|s| (s.name, s.size_bytes))
            .collect(),
        Err(e) => {
            debug!(instance = %i.name, node = %n.name, error = %e, "snapshot sizes unavailable");
            HashMap::new()
        }
    }
}

/// 404 unless the instance has snapshot `snap` (also for a name no snapshot can have).
fn existing<'a>(f: &'a Found, name: &str, snap: &str) -> Result<&'a Snapshot, ApiError> {
    api::names::validate_snapshot_name(snap)
        .ok()
        .and_then(|()| f.instance.snapshots.get(snap))
        .ok_or_else(|| ApiError::not_found(format!("instance {name:?} has no snapshot {snap:?}")))
}

/// Refuses a change while the instance has an action in flight (409, naming its operation)
/// or while its node is offline (503).
fn ensure_at_rest(f: &Found, name: &str) -> Result<(), ApiError> {
    if let Some(p) = &f.instance.pending {
        return Err(ApiError::conflict(format!(
            "instance {name:?} is busy with operation {}; wait for it to end",
            p.op
        )));
    }
    if f.node.status == NodeStatus::Offline {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {} is offline; the snapshots of instance {name:?} cannot be changed until it returns",
                f.node.name
            ),
        ));
    }
    Ok(())
}

/// Commits `action` for the instance with a new operation (`description`, naming the
/// snapshot among its resources), guarded by `etag` when given; answers 202.
async fn request(
    state: &SharedState,
    scope: &Scope,
    f: &Found,
    name: &str,
    description: &str,
    action: Action,
    etag: Option<String>,
) -> Result<Response, ApiError> {
    let snap = match &action {
        Action::Snapshot { name, .. } | Action::DeleteSnapshot { name } => name.as_str(),
        Action::RenameSnapshot { to, .. } => to.as_str(),
        Action::Restore { snapshot } => snapshot.as_str(),
        _ => "",
    };
    let mut op = instance_operation(state, scope, "task", description, name);
    op.resources.insert(
        "instances_snapshots".into(),
        vec![snapshot_url(&scope.project, name, snap)],
    );
    let key = f.instance.name.clone();
    let command = Command::SetInstanceAction {
        name: key.clone(),
        pending: PendingAction {
            op: op.id.clone(),
            action: action.clone(),
            since: op.created_at.clone(),
        },
        desired: None,
        operation: op.clone(),
        now: clock::now(),
    };
    state
        .cp
        .write(scope.by(guarded(command, ObjectKey::Instance(key.clone()), etag)))
        .await?;
    info!(instance = %key, snapshot = snap, action = action.describe(), op = %op.id, "snapshot action accepted");
    Ok(accepted(&op))
}

/// `GET /1.0/instances/{name}/snapshots?recursion=0|1`: URLs, or snapshot objects with the
/// sizes the node reports (0 while it is offline), oldest first.
pub async fn list(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let f = lookup(&state, &scope, &name).await?;
    if q.recursion == 0 {
        let urls: Vec<String> = ordered(&f.instance)
            .into_iter()
            .map(|s| snapshot_url(&scope.project, &name, &s.name))
            .collect();
        return Ok(sync(urls));
    }
    let sizes = sizes(&state, &f.instance, &f.node).await;
    let shown: Vec<api::InstanceSnapshot> = ordered(&f.instance)
        .into_iter()
        .map(|s| view(s, sizes.get(&s.name).copied().unwrap_or(0)))
        .collect();
    Ok(sync(shown))
}

/// The name and expiry time a new snapshot gets: the request's, or from the instance's
/// effective `snapshots.pattern` and `snapshots.expiry`. 400 for a bad name or time, 409 for
/// a name that is taken.
fn name_and_expiry(
    f: &Found,
    name: &str,
    body: &InstanceSnapshotsPost,
    now: i64,
) -> Result<(String, String), ApiError> {
    let unusable = |e: berth_proto::api::config::ConfigError| {
        ApiError::bad_request(format!("instance {name:?} cannot be snapshotted: {e}"))
    };
    let snap = if body.name.is_empty() {
        schedule::new_snapshot(&f.expanded, &f.instance.snapshots, now)
            .map_err(unusable)?
            .0
    } else {
        api::names::validate_snapshot_name(&body.name).map_err(ApiError::bad_request)?;
        if f.instance.snapshots.contains_key(&body.name) {
            return Err(ApiError::conflict(format!(
                "instance {name:?} already has a snapshot {:?}",
                body.name
            )));
        }
        body.name.clone()
    };
    // LXD's clients send Go's zero time for "not given".
    let given = !body.expires_at.is_empty() && !body.expires_at.starts_with("0001-01-01T00:00:00");
    let expires_at = if !given {
        schedule::expiry_for(&f.expanded, now).map_err(unusable)?
    } else {
        let at = schedule::unix_secs(&body.expires_at).ok_or_else(|| {
            ApiError::bad_request(format!(
                "expires_at {:?} is not an RFC 3339 time such as 2026-12-31T00:00:00Z",
                body.expires_at
            ))
        })?;
        if at <= now {
            return Err(ApiError::bad_request(format!(
                "expires_at {:?} is not in the future",
                body.expires_at
            )));
        }
        clock::format_unix(at)
    };
    Ok((snap, expires_at))
}

/// `POST /1.0/instances/{name}/snapshots`: takes a snapshot of the running or stopped
/// instance. Without a name it is named by `snapshots.pattern` (`snap%d`: the lowest free
/// number); without `expires_at` it expires after `snapshots.expiry` (if set).
pub async fn create(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<InstanceSnapshotsPost>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    if body.stateful {
        return Err(ApiError::bad_request(
            "stateful snapshots are not supported: snapshots hold the filesystem, not the memory",
        ));
    }
    let f = lookup(&state, &scope, &name).await?;
    let now = schedule::unix_secs(&clock::now()).unwrap_or_default();
    let (snap, expires_at) = name_and_expiry(&f, &name, &body, now)?;
    ensure_at_rest(&f, &name)?;
    let action = Action::Snapshot {
        name: snap,
        expires_at,
        scheduled: false,
        due: String::new(),
    };
    request(
        &state,
        &scope,
        &f,
        &name,
        "Snapshotting instance",
        action,
        None,
    )
    .await
}

/// `GET /1.0/instances/{name}/snapshots/{snapshot}`.
pub async fn get_one(
    State(state): State<SharedState>,
    scope: Scope,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let f = lookup(&state, &scope, &name).await?;
    let s = existing(&f, &name, &snapshot)?;
    let sizes = sizes(&state, &f.instance, &f.node).await;
    Ok(sync(view(s, sizes.get(&s.name).copied().unwrap_or(0))))
}

/// `POST /1.0/instances/{name}/snapshots/{snapshot}`: rename.
pub async fn rename(
    State(state): State<SharedState>,
    scope: Scope,
    Path((name, snapshot)): Path<(String, String)>,
    JsonBody(body): JsonBody<InstanceSnapshotPost>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let f = lookup(&state, &scope, &name).await?;
    existing(&f, &name, &snapshot)?;
    api::names::validate_snapshot_name(&body.name).map_err(ApiError::bad_request)?;
    if body.name == snapshot {
        return Err(ApiError::bad_request(
            "the new snapshot name is the current name",
        ));
    }
    if f.instance.snapshots.contains_key(&body.name) {
        return Err(ApiError::conflict(format!(
            "instance {name:?} already has a snapshot {:?}",
            body.name
        )));
    }
    ensure_at_rest(&f, &name)?;
    let action = Action::RenameSnapshot {
        from: snapshot,
        to: body.name.clone(),
    };
    request(&state, &scope, &f, &name, "Renaming snapshot", action, None).await
}

/// `DELETE /1.0/instances/{name}/snapshots/{snapshot}`.
pub async fn delete(
    State(state): State<SharedState>,
    scope: Scope,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let f = lookup(&state, &scope, &name).await?;
    existing(&f, &name, &snapshot)?;
    ensure_at_rest(&f, &name)?;
    let action = Action::DeleteSnapshot {
        name: snapshot.clone(),
    };
    request(&state, &scope, &f, &name, "Deleting snapshot", action, None).await
}

/// `PUT /1.0/instances/{name}` with `{"restore": SNAPSHOT}`: `wanted` is the `If-Match` ETag.
/// A running instance is stopped, restored and started again.
pub async fn restore(
    state: SharedState,
    scope: Scope,
    name: String,
    snapshot: String,
    wanted: Option<String>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let f = lookup(&state, &scope, &name).await?;
    check_if_match(&format!("instance {name:?}"), wanted.as_deref(), &f.etag)?;
    existing(&f, &name, &snapshot)?;
    ensure_at_rest(&f, &name)?;
    let action = Action::Restore {
        snapshot: snapshot.clone(),
    };
    request(
        &state,
        &scope,
        &f,
        &name,
        "Restoring snapshot",
        action,
        wanted,
    )
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod api_tests {
    use serde_json::json;

    use crate::api::projects::testkit::*;
    use crate::clock;
    use crate::state::{Action, Command, Instance, NodeStatus};

    fn pending(model: &crate::state::State, key: &str) -> Action {
        model.instances[key].pending.clone().unwrap().action
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn take_rename_restore_delete_commit_the_right_actions() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        api.add_instance("default", "web", &[]).await;

        let (status, body) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/instances/web/snapshots",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            body["metadata"]["resources"]["instances_snapshots"][0],
            "/1.0/instances/web/snapshots/snap0"
        );
        let m = api.model().await;
        assert_eq!(
            pending(&m, "web"),
            Action::Snapshot {
                name: "snap0".into(),
                expires_at: String::new(),
                scheduled: false,
                due: String::new()
            }
        );
        // Busy: a second change waits for the first.
        let (status, body) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/instances/web/snapshots",
                Some(json!({"name": "x"})),
            )
            .await;
        assert_eq!(status, 409, "{body}");
        assert!(body["error"].as_str().unwrap().contains("busy"), "{body}");
        api.finish_pending("web").await;
        assert!(
            api.model().await.instances["web"]
                .snapshots
                .contains_key("snap0")
        );

        // The next default name is the lowest free number.
        let (status, _) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/instances/web/snapshots",
                Some(json!({"name": ""})),
            )
            .await;
        assert_eq!(status, 202);
        assert!(
            matches!(pending(&api.model().await, "web"), Action::Snapshot { name, .. } if name == "snap1")
        );
        api.finish_pending("web").await;

        // Taken name, bad name, stateful, bad expiry.
        for (body, code, says) in [
            (json!({"name": "snap0"}), 409, "already has a snapshot"),
            (json!({"name": "a/b"}), 400, "'/'"),
            (json!({"name": ".."}), 400, "snapshot name"),
            (json!({"stateful": true}), 400, "stateful"),
            (json!({"expires_at": "tomorrow"}), 400, "RFC 3339"),
            (json!({"expires_at": "2020-01-01T00:00:00Z"}), 400, "future"),
            (
                json!({"name": "snap0", "expires_at": "0001-01-01T00:00:00Z"}),
                409,
                "already",
            ),
        ] {
            let (status, answer) = api
                .call(
                    ADMIN,
                    "POST",
                    "/1.0/instances/web/snapshots",
                    Some(body.clone()),
                )
                .await;
            assert_eq!(status, code, "{body}: {answer}");
            assert!(
                answer["error"].as_str().unwrap().contains(says),
                "{body}: {answer}"
            );
        }
        // An explicit expiry is kept (normalised to UTC).
        let (status, _) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/instances/web/snapshots",
                Some(json!({"name": "keep", "expires_at": "2099-01-01T01:00:00+01:00"})),
            )
            .await;
        assert_eq!(status, 202);
        assert!(matches!(pending(&api.model().await, "web"),
            Action::Snapshot { expires_at, .. } if expires_at == "2099-01-01T00:00:00Z"));
        api.finish_pending("web").await;

        // Rename.
        let (status, body) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/instances/web/snapshots/snap1",
                Some(json!({"name": "before-upgrade"})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            pending(&api.model().await, "web"),
            Action::RenameSnapshot {
                from: "snap1".into(),
                to: "before-upgrade".into()
            }
        );
        api.finish_pending("web").await;
        for (path, body, code) in [
            (
                "/1.0/instances/web/snapshots/nope",
                json!({"name": "x"}),
                404,
            ),
            (
                "/1.0/instances/web/snapshots/snap0",
                json!({"name": "keep"}),
                409,
            ),
            (
                "/1.0/instances/web/snapshots/snap0",
                json!({"name": "snap0"}),
                400,
            ),
            (
                "/1.0/instances/web/snapshots/snap0",
                json!({"name": "a b"}),
                400,
            ),
        ] {
            let (status, answer) = api.call(ADMIN, "POST", path, Some(body)).await;
            assert_eq!(status, code, "{path}: {answer}");
        }

        // Restore, through PUT on the instance.
        let (status, body) = api
            .call(
                ADMIN,
                "PUT",
                "/1.0/instances/web",
                Some(json!({"restore": "before-upgrade"})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            pending(&api.model().await, "web"),
            Action::Restore {
                snapshot: "before-upgrade".into()
            }
        );
        api.finish_pending("web").await;
        let (status, body) = api
            .call(
                ADMIN,
                "PUT",
                "/1.0/instances/web",
                Some(json!({"restore": "snap9"})),
            )
            .await;
        assert_eq!(status, 404, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("has no snapshot \"snap9\""),
            "{body}"
        );
        // A stale If-Match is refused.
        let a = api
            .send(
                ADMIN,
                "PUT",
                "/1.0/instances/web",
                Some(json!({"restore": "snap0"})),
                &[("If-Match", "\"stale\"")],
            )
            .await;
        assert_eq!(a.status, 412, "{}", a.body);

        // Delete.
        let (status, _) = api
            .call(ADMIN, "DELETE", "/1.0/instances/web/snapshots/nope", None)
            .await;
        assert_eq!(status, 404);
        let (status, body) = api
            .call(ADMIN, "DELETE", "/1.0/instances/web/snapshots/snap0", None)
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            pending(&api.model().await, "web"),
            Action::DeleteSnapshot {
                name: "snap0".into()
            }
        );
        api.finish_pending("web").await;

        // Reading: the node is made offline so that no agent is asked for sizes (0 then).
        api.cp
            .write(Command::SetNodeStatus {
                name: "n1".into(),
                status: NodeStatus::Offline,
            })
            .await
            .unwrap();
        let (status, body) = api
            .call(ADMIN, "GET", "/1.0/instances/web/snapshots", None)
            .await;
        assert_eq!(status, 200, "{body}");
        let urls: Vec<&str> = body["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(urls.len(), 2, "{body}");
        assert!(urls.contains(&"/1.0/instances/web/snapshots/before-upgrade"));
        assert!(urls.contains(&"/1.0/instances/web/snapshots/keep"));
        let (status, body) = api
            .call(
                ADMIN,
                "GET",
                "/1.0/instances/web/snapshots?recursion=1",
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["metadata"][0]["size"], 0);
        assert_eq!(body["metadata"][0]["stateful"], false);
        let (status, body) = api
            .call(ADMIN, "GET", "/1.0/instances/web/snapshots/keep", None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["metadata"]["expires_at"], "2099-01-01T00:00:00Z");
        let (status, _) = api
            .call(ADMIN, "GET", "/1.0/instances/web/snapshots/snap0", None)
            .await;
        assert_eq!(status, 404);
        let (_, body) = api.call(ADMIN, "GET", "/1.0/instances/web", None).await;
        assert_eq!(
            body["metadata"]["snapshots"].as_array().unwrap().len(),
            2,
            "{body}"
        );
        // Changes wait for the node.
        let (status, _) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/instances/web/snapshots",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 503);
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pattern_expiry_and_projects() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        api.add_instance(
            "a",
            "db",
            &[
                ("snapshots.pattern", "nightly-%d"),
                ("snapshots.expiry", "2d"),
            ],
        )
        .await;
        // Other projects do not see it; viewers see it and change nothing.
        for path in [
            "/1.0/instances/db/snapshots",
            "/1.0/instances/db/snapshots/nightly-0",
        ] {
            let (status, _) = api.call(MEMBER_B, "GET", path, None).await;
            assert_eq!(status, 404, "{path}");
        }
        let (status, _) = api
            .call(
                MEMBER_B,
                "POST",
                "/1.0/instances/db/snapshots",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 404);
        let (status, _) = api
            .call(
                VIEWER_A,
                "POST",
                "/1.0/instances/db/snapshots",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 403);
        let (status, _) = api
            .call(VIEWER_A, "GET", "/1.0/instances/db/snapshots", None)
            .await;
        assert_eq!(status, 200);

        let before = crate::schedule::unix_secs(&clock::now()).unwrap();
        let (status, body) = api
            .call(
                MEMBER_A,
                "POST",
                "/1.0/instances/db/snapshots",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            body["metadata"]["resources"]["instances_snapshots"][0],
            "/1.0/instances/db/snapshots/nightly-0?project=a"
        );
        let Action::Snapshot {
            name, expires_at, ..
        } = pending(&api.model().await, "a_db")
        else {
            panic!("not a snapshot");
        };
        assert_eq!(name, "nightly-0");
        let at = crate::schedule::unix_secs(&expires_at).unwrap();
        assert!(
            (before + 2 * 86_400..=before + 2 * 86_400 + 5).contains(&at),
            "{expires_at}"
        );
        api.finish_pending("a_db").await;
        let (status, _) = api
            .call(
                VIEWER_A,
                "GET",
                "/1.0/instances/db/snapshots/nightly-0",
                None,
            )
            .await;
        // The node is online but unreachable here: only the size is missing.
        assert_eq!(status, 200);
        for (method, path, body) in [
            ("DELETE", "/1.0/instances/db/snapshots/nightly-0", None),
            (
                "POST",
                "/1.0/instances/db/snapshots/nightly-0",
                Some(json!({"name": "x"})),
            ),
            (
                "PUT",
                "/1.0/instances/db",
                Some(json!({"restore": "nightly-0"})),
            ),
        ] {
            let (status, answer) = api.call(VIEWER_A, method, path, body.clone()).await;
            assert_eq!(status, 403, "{method} {path}: {answer}");
            let (status, answer) = api.call(MEMBER_B, method, path, body).await;
            assert!(status == 404 || status == 403, "{method} {path}: {answer}");
        }
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leader_pass_takes_due_snapshots_and_deletes_expired_ones() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        let state = crate::api::AppState::for_test(
            api.cp.clone(),
            crate::tls::ClusterCa::generate("test").unwrap(),
        );
        let config = [
            ("snapshots.schedule", "* * * * *"),
            ("snapshots.schedule.stopped", "true"),
            ("snapshots.expiry", "1w"),
        ];
        api.cp
            .write(Command::CreateInstance {
                instance: Instance {
                    name: "a_old".into(),
                    project: "a".into(),
                    node: "n1".into(),
                    image: "img".into(),
                    config: config
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    created_at: "2026-01-01T00:00:00Z".into(),
                    ..Default::default()
                },
                operation: None,
            })
            .await
            .unwrap();
        // Without snapshots.schedule.stopped, a stopped instance is left alone.
        api.add_instance("a", "idle", &[("snapshots.schedule", "* * * * *")])
            .await;
        crate::schedule::pass(&state).await;
        let m = api.model().await;
        assert!(m.instances["a_idle"].pending.is_none());
        let p = m.instances["a_old"].pending.clone().unwrap();
        let Action::Snapshot {
            name,
            expires_at,
            scheduled,
            due,
        } = p.action.clone()
        else {
            panic!("not a snapshot: {:?}", p.action);
        };
        assert_eq!(name, "snap0");
        assert!(scheduled);
        assert!(!expires_at.is_empty());
        // The latest due time, on a whole minute, not in the future.
        assert!(due.ends_with(":00Z") && due <= clock::now(), "{due}");
        let op = &m.operations[&p.op];
        assert_eq!(op.project, "a");
        api.finish_pending("a_old").await;
        let m = api.model().await;
        assert_eq!(m.instances["a_old"].last_scheduled_snapshot, due);
        assert!(m.instances["a_old"].snapshots["snap0"].scheduled);
        // Taken for this minute: nothing more until the next one.
        if clock::now() < crate::clock::format_unix(crate::schedule::unix_secs(&due).unwrap() + 55)
        {
            crate::schedule::pass(&state).await;
            assert!(api.model().await.instances["a_old"].pending.is_none());
        }

        // An expired snapshot goes before anything else.
        let op =
            crate::api::operations::new_operation_in(&state, "a", "task", "t", Default::default());
        api.cp
            .write(Command::SetInstanceAction {
                name: "a_old".into(),
                pending: crate::state::PendingAction {
                    op: op.id.clone(),
                    action: Action::Snapshot {
                        name: "gone".into(),
                        expires_at: "2026-01-02T00:00:00Z".into(),
                        scheduled: false,
                        due: String::new(),
                    },
                    since: clock::now(),
                },
                desired: None,
                operation: op,
                now: clock::now(),
            })
            .await
            .unwrap();
        api.finish_pending("a_old").await;
        crate::schedule::pass(&state).await;
        assert_eq!(
            pending(&api.model().await, "a_old"),
            Action::DeleteSnapshot {
                name: "gone".into()
            }
        );
        api.cp.shutdown().await;
    }
}
