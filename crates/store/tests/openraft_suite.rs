//! openraft's own storage test suite, run against the RocksDB store.

use hie_domain::raft::{StorageError, TypeConfig};
use hie_store::{LogStore, StateMachine, Store, StoreOptions};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), StoreOptions::default()).expect("open store");
        Ok((dir, store.log, store.state_machine))
    }
}

#[test]
#[allow(clippy::result_large_err)] // openraft's suite returns its own error type
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)
}
