//! The kernel's IPv4 lookup against the compiler's own longest-prefix
//! match (`Explainer::value`), over random prefix sets of every size class
//! (mixed lengths, nesting, shared values) and addresses inside, on the
//! edges of and outside their prefixes: for each address the value the
//! loaded datapath finds (`PROG_BENCH_VALUE`, through the very lookup
//! `ipguard` runs) must be the compiler's. `range4_differential` proves the
//! table in user space; this proves what the kernel reads of it, in both
//! slots.

mod datapath_util;

use std::net::{IpAddr, Ipv4Addr};

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
use prefixes::{prefix_set, query};

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
        v6: 1024,
        flows: 1024,
    });
    let mut r = Rng(0x00c0_ffee_4a11);
    let dst: IpAddr = "198.51.100.1".parse().unwrap();
    let mut asked = 0usize;
    for (n, seeds, queries) in [
        (1usize, 2, 250),
        (10, 2, 500),
        (1_000, 2, 2_000),
        (100_000, 1, 8_000),
    ] {
        for _ in 0..seeds {
            let mut set = prefix_set(&mut r, n);
            set.sort_by_key(|(p, _)| (p.network(), p.prefix_len()));
            let compiled = CompiledPolicy {
                config: config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST),
                v4: set.clone(),
                ..Default::default()
            };
            let ex = Explainer::new(&compiled);
            l.apply(&compiled);
            let slot = l.dp.maps.active_slot().unwrap();
            for q in 0..queries {
                let a = Ipv4Addr::from(query(&mut r, &set, q));
                let frame = Pkt::new(IpAddr::V4(a), dst, L4::syn(40000, 7000)).build();
                let (action, out) = l.run_prog(PROG_BENCH_VALUE, &frame);
                assert_eq!(action, XDP_PASS, "{a}");
                let want = ex.value(IpAddr::V4(a)).copied().unwrap_or_default();
                assert_eq!(
                    value_of(&out),
                    want,
                    "{n} prefixes, slot {slot}, source {a}"
                );
                asked += 1;
            }
        }
    }
    // Summed per kernel by `cargo xtask vm-test`.
    println!("vm-report: lookup differential: {asked} addresses, kernel and compiler agree");
}
