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

/// `w2w serve --listen 127.0.0.1:0 --data <data> <extra…>` (or the
/// `--listen` in `extra`), its log in
/// `<data>.log`; waits for the banner.
fn serve(data: &Path, extra: &[&str]) -> Serve {
    let log = data.with_extension("log");
    let mut cmd = w2w(data.parent().unwrap());
    cmd.arg("serve");
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    let mut child = cmd
        .arg("--data")
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

/// Registers over a plain connection to `relay` while signing `signed` as
/// the URL, as a client behind a TLS-terminating proxy does; returns the
/// refusal.
fn register_signing(relay: &Serve, signed: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = w2w_client::ConnectOptions::new(relay.url.clone());
        let mut ws = w2w_client::connect_raw(&opts).await.unwrap();
        let id = w2w_proto::Identity::from_seed(rand::random());
        let r = w2w_client::register_as(&mut ws, &id, signed, None, w2w_proto::frame::Role::Client)
            .await;
        match r {
            Ok(_) => panic!("registration signing {signed} was accepted"),
            Err(e) => e.to_string(),
        }
    })
}

/// Issue 15: behind a TLS proxy every client failed with wrong_url and the
/// relay logged nothing. Now the refusal is logged at the default level,
/// with the URL the client signed, the one expected and the fix; five
/// more in a row add no line (rate-limited). Logs written to a file carry
/// no colour codes.
#[test]
fn a_wrong_url_refusal_is_logged_once_with_the_signed_url_and_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = serve(&tmp.path().join("data"), &[]);
    let signed = "wss://chat.example.com/";
    for _ in 0..6 {
        let e = register_signing(&relay, signed);
        assert!(e.contains("wrong_url"), "{e}");
    }
    let line = relay.wait_log(&["wrong_url", signed, "--public-url"]);
    assert!(line.contains(&relay.url), "names the URL expected: {line}");
    assert!(line.contains("127.0.0.1"), "names the client's IP: {line}");
    // Let any straggling line reach the file, then count.
    std::thread::sleep(Duration::from_millis(300));
    let log = relay.log();
    assert_eq!(
        log.lines().filter(|l| l.contains("wrong_url")).count(),
        1,
        "one line per reason per 10 s\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}

/// Other refusals are logged too (code and IP), and a relay started with
/// `--public-url` says which URLs it serves.
#[test]
fn refusals_are_logged_with_code_and_ip() {
    let tmp = tempfile::tempdir().unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = free.local_addr().unwrap().to_string();
    drop(free);
    let mut relay = serve(
        &tmp.path().join("data"),
        &[
            "--listen",
            &listen,
            "--public-url",
            "wss://chat.example.com/",
        ],
    );
    assert_eq!(relay.url, "wss://chat.example.com/");
    relay.url = format!("ws://{listen}/");
    let e = register_signing(&relay, &relay.url);
    assert!(e.contains("wrong_url"), "{e}");
    relay.wait_log(&[
        "wrong_url",
        &relay.url,
        "expected=wss://chat.example.com/",
        "--public-url",
    ]);
    // A text frame before registering: refused `text_frame` (8).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use futures_util::SinkExt;
        let opts = w2w_client::ConnectOptions::new(relay.url.clone());
        let mut ws = w2w_client::connect_raw(&opts).await.unwrap();
        let _ = ws.send(tokio_websockets::Message::text("hello")).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            use futures_util::StreamExt;
            while ws.next().await.is_some() {}
        })
        .await;
    });
    relay.wait_log(&["registration refused", "text_frame (8)", "127.0.0.1"]);
}

/// `--log-format json`: every line is one JSON object, with the level, the
/// message and its fields.
#[test]
fn json_log_format_is_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = serve(&tmp.path().join("data"), &["--log-format", "json"]);
    register_signing(&relay, "wss://chat.example.com/");
    relay.wait_log(&["wrong_url"]);
    let log = relay.log();
    let mut found = false;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}"));
        if v["fields"]["reason"] == "wrong_url" {
            assert_eq!(v["level"], "WARN", "{line}");
            assert_eq!(v["fields"]["signed"], "wss://chat.example.com/", "{line}");
            assert!(v["fields"]["message"]
                .as_str()
                .unwrap()
                .contains("--public-url"));
            found = true;
        }
    }
    assert!(found, "{log}");
}

/// Issue 15: a `--peer` to a dead port failed silently at the default log
/// level, and one with the wrong scheme was accepted. Now the dial failure
/// is logged with the URL, the error and a hint, and a wrong scheme is
/// refused at start.
#[test]
fn peer_dial_failures_are_logged_and_a_wrong_scheme_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A port with nothing listening: bind, note, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("ws://{}/", dead.local_addr().unwrap());
    drop(dead);
    let relay = serve(&tmp.path().join("data"), &["--peer", &dead_url]);
    let line = relay.wait_log(&["WARN", "peer link to", &dead_url, "running"]);
    assert!(line.to_lowercase().contains("refused"), "{line}");

    let mut wrong = w2w(tmp.path());
    wrong
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("other"))
        .args(["--peer", "http://127.0.0.1:7777/"]);
    let out = run_bounded(wrong, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with an http:// peer");
    assert!(
        stderr.contains("http://127.0.0.1:7777/") && stderr.contains("ws://"),
        "{stderr}"
    );
}
