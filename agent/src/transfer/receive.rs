//! The receiving side: the `Transfer` gRPC service peer agents call.
//!
//! A stream must open with a ticket a controller announced, from the node the ticket names
//! (checked against the caller's client certificate). Each volume is fed to `btrfs receive`
//! as it arrives (a bounded channel to the child's stdin is the flow control), hashed, and
//! checked at its end; a volume that fails in any way is deleted before the error is answered,
//! and the volumes verified before it stay for a retry with the same ticket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_proto::v1::{self, transfer_chunk, transfer_reply};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use super::{
    BASES_DIR, MAX_CHUNK, SNAPSHOTS_DIR, STAGED, TransferError, Transfers, blocking, check_name,
    staging,
};
use crate::service::BoxStream;
use crate::storage::send::{SubvolRenamer, delete_subvol, list_dirs, receive_command, subvol_info};

/// The `Transfer` gRPC service of this node.
#[derive(Clone)]
pub struct TransferService {
    transfers: Arc<Transfers>,
}

impl TransferService {
    pub fn new(transfers: Arc<Transfers>) -> Self {
        TransferService { transfers }
    }

    /// The tonic server for it, with chunk-sized messages allowed.
    pub fn server(self) -> v1::transfer_server::TransferServer<TransferService> {
        v1::transfer_server::TransferServer::new(self)
            .max_decoding_message_size(MAX_CHUNK + 64 * 1024)
            .max_encoding_message_size(1 << 20)
    }
}

#[tonic::async_trait]
impl v1::transfer_server::Transfer for TransferService {
    type ReceiveStream = BoxStream<v1::TransferReply>;

    async fn receive(
        &self,
        req: Request<Streaming<v1::TransferChunk>>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let leaf = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let mut inbound = req.into_inner();
        let idle = self.transfers.receive_idle();
        let first = tokio::time::timeout(idle, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Begin from the sender in time"))?;
        let begin = match first? {
            Some(v1::TransferChunk {
                msg: Some(transfer_chunk::Msg::Begin(b)),
            }) => b,
            _ => {
                return Err(TransferError::Protocol(
                    "a transfer stream must open with Begin".into(),
                )
                .into());
            }
        };
        let claim = self.transfers.claim(&begin.ticket, &leaf)?;
        let (tx, rx) = mpsc::channel(4);
        let span = info_span!("receive", ticket = %claim.ticket, name = %claim.name);
        tokio::spawn(
            async move {
                if let Err(e) = run(&claim, inbound, &tx).await {
                    warn!("transfer refused or broken: {e}");
                    let _ = tx.send(Err(e.status())).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A ticket held by one Receive stream (released on drop).
pub(super) struct Claim {
    transfers: Arc<Transfers>,
    ticket: String,
    kind: v1::TransferKind,
    name: String,
    refresh: bool,
    root: PathBuf,
    /// This stream's id (the ticket's `busy` while it holds it).
    id: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(t) = self.transfers.tickets().get_mut(&self.ticket)
            && t.busy == self.id
        {
            t.busy = 0;
        }
    }
}

impl Transfers {
    /// Takes an announced ticket for a stream from `leaf`'s node.
    fn claim(
        self: &Arc<Self>,
        ticket: &str,
        leaf: &rustls::pki_types::CertificateDer<'_>,
    ) -> Result<Claim, TransferError> {
        let root = self.setup()?.pool_root.clone();
        super::check_ticket(ticket)?;
        let mut tickets = self.tickets();
        let t = tickets
            .get_mut(ticket)
            .ok_or_else(|| TransferError::UnknownTicket(ticket.to_string()))?;
        if crate::tls::is_controller_cert(leaf)
            || !crate::tls::is_agent_cert_for(leaf, &t.source_node)
        {
            return Err(TransferError::WrongPeer {
                ticket: ticket.to_string(),
                expected: t.source_node.clone(),
                got: "the caller's certificate".into(),
            });
        }
        if t.busy != 0 {
            return Err(TransferError::Busy(ticket.to_string()));
        }
        if t.committed.is_some() {
            return Err(TransferError::Protocol(format!(
                "ticket {ticket} is committed already"
            )));
        }
        let id = self
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        t.busy = id;
        t.finished = false;
        Ok(Claim {
            transfers: self.clone(),
            ticket: ticket.to_string(),
            kind: t.kind,
            name: t.name.clone(),
            refresh: t.refresh,
            root,
            id,
        })
    }
}

type Replies = mpsc::Sender<Result<v1::TransferReply, Status>>;

async fn reply(tx: &Replies, msg: transfer_reply::Msg) -> Result<(), TransferError> {
    tx.send(Ok(v1::TransferReply { msg: Some(msg) }))
        .await
        .map_err(|_| TransferError::Broken("the sender went away".into()))
}

async fn run(
    claim: &Claim,
    mut inbound: Streaming<v1::TransferChunk>,
    tx: &Replies,
) -> Result<(), TransferError> {
    let have = {
        let (root, ticket, name, refresh) = (
            claim.root.clone(),
            claim.ticket.clone(),
            claim.name.clone(),
            claim.refresh,
        );
        let kind = claim.kind;
        blocking(move || held_volumes(&root, &ticket, kind, &name, refresh)).await?
    };
    reply(
        tx,
        transfer_reply::Msg::Have(v1::TransferHave { volumes: have }),
    )
    .await?;
    loop {
        let msg = next(&mut inbound, claim.transfers.receive_idle()).await?;
        match msg {
            transfer_chunk::Msg::Volume(header) => {
                let name = header.name.clone();
                receive_volume(claim, header, &mut inbound).await?;
                reply(tx, transfer_reply::Msg::VolumeDone(name)).await?;
            }
            transfer_chunk::Msg::Finish(_) => {
                if let Some(t) = claim.transfers.tickets().get_mut(&claim.ticket)
                    && t.busy == claim.id
                {
                    t.finished = true;
                }
                info!("transfer stream finished");
                return reply(tx, transfer_reply::Msg::Finished(true)).await;
            }
            _ => {
                return Err(TransferError::Protocol(
                    "expected a volume header or finish".into(),
                ));
            }
        }
    }
}

async fn next(
    inbound: &mut Streaming<v1::TransferChunk>,
    idle: std::time::Duration,
) -> Result<transfer_chunk::Msg, TransferError> {
    let Ok(message) = tokio::time::timeout(idle, inbound.message()).await else {
        return Err(TransferError::Broken(format!(
            "nothing from the sender for {} s",
            idle.as_secs()
        )));
    };
    match message {
        Ok(Some(v1::TransferChunk { msg: Some(m) })) => Ok(m),
        Ok(Some(_)) => Err(TransferError::Protocol("an empty message".into())),
        Ok(None) => Err(TransferError::Broken(
            "the stream ended before the transfer finished".into(),
        )),
        Err(s) => Err(TransferError::Broken(s.message().to_string())),
    }
}

/// What the receiver holds that a sender may skip or use as a parent: this ticket's staged
/// volumes, and for a refresh the instance's snapshots and bases.
fn held_volumes(
    root: &Path,
    ticket: &str,
    kind: v1::TransferKind,
    name: &str,
    refresh: bool,
) -> Result<Vec<v1::HeldVolume>, TransferError> {
    if kind != v1::TransferKind::Instance {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (top, role, tag) in [
        (SNAPSHOTS_DIR, v1::VolumeRole::Snapshot, "s"),
        (BASES_DIR, v1::VolumeRole::Base, "b"),
    ] {
        let prefix = format!("{STAGED}{ticket}-{tag}-");
        for (n, path) in list_dirs(&root.join(top).join(name))? {
            let vol = match n.strip_prefix(&prefix) {
                Some(v) => v.to_string(),
                None if refresh && !n.starts_with('.') => n,
                None => continue,
            };
            let info = subvol_info(&path)?;
            if info.received_uuid.is_empty() || !info.readonly {
                continue;
            }
            out.push(v1::HeldVolume {
                role: role as i32,
                name: vol,
                received_uuid: info.received_uuid,
            });
        }
    }
    Ok(out)
}

/// Receives one volume into its staging place; on any failure nothing of it is left.
async fn receive_volume(
    claim: &Claim,
    header: v1::VolumeHeader,
    inbound: &mut Streaming<v1::TransferChunk>,
) -> Result<(), TransferError> {
    let role = v1::VolumeRole::try_from(header.role).unwrap_or_default();
    match (claim.kind, role) {
        (v1::TransferKind::Instance, v1::VolumeRole::Snapshot) => {
            check_name("snapshot name", &header.name)?;
            // The storage's own rule too (at most 63 characters), so that every received
            // snapshot can later be listed, restored and deleted; its reason is the one shown.
            if let Err(crate::storage::StorageError::InvalidSnapshotName(_, why)) =
                crate::storage::check_snapshot_name(&header.name)
            {
                return Err(TransferError::InvalidName {
                    what: "snapshot name",
                    value: header.name.clone(),
                    why,
                });
            }
        }
        (v1::TransferKind::Instance, v1::VolumeRole::Base) => super::check_base_name(&header.name)?,
        (v1::TransferKind::Image, v1::VolumeRole::Image) if header.name == claim.name => {}
        _ => {
            return Err(TransferError::Protocol(format!(
                "volume {:?} (role {}) does not belong to this transfer",
                header.name, header.role
            )));
        }
    }
    let (dir, staged) = staging(&claim.root, &claim.ticket, &claim.name, role, &header.name);
    let target = dir.join(&staged);
    {
        let (root, dir, target) = (claim.root.clone(), dir.clone(), target.clone());
        blocking(move || prepare_dir(&root, &dir, &target)).await?;
    }
    // What is beside the staged volume: a stream can reach it (`../x` stays inside the
    // --chroot directory), so it is compared afterwards.
    let before = {
        let d = dir.clone();
        blocking(move || Ok(entries(&d))).await?
    };
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::from(receive_command(&dir))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| TransferError::Receive {
            volume: header.name.clone(),
            detail: format!("cannot spawn btrfs receive: {e}"),
        })?;
    let idle = claim.transfers.receive_idle();
    let result = feed(&mut child, &staged, inbound, idle).await;
    let outcome = match result {
        Ok((sha, bytes, end, writer_ok)) => {
            let stderr = read_stderr(&mut child).await;
            let status = child.wait().await;
            if end.sha256 != sha || end.bytes != bytes {
                Err(TransferError::Checksum {
                    volume: header.name.clone(),
                })
            } else {
                match status {
                    Ok(s) if s.success() && writer_ok => Ok(bytes),
                    Ok(s) => Err(TransferError::Receive {
                        volume: header.name.clone(),
                        detail: format!("{} ({s})", stderr.trim()),
                    }),
                    Err(e) => Err(TransferError::Receive {
                        volume: header.name.clone(),
                        detail: e.to_string(),
                    }),
                }
            }
        }
        Err(e) => {
            let _ = child.kill().await;
            Err(e)
        }
    };
    // The received subvolume must be complete: read-only, with the uuid the sender named.
    let outcome = match outcome {
        Ok(bytes) => {
            let t = target.clone();
            match blocking(move || Ok(subvol_info(&t)?)).await {
                Ok(info) if info.readonly && info.received_uuid == header.uuid => Ok(bytes),
                Ok(info) => Err(TransferError::Receive {
                    volume: header.name.clone(),
                    detail: format!(
                        "the received subvolume is incomplete (received uuid {:?}, expected {:?})",
                        info.received_uuid, header.uuid
                    ),
                }),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let outcome = {
        let (d, st) = (dir.clone(), staged.clone());
        match blocking(move || Ok(undo_changes_beside(&d, &st, &before))).await {
            Ok(None) => outcome,
            Ok(Some(what)) => Err(TransferError::Protocol(format!(
                "the stream of volume {} changed {what} beside it: refused",
                header.name
            ))),
            Err(e) => Err(e),
        }
    };
    match outcome {
        Ok(bytes) => {
            let (dir, target, ticket) = (dir.clone(), target.clone(), claim.ticket.clone());
            let created_at = header.created_at;
            blocking(move || after_volume(role, &dir, &target, &ticket, created_at)).await?;
            if role == v1::VolumeRole::Image
                && let Some(t) = claim.transfers.tickets().get_mut(&claim.ticket)
                && t.busy == claim.id
            {
                t.image = header.image.clone();
            }
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            info!(volume = %header.name, bytes, mib_per_s = (bytes as f64 / secs / 1048576.0) as u64, "volume received and verified");
            Ok(())
        }
        Err(e) => {
            // An image's staging directory goes with it (the stream may have made more there).
            let t = if role == v1::VolumeRole::Image {
                dir.clone()
            } else {
                target.clone()
            };
            if let Err(d) = blocking(move || super::delete_staged(&t)).await {
                warn!(volume = %target.display(), "cannot delete a partial volume: {d}");
            }
            Err(e)
        }
    }
}

/// Makes the staging directory (no symlinks on the way from the pool root) and clears a
/// leftover of an earlier try of the same volume.
fn prepare_dir(root: &Path, dir: &Path, target: &Path) -> Result<(), TransferError> {
    let rel = dir
        .strip_prefix(root)
        .map_err(|_| TransferError::Protocol(format!("{} is outside the pool", dir.display())))?;
    let mut p = root.to_path_buf();
    for c in rel.components() {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(TransferError::Protocol(format!(
                    "{} is not a directory",
                    p.display()
                )));
            }
            Err(_) => crate::storage::ensure_dir(&p, 0o700)?,
        }
    }
    delete_subvol(target)?;
    Ok(())
}

/// The entries of `dir` by name, with their device and inode (a subvolume has a device of its
/// own) and whether each is a symlink.
fn entries(dir: &Path) -> BTreeMap<String, (u64, u64, bool)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = std::fs::symlink_metadata(e.path()) {
                out.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    (m.dev(), m.ino(), m.file_type().is_symlink()),
                );
            }
        }
    }
    out
}

/// Compares `dir` (but `staged`) with `before`; when the stream changed something there,
/// puts renamed entries back and removes entries it made (best effort), and names the first
/// change.
fn undo_changes_beside(
    dir: &Path,
    staged: &str,
    before: &BTreeMap<String, (u64, u64, bool)>,
) -> Option<String> {
    let mut after = entries(dir);
    after.remove(staged);
    let mut before = before.clone();
    before.remove(staged);
    if after == before {
        return None;
    }
    let first = before
        .keys()
        .chain(after.keys())
        .find(|k| before.get(*k) != after.get(*k))
        .cloned()
        .unwrap_or_default();
    for (name, id) in &before {
        if after.get(name) == Some(id) {
            continue;
        }
        // Moved away and still here under another name: back it goes.
        let moved = after
            .iter()
            .find(|(n, i)| *i == id && !before.contains_key(*n))
            .map(|(n, _)| n.clone());
        if let Some(from) = moved {
            let to = dir.join(name);
            if std::fs::symlink_metadata(&to).is_ok() {
                let _ = std::fs::remove_file(&to);
            }
            if std::fs::rename(dir.join(&from), &to).is_ok() {
                after.remove(&from);
                after.insert(name.clone(), *id);
            }
        }
    }
    for (name, id) in &after {
        if before.get(name) == Some(id) {
            continue;
        }
        let p = dir.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&p);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&p);
            }
            Err(_) => {}
        }
    }
    warn!(dir = %dir.display(), entry = %first, "a transfer stream changed entries beside its volume");
    Some(format!("{:?}", dir.join(first)))
}

/// After a verified volume: a snapshot's creation time goes beside it; a new base replaces
/// the ticket's older staged bases (the next pass needs only the newest).
fn after_volume(
    role: v1::VolumeRole,
    dir: &Path,
    target: &Path,
    ticket: &str,
    created_at: i64,
) -> Result<(), TransferError> {
    match role {
        v1::VolumeRole::Snapshot => super::write_created_at(target, created_at),
        v1::VolumeRole::Base => {
            let prefix = format!("{STAGED}{ticket}-b-");
            for (n, path) in list_dirs(dir)? {
                if n.starts_with(&prefix) && path != target {
                    delete_subvol(&path)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Feeds Data chunks to the child until VolumeEnd: returns the sha256 and size of the bytes
/// as sent, the end message, and whether the child took all of them. A child that fails
/// early does not stop the reading (the checksum still decides between corruption and a
/// receive failure).
async fn feed(
    child: &mut tokio::process::Child,
    staged: &str,
    inbound: &mut Streaming<v1::TransferChunk>,
    idle: std::time::Duration,
) -> Result<(String, u64, v1::VolumeEnd, bool), TransferError> {
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| TransferError::Broken("btrfs receive has no stdin".into()))?;
    crate::storage::send::grow_pipe(&stdin);
    let (wtx, mut wrx) = mpsc::channel::<Bytes>(8);
    let writer = tokio::spawn(async move {
        let mut stdin = stdin;
        while let Some(b) = wrx.recv().await {
            if stdin.write_all(&b).await.is_err() {
                return false;
            }
        }
        stdin.shutdown().await.is_ok()
    });
    let mut renamer = SubvolRenamer::new(staged);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut alive = true;
    let end = loop {
        match next(inbound, idle).await? {
            transfer_chunk::Msg::Data(b) => {
                if b.len() > MAX_CHUNK {
                    return Err(TransferError::Protocol(format!(
                        "a data chunk of {} bytes (at most {MAX_CHUNK})",
                        b.len()
                    )));
                }
                hasher.update(&b);
                bytes += b.len() as u64;
                if !alive {
                    continue;
                }
                match renamer.feed(b) {
                    Ok(Some(out)) => {
                        if wtx.send(out).await.is_err() {
                            alive = false;
                        }
                    }
                    Ok(None) => {}
                    // Not a stream btrfs should see: drain to the end, let the checksum speak.
                    Err(_) => alive = false,
                }
            }
            transfer_chunk::Msg::End(e) => break e,
            _ => {
                return Err(TransferError::Protocol(
                    "expected data or the volume's end".into(),
                ));
            }
        }
    };
    drop(wtx);
    let wrote = writer.await.unwrap_or(false);
    Ok((
        hex::encode(hasher.finalize()),
        bytes,
        end,
        alive && wrote && renamer.is_complete(),
    ))
}

async fn read_stderr(child: &mut tokio::process::Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s).await;
    }
    s
}
