//! Benchmarks: the criterion micro-benchmarks (`hot_paths.rs`) and the
//! scripts beside this file (`compare-etcd.sh`, `audit-cost.sh`,
//! `snapshot-catchup.sh`). The load generator is `hie bench`. Figures and the
//! commands that reproduce them are in docs/BENCHMARKS.md. This library is
//! empty.
