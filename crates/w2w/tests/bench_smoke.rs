//! `w2w bench smoke`: every benchmark, seconds long, as a real process —
//! compare (bare forwarder and w2w relay as child processes, half-rate
//! latency, JSON + SVG), fanout, store, idle and soak, each with its own
//! assertions (messages moved, none lost or duplicated, files written). It
//! keeps the benchmark commands from rotting; the full runs are in
//! docs/PERFORMANCE.md.

use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn bench_smoke_runs_every_benchmark() {
    let home = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_w2w"))
        .args(["bench", "smoke"])
        .env("HOME", home.path())
        .env("W2W_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning w2w bench smoke");
    let pid = child.id();
    // Reads both pipes while waiting, so the child never blocks on them.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(300)) else {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        panic!("bench smoke did not finish within 300 s");
    };
    let out = out.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench smoke failed ({}):\n{stdout}\n{stderr}",
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
