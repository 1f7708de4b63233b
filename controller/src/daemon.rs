//! Starting `berthd`: open the replicated state, bootstrap a new cluster, load TLS material,
//! and run the REST API and the leader loops until asked to stop.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::agents::AgentPool;
use crate::api::{self, AppState};
use crate::config::Config;
use crate::raft::ControlPlane;
use crate::state::{ApiKey, Command, Role};
use crate::tls::{CertifiedKeyPem, ClusterCa};
use crate::{clock, reconcile};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the replicated state cannot be opened: {0}")]
    State(String),
    #[error("no leader was elected within {0:?}")]
    NoLeader(Duration),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` with `mode`, atomically (temp file + rename).
pub fn write_private(path: &Path, contents: &str, mode: u32) -> Result<(), StartError> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Files a new cluster leaves for its operator, under the state directory.
pub struct BootstrapFiles;

impl BootstrapFiles {
    /// The admin API key (root-only).
    pub const ADMIN_KEY: &'static str = "admin.key";
    /// The cluster CA certificate (public).
    pub const CA: &'static str = "cluster.crt";
    /// A join token for the first agent (root-only); removed by nobody, valid 24 hours.
    pub const JOIN_TOKEN: &'static str = "join-token";
}

/// Runs the controller until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let dir = &cfg.state_dir;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;

    let cp = ControlPlane::open(
        &dir.join("raft"),
        cfg.node_id,
        cfg.peer_listen.to_string(),
        true,
        None,
    )
    .await
    .map_err(|e| StartError::State(e.to_string()))?;

    // A single-voter cluster elects itself at once; give a slow disk some slack.
    let wait = Duration::from_secs(30);
    let deadline = tokio::time::Instant::now() + wait;
    while !cp.is_leader() {
        if tokio::time::Instant::now() > deadline {
            return Err(StartError::NoLeader(wait));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let bootstrapped = cp.read_local(|s| s.cluster.bootstrapped);
    let mut first_token = None;
    if !bootstrapped {
        let ca = ClusterCa::generate(&cfg.cluster_name)?;
        let secret = api::cluster::random_secret().map_err(|e| StartError::State(e.message))?;
        let now = clock::now();
        cp.write(Command::Bootstrap {
            name: cfg.cluster_name.clone(),
            ca_cert_pem: ca.cert_pem.clone(),
            ca_key_pem: ca.key_pem.clone(),
            admin_key: ApiKey {
                id: uuid::Uuid::new_v4().simple().to_string(),
                name: "admin".into(),
                hash: api::key_hash(&secret),
                role: Role::Admin,
                project: "default".into(),
                created_at: now.clone(),
                expires_at: None,
            },
            now,
        })
        .await
        .map_err(|e| StartError::State(e.to_string()))?;
        write_private(
            &dir.join(BootstrapFiles::ADMIN_KEY),
            &format!("{secret}\n"),
            0o600,
        )?;
        info!(path = %dir.join(BootstrapFiles::ADMIN_KEY).display(), "cluster bootstrapped; the admin API key is in this file");
        first_token = Some(());
    }
    let ca = cp.read_local(|s| ClusterCa {
        cert_pem: s.cluster.ca_cert_pem.clone(),
        key_pem: s.cluster.ca_key_pem.clone(),
    });
    write_private(&dir.join(BootstrapFiles::CA), &ca.cert_pem, 0o644)?;

    // This controller's certificate: for the REST API and as the client identity towards agents.
    let mut names = vec![
        berth_proto::CONTROLLER_TLS_NAME.to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "localhost".to_string(),
        cfg.name.clone(),
        crate::config::host_name(),
    ];
    if !cfg.api_listen.ip().is_unspecified() {
        names.push(cfg.api_listen.ip().to_string());
    }
    names.extend(cfg.api_names.iter().cloned());
    names.sort();
    names.dedup();
    let cert = load_or_issue(dir, &ca, &cfg.name, &names)?;
    let tls = crate::tls::api_server_config(&cert, &ca.cert_pem)?;

    let state = Arc::new(AppState {
        cp: cp.clone(),
        agents: AgentPool::new(
            ca.cert_pem.clone(),
            cert.cert_pem.clone(),
            cert.key_pem.clone(),
        ),
        ca: ca.clone(),
        name: cfg.name.clone(),
        execs: Default::default(),
        metrics: Default::default(),
        liveness: crate::liveness::Liveness::new(crate::liveness::DEFAULT_OFFLINE_THRESHOLD),
        instance_locks: Default::default(),
    });

    if first_token.is_some() {
        let api_addr = if cfg.api_listen.ip().is_unspecified() {
            format!("127.0.0.1:{}", cfg.api_listen.port())
        } else {
            cfg.api_listen.to_string()
        };
        let first_node = berth_proto::api::names::node_name_from_host(&crate::config::host_name());
        match api::cluster::issue_join_token(&state, &first_node, vec![api_addr]).await {
            Ok(token) => write_private(
                &dir.join(BootstrapFiles::JOIN_TOKEN),
                &format!("{token}\n"),
                0o600,
            )?,
            Err(e) => warn!(error = %e, "could not make a join token for the first node"),
        }
    }

    // Operations running before this controller serves anything were interrupted.
    let interrupted: Vec<String> = cp.read_local(|s| {
        s.operations
            .values()
            .filter(|o| !o.status.is_final())
            .map(|o| o.id.clone())
            .collect()
    });
    let listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.api_listen,
            source,
        })?;
    let app = api::router(state.clone());
    let api_task = tokio::spawn(async move {
        if let Err(e) = api::serve(listener, tls, app).await {
            error!(error = %e, "the REST API stopped");
        }
    });

    // The Raft peer service is for other controllers. A single-voter cluster has none, and
    // an unauthenticated peer port would let anyone who reaches it rewrite the state, so it is
    // not served until controllers can join with mutual TLS (the replicated control plane).
    let peer_addr = cfg.peer_listen;
    info!(
        peer = %peer_addr,
        "single controller: the Raft peer service is not served"
    );
    let recovering = state.clone();
    tokio::spawn(async move { reconcile::recover_interrupted(&recovering, interrupted).await });
    let observer = tokio::spawn(reconcile::run(state.clone()));
    info!(name = %cfg.name, api = %cfg.api_listen, "berthd is running");

    shutdown_signal().await;
    info!("shutting down");
    api_task.abort();
    observer.abort();
    cp.shutdown().await;
    Ok(())
}

fn load_or_issue(
    dir: &Path,
    ca: &ClusterCa,
    name: &str,
    names: &[String],
) -> Result<CertifiedKeyPem, StartError> {
    let tls_dir = dir.join("tls");
    std::fs::create_dir_all(&tls_dir).map_err(io_err(&tls_dir))?;
    let cert_path = tls_dir.join("server.crt");
    let key_path = tls_dir.join("server.key");
    let names_path = tls_dir.join("server.names");
    let wanted = format!("{}\n{}", ca.fingerprint()?, names.join(","));
    if let (Ok(cert_pem), Ok(key_pem), Ok(have)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
        std::fs::read_to_string(&names_path),
    ) && have == wanted
    {
        return Ok(CertifiedKeyPem { cert_pem, key_pem });
    }
    let cert = ca.issue(name, names)?;
    write_private(&key_path, &cert.key_pem, 0o600)?;
    write_private(&cert_path, &cert.cert_pem, 0o644)?;
    write_private(&names_path, &wanted, 0o644)?;
    Ok(cert)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
