//! The range table (`ipguard_policy::range4`) against the compiler's own
//! longest-prefix lookup (`Explainer::value`, which `explain` and the
//! proptests use), over random prefix sets of every size class and random
//! addresses: both must name the same prefix value for every address.

use std::collections::HashSet;

use ipguard_common::PrefixValue;
use ipguard_policy::{CompiledPolicy, Explainer, range4::RangeTable4};
use ipnet::Ipv4Net;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// `n` distinct prefixes, lengths mixed like a real table (and some
/// nesting: a part of them drawn inside earlier ones), with values that
/// repeat (many prefixes share one).
fn prefix_set(r: &mut Rng, n: usize) -> Vec<(Ipv4Net, PrefixValue)> {
    let mut seen = HashSet::new();
    let mut out: Vec<(Ipv4Net, PrefixValue)> = Vec::with_capacity(n);
    while out.len() < n {
        let len = match r.below(100) {
            0..2 => r.below(8) as u8,
            2..10 => 8 + r.below(8) as u8,
            10..20 => 16,
            20..60 => 24,
            60..70 => 17 + r.below(7) as u8,
            70..80 => 25 + r.below(7) as u8,
            _ => 32,
        };
        let addr = if !out.is_empty() && r.below(4) == 0 {
            // Inside an earlier prefix.
            let (p, _) = out[r.below(out.len() as u64) as usize];
            u32::from(p.network()) | (r.next() as u32 & !mask(p.prefix_len()))
        } else {
            r.next() as u32
        };
        let net = Ipv4Net::new(addr.into(), len).unwrap().trunc();
        if seen.insert(net) {
            let value = PrefixValue {
                allow_mask: r.below(8),
                flags: r.below(3) as u32,
                entry: r.below(n as u64 / 2 + 1) as u32,
            };
            out.push((net, value));
        }
    }
    out
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

#[test]
fn the_range_table_agrees_with_the_compilers_lookup() {
    let mut r = Rng(0x0005_eed0_fd12);
    for (n, seeds, queries) in [
        (1usize, 20, 2_000),
        (10, 20, 2_000),
        (1_000, 10, 20_000),
        (100_000, 2, 200_000),
    ] {
        for _ in 0..seeds {
            let mut set = prefix_set(&mut r, n);
            set.sort_by_key(|(p, _)| (p.network(), p.prefix_len()));
            let table = RangeTable4::build(&set);
            let compiled = CompiledPolicy {
                v4: set.clone(),
                ..Default::default()
            };
            let ex = Explainer::new(&compiled);
            for q in 0..queries {
                // Half the addresses inside a prefix of the set, on its
                // edges too; half anywhere.
                let a = if q % 2 == 0 {
                    let (p, _) = set[r.below(set.len() as u64) as usize];
                    let base = u32::from(p.network());
                    let host = !mask(p.prefix_len());
                    match r.below(4) {
                        0 => base,
                        1 => base | host,
                        2 => (base | host).wrapping_add(1),
                        _ => base | (r.next() as u32 & host),
                    }
                } else {
                    r.next() as u32
                };
                let want = ex.value(std::net::IpAddr::V4(a.into()));
                assert_eq!(
                    table.lookup(a),
                    want,
                    "{} prefixes, address {}",
                    n,
                    std::net::Ipv4Addr::from(a)
                );
            }
            assert_eq!(table.direct.len(), 1 << 16);
        }
    }
}
