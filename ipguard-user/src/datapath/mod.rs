//! Loading, attaching, adopting and feeding the datapath: the XDP program,
//! the TC egress program that records the connections this host opens, and
//! their maps.
//!
//! All maps are pinned by name under the pin directory, so a restarted
//! daemon (or `ipguard status` with no daemon at all) opens the very maps
//! the running program uses. A policy is written completely into the
//! inactive slot and then made live by one write of `IPG_ACTIVE`, so no
//! packet is ever judged by a mix of two policies (see
//! `ipguard_common::maps` and [`Maps::apply`]).

mod attach;
mod counters;
mod flows;
mod load;
mod mapped;
mod pins;
mod range4;
mod range6;
mod slots;
mod sys;
mod writes;

pub use attach::*;
pub use flows::FlowStats;
pub use load::Datapath;
pub use pins::*;
pub use slots::*;
// Shared between the files of this module.
use range4::Lookup4;
use range6::Lookup6;
use writes::*;

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::DirBuilderExt,
    },
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, IterableMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
    util::nr_cpus,
};
use ipguard_common::*;

use crate::policy::{CompiledPolicy, SlotImage, TrieKey};

/// The XDP program's name in the object file.
pub const PROGRAM: &str = PROG_XDP;
/// statfs(2) magic of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Used only where the kernel cannot wait for an RCU grace period on our
/// behalf (membarrier(2) refused, e.g. under nohz_full): XDP and TC run for
/// microseconds per packet inside an RCU read-side section, so a packet
/// that read the old slot index is long finished after this.
const SLOT_GRACE: Duration = Duration::from_millis(50);
/// Elements per batched map syscall: bounds the kernel's work per call.
const BATCH: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this needs root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON): run it with sudo or from the ipguard systemd unit"
    )]
    NotRoot,
    #[error(
        "{dir} is not on a BPF filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf`, or choose --pin-dir on a mounted bpffs"
    )]
    NoBpffs { dir: PathBuf },
    #[error("interface {0:?} not found: check the name with `ip link`, or fix --iface")]
    UnknownInterface(String),
    #[error(
        "interface {iface} already has an XDP program that ipguard did not attach: remove it (`ip link set dev {iface} xdp off`) or choose another interface"
    )]
    Occupied { iface: String },
    #[error("cannot attach to {iface} in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the kernel refused the XDP program: {0}")]
    Load(String),
    #[error(transparent)]
    Unsupported(#[from] crate::kernel::Unsupported),
    #[error(
        "ipguard is not loaded here: no pinned maps under {0} (start `ipguard run`, or pass the --pin-dir it uses)"
    )]
    NotLoaded(PathBuf),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name}: {op} failed: {source}")]
    MapIo {
        name: &'static str,
        op: &'static str,
        source: io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot pin {what} at {path}: {source}")]
    Pin {
        what: String,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("policy needs {need} {family} prefixes but the datapath holds {capacity}: {fix}")]
    Capacity {
        family: &'static str,
        need: usize,
        capacity: u32,
        fix: &'static str,
    },
}

/// What to do about a policy over the IPv4 or IPv6 capacity.
pub(super) const FIX_V4_CAPACITY: &str =
    "restart the daemon with a larger `ipguard run --ipv4-capacity`";
pub(super) const FIX_V6_CAPACITY: &str =
    "restart the daemon with a larger `ipguard run --ipv6-capacity`";

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn cpus() -> Result<usize> {
    nr_cpus().map_err(|(path, source)| DatapathError::Io {
        what: "cannot count CPUs from",
        path: path.into(),
        source,
    })
}

pub fn ensure_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(DatapathError::NotRoot)
    }
}

/// The pin directory must be on (or be created on) a BPF filesystem.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let mut probe = pin_dir;
    while !probe.exists() {
        probe = match probe.parent() {
            Some(p) => p,
            None => break,
        };
    }
    // f_type is i64 here but narrower or unsigned on other targets.
    #[allow(clippy::unnecessary_cast)]
    let on_bpffs = nix::sys::statfs::statfs(probe)
        .map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if on_bpffs {
        Ok(())
    } else {
        Err(DatapathError::NoBpffs {
            dir: pin_dir.to_path_buf(),
        })
    }
}

/// An address as the maps hold one (`DropEvent`, `PassSample`,
/// `FlowKey`): IPv4 in the first 4 bytes of 16, or IPv6; None for a
/// family the datapath never writes.
pub fn map_addr(family: u8, addr: &[u8; 16]) -> Option<std::net::IpAddr> {
    match family {
        FAMILY_V4 => Some(std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]])),
        FAMILY_V6 => Some(std::net::IpAddr::from(*addr)),
        _ => None,
    }
}

pub fn if_index(iface: &str) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| DatapathError::UnknownInterface(iface.into()))?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(DatapathError::UnknownInterface(iface.into()))
    } else {
        Ok(idx)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub v4: u32,
    pub v6: u32,
    /// Flows of connections the host opened (`--flow-capacity`).
    pub flows: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            v4: DEFAULT_V4_CAPACITY,
            v6: DEFAULT_V6_CAPACITY,
            flows: DEFAULT_FLOW_CAPACITY,
        }
    }
}

#[cfg(test)]
mod tests {
    use ipguard_common::{MAP_LAYOUTS, PRIVATE_MAPS};

    /// The maps both objects declare are those of `MAP_LAYOUTS`, with its
    /// key and value sizes (and the programs' private ones): the kernel
    /// side and the user side agree on every map before any kernel sees
    /// them.
    #[test]
    fn the_objects_declare_the_maps_of_the_shared_table() {
        let product = aya_obj::Object::parse(crate::EBPF_OBJECT).expect("the product object");
        // `.rodata` and the like hold the load-time globals, not maps of
        // the table.
        let declared = |o: &aya_obj::Object| -> Vec<String> {
            o.maps
                .keys()
                .filter(|n| !n.starts_with('.'))
                .cloned()
                .collect()
        };
        let names = declared(&product);
        let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
        names.sort_unstable();
        let mut want: Vec<&str> = MAP_LAYOUTS.iter().map(|m| m.0).collect();
        want.extend(PRIVATE_MAPS);
        want.sort_unstable();
        assert_eq!(names, want, "the product object's maps");
        let bench = aya_obj::Object::parse(crate::EBPF_BENCH_OBJECT).expect("the bench object");
        for (name, object) in [("product", &product), ("bench", &bench)] {
            for (map, m) in object
                .maps
                .iter()
                .filter(|(n, _)| !n.starts_with('.') && !PRIVATE_MAPS.contains(&n.as_str()))
            {
                let Some(&(_, key, value)) = MAP_LAYOUTS.iter().find(|l| l.0 == map) else {
                    panic!("{name} object: map {map} is not in MAP_LAYOUTS");
                };
                assert_eq!(
                    (m.key_size(), m.value_size()),
                    (key, value),
                    "{name} object: map {map}"
                );
            }
        }
        // The bench programs are in the second object only.
        for p in product.programs.keys() {
            assert!(
                !p.starts_with(ipguard_common::PROG_BENCH_PREFIX),
                "{p} ships in the daemon's object"
            );
        }
        for p in [
            ipguard_common::PROG_BENCH_EMPTY,
            ipguard_common::PROG_BENCH_PARSE,
            ipguard_common::PROG_BENCH_LOOKUP,
            ipguard_common::PROG_BENCH_VALUE,
        ] {
            assert!(bench.programs.contains_key(p), "{p} in the bench object");
        }
    }
}
