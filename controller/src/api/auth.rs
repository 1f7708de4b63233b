//! Who is asking and what they may see: API keys (`berth_<id>_<secret>`, stored as sha256,
//! compared in constant time), roles, and the project a request works in.
//!
//! Every handler of a project-scoped resource takes a [`Scope`]: the caller's [`Identity`] and
//! the project the request names (`?project=`, default `default`). A member or viewer key is
//! confined to its own project: naming any other one answers 404 as if it did not exist, so a
//! tenant learns nothing about other tenants. Handlers then call [`Scope::require_write`]
//! before changing anything (403 for a viewer: the object is visible, the change is not
//! allowed) and build commands with [`Scope::by`] so lifecycle events name the key.

use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;
use sha2::{Digest, Sha256};

use super::{ApiError, SharedState};
use crate::state::{ApiKey, Command, DEFAULT_PROJECT, Project, Requestor, Role, State as Model};

/// The prefix of every key Berth issues.
pub const KEY_PREFIX: &str = "berth_";

/// Longest `Authorization` value considered.
const MAX_KEY_LEN: usize = 256;

/// Who made a request (from its API key).
#[derive(Debug, Clone)]
pub struct Identity {
    pub key_id: String,
    pub key_name: String,
    pub role: Role,
    /// The key's project (meaningful for member and viewer keys).
    pub project: String,
}

impl Identity {
    /// The requestor recorded with the changes this identity makes.
    pub fn requestor(&self) -> Requestor {
        Requestor {
            key: self.key_name.clone(),
            key_id: self.key_id.clone(),
            role: self.role.as_str().to_string(),
        }
    }

    /// Admin or operator: the fleet and every project.
    pub fn is_fleet(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Operator)
    }

    /// 403 unless the key is an admin's (key management, controller membership).
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(forbidden(self, "this needs an admin key"))
        }
    }

    /// 403 unless the key is an admin's or an operator's (nodes, projects, cluster settings).
    pub fn require_fleet(&self) -> Result<(), ApiError> {
        if self.is_fleet() {
            Ok(())
        } else {
            Err(forbidden(self, "this needs an admin or operator key"))
        }
    }
}

fn forbidden(id: &Identity, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "{what}; key {:?} is {} {} key",
            id.key_name,
            if matches!(id.role, Role::Admin | Role::Operator) {
                "an"
            } else {
                "a"
            },
            id.role.as_str()
        ),
    )
}

/// A new key: its public id and the whole secret to hand out once.
pub fn new_key_secret() -> Result<(String, String), ApiError> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    let id = hex::encode(id);
    let whole = key_secret_for(&id)?;
    Ok((id, whole))
}

/// A new whole key (`berth_<id>_<64 hex>`) for the key id `id` (rotation keeps the id).
pub fn key_secret_for(id: &str) -> Result<String, ApiError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(format!("{KEY_PREFIX}{id}_{}", hex::encode(secret)))
}

/// hex sha256 of a whole key as sent in `Authorization: Bearer`: what the state stores.
pub fn key_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key a bearer secret authenticates, if any, and only while it has not expired at `now`
/// (RFC 3339). Keys of the form `berth_<id>_<secret>` are found by id; older keys (a bare
/// secret) by their hash. The hash is always computed and compared once in constant time,
/// against a dummy when the id is unknown, so that an unknown, a wrong, an expired and a
/// revoked key cost the same.
pub fn authenticate_secret(state: &Model, secret: &str, now: &str) -> Option<ApiKey> {
    let hash = key_hash(secret);
    let candidate = match secret
        .strip_prefix(KEY_PREFIX)
        .and_then(|rest| rest.split_once('_'))
    {
        Some((id, _)) => state.api_keys.get(id),
        None => state.api_key_by_hash(&hash),
    };
    const DUMMY: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    let stored = candidate.map_or(DUMMY, |k| k.hash.as_str());
    let matches = constant_time_eq(stored.as_bytes(), hash.as_bytes());
    let key = candidate.filter(|_| matches)?;
    let live = key.works_at(now);
    live.then(|| key.clone())
}

/// Every request under `/1.0` needs `Authorization: Bearer <key>`; a missing, malformed,
/// unknown, revoked or expired key gets the same 401 and nothing else.
pub async fn authenticate(
    State(state): State<SharedState>,
    mut req: Request,
    next: Next,
) -> Response {
    let secret = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.len() <= MAX_KEY_LEN);
    let now = crate::clock::now();
    let key = secret.and_then(|s| state.cp.read_local(|m| authenticate_secret(m, &s, &now)));
    match key {
        Some(k) => {
            req.extensions_mut().insert(Identity {
                key_id: k.id,
                key_name: k.name,
                role: k.role,
                project: k.project,
            });
            next.run(req).await
        }
        None => ApiError::unauthorized().into_response(),
    }
}

/// The caller and the project a request works in.
#[derive(Debug, Clone)]
pub struct Scope {
    pub identity: Identity,
    /// Set when the request carries an `Idempotency-Key` (by the idempotency middleware):
    /// [`Scope::by`] tags each write with it.
    pub idempotency: Option<std::sync::Arc<super::idempotency::RequestContext>>,
    /// The project named by `?project=` (default `default`). For member and viewer keys it is
    /// always the key's own project.
    pub project: String,
}

impl Scope {
    /// Resolves the project of a request for `identity`: `requested` (from `?project=`;
    /// empty means the key's project for member and viewer keys, `default` otherwise).
    /// A project-scoped key naming another project gets 404, as does an unknown project.
    pub fn resolve(model: &Model, identity: Identity, requested: &str) -> Result<Scope, ApiError> {
        let project = if requested.is_empty() {
            if identity.role.is_project_scoped() {
                identity.project.clone()
            } else {
                DEFAULT_PROJECT.to_string()
            }
        } else {
            requested.to_string()
        };
        let not_found = || ApiError::not_found(format!("project {project:?} not found"));
        if identity.role.is_project_scoped() && project != identity.project {
            return Err(not_found());
        }
        if !model.project_exists(&project) {
            return Err(not_found());
        }
        Ok(Scope {
            identity,
            project,
            idempotency: None,
        })
    }

    /// 403 for a viewer key: it reads its project but changes nothing.
    pub fn require_write(&self) -> Result<(), ApiError> {
        if self.identity.role == Role::Viewer {
            Err(forbidden(&self.identity, "this changes the project"))
        } else {
            Ok(())
        }
    }

    /// Whether the project's keys are held back (`restricted=true`) and this key is one of
    /// them: no `--target`, no node listing, no privileged instances.
    pub fn restricted(&self, model: &Model) -> bool {
        self.identity.role.is_project_scoped()
            && crate::state::project_restricted(model.projects.get(&self.project))
    }

    /// 403 when the key is restricted (see [`Scope::restricted`]); `what` says what was asked.
    pub fn require_unrestricted(&self, model: &Model, what: &str) -> Result<(), ApiError> {
        if self.restricted(model) {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "project {:?} is restricted: {what} is not allowed",
                    self.project
                ),
            ))
        } else {
            Ok(())
        }
    }

    /// The project record (the default project may have none on old states).
    pub fn project_record<'a>(&self, model: &'a Model) -> Option<&'a Project> {
        model.projects.get(&self.project)
    }

    /// The state key of an object of this project named `name` (instances, profiles).
    pub fn key(&self, name: &str) -> String {
        crate::state::scoped_name(&self.project, name)
    }

    /// The state key of an image alias of this project.
    pub fn alias_key(&self, alias: &str) -> String {
        crate::state::alias_key(&self.project, alias)
    }

    /// `command` on behalf of this key: lifecycle events name it.
    pub fn by(&self, command: Command) -> Command {
        Command::By {
            requestor: self.identity.requestor(),
            idempotency: self.idempotency.as_ref().map(|c| c.next_tag()),
            command: Box::new(command),
        }
    }

    /// `?project=P` to append to URLs of this project's objects (empty for `default`).
    pub fn url_suffix(&self) -> String {
        super::instances::project_suffix(&self.project)
    }
}

#[derive(serde::Deserialize)]
struct ProjectQuery {
    #[serde(default)]
    project: String,
}

impl FromRequestParts<SharedState> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &SharedState) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Identity>()
            .cloned()
            .ok_or_else(ApiError::unauthorized)
    }
}

impl FromRequestParts<SharedState> for Scope {
    type Rejection = ApiError;

    /// Reads `?project=` (other query parameters are left to the handler's own `Query`) and
    /// checks it against the key with the local copy of the state. Handlers that act on what
    /// they find read the state again (linearizably) anyway.
    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let identity = Identity::from_request_parts(parts, state).await?;
        let q = axum::extract::Query::<ProjectQuery>::try_from_uri(&parts.uri)
            .map(|q| q.0)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
        if q.project.len() > 63 {
            return Err(ApiError::bad_request(
                "project name is longer than 63 characters",
            ));
        }
        let mut scope = state
            .cp
            .read_local(|m| Scope::resolve(m, identity, &q.project))?;
        scope.idempotency = parts
            .extensions
            .get::<std::sync::Arc<super::idempotency::RequestContext>>()
            .cloned();
        Ok(scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with(key: ApiKey) -> Model {
        let mut m = Model::default();
        m.api_keys.insert(key.id.clone(), key);
        m
    }

    fn key(id: &str, secret: &str, expires: Option<&str>) -> ApiKey {
        ApiKey {
            id: id.into(),
            name: format!("k-{id}"),
            hash: key_hash(secret),
            role: Role::Member,
            project: "default".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            expires_at: expires.map(Into::into),
        }
    }

    #[test]
    fn keys_by_id_and_legacy_keys_by_hash() {
        let secret = "berth_0123456789abcdef_aa55";
        let m = model_with(key("0123456789abcdef", secret, None));
        let now = "2026-06-01T00:00:00Z";
        assert!(authenticate_secret(&m, secret, now).is_some());
        assert!(authenticate_secret(&m, "berth_0123456789abcdef_aa56", now).is_none());
        assert!(authenticate_secret(&m, "berth_ffffffffffffffff_aa55", now).is_none());
        assert!(authenticate_secret(&m, "berth_", now).is_none());
        let legacy = model_with(key("old", "deadbeef", None));
        assert!(authenticate_secret(&legacy, "deadbeef", now).is_some());
        assert!(authenticate_secret(&legacy, "deadbeee", now).is_none());
    }

    #[test]
    fn expired_keys_fail() {
        let secret = "berth_0123456789abcdef_aa55";
        let m = model_with(key(
            "0123456789abcdef",
            secret,
            Some("2026-03-01T00:00:00Z"),
        ));
        assert!(authenticate_secret(&m, secret, "2026-02-28T23:59:59Z").is_some());
        assert!(authenticate_secret(&m, secret, "2026-03-01T00:00:00Z").is_none());
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn scoped_keys_cannot_leave_their_project() {
        let mut m = Model::default();
        m.projects.insert(
            "a".into(),
            Project {
                name: "a".into(),
                ..Default::default()
            },
        );
        m.projects.insert(
            "b".into(),
            Project {
                name: "b".into(),
                ..Default::default()
            },
        );
        let member = Identity {
            key_id: "1".into(),
            key_name: "alice".into(),
            role: Role::Member,
            project: "a".into(),
        };
        assert_eq!(Scope::resolve(&m, member.clone(), "").unwrap().project, "a");
        assert_eq!(
            Scope::resolve(&m, member.clone(), "a").unwrap().project,
            "a"
        );
        let e = Scope::resolve(&m, member.clone(), "b").unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e2 = Scope::resolve(&m, member, "nope").unwrap_err();
        assert_eq!(e2.status, StatusCode::NOT_FOUND);
        let admin = Identity {
            role: Role::Admin,
            ..Identity {
                key_id: "2".into(),
                key_name: "root".into(),
                role: Role::Admin,
                project: "default".into(),
            }
        };
        assert_eq!(
            Scope::resolve(&m, admin.clone(), "").unwrap().project,
            "default"
        );
        assert_eq!(Scope::resolve(&m, admin.clone(), "b").unwrap().project, "b");
        assert!(Scope::resolve(&m, admin, "nope").is_err());
    }
}
