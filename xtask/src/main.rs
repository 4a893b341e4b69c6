//! `cargo xtask ...`: everything a newcomer needs, on a fresh machine.
mod bench;
mod demo;
mod fuzz;
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
    /// Run every test: formatting, clippy, unit and property tests, the
    /// eBPF build, the root integration tests in network namespaces, and
    /// those again on each supported kernel under qemu (`vm-test`).
    Test {
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
        Cmd::Test { args } => test(&args),
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

fn test(extra: &[String]) -> Result<()> {
    let tools = setup::setup()?;
    setup::ensure_nextest()?;
    if !nix_is_root() {
        bail!(
            "the integration tests need root (network namespaces, XDP): run `sudo -E cargo xtask test`"
        );
    }
    ipguard_tests::ensure_bpffs()?;
    run(cargo(&tools).args(["fmt", "--all", "--", "--check"]))
        .context("formatting: run `cargo fmt --all`")?;
    // Default members (the eBPF crate only builds for the BPF target).
    run(cargo(&tools).args(["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"]))?;
    run(cargo(&tools).args([
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
    ]))?;
    // Doc tests first: nextest cannot run them, and its summary line must
    // be the last thing the runner prints.
    run(cargo(&tools).args(["test", "--doc", "--quiet"]))?;
    let mut c = cargo(&tools);
    c.args(["nextest", "run", "--no-fail-fast", "--cargo-quiet"]);
    c.args(extra);
    let host = run(&mut c);
    // The same root tests on every supported kernel, unless a filter
    // asked for a part of the suite.
    if !extra.is_empty() {
        return host;
    }
    let results = vm::run(&vm::Options {
        kernels: vm::KERNELS.to_vec(),
        filter: None,
        jobs: 2,
        accel: vm::Accel::Auto,
    });
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
    let vm = results.and_then(|r| vm::report(&r));
    host.and(vm)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}
