//! `berth.v1.Controller` on the peer port: controllers forward writes and ask for read indexes
//! here, agents send heartbeats. Who may call what comes from the verified client certificate
//! (see [`crate::tls::peer_role`]): Forward and ReadIndex need a controller certificate,
//! Heartbeat an agent certificate, whose name is the node's.

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
        require_controller(&request, self.tls)?;
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
        require_controller(&request, self.tls)?;
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
        let Some(state) = self.heartbeats.get() else {
            return Err(Status::unavailable(
                "this controller does not take heartbeats yet",
            ));
        };
        let reply = crate::liveness::heartbeat(state, &node, request.into_inner()).await;
        Ok(Response::new(reply))
    }
}
