//! openraft's storage test suite against the sled stores.

use openraft::testing::{StoreBuilder, Suite};

use crate::raft::{StorageError, TypeConfig};

use super::{LogStore, StateMachineStore};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("create temp dir");
        let (log, sm) = super::open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("storage suite failed: {e}");
    }
}

/// A write made with an idempotency key keeps its record on disk even when it was rejected,
/// and an applied entry publishes its events (a replayed one does not).
#[tokio::test]
async fn idempotency_records_persist_and_events_publish() {
    use openraft::storage::RaftStateMachine as _;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use crate::state::{ApiKey, ApplyErrorKind, Command, IdempotencyTag, Requestor, Role};

    let tagged_as = |key: &str, seq: u32, command: Command| Command::By {
        requestor: Requestor::default(),
        idempotency: Some(IdempotencyTag {
            key: key.into(),
            request_hash: "h".into(),
            seq,
            now: "2026-01-01T00:00:00Z".into(),
        }),
        command: Box::new(command),
    };
    let tagged = |seq: u32, command: Command| tagged_as("k/1", seq, command);
    let entry = |index: u64, cmd: Command| crate::raft::Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    };
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = super::open(dir.path()).unwrap();
        let mut events = sm.events().subscribe();
        let add = Command::AddApiKey {
            key: ApiKey {
                id: "a".into(),
                name: "a".into(),
                hash: "ha".into(),
                role: Role::Admin,
                ..Default::default()
            },
        };
        let results = sm
            .apply([
                entry(
                    1,
                    tagged(
                        0,
                        Command::DeleteApiKey {
                            id: "x".into(),
                            now: String::new(),
                        },
                    ),
                ),
                entry(2, tagged(1, add.clone())),
                entry(3, tagged(1, add)),
                entry(
                    4,
                    tagged_as(
                        "k/2",
                        0,
                        Command::DeleteApiKey {
                            id: "y".into(),
                            now: String::new(),
                        },
                    ),
                ),
            ])
            .await
            .unwrap();
        assert_eq!(
            results[0].as_ref().unwrap_err().kind,
            ApplyErrorKind::NotFound
        );
        assert!(results[1].is_ok() && results[2].is_ok());
        let got: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].event.metadata["action"], "api-key-created");
    }
    let (_log, sm) = super::open(dir.path()).unwrap();
    let applied = sm.read();
    let record = &applied.state.idempotency["k/1"];
    assert_eq!(record.results.len(), 2);
    assert!(record.results[&0].is_err());
    assert!(applied.state.api_keys.contains_key("a"));
    // A record holding nothing but a rejection is on disk too.
    assert!(applied.state.idempotency["k/2"].results[&0].is_err());
}
