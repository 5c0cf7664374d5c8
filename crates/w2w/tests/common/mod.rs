//! Shared by the process tests: start `w2w serve` as a child process.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use w2w_proto::Address;

/// A relay child process, killed (SIGKILL) when dropped.
pub struct ServeProc {
    pub child: Child,
    pub url: String,
    pub key: Address,
}

impl ServeProc {
    /// SIGKILL, no shutdown path runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `w2w serve --listen <listen> --data <data> <extra…>` with HOME and
/// the config dir inside `data`, and waits (at most 20 s) until it prints
/// its URL and relay key. Its stdout keeps being drained.
pub fn serve(data: &Path, listen: &str, extra: &[String]) -> ServeProc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_w2w"))
        .args(["serve", "--listen", listen, "--data"])
        .arg(data)
        .args(extra)
        .env("HOME", data)
        .env("XDG_CONFIG_HOME", data.join("cfg"))
        .env("W2W_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning w2w serve");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let (mut url, mut key) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while (url.is_none() || key.is_none()) && Instant::now() < deadline {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(u) = line.trim().strip_prefix("w2w relay listening on ") {
            url = Some(u.to_string());
        }
        if let Some(k) = line.trim().strip_prefix("relay key") {
            key = Some(k.trim().parse().expect("relay key is an address"));
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    ServeProc {
        child,
        url: url.expect("relay printed no URL"),
        key: key.expect("relay printed no key"),
    }
}

/// The port of a `ws://127.0.0.1:PORT/` URL.
pub fn port(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("URL ends in :PORT/")
}
