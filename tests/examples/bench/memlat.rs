//! The machine's memory latency: the cost of one dependent load that misses
//! the caches, against which the scale rows' per-flow cost is read (a flow
//! entry the cache no longer holds is a chain of such loads: hash bucket,
//! then the element).

use std::time::Instant;

/// Nanoseconds per load of a pointer chase through `bytes` of memory, one
/// cache line per hop, visiting the lines in a random cycle (so that no
/// prefetcher guesses the next one).
pub fn dependent_load_ns(bytes: usize, steps: usize) -> f64 {
    const WORDS_PER_LINE: usize = 64 / 8;
    let lines = (bytes / 64).max(2);
    let mut order: Vec<usize> = (0..lines).collect();
    // Fisher–Yates with xorshift64: the same cycle every run.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..lines).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut next = vec![0usize; lines * WORDS_PER_LINE];
    for k in 0..lines {
        next[order[k] * WORDS_PER_LINE] = order[(k + 1) % lines] * WORDS_PER_LINE;
    }
    let mut at = order[0] * WORDS_PER_LINE;
    // One lap to fault the pages in and warm what fits.
    for _ in 0..lines {
        at = next[at];
    }
    let started = Instant::now();
    for _ in 0..steps {
        at = next[at];
    }
    let elapsed = started.elapsed();
    std::hint::black_box(at);
    elapsed.as_nanos() as f64 / steps as f64
}
