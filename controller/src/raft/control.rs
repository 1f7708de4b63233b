//! [`ControlPlane`]: the handle the rest of the controller uses to read and change the
//! replicated state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use berth_proto::v1::controller_client::ControllerClient;
use berth_proto::v1::raft_server::RaftServer;
use berth_proto::v1::{ForwardRequest, ReadIndexRequest};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};

use super::network::{Network, NetworkFaults};
use super::service::RaftService;
use super::types::{NodeId, Raft, RaftPeer};
use crate::state::{ApplyError, ApplyOk, ApplyResult, Command, State};

/// Prefix of the message of an UNAVAILABLE status the leader itself answers (as opposed to a
/// transport failure) when it proposed nothing, so that the follower can tell them apart.
pub(crate) const LEADER_UNAVAILABLE: &str = "leader unavailable: ";

/// Like [`LEADER_UNAVAILABLE`], when the leader proposed the command but could not confirm it.
pub(crate) const LEADER_UNSURE: &str = "leader unsure: ";

/// Checks whether removing voter `id` (named `name`) from `voters` keeps a reachable majority.
pub(crate) fn removal_check(
    name: &str,
    id: NodeId,
    voters: &BTreeSet<NodeId>,
    reachable: impl Fn(NodeId) -> bool,
) -> Result<(), String> {
    if !voters.contains(&id) {
        return Ok(());
    }
    let rest: Vec<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
    if rest.is_empty() {
        return Err(format!(
            "controller {name} is the last voter; a cluster cannot remove its last controller"
        ));
    }
    let up = rest.iter().filter(|v| reachable(**v)).count();
    let need = rest.len() / 2 + 1;
    if up < need {
        return Err(format!(
            "removing controller {name} would leave {} voters of which only {up} are reachable, fewer than the {need} a majority needs",
            rest.len()
        ));
    }
    Ok(())
}
use crate::store::{self, StateMachineStore, StoreError};

/// How often the leader sends heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(150);

/// The shortest election timeout.
pub const ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(500);

/// The longest election timeout: a leader that has not heard from a majority for this long
/// has lost its quorum. openraft also uses it as the leader lease: a follower starts an
/// election only after the lease plus its own random election timeout, so a dead leader is
/// replaced within about twice this.
pub const ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(1000);

/// How long a request waits for a reachable leader (an election in progress, a leader
/// change) before it fails as unavailable: long enough to ride out the replacement of a dead
/// leader (lease plus election timeout), short enough to fail fast on a minority side.
pub const LEADER_WAIT: Duration = Duration::from_millis(2500);

/// How many times [`ControlPlane::write`] proposes again a command with an idempotency tag
/// whose previous attempt may or may not have committed.
pub const UNSURE_RETRIES: u32 = 3;

/// How long the leader waits for a proposed command to commit and apply.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a follower waits for its state machine to reach a read index.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Deadline of a forwarded write on the wire (the leader's commit time plus slack).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(7);

/// Deadline of a read-index request on the wire.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(3);

/// TLS for the peer plane: the server side for [`ControlPlane::serve`], the client side for
/// outgoing RPCs. Both require and verify certificates from the cluster CA; the client accepts
/// only servers whose certificate names [`berth_proto::CONTROLLER_TLS_NAME`].
#[derive(Clone)]
pub struct PeerTls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
}

impl PeerTls {
    /// Mutual TLS from PEM: every controller presents `cert_pem`/`key_pem` (which must carry
    /// the controller name) and trusts only certificates from `ca_pem`.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> PeerTls {
        let ca = Certificate::from_pem(ca_pem);
        let identity = Identity::from_pem(cert_pem, key_pem);
        PeerTls {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone()),
            client: ClientTlsConfig::new()
                .ca_certificate(ca)
                .identity(identity)
                .domain_name(berth_proto::CONTROLLER_TLS_NAME),
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

/// Why no leader could take a request right now. Each message is one sentence naming the
/// cause; the API answers them with 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// No leader is known (an election is going on, or this controller is on the minority
    /// side of a partition).
    #[error("no raft leader: this controller cannot reach a majority of the controllers")]
    NoLeader,
    /// This controller leads but has not heard from a majority within the election timeout.
    #[error(
        "no raft quorum: this controller was the leader but cannot reach a majority of the controllers"
    )]
    NoQuorum,
    /// The leader is known but does not answer this controller.
    #[error("the raft leader at {leader} cannot be reached from this controller: {detail}")]
    LeaderUnreachable { leader: String, detail: String },
    /// The leader answered but could not serve the request.
    #[error("the raft leader at {leader} cannot serve the request: {detail}")]
    Leader { leader: String, detail: String },
    /// The leader did not commit in time (it may have lost its quorum meanwhile).
    #[error("the raft leader did not commit the change within {0:?}")]
    CommitTimeout(Duration),
    /// A follower did not apply the log up to the read index in time.
    #[error("this controller has not applied the raft log up to index {0} yet")]
    Lagging(u64),
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The command was committed but `apply` rejected it (or the leader refused it before
    /// proposing, e.g. a removal that would lose quorum); nothing changed.
    #[error("{0}")]
    Rejected(ApplyError),
    /// No leader could take the write, and the command was certainly not proposed: retrying
    /// is safe. See [`Unavailable`].
    #[error("{0}")]
    Unavailable(Unavailable),
    /// No leader confirmed the write, but it may have been proposed (the leader failed or
    /// lost its quorum while committing): it may still be applied.
    #[error("{0}; the change may still be applied")]
    Unsure(Unavailable),
    /// Raft failed (shutting down, storage error, ...).
    #[error("raft failed: {0}")]
    Raft(String),
}

/// Why a linearizable read could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No leader could confirm the read; see [`Unavailable`].
    #[error("{0}")]
    Unavailable(Unavailable),
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

/// The outcome of one attempt to reach the leader.
pub(crate) enum Attempt<T> {
    Done(T),
    /// Try again (leader changed, unreachable, no leader yet) until the deadline; nothing
    /// was proposed.
    Retry(Unavailable),
    /// Try again, but the command may have been proposed (the connection to the leader broke
    /// after the request was sent).
    RetryUnsure(Unavailable),
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, RaftPeer>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            WriteError::Unavailable(Unavailable::NoLeader)
        }
        e => WriteError::Raft(e.to_string()),
    }
}

struct Inner {
    id: NodeId,
    addr: String,
    raft: Raft,
    sm: StateMachineStore,
    tls: RwLock<Option<PeerTls>>,
    network: Network,
    faults: NetworkFaults,
    /// Channels to other controllers' peer listeners, by address (Forward, ReadIndex).
    channels: Mutex<HashMap<String, Channel>>,
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
        heartbeat_interval: HEARTBEAT_INTERVAL.as_millis() as u64,
        election_timeout_min: ELECTION_TIMEOUT_MIN.as_millis() as u64,
        election_timeout_max: ELECTION_TIMEOUT_MAX.as_millis() as u64,
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
        let raft = Raft::new(id, config, network.clone(), log, sm.clone())
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
                tls: RwLock::new(tls),
                network,
                faults,
                channels: Mutex::new(HashMap::new()),
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

    /// Sets the peer TLS (server and client side) for connections made from now on. A new
    /// cluster's CA only exists once its first command is applied, so the first controller
    /// sets it after opening.
    pub fn set_tls(&self, tls: PeerTls) {
        self.inner.network.set_tls(tls.client.clone());
        *self.inner.tls.write().unwrap_or_else(|p| p.into_inner()) = Some(tls);
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Whether peer TLS is configured.
    pub fn has_tls(&self) -> bool {
        self.inner
            .tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Proposes `cmd` through Raft and waits until it is applied; returns `apply`'s answer.
    /// On a follower the command is forwarded to the leader (Controller.Forward), retried
    /// while the leader changes, as long as no attempt may have reached the log. Without a
    /// reachable leader with a quorum it fails within about [`LEADER_WAIT`] with
    /// [`WriteError::Unavailable`], never hangs. An attempt that may have been proposed is
    /// never repeated (the command could be applied twice): it ends in [`WriteError::Unsure`].
    /// Except a command carrying an idempotency tag ([`Command::idempotency_tag`]): apply
    /// answers a repeated one from its record, so it is proposed again (up to
    /// [`UNSURE_RETRIES`] times, each with a fresh [`LEADER_WAIT`] to find a leader) and
    /// survives a leader change.
    pub async fn write(&self, cmd: Command) -> Result<ApplyOk, WriteError> {
        let mut deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut unsure = false;
        let tagged = cmd.idempotency_tag().is_some();
        let mut unsure_retries = if tagged { UNSURE_RETRIES } else { 0 };
        loop {
            let attempt = match self.leader_for_request() {
                None => Ok(Attempt::Retry(Unavailable::NoLeader)),
                Some((id, _)) if id == self.inner.id => self.write_local(cmd.clone()).await,
                Some((id, addr)) => self.forward(id, &addr, &cmd).await,
            };
            let why = match attempt {
                Ok(Attempt::Done(ok)) => return Ok(ok),
                Ok(Attempt::Retry(why)) => why,
                Ok(Attempt::RetryUnsure(why)) | Err(WriteError::Unsure(why))
                    if unsure_retries > 0 =>
                {
                    unsure_retries -= 1;
                    unsure = true;
                    deadline = tokio::time::Instant::now() + LEADER_WAIT;
                    tracing::info!(reason = %why, "a write with an idempotency tag may not have committed; proposing it again");
                    why
                }
                Ok(Attempt::RetryUnsure(why)) => return Err(WriteError::Unsure(why)),
                // Proposing a tagged write again is safe: wait for a leader until the deadline.
                Err(WriteError::Unavailable(why)) if unsure && tagged => why,
                // A rejection after an attempt that may have been applied could be caused by
                // that attempt; still the rejection is what the state machine said.
                Err(WriteError::Unavailable(why)) if unsure => return Err(WriteError::Unsure(why)),
                Err(e) => return Err(e),
            };
            if !self.pause_before_retry(deadline).await {
                return Err(if unsure {
                    WriteError::Unsure(why)
                } else {
                    WriteError::Unavailable(why)
                });
            }
        }
    }

    /// Proposes `cmd` on this node, which must lead with a quorum. Used by [`Self::write`] and
    /// by the Forward service on the leader.
    pub(crate) async fn write_local(&self, cmd: Command) -> Result<Attempt<ApplyOk>, WriteError> {
        if !self.is_leader() {
            return Ok(Attempt::Retry(Unavailable::NoLeader));
        }
        if !self.has_quorum() {
            return Err(WriteError::Unavailable(Unavailable::NoQuorum));
        }
        // Look through the wrappers (`By`, `IfMatch`) for the command itself.
        let mut inner = &cmd;
        while let Command::By { command, .. } | Command::IfMatch { command, .. } = inner {
            inner = command;
        }
        if let Command::RemoveController { name } = inner {
            self.check_controller_removal(name)
                .map_err(|m| WriteError::Rejected(ApplyError::conflict(m)))?;
        }
        let proposal = self.inner.raft.client_write(cmd);
        tokio::select! {
            r = proposal => match r {
                Ok(resp) => resp.data.map(Attempt::Done).map_err(WriteError::Rejected),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    Ok(Attempt::Retry(Unavailable::NoLeader))
                }
                Err(e) => Err(write_error(e)),
            },
            _ = self.quorum_lost() => Err(WriteError::Unsure(Unavailable::NoQuorum)),
            _ = tokio::time::sleep(COMMIT_TIMEOUT) => {
                Err(WriteError::Unsure(Unavailable::CommitTimeout(COMMIT_TIMEOUT)))
            }
        }
    }

    /// Hands `cmd` to the leader `id` at `addr`.
    async fn forward(
        &self,
        id: NodeId,
        addr: &str,
        cmd: &Command,
    ) -> Result<Attempt<ApplyOk>, WriteError> {
        let unreachable = |detail: String| {
            Attempt::Retry(Unavailable::LeaderUnreachable {
                leader: addr.to_string(),
                detail,
            })
        };
        let mut client = match self.controller_client(id, addr).await {
            Ok(c) => c,
            Err(detail) => return Ok(unreachable(detail)),
        };
        let data = serde_json::to_vec(cmd)
            .map_err(|e| WriteError::Raft(format!("cannot encode the command: {e}")))?;
        let mut req = tonic::Request::new(ForwardRequest {
            command: data.into(),
        });
        req.set_timeout(FORWARD_TIMEOUT);
        match client.forward(req).await {
            Ok(reply) => {
                self.inner.network.health().record(id);
                let result: ApplyResult = serde_json::from_slice(&reply.into_inner().result)
                    .map_err(|e| {
                        WriteError::Raft(format!("cannot decode the leader's answer: {e}"))
                    })?;
                result.map(Attempt::Done).map_err(WriteError::Rejected)
            }
            Err(status) => Ok(self.classify(addr, status)?),
        }
    }

    /// Maps a failed Forward or ReadIndex call: retry on a leader change or an unreachable
    /// leader, fail on anything else.
    fn classify<T>(&self, addr: &str, status: tonic::Status) -> Result<Attempt<T>, WriteError> {
        use tonic::Code;
        match status.code() {
            // The receiver is no longer the leader.
            Code::FailedPrecondition => Ok(Attempt::Retry(Unavailable::NoLeader)),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                let msg = status.message();
                let leader = addr.to_string();
                if let Some(detail) = msg.strip_prefix(LEADER_UNAVAILABLE) {
                    Ok(Attempt::Retry(Unavailable::Leader {
                        leader,
                        detail: detail.to_string(),
                    }))
                } else if let Some(detail) = msg.strip_prefix(LEADER_UNSURE) {
                    Ok(Attempt::RetryUnsure(Unavailable::Leader {
                        leader,
                        detail: detail.to_string(),
                    }))
                } else if status.code() == Code::Unavailable && msg.contains("connect") {
                    // The connection was never made: nothing was sent.
                    Ok(Attempt::Retry(Unavailable::LeaderUnreachable {
                        leader,
                        detail: msg.to_string(),
                    }))
                } else {
                    Ok(Attempt::RetryUnsure(Unavailable::LeaderUnreachable {
                        leader,
                        detail: msg.to_string(),
                    }))
                }
            }
            _ => Err(WriteError::Raft(format!(
                "the raft leader at {addr} refused the request: {}",
                status.message()
            ))),
        }
    }

    /// A client for the Controller service of peer `id`, subject to fault injection.
    async fn controller_client(
        &self,
        id: NodeId,
        addr: &str,
    ) -> Result<ControllerClient<Channel>, String> {
        match self.inner.faults.check(id) {
            Err(e) => return Err(e.to_string()),
            Ok(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
            Ok(_) => {}
        }
        let channel = {
            let mut channels = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match channels.get(addr) {
                Some(ch) => ch.clone(),
                None => {
                    let ch = self
                        .inner
                        .network
                        .channel(addr)
                        .map_err(|e| e.to_string())?;
                    channels.insert(addr.to_string(), ch.clone());
                    ch
                }
            }
        };
        Ok(ControllerClient::new(channel))
    }

    /// Waits a little (for a leader change to show) before the next attempt; false when
    /// `deadline` has passed.
    async fn pause_before_retry(&self, deadline: tokio::time::Instant) -> bool {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        let mut metrics = self.inner.raft.metrics();
        metrics.borrow_and_update();
        let pause = (deadline - now).min(Duration::from_millis(100));
        let _ = tokio::time::timeout(pause, metrics.changed()).await;
        // Let a burst of metric changes settle without spinning.
        tokio::time::sleep(Duration::from_millis(10)).await;
        true
    }

    /// The leader to send a request to: this node when it leads, else the known leader.
    fn leader_for_request(&self) -> Option<(NodeId, String)> {
        if self.is_leader() {
            return Some((self.inner.id, self.inner.addr.clone()));
        }
        self.leader()
    }

    /// Resolves after this leader has gone [`ELECTION_TIMEOUT_MAX`] without hearing from a
    /// majority of the voters (checked every 100 ms).
    async fn quorum_lost(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !self.has_quorum() {
                return;
            }
        }
    }

    /// Whether peer `id` answered this node's Raft RPCs within [`ELECTION_TIMEOUT_MAX`] (this
    /// node itself always counts). Meaningful on the leader.
    pub fn peer_reachable(&self, id: NodeId) -> bool {
        id == self.inner.id
            || self
                .inner
                .network
                .health()
                .last_answer(id)
                .is_some_and(|t| t.elapsed() <= ELECTION_TIMEOUT_MAX)
    }

    /// When peer `id` last answered this node's Raft RPCs.
    pub fn peer_last_answer(&self, id: NodeId) -> Option<Instant> {
        self.inner.network.health().last_answer(id)
    }

    /// Whether a majority of the voters is reachable from this node.
    pub fn has_quorum(&self) -> bool {
        let voters = self.voters();
        let reachable = voters.iter().filter(|v| self.peer_reachable(**v)).count();
        reachable > voters.len() / 2
    }

    /// The voters of the current membership.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Why removing controller `name` would be unsafe, if it would: it is the last voter, or
    /// the remaining voters would not have a reachable majority (as this leader sees them).
    pub fn check_controller_removal(&self, name: &str) -> Result<(), String> {
        let Some(id) = self.read_local(|s| s.controllers.get(name).map(|c| c.id)) else {
            return Ok(());
        };
        removal_check(name, id, &self.voters(), |v| self.peer_reachable(v))
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

    /// Linearizable read: gets a read index confirmed by a quorum from the leader (itself, or
    /// over Controller.ReadIndex), waits until this node has applied that far, then runs `f`
    /// on the state. Fails like [`Self::write`] when no leader with a quorum answers.
    pub async fn read<R>(&self, f: impl FnOnce(&State) -> R) -> Result<R, ReadError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let index = loop {
            let attempt = match self.leader_for_request() {
                None => Attempt::Retry(Unavailable::NoLeader),
                Some((id, _)) if id == self.inner.id => self.read_index_local().await?,
                Some((id, addr)) => self.read_index_remote(id, &addr).await?,
            };
            match attempt {
                Attempt::Done(index) => break index,
                Attempt::Retry(why) | Attempt::RetryUnsure(why) => {
                    if !self.pause_before_retry(deadline).await {
                        return Err(ReadError::Unavailable(why));
                    }
                }
            }
        };
        self.wait_applied(index).await?;
        Ok(self.read_local(f))
    }

    /// The read index on the leader: its commit index, confirmed by a quorum of heartbeats.
    pub(crate) async fn read_index_local(&self) -> Result<Attempt<u64>, ReadError> {
        if !self.is_leader() {
            return Ok(Attempt::Retry(Unavailable::NoLeader));
        }
        if !self.has_quorum() {
            return Err(ReadError::Unavailable(Unavailable::NoQuorum));
        }
        tokio::select! {
            r = self.inner.raft.get_read_log_id() => match r {
                Ok((read, applied)) => {
                    let read = read.map(|l| l.index).unwrap_or(0);
                    let applied = applied.map(|l| l.index).unwrap_or(0);
                    Ok(Attempt::Done(read.max(applied)))
                }
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(_))) => {
                    Ok(Attempt::Retry(Unavailable::NoLeader))
                }
                Err(RaftError::APIError(e)) => {
                    tracing::debug!(error = %e, "read index not confirmed");
                    Ok(Attempt::Retry(Unavailable::NoQuorum))
                }
                Err(e) => Err(ReadError::Raft(e.to_string())),
            },
            _ = self.quorum_lost() => Err(ReadError::Unavailable(Unavailable::NoQuorum)),
            _ = tokio::time::sleep(READ_INDEX_TIMEOUT) => Err(ReadError::Unavailable(Unavailable::NoQuorum)),
        }
    }

    async fn read_index_remote(&self, id: NodeId, addr: &str) -> Result<Attempt<u64>, ReadError> {
        let to_read = |e: WriteError| match e {
            WriteError::Unavailable(u) | WriteError::Unsure(u) => ReadError::Unavailable(u),
            other => ReadError::Raft(other.to_string()),
        };
        let mut client = match self.controller_client(id, addr).await {
            Ok(c) => c,
            Err(detail) => {
                return Ok(Attempt::Retry(Unavailable::LeaderUnreachable {
                    leader: addr.to_string(),
                    detail,
                }));
            }
        };
        let mut req = tonic::Request::new(ReadIndexRequest {});
        req.set_timeout(READ_INDEX_TIMEOUT);
        match client.read_index(req).await {
            Ok(reply) => {
                self.inner.network.health().record(id);
                Ok(Attempt::Done(reply.into_inner().index))
            }
            Err(status) => self.classify(addr, status).map_err(to_read),
        }
    }

    /// Waits until this node's state machine has applied `index` (bounded by [`APPLY_WAIT`]).
    async fn wait_applied(&self, index: u64) -> Result<(), ReadError> {
        let mut applied = self.subscribe();
        let wait = applied.wait_for(|a| *a >= index);
        match tokio::time::timeout(APPLY_WAIT, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ReadError::Raft("the state machine stopped".into())),
            Err(_) => Err(ReadError::Unavailable(Unavailable::Lagging(index))),
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

    /// True if this node leads and has heard from a majority of the voters within
    /// [`ELECTION_TIMEOUT_MAX`]: a leader cut off from the others keeps [`Self::is_leader`] until
    /// it hears of a newer term, but not this. Use it to decide whether to accept work that
    /// only the real leader may take (agent heartbeats).
    pub fn leads_with_quorum(&self) -> bool {
        self.is_leader() && self.has_quorum()
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

    /// Brings the Raft membership in line with the controller records (leader only; call it
    /// periodically): a recorded controller that is not a member joins as a learner, a learner
    /// that has caught up becomes a voter, and a member whose record was removed leaves.
    /// Does nothing while there is no record at all (a cluster upgraded from one controller
    /// registers itself at start). A leader whose own record is gone removes itself and steps
    /// down once that is committed.
    pub async fn reconcile_membership(&self) {
        if !self.is_leader() {
            return;
        }
        let records: BTreeMap<NodeId, (String, String)> = self.read_local(|s| {
            s.controllers
                .values()
                .map(|c| (c.id, (c.name.clone(), c.peer_address.clone())))
                .collect()
        });
        if records.is_empty() {
            return;
        }
        let (addresses, members, voters, last_log, replication) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            let addresses: BTreeMap<NodeId, String> = m
                .membership_config
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect();
            let members: BTreeSet<NodeId> = addresses.keys().copied().collect();
            let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
            (
                addresses,
                members,
                voters,
                m.last_log_index.unwrap_or(0),
                m.replication.clone().unwrap_or_default(),
            )
        };
        let raft = &self.inner.raft;
        for (id, (name, addr)) in &records {
            if let Some(old) = addresses.get(id)
                && old != addr
            {
                tracing::info!(controller = %name, node = id, from = %old, to = %addr, "updating the peer address in the raft membership");
                let nodes = BTreeMap::from([(*id, RaftPeer { addr: addr.clone() })]);
                if let Err(e) = raft
                    .change_membership(ChangeMembers::SetNodes(nodes), false)
                    .await
                {
                    tracing::warn!(controller = %name, node = id, error = %e, "cannot update the peer address");
                }
                continue;
            }
            if !members.contains(id) {
                tracing::info!(controller = %name, node = id, %addr, "adding controller as a raft learner");
                if let Err(e) = raft
                    .add_learner(*id, RaftPeer { addr: addr.clone() }, false)
                    .await
                {
                    tracing::warn!(controller = %name, node = id, error = %e, "cannot add raft learner");
                }
                continue;
            }
            if voters.contains(id) {
                continue;
            }
            let matched = replication.get(id).cloned().flatten().map(|l| l.index);
            // Caught up: within a few entries of the leader's log (in-flight writes).
            if matched.is_some_and(|m| m + 8 >= last_log) {
                tracing::info!(controller = %name, node = id, "learner caught up; promoting it to voter");
                match raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*id])), false)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(controller = %name, node = id, "controller is a raft voter")
                    }
                    Err(e) => {
                        tracing::warn!(controller = %name, node = id, error = %e, "cannot promote learner")
                    }
                }
            }
        }
        for id in members.iter().filter(|id| !records.contains_key(id)) {
            let change = if voters.contains(id) {
                ChangeMembers::RemoveVoters(BTreeSet::from([*id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([*id]))
            };
            tracing::info!(
                node = id,
                "removing raft member whose controller record is gone"
            );
            match raft.change_membership(change, false).await {
                Ok(_) => tracing::info!(node = id, "removed raft member"),
                Err(e) => tracing::warn!(node = id, error = %e, "cannot remove raft member"),
            }
        }
    }

    /// This controller's bus of lifecycle and operation events (published as entries apply).
    pub fn events(&self) -> &crate::events::EventBus {
        self.inner.sm.events()
    }

    /// A watch on the last applied log index; changes whenever an entry is applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.sm.subscribe()
    }

    /// The `berth.v1.Raft` gRPC service for this node, to mount on the peer listener.
    pub fn raft_service(&self) -> RaftServer<RaftService> {
        let sm = self.inner.sm.clone();
        let removed: super::service::RemovedCheck = Arc::new(move |fingerprint: &str| {
            sm.read()
                .state
                .cluster
                .removed_controllers
                .contains(fingerprint)
        });
        RaftService::into_server(self.inner.raft.clone(), self.has_tls(), removed)
    }

    /// Serves the peer listener on `listener` until `shutdown` completes: `berth.v1.Raft` and
    /// `berth.v1.Controller` (heartbeats once `heartbeats` is filled in), over the TLS set
    /// with [`Self::set_tls`] or given to `open`, if any.
    pub async fn serve(
        &self,
        listener: TcpListener,
        heartbeats: crate::peer::HeartbeatSlot,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let mut builder = Server::builder();
        let tls = self
            .inner
            .tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.server).map_err(ServeError::Tls)?;
        }
        builder
            .add_service(self.raft_service())
            .add_service(crate::peer::PeerService::into_server(
                self.clone(),
                heartbeats,
            ))
            .serve_with_incoming_shutdown(
                // Small Raft and heartbeat messages must not wait for delayed ACKs.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await
            .map_err(ServeError::Serve)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod unsure_retry_tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::{ControlPlane, WriteError};
    use crate::state::{ApiKey, Command, IdempotencyTag, Requestor, Role};

    fn add_key(id: &str, tag: Option<&str>) -> Command {
        Command::By {
            requestor: Requestor::default(),
            idempotency: tag.map(|t| IdempotencyTag {
                key: t.into(),
                request_hash: "h".into(),
                seq: 0,
                now: "2026-11-29T12:00:00Z".into(),
            }),
            command: Box::new(Command::AddApiKey {
                key: ApiKey {
                    id: id.into(),
                    name: id.into(),
                    hash: format!("hash-{id}"),
                    role: Role::Admin,
                    ..Default::default()
                },
            }),
        }
    }

    async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// A leader cut off while committing: an untagged write ends unsure; a tagged one is
    /// proposed again once the partition heals and lands exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tagged_writes_survive_a_leader_change() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut cps = Vec::new();
        let mut stops = Vec::new();
        let mut addrs = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let cp = ControlPlane::open(dir.path(), i as u64 + 1, addr.clone(), i == 0, None)
                .await
                .unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = cp.clone();
            tokio::spawn(async move {
                let shutdown = async {
                    let _ = stopped.await;
                };
                let _ = server
                    .serve(listener, crate::peer::HeartbeatSlot::default(), shutdown)
                    .await;
            });
            cps.push(cp);
            stops.push(stop);
            addrs.push(addr);
        }
        let n1 = cps[0].clone();
        assert!(wait_until(|| n1.is_leader()).await, "node 1 never led");
        n1.add_member(2, addrs[1].clone()).await.unwrap();
        n1.add_member(3, addrs[2].clone()).await.unwrap();
        n1.write(add_key("before", None)).await.unwrap();

        let isolate = |cps: &[ControlPlane]| {
            cps[0].faults().block(2);
            cps[0].faults().block(3);
            cps[1].faults().block(1);
            cps[2].faults().block(1);
        };
        let heal = |cps: &[ControlPlane]| {
            for cp in cps {
                cp.faults().heal();
            }
        };

        // Untagged: the leader cannot confirm it, and says so.
        isolate(&cps);
        let plain = n1.write(add_key("plain", None)).await;
        assert!(
            matches!(
                plain,
                Err(WriteError::Unsure(_)) | Err(WriteError::Unavailable(_))
            ),
            "{plain:?}"
        );
        heal(&cps);
        assert!(
            wait_until(|| cps.iter().any(|c| c.leads_with_quorum())).await,
            "no leader after healing"
        );

        // Tagged: cut the current leader off, heal while the write is retrying.
        let li = cps.iter().position(|c| c.is_leader()).unwrap();
        let old = cps[li].clone();
        for (i, cp) in cps.iter().enumerate() {
            if i == li {
                for other in 1..=3u64 {
                    if other != cp.id() {
                        cp.faults().block(other);
                    }
                }
            } else {
                cp.faults().block(old.id());
            }
        }
        let healer = {
            let cps = cps.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                heal(&cps);
            })
        };
        let tagged = old.write(add_key("tagged", Some("k/1"))).await;
        healer.await.unwrap();
        assert!(tagged.is_ok(), "a tagged write did not survive: {tagged:?}");
        // Once, and every controller agrees; again it is answered from the record.
        let leader = {
            assert!(wait_until(|| cps.iter().any(|c| c.leads_with_quorum())).await);
            cps.iter().find(|c| c.is_leader()).unwrap().clone()
        };
        assert!(leader.write(add_key("tagged", Some("k/1"))).await.is_ok());
        let want = leader.read(|s| s.clone()).await.unwrap();
        assert!(want.api_keys.contains_key("tagged"));
        assert_eq!(want.idempotency["k/1"].results.len(), 1);
        for cp in &cps {
            let cp = cp.clone();
            let want = want.clone();
            assert!(
                wait_until(|| cp.read_local(|s| *s == want)).await,
                "node {} diverged",
                cp.id()
            );
        }
        for cp in &cps {
            cp.shutdown().await;
        }
        for stop in stops {
            let _ = stop.send(());
        }
    }
}
