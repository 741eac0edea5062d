//! Benchmarks live in benches/*.rs; this library is empty.
