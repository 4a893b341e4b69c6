//! Attaching to interfaces: XDP (native or generic) and the TC egress
//! recorder, adopting the links a previous run pinned.

use super::*;

/// How the caller wants the XDP program attached (`run --xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeRequest {
    /// Native (driver) mode where the driver has it, else generic.
    Auto,
    /// Native (driver) mode only: fails where the driver lacks it.
    Native,
    /// Generic (skb) mode: works on every interface, slower.
    Skb,
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

/// The driver of an interface as `ethtool -i` names it (`veth`, `mlx5_core`,
/// ...), from the SIOCETHTOOL ioctl; None when it cannot be asked. (No
/// well-kept crate offers the ioctl alone: the netlink ethtool crates bring
/// a whole async stack for one string.)
pub fn driver(iface: &str) -> Option<String> {
    // The request type is c_ulong on glibc and c_int on musl.
    const SIOCETHTOOL: libc::Ioctl = 0x8946;
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

impl Datapath {
    /// Attaches to `iface`, or takes over the links an earlier run pinned
    /// there (an atomic program replacement: no packet goes unjudged).
    /// Attaches the egress recorder of return traffic beside it. Returns the
    /// XDP mode and whether an existing link was adopted. A link does not
    /// say its mode: `recorded` is what the previous run wrote in the
    /// state directory, reported for an adopted link (native if unknown).
    pub fn attach(
        &mut self,
        iface: &str,
        mode: XdpModeRequest,
        recorded: Option<AttachMode>,
    ) -> Result<(AttachMode, bool)> {
        let r = self.attach_xdp(iface, mode, recorded)?;
        self.attach_egress(iface)?;
        Ok(r)
    }

    pub(super) fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpModeRequest,
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
            XdpModeRequest::Native => &[(XdpMode::Driver, AttachMode::Native, "native")],
            XdpModeRequest::Skb => &[(XdpMode::Skb, AttachMode::Skb, "skb")],
            XdpModeRequest::Auto => &[
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
    pub(super) fn attach_egress(&mut self, iface: &str) -> Result<()> {
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

pub(super) fn tc_link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("tclink_{iface}"))
}

pub(super) fn is_busy(e: &aya::programs::ProgramError) -> bool {
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
