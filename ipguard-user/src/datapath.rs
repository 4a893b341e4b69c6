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

use crate::{cli::XdpModeArg, policy::CompiledPolicy};

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
    #[error(
        "policy needs {need} {family} prefixes but the datapath holds {capacity}: raise the capacity"
    )]
    Capacity {
        family: &'static str,
        need: usize,
        capacity: u32,
    },
}

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

/// The driver of an interface as `ethtool -i` names it (`veth`, `mlx5_core`,
/// ...), from the SIOCETHTOOL ioctl; None when it cannot be asked. (No
/// well-kept crate offers the ioctl alone: the netlink ethtool crates bring
/// a whole async stack for one string.)
pub fn driver(iface: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    // SAFETY: an all-zero ifreq is valid; the name fits (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just opened and is closed only by this OwnedFd.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL with an ifreq whose data points to a drvinfo
    // that outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL, &mut req) };
    if r != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// What an operator must know about how `action: reject` works on an
/// interface attached in `mode`, if anything.
pub fn reject_note(iface: &str, mode: AttachMode) -> Option<&'static str> {
    (mode == AttachMode::Native && driver(iface).as_deref() == Some("veth")).then_some(
        "native XDP on a veth: RSTs of `action: reject` reach the peer only if it has GRO on or an XDP program (else use --xdp-mode skb)",
    )
}

/// How an interface ended up attached.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Skb,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        }
    }
}

/// The loaded programs plus their pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    /// What the kernel offered at load (and what the program does instead).
    pub kernel: crate::kernel::Kernel,
}

impl Datapath {
    /// Loads the embedded programs; maps already pinned under `pin_dir`
    /// (from an earlier run) are reused with their contents, so enforcement
    /// goes on while a new daemon takes over.
    pub fn load(pin_dir: &Path, caps: Capacities) -> Result<Self> {
        ensure_root()?;
        crate::kernel::check_supported(&crate::kernel::Release::current())?;
        ensure_bpffs(pin_dir)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pin_dir)
            .map_err(|source| DatapathError::Io {
                what: "cannot create the pin directory",
                path: pin_dir.to_path_buf(),
                source,
            })?;
        let ncpu = u32::try_from(cpus()?).unwrap_or(u32::MAX);
        let new_flow_map = replace_flow_map(pin_dir, caps.flows);
        let kernel = crate::kernel::probe();
        let coarse = u32::from(kernel.coarse_clock);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(MAP_V4[0], caps.v4)
            .map_max_entries(MAP_V4[1], caps.v4)
            .map_max_entries(MAP_V6[0], caps.v6)
            .map_max_entries(MAP_V6[1], caps.v6)
            .map_max_entries(MAP_FLOWS, caps.flows.max(1))
            .override_global(GLOBAL_NR_CPUS, &ncpu, true)
            .override_global(GLOBAL_COARSE_CLOCK, &coarse, true)
            .load(crate::EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(format!("{e:#}")))?;
        let xdp: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .ok_or_else(|| DatapathError::Load(format!("no program {PROG_XDP} in the object")))?
            .try_into()
            .map_err(|e| DatapathError::Load(format!("{e}")))?;
        xdp.load()
            .map_err(|e| DatapathError::Load(verifier_excerpt(&e)))?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(PROG_EGRESS)
            .ok_or_else(|| DatapathError::Load(format!("no program {PROG_EGRESS} in the object")))?
            .try_into()
            .map_err(|e| DatapathError::Load(format!("{e}")))?;
        tc.load()
            .map_err(|e| DatapathError::Load(verifier_excerpt(&e)))?;
        let mut maps = Maps::open(pin_dir)?;
        if new_flow_map {
            // The counters behind the eviction figure describe the map
            // that was replaced.
            maps.reset_flow_counters()?;
        }
        Ok(Self { ebpf, maps, kernel })
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        self.xdp_program(PROG_XDP)
    }

    /// An XDP program of the object, loaded on first use: [`PROG_XDP`],
    /// or one of the bench-only programs, to run with aya's `TestRun`.
    pub fn xdp_program(&mut self, name: &str) -> Result<&mut Xdp> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::Load(format!("no program {name} in the object")))?
            .try_into()
            .map_err(|e| DatapathError::Load(format!("{e}")))?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|e| DatapathError::Load(verifier_excerpt(&e)))?;
        }
        Ok(prog)
    }

    /// The TC egress program ([`PROG_EGRESS`]), loaded.
    pub fn egress_program(&mut self) -> Result<&mut SchedClassifier> {
        self.egress()
    }

    fn egress(&mut self) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(PROG_EGRESS)
            .ok_or_else(|| DatapathError::Load(format!("no program {PROG_EGRESS} in the object")))?
            .try_into()
            .map_err(|e| DatapathError::Load(format!("{e}")))
    }

    /// Attaches to `iface`, or takes over the links an earlier run pinned
    /// there (an atomic program replacement: no packet goes unjudged).
    /// Attaches the egress recorder of return traffic beside it. Returns the
    /// XDP mode and whether an existing link was adopted. A link does not
    /// say its mode: `recorded` is what the previous run wrote in the
    /// state directory, reported for an adopted link (native if unknown).
    pub fn attach(
        &mut self,
        iface: &str,
        mode: XdpModeArg,
        recorded: Option<AttachMode>,
    ) -> Result<(AttachMode, bool)> {
        let r = self.attach_xdp(iface, mode, recorded)?;
        self.attach_egress(iface)?;
        Ok(r)
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpModeArg,
        recorded: Option<AttachMode>,
    ) -> Result<(AttachMode, bool)> {
        let idx = if_index(iface)?;
        let pin = self.maps.pin_dir.join(format!("link_{iface}"));
        if pin.exists() {
            let adopted = PinnedLink::from_pin(&pin)
                .ok()
                .map(FdLink::from)
                .and_then(|l| XdpLink::try_from(l).ok());
            if let Some(link) = adopted {
                let prog = self.program()?;
                match prog.attach_to_link(link) {
                    Ok(_) => return Ok((recorded.unwrap_or(AttachMode::Native), true)),
                    Err(e) => {
                        tracing::warn!(%iface, "cannot adopt the pinned link ({e}); attaching anew")
                    }
                }
            }
            // A stale pin (its interface was deleted and recreated, say).
            let _ = std::fs::remove_file(&pin);
        }
        let attempts: &[(XdpMode, AttachMode, &str)] = match mode {
            XdpModeArg::Native => &[(XdpMode::Driver, AttachMode::Native, "native")],
            XdpModeArg::Skb => &[(XdpMode::Skb, AttachMode::Skb, "skb")],
            XdpModeArg::Auto => &[
                (XdpMode::Driver, AttachMode::Native, "native"),
                (XdpMode::Skb, AttachMode::Skb, "skb"),
            ],
        };
        let mut last = None;
        for (i, (flags, am, name)) in attempts.iter().enumerate() {
            let prog = self.program()?;
            match prog.attach_to_if_index(idx, *flags) {
                Ok(id) => {
                    if i > 0 {
                        tracing::warn!(%iface, "the driver has no native XDP; attached in generic (skb) mode, which is slower");
                    }
                    let link = prog.take_link(id).map_err(|source| DatapathError::Attach {
                        iface: iface.into(),
                        mode: name,
                        source,
                    })?;
                    let fd: FdLink = link.try_into().map_err(|e| DatapathError::Load(format!(
                        "the kernel attached {iface} without a BPF link ({e}); ipguard needs Linux 5.9 or newer"
                    )))?;
                    fd.pin(&pin).map_err(|source| DatapathError::Pin {
                        what: format!("the link of {iface}"),
                        path: pin.clone(),
                        source,
                    })?;
                    return Ok((*am, false));
                }
                Err(e) => {
                    if is_busy(&e) {
                        return Err(DatapathError::Occupied {
                            iface: iface.into(),
                        });
                    }
                    last = Some(DatapathError::Attach {
                        iface: iface.into(),
                        mode: name,
                        source: e,
                    });
                }
            }
        }
        Err(last.unwrap_or(DatapathError::UnknownInterface(iface.into())))
    }

    /// The egress recorder goes first in the interface's TCX chain (it only
    /// observes and hands every packet on), pinned like the XDP link so a
    /// restart replaces it atomically. Kernels before 6.6 have no TCX: there
    /// it becomes a clsact filter, which outlives the process by itself.
    fn attach_egress(&mut self, iface: &str) -> Result<()> {
        let pin = tc_link_pin(&self.maps.pin_dir, iface);
        if pin.exists() {
            let adopted = PinnedLink::from_pin(&pin)
                .ok()
                .map(FdLink::from)
                .and_then(|l| SchedClassifierLink::try_from(l).ok());
            if let Some(link) = adopted {
                match self.egress()?.attach_to_link(link) {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        tracing::warn!(%iface, "cannot adopt the pinned egress link ({e}); attaching anew")
                    }
                }
            }
            let _ = std::fs::remove_file(&pin);
        }
        let prog = self.egress()?;
        let tcx = prog.attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        );
        match tcx {
            Ok(id) => {
                let link = prog.take_link(id).map_err(|source| DatapathError::Attach {
                    iface: iface.into(),
                    mode: "tc egress",
                    source,
                })?;
                let fd: FdLink = link.try_into().map_err(|e| {
                    DatapathError::Load(format!(
                        "the egress link of {iface} is not a BPF link ({e})"
                    ))
                })?;
                fd.pin(&pin).map_err(|source| DatapathError::Pin {
                    what: format!("the egress link of {iface}"),
                    path: pin.clone(),
                    source,
                })?;
                Ok(())
            }
            Err(tcx_err) => {
                tracing::info!(%iface, "no TCX ({tcx_err}); recording return traffic with a clsact filter");
                // An existing clsact qdisc is fine.
                let _ = aya::programs::tc::qdisc_add_clsact(iface);
                let _ = aya::programs::tc::qdisc_detach_program(
                    iface,
                    TcAttachType::Egress,
                    PROG_EGRESS,
                );
                let id = prog
                    .attach_with_options(
                        iface,
                        TcAttachType::Egress,
                        TcAttachOptions::Netlink(NlOptions::default()),
                    )
                    .map_err(|source| DatapathError::Attach {
                        iface: iface.into(),
                        mode: "tc egress",
                        source,
                    })?;
                let link = prog.take_link(id).map_err(|source| DatapathError::Attach {
                    iface: iface.into(),
                    mode: "tc egress",
                    source,
                })?;
                // A netlink filter stays in the kernel until removed (by
                // `unload`); dropping the handle would remove it now.
                std::mem::forget(link);
                Ok(())
            }
        }
    }
}

fn tc_link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("tclink_{iface}"))
}

fn is_busy(e: &aya::programs::ProgramError) -> bool {
    use std::error::Error;
    let mut cur: Option<&dyn Error> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EBUSY)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The verifier's log is long; its last lines say what went wrong.
fn verifier_excerpt(e: &aya::programs::ProgramError) -> String {
    let text = format!("{e:#}");
    // The whole log is what a developer needs to fix the program; the
    // operator's one line is its end.
    tracing::debug!("verifier log:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines.len().saturating_sub(8);
    lines[tail..].join(" | ")
}

/// The interfaces with a pinned ipguard link.
pub fn pinned_links(pin_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(pin_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link_") {
                out.push(iface.to_string());
            }
        }
    }
    out.sort();
    out
}

/// Whether anything of ipguard is pinned under `pin_dir`: a link, or the
/// maps of a policy.
pub fn is_loaded(pin_dir: &Path) -> bool {
    !pinned_links(pin_dir).is_empty() || pin_dir.join(MAP_ACTIVE).exists()
}

/// Detaches from `iface` (or every interface) and, when nothing stays
/// attached, removes every pinned object.
pub fn unload(pin_dir: &Path, ifaces: &[String]) -> Result<Vec<String>> {
    ensure_root()?;
    if !is_loaded(pin_dir) {
        return Err(DatapathError::NotLoaded(pin_dir.to_path_buf()));
    }
    let all = pinned_links(pin_dir);
    let mut detached = Vec::new();
    for iface in &all {
        if !ifaces.is_empty() && !ifaces.contains(iface) {
            continue;
        }
        // Detached at once, then unpinned; where the kernel cannot detach
        // a link explicitly, dropping its last reference does it later.
        let xdp_pin = pin_dir.join(format!("link_{iface}"));
        if let Err(e) = batch::detach_pinned_link(&xdp_pin) {
            tracing::debug!(%iface, "BPF_LINK_DETACH: {e}; the link goes with its pin");
        }
        let _ = std::fs::remove_file(&xdp_pin);
        let tc_pin = tc_link_pin(pin_dir, iface);
        if tc_pin.exists() {
            if let Err(e) = batch::detach_pinned_link(&tc_pin) {
                tracing::debug!(%iface, "BPF_LINK_DETACH: {e}; the egress link goes with its pin");
            }
            let _ = std::fs::remove_file(&tc_pin);
        } else {
            // No TCX link: the clsact filter of kernels before 6.6.
            let _ =
                aya::programs::tc::qdisc_detach_program(iface, TcAttachType::Egress, PROG_EGRESS);
        }
        detached.push(iface.clone());
    }
    if pinned_links(pin_dir).is_empty() {
        if let Ok(rd) = std::fs::read_dir(pin_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        std::fs::remove_dir(pin_dir).map_err(|source| DatapathError::Io {
            what: "cannot remove",
            path: pin_dir.to_path_buf(),
            source,
        })?;
    }
    Ok(detached)
}

/// The pinned maps, opened by path: used by the daemon and by `status`
/// when no daemon runs.
pub struct Maps {
    pub pin_dir: PathBuf,
    v4: [LpmTrie<MapData, [u8; 4], PrefixValue>; 2],
    v6: [LpmTrie<MapData, [u8; 16], PrefixValue>; 2],
    dec_v4: [LpmTrie<MapData, [u8; 5], u32>; 2],
    dec_v6: [LpmTrie<MapData, [u8; 17], u32>; 2],
    ports: Array<MapData, u8>,
    config: Array<MapData, PolicyConfig>,
    active: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    svc_counters: PerCpuArray<MapData, u64>,
    entry_hits: PerCpuArray<MapData, u64>,
    flows: aya::maps::HashMap<MapData, FlowKey, u64>,
    dhcp: LpmTrie<MapData, [u8; 18], u8>,
    /// What this process last wrote into each slot.
    shadow: [Option<Shadow>; 2],
    /// Batched map writes (`BPF_MAP_*_BATCH`); false writes one element
    /// per syscall (kept to measure the difference, and as a fallback).
    batch: bool,
}

fn open_map(pin_dir: &Path, name: &'static str) -> Result<Map> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DatapathError::NotLoaded(pin_dir.to_path_buf()));
    }
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {{
        let name: &'static str = $name;
        open_map($dir, name)?.try_into().map_err(map_err(name))?
    }};
}

/// This network namespace's ephemeral port range
/// (`net.ipv4.ip_local_port_range`, which IPv6 uses too), read at every
/// apply so a changed range takes effect with the next policy. Linux's
/// default when the file cannot be read.
pub fn ephemeral_ports() -> (u16, u16) {
    const LINUX_DEFAULT: (u16, u16) = (32_768, 60_999);
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return LINUX_DEFAULT;
    };
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) if a <= b => (a, b),
        _ => LINUX_DEFAULT,
    }
}

/// Per-slot numbers written by the last apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyStats {
    pub slot: u32,
    pub generation: u64,
    pub v4: usize,
    pub v6: usize,
    /// Prefixes removed from the slot (the policy before last had them).
    pub removed: usize,
    /// Prefixes written (new, or with a changed value).
    pub written: usize,
}

/// An LPM key in the kernel's layout (`struct bpf_lpm_trie_key_u8`), sorted
/// by address then prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TrieKey<const N: usize> {
    addr: [u8; N],
    len: u32,
}

impl<const N: usize> TrieKey<N> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.len.to_ne_bytes());
        out.extend_from_slice(&self.addr);
    }

    fn read(b: &[u8]) -> Self {
        let mut addr = [0u8; N];
        addr.copy_from_slice(&b[4..4 + N]);
        Self {
            addr,
            len: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        }
    }
}

fn value_bytes(v: &PrefixValue, out: &mut Vec<u8>) {
    out.extend_from_slice(&v.allow_mask.to_ne_bytes());
    out.extend_from_slice(&v.flags.to_ne_bytes());
    out.extend_from_slice(&v.entry.to_ne_bytes());
}

fn value_read(b: &[u8]) -> PrefixValue {
    let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[..8]);
    PrefixValue {
        allow_mask: u64::from_ne_bytes(m),
        flags: u32_at(8),
        entry: u32_at(12),
    }
}

/// A slot's contents as this process last wrote (or read) them, valid while
/// the slot's config still carries `generation` (generations only grow, so
/// any other writer would have changed it).
struct Shadow {
    generation: u64,
    v4: Vec<(TrieKey<4>, PrefixValue)>,
    v6: Vec<(TrieKey<16>, PrefixValue)>,
    ports: Vec<u8>,
}

impl Maps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            v4: [typed!(pin_dir, MAP_V4[0]), typed!(pin_dir, MAP_V4[1])],
            v6: [typed!(pin_dir, MAP_V6[0]), typed!(pin_dir, MAP_V6[1])],
            dec_v4: [
                typed!(pin_dir, MAP_DECIDERS_V4[0]),
                typed!(pin_dir, MAP_DECIDERS_V4[1]),
            ],
            dec_v6: [
                typed!(pin_dir, MAP_DECIDERS_V6[0]),
                typed!(pin_dir, MAP_DECIDERS_V6[1]),
            ],
            ports: typed!(pin_dir, MAP_PORTS),
            config: typed!(pin_dir, MAP_CONFIG),
            active: typed!(pin_dir, MAP_ACTIVE),
            counters: typed!(pin_dir, MAP_COUNTERS),
            svc_counters: typed!(pin_dir, MAP_SERVICE_COUNTERS),
            entry_hits: typed!(pin_dir, MAP_ENTRY_HITS),
            flows: typed!(pin_dir, MAP_FLOWS),
            dhcp: typed!(pin_dir, MAP_DHCP_SERVERS),
            shadow: [None, None],
            batch: true,
        })
    }

    /// Chooses batched (default) or per-element map writes.
    pub fn set_batch_writes(&mut self, on: bool) {
        self.batch = on;
    }

    pub fn active_slot(&self) -> Result<u32> {
        Ok(self.active.get(&0, 0).map_err(map_err(MAP_ACTIVE))? & 1)
    }

    pub fn config(&self, slot: u32) -> Result<PolicyConfig> {
        self.config.get(&slot, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Writes `policy` into the inactive slot, then makes it live with one
    /// write of the active index.
    ///
    /// The inactive slot was live until the previous apply; before touching
    /// it, [`wait_for_readers`] waits for an RCU grace period, after which
    /// no XDP or TC run that read the old index is still going (both run
    /// inside RCU read-side sections). Only the difference to what the slot
    /// held is written, so the multi-million-entry trie is never freed nor
    /// rebuilt: removed prefixes are deleted one by one, kept ones updated
    /// in place.
    pub fn apply(
        &mut self,
        policy: &CompiledPolicy,
        caps: Option<Capacities>,
    ) -> Result<ApplyStats> {
        if let Some(caps) = caps {
            if policy.v4.len() > caps.v4 as usize {
                return Err(DatapathError::Capacity {
                    family: "IPv4",
                    need: policy.v4.len(),
                    capacity: caps.v4,
                });
            }
            if policy.v6.len() > caps.v6 as usize {
                return Err(DatapathError::Capacity {
                    family: "IPv6",
                    need: policy.v6.len(),
                    capacity: caps.v6,
                });
            }
        }
        let active = self.active_slot()?;
        let slot = 1 - active;
        let s = slot as usize;
        wait_for_readers();
        let generation = self
            .config(active)?
            .generation
            .max(self.config(slot)?.generation)
            + 1;

        let mut v4: Vec<(TrieKey<4>, PrefixValue)> = policy
            .v4
            .iter()
            .map(|(n, v)| {
                (
                    TrieKey {
                        addr: n.trunc().network().octets(),
                        len: n.prefix_len() as u32,
                    },
                    *v,
                )
            })
            .collect();
        let mut v6: Vec<(TrieKey<16>, PrefixValue)> = policy
            .v6
            .iter()
            .map(|(n, v)| {
                (
                    TrieKey {
                        addr: n.trunc().network().octets(),
                        len: n.prefix_len() as u32,
                    },
                    *v,
                )
            })
            .collect();
        // The compiler promises sorted, unique prefixes; the diff below
        // relies on it, so make sure (cheap on sorted input).
        v4.sort_by_key(|e| e.0);
        v4.dedup_by_key(|e| e.0);
        v6.sort_by_key(|e| e.0);
        v6.dedup_by_key(|e| e.0);
        let mut ports = vec![0u8; PORT_SLOT_STRIDE as usize];
        for r in &policy.ports {
            let base = (r.proto.table_index() * 65_536) as usize;
            for p in r.first..=r.last {
                ports[base + p as usize] = r.service;
            }
        }

        let old = match self.shadow[s].take() {
            Some(sh) if sh.generation == self.config(slot)?.generation => sh,
            _ => self.read_slot(slot)?,
        };
        // Until the config carries the new generation the slot's contents
        // are unknown to the shadow (an error below leaves it None).
        let (removed4, written4) = self.sync_trie(slot, true, &old.v4, &v4)?;
        let (removed6, written6) = self.sync_trie(slot, false, &old.v6, &v6)?;
        self.sync_ports(slot, &old.ports, &ports)?;
        let dec4: Vec<(TrieKey<5>, u32)> = policy
            .deciders_v4
            .iter()
            .map(|(list, n, e)| {
                let mut addr = [0u8; 5];
                addr[0] = *list;
                addr[1..].copy_from_slice(&n.trunc().network().octets());
                (
                    TrieKey {
                        addr,
                        len: 8 + u32::from(n.prefix_len()),
                    },
                    *e,
                )
            })
            .collect();
        let dec6: Vec<(TrieKey<17>, u32)> = policy
            .deciders_v6
            .iter()
            .map(|(list, n, e)| {
                let mut addr = [0u8; 17];
                addr[0] = *list;
                addr[1..].copy_from_slice(&n.trunc().network().octets());
                (
                    TrieKey {
                        addr,
                        len: 8 + u32::from(n.prefix_len()),
                    },
                    *e,
                )
            })
            .collect();
        let names = (MAP_DECIDERS_V4[s], MAP_DECIDERS_V6[s]);
        self.replace_deciders(&self.dec_v4[s], names.0, &dec4)?;
        self.replace_deciders(&self.dec_v6[s], names.1, &dec6)?;
        self.reset_entry_hits(slot, policy.entries.len())?;
        let dhcp_servers = self.write_dhcp_servers(slot, &policy.dhcp_servers)?;
        let mut cfg = policy.config;
        cfg.generation = generation;
        (cfg.ephemeral_first, cfg.ephemeral_last) = ephemeral_ports();
        cfg.dhcp_servers = dhcp_servers;
        self.config.set(slot, cfg, 0).map_err(map_err(MAP_CONFIG))?;
        // x86 keeps stores in order, so a reader that sees the new index
        // sees the slot written before it. Weaker memory models get an
        // explicit full barrier on every CPU first.
        if !cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
            wait_for_readers();
        }
        // The switch: from here on every packet reads the new slot.
        self.active.set(0, slot, 0).map_err(map_err(MAP_ACTIVE))?;
        let stats = ApplyStats {
            slot,
            generation,
            v4: v4.len(),
            v6: v6.len(),
            removed: removed4 + removed6,
            written: written4 + written6,
        };
        self.shadow[s] = Some(Shadow {
            generation,
            v4,
            v6,
            ports,
        });
        Ok(stats)
    }

    /// Reads what a slot holds (a daemon taking over, or another writer).
    fn read_slot(&self, slot: u32) -> Result<Shadow> {
        let s = slot as usize;
        let v4 = read_trie::<4>(&self.v4[s], MAP_V4[s])?;
        let v6 = read_trie::<16>(&self.v6[s], MAP_V6[s])?;
        let all = dump(self.ports.map(), MAP_PORTS, 4, 1)?;
        let mut ports = vec![0u8; PORT_SLOT_STRIDE as usize];
        let base = slot * PORT_SLOT_STRIDE;
        for (k, v) in all.0.chunks_exact(4).zip(all.1) {
            let k = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
            if (base..base + PORT_SLOT_STRIDE).contains(&k) {
                ports[(k - base) as usize] = v;
            }
        }
        Ok(Shadow {
            generation: self.config(slot)?.generation,
            v4,
            v6,
            ports,
        })
    }

    /// Makes the slot's trie hold exactly `want`, given that it holds
    /// `have`: deletes first (so the trie never needs more room than the
    /// larger of the two), then writes new and changed prefixes.
    fn sync_trie<const N: usize>(
        &mut self,
        slot: u32,
        v4: bool,
        have: &[(TrieKey<N>, PrefixValue)],
        want: &[(TrieKey<N>, PrefixValue)],
    ) -> Result<(usize, usize)> {
        let s = slot as usize;
        let (name, data) = if v4 {
            (MAP_V4[s], self.v4[s].map())
        } else {
            (MAP_V6[s], self.v6[s].map())
        };
        let (mut stale, mut fresh) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < have.len() || j < want.len() {
            match (have.get(i), want.get(j)) {
                (Some(h), Some(w)) if h.0 == w.0 => {
                    if h.1 != w.1 {
                        fresh.push(*w);
                    }
                    i += 1;
                    j += 1;
                }
                (Some(h), Some(w)) if h.0 < w.0 => {
                    stale.push(h.0);
                    i += 1;
                }
                (Some(h), None) => {
                    stale.push(h.0);
                    i += 1;
                }
                (_, Some(w)) => {
                    fresh.push(*w);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        let key_size = 4 + N;
        let mut keys = Vec::with_capacity(stale.len().max(fresh.len()) * key_size);
        for k in &stale {
            k.write(&mut keys);
        }
        self.delete(data, name, &keys, key_size)?;
        keys.clear();
        let mut values = Vec::with_capacity(fresh.len() * 16);
        for (k, v) in &fresh {
            k.write(&mut keys);
            value_bytes(v, &mut values);
        }
        self.update(data, name, &keys, key_size, &values, 16)?;
        Ok((stale.len(), fresh.len()))
    }

    /// Makes a slot's deciders trie hold exactly `want`. The trie is small
    /// (at most `DECIDERS_*_CAPACITY`) and the slot inactive, so it is
    /// emptied and written again rather than diffed.
    fn replace_deciders<const N: usize>(
        &self,
        trie: &LpmTrie<MapData, [u8; N], u32>,
        name: &'static str,
        want: &[(TrieKey<N>, u32)],
    ) -> Result<()>
    where
        [u8; N]: aya::Pod,
    {
        let key_size = 4 + N;
        let mut keys = Vec::new();
        for k in trie.keys() {
            let k: Key<[u8; N]> = k.map_err(map_err(name))?;
            TrieKey {
                addr: k.data(),
                len: k.prefix_len(),
            }
            .write(&mut keys);
        }
        self.delete(trie.map(), name, &keys, key_size)?;
        keys.clear();
        let mut values = Vec::with_capacity(want.len() * 4);
        for (k, v) in want {
            k.write(&mut keys);
            values.extend_from_slice(&v.to_ne_bytes());
        }
        self.update(trie.map(), name, &keys, key_size, &values, 4)
    }

    fn sync_ports(&mut self, slot: u32, have: &[u8], want: &[u8]) -> Result<()> {
        let base = slot * PORT_SLOT_STRIDE;
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for (i, (h, w)) in have.iter().zip(want).enumerate() {
            if h != w {
                keys.extend_from_slice(&(base + i as u32).to_ne_bytes());
                values.push(*w);
            }
        }
        self.update(self.ports.map(), MAP_PORTS, &keys, 4, &values, 1)
    }

    /// Zeroes the hit counters of the first `entries` entries of `slot`
    /// (left from the policy before last).
    fn reset_entry_hits(&mut self, slot: u32, entries: usize) -> Result<()> {
        let ncpu = cpus()?;
        let n = entries.min(ENTRY_CAPACITY as usize) as u32;
        let mut keys = Vec::with_capacity(n as usize * 4);
        for i in 0..n {
            keys.extend_from_slice(&(slot * ENTRY_CAPACITY + i).to_ne_bytes());
        }
        let values = vec![0u8; n as usize * 8 * ncpu];
        self.update(
            self.entry_hits.map(),
            MAP_ENTRY_HITS,
            &keys,
            4,
            &values,
            8 * ncpu,
        )
    }

    fn update(
        &self,
        map: &MapData,
        name: &'static str,
        keys: &[u8],
        key_size: usize,
        values: &[u8],
        value_size: usize,
    ) -> Result<()> {
        let n = keys.len() / key_size;
        if n == 0 {
            return Ok(());
        }
        let fd = map.fd().as_fd().as_raw_fd();
        if self.batch {
            match batch::update(fd, keys, key_size, values, value_size) {
                Ok(()) => return Ok(()),
                Err(e) if batch::unsupported(&e) => {}
                Err(source) => {
                    return Err(DatapathError::MapIo {
                        name,
                        op: "BPF_MAP_UPDATE_BATCH",
                        source,
                    });
                }
            }
        }
        for i in 0..n {
            batch::update_one(
                fd,
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            )
            .map_err(|source| DatapathError::MapIo {
                name,
                op: "BPF_MAP_UPDATE_ELEM",
                source,
            })?;
        }
        Ok(())
    }

    fn delete(
        &self,
        map: &MapData,
        name: &'static str,
        keys: &[u8],
        key_size: usize,
    ) -> Result<()> {
        let n = keys.len() / key_size;
        if n == 0 {
            return Ok(());
        }
        let fd = map.fd().as_fd().as_raw_fd();
        if self.batch {
            match batch::delete(fd, keys, key_size) {
                Ok(()) => return Ok(()),
                Err(e) if batch::unsupported(&e) => {}
                Err(source) => {
                    return Err(DatapathError::MapIo {
                        name,
                        op: "BPF_MAP_DELETE_BATCH",
                        source,
                    });
                }
            }
        }
        for i in 0..n {
            match batch::delete_one(fd, &keys[i * key_size..(i + 1) * key_size]) {
                Ok(()) => {}
                // Already gone: the goal is reached.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(DatapathError::MapIo {
                        name,
                        op: "BPF_MAP_DELETE_ELEM",
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Sum over CPUs of one counter.
    fn sum(map: &PerCpuArray<MapData, u64>, name: &'static str, index: u32) -> Result<u64> {
        Ok(map.get(&index, 0).map_err(map_err(name))?.iter().sum())
    }

    /// The verdict x reason matrix and the event counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..COUNTER_LEN)
            .map(|i| Self::sum(&self.counters, MAP_COUNTERS, i))
            .collect()
    }

    /// (passed, refused) per service index 0..=63 (0: no service).
    pub fn service_counters(&self) -> Result<Vec<(u64, u64)>> {
        (0..=MAX_SERVICES as u32)
            .map(|s| {
                Ok((
                    Self::sum(&self.svc_counters, MAP_SERVICE_COUNTERS, s * 2)?,
                    Self::sum(&self.svc_counters, MAP_SERVICE_COUNTERS, s * 2 + 1)?,
                ))
            })
            .collect()
    }

    /// Hits of the first `n` entries of `slot`.
    pub fn entry_hits(&self, slot: u32, n: usize) -> Result<Vec<u64>> {
        (0..n.min(ENTRY_CAPACITY as usize) as u32)
            .map(|i| Self::sum(&self.entry_hits, MAP_ENTRY_HITS, slot * ENTRY_CAPACITY + i))
            .collect()
    }

    /// Number of prefixes in a slot's tries (walks them).
    pub fn prefix_counts(&self, slot: u32) -> (usize, usize) {
        (
            self.v4[slot as usize].keys().count(),
            self.v6[slot as usize].keys().count(),
        )
    }

    pub fn capacities(&self) -> Capacities {
        Capacities {
            v4: self.v4[0]
                .map()
                .info()
                .map(|i| i.max_entries())
                .unwrap_or(0),
            v6: self.v6[0]
                .map()
                .info()
                .map(|i| i.max_entries())
                .unwrap_or(0),
            flows: self
                .flows
                .map()
                .info()
                .map(|i| i.max_entries())
                .unwrap_or(0),
        }
    }

    /// Replaces a slot's DHCP servers; returns how many it wrote.
    fn write_dhcp_servers(&mut self, slot: u32, servers: &[ipnet::IpNet]) -> Result<u32> {
        if servers.len() > MAX_DHCP_SERVERS as usize {
            return Err(DatapathError::Capacity {
                family: "DHCP server",
                need: servers.len(),
                capacity: MAX_DHCP_SERVERS,
            });
        }
        let old: Vec<Key<[u8; 18]>> = self
            .dhcp
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.data()[0] == slot as u8)
            .collect();
        for k in old {
            match self.dhcp.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_DHCP_SERVERS)(e)),
            }
        }
        for n in servers {
            let (family, addr) = match n {
                ipnet::IpNet::V4(n) => {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&n.network().octets());
                    (FAMILY_V4, a)
                }
                ipnet::IpNet::V6(n) => (FAMILY_V6, n.network().octets()),
            };
            let key = Key::new(
                DHCP_KEY_BITS + u32::from(n.prefix_len()),
                dhcp_key(slot, family, &addr),
            );
            self.dhcp
                .insert(&key, 1, 0)
                .map_err(map_err(MAP_DHCP_SERVERS))?;
        }
        Ok(servers.len() as u32)
    }

    /// Every flow in the map (the key; see [`FlowKey`]).
    pub fn flows(&self) -> Result<Vec<(FlowKey, u64)>> {
        const KEY: usize = std::mem::size_of::<FlowKey>();
        match dump(self.flows.map(), MAP_FLOWS, KEY, 8) {
            Ok((keys, values)) => Ok(keys
                .chunks_exact(KEY)
                .zip(values.chunks_exact(8))
                .map(|(k, v)| {
                    // SAFETY: FlowKey is Pod (integers only, no padding),
                    // and `k` holds exactly its size.
                    let key = unsafe { std::ptr::read_unaligned(k.as_ptr().cast::<FlowKey>()) };
                    let mut t = [0u8; 8];
                    t.copy_from_slice(v);
                    (key, u64::from_ne_bytes(t))
                })
                .collect()),
            // Kernels without batched lookups, or a hash bucket larger
            // than a batch (ENOSPC): walk the keys.
            Err(_) => self
                .flows
                .iter()
                .filter_map(|r| match r {
                    Ok(kv) => Some(Ok(kv)),
                    // Evicted between the key and its value.
                    Err(aya::maps::MapError::KeyNotFound) => None,
                    Err(e) => Some(Err(DatapathError::Map {
                        name: MAP_FLOWS,
                        source: e,
                    })),
                })
                .collect(),
        }
    }

    /// Capacity, live entries and the counts behind evictions.
    pub fn flow_stats(&self) -> Result<FlowStats> {
        let live = self.flows()?.len() as u64;
        let created = Self::sum(&self.counters, MAP_COUNTERS, COUNTER_FLOWS_CREATED)?;
        let deleted = Self::sum(&self.counters, MAP_COUNTERS, COUNTER_FLOWS_DELETED)?;
        Ok(FlowStats {
            capacity: self.capacities().flows,
            live,
            created,
            deleted,
            not_recorded: Self::sum(&self.counters, MAP_COUNTERS, COUNTER_FLOWS_NOT_RECORDED)?,
            evicted: created.saturating_sub(deleted).saturating_sub(live),
        })
    }

    /// Deletes the flows `doomed` picks; returns how many it deleted (a
    /// flow evicted meanwhile is not counted) and adds them to
    /// [`COUNTER_FLOWS_DELETED`].
    pub fn delete_flows(&mut self, mut doomed: impl FnMut(&FlowKey) -> bool) -> Result<u64> {
        let fd = self.flows.map().fd().as_fd().as_raw_fd();
        let mut n = 0u64;
        for (key, _) in self.flows()? {
            if !doomed(&key) {
                continue;
            }
            // SAFETY: FlowKey is Pod: its bytes are its whole value.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&key as *const FlowKey).cast::<u8>(),
                    std::mem::size_of::<FlowKey>(),
                )
            };
            match batch::delete_one(fd, bytes) {
                Ok(()) => n += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(DatapathError::MapIo {
                        name: MAP_FLOWS,
                        op: "BPF_MAP_DELETE_ELEM",
                        source,
                    });
                }
            }
        }
        if n > 0 {
            self.add_user_counter(COUNTER_FLOWS_DELETED, n)?;
        }
        Ok(n)
    }

    /// Adds to a counter only user space writes, kept in CPU 0's slot.
    fn add_user_counter(&mut self, index: u32, n: u64) -> Result<()> {
        let mut values = self
            .counters
            .get(&index, 0)
            .map_err(map_err(MAP_COUNTERS))?;
        let mut all: Vec<u64> = values.iter().copied().collect();
        if let Some(first) = all.first_mut() {
            *first = first.saturating_add(n);
        }
        values = aya::maps::PerCpuValues::try_from(all).map_err(|source| DatapathError::MapIo {
            name: MAP_COUNTERS,
            op: "per-CPU values",
            source,
        })?;
        self.counters
            .set(index, values, 0)
            .map_err(map_err(MAP_COUNTERS))
    }

    fn reset_flow_counters(&mut self) -> Result<()> {
        let n = cpus()?;
        for index in [
            COUNTER_FLOWS_CREATED,
            COUNTER_FLOWS_DELETED,
            COUNTER_FLOWS_NOT_RECORDED,
        ] {
            let zero = aya::maps::PerCpuValues::try_from(vec![0u64; n]).map_err(|source| {
                DatapathError::MapIo {
                    name: MAP_COUNTERS,
                    op: "per-CPU values",
                    source,
                }
            })?;
            self.counters
                .set(index, zero, 0)
                .map_err(map_err(MAP_COUNTERS))?;
        }
        Ok(())
    }
}

/// The flow table in numbers. `evicted` is exact: every flow that left the
/// map without the daemon deleting it was evicted by a newer one (LRU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowStats {
    pub capacity: u32,
    pub live: u64,
    pub created: u64,
    pub deleted: u64,
    pub evicted: u64,
    /// Flows the kernel found no free element for.
    pub not_recorded: u64,
}

/// Removes the pinned flow map when its size is not `capacity`, so the load
/// creates one of the size asked for (the programs attached until the new
/// ones replace them keep the old map alive). Connections the host opened
/// get their entries back from their next outgoing segment. Returns
/// whether the map will be new.
fn replace_flow_map(pin_dir: &Path, capacity: u32) -> bool {
    let path = pin_dir.join(MAP_FLOWS);
    if !path.exists() {
        return true;
    }
    let size = MapData::from_pin(&path)
        .ok()
        .and_then(|m| m.info().ok())
        .map(|i| i.max_entries());
    if size == Some(capacity.max(1)) {
        return false;
    }
    tracing::info!(
        old = size,
        new = capacity,
        "the flow table changes size: a new one replaces it"
    );
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!("cannot remove {}: {e}", path.display());
        return false;
    }
    true
}

/// Waits until every XDP and TC program run that may have read the slot
/// index before now has finished: membarrier(MEMBARRIER_CMD_GLOBAL) is
/// synchronize_rcu() from user space, and BPF programs attached to network
/// hooks run inside RCU read-side sections. About one grace period (a few
/// milliseconds), paid once per policy swap.
pub fn wait_for_readers() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integer arguments and touches no memory
    // of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_GLOBAL,
            0 as libc::c_long,
        )
    };
    if r != 0 {
        thread::sleep(SLOT_GRACE);
    }
}

/// Every key and value of a map, as raw bytes.
fn dump(
    map: &MapData,
    name: &'static str,
    key_size: usize,
    value_size: usize,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let fd = map.fd().as_fd().as_raw_fd();
    batch::lookup_all(fd, key_size, value_size).map_err(|source| DatapathError::MapIo {
        name,
        op: "BPF_MAP_LOOKUP_BATCH",
        source,
    })
}

fn read_trie<const N: usize>(
    trie: &LpmTrie<MapData, [u8; N], PrefixValue>,
    name: &'static str,
) -> Result<Vec<(TrieKey<N>, PrefixValue)>>
where
    [u8; N]: aya::Pod,
{
    let key_size = 4 + N;
    let mut out: Vec<(TrieKey<N>, PrefixValue)> = match dump(trie.map(), name, key_size, 16) {
        Ok((keys, values)) => keys
            .chunks_exact(key_size)
            .zip(values.chunks_exact(16))
            .map(|(k, v)| (TrieKey::read(k), value_read(v)))
            .collect(),
        // Kernels without batched lookups on LPM tries: walk the keys.
        Err(DatapathError::MapIo { source, .. }) if batch::unsupported(&source) => {
            let mut out = Vec::new();
            for k in trie.keys() {
                let k: Key<[u8; N]> = k.map_err(map_err(name))?;
                let v = trie.get(&k, 0).map_err(map_err(name))?;
                out.push((
                    TrieKey {
                        addr: k.data(),
                        len: k.prefix_len(),
                    },
                    v,
                ));
            }
            out
        }
        Err(e) => return Err(e),
    };
    out.sort_by_key(|e| e.0);
    Ok(out)
}

/// The bpf(2) commands aya 0.14 does not wrap: the batched map commands,
/// and BPF_LINK_DETACH.
mod batch {
    use std::{io, os::fd::RawFd};

    use super::BATCH;

    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
    /// The kernel's ENOTSUPP, which it leaks to user space for map types
    /// without a batch operation.
    const ENOTSUPP: i32 = 524;

    /// `union bpf_attr`'s `batch` member.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    /// `union bpf_attr`'s element member (lookup, update, delete).
    #[repr(C)]
    #[derive(Default)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
        sys_bpf(cmd, attr).map(|_| ())
    }

    /// bpf(2) itself: its non-negative result (an fd for the commands that
    /// make one).
    fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a properly laid out, live bpf_attr member of
        // the size passed; the kernel reads the user buffers it points to,
        // which the callers keep alive and sized for `count` elements.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                size_of::<T>() as libc::c_long,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;

    /// `union bpf_attr`'s object member (pin, get).
    #[repr(C)]
    #[derive(Default)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    /// `union bpf_attr`'s link_detach member (padded to 8 bytes).
    #[repr(C)]
    #[derive(Default)]
    struct LinkDetachAttr {
        link_fd: u32,
        _pad: u32,
    }

    /// Detaches the link pinned at `path` now, whoever else holds it: an
    /// unpinned link is only released after an RCU grace period and a work
    /// item, so the program would go on judging packets for a while after
    /// `unload` returned (long enough to see on a slow machine).
    pub fn detach_pinned_link(path: &std::path::Path) -> io::Result<()> {
        use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut get = ObjAttr {
            pathname: c.as_ptr() as u64,
            ..Default::default()
        };
        // The path outlives the call.
        let fd = sys_bpf(BPF_OBJ_GET, &mut get)?;
        // SAFETY: a fresh fd the kernel just returned, owned here.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) };
        use std::os::fd::AsRawFd;
        let mut a = LinkDetachAttr {
            link_fd: fd.as_raw_fd() as u32,
            _pad: 0,
        };
        bpf(BPF_LINK_DETACH, &mut a)
    }

    pub fn unsupported(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(ENOTSUPP) | Some(libc::EOPNOTSUPP))
    }

    pub fn update(
        fd: RawFd,
        keys: &[u8],
        key_size: usize,
        values: &[u8],
        value_size: usize,
    ) -> io::Result<()> {
        let n = keys.len() / key_size;
        let mut done = 0;
        while done < n {
            let c = (n - done).min(BATCH);
            let mut a = BatchAttr {
                keys: keys[done * key_size..].as_ptr() as u64,
                values: values[done * value_size..].as_ptr() as u64,
                count: c as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            bpf(BPF_MAP_UPDATE_BATCH, &mut a)?;
            done += a.count as usize;
        }
        Ok(())
    }

    pub fn delete(fd: RawFd, keys: &[u8], key_size: usize) -> io::Result<()> {
        let n = keys.len() / key_size;
        let mut done = 0;
        while done < n {
            let c = (n - done).min(BATCH);
            let mut a = BatchAttr {
                keys: keys[done * key_size..].as_ptr() as u64,
                count: c as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            bpf(BPF_MAP_DELETE_BATCH, &mut a)?;
            done += a.count as usize;
        }
        Ok(())
    }

    pub fn update_one(fd: RawFd, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut a = ElemAttr {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut a)
    }

    pub fn delete_one(fd: RawFd, key: &[u8]) -> io::Result<()> {
        let mut a = ElemAttr {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_DELETE_ELEM, &mut a)
    }

    /// Every element, `BATCH` per syscall; the kernel answers ENOENT once
    /// it has returned the last one.
    pub fn lookup_all(
        fd: RawFd,
        key_size: usize,
        value_size: usize,
    ) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        let mut kbuf = vec![0u8; BATCH * key_size];
        let mut vbuf = vec![0u8; BATCH * value_size];
        // The position tokens of generic batch lookups are keys.
        let mut token_in = vec![0u8; key_size.max(8)];
        let mut token_out = vec![0u8; key_size.max(8)];
        let mut first = true;
        loop {
            let mut a = BatchAttr {
                in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: kbuf.as_mut_ptr() as u64,
                values: vbuf.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut a);
            let got = a.count as usize;
            keys.extend_from_slice(&kbuf[..got * key_size]);
            values.extend_from_slice(&vbuf[..got * value_size]);
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok((keys, values)),
                Err(e) => return Err(e),
            }
            if got == 0 {
                return Ok((keys, values));
            }
            std::mem::swap(&mut token_in, &mut token_out);
            first = false;
        }
    }
}
