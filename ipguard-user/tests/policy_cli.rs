//! `ipguard check` and `ipguard explain` as a user runs them: the built
//! binary, its exit codes (docs/cli.md: 0 ok, 1 input refused, 2 usage), its
//! stderr diagnostics and its JSON.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ipguard");

const POLICY: &str = r#"version: 1
mode: enforce
action: reject
groups:
  office: [203.0.113.0/24, "2001:db8:10::/48"]
  admins: [203.0.113.10, 203.0.113.11]
allow:
  - office
  - { from: 192.0.2.77, label: Contractor laptop, until: 2026-12-01T00:00:00Z }
services:
  ssh: { ports: [tcp/22], allow: [admins] }
  web: { ports: [tcp/80, tcp/443, udp/443], allow: [any] }
  metrics: { ports: ["tcp/9100-9110"] }
deny:
  - { from: 203.0.113.66, label: Lost laptop }
always_allow:
  - { from: 198.51.100.250, label: Bastion }
"#;

/// A policy file of its own for each test (tests run in parallel).
fn file(text: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    // Under the target directory, never the shared temp directory.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("policy-{}.yaml", N.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&p, text).unwrap();
    p
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("IPGUARD_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run ipguard");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn check_valid_policy() {
    let p = file(POLICY);
    let o = run(&["check", p.to_str().unwrap()], None);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(": valid"), "{out}");
    assert!(out.contains("ssh      tcp/22"), "{out}");
    assert!(out.contains("metrics  tcp/9100-9110"), "{out}");
    assert!(out.contains("IPv4") && out.contains("IPv6"), "{out}");
}

#[test]
fn check_json_shape_of_a_valid_policy() {
    let p = file("version: 1\nallow:\n  - 203.0.113.7/24\n  - \"2001:db8::/32\"\n");
    let o = run(&["check", "--json", p.to_str().unwrap()], None);
    assert_eq!(code(&o), 0);
    let v = json(&o);
    assert_eq!(v["valid"], true);
    assert_eq!(v["errors"], serde_json::json!([]));
    assert_eq!(
        v["warnings"],
        serde_json::json!([{"line": 3, "column": 5,
            "message": "\"203.0.113.7/24\" has host bits set: it means 203.0.113.0/24"}])
    );
    assert_eq!(v["prefixes"], serde_json::json!({"ipv4": 1, "ipv6": 1}));
    // The warning also goes to stderr, positioned.
    let name = p.display().to_string();
    assert!(
        stderr(&o).contains(&format!(
            "{name}:3:5: warning: \"203.0.113.7/24\" has host bits set"
        )),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_invalid_policy_exits_1_with_positioned_errors() {
    let p = file("version: 1\nallow:\n  - 198.51.100.300\n  - nosuch\n");
    let name = p.display().to_string();
    let o = run(&["check", &name], None);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "{name}:3:5: error: \"198.51.100.300\" is not an IPv4 address"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{name}:4:5: error: unknown group \"nosuch\"")),
        "{err}"
    );
    assert_eq!(stdout(&o), "");
}

#[test]
fn check_json_of_an_invalid_policy() {
    let p = file("allow: [10.0.0.300]\n");
    let o = run(&["check", "--json", p.to_str().unwrap()], None);
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_eq!(v["valid"], false);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{v}");
    // A missing key belongs to no line.
    assert_eq!(errors[0]["line"], Value::Null);
    assert_eq!(errors[0]["column"], Value::Null);
    assert!(errors[0]["message"].as_str().unwrap().contains("version"));
    assert_eq!(errors[1]["line"], 1);
    assert_eq!(errors[1]["column"], 9);
    assert!(v["warnings"].is_array());
    assert!(v["prefixes"]["ipv4"].is_number());
}

#[test]
fn check_missing_file_is_refused() {
    let o = run(
        &["check", "--json", "/nonexistent/ipguard/policy.yaml"],
        None,
    );
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["line"], Value::Null);
}

#[test]
fn check_usage_error_exits_2() {
    let o = run(&["check"], None);
    assert_eq!(code(&o), 2);
}

#[test]
fn explain_readable_line() {
    let p = file(POLICY);
    let o = run(
        &["explain", p.to_str().unwrap(), "203.0.113.9", "tcp/22"],
        None,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "203.0.113.9 tcp/22 -> reject (not in the allowlist of service ssh)\n"
    );
    let o = run(
        &["explain", p.to_str().unwrap(), "203.0.113.9", "udp/53"],
        None,
    );
    assert_eq!(
        stdout(&o),
        "203.0.113.9 udp/53 -> pass (allowed by 203.0.113.0/24 in the host-wide allowlist)\n"
    );
}

#[test]
fn explain_json_fields() {
    let p = file(POLICY);
    let o = run(
        &[
            "explain",
            p.to_str().unwrap(),
            "203.0.113.66",
            "tcp/443",
            "--json",
        ],
        None,
    );
    assert_eq!(code(&o), 0);
    let v = json(&o);
    assert_eq!(v["src"], "203.0.113.66");
    assert_eq!(v["port"], "tcp/443");
    assert_eq!(v["verdict"], "reject");
    assert_eq!(v["reason"], "deny");
    assert_eq!(v["service"], "web");
    assert_eq!(v["entry"], "203.0.113.66/32");
    assert_eq!(v["label"], "Lost laptop");
    let o = run(&["explain", p.to_str().unwrap(), "8.8.8.8", "--json"], None);
    let v = json(&o);
    assert_eq!(v["port"], Value::Null);
    assert_eq!(v["verdict"], "drop", "reject only for tcp queries");
    assert_eq!(v["reason"], "not_allowed");
    assert_eq!(
        (v["service"].clone(), v["entry"].clone(), v["label"].clone()),
        (Value::Null, Value::Null, Value::Null)
    );
}

#[test]
fn explain_at_a_given_time() {
    let p = file(POLICY);
    let q = |at: &str| {
        let o = run(
            &[
                "explain",
                p.to_str().unwrap(),
                "192.0.2.77",
                "tcp/9100",
                "--at",
                at,
                "--json",
            ],
            None,
        );
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        json(&o)
    };
    let before = q("2026-11-30T23:59:59Z");
    assert_eq!(
        (before["verdict"].as_str(), before["label"].as_str()),
        (Some("pass"), Some("Contractor laptop"))
    );
    assert_eq!(before["service"], "metrics");
    let after = q("2026-12-01T00:00:00Z");
    assert_eq!(after["verdict"], "reject");
    let o = run(
        &[
            "explain",
            p.to_str().unwrap(),
            "192.0.2.77",
            "--at",
            "tomorrow",
        ],
        None,
    );
    assert_eq!(code(&o), 2);
}

#[test]
fn explain_stdin_json_lines_in_order() {
    let p = file(POLICY);
    let input = "203.0.113.10 tcp/22\n\n# a comment\n2001:db8:10::5\n198.51.100.250 udp/443\n8.8.8.8 tcp/80\n";
    let o = run(
        &["explain", p.to_str().unwrap(), "--stdin", "--json"],
        Some(input),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    let got: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|v| {
            (
                v["src"].as_str().unwrap(),
                v["verdict"].as_str().unwrap(),
                v["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("203.0.113.10", "pass", "allowed"),
            ("2001:db8:10::5", "pass", "allowed"),
            ("198.51.100.250", "pass", "always_allow"),
            ("8.8.8.8", "pass", "allowed"),
        ]
    );
    for v in &lines {
        for k in [
            "src", "port", "verdict", "reason", "service", "entry", "label",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
    }
    assert_eq!(lines[0]["entry"], "203.0.113.10/32");
    assert_eq!(lines[1]["port"], Value::Null);
}

#[test]
fn explain_stdin_bad_line_gets_an_error_object_and_exit_1() {
    let p = file(POLICY);
    let input = "203.0.113.10 tcp/22\nnot-an-address\n203.0.113.10 icmp/8\n203.0.113.11 tcp/22\n";
    let o = run(
        &["explain", p.to_str().unwrap(), "--stdin", "--json"],
        Some(input),
    );
    assert_eq!(code(&o), 1);
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert!(
        lines[1]["error"]
            .as_str()
            .unwrap()
            .contains("not-an-address")
    );
    assert!(lines[2]["error"].as_str().unwrap().contains("icmp/8"));
    assert_eq!(lines[3]["verdict"], "pass");
}

#[test]
fn explain_usage_errors_exit_2() {
    let p = file(POLICY);
    let path = p.to_str().unwrap();
    assert_eq!(code(&run(&["explain", path, "not-an-ip"], None)), 2);
    assert_eq!(
        code(&run(&["explain", path, "10.0.0.1", "tcp/99999"], None)),
        2
    );
    assert_eq!(
        code(&run(&["explain", path, "10.0.0.1", "sctp/5"], None)),
        2
    );
    // --stdin needs --json (docs/cli.md).
    assert_eq!(code(&run(&["explain", path, "--stdin"], Some(""))), 2);
    assert_eq!(code(&run(&["explain", path], None)), 2);
}

#[test]
fn explain_invalid_policy_exits_1() {
    let p = file("version: 3\n");
    let name = p.display().to_string();
    let o = run(&["explain", &name, "10.0.0.1"], None);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains(&format!("{name}:1:10: error: unsupported version \"3\"")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_non_utf8_file_points_at_the_byte() {
    let p = file("version: 1\nallow: [x]\n");
    std::fs::write(&p, b"version: 1\nallow: [\xff]\n").unwrap();
    let name = p.display().to_string();
    let o = run(&["check", &name], None);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains(&format!("{name}:2:9: error: the policy is not UTF-8")),
        "{}",
        stderr(&o)
    );
}

/// Runs `ipguard ARGS` and kills it if it has not ended within 10 s (a
/// read that blocks must fail the test, not hang it).
fn run_bounded(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("IPGUARD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run ipguard");
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ipguard {args:?} was still running after 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Exit 1 and one error diagnostic (beside `check`'s summary line).
fn one_error_line(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(code(o), 1, "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(errors.len(), 1, "not one error line: {err}");
    assert!(errors[0].contains(needle), "{needle:?} not in {err}");
}

/// A FIFO in place of the policy blocked `check`, `run` and every reload
/// on open; it is refused at once, naming the file.
#[test]
fn a_policy_that_is_not_a_regular_file_is_refused_without_blocking() {
    let p = file("");
    std::fs::remove_file(&p).unwrap();
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let o = run_bounded(&["check", p.to_str().unwrap()], &[]);
    one_error_line(&o, "not a regular file");
    assert!(stderr(&o).contains(p.to_str().unwrap()), "{}", stderr(&o));
    let dir = p.parent().unwrap();
    let o = run_bounded(&["check", dir.to_str().unwrap()], &[]);
    one_error_line(&o, "not a regular file");
    std::fs::remove_file(&p).unwrap();
}

/// Files over the size limit are refused before they are read, naming the
/// file and the limit; the limit can be raised.
#[test]
fn a_policy_over_the_size_limit_is_refused() {
    let p = file(POLICY);
    let o = run_bounded(
        &["check", p.to_str().unwrap()],
        &[("IPGUARD_MAX_POLICY_BYTES", "100")],
    );
    one_error_line(&o, "larger than the limit of 100 bytes");
    assert!(stderr(&o).contains(p.to_str().unwrap()), "{}", stderr(&o));
    assert!(stderr(&o).contains("IPGUARD_MAX_POLICY_BYTES"));
    let o = run_bounded(
        &["check", p.to_str().unwrap()],
        &[("IPGUARD_MAX_POLICY_BYTES", "1000000")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run_bounded(
        &["check", p.to_str().unwrap()],
        &[("IPGUARD_MAX_POLICY_BYTES", "lots")],
    );
    one_error_line(&o, "is not a number of bytes");
}

/// Aliases of one list in many groups: 300 aliases of a 300-address list
/// are 90,000 addresses from a file of 9 KB (quadratic; nesting makes it
/// exponential). The parser's budget grows with the file only: refused,
/// naming the file, with the YAML way out.
#[test]
fn aliases_cannot_expand_a_small_file() {
    let (k, m) = (300, 300);
    let items: Vec<String> = (0..k)
        .map(|i| format!("203.0.{}.{}", i / 256, i % 256))
        .collect();
    let mut text = format!("version: 1\ngroups:\n  g0: &g0 [{}]\n", items.join(", "));
    for i in 1..m {
        text.push_str(&format!("  g{i}: *g0\n"));
    }
    let names: Vec<String> = (0..m).map(|i| format!("g{i}")).collect();
    text.push_str(&format!("allow: [{}]\n", names.join(", ")));
    let p = file(&text);
    let o = run_bounded(&["check", p.to_str().unwrap()], &[]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(p.to_str().unwrap()), "{err}");
    assert!(err.contains("through anchors and aliases"), "{err}");
    // The list itself, named once, is a valid policy.
    let flat = format!("version: 1\nallow: [{}]\n", items.join(", "));
    let o = run_bounded(&["check", file(&flat).to_str().unwrap()], &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn diff_of_two_files_without_a_daemon() {
    let old = file(POLICY);
    let new = file(&POLICY.replace("  - { from: 203.0.113.66, label: Lost laptop }\n", ""));
    let (o, n) = (old.to_str().unwrap(), new.to_str().unwrap());
    let out = run(
        &[
            "diff",
            o,
            n,
            "--json",
            "--socket",
            "/nonexistent/ipguard.sock",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["lists"][0]["list"], "deny", "{v}");
    assert_eq!(
        v["lists"][0]["removed"],
        serde_json::json!(["203.0.113.66/32"]),
        "{v}"
    );
    assert!(v["verdicts"].is_null(), "no daemon, no recent sources: {v}");
    let out = run(
        &["diff", o, n, "--socket", "/nonexistent/ipguard.sock"],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("  deny: -203.0.113.66/32"), "{text}");
    assert!(
        text.contains("no daemon answers at /nonexistent/ipguard.sock"),
        "{text}"
    );
    let out = run(
        &["diff", o, o, "--socket", "/nonexistent/ipguard.sock"],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no difference"), "{text}");
    // A file with errors is refused as `check` refuses it.
    let bad = file("version: 1\nallow: [198.51.100.300]\n");
    let out = run(&["diff", o, bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("198.51.100.300"));
}

#[test]
fn completions_and_manual_pages_come_from_the_definitions() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ipguard"),
        ("fish", "complete -c ipguard"),
    ] {
        let out = run(&["completions", shell], None);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        for sub in ["check", "diff", "rollback", "history", "explain"] {
            assert!(text.contains(sub), "{shell} completes {sub}");
        }
    }
    // The bash script is valid bash.
    let out = run(&["completions", "bash"], None);
    let script = file(&String::from_utf8_lossy(&out.stdout));
    let st = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(st.success(), "bash -n {}", script.display());

    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = run(&["manpage", "--dir", dir.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "ipguard.1",
        "ipguard-run.1",
        "ipguard-diff.1",
        "ipguard-rollback.1",
    ] {
        let path = dir.join(page);
        // `man ./ipguard.1` renders it (man-db, as Debian installs it).
        let out = Command::new("man")
            .arg("-l")
            .arg(&path)
            .env("MANWIDTH", "80")
            .output()
            .expect("man (man-db) is installed");
        // Bold and underline come as overstrikes (`X\x08X`): read the text.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&out.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        assert!(
            out.status.success() && text.contains("SYNOPSIS"),
            "{page}: {text}"
        );
    }
    let run_page = std::fs::read_to_string(dir.join("ipguard-run.1")).unwrap();
    assert!(
        run_page.contains("resolv\\-conf"),
        "run's options are in its page"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
