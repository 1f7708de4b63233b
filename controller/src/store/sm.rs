//! The state machine in sled: one key per object (`instances/<name>`, ...), written together with
//! the last applied log id and membership in one transaction per entry; the whole [`State`] is
//! also kept in memory for reads.

use std::io::{self, Cursor};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::watch;

use crate::events::EventBus;
use crate::raft::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::state::{ApplyOk, ApplyResult, State};

use super::StoreError;

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";

/// The in-memory copy: state plus what it reflects, kept under one lock so readers and the
/// snapshot builder always see a consistent triple.
#[derive(Debug, Default)]
pub struct Applied {
    /// The replicated state.
    pub state: State,
    /// The last log entry applied to `state`.
    pub last_applied: Option<LogId>,
    /// The last membership applied.
    pub membership: StoredMembership,
}

/// What a snapshot holds.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: State,
}

/// The replicated state machine. Cheap to clone; all clones share the same state.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    db: sled::Db,
    objects: sled::Tree,
    meta: sled::Tree,
    applied: Arc<RwLock<Applied>>,
    applied_tx: Arc<watch::Sender<u64>>,
    /// Where the events of applied commands go.
    events: EventBus,
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

fn tx_err(e: TransactionError<io::Error>) -> io::Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => io_err(e),
    }
}

impl StateMachineStore {
    pub(super) fn open(db: &sled::Db) -> Result<StateMachineStore, StoreError> {
        let objects = db.open_tree("sm_objects")?;
        let meta = db.open_tree("sm_meta")?;
        let mut state = State::default();
        for item in objects.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k);
            state.load_object(&key, &v)?;
        }
        let decode = |key: &[u8]| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta.get(key)?.map(|v| v.to_vec()))
        };
        let last_applied: Option<LogId> = match decode(KEY_LAST_APPLIED)? {
            Some(v) => serde_json::from_slice(&v).map_err(StoreError::Meta)?,
            None => None,
        };
        let membership: StoredMembership = match decode(KEY_MEMBERSHIP)? {
            Some(v) => serde_json::from_slice(&v).map_err(StoreError::Meta)?,
            None => StoredMembership::default(),
        };
        let index = last_applied.map(|l| l.index).unwrap_or(0);
        let (applied_tx, _) = watch::channel(index);
        Ok(StateMachineStore {
            db: db.clone(),
            objects,
            meta,
            applied: Arc::new(RwLock::new(Applied {
                state,
                last_applied,
                membership,
            })),
            applied_tx: Arc::new(applied_tx),
            events: EventBus::new(),
        })
    }

    /// Read access to the applied state (never hold it across an `.await`).
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The bus the lifecycle and operation events of applied commands are published on.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// A watch on the last applied log index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// Persists the changed objects plus the applied markers in one transaction.
    fn persist(
        &self,
        changes: &[(String, Option<Vec<u8>>)],
        last_applied: &LogId,
        membership: Option<&StoredMembership>,
    ) -> Result<(), io::Error> {
        let last_applied = serde_json::to_vec(&Some(last_applied)).map_err(io_err)?;
        let membership = membership
            .map(serde_json::to_vec)
            .transpose()
            .map_err(io_err)?;
        (&self.objects, &self.meta)
            .transaction(|(objects, meta)| {
                for (key, value) in changes {
                    match value {
                        Some(v) => objects.insert(key.as_bytes(), v.as_slice())?,
                        None => objects.remove(key.as_bytes())?,
                    };
                }
                meta.insert(KEY_LAST_APPLIED, last_applied.as_slice())?;
                if let Some(m) = &membership {
                    meta.insert(KEY_MEMBERSHIP, m.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<io::Error>>(())
            })
            .map_err(tx_err)
    }

    /// Applies one entry to memory and disk.
    fn apply_entry(&self, entry: Entry) -> Result<ApplyResult, io::Error> {
        let log_id = entry.log_id;
        let mut applied = self.write();
        let result = match entry.payload {
            EntryPayload::Blank => {
                self.persist(&[], &log_id, None)?;
                Ok(ApplyOk::Done)
            }
            EntryPayload::Normal(cmd) => {
                let keys = cmd.touched(&applied.state);
                // A write made with an idempotency key records its result even when rejected.
                let tagged = cmd.idempotency_tag().is_some();
                let drafts = crate::events::derive(&applied.state, &cmd);
                let result = applied.state.apply(cmd);
                let mut changes = Vec::new();
                if result.is_ok() || tagged {
                    for key in keys {
                        let value = applied.state.encode_object(&key).map_err(io_err)?;
                        changes.push((key.to_storage_key(), value));
                    }
                }
                self.persist(&changes, &log_id, None)?;
                self.events.publish_applied(drafts, &result, &applied.state);
                result
            }
            EntryPayload::Membership(m) => {
                let membership = StoredMembership::new(Some(log_id), m);
                self.persist(&[], &log_id, Some(&membership))?;
                applied.membership = membership;
                Ok(ApplyOk::Done)
            }
        };
        applied.last_applied = Some(log_id);
        Ok(result)
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, io::Error> {
        let Some(meta) = self.meta.get(KEY_SNAPSHOT_META).map_err(io_err)? else {
            return Ok(None);
        };
        let Some(data) = self.meta.get(KEY_SNAPSHOT_DATA).map_err(io_err)? else {
            return Ok(None);
        };
        let meta: SnapshotMeta = serde_json::from_slice(&meta).map_err(io_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        }))
    }

    async fn save_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), io::Error> {
        let meta_bytes = serde_json::to_vec(meta).map_err(io_err)?;
        self.meta
            .transaction(|m| {
                m.insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())?;
                m.insert(KEY_SNAPSHOT_DATA, data)?;
                Ok::<(), ConflictableTransactionError<io::Error>>(())
            })
            .map_err(tx_err)?;
        self.db.flush_async().await.map_err(io_err)?;
        Ok(())
    }

    async fn install(&self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), io::Error> {
        let body: SnapshotBody = serde_json::from_slice(&data).map_err(io_err)?;
        let new_objects = body.state.all_objects().map_err(io_err)?;
        let mut old_keys = Vec::new();
        for item in self.objects.iter() {
            let (k, _) = item.map_err(io_err)?;
            old_keys.push(k);
        }
        let last_applied = serde_json::to_vec(&meta.last_log_id).map_err(io_err)?;
        let membership = serde_json::to_vec(&meta.last_membership).map_err(io_err)?;
        let meta_bytes = serde_json::to_vec(meta).map_err(io_err)?;
        {
            let mut applied = self.write();
            (&self.objects, &self.meta)
                .transaction(|(objects, m)| {
                    for k in &old_keys {
                        objects.remove(k)?;
                    }
                    for (k, v) in &new_objects {
                        objects.insert(k.as_bytes(), v.as_slice())?;
                    }
                    m.insert(KEY_LAST_APPLIED, last_applied.as_slice())?;
                    m.insert(KEY_MEMBERSHIP, membership.as_slice())?;
                    m.insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())?;
                    m.insert(KEY_SNAPSHOT_DATA, data.as_slice())?;
                    Ok::<(), ConflictableTransactionError<io::Error>>(())
                })
                .map_err(tx_err)?;
            *applied = Applied {
                state: body.state,
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
        }
        self.db.flush_async().await.map_err(io_err)?;
        self.notify();
        Ok(())
    }

    fn notify(&self) {
        let index = self.read().last_applied.map(|l| l.index).unwrap_or(0);
        self.applied_tx.send_replace(index);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, membership) = {
            let applied = self.read();
            let body = SnapshotBody {
                last_applied: applied.last_applied,
                membership: applied.membership.clone(),
                state: applied.state.clone(),
            };
            drop(applied);
            let data =
                serde_json::to_vec(&body).map_err(|e| StorageIOError::read_state_machine(&e))?;
            (data, body.last_applied, body.membership)
        };
        let seq = self
            .db
            .generate_id()
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.save_snapshot(&meta, &data)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, "built raft snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut last = None;
        for entry in entries {
            let log_id = entry.log_id;
            let result = self
                .apply_entry(entry)
                .map_err(|e| StorageIOError::apply(log_id, &e))?;
            results.push(result);
            last = Some(log_id);
        }
        if let Some(log_id) = last {
            self.db
                .flush_async()
                .await
                .map_err(|e| StorageIOError::apply(log_id, &e))?;
            self.applied_tx.send_replace(log_id.index);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        tracing::info!(snapshot = %meta.snapshot_id, "installing raft snapshot");
        self.install(meta, snapshot.into_inner())
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self
            .current_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?)
    }
}
