//! Volume work on this node that the controller asks for: snapshots (take, delete, rename,
//! list with sizes, restore), local copies of an instance or snapshot, publishing an instance
//! or snapshot as an image, and exporting an image as an LXD/Incus unified tarball.

use berth_proto::v1;
use tonic::Status;

use crate::service::{AgentService, BoxStream};

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not available yet"))
}

pub async fn create_snapshot(
    svc: &AgentService,
    req: v1::SnapshotRequest,
) -> Result<v1::SnapshotInfo, Status> {
    let _ = (svc, req);
    Err(not_yet("taking a snapshot"))
}

pub async fn delete_snapshot(
    svc: &AgentService,
    req: v1::SnapshotRequest,
) -> Result<v1::DeleteSnapshotResponse, Status> {
    let _ = (svc, req);
    Err(not_yet("deleting a snapshot"))
}

pub async fn rename_snapshot(
    svc: &AgentService,
    req: v1::RenameSnapshotRequest,
) -> Result<v1::SnapshotInfo, Status> {
    let _ = (svc, req);
    Err(not_yet("renaming a snapshot"))
}

pub async fn list_snapshots(
    svc: &AgentService,
    req: v1::InstanceRef,
) -> Result<v1::ListSnapshotsResponse, Status> {
    let _ = (svc, req);
    Err(not_yet("listing snapshots"))
}

pub async fn restore_snapshot(
    svc: &AgentService,
    req: v1::SnapshotRequest,
) -> Result<v1::InstanceStatus, Status> {
    let _ = (svc, req);
    Err(not_yet("restoring a snapshot"))
}

pub async fn copy_volume(
    svc: &AgentService,
    req: v1::CopyVolumeRequest,
) -> Result<v1::CopyVolumeResponse, Status> {
    let _ = (svc, req);
    Err(not_yet("copying a volume"))
}

pub async fn publish_image(
    svc: &AgentService,
    req: v1::PublishImageRequest,
) -> Result<v1::Image, Status> {
    let _ = (svc, req);
    Err(not_yet("publishing an image"))
}

pub async fn export_image(
    svc: &AgentService,
    req: v1::ExportImageRequest,
) -> Result<BoxStream<v1::ExportImageChunk>, Status> {
    let _ = (svc, req);
    Err(not_yet("exporting an image"))
}
