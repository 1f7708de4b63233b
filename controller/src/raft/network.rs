//! The Raft network: tonic clients that carry openraft RPCs to peers.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use berth_proto::v1::RaftRequest;
use berth_proto::v1::raft_client::RaftClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::codec::{self, MAX_MESSAGE_BYTES};
use super::types::{NodeId, RaftPeer, TypeConfig};

/// How long to wait for a TCP (and TLS) connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 keepalive on peer connections: a peer that vanished (host down, network cut) is
/// noticed within about interval + timeout, not only when a request times out.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors building a channel to a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerConnectError {
    #[error("invalid peer address {addr:?}: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("invalid tls settings for peer {addr:?}: {source}")]
    Tls {
        addr: String,
        source: tonic::transport::Error,
    },
}

/// Fault injection for outgoing Raft RPCs (tests and chaos drills): RPCs to blocked peers fail
/// as unreachable, and every RPC can be delayed. Empty by default, which costs one uncontended
/// lock per RPC.
#[derive(Debug, Clone, Default)]
pub struct NetworkFaults {
    inner: Arc<Mutex<FaultState>>,
}

#[derive(Debug, Default)]
struct FaultState {
    blocked: BTreeSet<NodeId>,
    delay: Duration,
}

/// The synthetic error of a blocked RPC.
#[derive(Debug, thiserror::Error)]
#[error("raft rpc to peer {0} dropped by fault injection")]
pub struct InjectedFault(NodeId);

impl NetworkFaults {
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops every later RPC from this node to `peer`.
    pub fn block(&self, peer: NodeId) {
        self.lock().blocked.insert(peer);
    }

    /// Lets RPCs to `peer` through again.
    pub fn unblock(&self, peer: NodeId) {
        self.lock().blocked.remove(&peer);
    }

    /// Delays every later RPC from this node by `delay` (zero turns it off).
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Removes every fault.
    pub fn heal(&self) {
        *self.lock() = FaultState::default();
    }

    /// Fails with [`InjectedFault`] when `peer` is blocked, else gives the delay to apply.
    pub fn check(&self, peer: NodeId) -> Result<Duration, InjectedFault> {
        let state = self.lock();
        if state.blocked.contains(&peer) {
            return Err(InjectedFault(peer));
        }
        Ok(state.delay)
    }
}

/// When each peer last answered one of this node's Raft RPCs (any answer, even a refusal,
/// proves the peer is up and reachable). Meaningful on the leader, which talks to every member.
#[derive(Debug, Clone, Default)]
pub struct PeerHealth {
    inner: Arc<Mutex<HashMap<NodeId, Instant>>>,
}

impl PeerHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Instant>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an answer from `peer` now.
    pub fn record(&self, peer: NodeId) {
        self.lock().insert(peer, Instant::now());
    }

    /// When `peer` last answered, if ever.
    pub fn last_answer(&self, peer: NodeId) -> Option<Instant> {
        self.lock().get(&peer).copied()
    }
}

/// Makes one [`PeerClient`] per target peer. The client TLS settings can be set after the
/// node starts (a new cluster's CA exists only once the first command is applied); clients made
/// later use them.
#[derive(Clone, Default)]
pub struct Network {
    tls: Arc<RwLock<Option<ClientTlsConfig>>>,
    faults: NetworkFaults,
    health: PeerHealth,
}

impl Network {
    /// A network that uses TLS with `tls` when set, plain HTTP/2 otherwise, subject to `faults`.
    pub fn new(tls: Option<ClientTlsConfig>, faults: NetworkFaults) -> Network {
        Network {
            tls: Arc::new(RwLock::new(tls)),
            faults,
            health: PeerHealth::default(),
        }
    }

    /// Sets the client TLS settings for connections made from now on.
    pub fn set_tls(&self, tls: ClientTlsConfig) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Some(tls);
    }

    /// Whether client TLS is configured.
    pub fn has_tls(&self) -> bool {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Per-peer reachability as seen from this node.
    pub fn health(&self) -> &PeerHealth {
        &self.health
    }

    /// A lazily connected channel to the peer listener at `addr`.
    pub fn channel(&self, addr: &str) -> Result<Channel, PeerConnectError> {
        let tls = self.tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|source| PeerConnectError::Address {
                addr: addr.to_string(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| PeerConnectError::Tls {
                    addr: addr.to_string(),
                    source,
                })?;
        }
        Ok(endpoint.connect_lazy())
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &RaftPeer) -> PeerClient {
        let client = self.channel(&node.addr).map(|ch| {
            RaftClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        });
        if let Err(e) = &client {
            tracing::warn!(peer = target, addr = %node.addr, error = %e, "cannot build raft peer client");
        }
        PeerClient {
            target,
            node: node.clone(),
            client,
            faults: self.faults.clone(),
            health: self.health.clone(),
        }
    }
}

/// A connection to one peer.
pub struct PeerClient {
    target: NodeId,
    node: RaftPeer,
    client: Result<RaftClient<Channel>, PeerConnectError>,
    faults: NetworkFaults,
    health: PeerHealth,
}

/// Which RPC to call.
#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, RaftPeer, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        E: std::error::Error,
        Result<Resp, RaftError<NodeId, E>>: DeserializeOwned,
    {
        match self.faults.check(self.target) {
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
            Ok(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
            Ok(_) => {}
        }
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let data = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftRequest { data: data.into() });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => {
                self.health.record(self.target);
                r.into_inner()
            }
            Err(status) => {
                return Err(match status.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                        RPCError::Unreachable(Unreachable::new(&status))
                    }
                    _ => RPCError::Network(NetworkError::new(&status)),
                });
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, RaftPeer, RaftError<NodeId>>> {
        self.call(Rpc::AppendEntries, &req, &option).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, RaftPeer, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &req, &option).await
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, RaftPeer, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &req, &option).await
    }
}
