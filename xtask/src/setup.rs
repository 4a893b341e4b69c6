//! Toolchain bootstrap: idempotent, and fast when everything is there.
//!
//! The XDP program needs the nightly toolchain's `rust-src` (for
//! `-Z build-std=core`) and bpf-linker. No LLVM 21+ is packaged on our
//! machines, so bpf-linker is built against the nightly's own libLLVM: a
//! directory PREFIX/lib with `libLLVM.so` and a SONAME-named symlink to it,
//! then `LLVM_PREFIX=PREFIX cargo install bpf-linker`. It is installed under
//! CARGO_HOME/ipguard-tools (where ipguard-user's build.rs looks), with a
//! stamp naming the LLVM it was built against, so a new nightly rebuilds it
//! and an unchanged one never does.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURE: &str = "llvm-22";
const NIGHTLY: &str = "nightly";

pub struct Tools {
    pub bin: PathBuf,
}

impl Tools {
    /// PATH with the tools directory first.
    pub fn path_env(&self) -> std::ffi::OsString {
        let mut dirs = vec![self.bin.clone()];
        dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        env::join_paths(dirs).unwrap_or_default()
    }
}

pub fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Where xtask keeps what it installs and learns about the machine:
/// CARGO_HOME/ipguard-tools.
pub fn tools_dir() -> Result<PathBuf> {
    Ok(cargo_home()?.join("ipguard-tools"))
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(h) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(h));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn setup() -> Result<Tools> {
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
            .context("the nightly toolchain is needed for the XDP program (`rustup toolchain install nightly`)")?,
    );
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: installing the nightly's rust-src component");
        crate::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }

    let llvm = find_libllvm(&sysroot)?;
    let soname = llvm
        .file_name()
        .context("libLLVM path has no file name")?
        .to_string_lossy()
        .into_owned();
    let root = tools_dir()?;
    let bin = root.join("bin");
    let stamp = root.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} {BPF_LINKER_FEATURE} {soname}\n");
    let have = std::fs::read_to_string(&stamp).unwrap_or_default();
    if have != want || !bin.join("bpf-linker").exists() {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against {soname} (about a minute, once)"
        );
        let prefix = root.join("llvm");
        let lib = prefix.join("lib");
        std::fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
        for name in ["libLLVM.so".to_string(), soname.clone()] {
            let link = lib.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&llvm, &link)
                .with_context(|| format!("symlink {} -> {}", link.display(), llvm.display()))?;
        }
        crate::run(
            Command::new("cargo")
                .env("LLVM_PREFIX", &prefix)
                .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
                .args([
                    "--no-default-features",
                    "--features",
                    BPF_LINKER_FEATURE,
                    "--locked",
                    "--force",
                ])
                .arg("--root")
                .arg(&root),
        )
        .context("building bpf-linker")?;
        std::fs::write(&stamp, want).with_context(|| format!("write {}", stamp.display()))?;
    }
    Ok(Tools { bin })
}

/// The nightly ships libLLVM as `lib/libLLVM.so.<version>-rust-<...>`
/// (that name is also its SONAME).
fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found = None;
    for e in std::fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") {
            found = Some(e.path());
        }
    }
    found.with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain looks incomplete",
            lib.display()
        )
    })
}

/// The test runner; machine images have it, a bare rustup install does not.
pub fn ensure_nextest() -> Result<()> {
    let have = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        eprintln!("xtask: installing cargo-nextest");
        crate::run(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
    }
    Ok(())
}

/// Installs the Debian packages of `packages` (name, a file it installs)
/// whose file is missing, with apt; packages only, no service is started
/// by what this installs.
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "Debian packages missing: install them with `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {} from Debian", missing.join(" "));
    let install = |update: bool| -> Result<()> {
        if update {
            crate::run(Command::new("apt-get").args(["-q", "update"]))?;
        }
        crate::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )
    };
    // Stale package lists name files the mirror no longer has.
    install(false).or_else(|_| install(true))
}
