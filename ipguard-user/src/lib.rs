//! ipguard: an IP allowlist firewall enforced at the NIC by an XDP program.
//!
//! The library holds everything the `ipguard` binary does, so that it can be
//! tested without a kernel where possible: the policy language (`policy`),
//! the datapath loader (`datapath`), and the subcommands (`commands`).

pub mod cli;
pub mod commands;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod error;
pub mod events;
pub mod kernel;
pub mod metrics;
pub mod protocol;
pub mod report;
pub mod requests;
/// The policy language, compiler and explain: its own crate, which builds
/// on stable Rust without the eBPF toolchain.
pub use ipguard_policy as policy;
pub mod runtime;
pub mod sessions;
pub mod state;

/// The XDP program, built by build.rs and embedded so that the binary is
/// all a server needs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ipguard-xdp"));
/// The bench-only XDP programs (`ipguard_common::PROG_BENCH_*`): a second
/// object that shares the first one's pinned maps, so the object the
/// daemon loads carries none of them.
pub static EBPF_BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ipguard-bench-xdp"));
