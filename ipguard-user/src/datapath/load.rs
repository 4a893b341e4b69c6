//! Loading the embedded object: programs, maps adopted from the pins,
//! load-time globals.

use super::*;
use std::time::Instant;

/// The loaded programs plus their pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// The bench-only object ([`crate::EBPF_BENCH_OBJECT`]), loaded on the
    /// same pinned maps when one of its programs is first asked for.
    bench: Option<Ebpf>,
    pin_dir: PathBuf,
    caps: Capacities,
    pub maps: Maps,
    /// What the kernel offered at load (and what the program does instead).
    pub kernel: crate::kernel::Kernel,
    /// Instructions the verifier processed per program (the kernel says
    /// since 5.16): how close the programs are to its 1,000,000 limit.
    pub verified_insns: Vec<(&'static str, Option<u32>)>,
}

/// The object loader with everything both objects must agree on: the pin
/// directory (so the bench object opens the product's maps), the sizes
/// the operator chose, and the load-time globals.
fn loader<'a>(
    pin_dir: &'a Path,
    caps: Capacities,
    ncpu: &'a u32,
    coarse: &'a u32,
) -> EbpfLoader<'a> {
    let mut l = EbpfLoader::new();
    l.default_map_pin_directory(pin_dir)
        .map_max_entries(MAP_R4_RANGES, SLOTS * r4_ranges_capacity(caps.v4))
        .map_max_entries(MAP_R4_LEAVES, SLOTS * r4_leaves_capacity(caps.v4))
        .map_max_entries(MAP_R6_NODES, SLOTS * r6_nodes_capacity(caps.v6))
        .map_max_entries(MAP_R6_LEAVES, SLOTS * r6_leaves_capacity(caps.v6))
        .map_max_entries(MAP_FLOWS, caps.flows.max(1))
        .override_global(GLOBAL_NR_CPUS, ncpu, true)
        .override_global(GLOBAL_COARSE_CLOCK, coarse, true);
    l
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
        let new_flow_map = replace_incompatible_maps(pin_dir, caps);
        // Created by this load (no pin to reuse): both slots hold nothing.
        let new_port_table = !pin_dir.join(MAP_PORTS).exists();
        let kernel = crate::kernel::probe();
        let coarse = u32::from(kernel.coarse_clock);
        let mut ebpf = loader(pin_dir, caps, &ncpu, &coarse)
            .load(crate::EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(load_error(&e)))?;
        let xdp: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .ok_or_else(|| DatapathError::Load(format!("no program {PROG_XDP} in the object")))?
            .try_into()
            .map_err(|e| DatapathError::Load(format!("{e}")))?;
        let started = Instant::now();
        xdp.load()
            .map_err(|e| DatapathError::Load(verifier_excerpt(&e)))?;
        let mut verified_insns = vec![verified(PROG_XDP, xdp.info().ok(), started)];
        let tc: &mut SchedClassifier = ebpf
            .program_mut(PROG_EGRESS)
            .ok_or_else(|| DatapathError::Load(format!("no program {PROG_EGRESS} in the object")))?
            .try_into()
            .map_err(|e| DatapathError::Load(format!("{e}")))?;
        let started = Instant::now();
        tc.load()
            .map_err(|e| DatapathError::Load(verifier_excerpt(&e)))?;
        verified_insns.push(verified(PROG_EGRESS, tc.info().ok(), started));
        let mut maps = Maps::open(pin_dir)?;
        if new_port_table {
            maps.slots_created_empty()?;
        }
        if new_flow_map {
            // The counters behind the eviction figure describe the map
            // that was replaced.
            maps.reset_flow_counters()?;
        }
        Ok(Self {
            ebpf,
            bench: None,
            pin_dir: pin_dir.to_path_buf(),
            caps,
            maps,
            kernel,
            verified_insns,
        })
    }

    pub(super) fn program(&mut self) -> Result<&mut Xdp> {
        self.xdp_program(PROG_XDP)
    }

    /// An XDP program, loaded on first use: [`PROG_XDP`], or one of the
    /// bench-only programs of the second object, to run with aya's
    /// `TestRun`.
    pub fn xdp_program(&mut self, name: &str) -> Result<&mut Xdp> {
        let object = if name.starts_with(PROG_BENCH_PREFIX) {
            if self.bench.is_none() {
                let ncpu = u32::try_from(cpus()?).unwrap_or(u32::MAX);
                let coarse = u32::from(self.kernel.coarse_clock);
                let bench = loader(&self.pin_dir, self.caps, &ncpu, &coarse)
                    .load(crate::EBPF_BENCH_OBJECT)
                    .map_err(|e| DatapathError::Load(load_error(&e)))?;
                self.bench = Some(bench);
            }
            self.bench.as_mut()
        } else {
            Some(&mut self.ebpf)
        };
        let prog: &mut Xdp = object
            .and_then(|o| o.program_mut(name))
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

    pub(super) fn egress(&mut self) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(PROG_EGRESS)
            .ok_or_else(|| DatapathError::Load(format!("no program {PROG_EGRESS} in the object")))?
            .try_into()
            .map_err(|e| DatapathError::Load(format!("{e}")))
    }
}

/// How much work the verifier did, also said at debug: it sets how long a
/// start takes on a slow host, so a regression in program size shows in
/// the logs.
fn verified(
    program: &'static str,
    info: Option<aya::programs::ProgramInfo>,
    started: Instant,
) -> (&'static str, Option<u32>) {
    let insns = info.and_then(|i| i.verified_instruction_count());
    tracing::debug!(
        program,
        verified_insns = insns,
        elapsed_ms = started.elapsed().as_millis(),
        "program verified"
    );
    (program, insns)
}

/// The verifier's log is long; its last lines say what went wrong.
/// An object load's error with its causes: aya names the step ("failed
/// to create map `IPG_FLOWS`") and keeps the kernel's errno as the source,
/// which its message leaves out. A refusal although the capabilities are
/// there (`ensure_root` checked them) has two usual causes, named when
/// they apply: a seccomp filter (a container runtime's default profile
/// allows bpf(2) only with CAP_SYS_ADMIN) and, before 5.11, maps charged
/// to RLIMIT_MEMLOCK.
fn load_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut eperm = false;
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            eperm |= io.raw_os_error() == Some(libc::EPERM);
        }
        cause = c.source();
    }
    if eperm
        && let Some(hint) = eperm_hint(
            &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
            crate::kernel::Release::current().series,
        )
    {
        text.push_str("; ");
        text.push_str(hint);
    }
    text
}

/// Why bpf(2) says EPERM to a process that holds CAP_BPF, from
/// /proc/self/status and the kernel's series.
fn eperm_hint(status: &str, series: (u32, u32)) -> Option<&'static str> {
    let seccomp = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim);
    if seccomp == Some("2") {
        Some(
            "a seccomp filter refused bpf(2): a container runtime's default profile allows it only with CAP_SYS_ADMIN; run the container with seccomp unconfined (docs/kubernetes.md)",
        )
    } else if series < (5, 11) {
        Some(
            "this kernel charges BPF maps to RLIMIT_MEMLOCK: raise it (LimitMEMLOCK=infinity in the unit, `ulimit -l unlimited`, or the container runtime's memlock limit)",
        )
    } else {
        None
    }
}

pub(super) fn verifier_excerpt(e: &aya::programs::ProgramError) -> String {
    let text = format!("{e:#}");
    // The whole log is what a developer needs to fix the program; the
    // operator's one line is its end.
    tracing::debug!("verifier log:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines.len().saturating_sub(8);
    lines[tail..].join(" | ")
}

/// Removes every pinned map that the program being loaded cannot use as
/// it is: another key or value size than `MAP_LAYOUTS` gives (a map of an
/// older ipguard, whose layout changed), or, for the maps the operator
/// sizes, another capacity. The load then creates a new one; the programs
/// attached until the new ones replace them keep the old map alive, and
/// the daemon writes the policy into the new maps before it attaches.
/// What is lost is what a new map starts without: counters and events
/// start again at zero, and connections the host opened get their flows
/// back from their next outgoing packet. Returns whether the flow table
/// will be new.
pub(super) fn replace_incompatible_maps(pin_dir: &Path, caps: Capacities) -> bool {
    let sized = |name: &str| -> Option<u32> {
        match name {
            n if n == MAP_FLOWS => Some(caps.flows.max(1)),
            // Fixed by the program, but older versions had a direct table
            // of other values (no uncovered masks).
            n if n == MAP_R4_DIRECT => Some(SLOTS * R4_DIRECT_SLOT_VALUES),
            n if n == MAP_R4_RANGES => Some(SLOTS * r4_ranges_capacity(caps.v4)),
            n if n == MAP_R4_LEAVES => Some(SLOTS * r4_leaves_capacity(caps.v4)),
            n if n == MAP_R6_NODES => Some(SLOTS * r6_nodes_capacity(caps.v6)),
            n if n == MAP_R6_LEAVES => Some(SLOTS * r6_leaves_capacity(caps.v6)),
            _ => None,
        }
    };
    for name in OBSOLETE_MAPS {
        let path = pin_dir.join(name);
        if path.exists() {
            tracing::info!(
                map = name,
                "removing the pin of a map this version has no more"
            );
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
    let mut new_flows = !pin_dir.join(MAP_FLOWS).exists();
    let mut doomed: Vec<&str> = Vec::new();
    for &(name, key, value) in MAP_LAYOUTS {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(info) = MapData::from_pin(&path).ok().and_then(|m| m.info().ok()) else {
            continue;
        };
        let have = (info.key_size(), info.value_size());
        let fits =
            have == (key, value) && sized(name).is_none_or(|entries| info.max_entries() == entries);
        if !fits {
            tracing::info!(
                map = name,
                key = have.0,
                value = have.1,
                entries = info.max_entries(),
                "the pinned map does not fit this version's program: a new one replaces it"
            );
            doomed.push(name);
        }
    }
    if !doomed.contains(&MAP_CONFIG)
        && let Some(format) = foreign_table_format(&pin_dir.join(MAP_CONFIG))
    {
        tracing::info!(
            format,
            ours = TABLE_FORMAT,
            "the pinned policy tables are laid out in another format: new maps replace them"
        );
        doomed.push(MAP_CONFIG);
    }
    // The maps a policy lives in go together: the old program keeps
    // reading its own set until the new one replaces it. Were only some
    // replaced, the daemon's flip of a shared IPG_ACTIVE would have the
    // old program read the new config beside its own stale slot.
    if doomed.iter().any(|d| POLICY_MAPS.contains(d)) {
        for name in POLICY_MAPS {
            if !doomed.contains(&name) && pin_dir.join(name).exists() {
                doomed.push(name);
            }
        }
    }
    for name in doomed {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => new_flows |= name == MAP_FLOWS || name == MAP_COUNTERS,
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
    new_flows
}

/// The table format of a slot of the pinned config map at `path` that a
/// daemon wrote in another format than this version's ([`TABLE_FORMAT`]),
/// if any. A slot never written (generation 0) has none; a map that
/// cannot be read is left to the size checks.
fn foreign_table_format(path: &Path) -> Option<u32> {
    let map = aya::maps::Map::from_map_data(MapData::from_pin(path).ok()?).ok()?;
    let config: Array<MapData, PolicyConfig> = Array::try_from(map).ok()?;
    (0..SLOTS).find_map(|slot| {
        let c = config.get(&slot, 0).ok()?;
        (c.generation != 0 && c.format != TABLE_FORMAT).then_some(c.format)
    })
}

/// Every map a policy slot lives in, and the index that chooses the slot.
const POLICY_MAPS: [&str; 15] = [
    MAP_R4_DIRECT,
    MAP_R4_RANGES,
    MAP_R4_LEAVES,
    MAP_R6_NODES,
    MAP_R6_LEAVES,
    MAP_R6_EMPTY,
    MAP_R6_START,
    MAP_DECIDERS_V4[0],
    MAP_DECIDERS_V4[1],
    MAP_DECIDERS_V6[0],
    MAP_DECIDERS_V6[1],
    MAP_PORTS,
    MAP_CONFIG,
    MAP_ACTIVE,
    MAP_DHCP_SERVERS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eperm_is_explained_by_seccomp_or_by_memlock() {
        let filtered = "Name:\tipguard\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        let free = "Name:\tipguard\nSeccomp:\t0\n";
        assert!(eperm_hint(filtered, (6, 1)).unwrap().contains("seccomp"));
        // A filter is named first: it refuses whatever the limit is.
        assert!(eperm_hint(filtered, (5, 10)).unwrap().contains("seccomp"));
        assert!(
            eperm_hint(free, (5, 10))
                .unwrap()
                .contains("RLIMIT_MEMLOCK")
        );
        assert_eq!(eperm_hint(free, (5, 11)), None);
        assert_eq!(eperm_hint("", (6, 12)), None);
    }

    #[test]
    fn a_load_error_keeps_the_kernels_errno() {
        let e = aya::EbpfError::MapError(aya::maps::MapError::CreateError {
            name: "IPG_FLOWS".into(),
            io_error: std::io::Error::from_raw_os_error(libc::EPERM),
        });
        let text = load_error(&e);
        assert!(text.contains("IPG_FLOWS"), "{text}");
        assert!(text.contains("os error 1"), "{text}");
    }
}
