//! `cargo xtask bench`: the datapath benchmark (BPF_PROG_TEST_RUN over
//! 65,536 distinct sources per row; see tests/tests/datapath_bench.rs for
//! what is measured and how), then the daemon's (tests/tests/daemon_bench.rs:
//! list files, a large YAML policy and a batch of denies to applied, and
//! the daemon's memory). Installs xdp-tools (for xdp-filter) when it
//! is missing, runs the benchmark in release mode, and prints the Markdown
//! table it also writes to target/bench.md.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup;

pub fn run(extra: &[String]) -> Result<()> {
    let tools = setup::setup()?;
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads XDP programs: run `sudo -E cargo xtask bench`");
    }
    ensure_xdp_filter()?;
    ipguard_tests::ensure_bpffs()?;
    let out = setup::workspace_root()?.join("target").join("bench.md");
    // `bench` of a test binary of ipguard-tests, in release mode, writing
    // (datapath) or appending (daemon) its table to `out`.
    let bench = |test: &str, extra: &[String]| -> Result<()> {
        let mut c = crate::cargo(&tools);
        c.args([
            "test",
            "--release",
            "--quiet",
            "--package",
            "ipguard-tests",
            "--test",
            test,
            "--",
            "--exact",
            "bench",
            "--nocapture",
            "--test-threads=1",
        ])
        .args(extra)
        .env("IPGUARD_BENCH", "1")
        .env("IPGUARD_BENCH_OUT", &out);
        crate::run(&mut c)
    };
    bench("datapath_bench", extra)?;
    // The daemon's figures, on the release binary its tests start.
    let mut b = crate::cargo(&tools);
    b.args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "ipguard-user",
        "--bin",
        "ipguard",
    ]);
    crate::run(&mut b)?;
    bench("daemon_bench", &[])?;
    println!("(table written to {})", out.display());
    Ok(())
}

/// xdp-filter comes from Debian's xdp-tools package.
fn ensure_xdp_filter() -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", "command -v xdp-filter"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        return Ok(());
    }
    eprintln!("xtask: installing xdp-tools (xdp-filter, the benchmark's reference)");
    crate::run(Command::new("apt-get").args(["update", "-qq"])).context("apt-get update")?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "xdp-tools"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing xdp-tools (Debian or Ubuntu needed, or install xdp-filter yourself)")
}
