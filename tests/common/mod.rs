//! Helpers shared by the integration tests: run the real `keywatch` binary.

#![allow(dead_code)]

pub mod check;
pub mod receivers;
pub mod services;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The built binary.
pub fn keywatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keywatch"))
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keywatch-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `keywatch simulate` with `args`, writing records to `out` (and truth to `truth`).
pub fn simulate(args: &[&str], out: &Path, truth: &Path) {
    let o = keywatch()
        .arg("simulate")
        .args(args)
        .arg("--output")
        .arg(out)
        .arg("--truth")
        .arg(truth)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `keywatch replay` with `args`; returns its output.
pub fn replay(args: &[&str]) -> Output {
    let o = keywatch()
        .arg("replay")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs `keywatch replay ARGS -` with `input` on its standard input; asserts
/// it succeeded and returns its output.
pub fn replay_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = keywatch()
        .arg("replay")
        .args(args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The JSON summary a `--json-summary` replay printed on stderr.
pub fn summary(o: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&o.stderr);
    let last = text.lines().last().expect("a summary line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {text}"))
}
