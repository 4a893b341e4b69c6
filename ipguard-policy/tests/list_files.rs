//! Groups read from list files (`{ file: PATH }`): what they hold, where
//! their errors point, and how a change of a list file changes the
//! policy's hash.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::SystemTime,
};

use ipguard_common::VERDICT_PASS;
use ipguard_policy::{self as policy, Explainer, GivenLists, Proto, compile};

/// A directory of its own under the target directory (never the shared
/// temp directory), removed when the test ends, failed or not.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "list-files-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const POLICY: &str = "version: 1\ngroups:\n  feed: { file: lists/feed.txt }\n  office: [198.51.100.0/24]\nallow: [feed, office]\n";

const FEED: &str = "# a provider's ranges\n\
                    203.0.113.0/25\n\
                    \n\
                    \x20\x20203.0.113.200-203.0.113.203   # a range, indented\n\
                    2001:db8:1::/48\n\
                    203.0.113.131/31\n";

fn passes(c: &policy::CompiledPolicy, addr: &str) -> bool {
    let e = Explainer::new(c).explain(addr.parse::<IpAddr>().unwrap(), Some((Proto::Tcp, 443)));
    e.verdict == VERDICT_PASS
}

#[test]
fn a_list_file_is_a_group_of_its_lines() {
    let d = Dir::new();
    d.write("lists/feed.txt", FEED);
    let path = d.write("policy.yaml", POLICY);
    let loaded = policy::load_file(&path).expect("valid");
    let c = compile(&loaded.policy, SystemTime::now(), &[]);
    for (addr, want) in [
        ("203.0.113.5", true),
        ("203.0.113.127", true),
        ("203.0.113.128", false),
        ("203.0.113.130", true),
        ("203.0.113.199", false),
        ("203.0.113.201", true),
        ("203.0.113.204", false),
        ("2001:db8:1:ff::1", true),
        ("2001:db8:2::1", false),
        ("198.51.100.9", true),
    ] {
        assert_eq!(passes(&c, addr), want, "{addr}");
    }
    assert_eq!(loaded.lists.len(), 1);
    let l = &loaded.lists[0];
    assert_eq!(l.written, "lists/feed.txt");
    assert_eq!(Path::new(&l.name), d.0.join("lists/feed.txt"));
    assert_eq!(l.sha256, policy::sha256_hex(FEED.as_bytes()));
    // The /25, the range's /30, the /48 and the /31.
    assert_eq!(l.prefixes, 4);
    // The host bits of the last line are the list file's warning.
    let w: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(&format!("{}:6:1: warning:", l.name)) && w[0].contains("203.0.113.130/31"),
        "{w:?}"
    );
}

#[test]
fn errors_name_the_list_file_its_line_and_column() {
    let d = Dir::new();
    d.write(
        "lists/feed.txt",
        "203.0.113.0/24\n   203.0.113.300\nbastion\n\t10.0.0.0/33 # bad\ndns:vpn.example.com\n",
    );
    let path = d.write("policy.yaml", POLICY);
    let e = policy::load_file(&path).unwrap_err().to_string();
    let name = d.0.join("lists/feed.txt").display().to_string();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 4, "{e}");
    assert!(lines[0].starts_with(&format!("{name}:2:4: error:")), "{e}");
    assert!(lines[0].contains("203.0.113.300"), "{e}");
    assert!(lines[1].starts_with(&format!("{name}:3:1: error:")), "{e}");
    assert!(lines[1].contains("not group names"), "{e}");
    assert!(lines[2].starts_with(&format!("{name}:4:2: error:")), "{e}");
    assert!(lines[3].starts_with(&format!("{name}:5:1: error:")), "{e}");
    assert!(lines[3].contains("not DNS names"), "{e}");

    // A missing file is the policy's error, at its `file:`.
    std::fs::remove_file(d.0.join("lists/feed.txt")).unwrap();
    let e = policy::load_file(&path).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}:3:17: error: list file \"lists/feed.txt\": cannot read the list file",
            path.display()
        )),
        "{e}"
    );

    // A generated file wrong on every line: ten errors, then a count.
    let bad: String = (0..25).map(|i| format!("10.0.{i}.0/33\n")).collect();
    d.write("lists/feed.txt", &bad);
    let e = policy::load_file(&path).unwrap_err().to_string();
    assert_eq!(e.lines().count(), 11, "{e}");
    assert!(
        e.ends_with(
            "feed.txt:11:1: error: this line and 14 more are not address items either (only the first 10 are shown)"
        ),
        "{e}"
    );
    // `file:` with nothing.
    let empty = d.write(
        "empty.yaml",
        "version: 1\ngroups:\n  feed: { file: \"\" }\nallow: [feed]\n",
    );
    let e = policy::load_file(&empty).unwrap_err().to_string();
    assert!(e.contains("`file:` needs the path of a list file"), "{e}");
    let e = policy::load_file(&d.write("key.yaml", "version: 1\ngroups:\n  feed: { fil: x }\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("fil"), "{e}");
}

#[test]
fn a_changed_list_file_is_a_changed_policy() {
    let d = Dir::new();
    d.write("lists/feed.txt", FEED);
    let path = d.write("policy.yaml", POLICY);
    let first = policy::load_file(&path).unwrap();
    assert_ne!(first.sha256, policy::sha256_hex(POLICY.as_bytes()));
    assert_eq!(
        policy::current_sha256(&path, &first.lists).as_deref(),
        Some(first.sha256.as_str())
    );
    d.write("lists/feed.txt", &format!("{FEED}198.51.100.0/24\n"));
    let now = policy::current_sha256(&path, &first.lists).unwrap();
    assert_ne!(now, first.sha256, "the list changed");
    let second = policy::load_file(&path).unwrap();
    assert_eq!(second.sha256, now);
    // A policy without list files keeps the file's own hash.
    let plain = d.write("plain.yaml", "version: 1\nallow: [198.51.100.0/24]\n");
    let p = policy::load_file(&plain).unwrap();
    assert_eq!(
        p.sha256,
        policy::sha256_hex(&std::fs::read(&plain).unwrap())
    );
    assert!(p.lists.is_empty());
}

#[test]
fn given_contents_stand_for_the_files_and_nothing_else_is_read() {
    let given = GivenLists(vec![("lists/feed.txt".into(), FEED.as_bytes().to_vec())]);
    let loaded = policy::parse_with("sent.yaml", POLICY, SystemTime::now(), &given).unwrap();
    let c = compile(&loaded.policy, SystemTime::now(), &[]);
    assert!(passes(&c, "203.0.113.5"));
    assert_eq!(loaded.lists[0].name, "lists/feed.txt");
    // Not sent: refused, even where such a file exists on this host.
    let e = policy::parse_str("sent.yaml", POLICY)
        .unwrap_err()
        .to_string();
    assert!(e.contains("was not sent with the policy"), "{e}");
}
