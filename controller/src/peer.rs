//! `berth.v1.Controller` on the peer port: controllers forward writes and ask for read indexes
//! here, agents send heartbeats. Who may call what comes from the verified client certificate
//! (see [`crate::tls::peer_role`]) and its fingerprint: Forward and ReadIndex need a
//! controller certificate that belongs to a current controller record, Heartbeat the agent
//! certificate the node joined with (whose name is the node's). The role alone is not enough:
//! the CA signed the certificates of controllers that were removed since, and an agent's old
//! certificate still names its node.

use std::sync::{Arc, OnceLock};

use berth_proto::v1::controller_server::{Controller, ControllerServer};
use berth_proto::v1::{
    ForwardReply, ForwardRequest, HeartbeatReply, HeartbeatRequest, ReadIndexReply,
    ReadIndexRequest,
};
use tonic::{Request, Response, Status};

use crate::api::SharedState;
use crate::raft::{
    Attempt, ControlPlane, LEADER_UNAVAILABLE, LEADER_UNSURE, MAX_MESSAGE_BYTES, ReadError,
    WriteError,
};
use crate::state::{ApplyResult, Command};
use crate::tls::{PeerRole, caller_role, require_controller};

/// sha256 (lowercase hex) of the caller's certificate on a mutual-TLS listener.
fn caller_fingerprint<T>(req: &Request<T>) -> Result<String, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("a client certificate from the cluster CA is required")
    })?;
    let leaf = certs.first().ok_or_else(|| {
        Status::unauthenticated("a client certificate from the cluster CA is required")
    })?;
    use sha2::Digest as _;
    Ok(hex::encode(sha2::Sha256::digest(leaf.as_ref())))
}

/// Whether a controller certificate with this fingerprint may forward writes and ask for read
/// indexes, given the current controller records: it must be the certificate of one of them.
/// Records with an empty fingerprint come from clusters made before fingerprints were
/// recorded (each controller records its own when it starts); while one exists, or before any
/// controller is recorded at all (a cluster being bootstrapped), the role alone is accepted.
fn controller_allowed<'a>(fingerprint: &str, mut recorded: impl Iterator<Item = &'a str>) -> bool {
    let mut any = false;
    let allowed = recorded.any(|fp| {
        any = true;
        fp.is_empty() || fp.eq_ignore_ascii_case(fingerprint)
    });
    allowed || !any
}

/// Where the peer service finds the API state heartbeats need. The peer listener starts
/// before the API state exists (a restarted controller must take part in elections at once),
/// so the state is filled in later; until then heartbeats are answered UNAVAILABLE.
pub type HeartbeatSlot = Arc<OnceLock<SharedState>>;

/// Serves `berth.v1.Controller` for one controller.
pub struct PeerService {
    cp: ControlPlane,
    tls: bool,
    heartbeats: HeartbeatSlot,
}

impl PeerService {
    /// The tonic server. While `heartbeats` is empty (and always in tests of the Raft plane
    /// alone), Heartbeat answers UNAVAILABLE after the role check.
    pub fn into_server(
        cp: ControlPlane,
        heartbeats: HeartbeatSlot,
    ) -> ControllerServer<PeerService> {
        let tls = cp.has_tls();
        ControllerServer::new(PeerService {
            cp,
            tls,
            heartbeats,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Checks that the caller is a current controller: its role, then its certificate's
    /// fingerprint against the controller records. The receiver of Forward and ReadIndex
    /// leads; should its applied state lag behind (a leader just elected applies what it
    /// inherited shortly after), a refusal is checked again on a linearizable read.
    async fn require_member<T>(&self, request: &Request<T>) -> Result<(), Status> {
        require_controller(request, self.tls)?;
        if !self.tls {
            return Ok(());
        }
        let fingerprint = caller_fingerprint(request)?;
        let allowed = |s: &crate::state::State| {
            controller_allowed(
                &fingerprint,
                s.controllers.values().map(|c| c.cert_fingerprint.as_str()),
            )
        };
        if self.cp.read_local(allowed) || self.cp.read(allowed).await.unwrap_or(false) {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "the certificate is not the one of a current controller",
            ))
        }
    }

    /// The answer of a receiver that does not lead.
    fn not_leader(&self) -> Status {
        let leader = self
            .cp
            .leader()
            .map(|(_, addr)| addr)
            .unwrap_or_else(|| "unknown".into());
        Status::failed_precondition(format!(
            "this controller is not the raft leader; the leader is {leader}"
        ))
    }
}

#[tonic::async_trait]
impl Controller for PeerService {
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardReply>, Status> {
        self.require_member(&request).await?;
        let cmd: Command = serde_json::from_slice(&request.into_inner().command)
            .map_err(|e| Status::invalid_argument(format!("cannot decode the command: {e}")))?;
        let result: ApplyResult = match self.cp.write_local(cmd).await {
            Ok(Attempt::Done(ok)) => Ok(ok),
            Ok(Attempt::Retry(_) | Attempt::RetryUnsure(_)) => return Err(self.not_leader()),
            Err(WriteError::Rejected(e)) => Err(e),
            Err(WriteError::Unavailable(u)) => {
                return Err(Status::unavailable(format!("{LEADER_UNAVAILABLE}{u}")));
            }
            Err(WriteError::Unsure(u)) => {
                return Err(Status::unavailable(format!("{LEADER_UNSURE}{u}")));
            }
            Err(WriteError::Raft(e)) => return Err(Status::internal(e)),
        };
        let data = serde_json::to_vec(&result)
            .map_err(|e| Status::internal(format!("cannot encode the result: {e}")))?;
        Ok(Response::new(ForwardReply {
            result: data.into(),
        }))
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        self.require_member(&request).await?;
        match self.cp.read_index_local().await {
            Ok(Attempt::Done(index)) => Ok(Response::new(ReadIndexReply { index })),
            Ok(Attempt::Retry(_) | Attempt::RetryUnsure(_)) => Err(self.not_leader()),
            Err(ReadError::Unavailable(u)) => {
                Err(Status::unavailable(format!("{LEADER_UNAVAILABLE}{u}")))
            }
            Err(ReadError::Raft(e)) => Err(Status::internal(e)),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let node = if self.tls {
            match caller_role(&request)? {
                PeerRole::Agent(node) => node,
                PeerRole::Controller => {
                    return Err(Status::permission_denied(
                        "only node agents may send heartbeats",
                    ));
                }
            }
        } else {
            return Err(Status::unauthenticated(
                "heartbeats need a mutual-tls peer listener",
            ));
        };
        // The node's agent certificate is the one it joined with; another certificate naming
        // the node (an older one, or one issued for a node of the same name since removed)
        // is refused. A node that is not a member is left to the liveness code to answer.
        // A refusal is checked again on a linearizable read, in case this controller's applied
        // state lags behind (the node joined again under its name since).
        let fingerprint = caller_fingerprint(&request)?;
        let other_certificate = |s: &crate::state::State| {
            s.nodes
                .get(&node)
                .is_some_and(|n| !n.cert_fingerprint.eq_ignore_ascii_case(&fingerprint))
        };
        if self.cp.read_local(other_certificate)
            && self.cp.read(other_certificate).await.unwrap_or(true)
        {
            return Err(Status::permission_denied(format!(
                "the certificate is not the one node {node} joined with"
            )));
        }
        let Some(state) = self.heartbeats.get() else {
            return Err(Status::unavailable(
                "this controller does not take heartbeats yet",
            ));
        };
        let reply = crate::liveness::heartbeat(state, &node, request.into_inner()).await;
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::controller_allowed;

    #[test]
    fn controllers_are_allowed_by_their_recorded_certificate() {
        // Only a recorded fingerprint passes once every record has one.
        assert!(controller_allowed("aa", ["aa", "bb"].into_iter()));
        assert!(controller_allowed("AA", ["aa", "bb"].into_iter()));
        assert!(!controller_allowed("cc", ["aa", "bb"].into_iter()));
        // A record from before fingerprints: the role is enough.
        assert!(controller_allowed("cc", ["aa", ""].into_iter()));
        // No record yet (bootstrap): the role is enough.
        assert!(controller_allowed("cc", std::iter::empty()));
    }
}
