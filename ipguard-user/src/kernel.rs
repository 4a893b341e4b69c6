//! What the running kernel offers the datapath: the oldest supported
//! release, and the optional features whose absence changes how ipguard
//! works (said once at start and in `status`, never degraded silently).
//!
//! Optional features are probed (a tiny program through the verifier, as
//! libbpf and bpftool do), not inferred from the version, because
//! distribution kernels backport; only what cannot be probed without an
//! interface (TCX) goes by the release.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};
use serde::Serialize;

/// The oldest series ipguard is tested on (`cargo xtask vm-test`): Debian
/// 11's 5.10.
pub const MINIMUM: (u32, u32) = (5, 10);

/// What the datapath cannot do without, with the release that brought it:
/// named in the refusal on an older kernel.
const REQUIRED: &[(&str, (u32, u32))] = &[
    ("BPF global data", (5, 2)),
    ("bounded loops in BPF programs", (5, 3)),
    ("the BPF ring buffer", (5, 8)),
    ("BPF links for XDP", (5, 9)),
    ("a verifier that takes ipguard's program", MINIMUM),
];

/// Kernel release (`uname -r`) and its major and minor numbers.
#[derive(Clone, Debug, Serialize)]
pub struct Release {
    pub release: String,
    #[serde(skip)]
    pub series: (u32, u32),
}

impl Release {
    pub fn current() -> Self {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let series = parse_series(&release);
        Self { release, series }
    }
}

/// `5.10.0-32-cloud-amd64` → (5, 10); unparsable → (0, 0).
pub fn parse_series(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(a), Some(b)) => (a, b),
        _ => (0, 0),
    }
}

/// The optional features, as found on this kernel.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Kernel {
    pub release: String,
    /// `bpf_ktime_get_coarse_ns` (5.11): without it the datapath reads
    /// the precise clock.
    pub coarse_clock: bool,
    /// TCX (6.6): without it the egress recorder is a clsact filter.
    pub tcx: bool,
    /// /sys/kernel/btf/vmlinux: ipguard's program needs no kernel BTF
    /// (it has no CO-RE relocations), reported for the operator only.
    pub btf: bool,
    /// One phrase per missing feature: what it is and what ipguard does
    /// instead. Empty on a kernel with everything.
    pub missing: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "Linux {release} is not supported: ipguard needs Linux {}.{} or newer; this kernel lacks {missing}. Run a newer kernel (Debian 11 or later)",
    MINIMUM.0,
    MINIMUM.1
)]
pub struct Unsupported {
    pub release: String,
    pub missing: String,
}

/// Refuses a kernel older than [`MINIMUM`], naming what it lacks.
pub fn check_supported(r: &Release) -> Result<(), Unsupported> {
    if r.series >= MINIMUM {
        return Ok(());
    }
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|(_, since)| r.series < *since)
        .map(|(what, (a, b))| format!("{what} ({a}.{b})"))
        .collect();
    Err(Unsupported {
        release: r.release.clone(),
        missing: missing.join(", "),
    })
}

/// Probes the optional features. Needs the privilege to load programs.
pub fn probe() -> Kernel {
    let r = Release::current();
    let coarse_clock =
        is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_ktime_get_coarse_ns)
            .unwrap_or(false);
    let tcx = r.series >= (6, 6);
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    let mut missing = Vec::new();
    if !coarse_clock {
        missing.push(
            "bpf_ktime_get_coarse_ns (5.11): the datapath reads the precise clock instead".into(),
        );
    }
    if !tcx {
        missing.push("TCX (6.6): return traffic is recorded by a clsact filter instead".into());
    }
    if !btf {
        missing.push("kernel BTF: not needed by ipguard's program".into());
    }
    // Required, and checked by the loader anyway; probed so that a kernel
    // built without it says so in words, not as a map creation error.
    if !is_map_supported(MapType::RingBuf).unwrap_or(false) {
        missing.push("the BPF ring buffer (5.8): no events can be relayed".into());
    }
    Kernel {
        release: r.release,
        coarse_clock,
        tcx,
        btf,
        missing,
    }
}

impl Kernel {
    /// The one line said at start.
    pub fn summary(&self) -> String {
        if self.missing.is_empty() {
            format!("kernel {}: every datapath feature present", self.release)
        } else {
            format!(
                "kernel {}: missing {}",
                self.release,
                self.missing.join("; ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(s: &str) -> Release {
        Release {
            release: s.into(),
            series: parse_series(s),
        }
    }

    #[test]
    fn series_of_distribution_releases() {
        assert_eq!(parse_series("5.10.0-32-cloud-amd64"), (5, 10));
        assert_eq!(parse_series("6.12.117+deb13-cloud-amd64"), (6, 12));
        assert_eq!(parse_series("7.3.4+deb13-cloud-amd64"), (7, 3));
        assert_eq!(parse_series("2.6.50"), (2, 6));
        assert_eq!(parse_series("garbage"), (0, 0));
    }

    #[test]
    fn the_oldest_supported_series_passes_and_older_ones_name_what_they_lack() {
        assert!(check_supported(&release("5.10.0-32-cloud-amd64")).is_ok());
        assert!(check_supported(&release("6.1.0-50-cloud-amd64")).is_ok());
        let e = check_supported(&release("5.4.0-150-generic")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Linux 5.4.0-150-generic is not supported: ipguard needs Linux 5.10 or newer; this kernel lacks the BPF ring buffer (5.8), BPF links for XDP (5.9), a verifier that takes ipguard's program (5.10). Run a newer kernel (Debian 11 or later)"
        );
        let e = check_supported(&release("2.6.50")).unwrap_err();
        assert!(e.to_string().contains("BPF global data (5.2)"), "{e}");
    }
}
