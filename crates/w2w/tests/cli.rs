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
        let mut cmd = env.w2w();
        cmd.arg("serve");
        if listen {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args);
        Server::spawn(env, cmd)
    }

    /// Runs `cmd` (a `w2w serve ...`) and waits for its banner.
    fn spawn(env: &TestEnv, mut cmd: Command) -> Server {
        let log = env.path(&format!("serve-{}.log", rand_suffix()));
        cmd.stdout(Stdio::piped())
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
            (url.starts_with("ws://127.0.0.1:") || url.starts_with("wss://127.0.0.1:"))
                && url.ends_with('/'),
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
        self.url
            .trim_start_matches("wss://")
            .trim_start_matches("ws://")
            .trim_end_matches('/')
    }

    fn port(&self) -> u16 {
        self.authority()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("URL ends in :PORT/")
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

    // `online` with the default identity: refused until `w2w id new` made
    // it (under XDG_CONFIG_HOME); then it lists B.
    let default_key = env.config_home().join("w2w/id.key");
    let mut cmd = env.w2w();
    cmd.args(["online", "--relay", &url]);
    let out = run(cmd, CMD_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("w2w id new") && !default_key.exists(),
        "no identity: say how to make one, create nothing\n{}",
        out.describe()
    );
    let mut cmd = env.w2w();
    cmd.args(["id", "new"]);
    run(cmd, CMD_TIMEOUT).assert_success("w2w id new (default path)");
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
    // partial, exit 4, per-recipient entries in the JSON receipt.
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
        Some(4),
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
    assert_eq!(out.code(), Some(4), "{}", out.describe());
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
            !out.stdout.contains(&a),
            "online asks from a send-only session, which is not online\n{}",
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
    new_identity(&env, &a);
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
        "demo",
        "W2W_RELAY",
        "W2W_ID",
    ] {
        assert!(
            out.stdout.contains(word),
            "--help mentions {word}\n{}",
            out.describe()
        );
    }
    // Sessions: several per key, and the two listen flags.
    assert!(
        out.stdout.contains("several sessions") && out.stdout.contains("--exclusive"),
        "--help says how sessions work\n{}",
        out.describe()
    );
    let mut listen_help = env.w2w();
    listen_help.args(["listen", "--help"]);
    let lh = run(listen_help, CMD_TIMEOUT);
    assert!(
        lh.stdout.contains("--exclusive") && lh.stdout.contains("--also"),
        "listen --help\n{}",
        lh.describe()
    );
    // The benchmarks are their own binary (crates/w2w-bench).
    assert!(
        !out.stdout.contains("bench"),
        "--help has no bench\n{}",
        out.describe()
    );

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

    // The exit codes are in --help, as in the README.
    let mut cmd = env.w2w();
    cmd.arg("--help");
    let help = run(cmd, CMD_TIMEOUT).stdout;
    let mut cmd = env.w2w();
    cmd.args(["send", "--help"]);
    let send_help = run(cmd, CMD_TIMEOUT).stdout;
    for text in [&help, &send_help] {
        for line in [
            "Exit codes:",
            "0  success",
            "1  error",
            "2  usage",
            "3  send: the message was rejected",
            "4  send: not delivered",
        ] {
            assert!(text.contains(line), "--help names {line:?}\n{text}");
        }
    }

    // No subcommand: usage on stderr, exit 2.
    let out = run(env.w2w(), CMD_TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("Usage"), "{}", out.describe());

    // No destination: a usage error (2), before any network use or key.
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", "ws://127.0.0.1:9/", "hi"]);
    let out = run(cmd, CMD_TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--to"), "{}", out.describe());
}

/// A port nothing listens on right now (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// The error a command printed: exactly one line on stderr, starting
/// with `error: `.
fn one_error_line(out: &Output) -> String {
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "an error is one line on stderr\n{}",
        out.describe()
    );
    assert!(lines[0].starts_with("error: "), "{}", out.describe());
    lines[0].to_owned()
}

#[test]
fn errors_are_one_line_with_a_hint() {
    let env = TestEnv::new();
    let key = env.path("me.key");
    new_identity(&env, &key);
    let online = |relay: &str, extra: &[&str]| {
        let mut cmd = env.w2w();
        cmd.args(["online", "--relay", relay, "--id"])
            .arg(&key)
            .args(extra);
        run(cmd, CMD_TIMEOUT)
    };

    // Nothing listening: is the relay running?
    let url = format!("ws://127.0.0.1:{}/", free_port());
    let out = online(&url, &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = one_error_line(&out);
    assert!(line.contains("is the relay running?"), "{line}");
    assert!(line.contains("w2w serve"), "{line}");
    assert_eq!(
        line.matches("refused").count(),
        1,
        "the cause is said once: {line}"
    );
    assert_eq!(
        line.matches(&url).count(),
        1,
        "the URL is said once: {line}"
    );
    // Word for word the line the README shows (its port is 7777).
    if cfg!(target_os = "linux") {
        let readme = readme_blocks("The CLI", "text")
            .iter()
            .flat_map(|b| b.lines().map(str::to_owned).collect::<Vec<_>>())
            .find(|l| l.starts_with("error: connecting to"))
            .expect("the README shows a connection error");
        let authority = url.trim_start_matches("ws://").trim_end_matches('/');
        assert_eq!(line, readme.replace("127.0.0.1:7777", authority));
    }

    // wss:// to a relay without TLS.
    let plain = Server::start(&env, &["--data", env.path("plain").to_str().unwrap()], true);
    let wss = plain.url.replacen("ws://", "wss://", 1);
    let out = online(&wss, &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = one_error_line(&out);
    assert!(line.contains("does not speak TLS"), "{line}");
    assert!(line.contains("Use ws://"), "{line}");
    assert!(line.matches("InvalidContentType").count() <= 1, "{line}");

    // A second relay on the same port.
    let mut cmd = env.w2w();
    cmd.args(["serve", "--listen", plain.authority(), "--data"])
        .arg(env.path("second"));
    let out = run(cmd, CMD_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: binding") && last.contains("choose another with --listen"),
        "{}",
        out.describe()
    );

    // ws:// to a relay with TLS, and wss:// to it without --ca.
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("a self-signed certificate");
    let (cert, tls_key) = (env.path("cert.pem"), env.path("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&tls_key, ck.signing_key.serialize_pem()).unwrap();
    let tls = Server::start(
        &env,
        &[
            "--data",
            env.path("tls").to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            tls_key.to_str().unwrap(),
        ],
        true,
    );
    assert!(tls.url.starts_with("wss://"), "{}", tls.url);
    let ws = tls.url.replacen("wss://", "ws://", 1);
    let out = online(&ws, &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = one_error_line(&out);
    assert!(line.contains("TLS? Use wss://"), "{line}");
    let out = online(&tls.url, &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = one_error_line(&out);
    assert!(line.contains("--ca"), "{line}");
    let out = online(&tls.url, &["--ca", cert.to_str().unwrap()]);
    out.assert_success("online with --ca");

    // Not a relay URL at all.
    let out = online("http://127.0.0.1:1/", &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = one_error_line(&out);
    assert!(line.contains("ws://127.0.0.1:7777/"), "{line}");

    // A relay that answers HTTP but is not a WebSocket endpoint.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_url = format!("ws://{}/", http.local_addr().unwrap());
    let server = thread::spawn(move || {
        if let Ok((mut s, _)) = http.accept() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let out = online(&http_url, &[]);
    let _ = server.join();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = one_error_line(&out);
    assert!(line.contains("not as a WebSocket relay"), "{line}");

    // The relay refuses the URL it was dialled under (its --public-url).
    let port = free_port().to_string();
    let _strict = Server::start(
        &env,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data",
            env.path("strict").to_str().unwrap(),
            "--public-url",
            "ws://127.0.0.1:1/",
        ],
        false,
    );
    let out = online(&format!("ws://127.0.0.1:{port}/"), &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = one_error_line(&out);
    assert!(line.contains("wrong_url"), "{line}");
    assert!(line.contains("--public-url"), "{line}");
}

#[test]
fn only_id_new_creates_a_key() {
    let env = TestEnv::new();
    let server = Server::start(&env, &["--data", env.path("d").to_str().unwrap()], true);
    let typo = env.path("alcie.key");
    for args in [
        vec!["online"],
        vec!["listen", "--count", "1"],
        vec!["send", "--self", "hi"],
        vec!["lookup", &server.relay_key],
        vec!["group", "create", "team"],
    ] {
        let mut cmd = env.w2w();
        cmd.args(&args)
            .args(["--relay", &server.url, "--id"])
            .arg(&typo);
        let out = run(cmd, CMD_TIMEOUT);
        assert_eq!(out.code(), Some(1), "{args:?}\n{}", out.describe());
        let line = one_error_line(&out);
        assert!(
            line.contains(&format!("w2w id new --id {}", typo.display())),
            "{args:?}: say how to make it: {line}"
        );
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
    // The default identity too, and `id show`.
    let mut cmd = env.w2w();
    cmd.args(["id", "show"]);
    let out = run(cmd, CMD_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        one_error_line(&out).contains("create one with: w2w id new"),
        "{}",
        out.describe()
    );
    assert!(!env.config_home().join("w2w/id.key").exists());
}

#[test]
fn listen_prints_one_escaped_line_per_message_and_exact_json() {
    let env = TestEnv::new();
    let server = Server::start(&env, &["--data", env.path("d").to_str().unwrap()], true);
    let (a_key, b_key, c_key) = (env.path("a.key"), env.path("b.key"), env.path("c.key"));
    let a = new_identity(&env, &a_key);
    let b = new_identity(&env, &b_key);
    let c = new_identity(&env, &c_key);
    let listen = |key: &Path, json: bool| {
        let mut cmd = env.w2w();
        cmd.args(["listen", "--relay", &server.url, "--count", "2", "--id"])
            .arg(key)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if json {
            cmd.arg("--json");
        }
        let mut p = Proc::spawn("w2w listen", cmd);
        let out = Lines::spawn(p.child.stdout.take().unwrap());
        let err = Lines::spawn(p.child.stderr.take().unwrap());
        err.wait_for("listening as", LINE_TIMEOUT, || server.log());
        (p, out, err)
    };
    let (mut human, h_out, h_err) = listen(&b_key, false);
    let (mut json_l, j_out, j_err) = listen(&c_key, true);

    // A body that tries to fake a second message from someone else, paint
    // the terminal, and reverse the text after it.
    let fake = format!("hi\na2g [sealed] {c} I am C\x1b[31m red\\n \u{202e}x\tend");
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", &server.url, "--id"])
        .arg(&a_key)
        .args(["--to", &b, "--to", &c, &fake]);
    run(cmd, CMD_TIMEOUT).assert_success("send the fake");
    // Not UTF-8, through standard input.
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", &server.url, "--id"])
        .arg(&a_key)
        .args(["--to", &b, "--to", &c])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning send");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\xff\x00ok")
        .unwrap();
    assert!(child.wait().unwrap().success(), "send of non-UTF-8");

    let collect = |p: &mut Proc, out: &Lines, err: &Lines| {
        let st = p.wait_timeout(LINE_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "listener did not exit\n{}\n{}",
                out.transcript(),
                err.transcript()
            )
        });
        assert!(st.success(), "{}", err.transcript());
        let mut got = Vec::new();
        while let Some(l) = out.next(Duration::from_secs(5)) {
            got.push(l);
        }
        got
    };
    let lines = collect(&mut human, &h_out, &h_err);
    assert_eq!(
        lines,
        [
            format!("a2g [sealed] {a} hi\\na2g [sealed] {c} I am C\\u{{1b}}[31m red\\\\n \\u{{202e}}x\\tend"),
            format!("a2g [sealed] {a} \\xff\\u{{0}}ok"),
        ],
        "one escaped line per message"
    );
    let lines = collect(&mut json_l, &j_out, &j_err);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(json(&lines[0])["body"], fake.as_str(), "JSON is exact");
    assert_eq!(json(&lines[1])["body_hex"], "ff006f6b", "JSON is exact");
}

#[test]
fn listen_flag_takes_a_port_or_a_host_name() {
    let env = TestEnv::new();
    let port = free_port();
    let mut cmd = env.w2w();
    cmd.args(["serve", "--listen", &port.to_string(), "--data"])
        .arg(env.path("a"));
    let a = Server::spawn(&env, cmd);
    assert_eq!(a.url, format!("ws://127.0.0.1:{port}/"));

    let port = free_port();
    let mut cmd = env.w2w();
    cmd.args(["serve", "--listen", &format!("localhost:{port}"), "--data"])
        .arg(env.path("b"));
    let b = Server::spawn(&env, cmd);
    assert_eq!(
        b.url,
        format!("ws://127.0.0.1:{port}/"),
        "localhost, IPv4 first"
    );

    let mut cmd = env.w2w();
    cmd.args(["serve", "--listen", "nowhere", "--data"])
        .arg(env.path("c"));
    let out = run(cmd, CMD_TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("PORT"), "{}", out.describe());
}

#[test]
fn relay_keys_are_pinned_per_normalized_url() {
    let env = TestEnv::new();
    let server = Server::start(&env, &["--data", env.path("d").to_str().unwrap()], true);
    let key = env.path("me.key");
    new_identity(&env, &key);
    let port = server.port();
    let online = |relay: &str| {
        let mut cmd = env.w2w();
        cmd.args(["online", "--relay", relay, "--id"]).arg(&key);
        run(cmd, CMD_TIMEOUT)
    };
    let pins_path = env.config_home().join("w2w/known_relays.json");
    let pins = || json(&std::fs::read_to_string(&pins_path).expect("pin file"));

    let out = online(&format!("ws://127.0.0.1:{port}"));
    out.assert_success("online, no trailing slash");
    assert!(
        out.stderr.contains("pinned relay key"),
        "{}",
        out.describe()
    );
    for spelling in [
        format!("ws://127.0.0.1:{port}/"),
        format!("WS://127.0.0.1:{port}/"),
    ] {
        let out = online(&spelling);
        out.assert_success(&spelling);
        assert!(
            !out.stderr.contains("pinned"),
            "{spelling} is the same URL\n{}",
            out.describe()
        );
    }
    let normal = format!("ws://127.0.0.1:{port}/");
    assert_eq!(pins().as_object().unwrap().len(), 1, "one pin: {}", pins());
    assert_eq!(pins()[&normal], server.relay_key.as_str());

    // Another name for the host is another URL, pinned on its own.
    let out = online(&format!("ws://localhost:{port}/"));
    out.assert_success("online via localhost");
    assert!(
        out.stderr.contains("pinned relay key"),
        "{}",
        out.describe()
    );
    assert_eq!(pins().as_object().unwrap().len(), 2, "{}", pins());

    // A pin an older version wrote under another spelling still holds.
    let other = new_identity(&env, &env.path("other.key"));
    std::fs::write(
        &pins_path,
        serde_json::json!({ format!("ws://127.0.0.1:{port}"): other }).to_string(),
    )
    .unwrap();
    let out = online(&normal);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let line = one_error_line(&out);
    assert!(line.contains("--accept-new-relay-key"), "{line}");
}

#[test]
fn client_flags_go_after_subcommands_too() {
    let env = TestEnv::new();
    let server = Server::start(&env, &["--data", env.path("d").to_str().unwrap()], true);
    let key = env.path("owner.key");
    let owner = new_identity(&env, &key);
    let member = new_identity(&env, &env.path("m.key"));
    let key_s = key.to_str().unwrap();

    // As in the issue: `group create --id F NAME`, relay from W2W_RELAY.
    let mut cmd = env.w2w();
    cmd.env("W2W_RELAY", &server.url)
        .args(["group", "create", "--id", key_s, "team"]);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("group create --id F NAME");
    assert!(out.stdout.contains(&owner), "{}", out.describe());
    // Flags after the arguments, and between `group` and its subcommand.
    let mut cmd = env.w2w();
    cmd.args([
        "group",
        "add",
        "team",
        &member,
        "--relay",
        &server.url,
        "--id",
        key_s,
    ]);
    run(cmd, CMD_TIMEOUT).assert_success("group add NAME ADDR --relay --id");
    let mut cmd = env.w2w();
    cmd.args([
        "group",
        "--id",
        key_s,
        "--relay",
        &server.url,
        "list",
        "team",
    ]);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("group --id --relay list NAME");
    assert!(out.stdout.contains(&member), "{}", out.describe());
    // `id` takes --id before or after its subcommand.
    for args in [["id", "show", "--id", key_s], ["id", "--id", key_s, "show"]] {
        let mut cmd = env.w2w();
        cmd.args(args);
        let out = run(cmd, CMD_TIMEOUT);
        out.assert_success(&args.join(" "));
        assert_eq!(out.stdout.trim(), owner);
    }
    // --log anywhere.
    let mut cmd = env.w2w();
    cmd.args(["id", "show", "--id", key_s, "--log", "warn"]);
    run(cmd, CMD_TIMEOUT).assert_success("--log after the subcommand");
}

#[test]
fn exit_codes_are_the_documented_ones() {
    let env = TestEnv::new();
    let server = Server::start(&env, &["--data", env.path("d").to_str().unwrap()], true);
    let key = env.path("me.key");
    let me = new_identity(&env, &key);
    let w2w = |args: &[&str]| {
        let mut cmd = env.w2w();
        cmd.args(args)
            .args(["--relay", &server.url, "--id"])
            .arg(&key);
        cmd
    };
    // 0: delivered.
    run(w2w(&["send", "--self", "hi"]), CMD_TIMEOUT).assert_success("send --self");
    // 4: not delivered; lookup of an unknown address.
    let nobody = new_identity(&env, &env.path("nobody.key"));
    let out = run(w2w(&["send", "--to", &nobody, "x"]), CMD_TIMEOUT);
    assert_eq!(out.code(), Some(4), "{}", out.describe());
    let out = run(w2w(&["lookup", &nobody]), CMD_TIMEOUT);
    assert_eq!(out.code(), Some(4), "{}", out.describe());
    // 0: found (the key listens; lookup asks from a send-only session).
    let mut listen = w2w(&["listen"]);
    listen.stderr(Stdio::piped());
    let mut listener = Proc::spawn("w2w listen", listen);
    let err = Lines::spawn(listener.child.stderr.take().unwrap());
    err.wait_for("listening as", LINE_TIMEOUT, || server.log());
    let out = run(w2w(&["lookup", &me]), CMD_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    drop(listener);
    // 3: rejected (the relay: not a member of an unknown group; locally:
    // larger than the relay accepts).
    let out = run(w2w(&["send", "--group", "nosuchgroup", "x"]), CMD_TIMEOUT);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert!(
        one_error_line(&out).contains("unknown_group"),
        "{}",
        out.describe()
    );
    let mut cmd = w2w(&["send", "--self"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(&vec![b'x'; 2 << 20]);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // 2: usage.
    let out = run(w2w(&["send", "--to", "not-an-address", "x"]), CMD_TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    // 1: a group change the relay refuses.
    let out = run(w2w(&["group", "add", "nosuchgroup", &nobody]), CMD_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
}

/// `send` with no message at a terminal says that it reads standard input
/// (else it looks hung); from a pipe it says nothing.
#[cfg(target_os = "linux")]
#[test]
fn send_at_a_terminal_says_it_reads_standard_input() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let env = TestEnv::new();
    let server = Server::start(&env, &["--data", env.path("d").to_str().unwrap()], true);
    let a_key = env.path("a.key");
    new_identity(&env, &a_key);
    let b_key = env.path("b.key");
    let b = new_identity(&env, &b_key);
    let mut cmd = env.w2w();
    cmd.args([
        "listen",
        "--json",
        "--count",
        "1",
        "--relay",
        &server.url,
        "--id",
    ])
    .arg(&b_key)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut listener = Proc::spawn("w2w listen", cmd);
    let l_out = Lines::spawn(listener.child.stdout.take().unwrap());
    let l_err = Lines::spawn(listener.child.stderr.take().unwrap());
    l_err.wait_for("listening as", LINE_TIMEOUT, || server.log());

    let (mut master, slave) = {
        let (mut m, mut s) = (-1, -1);
        // SAFETY: openpty writes two new descriptors, owned from here on.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are open and owned by nobody else.
        unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
    };
    // Typed ahead: a line, then Ctrl-D at the start of the next (end of input).
    master.write_all(b"typed at a terminal\n\x04").unwrap();
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", &server.url, "--to", &b, "--id"])
        .arg(&a_key)
        .stdin(Stdio::from(slave));
    let out = run(cmd, CMD_TIMEOUT);
    drop(master);
    out.assert_success("send from a terminal");
    assert!(
        out.stderr
            .contains("reading the message from standard input"),
        "{}",
        out.describe()
    );
    listener.wait_timeout(LINE_TIMEOUT).expect("listener exits");
    let line = l_out.next(Duration::from_secs(5)).expect("a message");
    assert_eq!(json(&line)["body"], "typed at a terminal\n");

    // From a pipe: no such notice.
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", &server.url, "--self", "--id"])
        .arg(&a_key);
    let out = run(cmd, CMD_TIMEOUT);
    out.assert_success("send from /dev/null");
    assert!(!out.stderr.contains("reading"), "{}", out.describe());
}

const README: &str = include_str!("../../../README.md");

/// The text of the ```LANG blocks in the README section under `heading`.
fn readme_blocks(heading: &str, lang: &str) -> Vec<String> {
    let start = README
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let body = &README[start + heading.len() + 5..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let fence = format!("```{lang}\n");
    let mut blocks = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find(&fence) {
        let after = &rest[i + fence.len()..];
        let end = after.find("```").expect("closed code block");
        blocks.push(after[..end].to_owned());
        rest = &after[end..];
    }
    assert!(!blocks.is_empty(), "no {lang} block under {heading:?}");
    blocks
}

/// The `w2w ...` command lines of a section's shell blocks, split into
/// words as a shell would for these simple lines (single quotes, `#`
/// comments).
fn readme_commands(heading: &str) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    for block in readme_blocks(heading, "sh") {
        for line in block.lines() {
            let mut words = Vec::new();
            let mut word: Option<String> = None;
            let mut quoted = false;
            for ch in line.chars() {
                match ch {
                    '\'' => {
                        quoted = !quoted;
                        word.get_or_insert_with(String::new);
                    }
                    c if quoted => word.get_or_insert_with(String::new).push(c),
                    '#' if word.is_none() => break,
                    c if c.is_whitespace() => words.extend(word.take()),
                    c => word.get_or_insert_with(String::new).push(c),
                }
            }
            assert!(!quoted, "unbalanced quote in README line {line:?}");
            words.extend(word);
            if words.first().map(String::as_str) == Some("w2w") {
                cmds.push(words[1..].to_vec());
            }
        }
    }
    cmds
}

/// Runs the README's command lines as written, in a fresh home and working
/// directory, with only these changes: `<ADDR>` is the listener's address
/// (the default identity's), and ports and `/tmp` paths are replaced by
/// free ones (`ports`, `paths`); a bare `w2w serve` gets its port from
/// W2W_LISTEN and the other commands their relay from W2W_RELAY (`env`).
/// `serve` and `listen` run in the background until the end.
struct ReadmeRun<'a> {
    env: &'a TestEnv,
    cwd: PathBuf,
    vars: Vec<(&'static str, String)>,
    subst: Vec<(String, String)>,
    servers: Vec<Server>,
    listeners: Vec<(Proc, Lines, Lines)>,
    /// Addresses printed by `id new`, by key file (`""`: the default).
    ids: std::collections::HashMap<String, String>,
}

impl ReadmeRun<'_> {
    fn command(&self, args: &[String]) -> Command {
        let mut cmd = self.env.w2w();
        cmd.current_dir(&self.cwd).args(args);
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }

    fn args(&self, words: &[String]) -> Vec<String> {
        words
            .iter()
            .map(|w| {
                let mut w = w.clone();
                for (from, to) in &self.subst {
                    w = w.replace(from, to);
                }
                if let Some(addr) = self.ids.get("") {
                    w = w.replace("<ADDR>", addr);
                }
                w
            })
            .collect()
    }

    /// Runs one README line; returns what a finished command printed.
    fn step(&mut self, words: &[String]) -> Option<Output> {
        let args = self.args(words);
        let what = format!("README: w2w {}", words.join(" "));
        match args[0].as_str() {
            "serve" => {
                let cmd = self.command(&args);
                self.servers.push(Server::spawn(self.env, cmd));
                None
            }
            "listen" => {
                let mut cmd = self.command(&args);
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                let mut p = Proc::spawn("w2w listen (README)", cmd);
                let out = Lines::spawn(p.child.stdout.take().unwrap());
                let err = Lines::spawn(p.child.stderr.take().unwrap());
                let addr = self.ids.get("").cloned().expect("`w2w id new` came first");
                err.wait_for(&format!("listening as {addr}"), LINE_TIMEOUT, || {
                    what.clone()
                });
                self.listeners.push((p, out, err));
                None
            }
            "lookup" => {
                // The directory reaches the other relay a moment later.
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let out = run(self.command(&args), CMD_TIMEOUT);
                    if out.status.success() || Instant::now() > deadline {
                        out.assert_success(&what);
                        return Some(out);
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
            _ => {
                let out = run(self.command(&args), CMD_TIMEOUT);
                out.assert_success(&what);
                if args[..2] == ["id", "new"] {
                    let file = args.get(3).cloned().unwrap_or_default();
                    self.ids.insert(file, out.stdout.trim().to_owned());
                }
                Some(out)
            }
        }
    }

    /// The next line the `n`th listener prints.
    fn heard(&self, n: usize) -> String {
        let (_, out, err) = &self.listeners[n];
        out.next(LINE_TIMEOUT)
            .unwrap_or_else(|| panic!("the listener printed nothing\n{}", err.transcript()))
    }
}

#[test]
fn readme_cli_examples_run_as_written() {
    let env = TestEnv::new();
    let cwd = env.path("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let port = free_port();
    let mut r = ReadmeRun {
        env: &env,
        cwd,
        vars: vec![
            ("W2W_LISTEN", format!("127.0.0.1:{port}")),
            ("W2W_RELAY", format!("ws://127.0.0.1:{port}/")),
        ],
        subst: Vec::new(),
        servers: Vec::new(),
        listeners: Vec::new(),
        ids: Default::default(),
    };

    // "Try it: three terminals".
    let cmds = readme_commands("Try it: three terminals");
    let mut outputs = Vec::new();
    for words in &cmds {
        outputs.push((words.clone(), r.step(words)));
    }
    assert_eq!(r.servers.len(), 1, "{cmds:?}");
    assert_eq!(r.listeners.len(), 1, "{cmds:?}");
    let (_, send) = outputs
        .iter()
        .find(|(w, _)| w[0] == "send")
        .expect("the README sends a message");
    let receipt = send.as_ref().unwrap().stdout.clone();
    // "af9a781b11e4bb064fab1645f86a4b2c delivered delivered=1"
    let words: Vec<&str> = receipt.split_whitespace().collect();
    assert!(
        words.len() >= 3 && words[0].len() == 32 && words[1..3] == ["delivered", "delivered=1"],
        "the receipt the README shows: {receipt}"
    );
    let alice = r.ids.get("alice.key").cloned().expect("alice.key made");
    assert_eq!(r.heard(0), format!("a2b [sealed] {alice} hello"));
    assert!(
        r.cwd.join("alice.key").exists(),
        "alice.key in the working directory"
    );

    // "Federation: relays joined into one network": fresh ports and data
    // directories; the default identity is the one made above.
    let (pa, pb) = (free_port(), free_port());
    r.vars.clear();
    r.subst = vec![
        ("127.0.0.1:7777".into(), format!("127.0.0.1:{pa}")),
        ("127.0.0.1:7778".into(), format!("127.0.0.1:{pb}")),
        ("/tmp/".into(), format!("{}/", env.path("tmp").display())),
    ];
    let cmds = readme_commands("Federation: relays joined into one network");
    let mut lookups = Vec::new();
    for words in &cmds {
        if let Some(out) = r.step(words) {
            if words[0] == "lookup" {
                lookups.push(out.stdout);
            }
        }
    }
    assert_eq!(r.servers.len(), 3, "{cmds:?}");
    let me = r.ids.get("").cloned().unwrap();
    assert_eq!(
        lookups,
        [format!(
            "{me} is at relay ws://127.0.0.1:{pa}/ ({})\n",
            r.servers[1].relay_key
        )],
        "the lookup line the README shows"
    );
    let bob = r.ids.get("bob.key").cloned().expect("bob.key made");
    assert_eq!(r.heard(1), format!("a2b [sealed] {bob} hello from B"));
    assert_eq!(
        r.heard(1),
        format!("a2n [signed] {bob} hello, everyone on A and B")
    );
}

#[test]
fn readme_config_block_is_the_defaults() {
    let blocks = readme_blocks("Configuration file", "toml");
    let text = &blocks[0];
    let v: toml::Table = toml::from_str(text).expect("the README's config parses");
    assert_eq!(v["listen"].as_str(), Some("127.0.0.1:7777"));
    assert!(
        !v.contains_key("data"),
        "no data key: its default is the platform's data dir"
    );
    assert!(!v.contains_key("tls"), "no [tls]: the default is plain ws");
    assert_eq!(v["public_urls"].as_array().map(Vec::len), Some(0));
    assert_eq!(v["trusted_proxies"].as_array().map(Vec::len), Some(0));
    let limits: w2w_server::Limits = v["limits"].clone().try_into().expect("[limits]");
    assert_eq!(
        limits,
        w2w_server::Limits::default(),
        "[limits] are the defaults"
    );
    let fed: w2w_server::FederationConfig =
        v["federation"].clone().try_into().expect("[federation]");
    assert_eq!(
        fed,
        w2w_server::FederationConfig::default(),
        "[federation] holds the defaults"
    );
    // Every key is listed ("the complete set").
    let all = |x: serde_json::Value| x.as_object().map(|o| o.len()).unwrap_or(0);
    assert_eq!(
        v["limits"].as_table().map(|t| t.len()),
        Some(all(
            serde_json::to_value(w2w_server::Limits::default()).unwrap()
        ))
    );
    assert_eq!(
        v["federation"].as_table().map(|t| t.len()),
        Some(all(serde_json::to_value(
            w2w_server::FederationConfig::default()
        )
        .unwrap()))
    );

    // Run as written (on a free port instead of 7777): it starts, with its
    // data under the user's data dir, nothing anywhere else.
    let env = TestEnv::new();
    let config = env.path("w2w.toml");
    std::fs::write(&config, text.replace("127.0.0.1:7777", "127.0.0.1:0")).unwrap();
    let mut cmd = env.w2w();
    cmd.args(["serve", "--config"]).arg(&config);
    let server = Server::spawn(&env, cmd);
    assert!(
        env.path("data-home/w2w/relay.key").exists(),
        "data in XDG_DATA_HOME/w2w\n{}",
        server.log()
    );
    server.terminate();
}

/// Sessions (PROTOCOL 7.7), as a user meets them: two terminals listen
/// with one key, a third sends, lists and looks up with the same key; no
/// listener is disturbed, each gets every message once, and the relay
/// closes nobody. `--exclusive` takes over.
#[test]
fn one_key_listens_in_two_terminals_while_a_third_sends() {
    let env = TestEnv::new();
    let data = env.path("relay-data");
    let server = Server::start(&env, &["--data", data.to_str().unwrap()], true);
    let url = server.url.clone();
    let key = env.path("keys/me.key");
    let me = new_identity(&env, &key);
    let listen = |extra: &[&str]| {
        let mut cmd = env.w2w();
        cmd.args(["listen", "--relay", &url, "--id"])
            .arg(&key)
            .args(["--json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut p = Proc::spawn("w2w listen", cmd);
        let out = Lines::spawn(p.child.stdout.take().unwrap());
        let err = Lines::spawn(p.child.stderr.take().unwrap());
        err.wait_for("listening as", LINE_TIMEOUT, || server.log());
        (p, out, err)
    };
    let (mut l1, out1, _err1) = listen(&[]);
    let (mut l2, out2, _err2) = listen(&[]);
    for i in 0..3 {
        // The same key sends to itself (a2a) from a third terminal.
        let mut cmd = env.w2w();
        cmd.args(["send", "--relay", &url, "--id"]).arg(&key).args([
            "--json",
            "--self",
            &format!("note {i}"),
        ]);
        let out = run(cmd, CMD_TIMEOUT);
        out.assert_success("send --self beside two listeners");
        let receipt = json(out.stdout.trim());
        assert_eq!(receipt["status"], "delivered", "{receipt}");
        assert_eq!(
            receipt["delivered"], 2,
            "both listeners acknowledged: {receipt}"
        );
        for (n, lines) in [(1, &out1), (2, &out2)] {
            let line = lines.wait_for(&format!("note {i}"), LINE_TIMEOUT, || {
                format!("listener {n}\n{}", server.log())
            });
            assert_eq!(json(&line)["from"], me.as_str());
        }
        // online and lookup with the same key: send-only sessions.
        let mut cmd = env.w2w();
        cmd.args(["online", "--relay", &url, "--id"]).arg(&key);
        let out = run(cmd, CMD_TIMEOUT);
        out.assert_success("online beside two listeners");
        assert_eq!(
            out.stdout.trim(),
            me,
            "the key is online once: {}",
            out.describe()
        );
    }
    // Both listeners are still running, and printed each message once.
    assert!(
        l1.wait_timeout(Duration::from_millis(300)).is_none(),
        "listener 1 ended"
    );
    assert!(
        l2.wait_timeout(Duration::from_millis(10)).is_none(),
        "listener 2 ended"
    );
    for (n, lines) in [(1, &out1), (2, &out2)] {
        let t = lines.transcript();
        for i in 0..3 {
            assert_eq!(
                t.matches(&format!("note {i}")).count(),
                1,
                "listener {n}:\n{t}"
            );
        }
    }
    let replaced = || {
        let (_, metrics) = server.http_get("/metrics");
        let line = metrics
            .lines()
            .find(|l| l.starts_with("w2w_errors_total{reason=\"replaced\"}"))
            .unwrap_or_else(|| panic!("no replaced counter in\n{metrics}"))
            .to_owned();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    assert_eq!(replaced(), 0, "the relay closed a session as replaced");

    // An exclusive listener takes over: the others end with `replaced`.
    let (_l3, out3, _err3) = listen(&["--exclusive"]);
    for (n, p) in [(1, &mut l1), (2, &mut l2)] {
        let status = p.wait_timeout(LINE_TIMEOUT);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(1),
            "listener {n} is replaced and exits 1"
        );
    }
    assert_eq!(replaced(), 2, "exactly the two older listeners were closed");
    let mut cmd = env.w2w();
    cmd.args(["send", "--relay", &url, "--id"])
        .arg(&key)
        .args(["--self", "only you"]);
    run(cmd, CMD_TIMEOUT).assert_success("send to the exclusive listener");
    out3.wait_for("only you", LINE_TIMEOUT, || server.log());
}
