//! `cargo xtask fuzz [SECONDS]`: fuzz the policy parser (fuzz/, cargo-fuzz,
//! nightly) for that long, with a corpus seeded from the examples of
//! docs/policy.md. Installs cargo-fuzz first if it is missing.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

const TARGET: &str = "policy_parser";

fn root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn cargo_fuzz_installed() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The ```yaml blocks of docs/policy.md, in order.
fn doc_examples(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in doc.lines() {
        let fence = line.trim_start().starts_with("```");
        match cur.as_mut() {
            None if fence && line.trim() == "```yaml" => cur = Some(String::new()),
            Some(b) if fence => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// Writes the docs' examples into the corpus (`docs-N.yaml`), so that the
/// fuzzer starts from policies an operator actually writes.
fn seed(root: &Path) -> Result<PathBuf> {
    let corpus = root.join("fuzz").join("corpus").join(TARGET);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let doc_path = root.join("docs").join("policy.md");
    let doc = std::fs::read_to_string(&doc_path)
        .with_context(|| format!("cannot read {}", doc_path.display()))?;
    for (i, example) in doc_examples(&doc).iter().enumerate() {
        let path = corpus.join(format!("docs-{i:02}.yaml"));
        if std::fs::read_to_string(&path).ok().as_deref() != Some(example.as_str()) {
            std::fs::write(&path, example)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(corpus)
}

/// Fuzzes the policy parser for `seconds`; fails if the fuzzer found a
/// crash (its input is then under fuzz/artifacts/policy_parser/).
pub fn run(seconds: u64) -> Result<()> {
    let root = root()?;
    if !cargo_fuzz_installed() {
        eprintln!("xtask: installing cargo-fuzz");
        crate::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let seeds = seed(&root)?;
    // New inputs go to a working corpus under fuzz/target (not committed);
    // the seeds in fuzz/corpus stay as written.
    let work = root.join("fuzz").join("target").join("corpus").join(TARGET);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let dict = root.join("fuzz").join("policy.dict");
    let status = Command::new("cargo")
        .current_dir(&root)
        .args(["+nightly", "fuzz", "run", TARGET])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-dict={}", dict.display()))
        // Policies are small; longer inputs only slow the search down.
        .arg("-max_len=8192")
        .status()
        .context("cannot start cargo +nightly fuzz")?;
    if !status.success() {
        bail!(
            "the fuzzer failed ({status}); a crashing input is kept under {}",
            root.join("fuzz/artifacts").join(TARGET).display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_extracted_from_markdown() {
        let doc = "text\n```yaml\nversion: 1\n```\n```sh\nls\n```\n```yaml\na: 1\nb: 2\n```\n";
        assert_eq!(doc_examples(doc), ["version: 1\n", "a: 1\nb: 2\n"]);
    }
}
