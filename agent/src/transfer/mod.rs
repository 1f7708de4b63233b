//! Transfers between agents: btrfs send streams over gRPC with mutual TLS, checksummed per
//! volume, staged on the receiving side until committed, abandoned cleanly on failure.
//!
//! The controller announces a transfer to the receiver (`ExpectTransfer`, a ticket), asks the
//! sender to send (`SendInstance`, `SendImage`), then commits (`CommitTransfer`) or aborts
//! (`AbortTransfer`) it on the receiver.
//!
//! Pool layout (btrfs only):
//! - `bases/<instance>/<target_node>@<target_instance>@<ticket>@<nanos>` (sender): read-only
//!   snapshots of an instance's volume made for a send; the last one sent to a target is kept
//!   for the next pass or a later `--refresh`. `bases/<instance>/<name>` (receiver): the base
//!   the instance volume was made from, kept for a later refresh.
//! - Staging on the receiver: a received volume is created directly in its final directory
//!   under a hidden name, `snapshots/<instance>/.in-<ticket>-s-<snapshot>`,
//!   `bases/<instance>/.in-<ticket>-b-<base>`, and renamed in place at commit (btrfs cannot
//!   move a read-only received subvolume to another directory, and making it writable would
//!   drop its received uuid, which later incremental sends need). A stream's paths may reach
//!   the siblings of its subvolume (`../x`: `--chroot` confines it to the directory, not the
//!   subvolume), so an image, which needs no received uuid, is received alone in a directory
//!   of its own, `images/.in-<ticket>-i/volume`, and a read-only snapshot of it becomes
//!   `images/<fingerprint>` at commit: nothing a peer sends can touch the node's other images.
//!   The receiver chooses that name itself by rewriting the stream
//!   ([`crate::storage::send::SubvolRenamer`]): no path ever comes from the peer.
//!
//! Tickets live in memory: an agent restart forgets them (the controller aborts or retries)
//! and deletes every staged volume it finds.

mod receive;
mod send;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use berth_proto::v1;
use tonic::Status;
use tracing::{info, warn};

use crate::service::{AgentService, BoxStream};
use crate::storage::send::{delete_subvol, list_dirs};
use crate::storage::{StorageDriver, StorageError};

pub use receive::TransferService;
pub use send::{FRAME, WINDOW};

/// Directory of the pool holding read-only bases kept for incremental sends.
pub const BASES_DIR: &str = "bases";
/// Directory of the pool holding snapshots (helper A's layout).
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Size of the data chunks a sender streams.
pub const CHUNK: usize = 1 << 20;
/// Largest data chunk a receiver accepts.
pub const MAX_CHUNK: usize = 8 << 20;
/// Prefix of staged (received, not yet committed) volumes.
const STAGED: &str = ".in-";

/// Errors of transfers (both sides).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("transfers are not available on this node: {0}")]
    Unavailable(String),
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(
        "unknown transfer ticket {0:?} (not announced to this node, or forgotten by a restart)"
    )]
    UnknownTicket(String),
    #[error("ticket {ticket} is for transfers from node {expected}, not from {got}")]
    WrongPeer {
        ticket: String,
        expected: String,
        got: String,
    },
    #[error("ticket {0} already has a stream in progress")]
    Busy(String),
    #[error("ticket {ticket} was announced differently before")]
    Conflict { ticket: String },
    #[error("volume {volume} does not match its checksum (sha256 or size differ): refused")]
    Checksum { volume: String },
    #[error("the transfer stream broke: {0}")]
    Broken(String),
    #[error("transfer protocol violation: {0}")]
    Protocol(String),
    #[error("{0} not found on this node")]
    NotFound(String),
    #[error("{0} exists on this node already")]
    Exists(String),
    #[error("nothing to commit for ticket {0}: no transfer stream has finished")]
    NothingReceived(String),
    #[error("instance {0} is running: stop it before a refresh")]
    Running(String),
    #[error("btrfs receive of {volume} failed: {detail}")]
    Receive { volume: String, detail: String },
    #[error("btrfs send of {volume} failed: {detail}")]
    Send { volume: String, detail: String },
    #[error("cannot reach the receiving agent {node} at {address}: {detail}")]
    Connect {
        node: String,
        address: String,
        detail: String,
    },
    #[error("the receiving agent refused: {0}")]
    Peer(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("transfer i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TransferError {
    /// The gRPC status for this error.
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            TransferError::Unavailable(_) => Status::failed_precondition(msg),
            TransferError::InvalidName { .. } | TransferError::Protocol(_) => {
                Status::invalid_argument(msg)
            }
            TransferError::UnknownTicket(_) | TransferError::NotFound(_) => Status::not_found(msg),
            TransferError::WrongPeer { .. } => Status::permission_denied(msg),
            TransferError::Busy(_) | TransferError::Broken(_) => Status::aborted(msg),
            TransferError::Conflict { .. } | TransferError::Exists(_) => {
                Status::already_exists(msg)
            }
            TransferError::Checksum { .. } => Status::data_loss(msg),
            TransferError::NothingReceived(_) | TransferError::Running(_) => {
                Status::failed_precondition(msg)
            }
            TransferError::Connect { .. } => Status::unavailable(msg),
            TransferError::Peer(_) => Status::aborted(msg),
            TransferError::Receive { .. }
            | TransferError::Send { .. }
            | TransferError::Storage(_)
            | TransferError::Io { .. } => Status::internal(msg),
        }
    }
}

impl From<TransferError> for Status {
    fn from(e: TransferError) -> Status {
        e.status()
    }
}

/// What transfers need from the node, given once at start ([`Transfers::configure`]).
pub struct TransferSetup {
    /// This node's name.
    pub node: String,
    /// The btrfs pool root (`images/`, `containers/`, `snapshots/`, `bases/` below it).
    pub pool_root: PathBuf,
    /// Where image records go (`<state_dir>/images`, see [`crate::image`]).
    pub image_records: PathBuf,
    pub storage: Arc<dyn StorageDriver>,
    /// This agent's certificate, key and the cluster CA; `None`: this node cannot send.
    pub identity: Option<crate::tls::Identity>,
}

/// Transfers announced by a controller and in flight on this node (both sides).
#[derive(Default)]
pub struct Transfers {
    setup: OnceLock<TransferSetup>,
    tickets: Mutex<HashMap<String, Ticket>>,
    /// Milliseconds a Receive stream may stay silent (0: [`RECEIVE_IDLE`]).
    idle_ms: std::sync::atomic::AtomicU64,
    /// The last Receive stream id given out.
    streams: std::sync::atomic::AtomicU64,
}

/// How long a Receive stream may go without a message before it is dropped as broken (a
/// sender that died without closing its connection would otherwise hold the ticket, a
/// `btrfs receive` and a half-received volume for ever).
pub const RECEIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// A transfer this node expects to receive.
#[derive(Debug, Clone)]
struct Ticket {
    kind: v1::TransferKind,
    /// Instance name on this node, or image fingerprint.
    name: String,
    source_node: String,
    refresh: bool,
    /// The id of the Receive stream that holds it (0: none). A stream that ends after the
    /// ticket was aborted and announced again must not free or finish the new one.
    busy: u64,
    /// The last stream ended with Finish (what is staged is complete).
    finished: bool,
    /// The image record a sender gave (images).
    image: Option<v1::Image>,
    /// The answer of a successful commit (repeated to a retry).
    committed: Option<Vec<v1::SnapshotInfo>>,
}

impl Transfers {
    /// Gives transfers what they need and deletes staged volumes a crash left behind
    /// (blocking). Only the first call counts.
    pub fn configure(&self, setup: TransferSetup) -> Result<(), TransferError> {
        for dir in [BASES_DIR, SNAPSHOTS_DIR] {
            crate::storage::ensure_dir(&setup.pool_root.join(dir), 0o700)?;
        }
        for path in staged_volumes(&setup.pool_root, "")? {
            warn!(volume = %path.display(), "deleting a transfer's staged volume left by a restart");
            delete_staged(&path)?;
        }
        remove_orphan_dirs(&setup.pool_root);
        info!(node = %setup.node, pool = %setup.pool_root.display(), sender = setup.identity.is_some(), "transfers ready");
        let _ = self.setup.set(setup);
        Ok(())
    }

    fn setup(&self) -> Result<&TransferSetup, TransferError> {
        self.setup.get().ok_or_else(|| {
            TransferError::Unavailable("transfers need the btrfs storage driver".into())
        })
    }

    /// Sets how long a Receive stream may stay silent (tests; [`RECEIVE_IDLE`] otherwise).
    pub fn set_receive_idle(&self, idle: std::time::Duration) {
        self.idle_ms.store(
            u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn receive_idle(&self) -> std::time::Duration {
        match self.idle_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => RECEIVE_IDLE,
            ms => std::time::Duration::from_millis(ms),
        }
    }

    fn tickets(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ticket>> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a transfer this node is to receive. Announcing the same ticket again with
    /// the same facts succeeds.
    pub fn expect(&self, req: &v1::ExpectTransferRequest) -> Result<(), TransferError> {
        self.setup()?;
        check_ticket(&req.ticket)?;
        check_name("source node", &req.source_node)?;
        let kind = v1::TransferKind::try_from(req.kind).unwrap_or_default();
        match kind {
            v1::TransferKind::Instance => check_name("instance name", &req.name)?,
            v1::TransferKind::Image => check_fingerprint(&req.name)?,
            v1::TransferKind::Unspecified => {
                return Err(TransferError::Protocol(
                    "the transfer kind is missing".into(),
                ));
            }
        }
        let mut tickets = self.tickets();
        if let Some(t) = tickets.get(&req.ticket) {
            if t.kind == kind
                && t.name == req.name
                && t.source_node == req.source_node
                && t.refresh == req.refresh
            {
                return Ok(());
            }
            return Err(TransferError::Conflict {
                ticket: req.ticket.clone(),
            });
        }
        tickets.insert(
            req.ticket.clone(),
            Ticket {
                kind,
                name: req.name.clone(),
                source_node: req.source_node.clone(),
                refresh: req.refresh,
                busy: 0,
                finished: false,
                image: None,
                committed: None,
            },
        );
        info!(ticket = %req.ticket, name = %req.name, source = %req.source_node, refresh = req.refresh, "expecting a transfer");
        Ok(())
    }

    /// Drops everything a transfer left on this node: staged volumes (receiver), bases made
    /// for it (sender), the ticket. Blocking; succeeds when nothing is left.
    pub fn abort(&self, ticket: &str) -> Result<(), TransferError> {
        let setup = self.setup()?;
        check_ticket(ticket)?;
        let gone = self.tickets().remove(ticket);
        let root = &setup.pool_root;
        for path in staged_volumes(root, ticket)? {
            delete_staged(&path)?;
        }
        let marker = format!("@{ticket}@");
        for (_, inst_dir) in list_dirs(&root.join(BASES_DIR))? {
            for (name, path) in list_dirs(&inst_dir)? {
                if name.contains(&marker) {
                    delete_subvol(&path)?;
                }
            }
        }
        if let Some(t) = gone
            && t.kind == v1::TransferKind::Instance
            && !t.refresh
            && t.committed.is_none()
        {
            for dir in [SNAPSHOTS_DIR, BASES_DIR] {
                // Only when empty: the instance's own snapshots stay.
                let _ = std::fs::remove_dir(root.join(dir).join(&t.name));
            }
        }
        remove_orphan_dirs(root);
        info!(ticket, "transfer aborted");
        Ok(())
    }

    /// Makes a finished transfer's volumes the instance's or the image's (receiver;
    /// blocking). Idempotent: a retry after success answers the same.
    pub fn commit(&self, ticket: &str) -> Result<v1::CommitTransferResponse, TransferError> {
        let setup = self.setup()?;
        check_ticket(ticket)?;
        let t = {
            let tickets = self.tickets();
            let t = tickets
                .get(ticket)
                .ok_or_else(|| TransferError::UnknownTicket(ticket.to_string()))?;
            if t.busy != 0 {
                return Err(TransferError::Busy(ticket.to_string()));
            }
            t.clone()
        };
        if let Some(snapshots) = t.committed {
            return Ok(v1::CommitTransferResponse { snapshots });
        }
        if !t.finished {
            return Err(TransferError::NothingReceived(ticket.to_string()));
        }
        let snapshots = match t.kind {
            v1::TransferKind::Image => {
                commit_image(setup, ticket, &t.name, t.image.as_ref())?;
                Vec::new()
            }
            _ => commit_instance(setup, ticket, &t.name, t.refresh)?,
        };
        if let Some(t) = self.tickets().get_mut(ticket) {
            t.committed = Some(snapshots.clone());
        }
        info!(ticket, name = %t.name, "transfer committed");
        Ok(v1::CommitTransferResponse { snapshots })
    }

    /// The announced ticket's kind and name when it is an instance refresh (for the
    /// caller's running check).
    fn refresh_of(&self, ticket: &str) -> Option<String> {
        self.tickets()
            .get(ticket)
            .filter(|t| t.refresh && t.kind == v1::TransferKind::Instance && t.committed.is_none())
            .map(|t| t.name.clone())
    }
}

/// Staged volumes (of `ticket`, or of any ticket when it is "") anywhere in the pool.
fn staged_volumes(root: &Path, ticket: &str) -> Result<Vec<PathBuf>, TransferError> {
    let prefix = if ticket.is_empty() {
        STAGED.to_string()
    } else {
        format!("{STAGED}{ticket}-")
    };
    let mut out = Vec::new();
    let mut scan = |dir: &Path| -> Result<(), TransferError> {
        for (name, path) in list_dirs(dir)? {
            if name.starts_with(&prefix) {
                out.push(path);
            }
        }
        Ok(())
    };
    scan(&root.join(crate::storage::IMAGES_DIR))?;
    for top in [SNAPSHOTS_DIR, BASES_DIR] {
        for (_, dir) in list_dirs(&root.join(top))? {
            scan(&dir)?;
        }
    }
    Ok(out)
}

/// Removes the empty `snapshots/<name>` and `bases/<name>` directories of instances that are
/// not on this node (what an aborted or interrupted transfer leaves once its staged volumes
/// are gone). Best effort: `remove_dir` only ever removes an empty directory.
fn remove_orphan_dirs(root: &Path) {
    for top in [SNAPSHOTS_DIR, BASES_DIR] {
        let Ok(dirs) = list_dirs(&root.join(top)) else {
            continue;
        };
        for (name, dir) in dirs {
            if !root
                .join(crate::storage::CONTAINERS_DIR)
                .join(&name)
                .exists()
            {
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

/// Where a volume of a ticket is staged: its directory and its hidden name there.
pub(crate) fn staging(
    root: &Path,
    ticket: &str,
    name: &str,
    role: v1::VolumeRole,
    volume: &str,
) -> (PathBuf, String) {
    match role {
        v1::VolumeRole::Snapshot => (
            root.join(SNAPSHOTS_DIR).join(name),
            format!("{STAGED}{ticket}-s-{volume}"),
        ),
        v1::VolumeRole::Base => (
            root.join(BASES_DIR).join(name),
            format!("{STAGED}{ticket}-b-{volume}"),
        ),
        _ => (
            root.join(crate::storage::IMAGES_DIR)
                .join(format!("{STAGED}{ticket}-i")),
            STAGED_IMAGE.to_string(),
        ),
    }
}

/// Name of a received image in its staging directory.
const STAGED_IMAGE: &str = "volume";

/// Deletes a staged volume, or an image's staging directory with whatever is in it (the
/// received subvolume, and anything else the stream made beside it).
pub(crate) fn delete_staged(path: &Path) -> Result<(), TransferError> {
    use std::os::unix::fs::MetadataExt as _;
    /// The inode number of a btrfs subvolume's root directory.
    const SUBVOL_INO: u64 = 256;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TransferError::Io { path: p, source }
    };
    // A staged snapshot's creation-time sidecar goes with it.
    match std::fs::remove_file(crate::storage::created_path(path)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    };
    if !meta.is_dir() || meta.ino() == SUBVOL_INO {
        return Ok(delete_subvol(path)?);
    }
    for e in std::fs::read_dir(path).map_err(io(path))? {
        let e = e.map_err(io(path))?;
        let p = e.path();
        let m = std::fs::symlink_metadata(&p).map_err(io(&p))?;
        if m.is_dir() && m.ino() == SUBVOL_INO {
            delete_subvol(&p)?;
        } else if m.is_dir() {
            std::fs::remove_dir_all(&p).map_err(io(&p))?;
        } else {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    std::fs::remove_dir(path).map_err(io(path))
}

fn commit_instance(
    setup: &TransferSetup,
    ticket: &str,
    name: &str,
    refresh: bool,
) -> Result<Vec<v1::SnapshotInfo>, TransferError> {
    let root = &setup.pool_root;
    let snap_dir = root.join(SNAPSHOTS_DIR).join(name);
    let base_dir = root.join(BASES_DIR).join(name);
    let base_prefix = format!("{STAGED}{ticket}-b-");
    let staged_base = list_dirs(&base_dir)?
        .into_iter()
        .filter_map(|(n, p)| n.strip_prefix(&base_prefix).map(|b| (b.to_string(), p)))
        .next_back()
        .ok_or_else(|| TransferError::NothingReceived(ticket.to_string()))?;
    let container = root.join(crate::storage::CONTAINERS_DIR).join(name);
    if std::fs::symlink_metadata(&container).is_ok() && !refresh {
        return Err(TransferError::Exists(format!("instance volume {name}")));
    }
    // Snapshots first: a retry after a failure further on finds them in place.
    let snap_prefix = format!("{STAGED}{ticket}-s-");
    for (n, path) in list_dirs(&snap_dir)? {
        let Some(snap) = n.strip_prefix(&snap_prefix) else {
            continue;
        };
        let dst = snap_dir.join(snap);
        if std::fs::symlink_metadata(&dst).is_ok() {
            // A refresh replaces a snapshot of the same name with the source's.
            delete_subvol(&dst)?;
        }
        std::fs::rename(&path, &dst).map_err(|source| TransferError::Io {
            path: path.clone(),
            source,
        })?;
        let created = crate::storage::send::subvol_info(&dst)
            .map(|i| i.created_at)
            .unwrap_or(0);
        // The creation time as the sender knew it was written beside the staged volume.
        let staged_created = snap_dir.join(format!(".{n}.created"));
        let created = std::fs::read_to_string(&staged_created)
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(created);
        write_created_at(&dst, created)?;
        let _ = std::fs::remove_file(&staged_created);
    }
    // A refresh: the old volume goes aside first (its snapshots stay: the storage driver
    // deletes an instance volume with its snapshots), the new one is made, the old one goes.
    // Aside under the storage driver's swap name, `.old-<name>`: when the agent stops in
    // between, opening the pool puts it back if the new volume is missing (else deletes it),
    // so the instance never loses its volume.
    let old = container.with_file_name(format!(".old-{name}"));
    let aside = format!("{name}-refresh-{ticket}");
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| TransferError::Io {
            path: from.to_path_buf(),
            source,
        })
    };
    if std::fs::symlink_metadata(&container).is_ok() {
        // A plain rename: the driver's would take the snapshots along.
        rename(&container, &old)?;
    }
    if let Err(e) = crate::storage::send::snapshot_writable(&staged_base.1, &container) {
        if std::fs::symlink_metadata(&old).is_ok() {
            rename(&old, &container)?;
        }
        return Err(e.into());
    }
    if std::fs::symlink_metadata(&old).is_ok() {
        // A name the driver deletes with everything nested in it.
        rename(&old, &container.with_file_name(&aside))?;
    }
    if setup.storage.instance_volume(&aside).is_some() {
        setup.storage.delete_instance_volume(&aside)?;
    }
    let final_base = base_dir.join(&staged_base.0);
    for (n, path) in list_dirs(&base_dir)? {
        if !n.starts_with(STAGED) {
            delete_subvol(&path)?;
        }
    }
    std::fs::rename(&staged_base.1, &final_base).map_err(|source| TransferError::Io {
        path: staged_base.1.clone(),
        source,
    })?;
    list_snapshots(root, name)
}

/// Writes a snapshot's creation time where helper A's snapshot code reads it
/// (`.<snapshot>.created` beside it).
fn write_created_at(snapshot: &Path, created_at: i64) -> Result<(), TransferError> {
    let Some(name) = snapshot.file_name() else {
        return Ok(());
    };
    let path = snapshot.with_file_name(format!(".{}.created", name.to_string_lossy()));
    let tmp = path.with_extension("tmp");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TransferError::Io { path: p, source }
    };
    std::fs::write(&tmp, format!("{created_at}\n")).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// A snapshot's creation time: its sidecar file, else the subvolume's creation time.
pub(crate) fn snapshot_created_at(snapshot: &Path, otime: i64) -> i64 {
    let Some(name) = snapshot.file_name() else {
        return otime;
    };
    std::fs::read_to_string(snapshot.with_file_name(format!(".{}.created", name.to_string_lossy())))
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok())
        .unwrap_or(otime)
}

/// The instance's snapshots (oldest first).
fn list_snapshots(root: &Path, name: &str) -> Result<Vec<v1::SnapshotInfo>, TransferError> {
    let mut out = Vec::new();
    for (n, path) in list_dirs(&root.join(SNAPSHOTS_DIR).join(name))? {
        if n.starts_with('.') {
            continue;
        }
        let otime = crate::storage::send::subvol_info(&path)
            .map(|i| i.created_at)
            .unwrap_or(0);
        out.push(v1::SnapshotInfo {
            instance: name.to_string(),
            name: n,
            created_at: snapshot_created_at(&path, otime),
            size_bytes: 0,
        });
    }
    out.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    Ok(out)
}

fn commit_image(
    setup: &TransferSetup,
    ticket: &str,
    fingerprint: &str,
    image: Option<&v1::Image>,
) -> Result<(), TransferError> {
    let images = setup.pool_root.join(crate::storage::IMAGES_DIR);
    let staging_dir = images.join(format!("{STAGED}{ticket}-i"));
    let staged = staging_dir.join(STAGED_IMAGE);
    let dst = images.join(fingerprint);
    if std::fs::symlink_metadata(&staged).is_err() {
        return Err(TransferError::NothingReceived(ticket.to_string()));
    }
    if std::fs::symlink_metadata(&dst).is_err() {
        crate::storage::send::snapshot_readonly(&staged, &dst)?;
    }
    delete_staged(&staging_dir)?;
    let img = image.cloned().unwrap_or_default();
    let rec = crate::image::ImageRecord {
        fingerprint: fingerprint.to_string(),
        aliases: img.aliases,
        os: img.os,
        release: img.release,
        architecture: img.architecture,
        description: img.description,
        size_bytes: img.size_bytes,
        created_at: img.created_at,
        properties: img.properties.into_iter().collect(),
    };
    let path = setup.image_records.join(format!("{fingerprint}.json"));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TransferError::Io { path: p, source }
    };
    std::fs::create_dir_all(&setup.image_records).map_err(io(&setup.image_records))?;
    let text = serde_json::to_vec_pretty(&rec).map_err(|e| TransferError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Tickets: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn check_ticket(t: &str) -> Result<(), TransferError> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(TransferError::InvalidName {
            what: "ticket",
            value: t.to_string(),
            why: "1 to 64 letters, digits, '-' or '_'",
        })
    }
}

/// Names of nodes, instances, snapshots and bases: 1 to 100 of `[A-Za-z0-9._-]`, not
/// starting with '.' and without "..".
pub fn check_name(what: &'static str, n: &str) -> Result<(), TransferError> {
    let ok = !n.is_empty()
        && n.len() <= 100
        && !n.starts_with('.')
        && !n.contains("..")
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.');
    if ok {
        Ok(())
    } else {
        Err(TransferError::InvalidName {
            what,
            value: n.to_string(),
            why: "1 to 100 letters, digits, '.', '-' or '_', not starting with '.'",
        })
    }
}

/// Base names: `<node>@<instance>@<ticket>@<nanos>`.
fn check_base_name(n: &str) -> Result<(), TransferError> {
    let parts: Vec<&str> = n.split('@').collect();
    let bad = || TransferError::InvalidName {
        what: "base name",
        value: n.to_string(),
        why: "expected <node>@<instance>@<ticket>@<number>",
    };
    if parts.len() != 4 || !parts[3].bytes().all(|c| c.is_ascii_digit()) || parts[3].is_empty() {
        return Err(bad());
    }
    check_name("base name", parts[0]).map_err(|_| bad())?;
    check_name("base name", parts[1]).map_err(|_| bad())?;
    check_ticket(parts[2]).map_err(|_| bad())
}

fn check_fingerprint(fp: &str) -> Result<(), TransferError> {
    crate::image::check_fingerprint(fp).map_err(|_| TransferError::InvalidName {
        what: "image fingerprint",
        value: fp.to_string(),
        why: "expected 64 lowercase hex digits",
    })
}

/// Runs blocking work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Broken(format!("a blocking task failed: {e}")))?
}

// ---- Agent RPCs (delegated from crate::service).

pub async fn expect_transfer(
    svc: &AgentService,
    req: v1::ExpectTransferRequest,
) -> Result<v1::ExpectTransferResponse, Status> {
    svc.transfers.expect(&req)?;
    Ok(v1::ExpectTransferResponse {})
}

pub async fn send_instance(
    svc: &AgentService,
    req: v1::SendInstanceRequest,
) -> Result<BoxStream<v1::TransferProgress>, Status> {
    Ok(svc.transfers.clone().send_instance(req).await?)
}

pub async fn send_image(
    svc: &AgentService,
    req: v1::SendImageRequest,
) -> Result<BoxStream<v1::TransferProgress>, Status> {
    check_fingerprint(&req.fingerprint)?;
    let images = svc.images.clone();
    let fp = req.fingerprint.clone();
    let image = tokio::task::spawn_blocking(move || images.get(&fp))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("image {} not found", req.fingerprint)))?;
    Ok(svc.transfers.clone().send_image(req, image).await?)
}

pub async fn commit_transfer(
    svc: &AgentService,
    req: v1::TransferRef,
) -> Result<v1::CommitTransferResponse, Status> {
    let refresh = svc.transfers.refresh_of(&req.ticket);
    if let Some(name) = &refresh {
        match svc.engine.status(name).await {
            Ok(st) if st.state == v1::InstanceState::Running as i32 => {
                return Err(TransferError::Running(name.clone()).into());
            }
            _ => {}
        }
    }
    let transfers = svc.transfers.clone();
    let ticket = req.ticket.clone();
    let committed = blocking(move || transfers.commit(&ticket)).await?;
    // The received root filesystem has the source's hostname and network config: the
    // refreshed instance gets its own back (a new copy gets them when it is created).
    if let Some(name) = refresh {
        svc.engine
            .refreshed(&name)
            .await
            .map_err(crate::service::engine_status)?;
    }
    Ok(committed)
}

pub async fn abort_transfer(
    svc: &AgentService,
    req: v1::TransferRef,
) -> Result<v1::AbortTransferResponse, Status> {
    let transfers = svc.transfers.clone();
    blocking(move || transfers.abort(&req.ticket)).await?;
    Ok(v1::AbortTransferResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_ticket("a1-B_c").is_ok());
        for bad in ["", "a/b", "a.b", &"x".repeat(65)] {
            assert!(check_ticket(bad).is_err(), "{bad}");
        }
        assert!(check_name("n", "web-1.x").is_ok());
        for bad in ["", ".x", "a..b", "a/b", "a@b"] {
            assert!(check_name("n", bad).is_err(), "{bad}");
        }
        assert!(check_base_name("n1@web@t1@00000000000000000001").is_ok());
        for bad in ["n1@web@t1", "n1@web@t/1@1", "n1@web@t1@x", "../x@a@b@1"] {
            assert!(check_base_name(bad).is_err(), "{bad}");
        }
    }
}
