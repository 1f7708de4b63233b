//! [`ControlPlane`]: the handle the rest of the controller uses to read and change the
//! replicated state.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::raft_server::RaftServer;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};

use super::network::{Network, NetworkFaults};
use super::service::RaftService;
use super::types::{NodeId, Raft, RaftPeer};
use crate::state::{ApplyError, ApplyOk, Command, State};
use crate::store::{self, StateMachineStore, StoreError};

/// TLS for the peer (Raft) plane: the server side for [`ControlPlane::serve`], the client side
/// for outgoing RPCs. Both should require and verify certificates from the cluster CA.
#[derive(Clone)]
pub struct PeerTls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
}

impl PeerTls {
    /// Mutual TLS from PEM: every peer presents `cert_pem`/`key_pem` (which must name the
    /// host of its peer address, DNS name or IP) and trusts only certificates from `ca_pem`.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> PeerTls {
        let ca = Certificate::from_pem(ca_pem);
        let identity = Identity::from_pem(cert_pem, key_pem);
        PeerTls {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone()),
            client: ClientTlsConfig::new().ca_certificate(ca).identity(identity),
        }
    }
}

/// Errors starting the Raft node.
#[derive(Debug, thiserror::Error)]
pub enum RaftSetupError {
    #[error("cannot open the raft store: {0}")]
    Store(#[from] StoreError),
    #[error("invalid raft configuration: {0}")]
    Config(Box<openraft::ConfigError>),
    #[error("cannot start the raft node: {0}")]
    Start(String),
    #[error("cannot initialize the single-node cluster: {0}")]
    Initialize(String),
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The command was committed but `apply` rejected it; nothing changed.
    #[error("{0}")]
    Rejected(ApplyError),
    /// This node is not the leader; `leader` is the leader's peer address when known.
    #[error("this controller is not the raft leader")]
    NotLeader { leader: Option<String> },
    /// Raft failed (shutting down, storage error, ...).
    #[error("raft failed: {0}")]
    Raft(String),
}

/// Why a linearizable read could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// This node is not the leader (or lost leadership); `leader` is the leader's peer address.
    #[error("this controller is not the raft leader")]
    NotLeader { leader: Option<String> },
    #[error("raft failed: {0}")]
    Raft(String),
}

/// Errors serving the peer listener.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid peer tls settings: {0}")]
    Tls(tonic::transport::Error),
    #[error("cannot listen on the peer address: {0}")]
    Bind(std::io::Error),
    #[error("raft peer server failed: {0}")]
    Serve(tonic::transport::Error),
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, RaftPeer>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::NotLeader {
            leader: f.leader_node.map(|n| n.addr),
        },
        e => WriteError::Raft(e.to_string()),
    }
}

struct Inner {
    id: NodeId,
    addr: String,
    raft: Raft,
    sm: StateMachineStore,
    tls: Option<PeerTls>,
    faults: NetworkFaults,
}

/// A running Raft member with its replicated [`State`]. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

/// The Raft timing and snapshot settings Berth uses.
fn raft_config() -> Result<Config, RaftSetupError> {
    Config {
        cluster_name: "berth".to_string(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        install_snapshot_timeout: 5000,
        // JSON-encoded chunks stay far below the 64 MiB message limit.
        snapshot_max_chunk_size: 1024 * 1024,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(5000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| RaftSetupError::Config(Box::new(e)))
}

impl ControlPlane {
    /// Opens (or creates) the sled db at `dir`, builds the openraft node with `id` and `addr`
    /// (its peer address) and, when `bootstrap` is true and the node has never been part of a
    /// cluster, initializes a single-voter cluster `{id: addr}`.
    pub async fn open(
        dir: &Path,
        id: u64,
        addr: String,
        bootstrap: bool,
        tls: Option<PeerTls>,
    ) -> Result<ControlPlane, RaftSetupError> {
        let (log, sm) = store::open(dir)?;
        let config = Arc::new(raft_config()?);
        let faults = NetworkFaults::default();
        let network = Network::new(tls.as_ref().map(|t| t.client.clone()), faults.clone());
        let raft = Raft::new(id, config, network, log, sm.clone())
            .await
            .map_err(|e| RaftSetupError::Start(e.to_string()))?;
        if bootstrap {
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| RaftSetupError::Initialize(e.to_string()))?;
            if !initialized {
                let members = BTreeMap::from([(id, RaftPeer { addr: addr.clone() })]);
                match raft.initialize(members).await {
                    Ok(()) => {
                        tracing::info!(node = id, %addr, "initialized single-node raft cluster")
                    }
                    Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                    Err(e) => return Err(RaftSetupError::Initialize(e.to_string())),
                }
            }
        }
        Ok(ControlPlane {
            inner: Arc::new(Inner {
                id,
                addr,
                raft,
                sm,
                tls,
                faults,
            }),
        })
    }

    /// This node's Raft id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This node's peer address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Fault injection for this node's outgoing Raft RPCs (tests, chaos drills).
    pub fn faults(&self) -> &NetworkFaults {
        &self.inner.faults
    }

    /// The underlying openraft handle (metrics, membership changes).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Proposes `cmd` through Raft and waits until it is applied; returns `apply`'s answer.
    pub async fn write(&self, cmd: Command) -> Result<ApplyOk, WriteError> {
        match self.inner.raft.client_write(cmd).await {
            Ok(resp) => resp.data.map_err(WriteError::Rejected),
            Err(e) => Err(write_error(e)),
        }
    }

    /// Adds node `id` (peer address `addr`) as a voter: first as a learner that catches up,
    /// then through a joint-consensus membership change. Must run on the leader.
    pub async fn add_member(&self, id: NodeId, addr: String) -> Result<(), WriteError> {
        let raft = &self.inner.raft;
        raft.add_learner(id, RaftPeer { addr }, true)
            .await
            .map_err(write_error)?;
        let mut voters: BTreeSet<NodeId> = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters.insert(id);
        raft.change_membership(voters, false)
            .await
            .map_err(write_error)?;
        tracing::info!(node = id, "added raft voter");
        Ok(())
    }

    /// Linearizable read: confirms leadership with a quorum (read barrier), waits until the
    /// state machine has caught up, then runs `f` on the state.
    pub async fn read<R>(&self, f: impl FnOnce(&State) -> R) -> Result<R, ReadError> {
        match self.inner.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.read_local(f)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ReadError::NotLeader {
                    leader: f.leader_node.map(|n| n.addr),
                })
            }
            Err(e) => Err(ReadError::Raft(e.to_string())),
        }
    }

    /// Reads this node's applied state without a read barrier (may be stale on followers).
    /// `f` runs under a read lock: keep it short and do not block in it.
    pub fn read_local<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.inner.sm.read().state)
    }

    /// True if this node currently believes it is the leader.
    pub fn is_leader(&self) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.inner.id)
    }

    /// The current leader's id and peer address, as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// Removes node `id` from the cluster (as a voter and as a learner). Must run on the
    /// leader; the remaining voters must still form a quorum.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), WriteError> {
        let raft = &self.inner.raft;
        let voters: BTreeSet<NodeId> = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if voters.contains(&id) {
            let rest: BTreeSet<NodeId> = voters.into_iter().filter(|v| *v != id).collect();
            raft.change_membership(rest, false)
                .await
                .map_err(write_error)?;
        }
        if self.members().contains_key(&id) {
            raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(write_error)?;
        }
        tracing::info!(node = id, "removed raft member");
        Ok(())
    }

    /// The current Raft members (voters and learners) with their peer addresses.
    pub fn members(&self) -> BTreeMap<NodeId, RaftPeer> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    /// A watch on the last applied log index; changes whenever an entry is applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.sm.subscribe()
    }

    /// The `berth.v1.Raft` gRPC service for this node, to mount on the peer listener.
    pub fn raft_service(&self) -> RaftServer<RaftService> {
        RaftService::into_server(self.inner.raft.clone())
    }

    /// Serves the Raft service on `listener` (with the server TLS given to `open`, if any)
    /// until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let mut builder = Server::builder();
        if let Some(tls) = &self.inner.tls {
            builder = builder
                .tls_config(tls.server.clone())
                .map_err(ServeError::Tls)?;
        }
        builder
            .add_service(self.raft_service())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
            .map_err(ServeError::Serve)
    }

    /// Binds `addr` and serves the Raft service until `shutdown` completes.
    pub async fn serve_addr(
        &self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let listener = TcpListener::bind(addr).await.map_err(ServeError::Bind)?;
        self.serve(listener, shutdown).await
    }

    /// Waits until this node sees a leader, or `timeout` passes; returns the leader's id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut metrics = self.inner.raft.metrics();
        let wait = async {
            loop {
                if let Some(id) = metrics.borrow_and_update().current_leader {
                    return Some(id);
                }
                if metrics.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// Stops the Raft node. Drop every clone afterwards to release the sled database.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown failed");
        }
    }
}
