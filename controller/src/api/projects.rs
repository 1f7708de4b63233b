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

/// Whether `who` may see project `name`: fleet keys see all, others their own.
fn visible(who: &Identity, name: &str) -> bool {
    who.is_fleet() || who.project == name
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("project {name:?} not found"))
}

/// `?project=P` for URLs of objects of project `name` (empty for `default`).
fn suffix(name: &str) -> String {
    if name == DEFAULT_PROJECT {
        String::new()
    } else {
        format!("?project={name}")
    }
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
    let sfx = suffix(name);
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
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let projects: Vec<t::Project> = state
        .cp
        .read(|s| {
            project_names(s)
                .into_iter()
                .filter(|n| visible(&who, n))
                .filter_map(|n| project_view(s, &n))
                .collect()
        })
        .await?;
    if q.recursion() == 0 {
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
    let mut command = Command::UpdateProject {
        name: name.to_string(),
        description,
        config,
    };
    if let Some(etag) = expect {
        command = Command::IfMatch {
            expect: vec![(ObjectKey::Project(name.to_string()), etag)],
            command: Box::new(command),
        };
    }
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
