//! `/1.0/projects`: tenants' slices of the cluster, with quotas and restrictions.
//!
//! Fleet keys (admin, operator) see and change every project. A member or viewer key sees
//! only its own project (any other answers 404, as if it did not exist) and may read its
//! state, but changes no project (403 on its own).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::response::Response;
use berth_proto::api::config;
use berth_proto::api::names;
use berth_proto::api::tenancy::{
    self as t, ProjectPatch, ProjectPut, ProjectResource, ProjectState, ProjectsPost, RenamePost,
};
use http::HeaderMap;
use http::request::Parts;
use serde::Deserialize;
use tracing::info;

use super::error::{guard_if_match, if_match, with_etag};
use super::instances::project_suffix;
use super::operations::sync;
use super::{ApiError, Identity, JsonBody, Scope, SharedState};
use crate::clock;
use crate::state::{
    Command, DEFAULT_PROJECT, ObjectKey, Project, QUOTAS, State as Model, project_limit,
    split_scoped_name,
};

/// The caller of an endpoint that is not inside a project (projects, keys): a [`Scope`] in the
/// key's own project (`default` for fleet keys), carrying the request's idempotency context,
/// so that [`Scope::by`] names the key and tags the write. `?project=` is not read.
pub struct Caller(pub Scope);

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let identity = Identity::from_request_parts(parts, state).await?;
        let project = if identity.role.is_project_scoped() {
            identity.project.clone()
        } else {
            DEFAULT_PROJECT.to_string()
        };
        Ok(Caller(Scope {
            identity,
            project,
            idempotency: parts
                .extensions
                .get::<Arc<super::idempotency::RequestContext>>()
                .cloned(),
        }))
    }
}

/// `?recursion=`.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    recursion: u8,
}

impl ListQuery {
    /// 0: URLs; 1 or more: whole objects.
    pub fn recursion(&self) -> u8 {
        self.recursion
    }
}

/// `GET /1.0/projects?recursion=&filter=`.
#[derive(Debug, Default, Deserialize)]
pub struct ProjectsQuery {
    #[serde(default)]
    recursion: u8,
    /// An LXD-style filter ([`super::filter`]) on the projects as the API shows them (`name`,
    /// `description`, `config.*`).
    #[serde(default)]
    filter: String,
}

/// Whether `who` may see project `name`: fleet keys see all, others their own.
fn visible(who: &Identity, name: &str) -> bool {
    who.is_fleet() || who.project == name
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("project {name:?} not found"))
}

/// The URL of a project.
fn url(name: &str) -> String {
    format!("/1.0/projects/{name}")
}

/// The project `name` as the API shows it, with the URLs of what it holds; `None` if it does
/// not exist (the default project always does).
pub fn project_view(s: &Model, name: &str) -> Option<t::Project> {
    let (description, config, created_at) = match s.projects.get(name) {
        Some(p) => (
            p.description.clone(),
            p.config.clone(),
            p.created_at.clone(),
        ),
        None if name == DEFAULT_PROJECT => (
            "Default project".to_string(),
            BTreeMap::new(),
            s.cluster.created_at.clone(),
        ),
        None => return None,
    };
    let sfx = project_suffix(name);
    let mut used_by: Vec<String> = s
        .instances
        .values()
        .filter(|i| i.project == name)
        .map(|i| format!("/1.0/instances/{}{sfx}", split_scoped_name(&i.name).1))
        .collect();
    used_by.extend(
        s.profiles
            .values()
            .filter(|p| p.project == name)
            .map(|p| format!("/1.0/profiles/{}{sfx}", p.short_name())),
    );
    used_by.extend(
        s.aliases
            .values()
            .filter(|a| a.project == name)
            .map(|a| format!("/1.0/images/aliases/{}{sfx}", a.short_name())),
    );
    Some(t::Project {
        name: name.to_string(),
        description,
        config,
        used_by,
        created_at,
    })
}

/// Every project name: the records, and `default` even without one.
fn project_names(s: &Model) -> Vec<String> {
    let mut names: Vec<String> = s.projects.keys().cloned().collect();
    if !s.projects.contains_key(DEFAULT_PROJECT) {
        names.insert(0, DEFAULT_PROJECT.to_string());
    }
    names
}

/// `GET /1.0/projects`: URLs, or the projects with `?recursion=1`; a member or viewer key
/// lists only its own project.
pub async fn list(
    State(state): State<SharedState>,
    who: Identity,
    Query(q): Query<ProjectsQuery>,
) -> Result<Response, ApiError> {
    let filter = super::instances::parse_filter(&q.filter)?;
    let projects: Vec<t::Project> = state
        .cp
        .read(|s| {
            project_names(s)
                .into_iter()
                .filter(|n| visible(&who, n))
                .filter_map(|n| project_view(s, &n))
                .filter(|p| super::instances::passes(filter.as_ref(), p))
                .collect()
        })
        .await?;
    if q.recursion == 0 {
        return Ok(sync(
            projects.iter().map(|p| url(&p.name)).collect::<Vec<_>>(),
        ));
    }
    Ok(sync(projects))
}

/// Checks a project config: one sentence for the first bad key or value.
fn validate_config(config: &BTreeMap<String, String>) -> Result<(), ApiError> {
    config::validate_project(config).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `POST /1.0/projects` (fleet keys): a new project, with its `default` profile.
pub async fn create(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    JsonBody(req): JsonBody<ProjectsPost>,
) -> Result<Response, ApiError> {
    scope.identity.require_fleet()?;
    names::validate_project_name(&req.name).map_err(ApiError::bad_request)?;
    validate_config(&req.config)?;
    let name = req.name.clone();
    state
        .cp
        .write(scope.by(Command::CreateProject {
            project: Project {
                name: req.name,
                description: req.description,
                config: req.config,
                created_at: clock::now(),
            },
        }))
        .await?;
    info!(project = %name, key = %scope.identity.key_name, "project created");
    let view = state.cp.read(|s| project_view(s, &name)).await?;
    Ok(sync(view))
}

/// The project and its ETag, if `who` may see it; 404 otherwise.
async fn find(
    state: &SharedState,
    who: &Identity,
    name: &str,
) -> Result<(t::Project, Option<String>), ApiError> {
    if !visible(who, name) {
        return Err(not_found(name));
    }
    state
        .cp
        .read(|s| project_view(s, name).map(|p| (p, s.etag(&ObjectKey::Project(name.to_string())))))
        .await?
        .ok_or_else(|| not_found(name))
}

/// `GET /1.0/projects/{name}`, with its `ETag`.
pub async fn get_one(
    State(state): State<SharedState>,
    who: Identity,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (project, etag) = find(&state, &who, &name).await?;
    Ok(with_etag(sync(project), etag))
}

/// Replaces a project's description and config (fleet keys), applied only while the project
/// still has ETag `expect` when given; answers the project as it is then.
async fn update(
    state: &SharedState,
    scope: &Scope,
    expect: Option<String>,
    name: &str,
    description: String,
    config: BTreeMap<String, String>,
) -> Result<Response, ApiError> {
    validate_config(&config)?;
    let command = super::instances::guarded(
        Command::UpdateProject {
            name: name.to_string(),
            description,
            config,
        },
        ObjectKey::Project(name.to_string()),
        expect,
    );
    state.cp.write(scope.by(command)).await?;
    info!(project = %name, key = %scope.identity.key_name, "project updated");
    let (project, etag) = find(state, &scope.identity, name).await?;
    Ok(with_etag(sync(project), etag))
}

/// 404 unless the caller sees project `name`, then 403 unless it holds a fleet key.
fn check_change(who: &Identity, name: &str) -> Result<(), ApiError> {
    if !visible(who, name) {
        return Err(not_found(name));
    }
    who.require_fleet()
}

/// `PUT /1.0/projects/{name}`: replaces description and config.
pub async fn put(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ProjectPut>,
) -> Result<Response, ApiError> {
    check_change(&scope.identity, &name)?;
    let expect = if_match(&headers)?;
    update(&state, &scope, expect, &name, req.description, req.config).await
}

/// How often a PATCH without `If-Match` is merged again when the project changed under it.
const PATCH_ATTEMPTS: usize = 3;

/// `PATCH /1.0/projects/{name}`: changes what is present; a config key set to null goes.
/// The merge is applied only to the project it was made from (its ETag), so a change made
/// in between is never undone: with `If-Match` that is a 412, without it the merge is redone.
pub async fn patch(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ProjectPatch>,
) -> Result<Response, ApiError> {
    check_change(&scope.identity, &name)?;
    let asked = if_match(&headers)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (current, etag) = find(&state, &scope.identity, &name).await?;
        let description = req.description.clone().unwrap_or(current.description);
        let mut config = current.config;
        for (k, v) in req.config.clone().unwrap_or_default() {
            match v {
                Some(v) => config.insert(k, v),
                None => config.remove(&k),
            };
        }
        let expect = asked.clone().or(etag);
        match update(&state, &scope, expect, &name, description, config).await {
            Err(e)
                if e.status == http::StatusCode::PRECONDITION_FAILED
                    && asked.is_none()
                    && attempt < PATCH_ATTEMPTS => {}
            other => return other,
        }
    }
}

/// `POST /1.0/projects/{name}`: renames an empty project.
pub async fn rename(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<RenamePost>,
) -> Result<Response, ApiError> {
    check_change(&scope.identity, &name)?;
    names::validate_project_name(&req.name).map_err(ApiError::bad_request)?;
    state
        .cp
        .write(scope.by(Command::RenameProject {
            from: name.clone(),
            to: req.name.clone(),
        }))
        .await?;
    info!(project = %name, to = %req.name, key = %scope.identity.key_name, "project renamed");
    Ok(sync(serde_json::Value::Null))
}

/// `DELETE /1.0/projects/{name}`: removes an empty project (not `default`).
pub async fn delete(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_change(&scope.identity, &name)?;
    let command = guard_if_match(
        &headers,
        ObjectKey::Project(name.clone()),
        Command::DeleteProject { name: name.clone() },
    )?;
    state.cp.write(scope.by(command)).await?;
    info!(project = %name, key = %scope.identity.key_name, "project deleted");
    Ok(sync(serde_json::Value::Null))
}

/// The resource names of `GET /1.0/projects/{name}/state`, by quota key.
fn resource_name(quota: &str) -> &str {
    quota.strip_prefix("limits.").unwrap_or(quota)
}

/// Use against quota for project `name` (which must exist).
pub fn project_state(s: &Model, name: &str) -> ProjectState {
    let project = s.projects.get(name);
    let usage = s.project_usage(name);
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    ProjectState {
        resources: QUOTAS
            .iter()
            .map(|q| {
                (
                    resource_name(q).to_string(),
                    ProjectResource {
                        limit: project_limit(project, q).map_or(-1, clamp),
                        usage: clamp(usage.get(q)),
                    },
                )
            })
            .collect(),
    }
}

/// `GET /1.0/projects/{name}/state`: each quota's limit (-1: none) and use; the project's own
/// keys may read it too.
pub async fn get_state(
    State(state): State<SharedState>,
    who: Identity,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if !visible(&who, &name) {
        return Err(not_found(&name));
    }
    let st = state
        .cp
        .read(|s| s.project_exists(&name).then(|| project_state(s, &name)))
        .await?
        .ok_or_else(|| not_found(&name))?;
    Ok(sync(st))
}

/// An API on a one-controller cluster, with projects `a` and `b` and keys of every role, for
/// the handler tests of this module and of keys, images, operations, cluster and metrics.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod testkit {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use axum::body::Body;
    use tower::ServiceExt as _;

    use crate::api::{AppState, key_hash, router};
    use crate::clock;
    use crate::raft::ControlPlane;
    use crate::state::{
        ApiKey, Command, ControllerRecord, Image, Instance, JoinKind, JoinTokenRecord, Node,
        Project, Role,
    };

    /// Joins `node` to the cluster (with a join token `token-<name>` made for it).
    pub async fn join_node(cp: &ControlPlane, node: Node) {
        let hash = key_hash(&format!("token-{}", node.name));
        cp.write(Command::AddJoinToken {
            hash: hash.clone(),
            record: JoinTokenRecord {
                node_name: node.name.clone(),
                kind: JoinKind::Node,
                created_at: clock::now(),
                expires_at: clock::after(Duration::from_secs(60)),
            },
        })
        .await
        .unwrap();
        cp.write(Command::JoinNode {
            token_hash: hash,
            node,
            now: clock::now(),
        })
        .await
        .unwrap();
    }

    /// Secrets of the test keys: admin, operator, member and viewer of `a`, member of `b`.
    pub const ADMIN: &str = "admin-secret";
    pub const OPERATOR: &str = "operator-secret";
    pub const MEMBER_A: &str = "member-a-secret";
    pub const VIEWER_A: &str = "viewer-a-secret";
    pub const MEMBER_B: &str = "member-b-secret";

    pub struct Api {
        pub app: axum::Router,
        pub cp: ControlPlane,
        _dir: tempfile::TempDir,
    }

    /// An answer: status, envelope, headers.
    pub struct Answer {
        pub status: u16,
        pub body: serde_json::Value,
        pub headers: http::HeaderMap,
    }

    fn key(id: &str, name: &str, secret: &str, role: Role, project: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            name: name.into(),
            hash: key_hash(secret),
            role,
            project: project.into(),
            created_at: clock::now(),
            expires_at: None,
        }
    }

    impl Api {
        pub async fn start() -> Api {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let dir = tempfile::tempdir().unwrap();
            let cp = ControlPlane::open(dir.path(), 1, "127.0.0.1:1".into(), true, None)
                .await
                .unwrap();
            assert!(cp.wait_for_leader(Duration::from_secs(10)).await.is_some());
            let ca = crate::tls::ClusterCa::generate("test").unwrap();
            cp.write(Command::Bootstrap {
                name: "test".into(),
                ca_cert_pem: ca.cert_pem.clone(),
                ca_key_pem: ca.key_pem.clone(),
                admin_key: key("k1", "admin", ADMIN, Role::Admin, "default"),
                now: clock::now(),
            })
            .await
            .unwrap();
            cp.write(Command::RegisterController {
                record: ControllerRecord {
                    name: "c1".into(),
                    id: 1,
                    peer_address: "127.0.0.1:1".into(),
                    api_address: "c1.example:8443".into(),
                    joined_at: clock::now(),
                    cert_fingerprint: String::new(),
                },
            })
            .await
            .unwrap();
            for p in ["a", "b"] {
                cp.write(Command::CreateProject {
                    project: Project {
                        name: p.into(),
                        created_at: clock::now(),
                        ..Default::default()
                    },
                })
                .await
                .unwrap();
            }
            for k in [
                key("k2", "ops", OPERATOR, Role::Operator, "default"),
                key("k3", "alice", MEMBER_A, Role::Member, "a"),
                key("k4", "victor", VIEWER_A, Role::Viewer, "a"),
                key("k5", "bob", MEMBER_B, Role::Member, "b"),
            ] {
                cp.write(Command::AddApiKey { key: k }).await.unwrap();
            }
            let state = AppState::for_test(cp.clone(), ca);
            Api {
                app: router(state),
                cp,
                _dir: dir,
            }
        }

        /// Sends a request with `key` and extra `headers`.
        pub async fn send(
            &self,
            key: &str,
            method: &str,
            path: &str,
            body: Option<serde_json::Value>,
            headers: &[(&str, &str)],
        ) -> Answer {
            let mut b = http::Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {key}"));
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                b = b.header("content-type", "application/json");
            }
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let req = b
                .body(match body {
                    Some(b) => Body::from(b.to_string()),
                    None => Body::empty(),
                })
                .unwrap();
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into())
            });
            Answer {
                status,
                body,
                headers,
            }
        }

        /// Sends a request with `key`; answers the status and the envelope.
        pub async fn call(
            &self,
            key: &str,
            method: &str,
            path: &str,
            body: Option<serde_json::Value>,
        ) -> (u16, serde_json::Value) {
            let a = self.send(key, method, path, body, &[]).await;
            (a.status, a.body)
        }

        /// A node `n1` (4 CPUs, 8 GiB) and an image `img` shared by every project.
        pub async fn add_node_and_image(&self) {
            join_node(
                &self.cp,
                Node {
                    name: "n1".into(),
                    address: "10.0.0.5:8445".into(),
                    ipv4_cidr: "10.87.1.1/24".into(),
                    cpus: 4,
                    memory_bytes: 8 << 30,
                    ..Default::default()
                },
            )
            .await;
            self.put_image("img", &[]).await;
        }

        /// Ends instance `key`'s pending action in success, as the reconciler would.
        pub async fn finish_pending(&self, key: &str) {
            let op = self.model().await.instances[key]
                .pending
                .clone()
                .unwrap()
                .op;
            self.cp
                .write(Command::FinishAction {
                    name: key.into(),
                    op,
                    observed: None,
                    error: String::new(),
                    now: clock::now(),
                })
                .await
                .unwrap();
        }

        /// An image with fingerprint `fp`, held by `projects` (none: shared).
        pub async fn put_image(&self, fp: &str, projects: &[&str]) {
            self.cp
                .write(Command::PutImage {
                    image: Image {
                        fingerprint: fp.into(),
                        locations: ["n1".to_string()].into(),
                        projects: projects.iter().map(|p| p.to_string()).collect(),
                        ..Default::default()
                    },
                })
                .await
                .unwrap();
        }

        /// An instance `name` of `project` on `n1`, from image `img`, with `config`.
        pub async fn add_instance(&self, project: &str, name: &str, config: &[(&str, &str)]) {
            self.cp
                .write(Command::CreateInstance {
                    instance: Instance {
                        name: crate::state::scoped_name(project, name),
                        project: project.into(),
                        node: "n1".into(),
                        image: "img".into(),
                        config: config
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect::<BTreeMap<_, _>>(),
                        created_at: clock::now(),
                        ..Default::default()
                    },
                    operation: None,
                })
                .await
                .unwrap();
        }

        /// The replicated state now.
        pub async fn model(&self) -> crate::state::State {
            self.cp.read(|s| s.clone()).await.unwrap()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testkit::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_sees_only_its_project_and_changes_none() {
        let api = Api::start().await;
        let (status, body) = api.call(MEMBER_A, "GET", "/1.0/projects", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["metadata"], serde_json::json!(["/1.0/projects/a"]));
        let (_, body) = api
            .call(MEMBER_A, "GET", "/1.0/projects?recursion=1", None)
            .await;
        assert_eq!(body["metadata"][0]["name"], "a");
        assert_eq!(body["metadata"].as_array().unwrap().len(), 1);
        // A filter never shows what the key cannot see.
        let (_, body) = api
            .call(MEMBER_A, "GET", "/1.0/projects?filter=name%20eq%20b", None)
            .await;
        assert_eq!(body["metadata"], serde_json::json!([]));

        let own = api
            .send(MEMBER_A, "GET", "/1.0/projects/a", None, &[])
            .await;
        assert_eq!(own.status, 200);
        assert!(own.headers.contains_key("etag"));
        for path in [
            "/1.0/projects/b",
            "/1.0/projects/b/state",
            "/1.0/projects/default",
            "/1.0/projects/nope",
        ] {
            let (status, body) = api.call(MEMBER_A, "GET", path, None).await;
            assert_eq!(status, 404, "{path}: {body}");
        }
        assert_eq!(
            api.call(MEMBER_A, "GET", "/1.0/projects/a/state", None)
                .await
                .0,
            200
        );
        assert_eq!(
            api.call(VIEWER_A, "GET", "/1.0/projects/a/state", None)
                .await
                .0,
            200
        );

        let before = api.model().await;
        let put = serde_json::json!({"config": {"limits.instances": "100"}});
        // Its own project: visible, not changeable (403); another: invisible (404).
        for (key, method, path, status) in [
            (MEMBER_A, "PUT", "/1.0/projects/a", 403),
            (MEMBER_A, "PATCH", "/1.0/projects/a", 403),
            (MEMBER_A, "DELETE", "/1.0/projects/a", 403),
            (MEMBER_A, "POST", "/1.0/projects/a", 403),
            (VIEWER_A, "PUT", "/1.0/projects/a", 403),
            (MEMBER_A, "PUT", "/1.0/projects/b", 404),
            (MEMBER_A, "PATCH", "/1.0/projects/b", 404),
            (MEMBER_A, "DELETE", "/1.0/projects/b", 404),
            (MEMBER_A, "POST", "/1.0/projects/b", 404),
            (MEMBER_A, "POST", "/1.0/projects", 403),
        ] {
            let body = match method {
                "POST" if path == "/1.0/projects" => serde_json::json!({"name": "c"}),
                "POST" => serde_json::json!({"name": "z"}),
                _ => put.clone(),
            };
            let (got, answer) = api.call(key, method, path, Some(body)).await;
            assert_eq!(got, status, "{method} {path}: {answer}");
            assert!(
                !answer["error"].as_str().unwrap_or_default().contains("b_"),
                "{answer}"
            );
        }
        assert_eq!(api.model().await, before);
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fleet_keys_manage_projects_with_etags_and_clear_errors() {
        let api = Api::start().await;
        let before = api.model().await;
        for (config, needle) in [
            (serde_json::json!({"limits.cpu": "-1"}), "limits.cpu"),
            (
                serde_json::json!({"limits.memory": "lots"}),
                "limits.memory",
            ),
            (serde_json::json!({"limits.bogus": "1"}), "limits.bogus"),
            (serde_json::json!({"restricted": "maybe"}), "restricted"),
        ] {
            let (status, body) = api
                .call(
                    OPERATOR,
                    "POST",
                    "/1.0/projects",
                    Some(serde_json::json!({"name": "c", "config": config})),
                )
                .await;
            assert_eq!(status, 400, "{body}");
            assert!(body["error"].as_str().unwrap().contains(needle), "{body}");
            let (status, body) = api
                .call(
                    ADMIN,
                    "PATCH",
                    "/1.0/projects/a",
                    Some(serde_json::json!({ "config": config })),
                )
                .await;
            assert_eq!(status, 400, "{body}");
        }
        for bad in ["1c", "c_d", ""] {
            let (status, _) = api
                .call(
                    ADMIN,
                    "POST",
                    "/1.0/projects",
                    Some(serde_json::json!({ "name": bad })),
                )
                .await;
            assert_eq!(status, 400, "{bad:?}");
        }
        assert_eq!(api.model().await, before, "bad requests change nothing");

        let (status, body) = api
            .call(
                OPERATOR,
                "POST",
                "/1.0/projects",
                Some(serde_json::json!({"name": "c", "description": "team c", "config": {"limits.instances": "2", "restricted": "true"}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        for (filter, want) in [
            ("name%20eq%20c", serde_json::json!(["/1.0/projects/c"])),
            (
                "description%20eq%20%22team%20c%22",
                serde_json::json!(["/1.0/projects/c"]),
            ),
            (
                "config.restricted%20eq%20true%20or%20name%20eq%20a",
                serde_json::json!(["/1.0/projects/a", "/1.0/projects/c"]),
            ),
            (
                "not%20config.limits.instances%20eq%20%22%22",
                serde_json::json!(["/1.0/projects/c"]),
            ),
        ] {
            let (status, list) = api
                .call(
                    OPERATOR,
                    "GET",
                    &format!("/1.0/projects?filter={filter}"),
                    None,
                )
                .await;
            assert_eq!(
                (status, &list["metadata"]),
                (200, &want),
                "{filter}: {list}"
            );
        }
        let (status, bad) = api
            .call(ADMIN, "GET", "/1.0/projects?filter=name%20eq", None)
            .await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(
            body["metadata"]["used_by"],
            serde_json::json!(["/1.0/profiles/default?project=c"])
        );
        let (status, _) = api
            .call(
                OPERATOR,
                "POST",
                "/1.0/projects",
                Some(serde_json::json!({"name": "c"})),
            )
            .await;
        assert_eq!(status, 409);

        // PATCH merges (null removes); PUT replaces; If-Match guards both.
        let first = api.send(ADMIN, "GET", "/1.0/projects/c", None, &[]).await;
        let etag = first.headers["etag"].to_str().unwrap().to_string();
        let (status, body) = api
            .call(
                ADMIN,
                "PATCH",
                "/1.0/projects/c",
                Some(serde_json::json!({"config": {"limits.memory": "1GiB", "restricted": null}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["metadata"]["config"],
            serde_json::json!({"limits.instances": "2", "limits.memory": "1GiB"})
        );
        assert_eq!(body["metadata"]["description"], "team c");
        let stale = api
            .send(
                ADMIN,
                "PUT",
                "/1.0/projects/c",
                Some(serde_json::json!({"config": {}})),
                &[("if-match", &etag)],
            )
            .await;
        assert_eq!(stale.status, 412, "{}", stale.body);
        let now = api.send(ADMIN, "GET", "/1.0/projects/c", None, &[]).await;
        let etag = now.headers["etag"].to_str().unwrap().to_string();
        let put = api
            .send(
                ADMIN,
                "PUT",
                "/1.0/projects/c",
                Some(serde_json::json!({"config": {"limits.cpu": "4"}})),
                &[("if-match", &etag)],
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.body);
        assert_eq!(
            put.body["metadata"]["config"],
            serde_json::json!({"limits.cpu": "4"})
        );
        assert_eq!(put.body["metadata"]["description"], "");

        let (_, body) = api.call(ADMIN, "GET", "/1.0/projects/c/state", None).await;
        assert_eq!(
            body["metadata"]["resources"]["cpu"],
            serde_json::json!({"limit": 4, "usage": 0})
        );
        assert_eq!(
            body["metadata"]["resources"]["memory"],
            serde_json::json!({"limit": -1, "usage": 0})
        );

        // Rename, then delete; default is neither.
        let (status, body) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/projects/c",
                Some(serde_json::json!({"name": "d"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(api.call(ADMIN, "GET", "/1.0/projects/c", None).await.0, 404);
        assert_eq!(
            api.call(ADMIN, "DELETE", "/1.0/projects/d", None).await.0,
            200
        );
        assert_eq!(
            api.call(ADMIN, "DELETE", "/1.0/projects/default", None)
                .await
                .0,
            400
        );
        let (_, body) = api.call(OPERATOR, "GET", "/1.0/projects", None).await;
        assert_eq!(
            body["metadata"],
            serde_json::json!([
                "/1.0/projects/a",
                "/1.0/projects/b",
                "/1.0/projects/default"
            ])
        );
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quota_below_use_is_refused_and_changes_nothing() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        api.add_instance("a", "web1", &[("limits.memory", "256MiB")])
            .await;
        api.add_instance("a", "web2", &[("limits.memory", "256MiB")])
            .await;
        let (_, body) = api.call(MEMBER_A, "GET", "/1.0/projects/a", None).await;
        let used_by = body["metadata"]["used_by"].as_array().unwrap();
        assert!(
            used_by.contains(&"/1.0/instances/web1?project=a".into()),
            "{body}"
        );
        let before = api.model().await;
        for config in [
            serde_json::json!({"limits.instances": "1"}),
            serde_json::json!({"limits.memory": "300MiB"}),
        ] {
            let (status, body) = api
                .call(
                    ADMIN,
                    "PATCH",
                    "/1.0/projects/a",
                    Some(serde_json::json!({ "config": config })),
                )
                .await;
            assert_eq!(status, 403, "{body}");
            assert!(
                body["error"].as_str().unwrap().contains("already use"),
                "{body}"
            );
        }
        assert_eq!(api.model().await, before);
        // Exactly at the use is fine.
        let (status, body) = api
            .call(ADMIN, "PATCH", "/1.0/projects/a", Some(serde_json::json!({"config": {"limits.instances": "2", "limits.memory": "512MiB"}})))
            .await;
        assert_eq!(status, 200, "{body}");
        let (_, body) = api
            .call(MEMBER_A, "GET", "/1.0/projects/a/state", None)
            .await;
        assert_eq!(
            body["metadata"]["resources"]["instances"],
            serde_json::json!({"limit": 2, "usage": 2})
        );
        assert_eq!(
            body["metadata"]["resources"]["memory"],
            serde_json::json!({"limit": 512i64 << 20, "usage": 512i64 << 20})
        );
        // A project with instances is not deleted.
        assert_eq!(
            api.call(ADMIN, "DELETE", "/1.0/projects/a", None).await.0,
            409
        );
        api.cp.shutdown().await;
    }
}
