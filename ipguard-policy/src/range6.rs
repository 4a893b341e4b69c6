//! An IPv6 longest-prefix lookup built in user space with a bounded
//! number of reads: the first addresses of the ranges where the longest
//! matching prefix changes, in a static B-tree of fan-out 4 laid out in
//! breadth-first order (`ipguard_common::range6`). It answers what an LPM
//! trie over the same prefixes answers, through an index into a table of
//! the distinct prefix values, so the verdict and the attribution stay
//! those of the compiled values.
//!
//! `lookup` runs the kernel's lookup (`r6_lookup`) over the kernel's
//! layout, so this is both what the loader writes and the reference the
//! kernel must agree with. Sizes: a node 64 bytes (three keys), a leaf 16,
//! the window's masks 256 KiB, its bucket classes 16 KiB and its bucket
//! starts 512 KiB.

use std::net::Ipv6Addr;

use ipguard_common::{
    FREQUENT, PrefixValue, R4_LEAF_NONE, R6_BLOCK_BITS, R6_EMPTY_SLOT_VALUES, R6_EMPTY_VALUES,
    R6_KEYS, R6_MASKS_PER_VALUE, R6_MAX_WINDOW_AT, R6_START_VALUES, R6_WINDOW_BITS, R6Node,
    R6Window, class_word, r6_child, r6_lookup,
};
use ipnet::Ipv6Net;

use crate::classes::{Whole, classify};
use crate::intervals::{elementary_intervals, sorted_leaves};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeTable6 {
    /// The distinct prefix values; a leaf is an index into it.
    pub leaves: Vec<PrefixValue>,
    /// The tree, breadth first; empty for a policy without IPv6 prefixes.
    pub nodes: Vec<R6Node>,
    /// The leading bits all the prefixes share; none without prefixes.
    pub window: R6Window,
    /// Per bucket of the window, its blocks no prefix covers; empty
    /// without a window.
    pub empty: Vec<u32>,
    /// Per bucket of the window, the node its search starts at and the
    /// leaf met above it; empty without a window.
    pub starts: Vec<(u32, u32)>,
    /// The buckets' classes (`ipguard_common::class`): none when no
    /// prefix covers any of a bucket, frequent when all of it is one of
    /// `frequent`, else read on; empty without a window.
    pub class: Vec<u32>,
    /// The leaves the most buckets are all of, most first
    /// ([`R4_LEAF_NONE`] for none).
    pub frequent: [u32; FREQUENT],
}

impl RangeTable6 {
    /// The table of `prefixes` (any order; a prefix written twice keeps
    /// its last value).
    pub fn build(prefixes: &[(Ipv6Net, PrefixValue)]) -> Self {
        let mut t = Self {
            frequent: [R4_LEAF_NONE; FREQUENT],
            ..Self::default()
        };
        if prefixes.is_empty() {
            return t;
        }
        let sorted = sorted_leaves(
            prefixes.iter().map(|(n, v)| {
                let n = n.trunc();
                (u128::from(n.network()), n.prefix_len(), *v)
            }),
            &mut t.leaves,
        );
        let keys = elementary_intervals(&sorted);
        let count = keys.len().div_ceil(R6_KEYS);
        t.nodes = vec![R6Node::default(); count];
        // Slots past the last key: the largest address, with the last
        // range's leaf (they come after every key in order, so the search
        // meets them only for that address, which that range holds).
        let pad = keys
            .last()
            .map_or((u128::MAX, R4_LEAF_NONE), |&(_, l)| (u128::MAX, l));
        let mut next = keys.iter().copied().chain(std::iter::repeat(pad));
        fill(&mut t.nodes, 0, &mut next);
        t.window = window_of(&sorted);
        t.empty = uncovered_blocks(&t.window, &keys);
        t.starts = bucket_starts(&t.window, &t.nodes, &t.empty);
        if !t.starts.is_empty() {
            // A bucket whose start is past the last level lies inside one
            // range: its leaf is the start's.
            let whole = t.empty.iter().zip(&t.starts).map(|(&m, &(k, leaf))| {
                let inside = k as usize >= t.nodes.len();
                match leaf {
                    _ if m == u32::MAX => Whole::None,
                    R4_LEAF_NONE if inside => Whole::None,
                    _ if inside => Whole::Leaf(leaf),
                    _ => Whole::Part,
                }
            });
            (t.frequent, t.class) = classify(whole);
        }
        t
    }

    /// The value of the longest prefix holding `addr`, as an LPM trie
    /// lookup returns it.
    pub fn lookup(&self, addr: Ipv6Addr) -> Option<&PrefixValue> {
        match self.leaf_of(addr) {
            R4_LEAF_NONE => None,
            leaf => self.leaves.get(leaf as usize),
        }
    }

    /// The leaf `addr` resolves to ([`R4_LEAF_NONE`] for none, or for a
    /// tree that is not well formed).
    pub fn leaf_of(&self, addr: Ipv6Addr) -> u32 {
        self.search(addr, |k| self.nodes.get(k as usize))
            .unwrap_or(R4_LEAF_NONE)
    }

    /// The kernel's lookup of `addr` over this table, its nodes read
    /// through `node` (a test's reader may refuse to be called).
    fn search<'a>(
        &'a self,
        addr: Ipv6Addr,
        node: impl Fn(u32) -> Option<&'a R6Node>,
    ) -> Option<u32> {
        let a = u128::from(addr);
        r6_lookup(
            &self.window,
            |bucket| self.class.get(class_word(bucket)).copied(),
            self.frequent,
            |bucket| self.empty.get(bucket as usize).copied(),
            |bucket| self.starts.get(bucket as usize).copied(),
            self.nodes.len() as u32,
            (a >> 64) as u64,
            a as u64,
            node,
        )
    }

    /// Levels of the tree: the node reads of a lookup at most.
    pub fn levels(&self) -> u32 {
        let mut levels = 0;
        let mut k = 0usize;
        while k < self.nodes.len() {
            levels += 1;
            k = r6_child(k as u32, 0) as usize;
        }
        levels
    }

    /// Bytes the tree takes as the kernel holds it (the window's masks
    /// are there for every policy).
    pub fn bytes(&self) -> usize {
        (R6_EMPTY_SLOT_VALUES + R6_START_VALUES) as usize * 64
            + self.nodes.len() * std::mem::size_of::<R6Node>()
            + self.leaves.len() * std::mem::size_of::<PrefixValue>()
    }
}

/// The window of prefixes `sorted` (network, length, leaf; at least one):
/// the leading bits they all share, at most `R6_MAX_WINDOW_AT`.
fn window_of(sorted: &[(u128, u8, u32)]) -> R6Window {
    let Some(&(first, _, _)) = sorted.first() else {
        return R6Window::default();
    };
    let at = sorted
        .iter()
        .map(|&(net, len, _)| u32::from(len).min((net ^ first).leading_zeros()))
        .min()
        .unwrap_or(0)
        .min(R6_MAX_WINDOW_AT);
    let base = first & prefix_mask(at);
    R6Window {
        at,
        _pad0: 0,
        base_hi: (base >> 64) as u64,
        base_lo: base as u64,
    }
}

/// The leading `bits` (at most 128) set.
fn prefix_mask(bits: u32) -> u128 {
    u128::MAX.checked_shl(128 - bits).unwrap_or(0)
}

/// Per bucket of `window`, the mask of its blocks that no range of
/// `ranges` (first address, leaf; sorted, the first at 0) with a leaf
/// covers.
fn uncovered_blocks(window: &R6Window, ranges: &[(u128, u32)]) -> Vec<u32> {
    if window.at > R6_MAX_WINDOW_AT {
        return Vec::new();
    }
    let base = u128::from(window.base_hi) << 64 | u128::from(window.base_lo);
    let last = base | !prefix_mask(window.at);
    // Address bits below a block's.
    let shift = 128 - window.at - R6_WINDOW_BITS - R6_BLOCK_BITS;
    let mut empty = vec![u32::MAX; (R6_EMPTY_VALUES * R6_MASKS_PER_VALUE) as usize];
    for (k, &(start, leaf)) in ranges.iter().enumerate() {
        if leaf == R4_LEAF_NONE {
            continue;
        }
        let end = ranges.get(k + 1).map_or(u128::MAX, |n| n.0 - 1);
        let (from, to) = (start.max(base), end.min(last));
        if from > to {
            continue;
        }
        // Blocks are numbered across buckets: bucket, then block. A
        // mask at a time: a range may span all 2^21 blocks, and a bit at a
        // time took most of a small policy's compile.
        let (mut b, last_block) = ((from - base) >> shift, (to - base) >> shift);
        while b <= last_block {
            let mask = (b >> R6_BLOCK_BITS) as usize;
            let first_bit = b as u32 % u32::BITS;
            let last_bit = if last_block >> R6_BLOCK_BITS == b >> R6_BLOCK_BITS {
                last_block as u32 % u32::BITS
            } else {
                u32::BITS - 1
            };
            empty[mask] &= !(u32::MAX >> (u32::BITS - 1 - (last_bit - first_bit)) << first_bit);
            b = (b | u128::from(u32::BITS - 1)) + 1;
        }
    }
    empty
}

/// Per bucket of `window`, the deepest node of the tree `nodes` that the
/// search of every address of the bucket passes through, and the leaf it
/// has met above that node: both walks, from the bucket's first and last
/// address, go down together until a node sends them to different
/// children (or past the last level). A bucket whose blocks are all
/// uncovered (`empty`) is answered by its mask: it keeps the root, and
/// costs no walk here (most buckets of most policies).
fn bucket_starts(window: &R6Window, nodes: &[R6Node], empty: &[u32]) -> Vec<(u32, u32)> {
    if window.at > R6_MAX_WINDOW_AT {
        return Vec::new();
    }
    let base = u128::from(window.base_hi) << 64 | u128::from(window.base_lo);
    let shift = 128 - window.at - R6_WINDOW_BITS;
    // Keys of node `n` at or below `a`, and the leaf of the last of them.
    let below = |n: &R6Node, a: u128, leaf: u32| {
        (0..R6_KEYS).fold((0u32, leaf), |(c, l), i| {
            if u128::from(n.hi[i]) << 64 | u128::from(n.lo[i]) <= a {
                (c + 1, n.leaf[i])
            } else {
                (c, l)
            }
        })
    };
    (0..1u128 << R6_WINDOW_BITS)
        .map(|bucket| {
            if empty.get(bucket as usize) == Some(&u32::MAX) {
                return (0, R4_LEAF_NONE);
            }
            let first = base | bucket << shift;
            let last = first | ((1u128 << shift) - 1);
            let (mut k, mut leaf) = (0u32, R4_LEAF_NONE);
            while let Some(n) = nodes.get(k as usize) {
                let (c, l) = below(n, first, leaf);
                if below(n, last, leaf).0 != c {
                    break;
                }
                (k, leaf) = (r6_child(k, c), l);
            }
            (k, leaf)
        })
        .collect()
}

/// Places the keys of node `k`'s subtree in order: child 0, key 0, child
/// 1, ..., key 2, child 3. Recursion depth is the tree's levels (at most
/// `R6_MAX_LEVELS`).
fn fill(nodes: &mut [R6Node], k: usize, next: &mut impl Iterator<Item = (u128, u32)>) {
    if k >= nodes.len() {
        return;
    }
    for i in 0..R6_KEYS {
        fill(nodes, r6_child(k as u32, i as u32) as usize, next);
        let (a, leaf) = next.next().unwrap_or((u128::MAX, R4_LEAF_NONE));
        let n = &mut nodes[k];
        n.hi[i] = (a >> 64) as u64;
        n.lo[i] = a as u64;
        n.leaf[i] = leaf;
    }
    fill(nodes, r6_child(k as u32, R6_KEYS as u32) as usize, next);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(entry: u32) -> PrefixValue {
        PrefixValue {
            allow_mask: 1,
            flags: 0,
            entry,
        }
    }

    fn net(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_and_disjoint_prefixes_resolve_to_the_most_specific() {
        let t = RangeTable6::build(&[
            (net("2001:db8::/32"), v(1)),
            (net("2001:db8:1::/48"), v(2)),
            (net("2001:db8:1:2::/64"), v(3)),
            (net("2001:db8:1:2::3/128"), v(4)),
            (net("2001:db8:ff00::/40"), v(5)),
            (net("::/0"), v(6)),
            (net("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"), v(7)),
        ]);
        let e = |a: &str| t.lookup(ip(a)).map(|x| x.entry);
        assert_eq!(e("2001:db8:9::1"), Some(1));
        assert_eq!(e("2001:db8:1:9::1"), Some(2));
        assert_eq!(e("2001:db8:1:2::2"), Some(3));
        assert_eq!(e("2001:db8:1:2::3"), Some(4));
        assert_eq!(e("2001:db8:1:2::4"), Some(3));
        assert_eq!(e("2001:db8:1:3::"), Some(2));
        assert_eq!(e("2001:db8:2::"), Some(1));
        assert_eq!(e("2001:db8:ffff::1"), Some(5));
        assert_eq!(e("2001:db9::"), Some(6));
        assert_eq!(e("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"), Some(6));
        assert_eq!(e("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), Some(7));
        assert_eq!(e("::"), Some(6));
    }

    #[test]
    fn nothing_is_found_outside_every_prefix() {
        let t = RangeTable6::build(&[(net("2001:db8::/32"), v(1))]);
        assert_eq!(t.lookup(ip("2001:db8::7")).map(|x| x.entry), Some(1));
        assert!(t.lookup(ip("2001:db9::")).is_none());
        assert!(
            t.lookup(ip("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff"))
                .is_none()
        );
        assert!(t.lookup(ip("::")).is_none());
        assert!(t.lookup(Ipv6Addr::from(u128::MAX)).is_none());
        // Three ranges (none, the /32, none): one node, one leaf.
        assert_eq!((t.nodes.len(), t.leaves.len(), t.levels()), (1, 1, 1));
        assert!(RangeTable6::build(&[]).lookup(ip("::1")).is_none());
    }

    #[test]
    fn every_range_of_a_deep_tree_is_found_at_both_ends() {
        // 999 disjoint /64s, every other one: 1,999 ranges, 667 nodes,
        // 6 levels, two unused slots in the last node.
        let base = u128::from(ip("2001:db8::"));
        let prefixes: Vec<(Ipv6Net, PrefixValue)> = (0..999u128)
            .map(|i| {
                let a = base + ((2 * i) << 64);
                (Ipv6Net::new(Ipv6Addr::from(a), 64).unwrap(), v(i as u32))
            })
            .collect();
        let t = RangeTable6::build(&prefixes);
        assert_eq!((t.nodes.len(), t.levels()), (667, 6));
        // The /64s share 53 bits: a bucket is a /69, inside one range, so
        // the walk of every bucket a /64 covers ends at its start, below
        // the last level, with the range's leaf; the others are answered
        // by their masks.
        assert_eq!(t.window.at, 53);
        let covered: Vec<u32> = (0..t.starts.len())
            .filter(|&b| t.empty[b] != u32::MAX)
            .map(|b| t.starts[b].0)
            .collect();
        assert_eq!(covered.len(), 999 * 32);
        assert!(covered.iter().all(|&k| k as usize >= t.nodes.len()));
        let a = Ipv6Addr::from(base + (6 << 64) + 5);
        let found = t.search(a, |_| panic!("a node was read"));
        assert_eq!(found.map(|l| t.leaves[l as usize].entry), Some(3));
        for i in 0..999u128 {
            let a = base + ((2 * i) << 64);
            let at = |x: u128| t.lookup(Ipv6Addr::from(x)).map(|v| v.entry);
            assert_eq!(at(a), Some(i as u32));
            assert_eq!(at(a + (1 << 64) - 1), Some(i as u32));
            assert_eq!(at(a + (1 << 64)), None);
            assert_eq!(at(a - 1), None);
        }
    }

    #[test]
    fn the_window_answers_sources_no_prefix_near_them_covers() {
        let t = RangeTable6::build(&[
            (net("2001:db8:1::/48"), v(1)),
            (net("2001:db8:1:2::/64"), v(2)),
            (net("2001:db8:ff00::/40"), v(3)),
            (net("2001:db8:3::/64"), v(4)),
        ]);
        // All in 2001:db8::/32, the first bit after it differs: a bucket
        // per /48, a block per /53.
        assert_eq!(t.window.at, 32);
        assert_eq!((t.window.base_hi, t.window.base_lo), (0x2001_0db8 << 32, 0));
        assert_eq!(t.empty.len(), 1 << 16);
        assert_eq!(t.empty[1], 0);
        assert_eq!(t.empty[0xff00], 0);
        assert_eq!(t.empty[0xffff], 0);
        assert_eq!(t.empty[3], !1);
        assert_eq!(t.empty[2], u32::MAX);
        // Answered by the window, no node read.
        let window_only = |a: &str| t.search(ip(a), |_| panic!("a node was read"));
        for a in [
            "2001:db8:2::1",
            "2001:db8:3:800::1",
            "2001:db9::",
            "::",
            "ffff::",
        ] {
            assert_eq!(window_only(a), Some(R4_LEAF_NONE), "{a}");
        }
        let e = |a: &str| t.lookup(ip(a)).map(|x| x.entry);
        assert_eq!(e("2001:db8:1:2::9"), Some(2));
        assert_eq!(e("2001:db8:1:3::9"), Some(1));
        assert_eq!(e("2001:db8:ff80::1"), Some(3));
        assert_eq!(e("2001:db8:3::5"), Some(4));
        // In a covered block, outside the prefix: the tree says none.
        assert_eq!(e("2001:db8:3:1::1"), None);
        assert_eq!(e("2001:db8:2::1"), None);
    }

    #[test]
    fn masks_cleared_a_word_at_a_time_match_a_block_at_a_time() {
        // The old bit-at-a-time loop, as the reference.
        fn reference(window: &R6Window, ranges: &[(u128, u32)]) -> Vec<u32> {
            let base = u128::from(window.base_hi) << 64 | u128::from(window.base_lo);
            let last = base | !prefix_mask(window.at);
            let shift = 128 - window.at - R6_WINDOW_BITS - R6_BLOCK_BITS;
            let mut empty = vec![u32::MAX; 1 << R6_WINDOW_BITS];
            for (k, &(start, leaf)) in ranges.iter().enumerate() {
                let end = ranges.get(k + 1).map_or(u128::MAX, |n| n.0 - 1);
                let (from, to) = (start.max(base), end.min(last));
                if leaf == R4_LEAF_NONE || from > to {
                    continue;
                }
                for b in (from - base) >> shift..=(to - base) >> shift {
                    empty[(b >> R6_BLOCK_BITS) as usize] &= !(1 << (b as u32 & 31));
                }
            }
            empty
        }
        let window = R6Window {
            at: 32,
            _pad0: 0,
            base_hi: 0x2001_0db8 << 32,
            base_lo: 0,
        };
        let base = 0x2001_0db8u128 << 96;
        // A block is a /53: 2^75 addresses.
        let block = 1u128 << 75;
        let none = R4_LEAF_NONE;
        let cases: [&[(u128, u32)]; 6] = [
            // One block; the last block of a mask; one address.
            &[(0, none), (base, 1), (base + block, none)],
            &[(0, none), (base + 31 * block, 1), (base + 32 * block, none)],
            &[
                (0, none),
                (base + 40 * block + 7, 1),
                (base + 40 * block + 8, none),
            ],
            // Across a mask's end, and across hundreds of masks.
            &[
                (0, none),
                (base + 30 * block, 1),
                (base + 34 * block + 1, none),
            ],
            &[
                (0, none),
                (base + 5 * block, 2),
                (base + 70_001 * block, none),
            ],
            // From before the window to past it, with a hole.
            &[(0, 1), (base + 100 * block, none), (base + 101 * block, 3)],
        ];
        for ranges in cases {
            assert_eq!(
                uncovered_blocks(&window, ranges),
                reference(&window, ranges),
                "{ranges:?}"
            );
        }
    }

    #[test]
    fn the_window_stops_where_the_bucket_and_block_bits_still_fit() {
        // Two /128s one bit apart: they share 127 bits, the window 107.
        let t = RangeTable6::build(&[
            (net("2001:db8::2/128"), v(1)),
            (net("2001:db8::3/128"), v(2)),
        ]);
        assert_eq!(t.window.at, R6_MAX_WINDOW_AT);
        assert_eq!(t.lookup(ip("2001:db8::3")).map(|x| x.entry), Some(2));
        assert_eq!(t.lookup(ip("2001:db8::4")), None);
        // A /0 leaves no bit shared: the window is the whole space, and
        // every block is covered.
        let all = RangeTable6::build(&[(net("::/0"), v(1)), (net("2001:db8::/32"), v(2))]);
        assert_eq!(all.window.at, 0);
        assert!(all.empty.iter().all(|m| *m == 0));
        assert_eq!(all.lookup(ip("ffff::1")).map(|x| x.entry), Some(1));
        // No prefix, no window.
        let none = RangeTable6::build(&[]);
        assert!(none.window.at > R6_MAX_WINDOW_AT && none.empty.is_empty());
    }
}
