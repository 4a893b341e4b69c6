//! `cargo xtask ...`: everything a newcomer needs, on a fresh machine.
mod bench;
mod demo;
mod dist;
mod fuzz;
mod image;
mod kubernetes;
mod setup;
mod vm;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "ipguard build, test and demo automation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building the XDP program needs (nightly rust-src,
    /// bpf-linker against the nightly's LLVM); fast when all is there.
    Setup,
    /// Build the `ipguard` binary (release) with the XDP program embedded.
    Build,
    /// Run every test, in two parts. As any user: formatting, clippy, the
    /// eBPF build, unit and property tests, the policy crate on stable
    /// without the BPF toolchain, the command-line tests, the Debian
    /// package, the Kubernetes manifests against the API schemas. As root:
    /// the integration tests (BPF_PROG_TEST_RUN, network namespaces, the
    /// daemon, the container image in podman), then the datapath's on each
    /// supported kernel under qemu (`vm-test`).
    Test {
        /// Run the part that needs no privileges only.
        #[arg(long)]
        unprivileged: bool,
        /// Run the root part's test binaries through this command when not
        /// root, e.g. "sudo -E" (as aya's xtask does).
        #[arg(long, value_name = "CMD")]
        runner: Option<String>,
        /// Extra arguments for the test runner (a test name filter, ...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Boot Debian's kernels (5.10, 6.1, 6.12, newest) under qemu and run
    /// the datapath's root tests inside each.
    VmTest {
        /// Kernels to test: 5.10, 6.1, 6.12, newest (trixie-backports), or
        /// all.
        #[arg(long = "kernel", default_value = "all", value_delimiter = ',')]
        kernels: Vec<String>,
        /// Guests booted at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Accelerator: auto uses KVM only when a probe guest boots with it.
        #[arg(long, value_enum, default_value_t = vm::Accel::Auto)]
        accel: vm::Accel,
        /// Only the tests whose `binary::name` contains this (no spaces).
        #[arg(long)]
        filter: Option<String>,
    },
    /// Run ipguard between two throw-away network namespaces and show what
    /// it passes, what it drops, and `ipguard status`.
    Demo,
    /// Datapath benchmark with BPF_PROG_TEST_RUN (ipguard at 10 to 1M
    /// prefixes, an empty program, xdp-filter); writes target/bench.md.
    Bench {
        /// Extra arguments for the benchmark binary.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The release binary with its completions, manual pages, unit and
    /// example policy as a Debian package: target/dist/ipguard_*.deb.
    Dist {
        /// Also install it into a scratch root and check what it installed
        /// (as `cargo xtask test` does with the debug binary).
        #[arg(long)]
        check: bool,
    },
    /// The container image (packaging/container/Containerfile) from the
    /// static (musl) release binary: ipguard:VERSION.
    Image {
        /// The container tool that builds it: podman or docker (default:
        /// the first of them installed).
        #[arg(long)]
        tool: Option<String>,
    },
    /// Fuzz the policy parser with cargo-fuzz (installs it when missing).
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup().map(|_| ()),
        Cmd::Build => build_release().map(|_| ()),
        Cmd::Test {
            unprivileged,
            runner,
            args,
        } => timed("cargo xtask test", || {
            test(unprivileged, runner.as_deref(), &args)
        }),
        Cmd::VmTest {
            kernels,
            jobs,
            accel,
            filter,
        } => vm::parse_kernels(&kernels).and_then(|kernels| {
            let results = vm::run(&vm::Options {
                kernels,
                filter,
                jobs,
                accel,
            })?;
            vm::report(&results)
        }),
        Cmd::Demo => demo::run(),
        Cmd::Bench { args } => bench::run(&args),
        Cmd::Fuzz { seconds } => fuzz::run(seconds),
        Cmd::Dist { check } => dist::run_dist(check),
        Cmd::Image { tool } => image::run(tool.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command with the tool environment; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// `cargo` through rustup's proxy, so that `+nightly` works, with the
/// tools directory on PATH.
pub fn cargo(tools: &setup::Tools) -> Command {
    let mut c = Command::new("cargo");
    c.env("PATH", tools.path_env());
    c
}

/// Builds the release binary and returns its path.
pub fn build_release() -> Result<std::path::PathBuf> {
    let tools = setup::setup()?;
    run(cargo(&tools).args([
        "build",
        "--release",
        "--package",
        "ipguard-user",
        "--bin",
        "ipguard",
    ]))?;
    Ok(setup::workspace_root()?.join("target/release/ipguard"))
}

fn test(unprivileged: bool, runner: Option<&str>, extra: &[String]) -> Result<()> {
    let tools = setup::setup()?;
    setup::ensure_nextest()?;
    let root = nix_is_root();
    if !unprivileged && !root && runner.is_none() {
        bail!(
            "the integration tests need root (network namespaces, XDP): run `sudo -E cargo xtask test`, pass `--runner \"sudo -E\"`, or run `cargo xtask test --unprivileged` for the rest"
        );
    }
    let host_unprivileged = test_unprivileged(&tools, extra);
    if unprivileged {
        return host_unprivileged;
    }
    host_unprivileged?;
    test_root(&tools, runner.filter(|_| !root), extra)
}

/// Runs `step` and says how long it took: CI has a time budget, and its
/// log then shows where the time went.
fn timed<T>(what: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = std::time::Instant::now();
    let r = step();
    eprintln!(
        "xtask: {what}: {:.0} s{}",
        started.elapsed().as_secs_f64(),
        if r.is_ok() { "" } else { " (failed)" }
    );
    r
}

/// Everything that needs no privileges.
fn test_unprivileged(tools: &setup::Tools, extra: &[String]) -> Result<()> {
    run(cargo(tools).args(["fmt", "--all", "--", "--check"]))
        .context("formatting: run `cargo fmt --all`")?;
    // Default members (the eBPF crate only builds for the BPF target).
    timed("clippy", || {
        run(cargo(tools).args(["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"]))
    })?;
    timed("clippy of the eBPF crate", || {
        run(cargo(tools).args([
            "+nightly",
            "clippy",
            "--quiet",
            "--package",
            "ipguard-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    timed("the policy crate on stable", || {
        policy_without_bpf_toolchain(extra)
    })?;
    // Doc tests first: nextest cannot run them, and its summary line must
    // be the last thing the runner prints.
    timed("doc tests", || {
        run(cargo(tools).args(["test", "--doc", "--quiet"]))
    })?;
    let mut c = cargo(tools);
    c.args([
        "nextest",
        "run",
        "--no-fail-fast",
        "--cargo-quiet",
        "--workspace",
        "--exclude",
        "ipguard-tests",
        "--exclude",
        "ipguard-policy",
    ]);
    c.args(extra);
    timed("unit and command-line tests", || run(&mut c))?;
    // The Debian package, built from the debug binary the tests just
    // built, installed into a scratch root and checked.
    timed("the Debian package", || {
        dist::check(&setup::workspace_root()?.join("target/debug/ipguard"))
    })?;
    timed("the Kubernetes manifests", kubernetes::check)
}

/// The policy crate's tests with stable Rust and without bpf-linker on
/// PATH: the compiler, its property tests and the fuzzer's crate must not
/// need the eBPF toolchain. Its dependency tree must not reach aya either.
fn policy_without_bpf_toolchain(extra: &[String]) -> Result<()> {
    let tree = Command::new("cargo")
        .args([
            "tree",
            "--package",
            "ipguard-policy",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
        ])
        .output()
        .context("cargo tree")?;
    let tree = String::from_utf8_lossy(&tree.stdout);
    if let Some(line) = tree
        .lines()
        .find(|l| l.starts_with("aya") || l.starts_with("ipguard-user"))
    {
        bail!("ipguard-policy depends on {line}: it must build without the eBPF toolchain");
    }
    let path: Vec<std::path::PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .filter(|d| !d.to_string_lossy().contains("ipguard-tools"))
            .collect();
    let mut c = Command::new("cargo");
    c.env("RUSTUP_TOOLCHAIN", "stable")
        .env("PATH", std::env::join_paths(path).context("PATH")?)
        .args([
            "nextest",
            "run",
            "--no-fail-fast",
            "--cargo-quiet",
            "--package",
            "ipguard-policy",
        ])
        .args(extra);
    run(&mut c).context("ipguard-policy on stable, without the BPF toolchain")
}

/// The integration tests, on this kernel and then under qemu; through
/// `runner` when not root.
fn test_root(tools: &setup::Tools, runner: Option<&str>, extra: &[String]) -> Result<()> {
    let runner: Vec<&str> = runner
        .map(|r| r.split_whitespace().collect())
        .unwrap_or_default();
    if runner.is_empty() {
        ipguard_tests::ensure_bpffs()?;
    }
    // The same root tests on every supported kernel, unless a filter
    // asked for a part of the suite. Run as root, the guests boot while
    // the static binary is built (cargo keeps about a third of the CPUs
    // idle there) and the host's tests run, which leave about two thirds
    // idle (they wait on sockets, timers and the daemon): the guests,
    // bound by CPU under emulation, take that. At nice 5 they yield to the
    // host's work without starving (at 19 they got 1.5% of a busy CPU, and
    // a guest's timeouts run on the host's clock). Booting them before
    // the unprivileged part instead, its builds beside them too, was
    // measured no faster (1,174 s for the whole against 1,193 s, of which
    // about 30 s was the static binary losing its debug info): two guests
    // alone leave only about 12% of the CPUs idle. `vm::prepare` builds
    // the test binaries nextest then finds built; the guests themselves run
    // no cargo. A guest that cannot be prepared (a kernel not fetched), or
    // a static binary that does not build, fails the run after the host's
    // tests, so that no guest is left running.
    let guests = (runner.is_empty() && extra.is_empty()).then(|| {
        let prepared = timed("the guests' test binaries and images", || {
            vm::prepare(&vm::Options {
                kernels: vm::KERNELS.to_vec(),
                filter: None,
                jobs: 2,
                accel: vm::Accel::Auto,
            })
        });
        prepared.map(|mut p| {
            p.nice = 5;
            std::thread::spawn(move || timed("the guests", || p.boot_all()))
        })
    });
    // The container test runs the image of the static binary in podman.
    let static_built = timed("the static binary", || {
        setup::ensure_packages(image::RUNTIME_PACKAGES)
            .and_then(|()| image::build_static(tools, false))
    });
    let mut c = cargo(tools);
    c.args([
        "nextest",
        "run",
        "--no-fail-fast",
        "--cargo-quiet",
        "--package",
        "ipguard-tests",
    ]);
    if !runner.is_empty() {
        c.env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER",
            runner.join(" "),
        );
    }
    c.args(extra);
    let host = static_built
        .map(|_| ())
        .and(timed("the host's root tests", || run(&mut c)));
    if !extra.is_empty() {
        return host;
    }
    let print_host = || {
        let host_line = match &host {
            Ok(()) => "passed",
            Err(_) => "FAILED",
        };
        println!(
            "host kernel {}: nextest {host_line} (above)",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
    };
    let vm = if let Some(guests) = guests {
        let results = guests.and_then(|g| {
            g.join()
                .map_err(|_| anyhow::anyhow!("the guests' thread panicked"))
                .and_then(|r| r)
        });
        print_host();
        results.and_then(|r| vm::report(&r))
    } else {
        let exe = std::env::current_exe().context("the xtask binary")?;
        let mut c = Command::new(runner[0]);
        c.args(&runner[1..]).arg(exe).arg("vm-test");
        let r = run(&mut c);
        print_host();
        r
    };
    host.and(vm)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}
