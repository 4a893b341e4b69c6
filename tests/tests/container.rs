//! The container image in a real container runtime (podman), run as the
//! DaemonSet in packaging/kubernetes says: its capabilities, security
//! settings, mounts, arguments and environment are read from that file.
//!
//! The node is a pair of namespaces the test makes: the container joins
//! the server's network namespace (the DaemonSet's `hostNetwork`), so the
//! runtime configures no network anywhere, and the root namespace is
//! never touched. The node's /sys/fs/bpf is a BPF filesystem mounted for
//! this test alone, its /var/lib/ipguard and /run/ipguard are directories
//! of the test, and the ConfigMap is a directory laid out as the kubelet
//! lays one out. A guard removes the containers, the runtime's storage,
//! the pins and the mount, also when the test fails.

use std::{
    net::SocketAddr,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::Duration,
};

use ipguard_tests::{
    CLIENT_V4, CLIENT_V4_ALT, CLIENT_V6_ALT, Pair, SERVER_V4, SERVER_V6, answers_status, connects,
    container::{DaemonSetContainer, Mount, Podman, Source, stage_context, static_bin},
    http_get, remove_pins, require_root, scratch_dir, tcp_listener, wait_for,
};

const IMAGE: &str = "localhost/ipguard:test";
const PORT: u16 = 7000;

/// The test's node: its directories, its BPF filesystem and its runtime,
/// all removed on drop (the runtime first, so no container holds a pin).
struct Node {
    podman: Option<Podman>,
    dir: PathBuf,
    bpffs: PathBuf,
}

impl Node {
    fn new() -> Self {
        let dir = scratch_dir("ipgct");
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs).unwrap();
        let mut node = Self {
            podman: None,
            dir: dir.clone(),
            bpffs: bpffs.clone(),
        };
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a BPF filesystem for the test");
        node.podman = Some(Podman::new(dir.join("podman")).unwrap());
        node
    }

    fn podman(&self) -> &Podman {
        self.podman.as_ref().expect("podman")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.podman.take());
        // Links first (that detaches the programs), then the maps.
        remove_pins(&self.bpffs.join("ipguard"));
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn policy(iface: &str, extra: &str) -> String {
    format!(
        "version: 1\nmode: enforce\ninterfaces: [{iface}]\nallow:\n  - from: {CLIENT_V4}\n    label: client\n{extra}"
    )
}

/// Writes version `n` of the ConfigMap as the kubelet does: the data in
/// `..N/`, `..data` pointing at it (swapped by a rename), and
/// `policy.yaml -> ..data/policy.yaml`.
fn write_configmap(dir: &Path, n: u32, policy: &str) {
    let v = format!("..v{n}");
    std::fs::create_dir_all(dir.join(&v)).unwrap();
    std::fs::write(dir.join(&v).join("policy.yaml"), policy).unwrap();
    symlink(&v, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if !dir.join("policy.yaml").exists() {
        symlink("..data/policy.yaml", dir.join("policy.yaml")).unwrap();
    }
}

/// The capability sets of a process, from /proc/PID/status.
fn caps(pid: &str) -> Vec<(String, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.to_string(), u64::from_str_radix(v.trim(), 16).unwrap())
        })
        .collect()
}

#[test]
fn the_image_enforces_reloads_and_a_new_container_adopts_the_datapath() {
    require_root();
    let spec = DaemonSetContainer::load().unwrap();
    let pair = Pair::new().unwrap();
    for dst in [SERVER_V4, SERVER_V6] {
        tcp_listener(&pair.server, SocketAddr::new(dst.parse().unwrap(), PORT)).unwrap();
    }
    let node = Node::new();
    let context = node.dir.join("context");
    stage_context(&static_bin("debug"), &context).unwrap();
    node.podman().build(&context, IMAGE).unwrap();

    let cfg = node.dir.join("configmap");
    write_configmap(&cfg, 1, &policy(&pair.server_if, ""));
    let state = node.dir.join("state");
    let run = node.dir.join("run");
    let source_dir = |m: &Mount| -> anyhow::Result<PathBuf> {
        Ok(match &m.source {
            Source::HostPath(p) if p == "/sys/fs/bpf" => node.bpffs.clone(),
            Source::HostPath(p) if p == "/var/lib/ipguard" => state.clone(),
            Source::HostPath(p) if p == "/run/ipguard" => run.clone(),
            Source::ConfigMap(n) if n == "ipguard-policy" => cfg.clone(),
            other => anyhow::bail!("the test has no stand-in for volume {other:?}"),
        })
    };
    for d in [&state, &run] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The node's address: the server's in the pair.
    let field = |f: &str| -> anyhow::Result<String> {
        match f {
            "status.hostIP" => Ok(SERVER_V4.to_string()),
            other => anyhow::bail!("the test has no value for the pod field {other}"),
        }
    };
    let run_args = spec
        .podman_run_args(&pair.server.path(), source_dir, field, IMAGE)
        .unwrap();
    // podman's default limits (a million open files) are above what
    // unprivileged sandboxes such as CI's allow; the daemon needs few.
    let start = |name: &str| {
        let mut a: Vec<String> = ["run", "--detach", "--name", name].map(String::from).into();
        a.extend(["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"].map(String::from));
        a.extend(run_args.iter().cloned());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        node.podman().run(&a).unwrap();
    };
    let socket = run.join("ipguard.sock");
    let logs = |name: &str| node.podman().logs(name);
    let wait_started = |name: &str| {
        wait_for(Duration::from_secs(30), || {
            answers_status(&socket).then_some(())
        })
        .unwrap_or_else(|| panic!("the daemon in {name} did not answer:\n{}", logs(name)));
    };
    let metrics = SocketAddr::new(SERVER_V4.parse().unwrap(), spec.readiness.1);
    let ready = || {
        http_get(&pair, metrics, &spec.readiness.0).is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    };

    start("ipguard-1");
    wait_started("ipguard-1");
    let pid = node
        .podman()
        .run(&["inspect", "--format", "{{.State.Pid}}", "ipguard-1"])
        .unwrap();
    // Exactly the three capabilities, in every set that grants one.
    let three = (1u64 << 39) | (1 << 12) | (1 << 38); // CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON
    for (set, bits) in caps(&pid) {
        match set.as_str() {
            "CapPrm" | "CapEff" | "CapBnd" => {
                assert_eq!(bits, three, "{set} of the daemon in the container")
            }
            "CapInh" | "CapAmb" => assert_eq!(bits, 0, "{set}"),
            _ => {}
        }
    }
    assert!(
        wait_for(Duration::from_secs(10), || ready().then_some(())).is_some(),
        "/ready answers 200 once the mounted policy is in force:\n{}",
        logs("ipguard-1")
    );
    assert!(
        connects(&pair, CLIENT_V4, SERVER_V4, PORT),
        "the allowed source passes"
    );
    assert!(
        !connects(&pair, CLIENT_V4_ALT, SERVER_V4, PORT),
        "another is dropped"
    );

    // A ConfigMap update: the kubelet's directory swap.
    write_configmap(
        &cfg,
        2,
        &policy(
            &pair.server_if,
            "  - from: 203.0.113.0/24\n    label: office\n",
        ),
    );
    assert!(
        wait_for(Duration::from_secs(10), || connects(
            &pair,
            CLIENT_V4_ALT,
            SERVER_V4,
            PORT
        )
        .then_some(()))
        .is_some(),
        "the swapped ConfigMap is enforced:\n{}",
        logs("ipguard-1")
    );
    assert!(ready(), "ready with the new policy");

    // Killed: no daemon runs, the datapath goes on enforcing.
    node.podman()
        .run(&["kill", "--signal", "KILL", "ipguard-1"])
        .unwrap();
    node.podman().run(&["wait", "ipguard-1"]).unwrap();
    node.podman().run(&["rm", "ipguard-1"]).unwrap();
    assert!(!answers_status(&socket), "no daemon answers");
    assert!(
        connects(&pair, CLIENT_V4_ALT, SERVER_V4, PORT),
        "allowed while none runs"
    );
    assert!(
        !connects(&pair, CLIENT_V6_ALT, SERVER_V6, PORT),
        "refused while none runs"
    );
    assert!(node.bpffs.join("ipguard").is_dir(), "the pins stay");

    // The next container adopts it.
    start("ipguard-2");
    wait_started("ipguard-2");
    let log = wait_for(Duration::from_secs(10), || {
        let l = logs("ipguard-2");
        l.contains("took over the running datapath without a gap")
            .then_some(l)
    })
    .unwrap_or_else(|| panic!("the new container adopts:\n{}", logs("ipguard-2")));
    assert!(!log.contains("\"message\":\"attached\""), "{log}");
    assert!(connects(&pair, CLIENT_V4_ALT, SERVER_V4, PORT));
    assert!(!connects(&pair, CLIENT_V6_ALT, SERVER_V6, PORT));
    assert!(
        wait_for(Duration::from_secs(10), || ready().then_some(())).is_some(),
        "the new container is ready"
    );
}
