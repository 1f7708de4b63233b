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
use crate::join::{JoinFacts, PeerIdentity};
use crate::peer::HeartbeatSlot;
use crate::raft::{ControlPlane, PeerTls};
use crate::state::{ApiKey, Command, ControllerRecord, JoinKind, Role};
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
    #[error("cannot join the cluster: {0}")]
    Join(crate::join::JoinError),
    #[error("join needs a join token (--token or join_token in the config file)")]
    JoinWithoutToken,
    #[error(
        "the leader did not replicate the cluster state to this controller within {0:?}; check that the other controllers reach this one's peer address {1}"
    )]
    JoinStalled(Duration, String),
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

/// How long a joining controller waits to receive the cluster's state and become a voter.
const JOIN_WAIT: Duration = Duration::from_secs(120);

/// Binds the peer listener and serves it (Raft, Controller) in the background.
async fn spawn_peer_listener(
    cp: &ControlPlane,
    addr: std::net::SocketAddr,
    heartbeats: HeartbeatSlot,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    info!(peer = %addr, "peer listener (raft, controller service) serving with mutual TLS");
    let cp = cp.clone();
    Ok(tokio::spawn(async move {
        if let Err(e) = cp
            .serve(listener, heartbeats, std::future::pending::<()>())
            .await
        {
            error!(error = %e, "the peer listener stopped");
        }
    }))
}

/// The host part of a `host:port`.
fn host_part(addr: &str) -> String {
    addr.rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']'])
        .to_string()
}

/// Waits until `cond` holds, checking every 100 ms, for at most `limit`; logs `what` every
/// 10 s meanwhile.
async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    let mut next_log = start + Duration::from_secs(10);
    while !cond() {
        let now = tokio::time::Instant::now();
        if now - start > limit {
            return false;
        }
        if now >= next_log {
            info!(waited = ?(now - start), "{what}");
            next_log = now + Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Runs the controller until SIGINT or SIGTERM.
///
/// A controller starts in one of three ways: the first controller of a new cluster (no peer
/// identity, no `join`): it bootstraps a single-voter cluster, makes the cluster CA and its own
/// peer certificate; a new controller with `join` and a token: it joins through a running
/// controller and is added to the Raft membership by the leader; a restart (a peer identity
/// in the state directory): it rejoins its cluster with no token.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let dir = &cfg.state_dir;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;

    let mut identity = PeerIdentity::load(dir);
    let mut joined_now = false;
    if identity.is_none() {
        match (&cfg.join, &cfg.join_token) {
            (_, Some(token)) => {
                info!(through = ?cfg.join, name = %cfg.name, "joining the cluster as a new controller");
                let facts = JoinFacts {
                    name: cfg.name.clone(),
                    peer_address: cfg.peer_advertise.clone(),
                    api_address: cfg.api_advertise.clone(),
                };
                let id = crate::join::join(cfg.join.as_deref(), token, &facts)
                    .await
                    .map_err(StartError::Join)?;
                id.save(dir).map_err(StartError::Join)?;
                info!(
                    node = id.raft_id,
                    "joined; waiting for the leader to replicate the cluster state"
                );
                identity = Some(id);
                joined_now = true;
            }
            (Some(_), None) => return Err(StartError::JoinWithoutToken),
            (None, None) => {}
        }
    } else if cfg.join_token.is_some() {
        info!("this controller has joined before; the join token is not needed and is ignored");
    }

    let raft_id = identity.as_ref().map_or(cfg.node_id, |i| i.raft_id);
    let peer_tls = identity
        .as_ref()
        .map(|i| PeerTls::from_pem(&i.ca_pem, &i.cert_pem, &i.key_pem));
    let cp = ControlPlane::open(
        &dir.join("raft"),
        raft_id,
        cfg.peer_advertise.clone(),
        identity.is_none(),
        peer_tls,
    )
    .await
    .map_err(|e| StartError::State(e.to_string()))?;

    // With an identity the peer listener starts at once: a restarted controller must vote and
    // replicate before anything else can happen.
    let heartbeats = HeartbeatSlot::default();
    let mut peer_task = None;
    if identity.is_some() {
        peer_task = Some(spawn_peer_listener(&cp, cfg.peer_listen, heartbeats.clone()).await?);
    }

    let mut first_token = None;
    if identity.is_none() {
        // The first controller of a cluster (or one from before the peer plane): it is the
        // only voter, so it elects itself at once; give a slow disk some slack.
        let wait = Duration::from_secs(30);
        if !wait_until(wait, "waiting to become the leader", || cp.is_leader()).await {
            return Err(StartError::NoLeader(wait));
        }
        if !cp.read_local(|s| s.cluster.bootstrapped) {
            let ca = ClusterCa::generate(&cfg.cluster_name)?;
            let (key_id, secret) =
                api::auth::new_key_secret().map_err(|e| StartError::State(e.message))?;
            let now = clock::now();
            cp.write(Command::Bootstrap {
                name: cfg.cluster_name.clone(),
                ca_cert_pem: ca.cert_pem.clone(),
                ca_key_pem: ca.key_pem.clone(),
                admin_key: ApiKey {
                    id: key_id,
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
        let mut names = vec![
            berth_proto::CONTROLLER_TLS_NAME.to_string(),
            host_part(&cfg.peer_advertise),
            host_part(&cfg.api_advertise),
            cfg.name.clone(),
        ];
        names.sort();
        names.dedup();
        let cert = ca.issue(&cfg.name, &names)?;
        let id = PeerIdentity {
            raft_id,
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            ca_pem: ca.cert_pem.clone(),
        };
        id.save(dir).map_err(StartError::Join)?;
        cp.set_tls(PeerTls::from_pem(&id.ca_pem, &id.cert_pem, &id.key_pem));
        peer_task = Some(spawn_peer_listener(&cp, cfg.peer_listen, heartbeats.clone()).await?);
    } else if !cp.read_local(|s| s.cluster.bootstrapped) {
        // A new member: the leader adds it as a learner and sends it the log or a snapshot.
        if !wait_until(
            JOIN_WAIT,
            "waiting for the leader to replicate the cluster state",
            || cp.read_local(|s| s.cluster.bootstrapped),
        )
        .await
        {
            return Err(StartError::JoinStalled(
                JOIN_WAIT,
                cfg.peer_advertise.clone(),
            ));
        }
    }
    if joined_now {
        if wait_until(JOIN_WAIT, "waiting to be promoted to raft voter", || {
            cp.voters().contains(&raft_id)
        })
        .await
        {
            info!(node = raft_id, "this controller is a raft voter");
        } else {
            warn!(
                node = raft_id,
                "not promoted to voter yet; serving as a learner meanwhile"
            );
        }
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
        host_part(&cfg.api_advertise),
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
        liveness: crate::liveness::Liveness::new(cfg.offline_threshold),
        instance_locks: Default::default(),
        image_pulls: Default::default(),
    });
    let _ = heartbeats.set(state.clone());
    // Count leader changes from the start (for /1.0/metrics).
    state.metrics.watch_raft(cp.raft());

    // Record this controller (name, Raft id, addresses) when its record is missing or stale.
    // The peer certificate is saved by now (joined, or issued above for the first controller).
    let cert_fingerprint = PeerIdentity::load(dir)
        .and_then(|i| crate::tls::cert_fingerprint(&i.cert_pem).ok())
        .unwrap_or_default();
    let me = ControllerRecord {
        name: cfg.name.clone(),
        id: raft_id,
        peer_address: cfg.peer_advertise.clone(),
        api_address: cfg.api_advertise.clone(),
        joined_at: clock::now(),
        cert_fingerprint,
    };
    let registered = cp.read_local(|s| {
        s.controllers.get(&me.name).is_some_and(|r| {
            r.id == me.id
                && r.peer_address == me.peer_address
                && r.api_address == me.api_address
                && r.cert_fingerprint == me.cert_fingerprint
        })
    });
    if !registered {
        let record = ControllerRecord {
            joined_at: cp
                .read_local(|s| s.controllers.get(&me.name).map(|r| r.joined_at.clone()))
                .unwrap_or(me.joined_at.clone()),
            ..me
        };
        // The first controller leads: register now, so that tokens can name its address.
        if first_token.is_some() || cp.is_leader() {
            if let Err(e) = cp
                .write(Command::RegisterController {
                    record: record.clone(),
                })
                .await
            {
                warn!(error = %e, "cannot record this controller yet; retrying in the background");
                tokio::spawn(register_until_done(cp.clone(), record));
            }
        } else {
            tokio::spawn(register_until_done(cp.clone(), record));
        }
    }

    if first_token.is_some() {
        let first_node = berth_proto::api::names::node_name_from_host(&crate::config::host_name());
        match api::cluster::issue_join_token(
            &state,
            &first_node,
            JoinKind::Node,
            vec![cfg.api_advertise.clone()],
        )
        .await
        {
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

    let membership_cp = cp.clone();
    let membership = tokio::spawn(async move {
        loop {
            membership_cp.reconcile_membership().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let recovering = state.clone();
    tokio::spawn(async move { reconcile::recover_interrupted(&recovering, interrupted).await });
    let observer = tokio::spawn(reconcile::run(state.clone()));
    info!(name = %cfg.name, node = raft_id, api = %cfg.api_advertise, peer = %cfg.peer_advertise, "berthd is running");

    shutdown_signal().await;
    info!("shutting down");
    api_task.abort();
    observer.abort();
    membership.abort();
    if let Some(t) = peer_task {
        t.abort();
    }
    cp.shutdown().await;
    Ok(())
}

/// Writes this controller's record, retrying every second until a leader takes it.
async fn register_until_done(cp: ControlPlane, record: ControllerRecord) {
    loop {
        match cp
            .write(Command::RegisterController {
                record: record.clone(),
            })
            .await
        {
            Ok(_) => {
                info!(controller = %record.name, node = record.id, "controller recorded");
                return;
            }
            // The cluster refuses the record (this controller was removed): retrying cannot help.
            Err(crate::raft::WriteError::Rejected(e)) => {
                error!(controller = %record.name, error = %e, "this controller is not a member of the cluster; stop it, or join it again with a new token");
                return;
            }
            Err(e) => {
                warn!(controller = %record.name, error = %e, "cannot record this controller yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
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
