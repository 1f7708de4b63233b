//! `/1.0/profiles?project=P`: config shared by the instances of a project, layered as LXD
//! does (an instance runs with its profiles' config in the order it lists them, then its own).
//!
//! A change to a profile is committed first (quotas and restrictions checked against every
//! instance using it, atomically), then pushed to those instances' agents one at a time, each
//! under its instance's lock, so that running instances get new limits at once. An instance
//! whose node is offline gets its config when it next starts (the reconciler sends the
//! effective config before every create and start).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use berth_proto::api::tenancy::{ProfilePatch, ProfilePut, ProfilesPost, RenamePost};
use berth_proto::api::{self, config};
use http::HeaderMap;
use serde::Deserialize;
use tracing::{info, warn};

use super::instances::{
    check_if_match, guarded, if_match, instance_url, project_suffix, push_effective_config,
    sync_with_etag,
};
use super::operations::sync;
use super::{ApiError, JsonBody, Scope, SharedState};
use crate::raft::WriteError;
use crate::state::{
    ApplyErrorKind, Command, DEFAULT_PROFILE, DEFAULT_PROJECT, ObjectKey, Profile, State as Model,
    split_scoped_name,
};

/// How often a PATCH without `If-Match` is tried again when another change to the same
/// profile lands between its read and its write.
const PATCH_ATTEMPTS: usize = 5;

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    recursion: u8,
    /// An LXD-style filter on the profiles as the API shows them.
    #[serde(default)]
    filter: String,
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("profile {name:?} not found"))
}

/// The state key of profile `name` of the scope's project; 404 for a name that is not a
/// profile name (so that `a_b` never reaches profile `b` of project `a`).
fn profile_key(scope: &Scope, name: &str) -> Result<String, ApiError> {
    api::names::validate_profile_name(name).map_err(|_| not_found(name))?;
    Ok(scope.key(name))
}

/// A profile of `project` by short name. The default project's `default` profile exists
/// even in a state written before profiles were stored (then empty).
fn get_profile(model: &Model, project: &str, name: &str) -> Option<Profile> {
    let key = crate::state::scoped_name(project, name);
    match model.profiles.get(&key) {
        Some(p) if p.project == project => Some(p.clone()),
        Some(_) => None,
        None if project == DEFAULT_PROJECT && name == DEFAULT_PROFILE => Some(Profile {
            name: key,
            project: project.to_string(),
            description: "Default profile".into(),
            config: BTreeMap::new(),
        }),
        None => None,
    }
}

/// The profiles of `project`, by name.
fn project_profiles(model: &Model, project: &str) -> Vec<Profile> {
    let mut out: Vec<Profile> = model
        .profiles
        .values()
        .filter(|p| p.project == project)
        .cloned()
        .collect();
    if !out.iter().any(|p| p.short_name() == DEFAULT_PROFILE)
        && let Some(d) = get_profile(model, project, DEFAULT_PROFILE)
    {
        out.push(d);
    }
    out.sort_by(|a, b| a.short_name().cmp(b.short_name()));
    out
}

/// The URL of a profile as the API names it.
fn profile_url(p: &Profile) -> String {
    format!(
        "/1.0/profiles/{}{}",
        p.short_name(),
        project_suffix(&p.project)
    )
}

/// The profile in its API shape, with the URLs of the instances using it.
pub fn to_api(model: &Model, p: &Profile) -> api::tenancy::Profile {
    let short = p.short_name();
    api::tenancy::Profile {
        name: short.to_string(),
        description: p.description.clone(),
        config: p.config.clone(),
        devices: BTreeMap::new(),
        project: p.project.clone(),
        used_by: model
            .instances
            .values()
            .filter(|i| i.project == p.project && i.profiles.iter().any(|n| n == short))
            .map(instance_url)
            .collect(),
    }
}

/// Checks a profile's config: instance keys only, and none of the server's own (`image.*`
/// comes from an instance's image, `volatile.*` is internal).
pub fn validate_profile_config(config: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if let Some(k) = config
        .keys()
        .find(|k| k.starts_with("image.") || k.starts_with("volatile."))
    {
        return Err(ApiError::bad_request(format!(
            "config key {k} is set by the server and cannot be set in a profile"
        )));
    }
    config::validate(config).map_err(|e| ApiError::bad_request(e.0))
}

/// 403 when `restricted` (the project is `restricted=true`) and the profile sets
/// `security.privileged` or `security.nesting` true: no instance there could use it.
fn check_restricted(
    restricted: bool,
    project: &str,
    config: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    if !restricted {
        return Ok(());
    }
    for key in ["security.privileged", "security.nesting"] {
        if config
            .get(key)
            .is_some_and(|v| config::parse_bool(key, v).unwrap_or(false))
        {
            return Err(ApiError::new(
                http::StatusCode::FORBIDDEN,
                format!("project {project:?} is restricted: a profile cannot set {key}=true"),
            ));
        }
    }
    Ok(())
}

fn no_devices(devices: &BTreeMap<String, BTreeMap<String, String>>) -> Result<(), ApiError> {
    if devices.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "profile devices are not supported; use config keys",
        ))
    }
}

/// `GET /1.0/profiles?recursion=0|1`: the profiles of the scope's project.
pub async fn list(
    State(state): State<SharedState>,
    scope: Scope,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let project = scope.project.clone();
    let filter = super::instances::parse_filter(&q.filter)?;
    let shown = |s: &Model| -> Vec<(String, api::tenancy::Profile)> {
        project_profiles(s, &project)
            .iter()
            .map(|p| (profile_url(p), to_api(s, p)))
            .filter(|(_, a)| super::instances::passes(filter.as_ref(), a))
            .collect()
    };
    if q.recursion == 0 {
        let urls: Vec<String> = state
            .cp
            .read(|s| shown(s).into_iter().map(|(url, _)| url).collect())
            .await?;
        return Ok(sync(urls));
    }
    let profiles: Vec<api::tenancy::Profile> = state
        .cp
        .read(|s| shown(s).into_iter().map(|(_, p)| p).collect())
        .await?;
    Ok(sync(profiles))
}

/// `POST /1.0/profiles`: a new profile in the scope's project.
pub async fn create(
    State(state): State<SharedState>,
    scope: Scope,
    JsonBody(body): JsonBody<ProfilesPost>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    api::names::validate_profile_name(&body.name).map_err(ApiError::bad_request)?;
    no_devices(&body.devices)?;
    validate_profile_config(&body.config)?;
    let profile = Profile {
        name: scope.key(&body.name),
        project: scope.project.clone(),
        description: body.description,
        config: body.config,
    };
    let key = profile.name.clone();
    let restricted = state
        .cp
        .read(|s| crate::state::project_restricted(s.projects.get(&scope.project)))
        .await?;
    check_restricted(restricted, &scope.project, &profile.config)?;
    state
        .cp
        .write(scope.by(Command::CreateProfile { profile }))
        .await?;
    info!(profile = %key, project = %scope.project, "profile created");
    Ok(sync(serde_json::Value::Null))
}

/// `GET /1.0/profiles/{name}`: the profile, with an `ETag` header for `If-Match`.
pub async fn get_one(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = profile_key(&scope, &name)?;
    let found = state
        .cp
        .read(|s| {
            get_profile(s, &scope.project, &name).map(|p| {
                (
                    to_api(s, &p),
                    s.etag(&ObjectKey::Profile(key.clone())).unwrap_or_default(),
                )
            })
        })
        .await?;
    let (profile, etag) = found.ok_or_else(|| not_found(&name))?;
    Ok(sync_with_etag(profile, &etag))
}

/// Instances that failed to take a profile's new config on their nodes, by name, and why.
type NotUpdated = BTreeMap<String, String>;

/// Commits a new description and config for a profile, computed by `build` from the current
/// one, guarded by the client's `If-Match` or else by the ETag read here (tried again when
/// another change landed in between); then pushes the new effective config to every
/// instance of the project using the profile.
async fn update<F>(
    state: SharedState,
    scope: Scope,
    name: String,
    wanted: Option<String>,
    build: F,
) -> Result<Response, ApiError>
where
    F: Fn(&Profile) -> Result<(String, BTreeMap<String, String>), ApiError>,
{
    scope.require_write()?;
    let key = profile_key(&scope, &name)?;
    let what = format!("profile {name:?}");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let found = state
            .cp
            .read(|s| {
                s.profiles
                    .get(&key)
                    .filter(|p| p.project == scope.project)
                    .map(|p| {
                        (
                            p.clone(),
                            s.etag(&ObjectKey::Profile(key.clone())).unwrap_or_default(),
                            crate::state::project_restricted(s.projects.get(&scope.project)),
                        )
                    })
            })
            .await?;
        let (current, etag, restricted) = found.ok_or_else(|| not_found(&name))?;
        check_if_match(&what, wanted.as_deref(), &etag)?;
        let (description, config) = build(&current)?;
        validate_profile_config(&config)?;
        check_restricted(restricted, &scope.project, &config)?;
        let command = guarded(
            Command::UpdateProfile {
                name: key.clone(),
                description,
                config,
            },
            ObjectKey::Profile(key.clone()),
            Some(wanted.clone().unwrap_or(etag)),
        );
        match state.cp.write(scope.by(command)).await {
            Ok(_) => break,
            Err(WriteError::Rejected(e))
                if e.kind == ApplyErrorKind::PreconditionFailed
                    && wanted.is_none()
                    && attempt < PATCH_ATTEMPTS =>
            {
                continue;
            }
            Err(WriteError::Rejected(e))
                if e.kind == ApplyErrorKind::PreconditionFailed && wanted.is_none() =>
            {
                return Err(ApiError::conflict(format!(
                    "profile {name:?} keeps being changed by other requests; repeat the request"
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    info!(profile = %key, project = %scope.project, "profile updated");
    let not_updated = push_to_users(&state, &scope.project, &name).await?;
    if not_updated.is_empty() {
        Ok(sync(serde_json::Value::Null))
    } else {
        Ok(sync(serde_json::json!({ "not_updated": not_updated })))
    }
}

/// Sends the effective config of every instance of `project` using profile `short` to its
/// agent, one instance at a time under its lock. Failures are logged and listed (by short
/// name); an instance on an offline node is skipped (it gets its config when it next starts).
async fn push_to_users(
    state: &SharedState,
    project: &str,
    short: &str,
) -> Result<NotUpdated, ApiError> {
    let users: Vec<String> = state
        .cp
        .read(|s| {
            s.instances
                .values()
                .filter(|i| i.project == project && i.profiles.iter().any(|p| p == short))
                .map(|i| i.name.clone())
                .collect()
        })
        .await?;
    let mut failed = NotUpdated::new();
    for key in users {
        let lock = state.instance_lock(&key);
        let guard = lock.lock().await;
        let pushed = push_effective_config(state, &key).await;
        drop(guard);
        if let Err(e) = pushed {
            warn!(instance = %key, profile = short, error = %e.message, "the instance did not take the profile's new config");
            failed.insert(split_scoped_name(&key).1.to_string(), e.message);
        }
    }
    Ok(failed)
}

/// `PUT /1.0/profiles/{name}`: replaces description and config.
pub async fn put(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ProfilePut>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let wanted = if_match(&headers)?;
    no_devices(&body.devices)?;
    validate_profile_config(&body.config)?;
    update(state, scope, name, wanted, move |_| {
        Ok((body.description.clone(), body.config.clone()))
    })
    .await
}

/// What PATCH makes of a profile: keys set, or removed when `null`; the description when
/// given.
pub fn merge_profile_patch(
    current: &Profile,
    patch: &ProfilePatch,
) -> (String, BTreeMap<String, String>) {
    let mut config = current.config.clone();
    for (k, v) in patch.config.clone().unwrap_or_default() {
        match v {
            Some(v) => {
                config.insert(k, v);
            }
            None => {
                config.remove(&k);
            }
        }
    }
    (
        patch
            .description
            .clone()
            .unwrap_or_else(|| current.description.clone()),
        config,
    )
}

/// `PATCH /1.0/profiles/{name}`: changes only what is given.
pub async fn patch(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ProfilePatch>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let wanted = if_match(&headers)?;
    if let Some(changes) = &body.config {
        for (k, v) in changes {
            if let Some(v) = v {
                validate_profile_config(&BTreeMap::from([(k.clone(), v.clone())]))?;
            }
        }
    }
    update(state, scope, name, wanted, move |current| {
        Ok(merge_profile_patch(current, &body))
    })
    .await
}

/// `POST /1.0/profiles/{name}`: renames a profile (not `default`); the instances using it
/// follow.
pub async fn rename(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<RenamePost>,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let from = profile_key(&scope, &name)?;
    api::names::validate_profile_name(&body.name).map_err(ApiError::bad_request)?;
    let exists = state
        .cp
        .read(|s| get_profile(s, &scope.project, &name).is_some())
        .await?;
    if !exists {
        return Err(not_found(&name));
    }
    let to = scope.key(&body.name);
    state
        .cp
        .write(scope.by(Command::RenameProfile {
            from: from.clone(),
            to: to.clone(),
        }))
        .await?;
    info!(profile = %from, to = %to, "profile renamed");
    Ok(sync(serde_json::Value::Null))
}

/// `DELETE /1.0/profiles/{name}`: not `default`, not while an instance uses it.
pub async fn delete(
    State(state): State<SharedState>,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    scope.require_write()?;
    let wanted = if_match(&headers)?;
    let key = profile_key(&scope, &name)?;
    let etag = state
        .cp
        .read(|s| {
            get_profile(s, &scope.project, &name)
                .map(|_| s.etag(&ObjectKey::Profile(key.clone())).unwrap_or_default())
        })
        .await?
        .ok_or_else(|| not_found(&name))?;
    check_if_match(&format!("profile {name:?}"), wanted.as_deref(), &etag)?;
    state
        .cp
        .write(scope.by(guarded(
            Command::DeleteProfile { name: key.clone() },
            ObjectKey::Profile(key.clone()),
            wanted,
        )))
        .await?;
    info!(profile = %key, "profile deleted");
    Ok(sync(serde_json::Value::Null))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;
    use crate::api::{AppState, key_hash, router};
    use crate::clock;
    use crate::raft::ControlPlane;
    use crate::state::{
        ApiKey, Image, JoinTokenRecord, Node, NodeStatus, Project, Role, scoped_name,
    };
    use crate::tls::ClusterCa;

    /// An in-process API on a one-controller cluster with projects `a` and `b`, a node (whose
    /// agent is not running) and an image; keys: `admin`, `a-member`, `a-viewer`, `b-member`.
    struct Api {
        app: axum::Router,
        cp: ControlPlane,
        _dir: tempfile::TempDir,
    }

    const IMAGE: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    impl Api {
        async fn start() -> Api {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let dir = tempfile::tempdir().unwrap();
            let cp = ControlPlane::open(dir.path(), 1, "127.0.0.1:1".into(), true, None)
                .await
                .unwrap();
            assert!(cp.wait_for_leader(Duration::from_secs(10)).await.is_some());
            let ca = ClusterCa::generate("test").unwrap();
            let key = |id: &str, role: Role, project: &str| ApiKey {
                id: id.into(),
                name: id.into(),
                hash: key_hash(id),
                role,
                project: project.into(),
                ..Default::default()
            };
            cp.write(Command::Bootstrap {
                name: "test".into(),
                ca_cert_pem: ca.cert_pem.clone(),
                ca_key_pem: ca.key_pem.clone(),
                admin_key: key("admin", Role::Admin, "default"),
                now: clock::now(),
            })
            .await
            .unwrap();
            for p in ["a", "b"] {
                cp.write(Command::CreateProject {
                    project: Project {
                        name: p.into(),
                        ..Default::default()
                    },
                })
                .await
                .unwrap();
            }
            for (id, role, project) in [
                ("a-member", Role::Member, "a"),
                ("a-viewer", Role::Viewer, "a"),
                ("b-member", Role::Member, "b"),
            ] {
                cp.write(Command::AddApiKey {
                    key: key(id, role, project),
                })
                .await
                .unwrap();
            }
            cp.write(Command::AddJoinToken {
                hash: "t".into(),
                record: JoinTokenRecord {
                    node_name: "n1".into(),
                    created_at: clock::now(),
                    expires_at: "2999-01-01T00:00:00Z".into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap();
            cp.write(Command::JoinNode {
                token_hash: "t".into(),
                node: Node {
                    name: "n1".into(),
                    // Nothing listens there: agent calls fail at once.
                    address: "127.0.0.1:1".into(),
                    ipv4_cidr: "10.9.0.1/24".into(),
                    status: NodeStatus::Online,
                    cpus: 4,
                    memory_bytes: 8 << 30,
                    ..Default::default()
                },
                now: clock::now(),
            })
            .await
            .unwrap();
            cp.write(Command::PutImage {
                image: Image {
                    fingerprint: IMAGE.into(),
                    architecture: std::env::consts::ARCH.into(),
                    locations: ["n1".to_string()].into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap();
            let state = AppState::for_test(cp.clone(), ca);
            Api {
                app: router(state),
                cp,
                _dir: dir,
            }
        }

        /// Sends a request with key `key`; answers the status, the ETag header and the body.
        async fn call_with(
            &self,
            key: &str,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: Option<serde_json::Value>,
        ) -> (u16, String, serde_json::Value) {
            let mut req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json");
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req
                .body(match body {
                    Some(b) => Body::from(b.to_string()),
                    None => Body::empty(),
                })
                .unwrap();
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let etag = resp
                .headers()
                .get(http::header::ETAG)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let body = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            (status, etag, body)
        }

        async fn call(
            &self,
            key: &str,
            method: &str,
            path: &str,
            body: Option<serde_json::Value>,
        ) -> (u16, serde_json::Value) {
            let (status, _, body) = self.call_with(key, method, path, &[], body).await;
            (status, body)
        }
    }

    fn launch(name: &str, profiles: Option<&[&str]>) -> serde_json::Value {
        let mut body = serde_json::json!({
            "name": name,
            "source": { "type": "image", "fingerprint": IMAGE },
        });
        if let Some(p) = profiles {
            body["profiles"] = serde_json::json!(p);
        }
        body
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn profiles_crud_etags_and_isolation() {
        let api = Api::start().await;
        let web = serde_json::json!({
            "name": "web",
            "config": { "limits.cpu": "2", "user.tier": "web" },
        });
        // A member creates in its project (no ?project= needed); a viewer cannot.
        let (status, body) = api
            .call("a-member", "POST", "/1.0/profiles", Some(web.clone()))
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = api
            .call("a-viewer", "POST", "/1.0/profiles", Some(web.clone()))
            .await;
        assert_eq!(status, 403);
        let (status, _) = api
            .call("a-member", "POST", "/1.0/profiles", Some(web.clone()))
            .await;
        assert_eq!(status, 409, "same name in the same project");
        // The same name in another project is another profile.
        let (status, body) = api
            .call("b-member", "POST", "/1.0/profiles", Some(web.clone()))
            .await;
        assert_eq!(status, 200, "{body}");
        // Bad input changes nothing.
        for bad in [
            serde_json::json!({"name": "a_b"}),
            serde_json::json!({"name": "x", "config": {"limits.cpu": "lots"}}),
            serde_json::json!({"name": "x", "config": {"image.os": "debian"}}),
            serde_json::json!({"name": "x", "devices": {"eth0": {"type": "nic"}}}),
        ] {
            let (status, _) = api
                .call("a-member", "POST", "/1.0/profiles", Some(bad.clone()))
                .await;
            assert_eq!(status, 400, "{bad}");
        }

        // Lists: names of the project only, with ?project= in URLs outside default.
        let (status, body) = api.call("a-viewer", "GET", "/1.0/profiles", None).await;
        assert_eq!(status, 200);
        assert_eq!(
            body["metadata"],
            serde_json::json!([
                "/1.0/profiles/default?project=a",
                "/1.0/profiles/web?project=a"
            ])
        );
        let (_, body) = api
            .call("admin", "GET", "/1.0/profiles?recursion=1", None)
            .await;
        assert_eq!(
            body["metadata"].as_array().unwrap().len(),
            1,
            "default project: its default profile only: {body}"
        );

        // Another project's profile is absent, whatever the spelling.
        for (key, path) in [
            ("b-member", "/1.0/profiles/web?project=a"),
            ("a-member", "/1.0/profiles/web?project=b"),
            ("admin", "/1.0/profiles/a_web"),
            ("admin", "/1.0/profiles/nope?project=a"),
        ] {
            let (status, body) = api.call(key, "GET", path, None).await;
            assert_eq!(status, 404, "{key} {path}: {body}");
            let error = body["error"].as_str().unwrap();
            assert!(
                !error.contains("a_web") || path.contains("a_web"),
                "{error}"
            );
        }

        // ETag and If-Match.
        let (status, etag, body) = api
            .call_with("a-viewer", "GET", "/1.0/profiles/web", &[], None)
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["metadata"]["config"]["limits.cpu"], "2");
        assert_eq!(body["metadata"]["project"], "a");
        assert!(etag.starts_with('"') && etag.len() > 2, "{etag:?}");
        let patch = serde_json::json!({ "config": { "limits.cpu": "3", "user.tier": null } });
        let (status, _, _) = api
            .call_with(
                "a-member",
                "PATCH",
                "/1.0/profiles/web",
                &[("if-match", "\"stale\"")],
                Some(patch.clone()),
            )
            .await;
        assert_eq!(status, 412);
        let (status, _, body) = api
            .call_with(
                "a-member",
                "PATCH",
                "/1.0/profiles/web",
                &[("if-match", &etag)],
                Some(patch.clone()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (_, new_etag, body) = api
            .call_with("a-member", "GET", "/1.0/profiles/web", &[], None)
            .await;
        assert_ne!(new_etag, etag);
        assert_eq!(
            body["metadata"]["config"],
            serde_json::json!({ "limits.cpu": "3" })
        );
        // The old ETag is stale now: PUT and DELETE refuse it and change nothing.
        let (status, _, _) = api
            .call_with(
                "a-member",
                "PUT",
                "/1.0/profiles/web",
                &[("if-match", &etag)],
                Some(serde_json::json!({ "config": {} })),
            )
            .await;
        assert_eq!(status, 412);
        let (status, _, _) = api
            .call_with(
                "a-member",
                "DELETE",
                "/1.0/profiles/web",
                &[("if-match", &etag)],
                None,
            )
            .await;
        assert_eq!(status, 412);
        // PUT replaces.
        let (status, _) = api
            .call(
                "a-member",
                "PUT",
                "/1.0/profiles/web",
                Some(serde_json::json!({ "description": "d", "config": { "limits.memory": "256MiB" } })),
            )
            .await;
        assert_eq!(status, 200);
        let stored = api
            .cp
            .read(|s| s.profiles.get("a_web").cloned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.description, "d");
        assert_eq!(
            stored.config,
            BTreeMap::from([("limits.memory".to_string(), "256MiB".to_string())])
        );
        // Project b's profile of the same name never changed.
        let b = api
            .cp
            .read(|s| s.profiles.get("b_web").cloned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.config.get("limits.cpu").map(String::as_str), Some("2"));
        // A viewer cannot change or delete; another project's key cannot even see it.
        let (status, _) = api
            .call(
                "a-viewer",
                "PATCH",
                "/1.0/profiles/web",
                Some(serde_json::json!({ "description": "x" })),
            )
            .await;
        assert_eq!(status, 403);
        let (status, _) = api
            .call("b-member", "DELETE", "/1.0/profiles/web?project=a", None)
            .await;
        assert_eq!(status, 404);

        // Rename, then delete; the default profile stays.
        let (status, body) = api
            .call(
                "a-member",
                "POST",
                "/1.0/profiles/web",
                Some(serde_json::json!({ "name": "front" })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = api.call("a-member", "GET", "/1.0/profiles/web", None).await;
        assert_eq!(status, 404);
        let (status, _) = api
            .call(
                "a-member",
                "POST",
                "/1.0/profiles/default",
                Some(serde_json::json!({ "name": "other" })),
            )
            .await;
        assert_eq!(status, 400);
        let (status, _) = api
            .call("a-member", "DELETE", "/1.0/profiles/default", None)
            .await;
        assert_eq!(status, 400);
        let (status, body) = api
            .call("a-member", "DELETE", "/1.0/profiles/front", None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            api.cp
                .read(|s| !s.profiles.contains_key(&scoped_name("a", "front")))
                .await
                .unwrap()
        );
        // A restricted project's profiles cannot make instances privileged.
        api.cp
            .write(Command::UpdateProject {
                name: "a".into(),
                description: String::new(),
                config: BTreeMap::from([("restricted".to_string(), "true".to_string())]),
            })
            .await
            .unwrap();
        let (status, body) = api
            .call(
                "a-member",
                "POST",
                "/1.0/profiles",
                Some(serde_json::json!({
                    "name": "root",
                    "config": { "security.privileged": "true" },
                })),
            )
            .await;
        assert_eq!(status, 403, "{body}");
        let (status, _) = api
            .call(
                "a-member",
                "PATCH",
                "/1.0/profiles/default",
                Some(serde_json::json!({ "config": { "security.nesting": "true" } })),
            )
            .await;
        assert_eq!(status, 403);
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_in_projects_with_profiles() {
        let api = Api::start().await;
        let (status, _) = api
            .call(
                "a-member",
                "POST",
                "/1.0/profiles",
                Some(serde_json::json!({
                    "name": "small",
                    "config": { "limits.cpu": "1", "limits.memory": "256MiB" },
                })),
            )
            .await;
        assert_eq!(status, 200);
        // Unknown profile: 404, nothing made.
        let (status, body) = api
            .call(
                "a-member",
                "POST",
                "/1.0/instances",
                Some(launch("web", Some(&["default", "nope"]))),
            )
            .await;
        assert_eq!(status, 404, "{body}");
        // A viewer cannot create.
        let (status, _) = api
            .call(
                "a-viewer",
                "POST",
                "/1.0/instances",
                Some(launch("web", None)),
            )
            .await;
        assert_eq!(status, 403);
        let (status, body) = api
            .call(
                "a-member",
                "POST",
                "/1.0/instances",
                Some(launch("web", Some(&["default", "small"]))),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["metadata"]["project"], "a");
        let stored = api
            .cp
            .read(|s| s.instances.get("a_web").cloned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.project, "a");
        assert_eq!(stored.profiles, vec!["default", "small"]);
        // The same name in another project is another instance; without a profile list the
        // default profile applies, with [] none.
        let (status, body) = api
            .call(
                "b-member",
                "POST",
                "/1.0/instances",
                Some(launch("web", None)),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        let (status, _) = api
            .call(
                "b-member",
                "POST",
                "/1.0/instances",
                Some(launch("bare", Some(&[]))),
            )
            .await;
        assert_eq!(status, 202);
        let profiles = api
            .cp
            .read(|s| {
                (
                    s.instances["b_web"].profiles.clone(),
                    s.instances["b_bare"].profiles.clone(),
                )
            })
            .await
            .unwrap();
        assert_eq!(profiles.0, vec!["default"]);
        assert!(profiles.1.is_empty());
        // Conflicts only inside a project.
        let (status, _) = api
            .call(
                "a-member",
                "POST",
                "/1.0/instances",
                Some(launch("web", None)),
            )
            .await;
        assert_eq!(status, 409);

        // GET: short name, project, own config and expanded config, ETag.
        let (status, etag, body) = api
            .call_with("a-viewer", "GET", "/1.0/instances/web", &[], None)
            .await;
        assert_eq!(status, 200, "{body}");
        let m = &body["metadata"];
        assert_eq!(
            (m["name"].as_str(), m["project"].as_str()),
            (Some("web"), Some("a"))
        );
        assert!(m["config"].get("limits.cpu").is_none(), "{m}");
        assert_eq!(m["expanded_config"]["limits.cpu"], "1");
        assert_eq!(m["expanded_config"]["limits.memory"], "256MiB");
        assert!(etag.len() > 2);
        // Invisible from elsewhere, whatever the spelling.
        for (key, path) in [
            ("b-member", "/1.0/instances/web?project=a"),
            ("admin", "/1.0/instances/a_web"),
            ("admin", "/1.0/instances/web"),
        ] {
            let (status, body) = api.call(key, "GET", path, None).await;
            assert_eq!(status, 404, "{key} {path}: {body}");
            // Nothing names what the other project holds, nor its internal names.
            let error = body["error"].as_str().unwrap();
            assert!(
                !error.contains("a_web") || path.contains("a_web"),
                "{error}"
            );
        }
        for (method, path) in [
            ("DELETE", "/1.0/instances/web?project=a"),
            ("GET", "/1.0/instances/web/state?project=a"),
            (
                "GET",
                "/1.0/instances/web/files?project=a&path=/etc/hostname",
            ),
            (
                "DELETE",
                "/1.0/instances/web/files?project=a&path=/etc/hostname",
            ),
            ("GET", "/1.0/instances/web/console?project=a"),
        ] {
            let (status, _) = api.call("b-member", method, path, None).await;
            assert_eq!(status, 404, "{method} {path}");
        }
        let (status, _) = api
            .call(
                "b-member",
                "POST",
                "/1.0/instances/web/exec?project=a",
                Some(serde_json::json!({ "command": ["true"], "wait-for-websocket": true })),
            )
            .await;
        assert_eq!(status, 404);
        // Viewers see instances but not into them, and change nothing.
        for (method, path) in [
            ("GET", "/1.0/instances/web/files?path=/etc/hostname"),
            ("DELETE", "/1.0/instances/web/files?path=/etc/hostname"),
            ("GET", "/1.0/instances/web/console"),
            ("DELETE", "/1.0/instances/web"),
        ] {
            let (status, _) = api.call("a-viewer", method, path, None).await;
            assert_eq!(status, 403, "{method} {path}");
        }
        let (status, _) = api
            .call(
                "a-viewer",
                "POST",
                "/1.0/instances/web/exec",
                Some(serde_json::json!({ "command": ["true"], "wait-for-websocket": true })),
            )
            .await;
        assert_eq!(status, 403);

        // Lists: the project's own; all projects only for fleet keys.
        let (_, body) = api.call("a-viewer", "GET", "/1.0/instances", None).await;
        assert_eq!(
            body["metadata"],
            serde_json::json!(["/1.0/instances/web?project=a"])
        );
        let (status, _) = api
            .call("a-member", "GET", "/1.0/instances?all-projects=true", None)
            .await;
        assert_eq!(status, 403);
        let (_, body) = api
            .call(
                "admin",
                "GET",
                "/1.0/instances?all-projects=true&recursion=1",
                None,
            )
            .await;
        let mut seen: Vec<(String, String)> = body["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["project"].as_str().unwrap().to_string(),
                    i["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [("a", "web"), ("b", "bare"), ("b", "web")]
                .map(|(p, n)| (p.to_string(), n.to_string()))
        );
        let (_, body) = api.call("admin", "GET", "/1.0/instances", None).await;
        assert_eq!(body["metadata"], serde_json::json!([]));
        // ?filter= on what the API shows (config.KEY on the effective config).
        for (filter, want) in [
            (
                "name%20eq%20web",
                serde_json::json!(["/1.0/instances/web?project=b"]),
            ),
            (
                "name%20ne%20web",
                serde_json::json!(["/1.0/instances/bare?project=b"]),
            ),
            (
                "project%20eq%20b%20and%20not%20profiles%20eq%20default",
                serde_json::json!(["/1.0/instances/bare?project=b"]),
            ),
        ] {
            let (status, body) = api
                .call(
                    "b-member",
                    "GET",
                    &format!("/1.0/instances?filter={filter}"),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["metadata"], want, "{filter}");
        }
        let (_, body) = api
            .call(
                "a-member",
                "GET",
                "/1.0/instances?filter=config.limits.cpu%20eq%201",
                None,
            )
            .await;
        assert_eq!(
            body["metadata"],
            serde_json::json!(["/1.0/instances/web?project=a"])
        );
        let (status, _) = api
            .call("a-member", "GET", "/1.0/instances?filter=name%20eq", None)
            .await;
        assert_eq!(status, 400);
        let (_, body) = api
            .call(
                "a-member",
                "GET",
                "/1.0/profiles?filter=config.limits.cpu%20eq%201",
                None,
            )
            .await;
        assert_eq!(
            body["metadata"],
            serde_json::json!(["/1.0/profiles/small?project=a"])
        );

        // A profile in use cannot go; its changes are checked against the project's quota.
        let (status, _) = api
            .call("a-member", "DELETE", "/1.0/profiles/small", None)
            .await;
        assert_eq!(status, 409);
        api.cp
            .write(Command::UpdateProject {
                name: "a".into(),
                description: String::new(),
                config: BTreeMap::from([("limits.cpu".to_string(), "2".to_string())]),
            })
            .await
            .unwrap();
        let (status, body) = api
            .call(
                "a-member",
                "PATCH",
                "/1.0/profiles/small",
                Some(serde_json::json!({ "config": { "limits.cpu": "3" } })),
            )
            .await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("limits.cpu quota"),
            "{body}"
        );
        let cpu = api
            .cp
            .read(|s| s.profiles["a_small"].config["limits.cpu"].clone())
            .await
            .unwrap();
        assert_eq!(cpu, "1", "a refused change changes nothing");
        // A change within quota commits; the instance is still being created (no reconciler
        // here), so its create sends the new config.
        let (status, body) = api
            .call(
                "a-member",
                "PATCH",
                "/1.0/profiles/small",
                Some(serde_json::json!({ "config": { "limits.memory": "512MiB" } })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (_, body) = api
            .call("a-member", "GET", "/1.0/instances/web", None)
            .await;
        assert_eq!(
            body["metadata"]["expanded_config"]["limits.memory"],
            "512MiB"
        );
        // If-Match on an instance: a stale ETag is refused before anything is touched.
        let (status, _, body) = api
            .call_with(
                "a-member",
                "PATCH",
                "/1.0/instances/web",
                &[("if-match", "\"stale\"")],
                Some(serde_json::json!({ "config": { "user.x": "1" } })),
            )
            .await;
        assert_eq!(status, 412, "{body}");
        let (status, _, _) = api
            .call_with(
                "a-member",
                "DELETE",
                "/1.0/instances/web",
                &[("if-match", "\"stale\"")],
                None,
            )
            .await;
        assert_eq!(status, 412);
        // The ETag read before is still current (the profile change is not the instance's).
        let (_, etag2, _) = api
            .call_with("a-member", "GET", "/1.0/instances/web", &[], None)
            .await;
        assert_eq!(etag, etag2);
        api.cp.shutdown().await;
    }
}
