//! The container image and the Kubernetes DaemonSet that runs it: the
//! image's build context (for `cargo xtask image` and the container test),
//! a podman whose storage is the test's own, and the DaemonSet's container
//! read as the arguments of `podman run`, so that the test runs what the
//! manifest says (one source of truth: the capabilities, security
//! settings, mounts, arguments and environment come from the file).
//!
//! podman, not Debian's docker.io: docker.io 20.10 refuses the capability
//! names CAP_BPF and CAP_PERFMON (`invalid CapAdd: unknown capability`),
//! and installing it starts a daemon that configures the root network
//! namespace; podman has no daemon and configures no network for a
//! container that joins a namespace the test made.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The static binary's target: musl, whose getpwuid reads /etc/passwd
/// itself (static glibc needs the NSS modules at run time) and which
/// rustup ships.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
pub const CONTAINERFILE: &str = "packaging/container/Containerfile";
pub const DAEMONSET: &str = "packaging/kubernetes/daemonset.yaml";
/// The build host's CA bundle, which the image carries for `url:` feeds.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the tests crate")
        .to_path_buf()
}

/// The static `ipguard` of this build profile: `cargo xtask test` builds
/// it (`cargo build --target x86_64-unknown-linux-musl -p ipguard-user
/// --bin ipguard`).
pub fn static_bin(profile: &str) -> PathBuf {
    workspace_root()
        .join("target")
        .join(MUSL_TARGET)
        .join(profile)
        .join("ipguard")
}

/// Whether an ELF file asks for a program interpreter (is dynamically
/// linked): a dynamic binary in an image without a loader fails with a
/// bare "no such file or directory". Read with the `object` crate aya
/// already brings.
pub fn has_interpreter(elf: &[u8]) -> Result<bool> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let file = ElfFile64::<object::Endianness>::parse(elf).context("not a 64-bit ELF file")?;
    Ok(file
        .elf_program_headers()
        .iter()
        .any(|ph| ph.p_type(file.endian()) == object::elf::PT_INTERP))
}

/// Stages the image's build context in `dir`: the Containerfile, the
/// binary without its debug information, and the CA bundle.
pub fn stage_context(binary: &Path, dir: &Path) -> Result<()> {
    let bytes = fs::read(binary).with_context(|| {
        format!(
            "{} is missing: build it with `cargo build --target {MUSL_TARGET} -p ipguard-user --bin ipguard` (`cargo xtask test` and `cargo xtask image` do)",
            binary.display()
        )
    })?;
    if has_interpreter(&bytes).with_context(|| binary.display().to_string())? {
        bail!(
            "{} is dynamically linked: the image has no loader; build it for {MUSL_TARGET}",
            binary.display()
        );
    }
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::copy(
        workspace_root().join(CONTAINERFILE),
        dir.join("Containerfile"),
    )
    .context(CONTAINERFILE)?;
    let out = dir.join("ipguard");
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status()
        .context("cannot run strip (binutils)")?;
    if !status.success() {
        bail!("strip {} failed: {status}", binary.display());
    }
    fs::set_permissions(&out, fs::Permissions::from_mode(0o755))?;
    fs::copy(CA_BUNDLE, dir.join("ca-certificates.crt"))
        .with_context(|| format!("{CA_BUNDLE} is missing: install Debian's ca-certificates"))?;
    Ok(())
}

/// podman with storage and temp directories of its own under `dir` and a
/// run root of its own under /run (the machine's are never read or
/// written); on drop, every container it made is removed and the
/// directories with them.
pub struct Podman {
    dir: PathBuf,
    /// The run root: podman refuses one longer than 50 bytes (its sockets
    /// live there), so it is a short directory of ours under /run, where
    /// podman keeps its own, rather than under `dir`.
    runroot: PathBuf,
    /// What of podman's blob-info cache did not exist before (see
    /// [`BLOB_INFO_CACHE`]), innermost first.
    created: Vec<PathBuf>,
}

/// The one file podman writes outside `--root` as root, whatever its
/// options say (containers/image's cache of layer digests); removed with
/// its directories when this instance made them.
const BLOB_INFO_CACHE: &str = "/var/lib/containers/cache/blob-info-cache-v1.boltdb";

impl Podman {
    pub fn new(dir: PathBuf) -> Result<Self> {
        let runroot = Path::new("/run").join(crate::unique("ipgpm"));
        for d in [dir.join("root"), dir.join("tmp"), runroot.clone()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
        }
        let created = Path::new(BLOB_INFO_CACHE)
            .ancestors()
            .take(3)
            .filter(|p| !p.exists())
            .map(Path::to_path_buf)
            .collect();
        Ok(Self {
            dir,
            runroot,
            created,
        })
    }

    /// `podman` with this instance's storage. The vfs driver works on any
    /// file system (overlay needs one that is not overlay itself); the
    /// cgroupfs manager needs no systemd; runc, since crun refuses a
    /// hybrid cgroup hierarchy; events in a file under our directory.
    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--runtime",
                "runc",
            ])
            .stdin(Stdio::null());
        c
    }

    /// Runs `podman ARGS`: its stdout, trimmed; an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command()
            .args(args)
            .output()
            .context("cannot run podman: install Debian's podman and runc")?;
        if !out.status.success() {
            bail!(
                "podman {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A container's output: what it wrote to stdout (ipguard's events)
    /// and to stderr (its log), which `podman logs` keeps apart.
    pub fn logs(&self, name: &str) -> String {
        match self.command().args(["logs", name]).output() {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("podman logs {name}: {e}"),
        }
    }

    /// Builds `context` (with its Containerfile) as `tag`; nothing is
    /// pulled (the image starts from scratch).
    pub fn build(&self, context: &Path, tag: &str) -> Result<()> {
        let ctx = context.to_str().context("a UTF-8 path")?;
        let file = context.join("Containerfile");
        let file = file.to_str().context("a UTF-8 path")?;
        self.run(&[
            "build",
            "--quiet",
            "--pull=never",
            "-f",
            file,
            "-t",
            tag,
            ctx,
        ])
        .map(drop)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["rm", "--force", "--all", "--time", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // podman unmounts what it mounted for a container when it removes
        // it; whatever a failure left mounted goes now, or the directory
        // cannot be removed.
        for d in [&self.dir, &self.runroot] {
            for m in mounts_under(d).into_iter().rev() {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
            let _ = fs::remove_dir_all(d);
        }
        for p in &self.created {
            let _ = fs::remove_file(p).or_else(|_| fs::remove_dir(p));
        }
    }
}

/// Mount points at or under `dir`, outermost first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Where a volume of the pod comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    HostPath(String),
    ConfigMap(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub source: Source,
    pub mount_path: String,
    pub read_only: bool,
}

/// The one container of the DaemonSet, as far as running it goes.
#[derive(Debug, Clone)]
pub struct DaemonSetContainer {
    pub host_network: bool,
    pub args: Vec<String>,
    /// Environment variables and the pod field each is taken from.
    pub env_fields: Vec<(String, String)>,
    pub caps_add: Vec<String>,
    pub caps_drop: Vec<String>,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    pub run_as_user: Option<u64>,
    pub seccomp: Option<String>,
    pub mounts: Vec<Mount>,
    /// The path and container port of the readiness and liveness probes.
    pub readiness: (String, u16),
    pub liveness: (String, u16),
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .context(format!("{what}: not a string"))
            })
            .collect(),
        _ => bail!("{what}: not a list"),
    }
}

impl DaemonSetContainer {
    /// Reads packaging/kubernetes/daemonset.yaml.
    pub fn load() -> Result<Self> {
        let path = workspace_root().join(DAEMONSET);
        let text = fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        Self::parse(&text).with_context(|| path.display().to_string())
    }

    pub fn parse(text: &str) -> Result<Self> {
        let ds: Value = serde_saphyr::from_str(text).context("not YAML")?;
        if ds["kind"] != "DaemonSet" {
            bail!("not a DaemonSet");
        }
        let pod = &ds["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().context("no containers")?;
        let [c] = containers.as_slice() else {
            bail!("{} containers: the test knows one", containers.len());
        };
        let sc = &c["securityContext"];
        let ports: Vec<(String, u16)> = c["ports"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| {
                        Some((
                            p["name"].as_str()?.to_string(),
                            u16::try_from(p["containerPort"].as_u64()?).ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let probe = |name: &str| -> Result<(String, u16)> {
            let g = &c[name]["httpGet"];
            let path = g["path"]
                .as_str()
                .context(format!("{name}: no httpGet path"))?;
            let port = match &g["port"] {
                Value::String(n) => ports
                    .iter()
                    .find(|(p, _)| p == n)
                    .map(|(_, n)| *n)
                    .context(format!("{name}: no port named {n}"))?,
                v => u16::try_from(v.as_u64().context(format!("{name}: no port"))?)?,
            };
            Ok((path.to_string(), port))
        };
        let mut env_fields = Vec::new();
        for e in c["env"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let name = e["name"].as_str().context("env: no name")?;
            let field = e["valueFrom"]["fieldRef"]["fieldPath"]
                .as_str()
                .context(format!("env {name}: only fieldRef values are known here"))?;
            env_fields.push((name.to_string(), field.to_string()));
        }
        let volumes = pod["volumes"].as_array().context("no volumes")?;
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().context("no volumeMounts")? {
            if !m["subPath"].is_null() {
                bail!("volumeMount with subPath: it never sees a ConfigMap's updates");
            }
            let volume = m["name"].as_str().context("volumeMount: no name")?;
            let v = volumes
                .iter()
                .find(|v| v["name"] == volume)
                .context(format!("no volume {volume}"))?;
            let source = if let Some(p) = v["hostPath"]["path"].as_str() {
                Source::HostPath(p.to_string())
            } else if let Some(n) = v["configMap"]["name"].as_str() {
                Source::ConfigMap(n.to_string())
            } else {
                bail!("volume {volume}: only hostPath and configMap volumes are known here");
            };
            mounts.push(Mount {
                volume: volume.to_string(),
                source,
                mount_path: m["mountPath"]
                    .as_str()
                    .context("volumeMount: no mountPath")?
                    .to_string(),
                read_only: m["readOnly"] == true,
            });
        }
        Ok(Self {
            host_network: pod["hostNetwork"] == true,
            args: strings(&c["args"], "args")?,
            env_fields,
            caps_add: strings(&sc["capabilities"]["add"], "capabilities.add")?,
            caps_drop: strings(&sc["capabilities"]["drop"], "capabilities.drop")?,
            read_only_root: sc["readOnlyRootFilesystem"] == true,
            no_new_privileges: sc["allowPrivilegeEscalation"] == false,
            run_as_user: sc["runAsUser"].as_u64(),
            seccomp: sc["seccompProfile"]["type"].as_str().map(str::to_string),
            mounts,
            readiness: probe("readinessProbe")?,
            liveness: probe("livenessProbe")?,
        })
    }

    /// `podman run` options that give the container what the kubelet
    /// would: the network namespace standing in for the node's
    /// (`netns`, for `hostNetwork`), the capabilities and security
    /// settings, each mount from the directory `source_dir` gives for its
    /// volume, and the environment `field` gives for each pod field. Then
    /// the image and the arguments, with `$(VAR)` expanded as Kubernetes
    /// does.
    pub fn podman_run_args(
        &self,
        netns: &Path,
        source_dir: impl Fn(&Mount) -> Result<PathBuf>,
        field: impl Fn(&str) -> Result<String>,
        image: &str,
    ) -> Result<Vec<String>> {
        let mut a = Vec::new();
        if !self.host_network {
            bail!("the DaemonSet does not use the node's network namespace");
        }
        a.push(format!("--network=ns:{}", netns.display()));
        for c in &self.caps_drop {
            a.push(format!("--cap-drop={c}"));
        }
        for c in &self.caps_add {
            a.push(format!("--cap-add={c}"));
        }
        if self.read_only_root {
            a.push("--read-only".into());
        }
        if self.no_new_privileges {
            a.push("--security-opt=no-new-privileges".into());
        }
        if let Some(uid) = self.run_as_user {
            a.push(format!("--user={uid}"));
        }
        match self.seccomp.as_deref() {
            Some("Unconfined") => a.push("--security-opt=seccomp=unconfined".into()),
            None | Some("RuntimeDefault") => {}
            Some(other) => bail!("seccompProfile {other} is not known here"),
        }
        for m in &self.mounts {
            let dir = source_dir(m)?;
            let ro = if m.read_only { ":ro" } else { "" };
            a.push(format!("--volume={}:{}{ro}", dir.display(), m.mount_path));
        }
        let mut env = Vec::new();
        for (name, f) in &self.env_fields {
            let v = field(f)?;
            a.push(format!("--env={name}={v}"));
            env.push((name, v));
        }
        a.push(image.to_string());
        for arg in &self.args {
            let mut arg = arg.clone();
            for (name, v) in &env {
                arg = arg.replace(&format!("$({name})"), v);
            }
            a.push(arg);
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemonset_asks_for_three_capabilities_and_the_host_directories() {
        let c = DaemonSetContainer::load().unwrap();
        assert_eq!(c.caps_drop, ["ALL"]);
        assert_eq!(c.caps_add, ["BPF", "NET_ADMIN", "PERFMON"]);
        assert!(c.read_only_root && c.no_new_privileges && c.host_network);
        let host: Vec<&str> = c
            .mounts
            .iter()
            .filter_map(|m| match &m.source {
                Source::HostPath(p) => Some(p.as_str()),
                Source::ConfigMap(_) => None,
            })
            .collect();
        assert_eq!(host, ["/sys/fs/bpf", "/var/lib/ipguard", "/run/ipguard"]);
        assert_eq!(c.readiness, ("/ready".to_string(), 9477));
        assert_eq!(c.liveness, ("/live".to_string(), 9477));
    }

    #[test]
    fn the_configmaps_policy_passes_check() {
        let text = fs::read_to_string(workspace_root().join("packaging/kubernetes/configmap.yaml"))
            .unwrap();
        let cm: Value = serde_saphyr::from_str(&text).unwrap();
        let policy = cm["data"]["policy.yaml"].as_str().unwrap();
        let dir = crate::scratch_dir("ipgcm");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.yaml");
        fs::write(&file, policy).unwrap();
        let out = Command::new(crate::ipguard_bin())
            .arg("check")
            .arg(&file)
            .output()
            .unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_subpath_mount_is_refused() {
        let text = fs::read_to_string(workspace_root().join(DAEMONSET)).unwrap();
        let bad = text.replace(
            "              mountPath: /etc/ipguard\n",
            "              mountPath: /etc/ipguard\n              subPath: policy.yaml\n",
        );
        assert_ne!(bad, text);
        let e = DaemonSetContainer::parse(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("subPath"), "{e:#}");
    }

    #[test]
    fn a_dynamic_binary_is_told_apart_from_a_static_one() {
        // This test binary is dynamically linked (glibc target).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me).unwrap());
        assert!(has_interpreter(b"#!/bin/sh\n").is_err());
    }
}
