//! Transfers between agents: btrfs send streams over gRPC with mutual TLS, checksummed per
//! volume, staged on the receiving side until committed, abandoned cleanly on failure.
//!
//! The controller announces a transfer to the receiver (`ExpectTransfer`, a ticket), asks the
//! sender to send (`SendInstance`, `SendImage`), then commits (`CommitTransfer`) or aborts
//! (`AbortTransfer`) it on the receiver.

use berth_proto::v1;
use tonic::Status;

use crate::service::{AgentService, BoxStream};

/// Transfers announced by a controller and in flight on this node (both sides).
#[derive(Default)]
pub struct Transfers {}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not available yet"))
}

pub async fn expect_transfer(
    svc: &AgentService,
    req: v1::ExpectTransferRequest,
) -> Result<v1::ExpectTransferResponse, Status> {
    let _ = (&svc.transfers, req);
    Err(not_yet("receiving a transfer"))
}

pub async fn send_instance(
    svc: &AgentService,
    req: v1::SendInstanceRequest,
) -> Result<BoxStream<v1::TransferProgress>, Status> {
    let _ = (svc, req);
    Err(not_yet("sending an instance"))
}

pub async fn send_image(
    svc: &AgentService,
    req: v1::SendImageRequest,
) -> Result<BoxStream<v1::TransferProgress>, Status> {
    let _ = (svc, req);
    Err(not_yet("sending an image"))
}

pub async fn commit_transfer(
    svc: &AgentService,
    req: v1::TransferRef,
) -> Result<v1::CommitTransferResponse, Status> {
    let _ = (svc, req);
    Err(not_yet("committing a transfer"))
}

pub async fn abort_transfer(
    svc: &AgentService,
    req: v1::TransferRef,
) -> Result<v1::AbortTransferResponse, Status> {
    let _ = (svc, req);
    Err(not_yet("aborting a transfer"))
}
