//! `GET /1.0/metrics`: cluster-wide figures in the Prometheus text format, from any controller.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::{ApiError, Scope, SharedState};
use crate::metrics::{ClusterFigures, ProjectFigures, RaftFigures, render, render_projects};

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /1.0/metrics`: instances, nodes, operations, reconciler queue (from this controller's copy of the
/// replicated state, without a read barrier, so that a controller cut off from the leader
/// still answers), this controller's Raft figures, its API request figures, and per-project
/// figures, for fleet keys. A member or viewer key gets only its own project's figures
/// (its instances by status, its use and quotas): nothing about the fleet or other projects.
pub async fn get(State(state): State<SharedState>, scope: Scope) -> Result<Response, ApiError> {
    if !scope.identity.is_fleet() {
        let project = state
            .cp
            .read_local(|s| ProjectFigures::from_state(s, &scope.project));
        let text = render_projects(&[project]);
        return Ok(([(http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response());
    }
    let (cluster, projects) = state
        .cp
        .read_local(|s| (ClusterFigures::from_state(s), ProjectFigures::all(s)));
    let raft = {
        let rx = state.cp.raft().metrics();
        let m = rx.borrow();
        RaftFigures::from_metrics(&m, state.metrics.leader_changes())
    };
    let queue_depth = crate::reconcile::queue_depth(&state) as u64;
    let mut text = render(
        &state.name,
        &cluster,
        &raft,
        &state.metrics.api_figures(),
        Some(queue_depth),
    );
    text.push_str(&render_projects(&projects));
    Ok(([(http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use tower::ServiceExt as _;

    use crate::api::{AppState, key_hash, router};
    use crate::raft::ControlPlane;
    use crate::state::{ApiKey, Command, Role};

    #[tokio::test]
    async fn metrics_endpoint_answers_prometheus_text() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path(), 1, "127.0.0.1:1".into(), true, None)
            .await
            .unwrap();
        assert!(cp.wait_for_leader(Duration::from_secs(10)).await.is_some());
        cp.write(Command::AddApiKey {
            key: ApiKey {
                id: "k1".into(),
                name: "admin".into(),
                hash: key_hash("secret"),
                role: Role::Admin,
                ..Default::default()
            },
        })
        .await
        .unwrap();
        let ca = crate::tls::ClusterCa::generate("test").unwrap();
        let state = AppState::for_test(cp.clone(), ca);
        let app = router(state);
        let get = |path: &str, key: Option<&str>| {
            let mut b = http::Request::builder().uri(path);
            if let Some(k) = key {
                b = b.header("authorization", format!("Bearer {k}"));
            }
            b.body(Body::empty()).unwrap()
        };
        // Without a key: 401, and that request is counted too.
        let resp = app
            .clone()
            .oneshot(get("/1.0/metrics", None))
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let resp = app
            .clone()
            .oneshot(get("/1.0/instances/nope", Some("secret")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let resp = app
            .clone()
            .oneshot(get("/1.0/metrics", Some("secret")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        for line in [
            "berth_raft_is_leader{controller=\"c1\"} 1",
            "berth_raft_leader_id{controller=\"c1\"} 1",
            "berth_raft_state{controller=\"c1\",state=\"Leader\"} 1",
            "berth_raft_voters{controller=\"c1\"} 1",
            "berth_reconcile_queue_depth 0",
            "berth_api_requests_total{controller=\"c1\",method=\"GET\",route=\"/1.0/metrics\",status=\"401\"} 1",
            "berth_api_requests_total{controller=\"c1\",method=\"GET\",route=\"/1.0/instances/{name}\",status=\"404\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            text.contains("berth_raft_commit_index{controller=\"c1\"} "),
            "{text}"
        );
        assert!(
            !text.contains("/1.0/instances/nope"),
            "raw paths never become labels"
        );
        cp.shutdown().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod project_tests {
    use axum::body::Body;
    use tower::ServiceExt as _;

    use crate::api::projects::testkit::*;

    async fn text(api: &Api, key: &str) -> String {
        let req = http::Request::builder()
            .uri("/1.0/metrics")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        let resp = api.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_project_key_gets_its_project_figures_only() {
        let api = Api::start().await;
        api.add_node_and_image().await;
        api.cp
            .write(crate::state::Command::UpdateProject {
                name: "a".into(),
                description: String::new(),
                config: [("limits.instances".to_string(), "3".to_string())].into(),
            })
            .await
            .unwrap();
        api.add_instance("a", "web1", &[]).await;
        api.add_instance("b", "db1", &[]).await;
        api.add_instance("b", "db2", &[]).await;

        let member = text(&api, MEMBER_A).await;
        for line in [
            "berth_project_instances{project=\"a\",status=\"Stopped\"} 1",
            "berth_project_usage{project=\"a\",resource=\"instances\"} 1",
            "berth_project_limit{project=\"a\",resource=\"instances\"} 3",
        ] {
            assert!(
                member.lines().any(|l| l == line),
                "missing {line:?} in\n{member}"
            );
        }
        for absent in [
            "project=\"b\"",
            "berth_nodes",
            "berth_raft",
            "berth_api_requests",
            "n1",
        ] {
            assert!(!member.contains(absent), "{absent} in\n{member}");
        }
        assert!(text(&api, VIEWER_A).await.contains("project=\"a\""));

        let fleet = text(&api, OPERATOR).await;
        for line in [
            "berth_instances{status=\"Stopped\"} 3",
            "berth_project_instances{project=\"b\",status=\"Stopped\"} 2",
            "berth_project_instances{project=\"default\",status=\"Stopped\"} 0",
        ] {
            assert!(
                fleet.lines().any(|l| l == line),
                "missing {line:?} in\n{fleet}"
            );
        }
        api.cp.shutdown().await;
    }
}
