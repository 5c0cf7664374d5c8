//! `w2w demo` (three federated relays in a line) runs to completion, shows
//! the hops, and exits 0.

use std::process::Command;

#[test]
fn demo_runs_and_exits_zero() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_w2w"))
        .args(["demo", "--log", "warn"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .output()
        .expect("running w2w demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("relay A → relay B"), "{stdout}");
    assert!(stdout.contains("relay B → relay C"), "{stdout}");
    assert!(stdout.contains("relay C ⇒ carol"), "{stdout}");
    assert!(stdout.contains("every message arrived once"), "{stdout}");
}
