//! The operator's view, with real `w2w serve` processes: the data
//! directory's permissions and lock, the log's format, and what the relay
//! logs about refused registrations and failing peer links.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_w2w");

/// A relay child with its stderr (the log) in a file; killed when dropped.
struct Serve {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 20 s) for a log line containing every one of `needles`.
    fn wait_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if let Some(l) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}\n--- log ---\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn w2w(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("cfg"))
        .env("XDG_DATA_HOME", home.join("data-home"))
        .env_remove("W2W_LOG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    c
}

/// `w2w serve --listen 127.0.0.1:0 --data <data> <extra…>`, its log in
/// `<data>.log`; waits for the banner.
fn serve(data: &Path, extra: &[&str]) -> Serve {
    let log = data.with_extension("log");
    let mut child = w2w(data.parent().unwrap())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawning w2w serve");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("w2w relay listening on ")
        .unwrap_or_else(|| {
            panic!(
                "no banner: {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
        .to_owned();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Serve { child, url, log }
}

/// Runs a command that must end by itself within `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Issue 15: the data directory was 0755 and the store 0644 (other users
/// could read every queued message), and two relays could run on one.
#[cfg(unix)]
#[test]
fn data_dir_is_private_and_a_second_relay_on_it_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let first = serve(&data, &[]);
    assert_eq!(mode(&data), 0o700, "data directory");
    for f in ["w2w.sqlite", "relay.key", "lock"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    if data.join("w2w.sqlite-wal").exists() {
        assert_eq!(mode(&data.join("w2w.sqlite-wal")), 0o600, "WAL");
    }

    let mut second = w2w(tmp.path());
    second
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data);
    let out = run_bounded(second, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second relay started: {stderr}");
    assert!(
        stderr.contains(&data.display().to_string())
            && stderr.contains(&format!("pid {}", first.child.id())),
        "the refusal names the directory and the running relay's pid: {stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "the second relay printed a banner"
    );
    drop(first);
    // Once the first is gone, the directory is free again.
    let again = serve(&data, &[]);
    assert!(again.url.starts_with("ws://"));
}

/// A data directory and store left readable by others (an older version,
/// a copy) are tightened at start, with a warning.
#[cfg(unix)]
#[test]
fn a_loose_data_dir_is_tightened_at_start_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = data.join("w2w.sqlite");
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let relay = serve(&data, &[]);
    assert_eq!((mode(&data), mode(&db)), (0o700, 0o600));
    relay.wait_log(&["WARN", "w2w.sqlite", "644"]);
}
