//! Types shared by the XDP program (`ipguard-ebpf`) and user space
//! (`ipguard-user`), and the one decision function both of them run.
//!
//! Every type that crosses the kernel boundary is `#[repr(C)]`, has no `bool`,
//! no implicit padding, and its size asserted at compile time. Enumerations are
//! plain integers with explicit numbers that are never reused: a number that
//! once meant something keeps meaning it, so an old daemon can read a newer
//! datapath's counters without misattributing them.
#![no_std]

pub mod class;
pub mod deadline;
pub mod decide;
pub mod maps;
pub mod range4;
pub mod range6;

pub use class::*;
pub use deadline::*;
pub use decide::*;
pub use maps::*;
pub use range4::*;
pub use range6::*;
