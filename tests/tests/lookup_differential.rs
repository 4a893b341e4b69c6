//! The kernel's IPv4 and IPv6 lookups against the compiler's own
//! longest-prefix match (`Explainer::value`), over random prefix sets of every size class
//! (mixed lengths, nesting, shared values) and addresses inside, on the
//! edges of and outside their prefixes: for each address the value the
//! loaded datapath finds (`PROG_BENCH_VALUE`, through the very lookup
//! `ipguard` runs) must be the compiler's. `range_differential` proves the
//! tables in user space; this proves what the kernel reads of them, in
//! both slots.

mod datapath_util;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use datapath_util::*;
use ipguard::{
    datapath::Capacities,
    policy::{CompiledPolicy, Explainer},
};
use ipguard_common::*;
use ipguard_tests::frames::{L4, Pkt};

#[path = "../../ipguard-policy/tests/support/rng.rs"]
mod rng;
use rng::Rng;
#[path = "../../ipguard-policy/tests/support/prefixes.rs"]
mod prefixes;
use prefixes::{
    dense_set, list_set, narrow_set6, prefix_set, prefix_set6, query, query_narrow6, query6,
};

fn value_of(out: &[u8]) -> PrefixValue {
    let u32_at = |i: usize| u32::from_ne_bytes(out[i..i + 4].try_into().unwrap());
    PrefixValue {
        allow_mask: u64::from_ne_bytes(out[..8].try_into().unwrap()),
        flags: u32_at(8),
        entry: u32_at(12),
    }
}

#[test]
fn the_kernel_finds_the_compilers_value_for_every_address() {
    let mut l = Loaded::with_caps(Capacities {
        v4: 131_072,
        v6: 131_072,
        flows: 1024,
    });
    let mut r = Rng(0x00c0_ffee_4a11);
    let mut asked = 0usize;
    // `cargo xtask vm-test` asks fewer addresses under emulation (one
    // BPF_PROG_TEST_RUN each); every set is still loaded and asked.
    let divisor: usize = std::env::var("IPGUARD_LOOKUP_DIVISOR")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&d| d >= 1)
        .unwrap_or(1);
    // The sets of 100,000 prefixes are a quarter of that in a guest: most
    // of the test's time there went to building them in a debug build
    // under emulation. The kernel's reads are the same at any size, and a
    // set of 25,000 still has thousands of chunks and a tree of 8 levels.
    let big = |n: usize| if n >= 100_000 { n / divisor.min(4) } else { n };
    let sizes = [
        (1usize, 2, 250),
        (10, 2, 500),
        (1_000, 2, 2_000),
        (big(100_000), 1, 8_000),
    ];
    // The kernel against the compiler over `queries` addresses of `set`
    // (sorted), inside its prefixes and around them.
    let mut ipv4 = |l: &mut Loaded, r: &mut Rng, set: Vec<_>, queries: usize| {
        let ask: Vec<IpAddr> = (0..queries / divisor)
            .map(|q| IpAddr::V4(Ipv4Addr::from(query(r, &set, q))))
            .collect();
        let n = set.len();
        let compiled = CompiledPolicy {
            config: config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST),
            v4: set,
            ..Default::default()
        };
        asked += agree(l, &compiled, &ask, n);
    };
    let sorted = |mut set: Vec<(ipnet::Ipv4Net, PrefixValue)>| {
        set.sort_by_key(|(p, _)| (p.network(), p.prefix_len()));
        set
    };
    for (n, seeds, queries) in sizes {
        for _ in 0..seeds {
            let set = sorted(prefix_set(&mut r, n));
            ipv4(&mut l, &mut r, set, queries);
        }
    }
    // /16s of hundreds of ranges (`dense_set`).
    let set = sorted(dense_set(&mut r));
    ipv4(&mut l, &mut r, set, 4_000);
    // A list file's: /16s of one or two intervals of one leaf, answered
    // from the direct table (`R4_PAIR_FLAG`), and chunks whose ranges
    // alternate between that leaf and none (`R4_ALTERNATE`).
    let set = list_set(&mut r, big(100_000));
    ipv4(&mut l, &mut r, set, 8_000);
    // IPv6: half the queries (the tree's search is the same at every
    // size class; the sets' shapes are what vary).
    for (n, seeds, queries) in sizes {
        for _ in 0..seeds {
            let mut set = prefix_set6(&mut r, n);
            set.sort_by_key(|(p, _)| (p.network(), p.prefix_len()));
            let compiled = CompiledPolicy {
                config: config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST),
                v6: set.clone(),
                ..Default::default()
            };
            let ask: Vec<IpAddr> = (0..queries / 2 / divisor)
                .map(|q| IpAddr::V6(Ipv6Addr::from(query6(&mut r, &set, q))))
                .collect();
            asked += agree(&mut l, &compiled, &ask, n);
        }
    }
    // IPv6 sets sharing their leading bits, where the window's masks
    // answer (`narrow_set6`): a window in each half and across them.
    for at in [32u8, 60, 96] {
        let (base, mut set) = narrow_set6(&mut r, 1_000, at);
        set.sort_by_key(|(p, _)| (p.network(), p.prefix_len()));
        let compiled = CompiledPolicy {
            config: config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST),
            v6: set.clone(),
            ..Default::default()
        };
        let ask: Vec<IpAddr> = (0..2_000 / divisor)
            .map(|q| IpAddr::V6(Ipv6Addr::from(query_narrow6(&mut r, base, at, &set, q))))
            .collect();
        asked += agree(&mut l, &compiled, &ask, set.len());
    }
    // Summed per kernel by `cargo xtask vm-test`.
    println!("vm-report: lookup differential: {asked} addresses, kernel and compiler agree");
}

/// Applies `compiled` and asks the kernel for the value of each source of
/// `ask`; returns how many it asked.
fn agree(l: &mut Loaded, compiled: &CompiledPolicy, ask: &[IpAddr], n: usize) -> usize {
    let ex = Explainer::new(compiled);
    l.apply(compiled);
    let slot = l.dp.maps.active_slot().unwrap();
    for &a in ask {
        let dst: IpAddr = if a.is_ipv4() {
            "198.51.100.1".parse().unwrap()
        } else {
            "2001:db8::1".parse().unwrap()
        };
        let frame = Pkt::new(a, dst, L4::syn(40000, 7000)).build();
        let (action, out) = l.run_prog(PROG_BENCH_VALUE, &frame);
        assert_eq!(action, XDP_PASS, "{a}");
        let want = ex.value(a).copied().unwrap_or_default();
        assert_eq!(
            value_of(&out),
            want,
            "{n} prefixes, slot {slot}, source {a}"
        );
    }
    ask.len()
}
