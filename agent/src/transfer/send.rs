//! The sending side: connects to the receiving agent's `Transfer` service with this agent's
//! certificate, learns what it holds, and streams `btrfs send` output in ~1 MiB chunks,
//! incremental against the newest volume the receiver has.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::v1::{self, transfer_chunk, transfer_reply};
use bytes::BytesMut;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{Instrument, info, info_span, warn};

use super::{
    BASES_DIR, CHUNK, SNAPSHOTS_DIR, TransferError, Transfers, blocking, check_fingerprint,
    check_name, check_ticket,
};
use crate::service::BoxStream;
use crate::storage::send::{
    SubvolInfo, delete_subvol, list_dirs, send_command, snapshot_readonly, subvol_info,
};

/// A volume of ours the receiver may hold.
#[derive(Debug, Clone)]
struct Candidate {
    name: String,
    path: PathBuf,
    info: SubvolInfo,
    /// When it was taken (snapshots: their recorded time; bases: btrfs creation time).
    created_at: i64,
}

/// Progress shared between a send and its reporter.
#[derive(Default)]
struct Progress {
    bytes: AtomicU64,
    volume: Mutex<String>,
    reused: Mutex<Vec<String>>,
}

impl Progress {
    fn report(&self, rate: u64, done: bool) -> v1::TransferProgress {
        v1::TransferProgress {
            bytes_sent: self.bytes.load(Ordering::Relaxed),
            rate,
            volume: self.volume.lock().map(|v| v.clone()).unwrap_or_default(),
            done,
            reused: self.reused.lock().map(|v| v.clone()).unwrap_or_default(),
        }
    }
}

/// What one send call sends.
struct Plan {
    ticket: String,
    instance: String,
    /// Snapshots to send (oldest first), when not instance-only.
    snapshots: Vec<Candidate>,
    /// Every snapshot and base of the instance: possible parents.
    parents: Vec<Candidate>,
    /// The volume the base is made from.
    base_source: PathBuf,
    base_name: String,
    base_path: PathBuf,
    mode: v1::SendMode,
    /// `<target_node>@<target_instance>@`: bases sent to the same target.
    target_prefix: String,
}

impl Transfers {
    /// Sends an instance (its snapshots unless instance-only, then a new base of its volume or
    /// of the named snapshot) to a peer; progress ~once a second, the last with done = true.
    pub async fn send_instance(
        self: Arc<Self>,
        req: v1::SendInstanceRequest,
    ) -> Result<BoxStream<v1::TransferProgress>, TransferError> {
        let setup = self.setup()?;
        check_ticket(&req.ticket)?;
        check_name("instance name", &req.instance)?;
        check_name("target node", &req.target_node)?;
        check_name("target instance", &req.target_instance)?;
        if !req.source_snapshot.is_empty() {
            check_name("snapshot name", &req.source_snapshot)?;
        }
        let mode = match v1::SendMode::try_from(req.mode).unwrap_or_default() {
            v1::SendMode::Unspecified => v1::SendMode::Full,
            m => m,
        };
        let root = setup.pool_root.clone();
        let plan = {
            let req = req.clone();
            blocking(move || plan(&root, &req, mode)).await?
        };
        let span = info_span!("send", ticket = %req.ticket, instance = %req.instance, target = %req.target_node, mode = ?mode);
        let this = self.clone();
        let progress = Arc::new(Progress::default());
        let shared = progress.clone();
        Ok(spawn_with_progress(
            progress,
            async move {
                let res = match this
                    .open(&req.target_address, &req.target_node, &req.ticket, shared)
                    .await
                {
                    Ok(mut session) => send_plan(&mut session, &plan).await,
                    Err(e) => Err(e),
                };
                let ok = res.is_ok();
                let keep = ok && mode != v1::SendMode::Final;
                let base = plan.base_path.clone();
                let dir = base.parent().map(Path::to_path_buf).unwrap_or_default();
                let prefix = plan.target_prefix.clone();
                // Bases the target no longer needs: after a success the older ones sent to
                // it, and after a final pass the new one too (the source goes away); the new
                // one when it was not received.
                let cleanup = blocking(move || {
                    for (n, p) in list_dirs(&dir)? {
                        let older = ok && n.starts_with(&prefix) && p != base;
                        if older || (p == base && !keep) {
                            delete_subvol(&p)?;
                        }
                    }
                    Ok(())
                })
                .await;
                if let Err(e) = cleanup {
                    warn!("cannot delete bases no longer needed: {e}");
                }
                res
            }
            .instrument(span),
        ))
    }

    /// Sends an image volume (full) to a peer, with its record.
    pub async fn send_image(
        self: Arc<Self>,
        req: v1::SendImageRequest,
        image: v1::Image,
    ) -> Result<BoxStream<v1::TransferProgress>, TransferError> {
        let setup = self.setup()?;
        check_ticket(&req.ticket)?;
        check_fingerprint(&req.fingerprint)?;
        check_name("target node", &req.target_node)?;
        let path = setup
            .pool_root
            .join(crate::storage::IMAGES_DIR)
            .join(&req.fingerprint);
        if !path.is_dir() {
            return Err(TransferError::NotFound(format!(
                "image {}",
                req.fingerprint
            )));
        }
        let info = {
            let p = path.clone();
            blocking(move || Ok(subvol_info(&p)?)).await?
        };
        let span = info_span!("send_image", ticket = %req.ticket, fingerprint = %req.fingerprint, target = %req.target_node);
        let this = self.clone();
        let progress = Arc::new(Progress::default());
        let shared = progress.clone();
        Ok(spawn_with_progress(
            progress,
            async move {
                let mut session = this
                    .open(&req.target_address, &req.target_node, &req.ticket, shared)
                    .await?;
                let header = v1::VolumeHeader {
                    role: v1::VolumeRole::Image as i32,
                    name: req.fingerprint.clone(),
                    parent_uuid: String::new(),
                    uuid: info.stream_uuid().to_string(),
                    created_at: image.created_at,
                    image: Some(image),
                };
                session.send_volume(header, &path, None).await?;
                session.finish().await
            }
            .instrument(span),
        ))
    }

    /// Connects to the receiver and opens a Receive stream for `ticket`.
    async fn open(
        &self,
        address: &str,
        node: &str,
        ticket: &str,
        progress: Arc<Progress>,
    ) -> Result<Session, TransferError> {
        let setup = self.setup()?;
        let id = setup.identity.as_ref().ok_or_else(|| {
            TransferError::Unavailable("this agent has no certificate to send with".into())
        })?;
        let connect_err = |detail: String| TransferError::Connect {
            node: node.to_string(),
            address: address.to_string(),
            detail,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&id.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &id.cert_pem,
                &id.key_pem,
            ))
            .domain_name(crate::tls::agent_tls_name(node));
        let channel = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(WINDOW))
            .initial_connection_window_size(Some(2 * WINDOW))
            .max_frame_size(Some(FRAME))
            .tls_config(tls)
            .map_err(|e| connect_err(e.to_string()))?
            .connect()
            .await
            .map_err(|e| connect_err(format!("{e}: {}", source_chain(&e))))?;
        let mut client = v1::transfer_client::TransferClient::new(channel)
            .max_decoding_message_size(1 << 20)
            .max_encoding_message_size(super::MAX_CHUNK + 64 * 1024);
        let (tx, rx) = mpsc::channel(4);
        let out = tx.clone();
        send_msg(
            &out,
            transfer_chunk::Msg::Begin(v1::TransferBegin {
                ticket: ticket.to_string(),
            }),
        )
        .await?;
        let replies = client
            .receive(ReceiverStream::new(rx))
            .await
            .map_err(peer_err)?
            .into_inner();
        let mut session = Session {
            out: tx,
            replies,
            progress,
            held: HashSet::new(),
        };
        match session.reply().await? {
            transfer_reply::Msg::Have(have) => {
                session.held = have.volumes.into_iter().map(|v| v.received_uuid).collect();
            }
            _ => {
                return Err(TransferError::Protocol(
                    "the receiver did not say what it has".into(),
                ));
            }
        }
        Ok(session)
    }
}

/// HTTP/2 flow-control window for transfer streams (large enough for full-speed chunks).
pub const WINDOW: u32 = 8 << 20;
/// HTTP/2 frame size for transfer connections (the protocol's default is 16 KiB).
pub const FRAME: u32 = 1 << 20;

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&c.to_string());
        s.push_str("; ");
        cur = c.source();
    }
    s
}

fn peer_err(s: Status) -> TransferError {
    TransferError::Peer(format!("{:?}: {}", s.code(), s.message()))
}

async fn send_msg(
    out: &mpsc::Sender<v1::TransferChunk>,
    msg: transfer_chunk::Msg,
) -> Result<(), TransferError> {
    out.send(v1::TransferChunk { msg: Some(msg) })
        .await
        .map_err(|_| TransferError::Broken("the receiver closed the stream".into()))
}

/// One Receive stream.
struct Session {
    out: mpsc::Sender<v1::TransferChunk>,
    replies: tonic::Streaming<v1::TransferReply>,
    progress: Arc<Progress>,
    /// Stream uuids of the volumes the receiver holds.
    held: HashSet<String>,
}

impl Session {
    /// Sends one message; when the receiver has closed the stream, its reason.
    async fn push(&mut self, msg: transfer_chunk::Msg) -> Result<(), TransferError> {
        if self
            .out
            .send(v1::TransferChunk { msg: Some(msg) })
            .await
            .is_ok()
        {
            return Ok(());
        }
        let why = tokio::time::timeout(Duration::from_secs(5), self.replies.message()).await;
        Err(match why {
            Ok(Err(s)) => peer_err(s),
            _ => TransferError::Broken("the receiver closed the stream".into()),
        })
    }

    async fn reply(&mut self) -> Result<transfer_reply::Msg, TransferError> {
        match self.replies.message().await {
            Ok(Some(v1::TransferReply { msg: Some(m) })) => Ok(m),
            Ok(_) => Err(TransferError::Broken(
                "the receiver ended the stream early".into(),
            )),
            Err(s) => Err(peer_err(s)),
        }
    }

    /// Streams one volume and waits until the receiver has verified it.
    async fn send_volume(
        &mut self,
        header: v1::VolumeHeader,
        path: &Path,
        parent: Option<&Path>,
    ) -> Result<(), TransferError> {
        let name = header.name.clone();
        let uuid = header.uuid.clone();
        if let Ok(mut v) = self.progress.volume.lock() {
            v.clone_from(&name);
        }
        let send_err = |detail: String| TransferError::Send {
            volume: name.clone(),
            detail,
        };
        let mut child = tokio::process::Command::from(send_command(path, parent))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| send_err(format!("cannot spawn btrfs send: {e}")))?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| send_err("no stdout".into()))?;
        crate::storage::send::grow_pipe(&stdout);
        let mut stderr = child.stderr.take();
        let stderr_task = tokio::spawn(async move {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut s).await;
            }
            s
        });
        self.push(transfer_chunk::Msg::Volume(header)).await?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            while buf.len() < CHUNK {
                let n = stdout
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| send_err(e.to_string()))?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                break;
            }
            let chunk = buf.freeze();
            hasher.update(&chunk);
            total += chunk.len() as u64;
            self.progress
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            self.push(transfer_chunk::Msg::Data(chunk)).await?;
        }
        let status = child.wait().await.map_err(|e| send_err(e.to_string()))?;
        let stderr = stderr_task.await.unwrap_or_default();
        if !status.success() {
            return Err(send_err(format!("{} ({status})", stderr.trim())));
        }
        self.push(transfer_chunk::Msg::End(v1::VolumeEnd {
            sha256: hex::encode(hasher.finalize()),
            bytes: total,
        }))
        .await?;
        match self.reply().await? {
            transfer_reply::Msg::VolumeDone(n) if n == name => {
                self.held.insert(uuid);
                info!(volume = %name, bytes = total, incremental = parent.is_some(), "volume sent");
                Ok(())
            }
            _ => Err(TransferError::Protocol(format!(
                "the receiver did not confirm volume {name}"
            ))),
        }
    }

    async fn finish(&mut self) -> Result<(), TransferError> {
        self.push(transfer_chunk::Msg::Finish(true)).await?;
        match self.reply().await? {
            transfer_reply::Msg::Finished(_) => Ok(()),
            _ => Err(TransferError::Protocol(
                "the receiver did not confirm the end".into(),
            )),
        }
    }

    /// The newest volume the receiver holds (taken no later than `before`, when one is).
    fn best_parent<'a>(
        &self,
        cands: &'a [Candidate],
        before: Option<i64>,
    ) -> Option<&'a Candidate> {
        let held = cands
            .iter()
            .filter(|c| c.info.readonly && self.held.contains(c.info.stream_uuid()));
        let pick = |it: &mut dyn Iterator<Item = &'a Candidate>| {
            it.max_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)))
        };
        if let Some(t) = before
            && let Some(c) = pick(&mut held.clone().filter(|c| c.created_at <= t))
        {
            return Some(c);
        }
        pick(&mut held.into_iter())
    }
}

/// Sends the snapshots the receiver lacks, then the new base; the base is made first so that
/// what is sent is one consistent moment.
async fn send_plan(session: &mut Session, plan: &Plan) -> Result<(), TransferError> {
    let mut parents = plan.parents.clone();
    for snap in &plan.snapshots {
        if session.held.contains(snap.info.stream_uuid()) {
            if let Ok(mut r) = session.progress.reused.lock() {
                r.push(snap.name.clone());
            }
            continue;
        }
        let parent = session
            .best_parent(&parents, Some(snap.created_at))
            .map(|c| (c.path.clone(), c.info.stream_uuid().to_string()));
        let header = v1::VolumeHeader {
            role: v1::VolumeRole::Snapshot as i32,
            name: snap.name.clone(),
            parent_uuid: parent.as_ref().map(|p| p.1.clone()).unwrap_or_default(),
            uuid: snap.info.stream_uuid().to_string(),
            created_at: snap.created_at,
            image: None,
        };
        session
            .send_volume(header, &snap.path, parent.as_ref().map(|p| p.0.as_path()))
            .await?;
    }
    let (src, dst) = (plan.base_source.clone(), plan.base_path.clone());
    let base = blocking(move || {
        if let Some(dir) = dst.parent() {
            crate::storage::ensure_dir(dir, 0o700)?;
        }
        snapshot_readonly(&src, &dst)?;
        Ok(subvol_info(&dst)?)
    })
    .await?;
    parents.retain(|c| c.path != plan.base_path);
    let parent = session.best_parent(&parents, None).map(|c| {
        (
            c.path.clone(),
            c.name.clone(),
            c.info.stream_uuid().to_string(),
        )
    });
    if let Some((_, name, _)) = &parent
        && let Ok(mut r) = session.progress.reused.lock()
        && !r.contains(name)
    {
        r.push(name.clone());
    }
    let header = v1::VolumeHeader {
        role: v1::VolumeRole::Base as i32,
        name: plan.base_name.clone(),
        parent_uuid: parent.as_ref().map(|p| p.2.clone()).unwrap_or_default(),
        uuid: base.stream_uuid().to_string(),
        created_at: base.created_at,
        image: None,
    };
    session
        .send_volume(
            header,
            &plan.base_path,
            parent.as_ref().map(|p| p.0.as_path()),
        )
        .await?;
    session.finish().await?;
    info!(ticket = %plan.ticket, instance = %plan.instance, mode = ?plan.mode, bytes = session.progress.bytes.load(Ordering::Relaxed), "instance sent");
    Ok(())
}

/// Works out what to send (blocking).
fn plan(
    root: &Path,
    req: &v1::SendInstanceRequest,
    mode: v1::SendMode,
) -> Result<Plan, TransferError> {
    let container = root
        .join(crate::storage::CONTAINERS_DIR)
        .join(&req.instance);
    if !container.is_dir() {
        return Err(TransferError::NotFound(format!(
            "instance volume {}",
            req.instance
        )));
    }
    let snap_dir = root.join(SNAPSHOTS_DIR).join(&req.instance);
    let mut all_snaps = Vec::new();
    for (name, path) in list_dirs(&snap_dir)? {
        if name.starts_with('.') {
            continue;
        }
        let info = subvol_info(&path)?;
        let created_at = super::snapshot_created_at(&path, info.created_at);
        all_snaps.push(Candidate {
            name,
            path,
            info,
            created_at,
        });
    }
    all_snaps.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    let base_source = if req.source_snapshot.is_empty() {
        container
    } else {
        all_snaps
            .iter()
            .find(|c| c.name == req.source_snapshot)
            .map(|c| c.path.clone())
            .ok_or_else(|| {
                TransferError::NotFound(format!(
                    "snapshot {} of {}",
                    req.source_snapshot, req.instance
                ))
            })?
    };
    let snapshots = if req.instance_only || !req.source_snapshot.is_empty() {
        Vec::new()
    } else {
        all_snaps
            .iter()
            .filter(|c| c.info.readonly)
            .cloned()
            .collect()
    };
    let mut parents = all_snaps;
    let base_dir = root.join(BASES_DIR).join(&req.instance);
    for (name, path) in list_dirs(&base_dir)? {
        if name.starts_with('.') {
            continue;
        }
        let info = subvol_info(&path)?;
        parents.push(Candidate {
            name,
            created_at: info.created_at,
            path,
            info,
        });
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let target_prefix = format!("{}@{}@", req.target_node, req.target_instance);
    let base_name = format!("{target_prefix}{}@{nanos:020}", req.ticket);
    super::check_base_name(&base_name)?;
    Ok(Plan {
        ticket: req.ticket.clone(),
        instance: req.instance.clone(),
        snapshots,
        parents,
        base_source,
        base_path: base_dir.join(&base_name),
        base_name,
        mode,
        target_prefix,
    })
}

/// Runs `work` and streams its progress about once a second, then a last report with
/// done = true (or the error).
fn spawn_with_progress<F>(progress: Arc<Progress>, work: F) -> BoxStream<v1::TransferProgress>
where
    F: std::future::Future<Output = Result<(), TransferError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<v1::TransferProgress, Status>>(4);
    tokio::spawn(async move {
        let mut work = std::pin::pin!(work);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last = 0u64;
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tick.tick() => {
                    let now = progress.bytes.load(Ordering::Relaxed);
                    // A slow reader misses reports, never stalls the transfer.
                    let _ = tx.try_send(Ok(progress.report(now.saturating_sub(last), false)));
                    last = now;
                }
            }
        };
        let _ = match result {
            Ok(()) => tx.send(Ok(progress.report(0, true))).await,
            Err(e) => {
                warn!("transfer failed: {e}");
                tx.send(Err(e.status())).await
            }
        };
    });
    Box::pin(ReceiverStream::new(rx))
}
