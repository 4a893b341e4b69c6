//! `cargo xtask vm-test`: the datapath's checks on the kernels servers run.
//!
//! For each kernel of the matrix it fetches Debian's own cloud kernel with
//! apt into a private cache (sources, lists and archives of its own under
//! target/vm; the machine's apt configuration is never read for sources
//! nor changed), builds an initramfs holding busybox, iproute2, the
//! `ipguard` binary, the root integration test binaries and the kernel's
//! veth, sch_ingress and cls_bpf modules, boots it under qemu with no
//! network device, and reads each test's verdict from the serial console.
//! The guest runs the very test binaries `cargo xtask test` runs on the
//! host (the verdict corpus, the differential test against `explain`, the
//! netns daemon tests): one test per process, as nextest does.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::setup::{self, Tools};

/// A kernel of the matrix: a Debian suite's newest cloud kernel.
#[derive(Clone, Copy, Debug)]
pub struct KernelSpec {
    /// The name `--kernel` takes.
    pub name: &'static str,
    pub suite: &'static str,
    pub distribution: &'static str,
}

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "5.10",
        suite: "bullseye",
        distribution: "Debian 11",
    },
    KernelSpec {
        name: "6.1",
        suite: "bookworm",
        distribution: "Debian 12",
    },
    KernelSpec {
        name: "6.12",
        suite: "trixie",
        distribution: "Debian 13",
    },
    KernelSpec {
        name: "newest",
        suite: "trixie-backports",
        distribution: "Debian 13 backports",
    },
];

/// The test binaries of the `tests` crate that run in each guest. The
/// benchmark is left out (its figures mean nothing under emulation), and
/// so are `dns` and `feeds` (names are resolved and feeds fetched by the
/// daemon; the kernel only ever sees the prefixes, which every guest
/// tests).
const GUEST_TESTS: &[&str] = &[
    "verdicts",
    "verdicts_differential",
    "lookup_differential",
    "datapath_netns",
    "datapath_swap",
    "foundation",
    "daemon",
];
/// Tests of the daemon's own logic, which no kernel difference reaches
/// (durations, the stdout stream, metrics connections, state
/// files, reload and rollback bookkeeping): the host run has them, the
/// guests skip them to keep `cargo xtask test` within CI's time. Every
/// test that loads, attaches or judges with the datapath runs in every
/// guest.
const HOST_ONLY: &[&str] = &[
    "daemon::out_of_range_durations_are_refused_and_the_daemon_lives_on",
    "daemon::a_stalled_stdout_never_stops_the_daemon",
    "daemon::idle_metrics_connections_are_bounded",
    "daemon::metrics_are_served",
    "daemon::a_configmap_style_symlink_swap_reloads",
    "daemon::a_changed_list_file_reloads",
    "daemon::a_reload_logs_the_first_warnings_and_counts_the_rest",
    "daemon::status_answers_while_a_large_policy_is_read",
    "daemon::runtime_deny_wins_over_allow_entries_and_undeny_lifts_it",
    "daemon::fail2ban_and_crowdsec_ban_and_unban_through_the_daemon",
    "daemon::access_requests_are_pending_approved_or_rejected",
    "daemon::an_invalid_reload_leaves_the_old_policy_enforcing",
    "daemon::apply_with_confirm_rolls_back_by_itself",
    "daemon::the_attach_mode_is_kept_in_the_state_directory_not_in_shared_temp",
    "daemon::a_failed_runtime_allow_changes_nothing_anywhere",
    "daemon::the_lockout_guard_watches_its_ports_and_every_cut_is_said",
    "daemon::bad_input_gets_one_clear_line",
    "daemon::status_notes_how_rejects_fare_on_a_native_veth",
    "daemon::a_dry_run_and_a_diff_judge_what_the_daemon_saw",
    "daemon::history_and_rollback_survive_a_restart",
    "daemon::readiness_follows_the_policy_file",
];
/// Kernel modules the tests need that Debian's cloud kernels build as
/// modules.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];
/// Host programs the tests call by name (busybox's applets of the same
/// names lack options they use: `ip netns`, `setpriv --inh-caps`).
const HOST_TOOLS: &[&str] = &["ip", "nsenter", "setpriv"];
/// Debian packages the run needs on the host.
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/usr/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
];
const MIRROR: &str = "http://deb.debian.org/debian";
/// How long the KVM probe waits for its guest's first line: under KVM a
/// guest prints it about a second after start.
const PROBE_SILENCE: Duration = Duration::from_secs(10);
/// A guest that has printed nothing new for this long is hung.
const GUEST_SILENCE: Duration = Duration::from_secs(300);
/// And no guest runs longer than this in all.
const GUEST_LIMIT: Duration = Duration::from_secs(1500);
/// Differential policies per guest: the host runs 1,000; under emulation
/// each costs about 20 times as much (more since it reads the hit counters
/// after every packet). 40 policies of 100 packets each reach every
/// verdict and reason (see the guests' `differential:` report lines).
const GUEST_DIFF_POLICIES: &str = "40";
/// Policy swaps under traffic per guest (the host runs 500); about 0.6 s
/// each under emulation, with both CPUs busy sending the traffic.
const GUEST_SWAPS: &str = "20";
/// The lookup differential asks an eighth of its 19,125 addresses in a
/// guest (one BPF_PROG_TEST_RUN each: 96 s under TCG at full size), and
/// builds its sets of 100,000 prefixes at a quarter of that: every prefix
/// set and size class is still loaded and asked; the host asks them all,
/// at full size.
const GUEST_LOOKUP_DIVISOR: &str = "8";

pub struct Options {
    pub kernels: Vec<KernelSpec>,
    /// Only the tests whose `binary::name` contains this.
    pub filter: Option<String>,
    pub jobs: usize,
    pub accel: Accel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when a probe boot shows it works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

pub fn parse_kernels(names: &[String]) -> Result<Vec<KernelSpec>> {
    let mut out = Vec::new();
    for n in names {
        if n == "all" {
            return Ok(KERNELS.to_vec());
        }
        match KERNELS.iter().find(|k| k.name == n || k.suite == n) {
            Some(k) => out.push(*k),
            None => bail!(
                "unknown kernel {n:?}: choose one of {} or all",
                KERNELS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(out)
}

/// One guest's outcome.
#[derive(Debug, Default)]
pub struct GuestResult {
    pub kernel: String,
    pub release: String,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub reports: Vec<String>,
    /// (seconds, test) for each test run.
    pub times: Vec<(f64, String)>,
    pub boot_secs: f64,
    pub test_secs: f64,
    pub error: Option<String>,
    pub log: PathBuf,
}

impl GuestResult {
    fn ok(&self) -> bool {
        self.error.is_none() && self.failed.is_empty() && !self.passed.is_empty()
    }

    pub fn line(&self) -> String {
        let mut s = format!(
            "{} ({}): {}/{} checks passed, boot {:.0} s, tests {:.0} s",
            self.kernel,
            if self.release.is_empty() {
                "?"
            } else {
                &self.release
            },
            self.passed.len(),
            self.passed.len() + self.failed.len(),
            self.boot_secs,
            self.test_secs
        );
        if !self.failed.is_empty() {
            let _ = write!(s, "; FAILED: {}", self.failed.join(", "));
        }
        if let Some(e) = &self.error {
            let _ = write!(s, "; ERROR: {e}");
        }
        s
    }
}

pub fn run(opts: &Options) -> Result<Vec<GuestResult>> {
    prepare(opts)?.boot_all()
}

/// Guests ready to boot: binaries built, kernels fetched, images made,
/// the accelerator chosen.
pub struct Prepared {
    work: PathBuf,
    images: Vec<(KernelSpec, PathBuf, PathBuf)>,
    accel: Using,
    filter: Option<String>,
    jobs: usize,
    /// qemu's nice value: above 0 when the guests share the machine with
    /// the host's own tests, which then come first.
    pub nice: i32,
}

/// Builds everything the guests need (this runs cargo, so nothing else may
/// build meanwhile), without booting any.
pub fn prepare(opts: &Options) -> Result<Prepared> {
    require_root()?;
    let root = setup::workspace_root()?;
    let work = root.join("target/vm");
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    ensure_host_packages()?;
    let tools = setup::setup()?;
    let bins = build_test_binaries(&tools, &root)?;
    let common = build_common_initramfs(&root, &work, &bins)?;

    // Fetch every kernel first: a kernel whose packages cannot be fetched
    // fails the run by name before any guest boots.
    let mut fetched = Vec::new();
    for k in &opts.kernels {
        let f = fetch_kernel(&work.join("kernels"), k)
            .with_context(|| format!("kernel {} ({}, {})", k.name, k.distribution, k.suite))?;
        fetched.push((*k, f));
    }
    let mut images = Vec::new();
    for (k, f) in &fetched {
        let img = build_kernel_initramfs(&work, k, f, &common)
            .with_context(|| format!("initramfs for kernel {}", k.name))?;
        images.push((*k, f.vmlinuz.clone(), img));
    }
    let accel = choose_accel(opts.accel, &work, &images[0].1, &images[0].2)?;
    eprintln!("xtask: vm-test: qemu with {accel}");
    Ok(Prepared {
        work,
        images,
        accel,
        filter: opts.filter.clone(),
        jobs: opts.jobs,
        nice: 0,
    })
}

impl Prepared {
    /// Boots every guest, `jobs` at a time, and returns their results in
    /// the order of [`KERNELS`].
    pub fn boot_all(self) -> Result<Vec<GuestResult>> {
        boot_all(self)
    }
}

fn boot_all(p: Prepared) -> Result<Vec<GuestResult>> {
    let Prepared {
        work,
        images,
        accel,
        filter,
        jobs,
        nice,
    } = p;
    let queue = Arc::new(Mutex::new(images));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..jobs.max(1) {
        let queue = Arc::clone(&queue);
        let results = Arc::clone(&results);
        let work = work.clone();
        let filter = filter.clone();
        workers.push(thread::spawn(move || {
            loop {
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some((k, vmlinuz, img)) = next else { break };
                let r = boot_retrying(&work, &k, &vmlinuz, &img, accel, filter.as_deref(), nice);
                eprintln!("xtask: vm-test: {}", r.line());
                if let Ok(mut v) = results.lock() {
                    v.push(r);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    let mut results = Arc::try_unwrap(results)
        .map_err(|_| anyhow::anyhow!("a guest thread still holds the results"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a guest thread panicked"))?;
    let order = |r: &GuestResult| KERNELS.iter().position(|k| k.name == r.kernel);
    results.sort_by_key(order);
    Ok(results)
}

/// Prints the per-kernel summary; fails when any guest failed.
pub fn report(results: &[GuestResult]) -> Result<()> {
    let mut bad = Vec::new();
    for r in results {
        for f in &r.failed {
            eprintln!(
                "xtask: vm-test: {} {f} failed; console log {}",
                r.kernel,
                r.log.display()
            );
        }
        let mut frames = 0u64;
        for line in &r.reports {
            match line.strip_prefix("corpus-frames ") {
                Some(n) => frames += n.trim().parse::<u64>().unwrap_or(0),
                None => eprintln!("xtask: vm-test: {}: {line}", r.kernel),
            }
        }
        eprintln!(
            "xtask: vm-test: {}: corpus: {frames} frames judged as expected",
            r.kernel
        );
        let mut times = r.times.clone();
        times.sort_by(|a, b| b.0.total_cmp(&a.0));
        let slowest: Vec<String> = times
            .iter()
            .take(4)
            .map(|(t, n)| format!("{n} {t:.0} s"))
            .collect();
        eprintln!(
            "xtask: vm-test: {}: slowest: {}",
            r.kernel,
            slowest.join(", ")
        );
        if !r.ok() {
            bad.push(r.kernel.clone());
        }
    }
    let summary: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "{} {}/{}",
                r.kernel,
                r.passed.len(),
                r.passed.len() + r.failed.len()
            )
        })
        .collect();
    println!(
        "vm-test: checks passed per kernel: {} ({} tests of the daemon's own logic run on the host only)",
        summary.join(", "),
        HOST_ONLY.len()
    );
    if !bad.is_empty() {
        bail!("vm-test failed on kernel(s) {}", bad.join(", "));
    }
    Ok(())
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "vm-test needs root (apt, qemu's initramfs of root-owned files): run `sudo -E cargo xtask vm-test`"
        );
    }
    Ok(())
}

fn ensure_host_packages() -> Result<()> {
    crate::setup::ensure_packages(HOST_PACKAGES)
}

/// What the guest runs: test binaries and the `ipguard` binary next to
/// their directory, as `ipguard_tests::ipguard_bin` expects.
struct TestBinaries {
    ipguard: PathBuf,
    tests: Vec<(String, PathBuf)>,
}

fn build_test_binaries(tools: &Tools, root: &Path) -> Result<TestBinaries> {
    crate::run(crate::cargo(tools).current_dir(root).args([
        "build",
        "--quiet",
        "--package",
        "ipguard-user",
        "--bin",
        "ipguard",
    ]))?;
    let out = crate::cargo(tools)
        .current_dir(root)
        .args([
            "test",
            "--quiet",
            "--no-run",
            "--package",
            "ipguard-tests",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if GUEST_TESTS.contains(&name) {
            tests.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for t in GUEST_TESTS {
        if !tests.iter().any(|(n, _)| n == t) {
            bail!("cargo built no test binary {t}");
        }
    }
    tests.sort_by_key(|(n, _)| GUEST_TESTS.iter().position(|t| t == n));
    Ok(TestBinaries {
        ipguard: root.join("target/debug/ipguard"),
        tests,
    })
}

/// The shared dynamic libraries `exe` loads (`ldd`), the loader included.
fn libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .with_context(|| format!("ldd {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    Ok(text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

fn which(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} is not installed on this machine (needed inside the guests)")
}

/// Copies `src` to `tree` + `dest` (absolute), following links.
fn put(tree: &Path, src: &Path, dest: &Path) -> Result<()> {
    let to = tree.join(dest.strip_prefix("/").unwrap_or(dest));
    if let Some(p) = to.parent() {
        fs::create_dir_all(p).with_context(|| format!("create {}", p.display()))?;
    }
    fs::copy(src, &to).with_context(|| format!("copy {} to {}", src.display(), to.display()))?;
    Ok(())
}

/// Copies an executable without its debug information (the guest keeps
/// the initramfs in memory).
fn put_stripped(tree: &Path, src: &Path, dest: &Path) -> Result<()> {
    let to = tree.join(dest.strip_prefix("/").unwrap_or(dest));
    if let Some(p) = to.parent() {
        fs::create_dir_all(p)?;
    }
    crate::run(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(src)
            .arg(&to),
    )
}

fn cpio(dir: &Path, out: &Path) -> Result<()> {
    let list = Command::new("find")
        .arg(".")
        .current_dir(dir)
        .output()
        .context("find")?;
    let mut names: Vec<&str> = std::str::from_utf8(&list.stdout)
        .context("file names")?
        .lines()
        .collect();
    names.sort_unstable();
    let file = fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet", "--reproducible"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("start cpio")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("cpio stdin")?;
        for n in names {
            writeln!(stdin, "{n}")?;
        }
    }
    if !child.wait()?.success() {
        bail!("cpio failed for {}", dir.display());
    }
    Ok(())
}

/// The part of the initramfs every kernel shares.
fn build_common_initramfs(root: &Path, work: &Path, bins: &TestBinaries) -> Result<PathBuf> {
    let tree = work.join("common");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "root", "ipg",
    ] {
        fs::create_dir_all(tree.join(d))?;
    }
    put(
        &tree,
        Path::new("/usr/bin/busybox"),
        Path::new("/bin/busybox"),
    )?;
    let applets = Command::new("/usr/bin/busybox")
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for a in String::from_utf8_lossy(&applets.stdout).lines() {
        if a == "busybox" || HOST_TOOLS.contains(&a) {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", tree.join("bin").join(a));
    }
    let mut dynamic = BTreeSet::new();
    for t in HOST_TOOLS {
        let src = which(t)?;
        put(&tree, &src, &Path::new("/usr/sbin").join(t))?;
        dynamic.insert(src);
    }
    // Test binaries in /ipg/deps, the ipguard binary in /ipg: the layout
    // of a cargo target directory, so the tests find it where they look.
    put_stripped(&tree, &bins.ipguard, Path::new("/ipg/ipguard"))?;
    dynamic.insert(bins.ipguard.clone());
    let mut names = String::new();
    for (name, exe) in &bins.tests {
        put_stripped(&tree, exe, &Path::new("/ipg/deps").join(name))?;
        dynamic.insert(exe.clone());
        let _ = writeln!(names, "{name}");
    }
    fs::write(tree.join("ipg/tests"), names)?;
    fs::write(tree.join("ipg/host-only"), HOST_ONLY.join("\n") + "\n")?;
    for exe in &dynamic {
        for lib in libraries(exe)? {
            put(&tree, &lib, &lib)?;
        }
    }
    // Files the tests read at run time through CARGO_MANIFEST_DIR.
    // The tests' own directory must exist for `tests/../packaging` to
    // resolve.
    let unit = root.join("packaging/ipguard.service");
    put(&tree, &unit, &unit)?;
    fs::create_dir_all(tree.join(root.join("tests").strip_prefix("/")?))?;
    let init = tree.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let out = work.join("common.cpio");
    cpio(&tree, &out)?;
    Ok(out)
}

/// A kernel's files, extracted from its packages.
struct Fetched {
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn apt_options(dir: &Path) -> Vec<String> {
    let d = dir.display();
    vec![
        format!("-o=Dir::Etc::sourcelist={d}/sources.list"),
        "-o=Dir::Etc::sourceparts=/dev/null".into(),
        format!("-o=Dir::State::Lists={d}/lists"),
        format!("-o=Dir::Cache={d}/cache"),
        // The downloads land in a directory root owns; apt's sandbox user
        // could not write them.
        "-o=APT::Sandbox::User=root".into(),
        "-q".into(),
    ]
}

fn fetch_kernel(cache: &Path, k: &KernelSpec) -> Result<Fetched> {
    let dir = cache.join(k.suite);
    for d in ["lists/partial", "cache/archives/partial", "debs"] {
        fs::create_dir_all(dir.join(d))?;
    }
    let mirror = std::env::var("IPGUARD_DEBIAN_MIRROR").unwrap_or_else(|_| MIRROR.into());
    fs::write(
        dir.join("sources.list"),
        format!("deb {mirror} {} main\n", k.suite),
    )?;
    let opts = apt_options(&dir);
    let out = Command::new("apt-get")
        .args(&opts)
        .arg("update")
        .output()
        .context("apt-get update")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("W: Failed to fetch") {
        bail!("apt-get update for {} failed: {}", k.suite, stderr.trim());
    }
    let deps = Command::new("apt-cache")
        .args(&opts)
        .args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            "linux-image-cloud-amd64",
        ])
        .output()
        .context("apt-cache depends")?;
    if !deps.status.success() {
        bail!(
            "{} has no linux-image-cloud-amd64: {}",
            k.suite,
            String::from_utf8_lossy(&deps.stderr).trim()
        );
    }
    // The versioned packages that hold the image and its modules: one
    // linux-image-VERSION-cloud-amd64 up to Debian 13, split into
    // linux-binary-* and linux-modules-* on the newest kernels.
    let packages: BTreeSet<String> = String::from_utf8_lossy(&deps.stdout)
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .filter(|l| {
            ["linux-image-", "linux-binary-", "linux-modules-"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .filter(|l| l.chars().any(|c| c.is_ascii_digit()) && !l.ends_with("-dbg"))
        .map(str::to_string)
        .collect();
    if packages.is_empty() {
        bail!("no kernel package found in {}", k.suite);
    }
    let debs = dir.join("debs");
    let stamp_want = packages.iter().cloned().collect::<Vec<_>>().join("\n");
    let extracted = dir.join("root");
    let stamp = dir.join("extracted.stamp");
    if fs::read_to_string(&stamp).unwrap_or_default() != stamp_want {
        let _ = fs::remove_dir_all(&debs);
        fs::create_dir_all(&debs)?;
        let out = Command::new("apt-get")
            .args(&opts)
            .arg("download")
            .args(&packages)
            .current_dir(&debs)
            .output()
            .context("apt-get download")?;
        if !out.status.success() {
            bail!(
                "cannot download {}: {}",
                packages.iter().cloned().collect::<Vec<_>>().join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let _ = fs::remove_dir_all(&extracted);
        fs::create_dir_all(&extracted)?;
        for e in fs::read_dir(&debs)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "deb") {
                crate::run(Command::new("dpkg-deb").arg("-x").arg(&p).arg(&extracted))?;
            }
        }
        fs::write(&stamp, &stamp_want)?;
    }
    let mut modules = None;
    for base in ["lib/modules", "usr/lib/modules"] {
        if let Ok(rd) = fs::read_dir(extracted.join(base)) {
            for e in rd.flatten() {
                if e.path().join("kernel").is_dir() {
                    modules = Some(e.path());
                }
            }
        }
    }
    let modules = modules.context("the packages hold no lib/modules/RELEASE/kernel")?;
    let release = modules
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let vmlinuz = [
        extracted.join(format!("boot/vmlinuz-{release}")),
        modules.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .with_context(|| format!("no vmlinuz for {release} in the packages"))?;
    Ok(Fetched { vmlinuz, modules })
}

/// Finds `name`.ko or `name`.ko.xz under the kernel's module tree.
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    let rd = fs::read_dir(dir).ok()?;
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_module(&p, name) {
                return Some(f);
            }
        } else if let Some(f) = p.file_name().and_then(|f| f.to_str())
            && (f == format!("{name}.ko") || f == format!("{name}.ko.xz"))
        {
            return Some(p);
        }
    }
    None
}

/// A module's bytes, decompressed (busybox's insmod takes plain .ko).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|x| x == "xz") {
        let out = Command::new("/usr/bin/busybox")
            .arg("xzcat")
            .arg(path)
            .output()
            .context("busybox xzcat")?;
        if !out.status.success() {
            bail!("cannot decompress {}", path.display());
        }
        Ok(out.stdout)
    } else {
        Ok(fs::read(path)?)
    }
}

/// The `depends=` of a module's .modinfo.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn build_kernel_initramfs(
    work: &Path,
    k: &KernelSpec,
    f: &Fetched,
    common: &Path,
) -> Result<PathBuf> {
    let tree = work.join(format!("modules-{}", k.suite));
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    let mods = tree.join("ipg/modules");
    fs::create_dir_all(&mods)?;
    // Dependencies first: the load order file lists them before their
    // users.
    let mut order: Vec<String> = Vec::new();
    let mut todo: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    let mut seen = BTreeSet::new();
    while let Some(m) = todo.pop() {
        if !seen.insert(m.clone()) {
            continue;
        }
        let Some(path) = find_module(&f.modules, &m) else {
            // Built into this kernel.
            continue;
        };
        let bytes = module_bytes(&path)?;
        let deps = module_depends(&bytes);
        fs::write(mods.join(format!("{m}.ko")), &bytes)?;
        order.insert(0, m);
        todo.extend(deps);
    }
    fs::write(tree.join("ipg/modules.order"), order.join("\n") + "\n")?;
    let part = work.join(format!("modules-{}.cpio", k.suite));
    cpio(&tree, &part)?;
    let image = work.join(format!("initramfs-{}.cpio", k.suite));
    let mut bytes = fs::read(common)?;
    bytes.extend(fs::read(&part)?);
    fs::write(&image, bytes)?;
    Ok(image)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Using {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Using {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Using::Kvm => "KVM",
            Using::Tcg => "TCG (software emulation)",
        })
    }
}

/// KVM only when a guest boots with it: on some VMs /dev/kvm opens but a
/// nested guest hangs in early boot. The answer is kept per host kernel.
fn choose_accel(want: Accel, work: &Path, vmlinuz: &Path, image: &Path) -> Result<Using> {
    match want {
        Accel::Kvm => return Ok(Using::Kvm),
        Accel::Tcg => return Ok(Using::Tcg),
        Accel::Auto => {}
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(Using::Tcg);
    }
    let host = nix_release();
    // Kept with the tools, not in the target directory: CI's clean clone
    // would probe (and burn a core in a hung KVM guest) at every run.
    let memo = setup::tools_dir()?.join("kvm-probe");
    if let Ok(s) = fs::read_to_string(&memo)
        && let Some((rel, verdict)) = s.trim().split_once(' ')
        && rel == host
    {
        return Ok(if verdict == "works" {
            Using::Kvm
        } else {
            Using::Tcg
        });
    }
    eprintln!(
        "xtask: vm-test: probing whether KVM boots a guest here (at most {} s)",
        PROBE_SILENCE.as_secs()
    );
    let log = work.join("kvm-probe.log");
    let booted = qemu(
        Using::Kvm,
        vmlinuz,
        image,
        "ipgvm.probe=1",
        &log,
        (PROBE_SILENCE, PROBE_SILENCE),
        0,
    )
    .map(|lines| lines.iter().any(|l| l.starts_with("IPGVM BOOT")))
    .unwrap_or(false);
    let _ = fs::write(
        &memo,
        format!("{host} {}\n", if booted { "works" } else { "hangs" }),
    );
    Ok(if booted { Using::Kvm } else { Using::Tcg })
}

fn nix_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Boots a guest and returns the lines of its console; the guest is
/// killed after `silence` without output or `limit` in all.
fn qemu(
    using: Using,
    vmlinuz: &Path,
    image: &Path,
    extra_cmdline: &str,
    log: &Path,
    (silence, limit): (Duration, Duration),
    nice: i32,
) -> Result<Vec<String>> {
    let mut c = Command::new("qemu-system-x86_64");
    if nice != 0 {
        use std::os::unix::process::CommandExt;
        // SAFETY: setpriority is async-signal-safe and touches no memory
        // of the parent.
        unsafe {
            c.pre_exec(move || {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                Ok(())
            });
        }
    }
    match using {
        Using::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
        Using::Tcg => c.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    c.args(["-m", "2048", "-smp", "2"])
        // No network device at all: the guest cannot reach anything.
        .args(["-nic", "none", "-display", "none", "-monitor", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(image)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init {extra_cmdline}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().context("start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    let mut file = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut timed_out = None;
    let mut last = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) => {
                use std::io::Write;
                let l = l.trim_end_matches('\r').to_string();
                let _ = writeln!(file, "{l}");
                lines.push(l);
                last = Instant::now();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() > limit {
            timed_out = Some(format!("the guest ran longer than {} s", limit.as_secs()));
            break;
        }
        if last.elapsed() > silence {
            timed_out = Some(format!(
                "the guest printed nothing for {} s",
                silence.as_secs()
            ));
            break;
        }
    }
    if timed_out.is_some() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let _ = reader.join();
    if let Some(why) = timed_out {
        lines.push(format!("IPGVM TIMEOUT {why}"));
    } else if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("qemu failed ({status}): {}", err.trim());
    }
    Ok(lines)
}

/// Boots a guest again (twice at most) when its kernel died before
/// ipguard's init printed its first line: a panic in early boot is the
/// emulator's (TCG has been seen to trap in the kernel's own text patching,
/// `Oops: int3` in `sched_clock_tick`, before any user space ran), not a
/// result of the tests, which have not started. Each retry is said on
/// stderr and in the kernel's report lines, with the panic's first line;
/// the dead boot's console stays beside the log as `.attempt-N.log`.
fn boot_retrying(
    work: &Path,
    k: &KernelSpec,
    vmlinuz: &Path,
    image: &Path,
    using: Using,
    filter: Option<&str>,
    nice: i32,
) -> GuestResult {
    const BOOTS: usize = 3;
    let mut notes = Vec::new();
    let mut attempt = 1;
    loop {
        let mut r = boot(work, k, vmlinuz, image, using, filter, nice);
        let died_booting = r.release.is_empty() && r.passed.is_empty() && r.failed.is_empty();
        if !died_booting || attempt == BOOTS {
            r.reports.splice(0..0, notes);
            return r;
        }
        let why = std::fs::read_to_string(&r.log)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.contains("Oops") || l.contains("Kernel panic") || l.contains("BUG"))
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| r.error.clone().unwrap_or_default());
        let kept = r.log.with_extension(format!("attempt-{attempt}.log"));
        let _ = std::fs::rename(&r.log, &kept);
        let note = format!(
            "the guest kernel died while booting, before ipguard's init ({why}); booted it again (console of that boot: {})",
            kept.display()
        );
        eprintln!("xtask: vm-test: {}: {note}", k.name);
        notes.push(note);
        attempt += 1;
    }
}

fn boot(
    work: &Path,
    k: &KernelSpec,
    vmlinuz: &Path,
    image: &Path,
    using: Using,
    filter: Option<&str>,
    nice: i32,
) -> GuestResult {
    let log = work.join(format!("console-{}.log", k.suite));
    let mut r = GuestResult {
        kernel: k.name.to_string(),
        log: log.clone(),
        ..Default::default()
    };
    let start = Instant::now();
    let lines = match qemu(
        using,
        vmlinuz,
        image,
        &format!(
            "ipgvm.diff_policies={GUEST_DIFF_POLICIES} ipgvm.swaps={GUEST_SWAPS} ipgvm.lookup_divisor={GUEST_LOOKUP_DIVISOR}{}",
            filter
                .map(|f| format!(" ipgvm.filter={f}"))
                .unwrap_or_default()
        ),
        &log,
        (GUEST_SILENCE, GUEST_LIMIT),
        nice,
    ) {
        Ok(l) => l,
        Err(e) => {
            r.error = Some(format!("{e:#}"));
            return r;
        }
    };
    let mut done = false;
    let mut tests_started = None;
    for l in &lines {
        let Some(rest) = l.strip_prefix("IPGVM ") else {
            continue;
        };
        let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        match word {
            "BOOT" => {
                r.release = arg.to_string();
            }
            "UPTIME" => {
                if tests_started.is_none() {
                    let secs: f64 = arg.parse().unwrap_or(0.0);
                    r.boot_secs = secs;
                    tests_started = Some(secs);
                } else {
                    let secs: f64 = arg.parse().unwrap_or(0.0);
                    r.test_secs = secs - tests_started.unwrap_or(0.0);
                }
            }
            "PASS" => r.passed.push(arg.to_string()),
            "FAIL" => r.failed.push(arg.to_string()),
            "REPORT" => r.reports.push(arg.to_string()),
            "TIME" => {
                let mut w = arg.split_whitespace();
                if let (Some(name), Some(a), Some(b)) = (w.next(), w.next(), w.next())
                    && let (Ok(a), Ok(b)) = (a.parse::<f64>(), b.parse::<f64>())
                {
                    r.times.push((b - a, name.to_string()));
                }
            }
            "ERROR" => r.error = Some(arg.to_string()),
            "TIMEOUT" => r.error = Some(arg.to_string()),
            "DONE" => done = true,
            _ => {}
        }
    }
    if r.boot_secs == 0.0 {
        r.boot_secs = start.elapsed().as_secs_f64();
    }
    if !done && r.error.is_none() {
        r.error = Some(format!(
            "the guest stopped before the end of its tests; see {}",
            log.display()
        ));
    }
    r
}

/// The guest's /init (busybox sh). It prints `IPGVM ...` lines the host
/// reads: BOOT (release), UPTIME (seconds since boot, before and after the
/// tests), PASS/FAIL and TIME per test, REPORT (a test's `vm-report:`
/// lines), DONE.
const INIT: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=0
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip() { /usr/sbin/ip "$@"; }
echo "IPGVM BOOT $(uname -r)"
for a in $(cat /proc/cmdline); do
  case "$a" in
    ipgvm.probe=1) poweroff -f ;;
    ipgvm.diff_policies=*) export IPGUARD_DIFF_POLICIES="${a#*=}" ;;
    ipgvm.swaps=*) export IPGUARD_SWAPS="${a#*=}" ;;
    ipgvm.lookup_divisor=*) export IPGUARD_LOOKUP_DIVISOR="${a#*=}" ;;
    ipgvm.filter=*) filter="${a#*=}" ;;
  esac
done
for m in $(cat /ipg/modules.order); do
  insmod "/ipg/modules/$m.ko" || echo "IPGVM ERROR insmod $m failed"
done
/usr/sbin/ip link set lo up
echo "IPGVM UPTIME $(cut -d' ' -f1 /proc/uptime)"
# One test per process, one at a time: two at once under emulation made
# timing-bound tests flaky.
for bin in $(cat /ipg/tests); do
  for t in $(/ipg/deps/$bin --list --format terse 2>/dev/null | sed -n 's/: test$//p'); do
    case "$bin::$t" in *"$filter"*) ;; *) continue ;; esac
    grep -qx "$bin::$t" /ipg/host-only && continue
    out=/tmp/test.out
    t0=$(cut -d' ' -f1 /proc/uptime)
    if /ipg/deps/$bin --exact "$t" --test-threads 1 --nocapture > $out 2>&1; then
      echo "IPGVM PASS $bin::$t"
    else
      echo "IPGVM FAIL $bin::$t"
      tail -n 60 $out | sed 's/^/IPGVM| /'
    fi
    echo "IPGVM TIME $bin::$t $t0 $(cut -d' ' -f1 /proc/uptime)"
    sed -n 's/.*vm-report: /IPGVM REPORT /p' $out
  done
done
echo "IPGVM UPTIME $(cut -d' ' -f1 /proc/uptime)"
echo "IPGVM DONE"
poweroff -f
"#;
