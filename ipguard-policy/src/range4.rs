//! An IPv4 longest-prefix lookup built in user space with a bounded
//! number of reads: a direct table indexed by the top 16 address bits,
//! and for the /16s that hold longer prefixes a sorted block of address
//! ranges, searched by binary search (DXR, Zec 2012, with K = 16); a /16
//! of one or two covered intervals of one leaf keeps them in its mask
//! words instead (a pair, `R4_PAIR_FLAG`); two class bits per /16 answer
//! for a /16 no prefix touches or all of a frequent leaf, and a bit per
//! /24 for a chunk's /24 all of the first frequent leaf (its whole bit).
//! It answers what an LPM trie over the same
//! prefixes answers, through an index into a table of the distinct prefix
//! values, so the verdict and the attribution stay those of the compiled
//! values.
//!
//! The layout is the kernel's (`ipguard_common::range4`) and `lookup`
//! runs the kernel's lookup (`r4_find`) over it, so this is both what the
//! loader writes and the reference the kernel must agree with. Sizes: the
//! direct table is 2^16 words, 2^16 uncovered masks of two words, 2^16
//! classes of two bits and 2^24 whole bits (2.77 MiB), a range 2 bytes of
//! start and, unless its chunk alternates, 4 of leaf, a chunk 8 more, a
//! leaf 16.

use ipguard_common::{
    FREQUENT, PrefixValue, R4_ALTERNATE, R4_ALTERNATE_ODD, R4_BLOCK_BITS, R4_CHUNK_FLAG,
    R4_DIRECT_BITS, R4_LEAF_NONE, R4_LEAVES_PER_CELL, R4_MASK_WORDS, R4_PAIR_FLAG,
    R4_STARTS_PER_CELL, R4_WHOLE_BITS, R4_WHOLE_WORDS, R4Cell, class_word, expire, r4_chunk,
    r4_find, r4_pair, r4_search, r4_whole_bit, r4_whole_leaf, r4_whole_word,
};

use crate::{
    CompiledPolicy,
    classes::{Whole, classify},
    intervals::{elementary_intervals, sorted_leaves},
};
use ipnet::Ipv4Net;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeTable4 {
    /// The distinct prefix values; a leaf is an index into it.
    pub leaves: Vec<PrefixValue>,
    /// 2^16 words: a leaf, or `R4_CHUNK_FLAG |` the chunk's first range.
    pub direct: Vec<u32>,
    /// 2^16 masks of `R4_MASK_WORDS` words (`r4_mask_of`): for a chunk,
    /// its blocks no prefix covers (`r4_block`), or for a pair /16 its
    /// intervals (`r4_pair`); 0 for the other /16s.
    pub empty: Vec<u32>,
    /// The chunks' cells (`R4Cell`), chunk after chunk.
    pub ranges: Vec<R4Cell>,
    /// The /16s' classes (`ipguard_common::class`): none when its direct
    /// word is [`R4_LEAF_NONE`], frequent when its word is one of
    /// `frequent`, else read on.
    pub class: Vec<u32>,
    /// The leaves the most /16s are all of, most first ([`R4_LEAF_NONE`]
    /// for none).
    pub frequent: [u32; FREQUENT],
    /// 2^16 times `R4_WHOLE_WORDS` words of whole bits
    /// (`r4_whole_word`): for a chunk, its /24s all of whose addresses
    /// are `frequent[0]`; 0 for the other /16s.
    pub whole: Vec<u32>,
}

/// What an IPv4 lookup read after its /16's class ([`RangeTable4::find`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// The /16's direct word.
    pub word: bool,
    /// Its mask words (a chunk's uncovered mask, or a pair's intervals).
    pub mask: bool,
    /// Its /24's whole bit.
    pub whole: bool,
    /// Its chunk's cells.
    pub cells: bool,
}

impl RangeTable4 {
    /// The table of `prefixes` (any order; a prefix written twice keeps
    /// its last value).
    pub fn build(prefixes: &[(Ipv4Net, PrefixValue)]) -> Self {
        Self::with_leaves(prefixes, &[])
    }

    /// The table a slot holds for `c`: its IPv4 prefixes, after the
    /// deadline records and fallback values of both families, which its
    /// timed values point at by leaf index.
    pub fn of_policy(c: &CompiledPolicy) -> Self {
        Self::with_leaves(&c.v4, &c.timed)
    }

    /// As [`RangeTable4::build`], the leaves starting with `first` (kept
    /// at their indexes).
    pub fn with_leaves(prefixes: &[(Ipv4Net, PrefixValue)], first: &[PrefixValue]) -> Self {
        let mut t = Self {
            leaves: Vec::with_capacity(first.len() + prefixes.len()),
            ..Self::default()
        };
        t.leaves.extend_from_slice(first);
        let sorted = sorted_leaves(
            prefixes.iter().map(|(n, v)| {
                let n = n.trunc();
                (u32::from(n.network()), n.prefix_len(), *v)
            }),
            &mut t.leaves,
        );
        let intervals = elementary_intervals(&sorted);
        t.direct = vec![R4_LEAF_NONE; 1 << R4_DIRECT_BITS];
        t.empty = vec![0; (R4_MASK_WORDS as usize) << R4_DIRECT_BITS];
        // The chunks' intervals, for their whole bits once the frequent
        // leaves are known.
        let mut chunks = Vec::new();
        let mut i = 0usize;
        for chunk in 0..(1u32 << R4_DIRECT_BITS) {
            let lo = u64::from(chunk) << 16;
            let hi = lo + (1 << 16);
            // The interval that holds `lo` is the last one starting at or
            // before it; intervals cover the whole address space.
            while i + 1 < intervals.len() && u64::from(intervals[i + 1].0) <= lo {
                i += 1;
            }
            let mut j = i;
            while j + 1 < intervals.len() && u64::from(intervals[j + 1].0) < hi {
                j += 1;
            }
            if i == j {
                t.direct[chunk as usize] = intervals[i].1;
                continue;
            }
            let words = mask_words(chunk as usize);
            if let Some((leaf, pair)) = pair(lo, &intervals[i..=j]) {
                t.direct[chunk as usize] = R4_CHUNK_FLAG | R4_PAIR_FLAG | leaf;
                t.empty[words].copy_from_slice(&pair);
                continue;
            }
            let first = t.ranges.len() as u32;
            push_chunk(&mut t.ranges, &intervals[i..=j]);
            t.direct[chunk as usize] = R4_CHUNK_FLAG | first;
            let mask = uncovered_blocks(lo, &intervals[i..=j]);
            for (k, w) in t.empty[words].iter_mut().enumerate() {
                *w = (mask >> (32 * k)) as u32;
            }
            chunks.push((lo, i..=j));
        }
        (t.frequent, t.class) = classify(t.direct.iter().map(|&w| match w {
            R4_LEAF_NONE => Whole::None,
            w if w & R4_CHUNK_FLAG == 0 => Whole::Leaf(w),
            _ => Whole::Part,
        }));
        t.whole = vec![0; (R4_WHOLE_WORDS as usize) << R4_DIRECT_BITS];
        for (lo, span) in chunks {
            whole_units(
                lo,
                &intervals[span],
                r4_whole_leaf(t.frequent),
                &mut t.whole,
            );
        }
        t
    }

    /// The value of the longest prefix holding `addr`, as an LPM trie
    /// lookup returns it.
    pub fn lookup(&self, addr: u32) -> Option<&PrefixValue> {
        match self.leaf_of(addr) {
            R4_LEAF_NONE => None,
            leaf => self.leaves.get(leaf as usize),
        }
    }

    /// What the kernel judges `value` (of either family, from this slot)
    /// by at `unix_ns`: the value itself, or past its deadlines the
    /// fallback they name (`ipguard_common::expire`).
    pub fn expire<'a>(&'a self, value: &'a PrefixValue, unix_ns: u64) -> Option<&'a PrefixValue> {
        expire(value, || unix_ns, |i| self.leaves.get(i as usize))
    }

    /// The mask words of /16 number `i` (`r4_mask_of` in the kernel).
    pub fn mask_of(&self, i: usize) -> Option<[u32; R4_MASK_WORDS as usize]> {
        self.empty.get(mask_words(i))?.try_into().ok()
    }

    /// The leaf `addr` resolves to ([`R4_LEAF_NONE`] for none, or for a
    /// table that is not well formed).
    pub fn leaf_of(&self, addr: u32) -> u32 {
        self.find(addr).0
    }

    /// The leaf `addr` resolves to, as [`RangeTable4::leaf_of`], and what
    /// the search read after the /16's class to find it.
    pub fn find(&self, addr: u32) -> (u32, Reads) {
        let i = (addr >> (32 - R4_DIRECT_BITS)) as usize;
        let reads = std::cell::Cell::new(Reads::default());
        let read = |mark: fn(&mut Reads)| {
            let mut r = reads.get();
            mark(&mut r);
            reads.set(r);
        };
        let leaf = r4_find(
            addr,
            || self.class.get(class_word(i as u32)).copied(),
            self.frequent,
            || {
                read(|r| r.word = true);
                r4_search(
                    *self.direct.get(i)?,
                    addr,
                    || {
                        read(|r| r.mask = true);
                        self.mask_of(i)
                    },
                    |first| {
                        r4_chunk(
                            first,
                            addr,
                            r4_whole_leaf(self.frequent),
                            || {
                                read(|r| r.whole = true);
                                let w = self.whole.get(r4_whole_word(addr) as usize)?;
                                Some(r4_whole_bit(*w, addr))
                            },
                            |k| {
                                read(|r| r.cells = true);
                                self.ranges.get(k as usize).copied()
                            },
                        )
                    },
                )
            },
        )
        .unwrap_or(R4_LEAF_NONE);
        (leaf, reads.get())
    }

    /// Chunks: /16s whose addresses have more than one leaf.
    pub fn chunks(&self) -> usize {
        self.direct
            .iter()
            .filter(|w| *w & R4_CHUNK_FLAG != 0)
            .count()
    }

    /// Bytes the table takes as the kernel holds it (a cell 8 bytes, a
    /// leaf 16).
    pub fn bytes(&self) -> usize {
        (self.direct.len() + self.empty.len() + self.class.len() + self.whole.len()) * 4
            + self.ranges.len() * std::mem::size_of::<R4Cell>()
            + self.leaves.len() * std::mem::size_of::<PrefixValue>()
    }
}

/// Appends the chunk of `ranges` (a /16's intervals, the first holding
/// its first address, at least two): its head, its starts, and its leaves
/// unless they alternate between one leaf and none ([`R4_ALTERNATE`]).
fn push_chunk(cells: &mut Vec<R4Cell>, ranges: &[(u32, u32)]) {
    let n = ranges.len();
    // A chunk's leaves alternate with none when every other range is no
    // prefix's and the others share one leaf: (that leaf, whether range
    // 0 is no prefix's).
    let first_none = ranges.iter().position(|r| r.1 == R4_LEAF_NONE);
    let alternate = first_none.and_then(|f| {
        let none_parity = f % 2;
        let leaf = ranges[1 - none_parity].1;
        ranges
            .iter()
            .enumerate()
            .all(|(k, r)| {
                r.1 == if k % 2 == none_parity {
                    R4_LEAF_NONE
                } else {
                    leaf
                }
            })
            .then_some((leaf, none_parity == 0))
    });
    let kind = match alternate {
        Some((_, true)) => R4_ALTERNATE | R4_ALTERNATE_ODD,
        Some((_, false)) => R4_ALTERNATE,
        None => 0,
    };
    // At most 2^16 ranges in a /16 (one per address).
    let span = (n - 1) as u16;
    cells.push(R4Cell::head(
        kind,
        span,
        alternate.map_or(ranges[0].1, |(leaf, _)| leaf),
    ));
    pack(cells, &ranges[1..], R4_STARTS_PER_CELL, |r| {
        u64::from(r.0 & 0xffff)
    });
    if alternate.is_none() {
        pack(cells, &ranges[1..], R4_LEAVES_PER_CELL, |r| u64::from(r.1));
    }
}

/// Appends `of` each of `ranges`, `per` to a cell, the first in the low
/// bits (`R4Cell::start`, `R4Cell::leaf_of`).
fn pack(cells: &mut Vec<R4Cell>, ranges: &[(u32, u32)], per: u32, of: impl Fn(&(u32, u32)) -> u64) {
    let width = u64::BITS / per;
    for c in ranges.chunks(per as usize) {
        let bits = c
            .iter()
            .zip(0..)
            .fold(0, |bits, (r, k)| bits | of(r) << (width * k));
        cells.push(R4Cell { bits });
    }
}

/// Where the mask words of /16 number `i` lie in [`RangeTable4::empty`].
fn mask_words(i: usize) -> std::ops::Range<usize> {
    let first = i * R4_MASK_WORDS as usize;
    first..first + R4_MASK_WORDS as usize
}

/// The covered intervals of the /16 from `lo`, as its low 16 bits: (first,
/// one past the last, leaf). `intervals` are the /16's, the first holding
/// `lo`.
fn covered(lo: u64, intervals: &[(u32, u32)]) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
    intervals
        .iter()
        .enumerate()
        .filter(|(_, i)| i.1 != R4_LEAF_NONE)
        .map(move |(k, &(start, leaf))| {
            let from = u64::from(start).max(lo) - lo;
            // The next interval starts in this /16, or at its end.
            let to = intervals
                .get(k + 1)
                .map_or(1 << 16, |n| u64::from(n.0) - lo);
            (from, to, leaf)
        })
}

/// Sets the whole bits (`r4_whole_word`) of the /24s of the /16 from
/// `lo` all of whose addresses are `leaf`, given its intervals.
fn whole_units(lo: u64, intervals: &[(u32, u32)], leaf: u32, whole: &mut [u32]) {
    const UNIT: u64 = 1 << R4_WHOLE_BITS;
    // Adjacent intervals of one leaf are one run.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (from, to, l) in covered(lo, intervals) {
        if l != leaf {
            continue;
        }
        match runs.last_mut() {
            Some(run) if run.1 == from => run.1 = to,
            _ => runs.push((from, to)),
        }
    }
    for (from, to) in runs {
        // The /24s wholly inside [from, to).
        for unit in from.div_ceil(UNIT)..to / UNIT {
            let addr = (lo + unit * UNIT) as u32;
            whole[r4_whole_word(addr) as usize] |= 1 << ((addr >> R4_WHOLE_BITS) % u32::BITS);
        }
    }
}

/// The leaf and mask words of the /16 from `lo` when its covered
/// addresses are one or two intervals of one leaf (`R4_PAIR_FLAG`).
fn pair(lo: u64, intervals: &[(u32, u32)]) -> Option<(u32, [u32; R4_MASK_WORDS as usize])> {
    let mut spans =
        covered(lo, intervals).map(|(from, to, leaf)| ((from as u16, (to - 1) as u16), leaf));
    let (first, leaf) = spans.next()?;
    let second = match spans.next() {
        None => first,
        Some((second, l)) if l == leaf => second,
        Some(_) => return None,
    };
    if spans.next().is_some() || leaf & (R4_CHUNK_FLAG | R4_PAIR_FLAG) != 0 {
        return None;
    }
    Some((leaf, r4_pair(first, second)))
}

/// The blocks (`r4_block`) of the /16 from `lo` that no prefix covers, as
/// a mask.
fn uncovered_blocks(lo: u64, intervals: &[(u32, u32)]) -> u64 {
    const _: () = assert!(R4_MASK_WORDS * 32 <= u64::BITS);
    let mut mask = 0u64;
    for (from, to, _) in covered(lo, intervals) {
        for b in from >> R4_BLOCK_BITS..=(to - 1) >> R4_BLOCK_BITS {
            mask |= 1 << b;
        }
    }
    !mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipguard_common::{CLASS_FREQUENT, CLASS_READ, class_of};

    fn v(entry: u32) -> PrefixValue {
        PrefixValue {
            allow_mask: 1,
            flags: 0,
            entry,
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<std::net::Ipv4Addr>().unwrap())
    }

    #[test]
    fn nested_and_disjoint_prefixes_resolve_to_the_most_specific() {
        let t = RangeTable4::build(&[
            (net("10.0.0.0/8"), v(1)),
            (net("10.1.0.0/16"), v(2)),
            (net("10.1.2.0/24"), v(3)),
            (net("10.1.2.3/32"), v(4)),
            (net("192.0.2.0/25"), v(5)),
            (net("0.0.0.0/0"), v(6)),
            (net("255.255.255.255/32"), v(7)),
        ]);
        let e = |a: &str| t.lookup(ip(a)).map(|x| x.entry);
        assert_eq!(e("10.9.9.9"), Some(1));
        assert_eq!(e("10.1.9.9"), Some(2));
        assert_eq!(e("10.1.2.2"), Some(3));
        assert_eq!(e("10.1.2.3"), Some(4));
        assert_eq!(e("10.1.2.4"), Some(3));
        assert_eq!(e("10.1.3.0"), Some(2));
        assert_eq!(e("10.2.0.0"), Some(1));
        assert_eq!(e("192.0.2.127"), Some(5));
        assert_eq!(e("192.0.2.128"), Some(6));
        assert_eq!(e("11.0.0.0"), Some(6));
        assert_eq!(e("255.255.255.254"), Some(6));
        assert_eq!(e("255.255.255.255"), Some(7));
        assert_eq!(e("0.0.0.0"), Some(6));
    }

    #[test]
    fn nothing_is_found_outside_every_prefix() {
        let t = RangeTable4::build(&[(net("198.51.100.0/24"), v(1))]);
        assert_eq!(t.lookup(ip("198.51.100.7")).map(|x| x.entry), Some(1));
        assert!(t.lookup(ip("198.51.101.0")).is_none());
        assert!(t.lookup(ip("198.51.99.255")).is_none());
        assert!(t.lookup(0).is_none());
        assert!(t.lookup(u32::MAX).is_none());
        // One chunk (the /16 holds a /24), one leaf.
        assert_eq!((t.chunks(), t.leaves.len()), (1, 1));
    }

    #[test]
    fn a_chunk_marks_the_blocks_no_prefix_covers() {
        // In 198.51.0.0/16: a /24 in block 25 (198.51.100.0/22), a /32 in
        // block 63, and a /20 over blocks 4 to 7.
        let t = RangeTable4::build(&[
            (net("198.51.100.0/24"), v(1)),
            (net("198.51.255.255/32"), v(2)),
            (net("198.51.16.0/20"), v(3)),
        ]);
        let i = usize::from(198u16 << 8 | 51);
        assert_ne!(t.direct[i] & R4_CHUNK_FLAG, 0);
        let covered = 1u64 << 25 | 1 << 63 | 0xf << 4;
        let words = R4_MASK_WORDS as usize;
        assert_eq!(words, 2);
        assert_eq!(t.empty[i * 2], !covered as u32);
        assert_eq!(t.empty[i * 2 + 1], (!covered >> 32) as u32);
        // Answered by the mask, the ranges unread.
        let search = |a: &str| {
            r4_search(
                t.direct[i],
                ip(a),
                || t.mask_of(i),
                |_| panic!("a chunk was searched for {a}"),
            )
        };
        assert_eq!(search("198.51.0.1"), Some(R4_LEAF_NONE));
        assert_eq!(search("198.51.247.255"), Some(R4_LEAF_NONE));
        // A covered block is searched, also for its uncovered addresses.
        let e = |a: &str| t.lookup(ip(a)).map(|x| x.entry);
        assert_eq!(e("198.51.100.9"), Some(1));
        assert_eq!(e("198.51.101.9"), None);
        assert_eq!(e("198.51.255.255"), Some(2));
        assert_eq!(e("198.51.255.254"), None);
        assert_eq!(e("198.51.31.255"), Some(3));
        assert_eq!(e("198.51.32.0"), None);
        // A /16 one leaf holds whole has no mask.
        let whole = RangeTable4::build(&[(net("203.0.0.0/16"), v(4))]);
        let i = usize::from(203u16 << 8) * words;
        assert_eq!(whole.empty[i..i + words], [0, 0]);
    }

    #[test]
    fn a_24_all_of_the_first_frequent_leaf_is_answered_by_its_whole_bit() {
        // Two whole /16s make entry 1's leaf the first frequent; in
        // 198.51.0.0/16 a /24 and a /22 of it, and a /32 of another entry
        // in the /22.
        let t = RangeTable4::build(&[
            (net("203.0.0.0/16"), v(1)),
            (net("203.1.0.0/16"), v(1)),
            (net("198.51.100.0/24"), v(1)),
            (net("198.51.4.0/22"), v(1)),
            (net("198.51.5.7/32"), v(2)),
        ]);
        let first = t.frequent[0];
        assert_eq!(t.leaves[first as usize].entry, 1);
        let i = usize::from(198u16 << 8 | 51);
        assert_eq!(t.direct[i] & (R4_CHUNK_FLAG | R4_PAIR_FLAG), R4_CHUNK_FLAG);
        let bits = &t.whole[i * R4_WHOLE_WORDS as usize..][..R4_WHOLE_WORDS as usize];
        // /24s 4, 6, 7 and 100; 5 holds the /32.
        let want: [u32; 8] = [1 << 4 | 1 << 6 | 1 << 7, 0, 0, 1 << (100 - 96), 0, 0, 0, 0];
        assert_eq!(bits, want);
        // Answered by the bit, the cells unread.
        for a in ["198.51.100.9", "198.51.4.0", "198.51.7.255"] {
            let (leaf, reads) = t.find(ip(a));
            assert_eq!(leaf, first, "{a}");
            assert!(reads.whole && !reads.cells, "{a}: {reads:?}");
        }
        // The /24 the /32 cuts, and an uncovered /24 of a covered block,
        // are searched.
        for (a, entry) in [
            ("198.51.5.6", Some(1)),
            ("198.51.5.7", Some(2)),
            ("198.51.5.8", Some(1)),
            ("198.51.101.0", None),
        ] {
            let (_, reads) = t.find(ip(a));
            assert!(reads.whole && reads.cells, "{a}: {reads:?}");
            assert_eq!(t.lookup(ip(a)).map(|x| x.entry), entry, "{a}");
        }
        // A block no prefix covers is answered by the mask before the bit.
        let (leaf, reads) = t.find(ip("198.51.200.1"));
        assert_eq!(leaf, R4_LEAF_NONE);
        assert!(reads.mask && !reads.whole, "{reads:?}");
    }

    #[test]
    fn a_16_of_no_prefix_or_of_a_frequent_leaf_is_answered_by_its_class() {
        let t = RangeTable4::build(&[
            (net("198.51.100.0/24"), v(1)),
            (net("203.0.0.0/16"), v(2)),
            (net("10.0.0.0/8"), v(3)),
            (net("172.16.0.0/16"), v(4)),
            (net("172.17.0.0/16"), v(4)),
        ]);
        // 256 /16s of leaf 2 (the /8), two of leaf 3, one of leaf 1.
        assert_eq!(t.frequent, [2, 3]);
        // The leaf, and how many direct words the lookup read.
        let find = |a: u32| {
            let words = std::cell::Cell::new(0);
            let i = (a >> 16) as usize;
            let leaf = r4_find(
                a,
                || t.class.get(class_word(a >> 16)).copied(),
                t.frequent,
                || {
                    words.set(words.get() + 1);
                    r4_search(
                        t.direct[i],
                        a,
                        || t.mask_of(i),
                        |first| {
                            r4_chunk(
                                first,
                                a,
                                r4_whole_leaf(t.frequent),
                                || Some(r4_whole_bit(t.whole[r4_whole_word(a) as usize], a)),
                                |k| t.ranges.get(k as usize).copied(),
                            )
                        },
                    )
                },
            );
            (leaf, words.get())
        };
        for (a, leaf) in [
            ("198.50.100.1", R4_LEAF_NONE),
            ("198.52.0.0", R4_LEAF_NONE),
            ("203.1.0.0", R4_LEAF_NONE),
            ("9.255.255.255", R4_LEAF_NONE),
            ("11.0.0.0", R4_LEAF_NONE),
            ("10.0.0.0", 2),
            ("10.255.255.255", 2),
            ("172.16.0.1", 3),
            ("172.17.255.255", 3),
        ] {
            assert_eq!(find(ip(a)), (Some(leaf), 0), "{a}");
        }
        // A /16 in part, or all of a leaf not among the frequent, reads
        // its word.
        for (a, leaf) in [
            ("198.51.0.0", R4_LEAF_NONE),
            ("198.51.100.1", 0),
            ("203.0.255.255", 1),
        ] {
            assert_eq!(find(ip(a)), (Some(leaf), 1), "{a}");
        }
        let count = |c: u32| {
            (0..1u32 << 16)
                .filter(|&i| class_of(t.class[class_word(i)], i) == c)
                .count()
        };
        assert_eq!(
            [CLASS_FREQUENT, CLASS_FREQUENT + 1, CLASS_READ].map(count),
            [256, 2, 2]
        );
        // Fewer than two leaves hold a whole /16: none is frequent.
        assert_eq!(
            RangeTable4::build(&[(net("198.51.100.0/24"), v(1))]).frequent,
            [R4_LEAF_NONE; FREQUENT]
        );
        let one = RangeTable4::build(&[(net("198.51.0.0/16"), v(1))]);
        assert_eq!(one.frequent, [0, R4_LEAF_NONE]);
    }

    #[test]
    fn a_16_of_one_or_two_intervals_of_one_leaf_is_answered_without_ranges() {
        // (prefixes, all of one value; the covered intervals, first and
        // last address each).
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
        let cases: [Case; 7] = [
            (&["198.51.100.0/24"], &[("198.51.100.0", "198.51.100.255")]),
            (&["198.51.0.0/20"], &[("198.51.0.0", "198.51.15.255")]),
            (
                &["198.51.255.255/32"],
                &[("198.51.255.255", "198.51.255.255")],
            ),
            (&["198.51.128.0/17"], &[("198.51.128.0", "198.51.255.255")]),
            (
                &["198.51.0.0/32", "198.51.255.255/32"],
                &[
                    ("198.51.0.0", "198.51.0.0"),
                    ("198.51.255.255", "198.51.255.255"),
                ],
            ),
            (
                &["198.51.16.0/20", "198.51.100.7/32"],
                &[
                    ("198.51.16.0", "198.51.31.255"),
                    ("198.51.100.7", "198.51.100.7"),
                ],
            ),
            // Adjacent prefixes of one value are one interval; a prefix
            // inside another of its value adds none.
            (
                &[
                    "198.51.100.0/24",
                    "198.51.101.0/24",
                    "198.51.200.0/22",
                    "198.51.201.9/32",
                ],
                &[
                    ("198.51.100.0", "198.51.101.255"),
                    ("198.51.200.0", "198.51.203.255"),
                ],
            ),
        ];
        for (prefixes, spans) in cases {
            let set: Vec<_> = prefixes.iter().map(|p| (net(p), v(7))).collect();
            let t = RangeTable4::with_leaves(&set, &[v(1), v(2)]);
            let i = usize::from(198u16 << 8 | 51);
            // The two leaves before it keep theirs: the value is leaf 2.
            assert_eq!(
                t.direct[i],
                R4_CHUNK_FLAG | R4_PAIR_FLAG | 2,
                "{prefixes:?}"
            );
            assert!(t.ranges.is_empty(), "{prefixes:?}");
            let search = |a: u32| {
                r4_search(
                    t.direct[i],
                    a,
                    || t.mask_of(i),
                    |_| panic!("a chunk was searched for {prefixes:?}"),
                )
            };
            for &(first, last) in spans {
                let (first, last) = (ip(first), ip(last));
                assert_eq!(search(first), Some(2), "{prefixes:?}");
                assert_eq!(search(last), Some(2), "{prefixes:?}");
                assert_eq!(search(first + (last - first) / 2), Some(2), "{prefixes:?}");
                let covered = |a: u32| spans.iter().any(|&(f, l)| ip(f) <= a && a <= ip(l));
                if first & 0xffff != 0 && !covered(first - 1) {
                    assert_eq!(search(first - 1), Some(R4_LEAF_NONE), "{prefixes:?}");
                }
                if last & 0xffff != 0xffff && !covered(last + 1) {
                    assert_eq!(search(last + 1), Some(R4_LEAF_NONE), "{prefixes:?}");
                }
                assert_eq!(t.lookup(first).map(|x| x.entry), Some(7));
            }
        }
        // Not a pair: two intervals of two leaves, one inside a prefix
        // that covers the rest of the /16 (its own leaf around it), or
        // three intervals of one leaf.
        for set in [
            &[("198.51.100.0/24", 1), ("198.51.200.0/24", 2)][..],
            &[("198.51.0.0/16", 1), ("198.51.100.0/24", 2)][..],
            &[
                ("198.51.1.0/24", 3),
                ("198.51.3.0/24", 3),
                ("198.51.5.0/24", 3),
            ][..],
        ] {
            let set: Vec<_> = set.iter().map(|&(p, e)| (net(p), v(e))).collect();
            let t = RangeTable4::build(&set);
            let w = t.direct[usize::from(198u16 << 8 | 51)];
            assert_eq!(w & (R4_CHUNK_FLAG | R4_PAIR_FLAG), R4_CHUNK_FLAG);
            assert!(!t.ranges.is_empty());
        }
    }

    #[test]
    fn a_chunk_keeps_its_starts_apart_from_its_leaves() {
        // Three /24s of one value in 198.51.0.0/16 (not a pair): seven
        // ranges alternating with none, range 0 none.
        let list = RangeTable4::build(&[
            (net("198.51.1.0/24"), v(3)),
            (net("198.51.3.0/24"), v(3)),
            (net("198.51.5.0/24"), v(3)),
        ]);
        // The same /24s of three values: their leaves stored.
        let mixed = RangeTable4::build(&[
            (net("198.51.1.0/24"), v(1)),
            (net("198.51.3.0/24"), v(2)),
            (net("198.51.5.0/24"), v(3)),
        ]);
        let i = usize::from(198u16 << 8 | 51);
        for (t, kind, cells) in [(&list, R4_ALTERNATE | R4_ALTERNATE_ODD, 3), (&mixed, 0, 6)] {
            assert_eq!(t.direct[i], R4_CHUNK_FLAG);
            let head = t.ranges[0];
            assert_eq!((head.kind(), head.span()), (kind, 6));
            // The head, six starts in two cells, six leaves in three.
            assert_eq!(t.ranges.len(), cells);
            let starts: Vec<u16> = (1..7)
                .map(|k| t.ranges[ipguard_common::r4_start_cell(k) as usize].start(k))
                .collect();
            assert_eq!(starts, [0x100, 0x200, 0x300, 0x400, 0x500, 0x600]);
        }
        // Which cells a search reads: an alternating chunk only its head
        // and starts, the other one cell of leaves too.
        let read = |t: &RangeTable4, a: &str| {
            let cells = std::cell::RefCell::new(Vec::new());
            let leaf = r4_search(
                t.direct[i],
                ip(a),
                || Some([0, 0]),
                |first| {
                    r4_chunk(
                        first,
                        ip(a),
                        r4_whole_leaf(t.frequent),
                        || None,
                        |k| {
                            cells.borrow_mut().push(k);
                            t.ranges.get(k as usize).copied()
                        },
                    )
                },
            );
            (leaf, cells.into_inner().into_iter().max())
        };
        assert_eq!(read(&list, "198.51.3.9"), (Some(0), Some(2)));
        assert_eq!(read(&list, "198.51.4.0"), (Some(R4_LEAF_NONE), Some(2)));
        assert_eq!(read(&mixed, "198.51.3.9"), (Some(1), Some(4)));
        assert_eq!(read(&mixed, "198.51.5.255"), (Some(2), Some(5)));
        assert_eq!(read(&mixed, "198.51.6.0"), (Some(R4_LEAF_NONE), Some(5)));
        assert_eq!(read(&mixed, "198.51.0.0"), (Some(R4_LEAF_NONE), Some(1)));
    }
}
