//! End to end: the real `w2w` binary, run as separate processes.
//!
//! One relay (`w2w serve --listen 127.0.0.1:0`), a listener
//! (`w2w listen --json --count 3`) and a sender (`w2w send`) that reaches
//! it by a2b, a2g and a2n. Every process gets a fresh temporary HOME and
//! XDG_CONFIG_HOME, so key files and the known-relays pin file never touch
//! the real home directory. Every wait is bounded: a hang fails the test
//! instead of blocking CI, and every child is killed when its guard drops.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_w2w");
/// Upper bound for one short command (send, id, online) to finish.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a long-running process to print an expected line.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// A temporary home for one test: config dir, data dir, key files.
struct TestEnv {
    dir: tempfile::TempDir,
}

impl TestEnv {
    fn new() -> Self {
        TestEnv {
            dir: tempfile::tempdir().expect("creating a temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config_home(&self) -> PathBuf {
        self.path("config")
    }

    /// `w2w` with an isolated environment: no inherited W2W_* or RUST_LOG,
    /// HOME and XDG dirs inside the temp dir, stdin closed.
    fn w2w(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("HOME", self.path("home"))
            .env("XDG_CONFIG_HOME", self.config_home())
            .env("XDG_DATA_HOME", self.path("data-home"))
            .env_remove("W2W_RELAY")
            .env_remove("W2W_ID")
            .env_remove("W2W_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }
}

/// What a finished command printed.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    fn assert_success(&self, what: &str) -> &Self {
        assert!(self.status.success(), "{what} failed\n{}", self.describe());
        self
    }
}

fn args_of(c: &Command) -> String {
    c.get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion, killing it (and failing) after `timeout`.
fn run(mut cmd: Command, timeout: Duration) -> Output {
    let what = args_of(&cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning w2w {what}: {e}"));
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("waiting for w2w") {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "w2w {what} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    out.join().unwrap_or_default(),
                    err.join().unwrap_or_default()
                );
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Lines a child prints, read on a thread: a channel for waiting on them
/// and a transcript for error messages.
struct Lines {
    rx: Receiver<String>,
    all: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    fn spawn(r: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        let all2 = all.clone();
        thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                all2.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx, all }
    }

    fn transcript(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }

    /// The next line, or `None` if the stream ended or `timeout` passed.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Waits for a line containing `needle`; panics with the transcript
    /// (and `context`) if it does not come within `timeout`.
    fn wait_for(&self, needle: &str, timeout: Duration, context: impl Fn() -> String) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(e) => panic!(
                    "no line containing {needle:?} ({e:?} after {timeout:?})\n--- output so far ---\n{}\n{}",
                    self.transcript(),
                    context()
                ),
            }
        }
    }
}

/// A long-running child that is killed when dropped (a failing test must
/// not leave processes behind).
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc { name, child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits at most `timeout` for the process to exit by itself.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            eprintln!("killing {} (pid {})", self.name, self.child.id());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `w2w serve` on a loopback port.
struct Server {
    proc: Proc,
    url: String,
    relay_key: String,
    log: PathBuf,
    _stdout: Lines,
}

impl Server {
    /// Starts `w2w serve` with `args` (plus `--listen 127.0.0.1:0` unless
    /// `listen` is false) and waits for its banner.
    fn start(env: &TestEnv, args: &[&str], listen: bool) -> Server {
        let log = env.path(&format!("serve-{}.log", rand_suffix()));
        let mut cmd = env.w2w();
        cmd.arg("serve");
        if listen {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("creating the serve log"));
        let mut proc = Proc::spawn("w2w serve", cmd);
        let stdout = Lines::spawn(proc.child.stdout.take().expect("stdout"));
        let log_text = || {
            format!(
                "--- serve stderr ---\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        };
        // First line: "w2w relay listening on ws://IP:PORT/".
        let first = stdout
            .next(LINE_TIMEOUT)
            .unwrap_or_else(|| panic!("w2w serve printed no banner\n{}", log_text()));
        let url = first
            .strip_prefix("w2w relay listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}\n{}", log_text()))
            .trim()
            .to_owned();
        assert!(
            url.starts_with("ws://127.0.0.1:") && url.ends_with('/'),
            "unexpected relay URL {url:?}"
        );
        assert!(
            !url.ends_with(":0/"),
            "the URL must name the bound port: {url}"
        );
        let key_line = stdout.wait_for("relay key", LINE_TIMEOUT, log_text);
        let relay_key = key_line
            .split_whitespace()
            .last()
            .expect("relay key value")
            .to_owned();
        assert_hex_address(&relay_key);
        Server {
            proc,
            url,
            relay_key,
            log,
            _stdout: stdout,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `host:port` of the relay.
    fn authority(&self) -> &str {
        self.url.trim_start_matches("ws://").trim_end_matches('/')
    }

    /// A plain HTTP/1.1 GET against the relay's port; returns the status
    /// line and body.
    fn http_get(&self, path: &str) -> (String, String) {
        let mut s = TcpStream::connect(self.authority()).expect("connecting for HTTP");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.authority()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp)
            .unwrap_or_else(|e| panic!("reading the HTTP response for {path}: {e}"));
        let status = resp.lines().next().unwrap_or_default().to_owned();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// SIGTERM, then a bounded wait for a clean exit.
    fn terminate(mut self) {
        let pid = self.proc.pid().to_string();
        let st = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .expect("running kill");
        assert!(st.success(), "kill -TERM {pid} failed");
        let status = self
            .proc
            .wait_timeout(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("w2w serve ignored SIGTERM\n{}", self.log()));
        assert!(
            status.success(),
            "w2w serve exited with {status} after SIGTERM\n{}",
            self.log()
        );
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn assert_hex_address(s: &str) {
    assert!(
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "not a 64-character lowercase hex address: {s:?}"
    );
}

/// `w2w id new --id PATH`; returns the printed address.
fn new_identity(env: &TestEnv, path: &Path) -> String {
    let mut c = env.w2w();
    c.args(["id", "new", "--id"]).arg(path);
    let out = run(c, CMD_TIMEOUT);
    out.assert_success("w2w id new");
    let addr = out.stdout.trim().to_owned();
    assert_hex_address(&addr);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key file {} has mode {mode:o}", path.display());
    }
    addr
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

#[test]
fn relay_send_listen_online_end_to_end() {
    let env = TestEnv::new();
    let data = env.path("relay-data");
    let server = Server::start(&env, &["--data", data.to_str().unwrap()], true);
    let url = server.url.clone();
    assert!(
        data.join("relay.key").exists(),
        "serve creates its key in --data"
    );
    assert!(
        data.join("w2w.sqlite").exists(),
        "serve creates its store in --data"
    );

    // HTTP on the same port.
    let (status, body) = server.http_get("/healthz");
    assert!(status.contains(" 200"), "healthz: {status}");
    assert_eq!(body.trim(), "ok");
    let (status, body) = server.http_get("/.well-known/w2w");
    assert!(status.contains(" 200"), "info document: {status}");
    let info = json(body.trim());
    assert_eq!(info["relay_key"], server.relay_key.as_str());
    assert_eq!(info["urls"][0], url.as_str());
    let (status, body) = server.http_get("/metrics");
    assert!(status.contains(" 200"), "metrics: {status}");
    assert!(body.contains("w2w_connections "), "metrics body:\n{body}");

    // Identities.
    let a_key = env.path("keys/a.key");
    let b_key = env.path("keys/b.key");
    let c_key = env.path("keys/c.key");
    let a = new_identity(&env, &a_key);
    let b = new_identity(&env, &b_key);
    let c = new_identity(&env, &c_key);
    assert!(a != b && b != c && a != c, "identities must differ");

    // `id new` never overwrites a key.
    let before = std::fs::read(&a_key).unwrap();
    let mut cmd = env.w2w();
    cmd.args(["id", "new", "--id"]).arg(&a_key);
    let out = run(cmd, CMD_TIMEOUT);
    assert!(
        !out.status.success(),
        "id new overwrote a key\n{}",
        out.describe()
    );
    assert!(out.stderr.contains("already exists"), "{}", out.describe());
    assert_eq!(std::fs::read(&a_key).unwrap(), before);

    // `id show`, by flag and by W2W_ID.
    let mut cmd = env.w2w();
    cmd.args(["id", "show", "--id"]).arg(&a_key);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("w2w id show --id");
    assert_eq!(out.stdout.trim(), a);
    let mut cmd = env.w2w();
    cmd.args(["id", "show"]).env("W2W_ID", &a_key);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("W2W_ID=... w2w id show");
    assert_eq!(out.stdout.trim(), a);

    // B listens for three messages.
    let mut cmd = env.w2w();
    cmd.args(["listen", "--relay", &url, "--id"])
        .arg(&b_key)
        .args(["--json", "--count", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut listener = Proc::spawn("w2w listen", cmd);
    let l_out = Lines::spawn(listener.child.stdout.take().unwrap());
    let l_err = Lines::spawn(listener.child.stderr.take().unwrap());
    let ready = l_err.wait_for("listening as", LINE_TIMEOUT, || {
        format!("--- serve stderr ---\n{}", server.log())
    });
    assert!(
        ready.contains(&b),
        "listener announces its address: {ready:?}"
    );

    // The pin file was written inside the temp config dir, and pins the key
    // the relay printed.
    let pins_path = env.config_home().join("w2w/known_relays.json");
    let pins = json(
        &std::fs::read_to_string(&pins_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pins_path.display())),
    );
    assert_eq!(pins[&url], server.relay_key.as_str(), "pins: {pins}");

    // `online` (default identity, created under XDG_CONFIG_HOME) lists B.
    let mut cmd = env.w2w();
    cmd.args(["online", "--relay", &url]);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("w2w online");
    let online: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert!(
        online.contains(&b.as_str()),
        "online must list B\n{}",
        out.describe()
    );
    let default_key = env.config_home().join("w2w/id.key");
    assert!(
        default_key.exists(),
        "the default identity lives in XDG_CONFIG_HOME/w2w/id.key\n{}",
        out.describe()
    );

    // a2b: delivered, exit 0.
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", &url, "--id"])
        .arg(&a_key)
        .args(["--to", &b, "hello b"]);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("send a2b");
    assert!(out.stdout.contains("delivered"), "{}", out.describe());
    let a2b_id = out
        .stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();

    // a2g to B and offline C, with W2W_RELAY/W2W_ID instead of flags:
    // partial, exit 2, per-recipient entries in the JSON receipt.
    let mut cmd = env.w2w();
    cmd.env("W2W_RELAY", &url).env("W2W_ID", &a_key).args([
        "send",
        "--json",
        "--to",
        &b,
        "--to",
        &c,
        "hello group",
    ]);
    let out = run(cmd, CMD_TIMEOUT);
    assert_eq!(
        out.code(),
        Some(2),
        "a2g with one offline recipient\n{}",
        out.describe()
    );
    let receipt = json(out.stdout.trim());
    assert_eq!(receipt["status"], "partial", "{receipt}");
    assert_eq!(receipt["delivered"], 1, "{receipt}");
    let entries = receipt["recipients"].as_array().expect("recipients");
    assert_eq!(entries.len(), 2, "{receipt}");
    assert_eq!(entries[0]["to"], b.as_str());
    assert_eq!(entries[0]["status"], "delivered");
    assert_eq!(entries[1]["to"], c.as_str());
    assert_eq!(entries[1]["status"], "no_route");
    assert_eq!(entries[1]["reason"], "no_route");
    let a2g_id = receipt["id"].as_str().unwrap().to_owned();

    // a2n: everyone on the relay (B, and A itself), exit 0.
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", &url, "--id"])
        .arg(&a_key)
        .args(["--json", "--all", "hello all"]);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("send a2n");
    let receipt = json(out.stdout.trim());
    assert_eq!(receipt["status"], "delivered", "{receipt}");
    assert!(receipt["delivered"].as_u64().unwrap() >= 1, "{receipt}");
    let a2n_id = receipt["id"].as_str().unwrap().to_owned();

    // The listener printed three JSON lines and exited 0.
    let status = listener.wait_timeout(LINE_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "listener did not exit after 3 messages\n--- stdout ---\n{}\n--- stderr ---\n{}",
            l_out.transcript(),
            l_err.transcript()
        )
    });
    // The reader thread sees EOF once the process is gone; collect it all.
    let mut got = Vec::new();
    while let Some(line) = l_out.next(Duration::from_secs(5)) {
        got.push(line);
    }
    assert!(
        status.success(),
        "listener exited with {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        l_out.transcript(),
        l_err.transcript()
    );
    assert_eq!(got.len(), 3, "listener output:\n{}", got.join("\n"));
    let expect = [
        ("a2b", "hello b", a2b_id.as_str()),
        ("a2g", "hello group", a2g_id.as_str()),
        ("a2n", "hello all", a2n_id.as_str()),
    ];
    for (line, (route, body, id)) in got.iter().zip(expect) {
        let m = json(line);
        assert_eq!(m["from"], a.as_str(), "{line}");
        assert_eq!(m["route"], route, "{line}");
        assert_eq!(m["body"], body, "{line}");
        assert_eq!(m["id"], id, "the id the sender's receipt named: {line}");
        assert_eq!(m["id"].as_str().map(str::len), Some(32), "{line}");
    }

    // Sending to an address that is not online: no_route, non-zero exit.
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", &url, "--id"])
        .arg(&a_key)
        .args(["--to", &c, "anyone there?"]);
    let out = run(cmd, CMD_TIMEOUT);
    assert!(
        !out.status.success(),
        "send to an offline address must fail\n{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stdout.contains("no_route"), "{}", out.describe());

    // B is gone from `online` once it has left (the relay notices the
    // close asynchronously, so allow it a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = env.w2w();
        cmd.args(["online", "--relay", &url, "--id"]).arg(&a_key);
        let out = run(cmd, CMD_TIMEOUT);
        out.assert_success("w2w online");
        assert!(
            out.stdout.contains(&a),
            "online lists the asker\n{}",
            out.describe()
        );
        if !out.stdout.contains(&b) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B is still online after leaving\n{}",
            out.describe()
        );
        thread::sleep(Duration::from_millis(100));
    }

    // A changed relay key for a pinned URL is refused until accepted.
    let mut forged = serde_json::Map::new();
    forged.insert(url.clone(), serde_json::Value::String(c.clone()));
    std::fs::write(&pins_path, serde_json::Value::Object(forged).to_string()).unwrap();
    let mut cmd = env.w2w();
    cmd.args(["online", "--relay", &url, "--id"]).arg(&a_key);
    let out = run(cmd, CMD_TIMEOUT);
    assert!(
        !out.status.success(),
        "a changed relay key must be refused\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("--accept-new-relay-key"),
        "{}",
        out.describe()
    );
    let mut cmd = env.w2w();
    cmd.args(["online", "--accept-new-relay-key", "--relay", &url, "--id"])
        .arg(&a_key);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("w2w online --accept-new-relay-key");
    let pins = json(&std::fs::read_to_string(&pins_path).unwrap());
    assert_eq!(pins[&url], server.relay_key.as_str(), "re-pinned: {pins}");

    server.terminate();
}

#[test]
fn serve_reads_a_toml_config_file() {
    let env = TestEnv::new();
    let data = env.path("cfg-data");
    let config = env.path("w2w.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
data = "{}"
public_urls = []

[limits]
max_group = 1
max_frame_bytes = 65536
rate_per_sec = 100
rate_burst = 200
"#,
            data.display()
        ),
    )
    .unwrap();
    let server = Server::start(&env, &["--config", config.to_str().unwrap()], false);
    assert!(
        data.join("relay.key").exists(),
        "data dir from the config file"
    );
    let (status, body) = server.http_get("/.well-known/w2w");
    assert!(status.contains(" 200"), "{status}");
    let info = json(body.trim());
    assert_eq!(info["limits"]["max_group"], 1, "{info}");
    assert_eq!(info["limits"]["max_frame_bytes"], 65536, "{info}");
    assert_eq!(info["limits"]["rate_per_sec"], 100, "{info}");

    // max_group = 1: a two-address a2g is rejected (list_too_long), exit 3.
    let a = env.path("a.key");
    let b = new_identity(&env, &env.path("b.key"));
    let c = new_identity(&env, &env.path("c.key"));
    let mut cmd = env.w2w();
    cmd.args(["send", "--json", "--relay", &server.url, "--id"])
        .arg(&a)
        .args(["--to", &b, "--to", &c, "x"]);
    let out = run(cmd, CMD_TIMEOUT);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    let receipt = json(out.stdout.trim());
    assert_eq!(receipt["status"], "rejected", "{receipt}");
    assert_eq!(receipt["reason"], "list_too_long", "{receipt}");
    assert!(
        out.stderr.contains("created identity"),
        "send creates a missing --id key on first use\n{}",
        out.describe()
    );

    // Unknown keys in the config file are an error, not silently ignored.
    let bad = env.path("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\nlisten_port = 1\n").unwrap();
    let mut cmd = env.w2w();
    cmd.args(["serve", "--config"]).arg(&bad);
    let out = run(cmd, CMD_TIMEOUT);
    assert!(!out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains("listen_port"), "{}", out.describe());

    server.terminate();
}

#[test]
fn help_explains_the_commands() {
    let env = TestEnv::new();
    let mut cmd = env.w2w();
    cmd.arg("--help");
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("w2w --help");
    for word in [
        "serve",
        "id",
        "send",
        "listen",
        "online",
        "bench",
        "W2W_RELAY",
        "W2W_ID",
    ] {
        assert!(
            out.stdout.contains(word),
            "--help mentions {word}\n{}",
            out.describe()
        );
    }

    let mut cmd = env.w2w();
    cmd.args(["send", "--help"]);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("w2w send --help");
    for word in [
        "--to",
        "--all",
        "--self",
        "--relay",
        "--id",
        "a2b",
        "a2g",
        "a2n",
        "W2W_RELAY",
    ] {
        assert!(
            out.stdout.contains(word),
            "send --help mentions {word}\n{}",
            out.describe()
        );
    }

    // No subcommand: usage on stderr, non-zero exit.
    let out = run(env.w2w(), CMD_TIMEOUT);
    assert!(!out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains("Usage"), "{}", out.describe());

    // No destination: a clear error, before any network use.
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", "ws://127.0.0.1:9/", "hi"]);
    let out = run(cmd, CMD_TIMEOUT);
    assert!(!out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains("--to"), "{}", out.describe());
}
