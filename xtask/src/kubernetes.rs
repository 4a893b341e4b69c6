//! The Kubernetes manifests of packaging/kubernetes checked offline: each
//! resource against the API schemas of every Kubernetes release from 1.25
//! (the oldest PyPI's kubernetes-validate ships) to 1.37, strictly (an
//! unknown or misspelt field is an error), and the kustomization against
//! the files beside it. kubernetes-validate is installed once into a
//! virtual environment under target/; the schemas come with it, so the
//! check itself needs no network and no cluster.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::setup;

const VALIDATOR: &str = "kubernetes-validate==1.37.0";
/// Kubernetes minor releases 1.MIN to 1.MAX.
const MIN: u32 = 25;
const MAX: u32 = 37;
const DIR: &str = "packaging/kubernetes";
const KUSTOMIZATION: &str = "kustomization.yaml";

pub fn check() -> Result<()> {
    let root = setup::workspace_root()?;
    let venv = root.join("target/kubernetes-validate");
    let bin = venv.join("bin/kubernetes-validate");
    let stamp = venv.join("installed");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(VALIDATOR) {
        eprintln!(
            "xtask: installing {VALIDATOR} from PyPI into {}",
            venv.display()
        );
        let _ = fs::remove_dir_all(&venv);
        crate::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("python3 -m venv (Debian: python3-venv)")?;
        crate::run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            VALIDATOR,
        ]))?;
        fs::write(&stamp, VALIDATOR)?;
    }
    let dir = root.join(DIR);
    let resources = resources(&dir)?;
    for minor in MIN..=MAX {
        let version = format!("1.{minor}");
        let out = Command::new(&bin)
            .args(["--strict", "--quiet", "--kubernetes-version", &version])
            .args(resources.iter().map(|f| dir.join(f)))
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{DIR} does not validate against Kubernetes {version}: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    println!(
        "xtask: {DIR}: {} valid against Kubernetes 1.{MIN} to 1.{MAX} (strict)",
        resources.join(", ")
    );
    Ok(())
}

/// The kustomization's resources, which must be exactly the other YAML
/// files of the directory: a manifest it leaves out is never applied.
fn resources(dir: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(dir.join(KUSTOMIZATION))
        .with_context(|| format!("{DIR}/{KUSTOMIZATION}"))?;
    let k: serde_json::Value = serde_saphyr::from_str(&text)
        .with_context(|| format!("{DIR}/{KUSTOMIZATION} is not YAML"))?;
    let listed: Vec<String> = k["resources"]
        .as_array()
        .context("the kustomization has no resources")?
        .iter()
        .map(|r| {
            r.as_str()
                .map(str::to_string)
                .context("a resource that is not a file name")
        })
        .collect::<Result<_>>()?;
    let mut present: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != KUSTOMIZATION)
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    if sorted != present {
        bail!(
            "{DIR}/{KUSTOMIZATION} lists {sorted:?} but the directory holds {present:?}: list every manifest"
        );
    }
    Ok(listed)
}
