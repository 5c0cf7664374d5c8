//! Relay processes under test: finding the `w2w` binary, spawning them,
//! pinning CPUs, and reading their CPU time and memory from /proc.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `--w2w-bin`, set once at startup.
static W2W_BIN: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Records `--w2w-bin` (or `W2W_BIN`) for [`w2w_bin`].
pub fn set_w2w_bin(path: Option<PathBuf>) {
    let _ = W2W_BIN.set(path);
}

/// The `w2w` binary that relays are run with: `--w2w-bin`, else the `w2w`
/// next to this executable (`cargo build --release` puts both in
/// target/release/, so the relay measured is the one built with the bench).
pub fn w2w_bin() -> Result<PathBuf> {
    if let Some(p) = W2W_BIN.get().and_then(|p| p.clone()) {
        if !p.is_file() {
            bail!("--w2w-bin {}: no such file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let sibling = exe
        .parent()
        .context("this executable has no directory")?
        .join(format!("w2w{}", std::env::consts::EXE_SUFFIX));
    if !sibling.is_file() {
        bail!(
            "no w2w binary at {}: build it with `cargo build --release` (builds w2w and w2w-bench), or pass --w2w-bin PATH",
            sibling.display()
        );
    }
    Ok(sibling)
}

/// A server child process (w2w relay, bare forwarder or iroh-relay), killed
/// when dropped.
pub struct ServerProc {
    pub child: Child,
    pub url: String,
    /// Scratch directory (data dir, config), removed on drop.
    dir: Option<PathBuf>,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl ServerProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Spawns `program args…` on `cpu` (if any), and waits (≤ 30 s) for a
    /// stdout line starting with `marker`; the rest of that line is the URL.
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        marker: &str,
        cpu: Option<usize>,
        dir: Option<PathBuf>,
    ) -> Result<ServerProc> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(cpu) = cpu {
            pin_command(&mut cmd, cpu);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the {name} server ({cmd:?})"))?;
        let out = child.stdout.take().context("piped stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = marker.to_string();
        // Keeps draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(u) = line.trim().strip_prefix(marker.as_str()) {
                        let _ = tx.send(u.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let mut p = ServerProc {
            child,
            url: String::new(),
            dir,
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => p.url = url,
            Err(_) => bail!("the {name} server did not start within 30 s"),
        }
        Ok(p)
    }

    /// `w2w serve` (the binary [`w2w_bin`] finds) on a loopback port with a fresh data
    /// dir, the per-client rate limits (frames and fan-out bytes) raised so
    /// the relay is measured, not the limiter. `durable=false` sets `federation.durable_delivery`.
    pub fn w2w(cpu: Option<usize>, durable: bool, extra_limits: &str) -> Result<ServerProc> {
        Self::w2w_linked(cpu, durable, extra_limits, &[])
    }

    /// A w2w relay that dials `peers` and makes no links beyond them
    /// (`min_peers` 0): a topology the caller chooses.
    pub fn w2w_linked(
        cpu: Option<usize>,
        durable: bool,
        extra_limits: &str,
        peers: &[String],
    ) -> Result<ServerProc> {
        let bin = w2w_bin()?;
        let dir = std::env::temp_dir().join(format!("w2w-bench-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("relay.toml");
        std::fs::write(
            &cfg,
            format!(
                "[limits]\nrate_per_sec = 1000000000\nrate_burst = 1000000000\nfanout_bytes_per_sec = 1000000000000\nfanout_bytes_burst = 1000000000000\nmax_connections_per_ip = 1000000000\nhandshake_rate_per_ip = 1000000000\nhandshake_burst_per_ip = 1000000000\n{extra_limits}\n\
                 [federation]\ndurable_delivery = {durable}\nmin_peers = 0\n"
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&dir)
            .arg("--config")
            .arg(&cfg)
            .env("HOME", &dir)
            .env("W2W_LOG", "warn");
        for p in peers {
            cmd.arg("--peer").arg(p);
        }
        ServerProc::spawn("w2w", cmd, "w2w relay listening on ", cpu, Some(dir))
    }

    /// The bare WebSocket forwarder (`w2w-bench forwarder`, this executable).
    pub fn bare(cpu: Option<usize>) -> Result<ServerProc> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["forwarder", "--listen", "127.0.0.1:0"]);
        ServerProc::spawn("bare", cmd, "LISTENING ", cpu, None)
    }

    /// iroh-relay, run by the bench-only crate in bench/iroh.
    pub fn iroh(bin: &std::path::Path, cpu: Option<usize>) -> Result<ServerProc> {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        ServerProc::spawn("iroh-relay", cmd, "LISTENING ", cpu, None)
    }

    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid())
    }
}

/// CPU seconds (utime + stime) of `pid`, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Resident memory of `pid` in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))
}

/// Samples a process's CPU and RSS over a measured window.
pub struct Usage {
    pid: u32,
    cpu0: f64,
    t0: Instant,
    peak_rss_kib: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: tokio_util_stop::Stop,
}

/// A tiny stop flag for the sampler task (no extra dependency).
mod tokio_util_stop {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    #[derive(Clone, Default)]
    pub struct Stop(Arc<AtomicBool>);
    impl Stop {
        pub fn set(&self) {
            self.0.store(true, Ordering::Relaxed)
        }
        pub fn is_set(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct UsageReport {
    /// CPU seconds (user + system) used in the window.
    pub cpu_seconds: f64,
    /// CPU cores the process used on average (1.0 = one core busy).
    pub cpu_cores: f64,
    pub rss_end_kib: u64,
    pub rss_peak_kib: u64,
}

impl Usage {
    pub fn start(pid: u32) -> Usage {
        let peak =
            std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let stop = tokio_util_stop::Stop::default();
        {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_set() {
                    if let Ok(r) = rss_kib(pid) {
                        peak.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        Usage {
            pid,
            cpu0: cpu_seconds(pid).unwrap_or(0.0),
            t0: Instant::now(),
            peak_rss_kib: peak,
            stop,
        }
    }

    pub fn finish(self) -> UsageReport {
        self.stop.set();
        let cpu = cpu_seconds(self.pid).unwrap_or(self.cpu0) - self.cpu0;
        let end = rss_kib(self.pid).unwrap_or(0);
        let peak = self
            .peak_rss_kib
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(end);
        UsageReport {
            cpu_seconds: cpu,
            cpu_cores: cpu / self.t0.elapsed().as_secs_f64().max(1e-9),
            rss_end_kib: end,
            rss_peak_kib: peak,
        }
    }
}

/// CPUs online on this machine (not just the ones this process is pinned
/// to at the moment, which is what `available_parallelism` would say).
pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// Makes the child run only on `cpu` (set between fork and exec; every
/// thread it starts inherits it).
pub fn pin_command(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    let set = cpu_set(cpu);
    // SAFETY: sched_setaffinity is async-signal-safe and touches no memory
    // of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Pins every thread of this process to `cpu` (threads started later
/// inherit it from the thread that starts them).
pub fn pin_self(cpu: usize) -> Result<()> {
    let set = cpu_set(cpu);
    for t in std::fs::read_dir("/proc/self/task")? {
        let tid: libc::pid_t = t?.file_name().to_string_lossy().parse().unwrap_or(0);
        // SAFETY: plain syscall on a thread id of this process.
        unsafe {
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    Ok(())
}

/// Undoes [`pin_self`]: every CPU again.
pub fn unpin_self() -> Result<()> {
    // SAFETY: as above; CPU_SET for each available CPU.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for c in 0..cpu_count().max(1) {
            libc::CPU_SET(c, &mut set);
        }
        set
    };
    for t in std::fs::read_dir("/proc/self/task")? {
        let tid: libc::pid_t = t?.file_name().to_string_lossy().parse().unwrap_or(0);
        // SAFETY: as above.
        unsafe {
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    Ok(())
}

/// Raises this process's open-file limit to its hard limit (the idle and
/// fan-out benchmarks hold thousands of sockets); children inherit it.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    0
}

/// One value from a w2w relay's `/metrics` (`url`: its ws:// URL).
pub async fn metric(url: &str, name: &str) -> Option<f64> {
    metrics(url, &[name]).await.into_iter().next().flatten()
}

/// Several values from one read of a relay's `/metrics` (`name` may carry
/// labels, as printed: `w2w_x_bucket{le="0.01"}`); `None` for each if the
/// page could not be read.
pub async fn metrics(url: &str, names: &[&str]) -> Vec<Option<f64>> {
    let addr = url.trim_start_matches("ws://").trim_end_matches('/');
    let body = tokio::time::timeout(Duration::from_secs(3), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default();
    names
        .iter()
        .map(|name| {
            let prefix = format!("{name} ");
            body.lines()
                .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        })
        .collect()
}
