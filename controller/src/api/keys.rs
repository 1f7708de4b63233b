//! `/1.0/keys`: API keys, managed by admins only (every other key gets 403). Secrets are
//! shown once, when a key is made or rotated; the state keeps only their hash.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use berth_proto::api::names;
use berth_proto::api::tenancy::{self as t, KeyCreated, KeyRotatePost, KeysPost, parse_duration};
use tracing::info;

use super::auth::{key_hash, key_secret_for, new_key_secret};
use super::operations::sync;
use super::projects::{Caller, ListQuery};
use super::{ApiError, JsonBody, SharedState};
use crate::clock;
use crate::state::{ApiKey, Command, DEFAULT_PROJECT, Role};

/// A key as the API shows it at `now` (RFC 3339): never its hash.
pub fn key_view(k: &ApiKey, now: &str) -> t::ApiKey {
    t::ApiKey {
        name: k.name.clone(),
        id: k.id.clone(),
        role: k.role.as_str().to_string(),
        project: k.project.clone(),
        created_at: k.created_at.clone(),
        expires_at: k.expires_at.clone().unwrap_or_default(),
        expired: k.expires_at.as_deref().is_some_and(|e| e <= now),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("api key {name:?} not found"))
}

/// When a key made now for `expires_in` (`30d`; empty: never) stops working.
fn expiry(expires_in: &str) -> Result<Option<String>, ApiError> {
    if expires_in.trim().is_empty() {
        return Ok(None);
    }
    let secs = parse_duration(expires_in).map_err(ApiError::bad_request)?;
    Ok(Some(clock::after(Duration::from_secs(secs))))
}

/// `GET /1.0/keys`: URLs, or the keys with `?recursion=1` (sorted by name).
pub async fn list(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    scope.identity.require_admin()?;
    let now = clock::now();
    let mut keys: Vec<t::ApiKey> = state
        .cp
        .read(|s| s.api_keys.values().map(|k| key_view(k, &now)).collect())
        .await?;
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    if q.recursion() == 0 {
        return Ok(sync(
            keys.iter()
                .map(|k| format!("/1.0/keys/{}", k.name))
                .collect::<Vec<_>>(),
        ));
    }
    Ok(sync(keys))
}

/// The role and project of a new key: `role` must be one of the four; a member or viewer key
/// belongs to `project` (default `default`); admin and operator keys to no project in
/// particular (`default`), so naming another one is an error.
fn role_and_project(role: &str, project: &str) -> Result<(Role, String), ApiError> {
    let role = Role::parse(role).ok_or_else(|| {
        ApiError::bad_request(format!(
            "role {role:?} is not admin, operator, member or viewer"
        ))
    })?;
    let project = if project.is_empty() {
        DEFAULT_PROJECT
    } else {
        project
    };
    if !role.is_project_scoped() && project != DEFAULT_PROJECT {
        return Err(ApiError::bad_request(format!(
            "{} keys reach every project; leave the project out",
            role.as_str()
        )));
    }
    if role.is_project_scoped() {
        names::validate_project_name(project).map_err(ApiError::bad_request)?;
    }
    Ok((role, project.to_string()))
}

/// `POST /1.0/keys`: a new key; the answer carries its secret, the only time it is shown.
pub async fn create(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    JsonBody(req): JsonBody<KeysPost>,
) -> Result<Response, ApiError> {
    scope.identity.require_admin()?;
    names::validate_key_name(&req.name).map_err(ApiError::bad_request)?;
    let (role, project) = role_and_project(&req.role, &req.project)?;
    let expires_at = expiry(&req.expires_in)?;
    if !state.cp.read(|s| s.project_exists(&project)).await? {
        return Err(ApiError::not_found(format!(
            "project {project:?} not found"
        )));
    }
    let (id, secret) = new_key_secret()?;
    let key = ApiKey {
        id,
        name: req.name.clone(),
        hash: key_hash(&secret),
        role,
        project,
        created_at: clock::now(),
        expires_at,
    };
    state
        .cp
        .write(scope.by(Command::AddApiKey { key: key.clone() }))
        .await?;
    info!(key = %key.name, role = role.as_str(), project = %key.project, by = %scope.identity.key_name, "api key created");
    Ok(sync(KeyCreated {
        key: key_view(&key, &clock::now()),
        secret,
    }))
}

/// The key named `name`.
async fn find(state: &SharedState, name: &str) -> Result<ApiKey, ApiError> {
    state
        .cp
        .read(|s| s.api_key_by_name(name).cloned())
        .await?
        .ok_or_else(|| not_found(name))
}

/// `GET /1.0/keys/{name}`.
pub async fn get_one(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    scope.identity.require_admin()?;
    let key = find(&state, &name).await?;
    Ok(sync(key_view(&key, &clock::now())))
}

/// `DELETE /1.0/keys/{name}`: revokes a key at once; never the last working admin key.
pub async fn delete(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    scope.identity.require_admin()?;
    let key = find(&state, &name).await?;
    // Apply refuses the last working admin key.
    state
        .cp
        .write(scope.by(Command::DeleteApiKey {
            id: key.id,
            now: clock::now(),
        }))
        .await?;
    info!(key = %name, by = %scope.identity.key_name, "api key revoked");
    Ok(sync(serde_json::Value::Null))
}

/// `POST /1.0/keys/{name}/rotate`: a new secret for the key (same name, id, role and
/// project); the old secret stops working at once. `expires_in` gives a new validity from
/// now; empty keeps the current expiry.
pub async fn rotate(
    State(state): State<SharedState>,
    Caller(scope): Caller,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<KeyRotatePost>,
) -> Result<Response, ApiError> {
    scope.identity.require_admin()?;
    let mut key = find(&state, &name).await?;
    let expires_at = match expiry(&req.expires_in)? {
        Some(e) => Some(e),
        None => key.expires_at.clone(),
    };
    // The id stays (it is how the key is found); only the secret part is new.
    let secret = key_secret_for(&key.id)?;
    key.hash = key_hash(&secret);
    key.expires_at = expires_at.clone();
    state
        .cp
        .write(scope.by(Command::RotateApiKey {
            id: key.id.clone(),
            hash: key.hash.clone(),
            expires_at,
        }))
        .await?;
    info!(key = %name, by = %scope.identity.key_name, "api key rotated");
    Ok(sync(KeyCreated {
        key: key_view(&key, &clock::now()),
        secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, role: Role, expires: Option<&str>) -> ApiKey {
        ApiKey {
            id: id.into(),
            name: format!("k-{id}"),
            role,
            expires_at: expires.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn the_last_live_admin_key_is_kept() {
        let now = "2026-06-01T00:00:00Z";
        let mut s = crate::state::State::default();
        let a = key("a", Role::Admin, None);
        s.api_keys.insert("a".into(), a.clone());
        s.api_keys
            .insert("o".into(), key("o", Role::Operator, None));
        assert!(s.is_last_admin(&a, now));
        // An expired admin key does not count.
        s.api_keys.insert(
            "b".into(),
            key("b", Role::Admin, Some("2026-01-01T00:00:00Z")),
        );
        assert!(s.is_last_admin(&a, now));
        let c = key("c", Role::Admin, Some("2027-01-01T00:00:00Z"));
        s.api_keys.insert("c".into(), c.clone());
        assert!(!s.is_last_admin(&a, now));
        assert!(!s.is_last_admin(&c, now));
        assert!(!s.is_last_admin(&s.api_keys["o"].clone(), now));
    }

    #[test]
    fn roles_and_projects_of_new_keys() {
        assert_eq!(
            role_and_project("member", "a").unwrap(),
            (Role::Member, "a".to_string())
        );
        assert_eq!(
            role_and_project("viewer", "").unwrap(),
            (Role::Viewer, "default".to_string())
        );
        assert_eq!(
            role_and_project("admin", "").unwrap(),
            (Role::Admin, "default".to_string())
        );
        assert!(role_and_project("admin", "a").is_err());
        assert!(role_and_project("root", "").is_err());
        assert!(role_and_project("member", "a_b").is_err());
    }

    #[test]
    fn views_never_show_the_hash_and_say_when_expired() {
        let mut k = key("a", Role::Viewer, Some("2026-01-01T00:00:00Z"));
        k.hash = "secret-hash".into();
        let v = key_view(&k, "2026-06-01T00:00:00Z");
        assert!(v.expired);
        assert_eq!(v.role, "viewer");
        assert!(!serde_json::to_string(&v).unwrap().contains("secret-hash"));
        assert!(!key_view(&k, "2025-06-01T00:00:00Z").expired);
    }

    #[test]
    fn expiry_from_durations() {
        assert_eq!(expiry("").unwrap(), None);
        assert!(expiry("30d").unwrap().unwrap() > clock::now());
        assert_eq!(expiry("-1d").unwrap_err().status, 400);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod api_tests {
    use crate::api::projects::testkit::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_admins_manage_keys() {
        let api = Api::start().await;
        for key in [OPERATOR, MEMBER_A, VIEWER_A] {
            for (method, path, body) in [
                ("GET", "/1.0/keys", None),
                ("GET", "/1.0/keys/alice", None),
                (
                    "POST",
                    "/1.0/keys",
                    Some(serde_json::json!({"name": "x", "role": "admin"})),
                ),
                ("DELETE", "/1.0/keys/alice", None),
                (
                    "POST",
                    "/1.0/keys/alice/rotate",
                    Some(serde_json::json!({})),
                ),
            ] {
                let (status, answer) = api.call(key, method, path, body).await;
                assert_eq!(status, 403, "{method} {path}: {answer}");
            }
        }
        api.cp.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_lifecycle_create_use_rotate_revoke() {
        let api = Api::start().await;
        let before = api.model().await;
        for (body, status) in [
            (serde_json::json!({"name": "t", "role": "root"}), 400),
            (
                serde_json::json!({"name": "t", "role": "member", "project": "nope"}),
                404,
            ),
            (
                serde_json::json!({"name": "t", "role": "admin", "project": "a"}),
                400,
            ),
            (serde_json::json!({"name": "1t", "role": "member"}), 400),
            (
                serde_json::json!({"name": "t", "role": "member", "expires_in": "soon"}),
                400,
            ),
            (
                serde_json::json!({"name": "alice", "role": "member", "project": "a"}),
                409,
            ),
        ] {
            let (got, answer) = api
                .call(ADMIN, "POST", "/1.0/keys", Some(body.clone()))
                .await;
            assert_eq!(got, status, "{body}: {answer}");
        }
        assert_eq!(api.model().await, before, "refused keys change nothing");

        let (status, body) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/keys",
                Some(serde_json::json!({"name": "ci", "role": "member", "project": "a", "expires_in": "30d"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let secret = body["metadata"]["secret"].as_str().unwrap().to_string();
        assert!(secret.starts_with("berth_"), "{secret}");
        assert_eq!(body["metadata"]["key"]["project"], "a");
        assert!(
            !body["metadata"]["key"]["expires_at"]
                .as_str()
                .unwrap()
                .is_empty()
        );
        assert_eq!(body["metadata"]["key"]["expired"], false);

        // The new key works, in its project, and says who it is.
        let (status, body) = api.call(&secret, "GET", "/1.0", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["metadata"]["environment"]["auth_user_name"], "ci");
        assert_eq!(body["metadata"]["environment"]["auth_role"], "member");
        assert_eq!(body["metadata"]["environment"]["project"], "a");

        // Listing never shows secrets or hashes.
        let (_, body) = api.call(ADMIN, "GET", "/1.0/keys", None).await;
        assert!(
            body["metadata"]
                .as_array()
                .unwrap()
                .contains(&"/1.0/keys/ci".into())
        );
        let (_, body) = api.call(ADMIN, "GET", "/1.0/keys?recursion=1", None).await;
        let text = body.to_string();
        assert!(!text.contains(&secret[20..]), "{text}");
        assert!(!text.contains("hash"), "{text}");
        assert_eq!(body["metadata"].as_array().unwrap().len(), 6);
        let (status, body) = api.call(ADMIN, "GET", "/1.0/keys/ci", None).await;
        assert_eq!(
            (status, body["metadata"]["role"].as_str()),
            (200, Some("member"))
        );

        // Rotation: the old secret stops, the new one works, the id stays.
        let (status, body) = api
            .call(
                ADMIN,
                "POST",
                "/1.0/keys/ci/rotate",
                Some(serde_json::json!({})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let rotated = body["metadata"]["secret"].as_str().unwrap().to_string();
        assert_ne!(rotated, secret);
        assert_eq!(api.call(&secret, "GET", "/1.0", None).await.0, 401);
        assert_eq!(api.call(&rotated, "GET", "/1.0", None).await.0, 200);
        assert_eq!(
            api.call(
                ADMIN,
                "POST",
                "/1.0/keys/nope/rotate",
                Some(serde_json::json!({}))
            )
            .await
            .0,
            404
        );

        // Revocation: at once; never the last admin key.
        assert_eq!(api.call(ADMIN, "DELETE", "/1.0/keys/ci", None).await.0, 200);
        assert_eq!(api.call(&rotated, "GET", "/1.0", None).await.0, 401);
        assert_eq!(api.call(ADMIN, "DELETE", "/1.0/keys/ci", None).await.0, 404);
        let (status, body) = api.call(ADMIN, "DELETE", "/1.0/keys/admin", None).await;
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("last admin key"),
            "{body}"
        );
        assert_eq!(api.call(ADMIN, "GET", "/1.0", None).await.0, 200);
        api.cp.shutdown().await;
    }
}
