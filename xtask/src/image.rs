//! `cargo xtask image`: ipguard's container image
//! (packaging/container/Containerfile) from the static binary, built with
//! podman or docker; and what the container test needs on the host.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};
use ipguard_tests::container::{MUSL_TARGET, stage_context, static_bin};

use crate::setup::{self, Tools};

/// The container test's runtime (tests/tests/container.rs says why podman
/// and runc).
pub const RUNTIME_PACKAGES: &[(&str, &str)] =
    &[("podman", "/usr/bin/podman"), ("runc", "/usr/sbin/runc")];
/// musl-gcc for the C and assembly of ring (rustls' crypto), strip for
/// the image's binary.
const STATIC_PACKAGES: &[(&str, &str)] = &[
    ("musl-tools", "/usr/bin/musl-gcc"),
    ("binutils", "/usr/bin/strip"),
];

/// Builds the static `ipguard` (musl) and returns its path.
pub fn build_static(tools: &Tools, release: bool) -> Result<PathBuf> {
    setup::ensure_packages(STATIC_PACKAGES)?;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup target list")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == MUSL_TARGET)
    {
        eprintln!("xtask: installing the {MUSL_TARGET} target");
        crate::run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    let mut c = crate::cargo(tools);
    c.args([
        "build",
        "--quiet",
        "--target",
        MUSL_TARGET,
        "--package",
        "ipguard-user",
        "--bin",
        "ipguard",
    ]);
    if release {
        c.arg("--release");
    } else {
        // The container test's binary: no debug info, which nobody reads
        // there and which took a sixth of this build's CPU.
        c.env("CARGO_PROFILE_DEV_DEBUG", "0");
    }
    crate::run(&mut c).context("the static binary")?;
    Ok(static_bin(if release { "release" } else { "debug" }))
}

/// `cargo xtask image [--tool podman|docker]`: ipguard:VERSION.
pub fn run(tool: Option<&str>) -> Result<()> {
    let tools = setup::setup()?;
    let binary = build_static(&tools, true)?;
    let context = setup::workspace_root()?.join("target/image/context");
    stage_context(&binary, &context)?;
    let tool = match tool {
        Some(t) => t.to_string(),
        None => ["podman", "docker"]
            .into_iter()
            .find(|t| {
                Command::new(t)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .context("neither podman nor docker is installed: install one (Debian: podman), or pass --tool")?
            .to_string(),
    };
    let tag = format!("ipguard:{}", env!("CARGO_PKG_VERSION"));
    let ctx = context.to_str().context("a UTF-8 path")?;
    crate::run(Command::new(&tool).args([
        "build",
        "-f",
        &format!("{ctx}/Containerfile"),
        "-t",
        &tag,
        ctx,
    ]))?;
    let size = std::fs::metadata(context.join("ipguard"))?.len();
    println!(
        "xtask: {tool} image {tag}: the static binary ({:.1} MB) and the CA bundle",
        size as f64 / 1e6
    );
    Ok(())
}
