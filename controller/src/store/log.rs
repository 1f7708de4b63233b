//! The Raft log in sled: entries keyed by big-endian index, plus vote, committed and last purged.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageIOError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::raft::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// The Raft log and its metadata, in two sled trees. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    pub(super) fn open(db: &sled::Db) -> Result<LogStore, sled::Error> {
        Ok(LogStore {
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
        })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, io::Error> {
        match self.meta.get(key).map_err(io::Error::other)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(io::Error::other)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), io::Error> {
        let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        self.meta.insert(key, bytes).map_err(io::Error::other)?;
        self.meta.flush_async().await.map_err(io::Error::other)?;
        Ok(())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, io::Error> {
        match self.log.last().map_err(io::Error::other)? {
            Some((_, v)) => {
                let entry: Entry = serde_json::from_slice(&v).map_err(io::Error::other)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    /// Removes every entry whose index is in `range`, then flushes.
    async fn remove_range(&self, range: (Bound<Vec<u8>>, Bound<Vec<u8>>)) -> Result<(), io::Error> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(range) {
            let (k, _) = item.map_err(io::Error::other)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(io::Error::other)?;
        self.log.flush_async().await.map_err(io::Error::other)?;
        Ok(())
    }
}

fn index_key(index: u64) -> Vec<u8> {
    index.to_be_bytes().to_vec()
}

fn key_bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let map = |b: Bound<&u64>| match b {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    };
    (map(range.start_bound()), map(range.end_bound()))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut entries = Vec::new();
        for item in self.log.range(key_bounds(&range)) {
            let (_, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let entry: Entry =
                serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(&e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self
            .get_meta(KEY_LAST_PURGED)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last = self
            .last_entry_log_id()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self
            .get_meta(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(&e))?)
    }

    /// Recorded without a flush of its own: openraft does not need the committed index to be
    /// durable (it is recovered from a quorum), and the next flush of the log or the vote
    /// persists it anyway. Flushing here cost a third fsync per committed batch.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(&e))?;
        self.meta
            .insert(KEY_COMMITTED, bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> = self
            .get_meta(KEY_COMMITTED)
            .map_err(|e| StorageIOError::read(&e))?;
        Ok(committed.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result: Result<(), io::Error> = async {
            let mut batch = sled::Batch::default();
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(io::Error::other)?;
                batch.insert(index_key(entry.log_id.index), bytes);
            }
            self.log.apply_batch(batch).map_err(io::Error::other)?;
            // Durable before acknowledging (DEPENDENCIES.md pitfall 3).
            self.log.flush_async().await.map_err(io::Error::other)?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let storage_err = StorageIOError::write_logs(&e);
                callback.log_io_completed(Err(e));
                Err(storage_err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(index = log_id.index, "truncating raft log");
        self.remove_range(key_bounds(&(log_id.index..)))
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(index = log_id.index, "purging raft log");
        // Record the purge point first so a crash half-way never loses it.
        self.put_meta(KEY_LAST_PURGED, &log_id)
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.remove_range(key_bounds(&(..=log_id.index)))
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
