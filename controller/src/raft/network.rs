//! The Raft network: tonic clients that carry openraft RPCs to peers.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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

    fn check(&self, peer: NodeId) -> Result<Duration, InjectedFault> {
        let state = self.lock();
        if state.blocked.contains(&peer) {
            return Err(InjectedFault(peer));
        }
        Ok(state.delay)
    }
}

/// Makes one [`PeerClient`] per target peer.
#[derive(Clone, Default)]
pub struct Network {
    tls: Option<ClientTlsConfig>,
    faults: NetworkFaults,
}

impl Network {
    /// A network that uses TLS with `tls` when set, plain HTTP/2 otherwise, subject to `faults`.
    pub fn new(tls: Option<ClientTlsConfig>, faults: NetworkFaults) -> Network {
        Network { tls, faults }
    }

    fn channel(&self, addr: &str) -> Result<Channel, PeerConnectError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|source| PeerConnectError::Address {
                addr: addr.to_string(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint =
                endpoint
                    .tls_config(tls.clone())
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
        }
    }
}

/// A connection to one peer.
pub struct PeerClient {
    target: NodeId,
    node: RaftPeer,
    client: Result<RaftClient<Channel>, PeerConnectError>,
    faults: NetworkFaults,
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
            Ok(r) => r.into_inner(),
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
