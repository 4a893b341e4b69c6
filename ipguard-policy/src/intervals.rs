//! The address space cut where the longest matching prefix changes: what
//! both range tables (`range4`, `range6`) are built from.

use std::collections::HashMap;

use ipguard_common::{PrefixValue, R4_LEAF_NONE};

/// An address as a number: `u32` for IPv4, `u128` for IPv6.
pub(crate) trait Addr: Copy + Ord {
    const BITS: u32;
    fn wide(self) -> u128;
    /// `w` fits (it comes from `wide` of an address, or stays below one).
    fn narrow(w: u128) -> Self;
}

impl Addr for u32 {
    const BITS: u32 = 32;
    fn wide(self) -> u128 {
        u128::from(self)
    }
    fn narrow(w: u128) -> Self {
        w as u32
    }
}

impl Addr for u128 {
    const BITS: u32 = 128;
    fn wide(self) -> u128 {
        self
    }
    fn narrow(w: u128) -> Self {
        w
    }
}

/// Sorted (first address, length, leaf) of `prefixes` (any order), each
/// prefix once (a prefix written twice keeps its last value), with their
/// values interned into `leaves` after what it holds. Interning was most
/// of the build at a million prefixes (SipHash took 185 of 205 ms there, a
/// fast hasher 120 ms; by entry number, below, 45 to 60 ms for the build).
pub(crate) fn sorted_leaves<A: Addr>(
    prefixes: impl ExactSizeIterator<Item = (A, u8, PrefixValue)>,
    leaves: &mut Vec<PrefixValue>,
) -> Vec<(A, u8, u32)> {
    // Equal values have the same entry: the first value seen of each entry
    // is found by its number, in a table of 4 bytes per prefix (at a
    // million prefixes, most with an entry of their own, probing a hash
    // table of 28 MB missed the cache on nearly every one). Other values
    // of an entry, and entries past the table, go to the hash map.
    const UNSEEN: u32 = u32::MAX;
    let mut by_entry: Vec<u32> = vec![UNSEEN; prefixes.len()];
    let mut interned: HashMap<PrefixValue, u32, foldhash::fast::RandomState> = HashMap::default();
    let mut sorted: Vec<(A, u8, u32)> = prefixes
        .map(|(a, l, v)| {
            let slot = by_entry.get_mut(v.entry as usize);
            if let Some(&leaf) = slot.as_deref()
                && leaf != UNSEEN
                && leaves[leaf as usize] == v
            {
                return (a, l, leaf);
            }
            let leaf = match slot {
                Some(s) if *s == UNSEEN => {
                    leaves.push(v);
                    *s = (leaves.len() - 1) as u32;
                    *s
                }
                _ => *interned.entry(v).or_insert_with(|| {
                    leaves.push(v);
                    (leaves.len() - 1) as u32
                }),
            };
            (a, l, leaf)
        })
        .collect();
    // Less specific first at a shared start, so that the more specific one
    // ends up on top; stable, so that of a prefix written twice the later
    // stays later.
    sorted.sort_by_key(|&(a, l, _)| (a, l));
    sorted.dedup_by(|b, a| {
        if (a.0, a.1) == (b.0, b.1) {
            a.2 = b.2;
            true
        } else {
            false
        }
    });
    sorted
}

/// (first address, leaf) of every range, sorted, starting at 0,
/// neighbours with the same leaf merged. `sorted` holds (first address,
/// length, leaf) by address, then length, as [`sorted_leaves`] gives it;
/// prefixes nest or are disjoint, so a stack of the prefixes holding the
/// current address gives the most specific one on top.
pub(crate) fn elementary_intervals<A: Addr>(sorted: &[(A, u8, u32)]) -> Vec<(A, u32)> {
    let last = A::narrow(u128::MAX >> (128 - A::BITS)).wide();
    // The address after the prefix; None past the end of the space.
    let end = |a: A, l: u8| -> Option<u128> {
        let size = 1u128.checked_shl(A::BITS - u32::from(l))?;
        a.wide().checked_add(size).filter(|e| *e <= last)
    };
    let mut out: Vec<(A, u32)> = Vec::with_capacity(sorted.len() * 2 + 1);
    let push = |out: &mut Vec<(A, u32)>, at: Option<u128>, leaf: u32| {
        let Some(at) = at else { return };
        let at = A::narrow(at);
        match out.last_mut() {
            Some(last) if last.0 == at => last.1 = leaf,
            Some(last) if last.1 == leaf => {}
            _ => out.push((at, leaf)),
        }
        // Two neighbours with one leaf after an overwrite: merge them.
        if out.len() >= 2 && out[out.len() - 2].1 == out[out.len() - 1].1 {
            out.pop();
        }
    };
    // (end, leaf) of the prefixes holding the current address.
    let mut stack: Vec<(Option<u128>, u32)> = Vec::new();
    push(&mut out, Some(0), R4_LEAF_NONE);
    for &(a, l, leaf) in sorted {
        let at = a.wide();
        // Close the prefixes that end before this one starts.
        while let Some(&(e, _)) = stack.last() {
            match e {
                Some(e) if e <= at => {}
                _ => break,
            }
            stack.pop();
            push(&mut out, e, stack.last().map_or(R4_LEAF_NONE, |s| s.1));
        }
        push(&mut out, Some(at), leaf);
        stack.push((end(a, l), leaf));
    }
    while let Some((e, _)) = stack.pop() {
        push(&mut out, e, stack.last().map_or(R4_LEAF_NONE, |s| s.1));
    }
    out
}
