//! Volume work on this node that the controller asks for: snapshots (take, delete, rename,
//! list with sizes, restore), local copies of an instance or snapshot, publishing an instance
//! or snapshot as an image, and exporting an image as an LXD/Incus unified tarball.
//!
//! Each call takes the instance's engine lock (see [`crate::engine::Engine`]); errors map onto
//! gRPC codes: a missing instance, snapshot or image is NotFound, a taken name AlreadyExists,
//! a running instance where a stopped one is needed FailedPrecondition, a bad name
//! InvalidArgument.

use std::collections::BTreeMap;

use berth_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{Instrument, info_span, warn};

use crate::engine::EngineError;
use crate::image::ImageError;
use crate::service::{AgentService, BoxStream, engine_status};
use crate::storage::StorageError;

/// Size of the chunks an export streams.
const EXPORT_CHUNK: usize = 256 * 1024;

/// Engine errors of volume calls as gRPC statuses.
fn volume_status(e: EngineError) -> Status {
    let msg = e.to_string();
    match &e {
        EngineError::Running(_) => Status::failed_precondition(msg),
        EngineError::Storage(s) => match s {
            StorageError::SnapshotNotFound { .. }
            | StorageError::VolumeNotFound(_)
            | StorageError::ImageNotFound(_) => Status::not_found(msg),
            StorageError::SnapshotExists { .. } | StorageError::VolumeExists(_) => {
                Status::already_exists(msg)
            }
            StorageError::InvalidName(_) | StorageError::InvalidSnapshotName(..) => {
                Status::invalid_argument(msg)
            }
            _ => engine_status(e),
        },
        _ => engine_status(e),
    }
}

fn image_status(e: ImageError) -> Status {
    let msg = e.to_string();
    match e {
        ImageError::NotFound(_) => Status::not_found(msg),
        ImageError::InvalidFingerprint(_) | ImageError::InvalidImage(_) => {
            Status::invalid_argument(msg)
        }
        ImageError::InUse(_) => Status::failed_precondition(msg),
        ImageError::Storage(s) => volume_status(EngineError::Storage(s)),
        other => {
            warn!(error = %other, "image call failed");
            Status::internal(msg)
        }
    }
}

/// "" means none.
fn optional(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

pub async fn create_snapshot(
    svc: &AgentService,
    req: v1::SnapshotRequest,
) -> Result<v1::SnapshotInfo, Status> {
    let span = info_span!("snapshot", instance = %req.instance, snapshot = %req.snapshot);
    svc.engine
        .snapshot(&req.instance, &req.snapshot)
        .instrument(span)
        .await
        .map_err(volume_status)
}

pub async fn delete_snapshot(
    svc: &AgentService,
    req: v1::SnapshotRequest,
) -> Result<v1::DeleteSnapshotResponse, Status> {
    let span = info_span!("delete_snapshot", instance = %req.instance, snapshot = %req.snapshot);
    svc.engine
        .delete_snapshot(&req.instance, &req.snapshot)
        .instrument(span)
        .await
        .map_err(volume_status)?;
    Ok(v1::DeleteSnapshotResponse {})
}

pub async fn rename_snapshot(
    svc: &AgentService,
    req: v1::RenameSnapshotRequest,
) -> Result<v1::SnapshotInfo, Status> {
    let span = info_span!("rename_snapshot", instance = %req.instance, snapshot = %req.snapshot, to = %req.new_name);
    svc.engine
        .rename_snapshot(&req.instance, &req.snapshot, &req.new_name)
        .instrument(span)
        .await
        .map_err(volume_status)
}

pub async fn list_snapshots(
    svc: &AgentService,
    req: v1::InstanceRef,
) -> Result<v1::ListSnapshotsResponse, Status> {
    let snapshots = svc
        .engine
        .list_snapshots(&req.name)
        .await
        .map_err(volume_status)?;
    Ok(v1::ListSnapshotsResponse { snapshots })
}

pub async fn restore_snapshot(
    svc: &AgentService,
    req: v1::SnapshotRequest,
) -> Result<v1::InstanceStatus, Status> {
    let span = info_span!("restore", instance = %req.instance, snapshot = %req.snapshot);
    svc.engine
        .restore(&req.instance, &req.snapshot)
        .instrument(span)
        .await
        .map_err(volume_status)
}

pub async fn copy_volume(
    svc: &AgentService,
    req: v1::CopyVolumeRequest,
) -> Result<v1::CopyVolumeResponse, Status> {
    let span = info_span!("copy_volume", instance = %req.source, snapshot = %req.source_snapshot, target = %req.target, refresh = req.refresh);
    svc.engine
        .copy_volume(
            &req.source,
            optional(&req.source_snapshot),
            &req.target,
            req.instance_only,
            req.refresh,
        )
        .instrument(span)
        .await
        .map_err(volume_status)?;
    Ok(v1::CopyVolumeResponse {})
}

pub async fn publish_image(
    svc: &AgentService,
    req: v1::PublishImageRequest,
) -> Result<v1::Image, Status> {
    let span = info_span!("publish", instance = %req.instance, snapshot = %req.snapshot);
    async {
        let source = svc
            .engine
            .publish_source(&req.instance, optional(&req.snapshot))
            .await
            .map_err(volume_status)?;
        let images = svc.images.clone();
        let path = source.path.clone();
        let properties: BTreeMap<String, String> = req.properties.into_iter().collect();
        let image = tokio::task::spawn_blocking(move || images.publish(&path, &properties))
            .await
            .map_err(|e| Status::internal(format!("background task failed: {e}")))?
            .map_err(image_status)?;
        // The instance stays locked until the image is made.
        drop(source);
        Ok(image)
    }
    .instrument(span)
    .await
}

pub async fn export_image(
    svc: &AgentService,
    req: v1::ExportImageRequest,
) -> Result<BoxStream<v1::ExportImageChunk>, Status> {
    let fp = req.fingerprint;
    crate::image::check_fingerprint(&fp).map_err(image_status)?;
    let images = svc.images.clone();
    {
        let (images, f) = (images.clone(), fp.clone());
        let present = tokio::task::spawn_blocking(move || images.volume_path(&f))
            .await
            .map_err(|e| Status::internal(format!("background task failed: {e}")))?
            .map_err(image_status)?;
        if present.is_none() {
            return Err(Status::not_found(format!("image {fp} not found")));
        }
    }
    let (tx, rx) = mpsc::channel::<Result<v1::ExportImageChunk, Status>>(8);
    tokio::task::spawn_blocking(move || {
        let mut pending: Vec<u8> = Vec::with_capacity(EXPORT_CHUNK);
        let send = |data: Vec<u8>| {
            tx.blocking_send(Ok(v1::ExportImageChunk { data: data.into() }))
                .map_err(|_| std::io::Error::other("the export stream was closed"))
        };
        let result = images.export(&fp, |chunk| {
            pending.extend_from_slice(chunk);
            if pending.len() >= EXPORT_CHUNK {
                send(std::mem::take(&mut pending))?;
            }
            Ok(())
        });
        let result = result.and_then(|n| {
            if !pending.is_empty() {
                send(std::mem::take(&mut pending)).map_err(|e| ImageError::Io {
                    path: fp.clone().into(),
                    source: e,
                })?;
            }
            Ok(n)
        });
        match result {
            Ok(bytes) => tracing::info!(fingerprint = %fp, bytes, "image exported"),
            Err(e) => {
                warn!(fingerprint = %fp, error = %e, "image export failed");
                let _ = tx.blocking_send(Err(image_status(e)));
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
