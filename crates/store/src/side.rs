//! A small RocksDB key-value table beside the replicated state, for data a
//! node keeps for itself and can rebuild (the audit log's patient index).
//! It is its own database, so it never enters snapshots, digests or backups.

use std::path::Path;

use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

use crate::StoreError;

/// A key and its value, as stored.
pub type KeyValue = (Vec<u8>, Vec<u8>);

pub struct SideTable {
    db: DB,
}

impl SideTable {
    pub fn open(dir: &Path) -> Result<SideTable, StoreError> {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.set_max_background_jobs(1);
        o.set_write_buffer_size(4 << 20);
        o.set_keep_log_file_num(2);
        o.set_manifest_preallocation_size(64 << 10);
        o.set_max_open_files(64);
        // Its keys start with hashes and its values are offsets: nothing a
        // compressor could shrink, so flushes and compactions skip it.
        o.set_compression_type(rocksdb::DBCompressionType::None);
        // Written on every audited request and read rarely (a "who looked"
        // query): a vector memtable makes a put an append, where a skip list
        // costs a search through the memtable for every key; a read sorts
        // the (at most write_buffer_size) memtable instead. Writes to it
        // must not be concurrent, so RocksDB serialises them.
        o.set_memtable_factory(rocksdb::MemtableFactory::Vector);
        o.set_allow_concurrent_memtable_write(false);
        Ok(SideTable { db: DB::open(&o, dir)? })
    }

    /// Writes all pairs at once, without the write-ahead log: they become
    /// durable when the memtable is flushed, all together, so a crash loses
    /// only a suffix of writes, which the owner rebuilds.
    pub fn put_all<'a>(&self, pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (k, v) in pairs {
            batch.put(k, v);
        }
        let mut w = WriteOptions::default();
        w.disable_wal(true);
        // Fail rather than stall: with a full disk the memtable cannot flush,
        // and a stalled write would wedge its caller for good.
        w.set_no_slowdown(true);
        Ok(self.db.write_opt(batch, &w)?)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key)?)
    }

    /// Up to `max` pairs whose key starts with `prefix` and that `keep`
    /// accepts, in key order from the last (newest) back; the bool says
    /// whether more were left.
    pub fn scan_prefix_rev(
        &self,
        prefix: &[u8],
        max: usize,
        mut keep: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(Vec<KeyValue>, bool), StoreError> {
        let mut upper = prefix.to_vec();
        // The smallest key greater than every key with this prefix.
        while let Some(last) = upper.pop() {
            if last < 0xff {
                upper.push(last + 1);
                break;
            }
        }
        let mode = if upper.is_empty() { IteratorMode::End } else { IteratorMode::From(&upper, Direction::Reverse) };
        let mut out = Vec::new();
        for item in self.db.iterator(mode) {
            let (k, v) = item?;
            if !upper.is_empty() && *k >= *upper {
                continue;
            }
            if !k.starts_with(prefix) {
                break;
            }
            if !keep(&k, &v) {
                continue;
            }
            if out.len() == max {
                return Ok((out, true));
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok((out, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_scans_run_newest_first_and_stop_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let t = SideTable::open(dir.path()).unwrap();
        let keys: Vec<Vec<u8>> = vec![vec![1, 0], vec![1, 1], vec![1, 2], vec![1, 0xff], vec![2, 0], vec![0, 9]];
        t.put_all(keys.iter().map(|k| (k.as_slice(), b"v".as_slice()))).unwrap();
        let (all, more) = t.scan_prefix_rev(&[1], 10, |_, _| true).unwrap();
        assert_eq!(
            all.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            vec![vec![1, 0xff], vec![1, 2], vec![1, 1], vec![1, 0]]
        );
        assert!(!more);
        let (two, more) = t.scan_prefix_rev(&[1], 2, |_, _| true).unwrap();
        assert_eq!(two.len(), 2);
        assert!(more);
        let (ff, _) = t.scan_prefix_rev(&[0xff], 10, |_, _| true).unwrap();
        assert!(ff.is_empty());
        let (odd, _) = t.scan_prefix_rev(&[1], 10, |k, _| k[1] % 2 == 1).unwrap();
        assert_eq!(odd.len(), 2);
        assert_eq!(t.get(&[2, 0]).unwrap().as_deref(), Some(b"v".as_slice()));
    }
}
