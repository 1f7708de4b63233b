//! Starting `berth-agent`: storage, network, images and the engine; joining the cluster; then
//! serving the gRPC service over mutual TLS and sending heartbeats until asked to stop. Instances keep running when
//! the agent stops.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_proto::v1::agent_server::AgentServer;
use tracing::info;

use crate::agent_lock::{AgentLock, LOCK_DIR};
use crate::config::{Config, StorageDriverKind};
use crate::engine::{Engine, EngineConfig};
use crate::image::ImageStore;
use crate::network::{Network, NetworkConfig};
use crate::service::AgentService;
use crate::storage::StorageDriver;
use crate::storage::btrfs::{BtrfsConfig, BtrfsDriver, BtrfsSource};
use crate::storage::dir::DirDriver;
use crate::tls::{Identity, JoinFacts};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] crate::agent_lock::AgentLockError),
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("network: {0}")]
    Network(#[from] crate::network::NetworkError),
    #[error("images: {0}")]
    Image(#[from] crate::image::ImageError),
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("join: {0}")]
    Join(#[from] crate::tls::JoinError),
    #[error(
        "this agent has not joined a cluster yet: start it once with --join-token-file (the token is made by `berth cluster add NAME`, or by berthd at bootstrap)"
    )]
    NotJoined,
    #[error(
        "{0} must be searchable by everyone (chmod o+x): unprivileged instances reach their root filesystem through it"
    )]
    NotTraversable(PathBuf),
    #[error("transfers: {0}")]
    Transfers(crate::transfer::TransferError),
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Everything the agent runs on, set up from the config.
pub struct Node {
    pub cfg: Config,
    /// The btrfs pool root (None on the dir driver, which cannot send or receive transfers).
    pub pool_root: Option<PathBuf>,
    /// This agent's lock (one agent per cgroup tag on a host), held while the node lives.
    pub lock: AgentLock,
    pub storage: Arc<dyn StorageDriver>,
    pub network: Arc<Network>,
    pub images: Arc<ImageStore>,
    pub engine: Arc<Engine>,
}

/// Takes the agent lock of the configured cgroup tag (refused when another agent with that tag
/// runs), then sets up storage, the host network, the image store and the engine (blocking).
pub fn prepare(cfg: Config) -> Result<Node, StartError> {
    let lock = AgentLock::acquire(std::path::Path::new(LOCK_DIR), &cfg.cgroup_tag)?;
    info!(lock = %lock.path().display(), cgroup_tag = %cfg.cgroup_tag, "agent lock taken");
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| StartError::Io {
        path: cfg.state_dir.clone(),
        source,
    })?;
    check_traversable(&cfg.state_dir)?;
    let mut pool_root = None;
    let storage: Arc<dyn StorageDriver> = match cfg.storage.driver {
        StorageDriverKind::Btrfs => {
            let source = match &cfg.storage.source {
                None => BtrfsSource::LoopFile {
                    path: cfg.storage.loop_file.clone(),
                    size_bytes: cfg.storage.loop_size,
                },
                Some(p) if p.starts_with("/dev/") => BtrfsSource::Device(p.clone()),
                Some(p) => BtrfsSource::Directory(p.clone()),
            };
            let driver = BtrfsDriver::open(BtrfsConfig {
                source,
                mount_point: cfg.storage.mount.clone(),
            })?;
            pool_root = Some(driver.root().to_path_buf());
            Arc::new(driver)
        }
        StorageDriverKind::Dir => Arc::new(DirDriver::open(
            cfg.storage
                .source
                .clone()
                .unwrap_or_else(|| cfg.storage.mount.clone()),
        )?),
    };
    let network = Arc::new(Network::setup(
        NetworkConfig {
            bridge: cfg.bridge.clone(),
            ipv4_cidr: cfg.bridge_ipv4_cidr.clone(),
            nat: cfg.nat,
        },
        &cfg.state_dir,
    )?);
    let images = Arc::new(ImageStore::new(
        storage.clone(),
        cfg.state_dir.clone(),
        cfg.image_cache.clone(),
    )?);
    let mut engine_cfg = EngineConfig::new(cfg.state_dir.clone());
    engine_cfg.nat = cfg.nat;
    engine_cfg.idmap_range = cfg.idmap_range;
    engine_cfg.lxcfs_dir = cfg.lxcfs_dir.clone();
    engine_cfg.run_dir = cfg.run_dir.clone();
    engine_cfg.cgroup_tag = cfg.cgroup_tag.clone();
    let engine = Arc::new(Engine::new(engine_cfg, storage.clone(), network.clone())?);
    Ok(Node {
        cfg,
        pool_root,
        lock,
        storage,
        network,
        images,
        engine,
    })
}

/// Unprivileged instances open their root filesystem under the state directory as their own
/// (unprivileged) root, so every directory on the way must be searchable by others.
fn check_traversable(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let mut p = Some(dir);
    while let Some(d) = p {
        if let Ok(m) = std::fs::metadata(d)
            && m.permissions().mode() & 0o001 == 0
        {
            return Err(StartError::NotTraversable(d.to_path_buf()));
        }
        p = d.parent();
    }
    Ok(())
}

/// Joins the cluster if this agent has no identity yet.
pub async fn ensure_joined(node: &Node, token: Option<&str>) -> Result<Identity, StartError> {
    if let Some(id) = Identity::load(&node.cfg.state_dir) {
        return Ok(id);
    }
    let token = token.ok_or(StartError::NotJoined)?;
    let facts = JoinFacts {
        name: node.cfg.name.clone(),
        address: node.cfg.advertise.to_string(),
        bridge_ipv4_cidr: node.network.bridge_cidr(),
        cpus: crate::heartbeat::usable_cpus(),
        memory_bytes: host_memory_bytes(),
    };
    let id = crate::tls::join(&node.cfg.state_dir, token, facts).await?;
    info!(node = %node.cfg.name, "joined the cluster");
    Ok(id)
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: Config, token: Option<String>) -> Result<(), StartError> {
    let node = tokio::task::spawn_blocking(move || prepare(cfg))
        .await
        .map_err(|e| StartError::Io {
            path: PathBuf::from("/"),
            source: std::io::Error::other(e.to_string()),
        })??;
    let identity = ensure_joined(&node, token.as_deref()).await?;
    // Heartbeats start before recovery (which may autostart many instances), so the node is
    // online as soon as possible; until recovery has finished they say `recovering` (the
    // instances may still look stopped) and the controller ignores their instance states.
    // They stop whenever this function returns.
    let recovering = Arc::new(AtomicBool::new(true));
    let _heartbeats = AbortOnDrop(crate::heartbeat::spawn(
        &node.cfg,
        &identity,
        node.storage.clone(),
        node.engine.clone(),
        recovering.clone(),
    ));
    node.engine.recover().await?;
    recovering.store(false, Ordering::Release);
    info!(node = %node.cfg.name, "recovery finished");
    let service = AgentService::new(
        node.cfg.name.clone(),
        node.engine.clone(),
        node.images.clone(),
        node.network.clone(),
        node.storage.clone(),
        node.cfg.debian_mirror.clone(),
    );
    if let Some(root) = &node.pool_root {
        let setup = crate::transfer::TransferSetup {
            node: node.cfg.name.clone(),
            pool_root: root.clone(),
            image_records: node.cfg.state_dir.join("images"),
            storage: node.storage.clone(),
            identity: Some(identity.clone()),
        };
        let transfers = service.transfers.clone();
        tokio::task::spawn_blocking(move || transfers.configure(setup))
            .await
            .map_err(|e| StartError::Io {
                path: root.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(StartError::Transfers)?;
    }
    let transfer_service = crate::transfer::TransferService::new(service.transfers.clone());
    info!(node = %node.cfg.name, listen = %node.cfg.listen, "berth-agent is serving");
    tonic::transport::Server::builder()
        .trace_fn(berth_proto::telemetry::grpc_server_span)
        .initial_stream_window_size(Some(crate::transfer::WINDOW))
        .initial_connection_window_size(Some(2 * crate::transfer::WINDOW))
        .max_frame_size(Some(crate::transfer::FRAME))
        .tls_config(identity.server_tls())?
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AgentServer::new(service)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            crate::tls::require_controller,
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            transfer_service.server(),
            crate::tls::require_peer_agent,
        ))
        .serve_with_shutdown(node.cfg.listen, shutdown_signal())
        .await?;
    info!("berth-agent stopped; instances keep running");
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Total host memory from /proc/meminfo, in bytes (0 when unreadable).
pub fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| crate::heartbeat::parse_mem_total(&s))
        .unwrap_or(0)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
