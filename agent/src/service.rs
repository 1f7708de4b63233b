//! The `Agent` gRPC service: maps each call onto the engine or the image store, and engine
//! errors onto gRPC status codes (the controller maps those onto HTTP statuses).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::agent_server::Agent;
use berth_proto::v1::{
    self, exec_input, exec_output, file_pull_chunk, file_push_chunk, image_import_chunk,
};
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info_span, warn};

use crate::engine::{Engine, EngineError, ExecRequest};
use crate::image::{ImageError, ImageStore};
use crate::network::Network;
use crate::runtime::files::{FileKind, FileMeta};
use crate::storage::StorageDriver;

/// Chunk size for streamed files.
const CHUNK: usize = 256 * 1024;

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct AgentService {
    pub(crate) name: String,
    pub(crate) engine: Arc<Engine>,
    pub(crate) images: Arc<ImageStore>,
    pub(crate) network: Arc<Network>,
    pub(crate) storage: Arc<dyn StorageDriver>,
    pub(crate) debian_mirror: Option<String>,
    /// Transfers announced by a controller and in flight (both sides).
    pub(crate) transfers: Arc<crate::transfer::Transfers>,
}

impl AgentService {
    pub fn new(
        name: String,
        engine: Arc<Engine>,
        images: Arc<ImageStore>,
        network: Arc<Network>,
        storage: Arc<dyn StorageDriver>,
        debian_mirror: Option<String>,
    ) -> Self {
        AgentService {
            name,
            engine,
            images,
            network,
            storage,
            debian_mirror,
            transfers: Arc::default(),
        }
    }
}

impl AgentService {
    async fn stop_or_restart(
        &self,
        r: v1::StopInstanceRequest,
        restart: bool,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let timeout = stop_timeout(r.timeout_secs);
        let span = info_span!("stop", instance = %r.name, force = r.force, restart);
        let status = if restart {
            self.engine
                .restart(&r.name, r.force, timeout)
                .instrument(span)
                .await
        } else {
            self.engine
                .stop(&r.name, r.force, timeout)
                .instrument(span)
                .await
        };
        Ok(Response::new(status.map_err(engine_status)?))
    }
}

/// Engine errors as gRPC statuses: what the caller got wrong is a 4xx-like code, the rest internal.
pub fn engine_status(e: EngineError) -> Status {
    let msg = e.to_string();
    match e {
        EngineError::NotFound(_) => Status::not_found(msg),
        EngineError::AlreadyExists(_) => Status::already_exists(msg),
        EngineError::NotRunning(_) => Status::failed_precondition(msg),
        EngineError::Busy(_) => Status::aborted(msg),
        EngineError::InvalidPath(_) | EngineError::InvalidConfig(_) => {
            Status::invalid_argument(msg)
        }
        EngineError::Files(ref f) => {
            use crate::runtime::files::FileError as F;
            match f {
                F::NotFound(..) => Status::not_found(msg),
                F::NotADirectory(..)
                | F::IsADirectory(..)
                | F::AlreadyExists(..)
                | F::NotEmpty(..) => Status::failed_precondition(msg),
                F::InvalidPath(..) | F::Escape(..) | F::InvalidId(..) | F::Unsupported(..) => {
                    Status::invalid_argument(msg)
                }
                F::PermissionDenied(..) => Status::permission_denied(msg),
                _ => {
                    warn!(error = %msg, "file operation failed");
                    Status::internal(msg)
                }
            }
        }
        EngineError::Exec(crate::runtime::exec::ExecError::InvalidRequest(_)) => {
            Status::invalid_argument(msg)
        }
        EngineError::Exec(crate::runtime::exec::ExecError::Setup(_)) => {
            Status::failed_precondition(msg)
        }
        other => {
            warn!(error = %other, "engine call failed");
            Status::internal(msg)
        }
    }
}

fn image_status(e: ImageError) -> Status {
    let msg = e.to_string();
    match e {
        ImageError::UnknownRecipe(_) => Status::invalid_argument(msg),
        ImageError::NotFound(_) => Status::not_found(msg),
        ImageError::InvalidImage(_) => Status::invalid_argument(msg),
        ImageError::InUse(_) => Status::failed_precondition(msg),
        other => {
            warn!(error = %other, "image call failed");
            Status::internal(msg)
        }
    }
}

/// A stop request's timeout: zero lets the engine use the instance's `boot.stop.timeout`
/// (default 30 s); anything else is capped at an hour.
fn stop_timeout(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs.min(3600)))
}

fn blocking_failed(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("background task failed: {e}"))
}

fn file_info(path: &str, m: &FileMeta) -> v1::FileInfo {
    v1::FileInfo {
        path: path.to_string(),
        r#type: match m.kind {
            FileKind::File => v1::FileType::File,
            FileKind::Directory => v1::FileType::Directory,
            FileKind::Symlink => v1::FileType::Symlink,
        } as i32,
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        size: m.size,
        entries: m.entries.clone(),
        target: m.target.clone(),
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    // Snapshots, local copies, publish and export: crate::volumes.
    async fn create_snapshot(
        &self,
        req: Request<v1::SnapshotRequest>,
    ) -> Result<Response<v1::SnapshotInfo>, Status> {
        crate::volumes::create_snapshot(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_snapshot(
        &self,
        req: Request<v1::SnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        crate::volumes::delete_snapshot(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn rename_snapshot(
        &self,
        req: Request<v1::RenameSnapshotRequest>,
    ) -> Result<Response<v1::SnapshotInfo>, Status> {
        crate::volumes::rename_snapshot(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_snapshots(
        &self,
        req: Request<v1::InstanceRef>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        crate::volumes::list_snapshots(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn restore_snapshot(
        &self,
        req: Request<v1::SnapshotRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        crate::volumes::restore_snapshot(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn copy_volume(
        &self,
        req: Request<v1::CopyVolumeRequest>,
    ) -> Result<Response<v1::CopyVolumeResponse>, Status> {
        crate::volumes::copy_volume(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn publish_image(
        &self,
        req: Request<v1::PublishImageRequest>,
    ) -> Result<Response<v1::Image>, Status> {
        crate::volumes::publish_image(self, req.into_inner())
            .await
            .map(Response::new)
    }

    type ExportImageStream = BoxStream<v1::ExportImageChunk>;

    async fn export_image(
        &self,
        req: Request<v1::ExportImageRequest>,
    ) -> Result<Response<Self::ExportImageStream>, Status> {
        crate::volumes::export_image(self, req.into_inner())
            .await
            .map(Response::new)
    }

    // Transfers between agents: crate::transfer.
    async fn expect_transfer(
        &self,
        req: Request<v1::ExpectTransferRequest>,
    ) -> Result<Response<v1::ExpectTransferResponse>, Status> {
        crate::transfer::expect_transfer(self, req.into_inner())
            .await
            .map(Response::new)
    }

    type SendInstanceStream = BoxStream<v1::TransferProgress>;

    async fn send_instance(
        &self,
        req: Request<v1::SendInstanceRequest>,
    ) -> Result<Response<Self::SendInstanceStream>, Status> {
        crate::transfer::send_instance(self, req.into_inner())
            .await
            .map(Response::new)
    }

    type SendImageStream = BoxStream<v1::TransferProgress>;

    async fn send_image(
        &self,
        req: Request<v1::SendImageRequest>,
    ) -> Result<Response<Self::SendImageStream>, Status> {
        crate::transfer::send_image(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn commit_transfer(
        &self,
        req: Request<v1::TransferRef>,
    ) -> Result<Response<v1::CommitTransferResponse>, Status> {
        crate::transfer::commit_transfer(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn abort_transfer(
        &self,
        req: Request<v1::TransferRef>,
    ) -> Result<Response<v1::AbortTransferResponse>, Status> {
        crate::transfer::abort_transfer(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn info(&self, _: Request<v1::InfoRequest>) -> Result<Response<v1::NodeInfo>, Status> {
        let storage = self.storage.clone();
        let usage = tokio::task::spawn_blocking(move || storage.usage())
            .await
            .map_err(blocking_failed)?
            .unwrap_or_default();
        Ok(Response::new(v1::NodeInfo {
            name: self.name.clone(),
            version: berth_proto::VERSION.into(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpus: crate::heartbeat::usable_cpus(),
            memory_bytes: crate::daemon::host_memory_bytes(),
            storage_driver: self.storage.name().into(),
            storage_total_bytes: usage.total,
            storage_used_bytes: usage.used,
            cgroup_layout: self.engine.cgroup_layout().to_string(),
            idmapped_mounts: self.storage.supports_idmapped_mounts(),
            bridge_ipv4_cidr: self.network.bridge_cidr(),
        }))
    }

    async fn create_instance(
        &self,
        req: Request<v1::CreateInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let req = req.into_inner();
        let existing_volume = req.existing_volume;
        let mut spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("the request has no instance spec"))?;
        berth_proto::api::names::validate_scoped_name(&spec.name)
            .map_err(Status::invalid_argument)?;
        if let Some(net) = spec.network.as_mut()
            && net.nameservers.is_empty()
        {
            net.nameservers = self.network.nameservers();
        }
        let span = info_span!("create", instance = %spec.name);
        let status = self
            .engine
            .create_with(&spec, existing_volume)
            .instrument(span)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(status))
    }

    async fn start_instance(
        &self,
        req: Request<v1::InstanceRef>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let name = req.into_inner().name;
        let span = info_span!("start", instance = %name);
        Ok(Response::new(
            self.engine
                .start(&name)
                .instrument(span)
                .await
                .map_err(engine_status)?,
        ))
    }

    async fn stop_instance(
        &self,
        req: Request<v1::StopInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        self.stop_or_restart(req.into_inner(), false).await
    }

    async fn restart_instance(
        &self,
        req: Request<v1::StopInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        self.stop_or_restart(req.into_inner(), true).await
    }

    async fn delete_instance(
        &self,
        req: Request<v1::DeleteInstanceRequest>,
    ) -> Result<Response<v1::DeleteInstanceResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("delete", instance = %r.name);
        self.engine
            .delete(&r.name, r.force)
            .instrument(span)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(v1::DeleteInstanceResponse {}))
    }

    async fn instance_state(
        &self,
        req: Request<v1::InstanceRef>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let name = req.into_inner().name;
        Ok(Response::new(
            self.engine.status(&name).await.map_err(engine_status)?,
        ))
    }

    async fn list_instances(
        &self,
        req: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        let names = req.into_inner().names;
        let instances = if names.is_empty() {
            self.engine.list().await
        } else {
            self.engine.list_named(names).await
        };
        Ok(Response::new(v1::ListInstancesResponse {
            instances: instances.map_err(engine_status)?,
        }))
    }

    async fn update_instance(
        &self,
        req: Request<v1::UpdateInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let r = req.into_inner();
        let config: BTreeMap<String, String> = r.config.into_iter().collect();
        let span = info_span!("update", instance = %r.name);
        Ok(Response::new(
            self.engine
                .update(&r.name, config)
                .instrument(span)
                .await
                .map_err(engine_status)?,
        ))
    }

    async fn rename_instance(
        &self,
        req: Request<v1::RenameInstanceRequest>,
    ) -> Result<Response<v1::InstanceStatus>, Status> {
        let r = req.into_inner();
        berth_proto::api::names::validate_scoped_name(&r.new_name)
            .map_err(Status::invalid_argument)?;
        let span = info_span!("rename", instance = %r.name, to = %r.new_name);
        Ok(Response::new(
            self.engine
                .rename(&r.name, &r.new_name)
                .instrument(span)
                .await
                .map_err(engine_status)?,
        ))
    }

    async fn console_log(
        &self,
        req: Request<v1::ConsoleLogRequest>,
    ) -> Result<Response<v1::ConsoleLogResponse>, Status> {
        let r = req.into_inner();
        let max = if r.max_bytes == 0 {
            1 << 20
        } else {
            r.max_bytes.min(16 << 20)
        };
        let data = self
            .engine
            .console_log(&r.name, max)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(v1::ConsoleLogResponse { data: data.into() }))
    }

    type ExecStream = BoxStream<v1::ExecOutput>;

    async fn exec(
        &self,
        req: Request<Streaming<v1::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut input = req.into_inner();
        let start = match input.message().await? {
            Some(v1::ExecInput {
                msg: Some(exec_input::Msg::Start(s)),
            }) => s,
            _ => {
                return Err(Status::invalid_argument(
                    "the first exec message must be start",
                ));
            }
        };
        if start.command.is_empty() {
            return Err(Status::invalid_argument("the command is empty"));
        }
        let tty = if start.tty {
            let cols = if start.width == 0 {
                80
            } else {
                start.width.min(u16::MAX as u32) as u16
            };
            let rows = if start.height == 0 {
                24
            } else {
                start.height.min(u16::MAX as u32) as u16
            };
            Some((cols, rows))
        } else {
            None
        };
        let span = info_span!("exec", instance = %start.instance);
        let mut session = self
            .engine
            .exec(ExecRequest {
                instance: start.instance.clone(),
                command: start.command.clone(),
                env: start.env.clone().into_iter().collect(),
                cwd: if start.cwd.is_empty() {
                    None
                } else {
                    Some(start.cwd.clone())
                },
                uid: start.uid,
                gid: start.gid,
                tty,
            })
            .instrument(span.clone())
            .await
            .map_err(engine_status)?;
        let (tx, rx) = mpsc::channel::<Result<v1::ExecOutput, Status>>(32);
        let control = session.control();
        let killer = session.control();
        let stdin = session.take_stdin();
        let stdout = session.take_stdout();
        let stderr = session.take_stderr();

        // Client input: stdin bytes, EOF, resizes and signals.
        let input_task = tokio::spawn(
            async move {
                let mut stdin = stdin;
                while let Ok(Some(msg)) = input.message().await {
                    match msg.msg {
                        Some(exec_input::Msg::Stdin(b)) => {
                            if let Some(w) = stdin.as_mut()
                                && w.write_all(&b).await.is_err()
                            {
                                stdin = None;
                            }
                        }
                        Some(exec_input::Msg::StdinEof(_)) => {
                            if let Some(mut w) = stdin.take() {
                                let _ = w.shutdown().await;
                            }
                        }
                        Some(exec_input::Msg::Resize(s)) => {
                            let _ = control.resize(
                                s.width.clamp(1, u16::MAX as u32) as u16,
                                s.height.clamp(1, u16::MAX as u32) as u16,
                            );
                        }
                        Some(exec_input::Msg::Signal(sig)) if (1..=64).contains(&sig) => {
                            let _ = control.signal(sig);
                        }
                        _ => {}
                    }
                }
                debug!("exec input ended");
            }
            .instrument(span.clone()),
        );

        // Output pumps, then the exit code once both have drained.
        let pump = |reader: Option<crate::runtime::exec::ExecOutput>,
                    is_err: bool,
                    tx: mpsc::Sender<Result<v1::ExecOutput, Status>>| {
            tokio::spawn(async move {
                let Some(mut r) = reader else { return };
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let data = bytes::Bytes::copy_from_slice(&buf[..n]);
                            let msg = if is_err {
                                exec_output::Msg::Stderr(data)
                            } else {
                                exec_output::Msg::Stdout(data)
                            };
                            if tx
                                .send(Ok(v1::ExecOutput { msg: Some(msg) }))
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                }
            })
        };
        let out_task = pump(stdout, false, tx.clone());
        let err_task = pump(stderr, true, tx.clone());
        tokio::spawn(
            async move {
                // When the caller goes away (the controller cancels the stream), the command
                // is killed rather than left running with nobody to talk to.
                let wait = session.wait();
                tokio::pin!(wait);
                let code = tokio::select! {
                    code = &mut wait => code,
                    _ = tx.closed() => {
                        debug!("exec caller went away; killing the command");
                        let _ = killer.signal(libc::SIGKILL);
                        wait.await
                    }
                };
                let _ = out_task.await;
                let _ = err_task.await;
                input_task.abort();
                let msg = match code {
                    Ok(c) => Ok(v1::ExecOutput {
                        msg: Some(exec_output::Msg::ExitCode(c)),
                    }),
                    Err(e) => Err(Status::internal(format!("exec failed: {e}"))),
                };
                let _ = tx.send(msg).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_file(
        &self,
        req: Request<Streaming<v1::FilePushChunk>>,
    ) -> Result<Response<v1::FileInfo>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(v1::FilePushChunk {
                msg: Some(file_push_chunk::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first file message must be the header",
                ));
            }
        };
        let kind = match v1::FileType::try_from(header.r#type) {
            Ok(v1::FileType::Directory) => FileKind::Directory,
            Ok(v1::FileType::Symlink) => FileKind::Symlink,
            _ => FileKind::File,
        };
        // The gRPC stream as an AsyncRead for the engine. When the sender said how much is
        // coming and less arrived, the reader fails, so the engine keeps the old file.
        let expected = header.size;
        let chunks = futures::stream::unfold(
            (stream, 0u64, false),
            move |(mut stream, seen, done)| async move {
                if done {
                    return None;
                }
                match stream.message().await {
                    Ok(Some(v1::FilePushChunk {
                        msg: Some(file_push_chunk::Msg::Data(d)),
                    })) => {
                        let seen = seen + d.len() as u64;
                        Some((Ok(d), (stream, seen, false)))
                    }
                    Ok(Some(_)) => Some((Ok(bytes::Bytes::new()), (stream, seen, false))),
                    Ok(None) => match expected {
                        Some(n) if n != seen => Some((
                            Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                format!("the upload ended after {seen} of {n} bytes"),
                            )),
                            (stream, seen, true),
                        )),
                        _ => None,
                    },
                    Err(e) => Some((
                        Err(std::io::Error::other(format!("the upload failed: {e}"))),
                        (stream, seen, true),
                    )),
                }
            },
        );
        let r = tokio_util::io::StreamReader::new(Box::pin(chunks));
        let target = if header.target.is_empty() {
            None
        } else {
            Some(header.target.clone())
        };
        let span = info_span!("push", instance = %header.instance, path = %header.path);
        let meta = self
            .engine
            .push_file(
                &header.instance,
                &header.path,
                kind,
                header.mode,
                header.uid,
                header.gid,
                target,
                r,
            )
            .instrument(span)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(file_info(&header.path, &meta)))
    }

    type PullFileStream = BoxStream<v1::FilePullChunk>;

    async fn pull_file(
        &self,
        req: Request<v1::FilePullRequest>,
    ) -> Result<Response<Self::PullFileStream>, Status> {
        let r = req.into_inner();
        let (meta, reader) = self
            .engine
            .pull_file(&r.instance, &r.path)
            .await
            .map_err(engine_status)?;
        let (tx, rx) = mpsc::channel(8);
        let info = file_info(&r.path, &meta);
        tokio::spawn(async move {
            if tx
                .send(Ok(v1::FilePullChunk {
                    msg: Some(file_pull_chunk::Msg::Info(info)),
                }))
                .await
                .is_err()
            {
                return;
            }
            let Some(mut reader) = reader else { return };
            let mut buf = vec![0u8; CHUNK];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = v1::FilePullChunk {
                            msg: Some(file_pull_chunk::Msg::Data(bytes::Bytes::copy_from_slice(
                                &buf[..n],
                            ))),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!(
                                "reading the file failed: {e}"
                            ))))
                            .await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delete_file(
        &self,
        req: Request<v1::FileDeleteRequest>,
    ) -> Result<Response<v1::FileDeleteResponse>, Status> {
        let r = req.into_inner();
        self.engine
            .delete_file(&r.instance, &r.path)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(v1::FileDeleteResponse {}))
    }

    async fn build_image(
        &self,
        req: Request<v1::BuildImageRequest>,
    ) -> Result<Response<v1::Image>, Status> {
        let r = req.into_inner();
        let images = self.images.clone();
        let mirror = if r.mirror.is_empty() {
            self.debian_mirror.clone()
        } else {
            Some(r.mirror)
        };
        let span = info_span!("build", recipe = %r.recipe);
        let img = tokio::task::spawn_blocking(move || {
            let _e = span.enter();
            images.build(&r.recipe, mirror.as_deref())
        })
        .await
        .map_err(blocking_failed)?
        .map_err(image_status)?;
        Ok(Response::new(img))
    }

    async fn import_image(
        &self,
        req: Request<Streaming<v1::ImageImportChunk>>,
    ) -> Result<Response<v1::Image>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(v1::ImageImportChunk {
                msg: Some(image_import_chunk::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first import message must be the header",
                ));
            }
        };
        let format = match header.format.as_str() {
            "" | "unified" => crate::image::ImportFormat::Unified,
            "split" => crate::image::ImportFormat::Split,
            other => {
                return Err(Status::invalid_argument(format!(
                    "image format \"{other}\" is not unified or split"
                )));
            }
        };
        // Spool the upload to temporary files (metadata first for split images).
        let tmp =
            tempdir_in(&self.images.spool_dir()).map_err(|e| Status::internal(e.to_string()))?;
        let meta_path = tmp.join("metadata");
        let rootfs_path = tmp.join("rootfs");
        let cleanup = SpoolGuard(tmp.clone());
        let mut meta_left = if format == crate::image::ImportFormat::Split {
            header.metadata_size
        } else {
            0
        };
        let mut meta_file = if meta_left > 0 {
            Some(
                tokio::fs::File::create(&meta_path)
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?,
            )
        } else {
            None
        };
        let mut rootfs_file = tokio::fs::File::create(&rootfs_path)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        while let Some(chunk) = stream.message().await? {
            let Some(image_import_chunk::Msg::Data(mut d)) = chunk.msg else {
                continue;
            };
            if meta_left > 0 {
                let take = (meta_left as usize).min(d.len());
                let head = d.split_to(take);
                if let Some(f) = meta_file.as_mut() {
                    f.write_all(&head)
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?;
                }
                meta_left -= take as u64;
            }
            if !d.is_empty() {
                rootfs_file
                    .write_all(&d)
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
        }
        if meta_left > 0 {
            return Err(Status::invalid_argument(
                "the upload ended inside the metadata tarball",
            ));
        }
        if let Some(mut f) = meta_file {
            f.flush()
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        rootfs_file
            .flush()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        drop(rootfs_file);
        let images = self.images.clone();
        let aliases = header.aliases.clone();
        let split = format == crate::image::ImportFormat::Split;
        let img = tokio::task::spawn_blocking(move || {
            let r = images.import(
                format,
                if split {
                    Some(meta_path.as_path())
                } else {
                    None
                },
                &rootfs_path,
                aliases,
            );
            drop(cleanup);
            r
        })
        .await
        .map_err(blocking_failed)?
        .map_err(image_status)?;
        Ok(Response::new(img))
    }

    async fn list_images(
        &self,
        _: Request<v1::ListImagesRequest>,
    ) -> Result<Response<v1::ListImagesResponse>, Status> {
        let images = self.images.clone();
        let list = tokio::task::spawn_blocking(move || images.list())
            .await
            .map_err(blocking_failed)?
            .map_err(image_status)?;
        Ok(Response::new(v1::ListImagesResponse { images: list }))
    }

    async fn delete_image(
        &self,
        req: Request<v1::DeleteImageRequest>,
    ) -> Result<Response<v1::DeleteImageResponse>, Status> {
        let fp = req.into_inner().fingerprint;
        let images = self.images.clone();
        tokio::task::spawn_blocking(move || images.delete(&fp))
            .await
            .map_err(blocking_failed)?
            .map_err(image_status)?;
        Ok(Response::new(v1::DeleteImageResponse {}))
    }
}

/// A fresh private directory under `parent` for one upload.
fn tempdir_in(parent: &std::path::Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::create_dir_all(parent)?;
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    let dir = parent.join(format!("upload-{}", hex::encode(b)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Removes an upload's spool directory when dropped.
struct SpoolGuard(PathBuf);

impl Drop for SpoolGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
