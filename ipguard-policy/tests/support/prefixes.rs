//! Random IPv4 and IPv6 prefix sets shaped like real tables, shared by this crate's
//! range-table differential and the kernel's (the `tests` crate includes
//! it with `#[path]`, beside `rng.rs`).

use std::collections::HashSet;

use ipguard_common::PrefixValue;
use ipnet::{Ipv4Net, Ipv6Net};

use super::rng::Rng;

/// `n` distinct prefixes, lengths mixed like a real table (and some
/// nesting: a part of them drawn inside earlier ones), with values that
/// repeat (many prefixes share one).
pub fn prefix_set(r: &mut Rng, n: usize) -> Vec<(Ipv4Net, PrefixValue)> {
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

/// What random sets rarely make: three /16s of 300, 500 and 700
/// prefixes (/20 to /32, nested), hundreds of ranges each, whose binary
/// search takes most of its halvings.
pub fn dense_set(r: &mut Rng) -> Vec<(Ipv4Net, PrefixValue)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (hi, n) in [(0x0a01u32, 300), (0x0a02, 500), (0xc633, 700)] {
        for _ in 0..n {
            let len = [20u8, 24, 28, 30, 32][r.below(5) as usize];
            let addr = hi << 16 | (r.next() as u32 & 0xffff);
            let net = Ipv4Net::new(addr.into(), len).unwrap().trunc();
            if seen.insert(net) {
                out.push((net, own_value(r, out.len())));
            }
        }
    }
    out
}

/// A value of the prefix's own entry (`entry`), allowed by one of three
/// lists: every prefix its own attribution.
fn own_value(r: &mut Rng, entry: usize) -> PrefixValue {
    PrefixValue {
        allow_mask: 1 << r.below(3),
        flags: 0,
        entry: entry as u32,
    }
}

/// `n` prefixes (fewer after duplicates) of one value, as a list file's:
/// /24s mostly, some /22, /20, /16 and /32, none shorter; sorted. Their
/// /16s are mostly pairs (`R4_PAIR_FLAG`), of two intervals often.
pub fn list_set(r: &mut Rng, n: usize) -> Vec<(Ipv4Net, PrefixValue)> {
    let one = PrefixValue {
        allow_mask: 1,
        flags: 0,
        entry: 0,
    };
    let mut set: Vec<_> = (0..n)
        .map(|_| {
            let len = match r.below(20) {
                0..14 => 24,
                14..16 => 22,
                16..18 => 20,
                18 => 16,
                _ => 32,
            };
            let net = Ipv4Net::new((r.next() as u32).into(), len).unwrap();
            (net.trunc(), one)
        })
        .collect();
    set.sort_by_key(|(p, _)| (p.network(), p.prefix_len()));
    set.dedup_by_key(|(p, _)| *p);
    set
}

pub fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

/// The `q`th address to ask about: every other one inside a prefix of
/// `set` (on its first or last address, just past it, or anywhere in it),
/// the others anywhere.
pub fn query(r: &mut Rng, set: &[(Ipv4Net, PrefixValue)], q: usize) -> u32 {
    if q.is_multiple_of(2) {
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
    }
}

/// `n` distinct IPv6 prefixes shaped like an IPv6 allowlist: most inside
/// a few /32s (one provider's customers: /48, /56, /64, hosts), some
/// anywhere (from /16 on), a part nested in earlier ones, values that
/// repeat.
pub fn prefix_set6(r: &mut Rng, n: usize) -> Vec<(Ipv6Net, PrefixValue)> {
    let homes: Vec<u128> = (0..4)
        .map(|_| (0x2001_0db8u128 << 96) | (u128::from(r.below(1 << 16) as u32) << 80))
        .collect();
    let mut seen = HashSet::new();
    let mut out: Vec<(Ipv6Net, PrefixValue)> = Vec::with_capacity(n);
    while out.len() < n {
        let len = match r.below(100) {
            0..3 => 16 + r.below(16) as u8,
            3..8 => 32 + r.below(16) as u8,
            8..40 => 48,
            40..55 => 56,
            55..80 => 64,
            80..85 => 65 + r.below(63) as u8,
            _ => 128,
        };
        let random = (u128::from(r.next()) << 64) | u128::from(r.next());
        let addr = match r.below(8) {
            0 if !out.is_empty() => {
                // Inside an earlier prefix.
                let (p, _) = out[r.below(out.len() as u64) as usize];
                u128::from(p.network()) | (random & !mask6(p.prefix_len()))
            }
            1 => random,
            _ => homes[r.below(homes.len() as u64) as usize] | (random & !mask6(48)),
        };
        let net = Ipv6Net::new(addr.into(), len).unwrap().trunc();
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

pub fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

/// As [`query`], for IPv6.
pub fn query6(r: &mut Rng, set: &[(Ipv6Net, PrefixValue)], q: usize) -> u128 {
    let random = (u128::from(r.next()) << 64) | u128::from(r.next());
    if q.is_multiple_of(2) {
        let (p, _) = set[r.below(set.len() as u64) as usize];
        let base = u128::from(p.network());
        let host = !mask6(p.prefix_len());
        match r.below(4) {
            0 => base,
            1 => base | host,
            2 => (base | host).wrapping_add(1),
            _ => base | (random & host),
        }
    } else if q % 4 == 1 {
        // Near the prefixes (the same /32s), outside most of them.
        let (p, _) = set[r.below(set.len() as u64) as usize];
        (u128::from(p.network()) & mask6(32)) | (random & !mask6(32))
    } else {
        random
    }
}

/// `n` distinct IPv6 prefixes that all share their first `at` bits (at
/// most 100), as a provider's customers share its /32: the lookup's
/// window then starts at `at` or later. Lengths from /`at`+8 to /128,
/// some nested. Returns the shared base with the set.
pub fn narrow_set6(r: &mut Rng, n: usize, at: u8) -> (u128, Vec<(Ipv6Net, PrefixValue)>) {
    let random = |r: &mut Rng| (u128::from(r.next()) << 64) | u128::from(r.next());
    let base = random(r) & mask6(at);
    let mut seen = HashSet::new();
    let mut out: Vec<(Ipv6Net, PrefixValue)> = Vec::with_capacity(n);
    while out.len() < n {
        let len = match r.below(6) {
            0 => at + 16,
            1 => at + 24,
            2 => at + 8 + r.below(u64::from(120 - at)) as u8,
            _ => 128.min(at + 32),
        };
        let addr = if !out.is_empty() && r.below(4) == 0 {
            // Inside an earlier prefix.
            let (p, _) = out[r.below(out.len() as u64) as usize];
            u128::from(p.network()) | (random(r) & !mask6(p.prefix_len()))
        } else {
            base | (random(r) & !mask6(at))
        };
        let net = Ipv6Net::new(addr.into(), len).unwrap().trunc();
        if seen.insert(net) {
            out.push((net, own_value(r, out.len())));
        }
    }
    (base, out)
}

/// The `q`th address to ask about a set of [`narrow_set6`]: every other
/// one as [`query6`] asks, the rest inside the shared base (where the
/// window's masks answer) or anywhere.
pub fn query_narrow6(
    r: &mut Rng,
    base: u128,
    at: u8,
    set: &[(Ipv6Net, PrefixValue)],
    q: usize,
) -> u128 {
    let random = (u128::from(r.next()) << 64) | u128::from(r.next());
    match q % 4 {
        1 => base | (random & !mask6(at)),
        3 if q % 8 == 3 => random,
        _ => query6(r, set, q),
    }
}
