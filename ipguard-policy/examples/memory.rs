//! What a large policy holds in memory, structure by structure, counted by
//! the allocator: the parsed policy (which the daemon keeps to recompile
//! on runtime changes and time edges, and whose entries the compiled
//! policy names), the compiled policy (kept for `explain` and `status`)
//! and the slot image (built, copied into the kernel, dropped).
//!
//! `cargo run --release -p ipguard-policy --example memory [ENTRIES]`
//! (default 1,000,000) on a policy shaped like the daemon benchmark's: one
//! `always_allow` entry per line, 70% /32, the rest /20 to /31.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    fmt::Write as _,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
    time::{Instant, SystemTime},
};

use ipguard_policy as policy;

// The tests' generator.
#[allow(dead_code)]
#[path = "../tests/support/rng.rs"]
mod rng;

/// Counts the bytes held, and the most ever held.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = HELD.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        HELD.fetch_sub(l.size(), Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

fn mb(b: usize) -> f64 {
    b as f64 / 1e6
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let mut r = rng::Rng(0x0bad_5eed_1234_5678);
    let mut yaml = String::with_capacity(n * 22);
    yaml.push_str("version: 1\nallow:\n  - 198.51.100.2\nservices:\n  ssh: { ports: [tcp/22] }\nalways_allow:\n");
    for _ in 0..n {
        let v = r.next() as u32;
        let len = if v % 10 < 7 { 32 } else { 20 + v % 12 };
        let a = std::net::Ipv4Addr::from((r.next() as u32) & (u32::MAX << (32 - len)));
        let _ = if len == 32 {
            writeln!(yaml, "  - {a}")
        } else {
            writeln!(yaml, "  - {a}/{len}")
        };
    }
    println!("size of an entry: {} B", size_of::<policy::Entry>());
    let base = HELD.load(Relaxed);
    PEAK.store(base, Relaxed);
    let t = Instant::now();
    let loaded = policy::parse_str("bench.yaml", &yaml).expect("a valid policy");
    let parsed = HELD.load(Relaxed) - base;
    println!(
        "parsed policy: {:.0} MB held ({} warnings included), {:.0} MB peak over the text, {:.2?}",
        mb(parsed),
        loaded.warnings.len(),
        mb(PEAK.load(Relaxed) - base),
        t.elapsed()
    );
    let t = Instant::now();
    let deferred = policy::parse_checked(
        "bench.yaml",
        &yaml,
        SystemTime::now(),
        &policy::GivenLists::default(),
        policy::Coverage::Defer,
    )
    .expect("a valid policy");
    let read = t.elapsed();
    let t = Instant::now();
    let covered = policy::covered_warnings("bench.yaml", &deferred.policy);
    println!(
        "  read with the covered-entry warnings deferred: {read:.2?}; those warnings ({}) later: {:.2?}",
        covered.len(),
        t.elapsed()
    );
    drop((deferred, covered));
    let mut loaded = loaded;
    let warnings = std::mem::take(&mut loaded.warnings);
    let after_warnings = HELD.load(Relaxed);
    drop(warnings);
    println!(
        "  of it warnings: {:.0} MB",
        mb(after_warnings - HELD.load(Relaxed))
    );
    let before = HELD.load(Relaxed);
    let t = Instant::now();
    let compiled = policy::compile(&loaded.policy, SystemTime::now(), &[]);
    println!(
        "compiled policy: {:.0} MB held ({} prefixes, {} entries), {:.2?}",
        mb(HELD.load(Relaxed) - before),
        compiled.v4.len(),
        compiled.entries.len(),
        t.elapsed()
    );
    let before = HELD.load(Relaxed);
    let t = Instant::now();
    let image = policy::SlotImage::build(&compiled);
    println!(
        "slot image: {:.0} MB held, {:.2?}",
        mb(HELD.load(Relaxed) - before),
        t.elapsed()
    );
    drop(image);
    println!(
        "kept by a daemon (parsed + compiled): {:.0} MB; peak {:.0} MB",
        mb(HELD.load(Relaxed) - base),
        mb(PEAK.load(Relaxed) - base)
    );
}
