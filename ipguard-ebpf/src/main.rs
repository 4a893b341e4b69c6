//! The ipguard datapath: an XDP program that judges every inbound frame by
//! its source address against the active policy slot (see
//! `ipguard_common::maps`), and a TC egress program that records the
//! connections this host opens so their replies pass. The entry points
//! are here; the work is in the modules. The bench-only programs are a
//! second object (`bench.rs`), never shipped in the daemon's.
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write types in core; the
// intrinsic lowers to BPF's atomic add (with the result unused, as here,
// even on the oldest instruction set).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod events;
mod flows;
mod maps;
mod parse;
mod prelude;
mod reject;
mod util;
mod verdict;

use aya_ebpf::macros::{classifier, xdp};

use prelude::*;

/// TC "no opinion": the next program or the default action decides. The
/// egress program only observes.
const TC_ACT_UNSPEC: i32 = -1;

#[xdp]
pub fn ipguard(ctx: XdpContext) -> u32 {
    match verdict::try_ipguard(&ctx) {
        Ok(action) => action,
        // Unreachable in practice (a missing config slot); fail open rather
        // than XDP_ABORTED so a broken install never cuts a host off.
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// Records the connections this host opens, keyed as their replies will
/// arrive, while the active policy wants return traffic.
#[classifier]
pub fn ipguard_egress(ctx: TcContext) -> i32 {
    flows::record_flow(&ctx);
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
