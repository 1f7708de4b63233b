//! Persistence: the sled-backed Raft log ([`LogStore`]) and state machine
//! ([`StateMachineStore`]). This is the only module that knows sled.
//!
//! One sled database per controller holds four trees: `raft_log` (entries by big-endian index),
//! `raft_meta` (vote, committed, last purged), `sm_objects` (one key per state object, e.g.
//! `instances/web1`) and `sm_meta` (last applied, membership, current snapshot).

mod log;
mod sm;

use std::path::Path;

pub use log::LogStore;
pub use sm::{Applied, StateMachineStore};

use crate::state::ObjectDecodeError;

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("cannot load the state machine: {0}")]
    Object(#[from] ObjectDecodeError),
    #[error("cannot decode state machine metadata: {0}")]
    Meta(serde_json::Error),
}

/// Opens (or creates) the sled database at `dir` and returns its log and state machine stores.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let db = sled::Config::new().path(dir).open()?;
    let log = LogStore::open(&db)?;
    let sm = StateMachineStore::open(&db)?;
    Ok((log, sm))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
