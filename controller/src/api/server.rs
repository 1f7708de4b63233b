//! `GET /` and `GET /1.0`: what this server is.

use axum::extract::State;
use axum::response::Response;
use berth_proto::api::{self, API_EXTENSIONS, API_VERSION};

use super::operations::sync;
use super::{ApiError, Scope, SharedState};

/// `GET /`: the supported API versions (no auth, as in LXD).
pub async fn get_root() -> Response {
    sync(vec![format!("/{API_VERSION}")])
}

/// `GET /1.0`: the server, and who is asking: `environment.auth_user_name` (the key's name),
/// `auth_role`, and `project` (the `?project=` one; a member's or viewer's own).
pub async fn get_server(
    State(state): State<SharedState>,
    scope: Scope,
) -> Result<Response, ApiError> {
    let who = scope.identity;
    let node_count = state.cp.read_local(|s| s.nodes.len());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let server = api::Server {
        api_extensions: API_EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        api_status: "stable".into(),
        api_version: API_VERSION.into(),
        auth: "trusted".into(),
        auth_methods: vec!["bearer".into()],
        environment: api::ServerEnvironment {
            server: "berth".into(),
            server_name: state.name.clone(),
            server_version: berth_proto::VERSION.into(),
            server_clustered: node_count > 1,
            server_pid: std::process::id(),
            kernel,
            storage: String::new(),
            auth_user_name: who.key_name,
            auth_role: who.role.as_str().to_string(),
            project: scope.project,
        },
    };
    Ok(sync(server))
}
