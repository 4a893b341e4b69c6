//! Bench-only XDP programs that time the parts of the product's program
//! (`cargo xtask bench`): a second object, built beside the product's and
//! loaded on the same pinned maps, so that the daemon never carries them.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

// Shared with the product's object, which uses all of them.
mod maps;
#[allow(dead_code)]
mod parse;
#[allow(unused_imports)]
mod prelude;
#[allow(dead_code)]
mod util;

use aya_ebpf::macros::xdp;

use crate::{maps::*, prelude::*, util::*};

/// Bench only: the cost of running any XDP program at all.
#[xdp]
pub fn ipguard_bench_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Bench only: the parser of `ipguard` alone, its result handed through
/// the scratch map as `ipguard` hands it on (`forget`): every field counts
/// as used, as there, or the compiler would drop the parsing of those the
/// bench does not read.
#[xdp]
pub fn ipguard_bench_parse(ctx: XdpContext) -> u32 {
    let Some(scratch) = IPG_SCRATCH.get_ptr_mut(SCRATCH_XDP) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a field of the map value `scratch` points to.
    match parse::<true>(&xdp_packet(&ctx), unsafe { &raw mut (*scratch).word }) {
        Parsed::Ip(ip) => {
            // SAFETY: as above.
            let ip = forget(unsafe { &raw mut (*scratch).ip }, ip);
            match ip.l4() {
                L4::Port { .. } => xdp_action::XDP_PASS,
                _ => xdp_action::XDP_DROP,
            }
        }
        Parsed::NonIp => xdp_action::XDP_PASS,
        Parsed::Malformed => xdp_action::XDP_DROP,
    }
}

/// Bench only: parser (its result handed on as in `ipguard_bench_parse`),
/// active slot and config, and the source lookup.
#[xdp]
pub fn ipguard_bench_lookup(ctx: XdpContext) -> u32 {
    let slot = active_slot();
    let Some(cfg) = IPG_CONFIG.get(slot) else {
        return xdp_action::XDP_PASS;
    };
    let Some(scratch) = IPG_SCRATCH.get_ptr_mut(SCRATCH_XDP) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a field of the map value `scratch` points to.
    match parse::<true>(&xdp_packet(&ctx), unsafe { &raw mut (*scratch).word }) {
        Parsed::Ip(ip) => {
            // SAFETY: as above.
            let ip = forget(unsafe { &raw mut (*scratch).ip }, ip);
            match lookup(slot, cfg, ip.family, &ip.src()) {
                Some(v) if v.allow_mask != 0 => xdp_action::XDP_PASS,
                _ => xdp_action::XDP_DROP,
            }
        }
        Parsed::NonIp => xdp_action::XDP_PASS,
        Parsed::Malformed => xdp_action::XDP_DROP,
    }
}

/// Tests only: the source's prefix value over the frame's first 16 bytes
/// (`ipguard_common::PROG_BENCH_VALUE`).
#[xdp]
pub fn ipguard_bench_value(ctx: XdpContext) -> u32 {
    let slot = active_slot();
    let Some(cfg) = IPG_CONFIG.get(slot) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(scratch) = IPG_SCRATCH.get_ptr_mut(SCRATCH_XDP) else {
        return xdp_action::XDP_ABORTED;
    };
    let pkt = xdp_packet(&ctx);
    // SAFETY: a field of the map value `scratch` points to.
    let Parsed::Ip(ip) = parse::<true>(&pkt, unsafe { &raw mut (*scratch).word }) else {
        return xdp_action::XDP_DROP;
    };
    let v = lookup(slot, cfg, ip.family, &ip.src())
        .copied()
        .unwrap_or_default();
    let Some(out) = pkt.bytes_mut::<16>(0) else {
        return xdp_action::XDP_DROP;
    };
    out[..8].copy_from_slice(&v.allow_mask.to_ne_bytes());
    out[8..12].copy_from_slice(&v.flags.to_ne_bytes());
    out[12..].copy_from_slice(&v.entry.to_ne_bytes());
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
