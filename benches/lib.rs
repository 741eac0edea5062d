//! Benchmarks. `snapshot-catchup.sh` measures a new region's catch-up by
//! snapshot; criterion micro-benchmarks and the load generator come with
//! issue 6. This library is empty.
