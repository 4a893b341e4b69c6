//! Small pieces every program uses: the active slot, the source lookup,
//! the clock and the counters.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::{maps::*, prelude::*};

pub(crate) const NS_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
pub(crate) fn active_slot() -> u32 {
    match IPG_ACTIVE.get(0) {
        Some(s) => *s & 1,
        None => 0,
    }
}

#[inline(always)]
pub(crate) fn xdp_packet(ctx: &XdpContext) -> Packet {
    Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    }
}

/// The packet's bounds read again from the context, as pointers that
/// carry none of the bounds checks made so far (see `forget`).
#[inline(always)]
pub(crate) fn xdp_packet_again(ctx: &XdpContext) -> Packet {
    // SAFETY: the program's own context, valid for the whole run; the
    // volatile reads keep LLVM from reusing the earlier loads.
    unsafe {
        Packet {
            start: core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            end: core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        }
    }
}

/// Passes `v` through map memory, whose contents the verifier does not
/// track. The parser has hundreds of paths (VLAN tags, IPv4 options, up to
/// eight IPv6 extension headers), each ending with different known
/// offsets and packet bounds; carried on, they made the verifier walk the
/// rest of the program once per path (487,000 instructions of its
/// 1,000,000 limit, ~10 s per load under emulation). Read back from
/// here, every path reaches the rest of the program in one state, which
/// the verifier checks once (62,000 instructions with the other merges:
/// the parser's, `parse::merge`, and the decision's). The rest must then
/// use packet pointers read afresh (`xdp_packet_again`) and bounds-check
/// every read itself, which `Packet::bytes` does. It costs a store and a
/// load of the value, in the cache line the map lookup brought in.
#[inline(always)]
pub(crate) fn forget<T>(scratch: *mut T, v: T) -> T {
    // SAFETY: `scratch` points to a per-CPU map value of type T, alive for
    // the program run and used by this program only.
    unsafe {
        core::ptr::write_volatile(scratch, v);
        core::ptr::read_volatile(scratch)
    }
}

/// The prefix value of the source in `slot`: the range table for IPv4
/// (see `ipguard_common::range4`), the range tree for IPv6 (`range6`).
#[inline(always)]
pub(crate) fn lookup(
    slot: u32,
    cfg: &PolicyConfig,
    family: u8,
    src: &[u8; 16],
) -> Option<&'static PrefixValue> {
    let found = if family == FAMILY_V4 {
        let addr = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        lookup_v4(slot, cfg, addr)
    } else {
        lookup_v6(slot, cfg, src)
    }?;
    // Time-limited entries end here, daemon or not; only a value with a
    // deadline reads the clock.
    let base = cfg.r4_leaf_base;
    expire(
        found,
        // SAFETY: the helper takes no arguments and touches no memory.
        || unsafe { bpf_ktime_get_boot_ns() }.wrapping_add(cfg.unix_at_boot_ns),
        |i| IPG_R4_LEAVES.get(base.wrapping_add(i)),
    )
}

#[inline(always)]
pub(crate) fn lookup_v4(slot: u32, cfg: &PolicyConfig, addr: u32) -> Option<&'static PrefixValue> {
    let leaf = r4_find(
        addr,
        || {
            IPG_R4_DIRECT
                .get(r4_class_key(slot, addr))
                .map(|c| r4_class_of(c, addr))
        },
        cfg.r4_frequent,
        || {
            Some(search_v4(
                slot,
                addr,
                cfg.r4_range_base,
                r4_whole_leaf(cfg.r4_frequent),
            ))
        },
    )?;
    if leaf == R4_LEAF_NONE {
        return None;
    }
    IPG_R4_LEAVES.get(cfg.r4_leaf_base.wrapping_add(leaf))
}

/// The leaf of `addr` in `slot` past its /16's class: `r4_search` from
/// its direct word, with the chunk's `r4_chunk` ([`R4_LEAF_NONE`] for
/// none). A BPF-to-BPF call, not inlined, so that the code a lookup its
/// class answers runs, and all that follows it, is laid out the same
/// whatever this grows to: inlined, the whole bit's few instructions made
/// the program 6 to 8 ns dearer at 10 and 1,000 prefixes, where no lookup
/// gets here (docs/bench.md).
#[inline(never)]
fn search_v4(slot: u32, addr: u32, base: u32, whole_leaf: u32) -> u32 {
    let Some(word) = IPG_R4_DIRECT
        .get(r4_direct_key(slot, addr))
        .map(|d| d.words[r4_direct_word(addr)])
    else {
        return R4_LEAF_NONE;
    };
    r4_search(
        word,
        addr,
        || {
            IPG_R4_DIRECT
                .get(r4_empty_key(slot, addr))
                .map(|m| r4_mask_of(m, addr))
        },
        |first| {
            r4_chunk(
                first,
                addr,
                whole_leaf,
                || {
                    IPG_R4_DIRECT
                        .get(r4_whole_key(slot, addr))
                        .map(|w| r4_whole_of(w, addr))
                },
                |i| IPG_R4_RANGES.get(base.wrapping_add(i)).copied(),
            )
        },
    )
    .unwrap_or(R4_LEAF_NONE)
}

/// The leaf of the IPv6 source `hi`:`lo` in `slot` (`r6_lookup`;
/// [`R4_LEAF_NONE`] for none). A BPF-to-BPF call, as `search_v4`, for
/// the same reason; and inlined beside it, the tree's bounded walk was
/// verified past the million-instruction limit on kernel 7.3.
#[inline(never)]
fn leaf_v6(slot: u32, cfg: &PolicyConfig, hi: u64, lo: u64) -> u32 {
    let base = cfg.r6_node_base;
    r6_lookup(
        &cfg.r6_window,
        |bucket| r6_empty_word(r6_class_key(slot, bucket)),
        cfg.r6_frequent,
        |bucket| r6_empty_word(r6_empty_key(slot, bucket)),
        |bucket| {
            let (key, i) = r6_start_key(slot, bucket);
            IPG_R6_START.get(key).map(|s| (s.nodes[i], s.leaves[i]))
        },
        cfg.r6_nodes,
        hi,
        lo,
        |k| IPG_R6_NODES.get(base.wrapping_add(k)),
    )
    .unwrap_or(R4_LEAF_NONE)
}

/// Word `i` of value `key` of [`IPG_R6_EMPTY`]: a bucket's mask or a
/// word of its classes.
#[inline(always)]
fn r6_empty_word((key, i): (u32, usize)) -> Option<u32> {
    IPG_R6_EMPTY.get(key).map(|m| m.masks[i])
}

#[inline(always)]
pub(crate) fn lookup_v6(
    slot: u32,
    cfg: &PolicyConfig,
    src: &[u8; 16],
) -> Option<&'static PrefixValue> {
    let (hi, lo) = r6_key(src);
    let leaf = leaf_v6(slot, cfg, hi, lo);
    if leaf == R4_LEAF_NONE {
        return None;
    }
    let value = IPG_R6_LEAVES.get(cfg.r6_leaf_base.wrapping_add(leaf));
    // Keeps this lookup's call apart from the IPv4 one's. The two end alike
    // from the helper call on, and LLVM's tail merging made them one call
    // reached with two maps: the verifier inlines an array lookup only
    // where a call always names one map, so every allowed packet paid a
    // real helper call (28 ns in `cargo xtask bench`). An opaque use of a
    // constant after the call makes the tails differ. The verdicts test
    // `every_array_lookup_is_inlined` checks the result on every kernel.
    // (Building without tail merging, `-enable-tail-merge=false`, fixed
    // this too, but made refused packets 35 ns slower warm.)
    core::hint::black_box(FAMILY_V6);
    value
}

/// CLOCK_MONOTONIC at tick resolution: rate windows, flow timeouts and
/// event times need milliseconds, not nanoseconds, and the coarse clock is
/// a plain read where the precise one reads the hardware clock (costly in
/// virtual machines).
/// On kernels before 5.11 (no coarse helper) it is the precise clock: same
/// base, same unit.
#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: a read-only global the loader sets; the helpers take no
    // arguments and touch no memory.
    unsafe {
        if core::ptr::read_volatile(&IPG_COARSE_CLOCK) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    add(&IPG_COUNTERS, index);
}

/// Counts like [`count`] and returns the counter's new value on this CPU
/// (0 when the map gave no slot).
#[inline(always)]
pub(crate) fn count_returning(index: u32) -> u64 {
    match IPG_COUNTERS.get_ptr_mut(index) {
        Some(p) => {
            // SAFETY: as in `add`.
            unsafe {
                *p += 1;
                *p
            }
        }
        None => 0,
    }
}

#[inline(always)]
pub(crate) fn add(map: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot the map returned: no other writer, so no
        // atomic is needed.
        unsafe { *p += 1 };
    }
}

/// Adds to a counter other CPUs may update at the same time.
#[inline(always)]
pub(crate) fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: `p` points into a map value (8-byte aligned, alive for the
    // program run).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// The service of a local TCP or UDP port in `slot` (0: none).
#[inline(always)]
pub(crate) fn service_of(slot: u32, protocol: u8, port: u16) -> u8 {
    match port_index(slot, protocol, port) {
        Some(i) => IPG_PORTS.get(i).copied().unwrap_or(0),
        None => 0,
    }
}
