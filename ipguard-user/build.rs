//! Builds the XDP program (ipguard-ebpf) with the nightly toolchain and
//! bpf-linker, so that the `ipguard` binary embeds it: one file is all a
//! server needs. `cargo xtask setup` installs what this needs.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow::anyhow!("ipguard-user has no parent directory"))?;
    let common = root.join("ipguard-common");
    println!("cargo:rerun-if-changed={}", common.display());

    // xtask installs bpf-linker under CARGO_HOME/ipguard-tools/bin; put it
    // on PATH for the nested nightly cargo so a plain `cargo build` works
    // once `cargo xtask setup` has run.
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    println!("cargo:rerun-if-env-changed=CARGO_HOME");
    println!("cargo:rerun-if-env-changed=PATH");
    if let Some(tools) = cargo_home.map(|h| h.join("ipguard-tools").join("bin")) {
        let linker = tools.join("bpf-linker");
        println!("cargo:rerun-if-changed={}", linker.display());
        if linker.exists() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![tools];
            dirs.extend(env::split_paths(&path));
            let joined = env::join_paths(dirs)?;
            // SAFETY: build scripts are single-threaded at this point.
            unsafe { env::set_var("PATH", joined) };
        }
    }

    // aya-build relays every line the nested cargo prints as a warning;
    // keep it to real diagnostics.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };

    share_ebpf_target_dir()?;

    let ebpf = root.join("ipguard-ebpf");
    let ebpf = ebpf
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ipguard-ebpf",
            root_dir: ebpf,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the XDP program failed ({e:#}); run `cargo xtask setup` to install the nightly rust-src component and bpf-linker"
        )
    })
}

/// Makes the nested eBPF build of every run of this script (check, test,
/// the static musl build, release) use one target directory,
/// `<target>/ebpf`, instead of one under each `OUT_DIR`: the object is the
/// same for all of them (always `--release`, for the BPF target), and
/// building it from scratch took about 20 s each time. aya-build passes
/// `OUT_DIR/aya-build/target/ipguard-ebpf` as `--target-dir`; that path
/// becomes a link to the shared one. The nested cargo locks it, so two
/// builds at once wait for each other, and it rebuilds what changed.
/// Without a recognisable target directory the build stays under
/// `OUT_DIR`.
fn share_ebpf_target_dir() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // OUT_DIR is <target>[/<triple>]/<profile>/build/<pkg>-<hash>/out.
    let Some(target) = out
        .ancestors()
        .skip(1)
        .take(6)
        .find(|d| d.join("CACHEDIR.TAG").is_file())
    else {
        return Ok(());
    };
    let shared = target.join("ebpf");
    std::fs::create_dir_all(&shared)?;
    let dir = out.join("aya-build").join("target");
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("ipguard-ebpf");
    match std::fs::read_link(&link) {
        Ok(to) if to == shared => return Ok(()),
        Ok(_) => std::fs::remove_file(&link)?,
        // A directory of an earlier build: replaced by the link.
        Err(_) if link.is_dir() => std::fs::remove_dir_all(&link)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(&shared, &link)?;
    Ok(())
}
