//! `w2w-bench smoke`: every benchmark, seconds long, as a real process —
//! compare (bare forwarder and the `w2w` relay as child processes,
//! half-rate latency, JSON + SVG), fanout, store, idle, federation (3
//! relays from one seed, a restart and a kill: every sampled message
//! taken) and soak, each with its own assertions (messages moved, none
//! lost or duplicated, files written). `curves` runs only by hand. It keeps the benchmark commands from rotting; the full runs
//! are in docs/PERFORMANCE.md.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The `w2w` binary of this build, next to `w2w-bench`. Cargo gives tests
/// only their own package's binaries, so this asks cargo to bring the
/// workspace's test build up to date (it builds `target/<profile>/w2w`),
/// in the environment the outer cargo had.
/// The same command as `cargo test --workspace` (CI), so there it finds
/// everything fresh and takes a moment; a narrower `cargo build -p w2w`
/// would resolve other dependency features and compile w2w once more.
/// After `cargo test -p w2w-bench` alone, the first run builds the rest of
/// the workspace.
fn w2w_bin() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_w2w-bench"));
    let profile_dir = bench.parent().expect("w2w-bench has a directory");
    let target_dir = profile_dir.parent().expect("a target directory");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["test", "--workspace", "--no-run", "--quiet", "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // Not the variables cargo set for this test: build scripts (ring's)
    // rerun when they change, which would rebuild half the workspace.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_EXE_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || k == "CARGO_PRIMARY_PACKAGE"
        {
            cargo.env_remove(&*k);
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        let own: Vec<_> = std::env::split_paths(&paths)
            .filter(|p| !p.starts_with(target_dir))
            .collect();
        match std::env::join_paths(own) {
            Ok(p) if !p.is_empty() => cargo.env("LD_LIBRARY_PATH", p),
            _ => cargo.env_remove("LD_LIBRARY_PATH"),
        };
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("running cargo test --no-run");
    assert!(
        status.success(),
        "cargo test --workspace --no-run: {status}"
    );
    let bin = profile_dir.join(format!("w2w{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "no {}", bin.display());
    bin
}

#[test]
fn smoke_runs_every_benchmark() {
    let w2w = w2w_bin();
    let home = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_w2w-bench"))
        .arg("smoke")
        .arg("--w2w-bin")
        .arg(&w2w)
        .env("HOME", home.path())
        .env("W2W_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning w2w-bench smoke");
    let pid = child.id();
    // Reads both pipes while waiting, so the child never blocks on them.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(300)) else {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        panic!("w2w-bench smoke did not finish within 300 s");
    };
    let out = out.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "w2w-bench smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for line in [
        "bench smoke: all ran, nothing lost or duplicated",
        "w2w / bare forwarder throughput",
        "registrations:",
        "a2n fan-out to",
        "idle registered connections",
        "group commit",
        "soak:",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

/// Without a `w2w` binary to run, the relay benchmarks say how to get one.
#[test]
fn a_missing_w2w_binary_is_explained() {
    let out = Command::new(env!("CARGO_BIN_EXE_w2w-bench"))
        .args([
            "idle",
            "--connections",
            "1",
            "--w2w-bin",
            "/nonexistent/w2w",
        ])
        .env("W2W_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("running w2w-bench idle");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--w2w-bin /nonexistent/w2w: no such file"),
        "{stderr}"
    );
}

#[test]
fn help_lists_every_benchmark() {
    let out = Command::new(env!("CARGO_BIN_EXE_w2w-bench"))
        .arg("--help")
        .output()
        .expect("running w2w-bench --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "compare",
        "fanout",
        "soak",
        "a2b",
        "store",
        "idle",
        "smoke",
        "forwarder",
        "--w2w-bin",
    ] {
        assert!(help.contains(word), "--help mentions {word}:\n{help}");
    }
}
