//! Shared by the decoder targets: an allocator that keeps the peak of live
//! heap bytes, so a target can check that no length prefix makes a decoder
//! allocate more than its input allows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What any decode may hold at once whatever its input: serde sets aside
/// at most 1 MiB for a sequence before reading its elements
/// (`size_hint::cautious`), and a message's types nest a few sequences deep.
pub const DECODE_FIXED_BYTES_MAX: usize = 8 << 20;
/// What a decode may hold per byte of input: a decoded value is bigger
/// than its CBOR (a one-byte integer becomes eight), a `String` or `Vec`
/// grows by doubling, and a round trip holds the input, the value and its
/// encoding at once.
pub const DECODE_BYTES_PER_INPUT_BYTE_MAX: usize = 64;

pub struct PeakAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            // The old block is live until the copy is made.
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        q
    }
}

/// Runs `f` and panics if the heap it held at its peak (beyond what was
/// live before) exceeds the bound for an input of `input_bytes`.
pub fn bounded<T>(what: &str, input_bytes: usize, f: impl FnOnce() -> T) -> T {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    let held = PEAK.load(Ordering::Relaxed) - before;
    let bound = DECODE_FIXED_BYTES_MAX + DECODE_BYTES_PER_INPUT_BYTE_MAX * input_bytes;
    assert!(held <= bound, "{what}: {input_bytes} bytes of input held {held} bytes of heap at once (bound {bound})");
    out
}
