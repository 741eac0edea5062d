//! Durability bugs planted on purpose, for the power-cut fault runs to find
//! (`tests/faults`, docs/RELIABILITY.md). A power-cut test that passes on the
//! real code proves little unless it fails on code that skips an fsync; these
//! switches make such code from the real binary, so no second build is
//! needed.
//!
//! The switch is the environment variable [`PLANTED_BUG_ENV`], read once.
//! Unset (always, outside those runs) every fsync happens. A node started
//! with it set says so in its log at error level.

use std::sync::OnceLock;

/// The environment variable naming the bug to plant.
pub const PLANTED_BUG_ENV: &str = "HIE_TEST_PLANT_DURABILITY_BUG";

/// A durability bug: an fsync skipped where a promise depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Raft log appends are acknowledged without fsyncing the WAL.
    LogFsync,
    /// A received snapshot file is made current without being fsynced.
    SnapshotFsync,
    /// The audit log's syncer reports records durable without fsyncing them.
    AuditFsync,
}

impl PlantedBug {
    pub const ALL: [PlantedBug; 3] = [PlantedBug::LogFsync, PlantedBug::SnapshotFsync, PlantedBug::AuditFsync];

    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::LogFsync => "log-fsync",
            PlantedBug::SnapshotFsync => "snapshot-fsync",
            PlantedBug::AuditFsync => "audit-fsync",
        }
    }
}

/// The bug planted in this process, if any (an unknown name plants none,
/// and [`planted_bug_setting`] reports it).
pub fn planted_bug() -> Option<PlantedBug> {
    static BUG: OnceLock<Option<PlantedBug>> = OnceLock::new();
    *BUG.get_or_init(|| {
        let v = std::env::var(PLANTED_BUG_ENV).ok()?;
        PlantedBug::ALL.into_iter().find(|b| b.name() == v)
    })
}

/// True if `bug` is the one planted in this process.
pub fn is_planted(bug: PlantedBug) -> bool {
    planted_bug() == Some(bug)
}

/// The variable's raw value, for the node's start-up warning.
pub fn planted_bug_setting() -> Option<String> {
    std::env::var(PLANTED_BUG_ENV).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bug_has_a_distinct_name() {
        let names: std::collections::BTreeSet<_> = PlantedBug::ALL.iter().map(|b| b.name()).collect();
        assert_eq!(names.len(), PlantedBug::ALL.len());
    }
}
