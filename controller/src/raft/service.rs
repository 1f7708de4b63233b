//! The Raft gRPC service: receives openraft RPCs from peers and hands them to the local node.

use berth_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use berth_proto::v1::{RaftReply, RaftRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use super::codec::{self, MAX_MESSAGE_BYTES};
use super::types::Raft;
use crate::tls::require_controller;

/// Serves `berth.v1.Raft` for one local openraft node.
///
/// Callers are checked by role (a controller certificate from the cluster CA) and against the
/// fingerprints of removed controllers, not against the current records as Forward and
/// ReadIndex are: a member that is behind may not have applied the record of a controller
/// that joined since, yet must take its votes and entries, or the cluster could not make
/// progress. A removed controller that keeps running is refused as soon as this member has
/// applied its removal, so its vote requests cannot disturb elections.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    tls: bool,
    removed: RemovedCheck,
}

/// Whether a certificate fingerprint (lowercase hex sha256) belongs to a removed controller.
pub type RemovedCheck = std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl RaftService {
    /// Wraps `raft` in a tonic server with a message size limit that fits snapshot chunks.
    /// With `tls`, every call must come from a controller certificate that `removed` does not
    /// name.
    pub fn into_server(raft: Raft, tls: bool, removed: RemovedCheck) -> RaftServer<RaftService> {
        RaftServer::new(RaftService { raft, tls, removed })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        require_controller(request, self.tls)?;
        if self.tls
            && let Some(leaf) = request.peer_certs().and_then(|c| c.first().cloned())
        {
            use sha2::Digest as _;
            let fingerprint = hex::encode(sha2::Sha256::digest(leaf.as_ref()));
            if (self.removed)(&fingerprint) {
                return Err(Status::permission_denied(
                    "this controller was removed from the cluster",
                ));
            }
        }
        Ok(())
    }
}

fn decode_request<T: DeserializeOwned>(req: Request<RaftRequest>) -> Result<T, Status> {
    codec::decode(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("cannot decode raft request: {e}")))
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftReply>, Status> {
    let data = codec::encode(result)
        .map_err(|e| Status::internal(format!("cannot encode raft reply: {e}")))?;
    Ok(Response::new(RaftReply { data: data.into() }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.check(&request)?;
        let req = decode_request(request)?;
        reply(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.check(&request)?;
        let req = decode_request(request)?;
        reply(&self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.check(&request)?;
        let req = decode_request(request)?;
        reply(&self.raft.install_snapshot(req).await)
    }
}
