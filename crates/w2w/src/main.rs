//! `w2w`: the relay (`serve`) and the command-line client.

mod bench;
mod demo;
mod keys;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use w2w_client::{Client, ConnectOptions, Event};
use w2w_proto::frame::{Notice, Receipt, Scope, Status};
use w2w_proto::{Address, Dest, ErrorCode};
use w2w_server::{FederationConfig, Limits, Relay, RelayConfig, TlsPaths};

#[derive(Parser)]
#[command(
    name = "w2w",
    version,
    about = "w2w joins WebSocket networks into one: addresses are Ed25519 keys, relays route what they cannot read.",
    long_about = "w2w joins WebSocket networks into one addressable network.\n\n\
        A client's Ed25519 public key (64 hex characters) is its address. It registers with a \
        relay over WebSocket (sigA -> sigB -> sigC) and can then send to one address (a2b), a \
        list (a2g), everyone (a2n) or itself (a2a).\n\n\
        Start a relay:   w2w serve\n\
        Listen:          w2w listen\n\
        Send:            w2w send --to <ADDRESS> 'hello'",
    after_help = "Environment: W2W_RELAY sets --relay, W2W_ID sets --id. Docs: docs/PROTOCOL.md"
)]
struct Cli {
    /// Log filter, e.g. info, debug, w2w_server=trace (RUST_LOG also works).
    #[arg(long, global = true, default_value = "info", env = "W2W_LOG")]
    log: String,
    /// Log lines as text, or as JSON (one object per line). Text has colour
    /// only when standard error is a terminal (and NO_COLOR is unset).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "W2W_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a relay (zero config: 127.0.0.1:7777, data dir created on first run).
    Serve(ServeArgs),
    /// Create or show your identity (an Ed25519 key; its public half is your address).
    #[command(subcommand)]
    Id(IdCmd),
    /// Send a message: one --to is a2b, several --to is a2g, --all is a2n, --self is a2a.
    Send(SendArgs),
    /// Print every message received, one line each (or JSON lines with --json).
    Listen(ListenArgs),
    /// List the addresses online on the relay.
    Online(ClientArgs),
    /// Which relay hosts an address, anywhere in the federation.
    Lookup {
        #[command(flatten)]
        client: ClientArgs,
        /// The address to look up.
        address: Address,
    },
    /// Named groups on your relay: create, add, remove, admin, list.
    Group {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        op: GroupCmd,
    },
    /// Start three federated relays A-B-C, send a2b, a2g and a2n across them, show every hop.
    Demo(demo::DemoArgs),
    /// Load generator: a2b throughput and latency through a relay.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (server key, SQLite store). Default: ~/.local/share/w2w.
    #[arg(long)]
    data: Option<PathBuf>,
    /// TOML config file (see README); command-line flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// TLS certificate chain (PEM) for wss; reloaded when the file changes.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Public URL clients dial (repeatable); default: any URL matching the Host header.
    #[arg(long = "public-url")]
    public_urls: Vec<String>,
    /// Peer with the relay at this URL (repeatable); the link is kept up with backoff.
    #[arg(long = "peer", value_name = "URL")]
    peers: Vec<String>,
    /// Admit only these relay keys as peers (repeatable); default: any relay (open).
    #[arg(long = "peer-allow", value_name = "RELAY_KEY")]
    peer_allow: Vec<Address>,
    /// Most links with trusted relays (ones we dial with --peer, or on the
    /// --peer-allow list) before newcomers are redirected (default 5).
    #[arg(long)]
    max_peers: Option<usize>,
    /// Most links with unknown relays that dialled us (open admission):
    /// they are on probation, with their own slots (default 3).
    #[arg(long)]
    max_probation_peers: Option<usize>,
    /// A reverse proxy in front of the relay (repeatable): connections from
    /// this IP are counted and logged by the client address in its
    /// X-Forwarded-For header.
    #[arg(long = "trusted-proxy", value_name = "IP")]
    trusted_proxies: Vec<std::net::IpAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    #[serde(default)]
    public_urls: Vec<String>,
    #[serde(default)]
    trusted_proxies: Vec<std::net::IpAddr>,
    tls: Option<TlsPaths>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    federation: FederationConfig,
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create a group; you are its owner.
    Create { name: String },
    /// Add a member (admins only).
    Add { name: String, member: Address },
    /// Remove a member (admins; anyone may remove themselves).
    Remove { name: String, member: Address },
    /// Make a member an admin, or not (owner only).
    Admin {
        name: String,
        member: Address,
        #[arg(long)]
        off: bool,
    },
    /// Show the owner and members.
    List { name: String },
}

#[derive(Subcommand)]
enum IdCmd {
    /// Create a new key file (mode 0600).
    New {
        #[arg(long, env = "W2W_ID")]
        id: Option<PathBuf>,
    },
    /// Print the address of a key file.
    Show {
        #[arg(long, env = "W2W_ID")]
        id: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Relay URL.
    #[arg(long, env = "W2W_RELAY", default_value = "ws://127.0.0.1:7777/")]
    relay: String,
    /// Key file (created on first use). Default: ~/.config/w2w/id.key.
    #[arg(long, env = "W2W_ID")]
    id: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for wss, e.g. a self-signed relay.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Accept a relay key that differs from the one pinned for this URL.
    #[arg(long)]
    accept_new_relay_key: bool,
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Recipient address (repeat for a2g).
    #[arg(long = "to", conflicts_with_all = ["all", "self_", "group"])]
    to: Vec<Address>,
    /// Send to a named group on your relay (members only).
    #[arg(long, conflicts_with_all = ["all", "self_"])]
    group: Option<String>,
    /// Send to everyone (a2n): the whole federation, or see --scope.
    #[arg(long, conflicts_with = "self_")]
    all: bool,
    /// With --all: "federation" (default) or "relay" (this relay's clients only).
    #[arg(long, default_value = "federation", value_parser = ["federation", "relay"], requires = "all")]
    scope: String,
    /// Send to yourself through the relay (a2a).
    #[arg(long = "self")]
    self_: bool,
    /// Print the receipt as JSON.
    #[arg(long)]
    json: bool,
    /// Send without end-to-end protection (relays can read it). By default
    /// a2a/a2b/a2g are sealed for their recipients and a2n is signed.
    #[arg(long)]
    plain: bool,
    /// The message; "-" or nothing reads standard input.
    message: Option<String>,
}

#[derive(Args)]
struct ListenArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// One JSON object per line: from, route, id, body.
    #[arg(long)]
    json: bool,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Also print join/leave notices.
    #[arg(long)]
    presence: bool,
}

/// stderr for the log, never failing: a line that cannot be written (a full
/// disk, a closed pipe) is dropped and reported to `/healthz` instead of
/// ending the connection or the relay that logged it.
struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let ok = std::io::stderr().write_all(buf).is_ok();
        w2w_server::log_health::report(ok);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Prints a line to stdout, ignoring failure (println! panics on it).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or(cli.log.clone());
    let log = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(|| LogSink)
        // Its own report of a failed write would go to stderr with
        // eprintln!, which panics when stderr fails.
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            // Colour codes only for a person at a terminal, never in files.
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            log.with_ansi(colour).init()
        }
        LogFormat::Json => log.json().with_ansi(false).init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Serve(a) => serve(a).await,
        Cmd::Id(IdCmd::New { id }) => {
            let path = id.unwrap_or_else(keys::default_id_path);
            keys::check_not_exists(&path)?;
            let ident = keys::create_key(&path)?;
            eprintln!("created {}", path.display());
            println!("{}", ident.address());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Id(IdCmd::Show { id }) => {
            let path = id.unwrap_or_else(keys::default_id_path);
            println!("{}", keys::load_key(&path)?.address());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Send(a) => send(a).await,
        Cmd::Listen(a) => listen(a).await,
        Cmd::Online(a) => {
            let mut c = connect(&a).await?;
            for addr in c.online().await? {
                println!("{addr}");
            }
            c.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(a) => bench::run(a).await,
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Group { client, op } => {
            use w2w_proto::group::GroupAction;
            let c = connect(&client).await?;
            let info = match op {
                GroupCmd::Create { name } => c.group_create(&name).await,
                GroupCmd::Add { name, member } => c.group_op(&name, GroupAction::Add(member)).await,
                GroupCmd::Remove { name, member } => {
                    c.group_op(&name, GroupAction::Remove(member)).await
                }
                GroupCmd::Admin { name, member, off } => {
                    c.group_op(&name, GroupAction::Admin(member, !off)).await
                }
                GroupCmd::List { name } => c.group_info(&name).await,
            };
            c.close().await;
            let info = info?;
            println!("group {} (owner {})", info.name, info.owner);
            for (m, admin) in &info.members {
                println!("  {m}{}", if *admin { "  admin" } else { "" });
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lookup { client, address } => {
            let c = connect(&client).await?;
            let r = c
                .request(w2w_proto::frame::RequestOp::Lookup(address))
                .await?;
            c.close().await;
            match r {
                w2w_proto::frame::ResponseBody::Lookup(Some(h)) => {
                    println!("{address} is at relay {} ({})", h.relay_url, h.relay_key);
                    Ok(ExitCode::SUCCESS)
                }
                _ => {
                    println!("{address} is not known to the federation");
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

async fn serve(a: ServeArgs) -> Result<ExitCode> {
    let file: FileConfig = match &a.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => FileConfig::default(),
    };
    let data = a.data.or(file.data).unwrap_or_else(|| {
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("w2w")
    });
    // Private, and ours alone, before the key is read or created: the lock
    // lives as long as this function, i.e. until the relay has shut down.
    w2w_server::datadir::prepare(&data)?;
    let _lock = w2w_server::datadir::DataDirLock::acquire(&data)?;
    let key_path = data.join("relay.key");
    let (identity, created) = keys::load_or_create(&key_path)?;
    if created {
        tracing::info!("generated relay key {}", key_path.display());
    }
    let listen = a
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:7777".parse().expect("valid default"));
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(TlsPaths {
            cert,
            key,
            reload_interval_ms: 2000,
        }),
        _ => file.tls,
    };
    let mut public_urls = a.public_urls;
    if public_urls.is_empty() {
        public_urls = file.public_urls;
    }
    let mut federation = file.federation;
    federation.peers.extend(a.peers);
    for p in &federation.peers {
        if !(p.starts_with("ws://") || p.starts_with("wss://")) {
            bail!("peer URL {p:?}: a relay's URL starts with ws:// or wss:// (e.g. ws://relay.example:7777/)");
        }
    }
    federation.allow.extend(a.peer_allow);
    if let Some(n) = a.max_peers {
        federation.max_peers = n;
    }
    if let Some(n) = a.max_probation_peers {
        federation.max_probation_peers = n;
    }
    let config = RelayConfig {
        identity,
        listen,
        data_dir: Some(data.clone()),
        public_urls,
        tls,
        trusted_proxies: [file.trusted_proxies, a.trusted_proxies].concat(),
        limits: file.limits,
        federation,
    };
    let config_peers = config.federation.peers.clone();
    let relay = Relay::start(config).await?;
    // A full disk under stdout must not stop the relay (a crash loop under
    // a supervisor): these lines are best effort.
    out!("w2w relay listening on {}", relay.url());
    out!("relay key  {}", relay.relay_key());
    out!("data dir   {}", data.display());
    let http = relay.url().replacen("ws", "http", 1);
    out!("info       {http}.well-known/w2w   health {http}healthz   metrics {http}metrics");
    for p in &config_peers {
        out!("peering    {p}");
    }
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        _ = relay.cancelled() => {}
    }
    relay.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn connect(a: &ClientArgs) -> Result<Client> {
    let id_path = a.id.clone().unwrap_or_else(keys::default_id_path);
    let (identity, created) = keys::load_or_create(&id_path)?;
    if created {
        eprintln!(
            "created identity {} in {}",
            identity.address(),
            id_path.display()
        );
    }
    let mut known = keys::KnownRelays::load(keys::config_dir().join("known_relays.json"))?;
    let pinned = if a.accept_new_relay_key {
        None
    } else {
        known.get(&a.relay)?
    };
    let mut opts = ConnectOptions::new(&a.relay).pinned(pinned);
    if let Some(ca) = &a.ca {
        opts = opts.trust_pem_file(ca)?;
    }
    let client = match Client::connect(identity, opts).await {
        Err(w2w_client::ClientError::Handshake(
            e @ w2w_proto::handshake::HandshakeError::RelayKeyChanged { .. },
        )) => bail!(
            "{e}\nThe relay at {} now presents a different key. If you trust the change, rerun with --accept-new-relay-key.",
            a.relay
        ),
        r => r.with_context(|| format!("connecting to {}", a.relay))?,
    };
    if known.pin(&a.relay, client.relay_key())? {
        eprintln!("pinned relay key {} for {}", client.relay_key(), a.relay);
    }
    Ok(client)
}

fn receipt_json(r: &Receipt) -> serde_json::Value {
    serde_json::json!({
        "id": r.id.to_string(),
        "status": r.status.as_str(),
        "reason": ErrorCode::from_u16(r.reason).map(|c| c.as_str()),
        "delivered": r.delivered,
        "recipients": r.entries.iter().map(|e| serde_json::json!({
            "to": e.to.to_hex(),
            "status": e.status.as_str(),
            "reason": ErrorCode::from_u16(e.reason).map(|c| c.as_str()),
        })).collect::<Vec<_>>(),
    })
}

async fn send(a: SendArgs) -> Result<ExitCode> {
    let body = match a.message.as_deref() {
        None | Some("-") => {
            let mut s = Vec::new();
            std::io::stdin().read_to_end(&mut s)?;
            s
        }
        Some(m) => m.as_bytes().to_vec(),
    };
    let dest = match (a.to.len(), a.all, a.self_) {
        _ if a.group.is_some() => Dest::Group(a.group.clone().unwrap_or_default()),
        (_, true, _) if a.scope == "relay" => Dest::A2n(Scope::Relay),
        (_, true, _) => Dest::A2n(Scope::Federation),
        (_, _, true) => Dest::A2a,
        (0, _, _) => {
            bail!("say where to send: --to ADDRESS (repeatable), --group NAME, --all or --self")
        }
        (1, _, _) => Dest::A2b(a.to[0]),
        _ => Dest::A2g(a.to.clone()),
    };
    let c = connect(&a.client).await?;
    let r = if a.plain {
        c.send_plain(dest, body).await?
    } else {
        c.send(dest, body).await?
    };
    if a.json {
        println!("{}", receipt_json(&r));
    } else {
        let reason = ErrorCode::from_u16(r.reason)
            .map(|c| format!(" ({})", c.as_str()))
            .unwrap_or_default();
        println!(
            "{} {}{} delivered={}",
            r.id,
            r.status.as_str(),
            reason,
            r.delivered
        );
        for e in &r.entries {
            let reason = ErrorCode::from_u16(e.reason)
                .map(|c| format!(" ({})", c.as_str()))
                .unwrap_or_default();
            println!("  {} {}{}", e.to, e.status.as_str(), reason);
        }
    }
    c.close().await;
    Ok(match r.status {
        Status::Delivered | Status::Queued => ExitCode::SUCCESS,
        Status::NoRoute | Status::Partial => ExitCode::from(2),
        Status::Rejected => ExitCode::from(3),
    })
}

async fn listen(a: ListenArgs) -> Result<ExitCode> {
    let mut c = connect(&a.client).await?;
    if a.presence {
        c.request(w2w_proto::frame::RequestOp::Presence(true))
            .await?;
    }
    eprintln!(
        "listening as {} on {} (Ctrl-C to stop)",
        c.address(),
        a.client.relay
    );
    let mut n = 0u64;
    loop {
        let ev = tokio::select! {
            ev = c.recv() => ev,
            _ = shutdown_signal() => break,
        };
        match ev {
            None => bail!(
                "connection ended: {}",
                c.close_reason().unwrap_or_else(|| "unknown".into())
            ),
            Some(Event::Msg(m)) => {
                let body = String::from_utf8_lossy(&m.body);
                if a.json {
                    let text = std::str::from_utf8(&m.body).ok();
                    println!(
                        "{}",
                        serde_json::json!({
                            "from": m.from.to_hex(),
                            "route": m.dest.route().as_str(),
                            "e2e": m.security.as_str(),
                            "id": m.id.to_string(),
                            "body": text,
                            "body_hex": if text.is_none() { Some(hex::encode(&m.body)) } else { None },
                        })
                    );
                } else {
                    println!(
                        "{} [{}] {} {}",
                        m.dest.route().as_str(),
                        m.security.as_str(),
                        m.from,
                        body
                    );
                }
                n += 1;
                if a.count.is_some_and(|c| n >= c) {
                    break;
                }
            }
            Some(Event::Notice(notice)) => match notice {
                Notice::Join(x) if a.presence => eprintln!("+ {x} joined"),
                Notice::Leave(x) if a.presence => eprintln!("- {x} left"),
                Notice::Replaced => {
                    eprintln!("another connection with this identity replaced this one")
                }
                Notice::ShuttingDown => eprintln!("the relay is shutting down"),
                _ => {}
            },
            Some(Event::Error { code, detail }) => eprintln!("relay error {code}: {detail}"),
            Some(Event::Rejected { id, from, reason }) => {
                eprintln!("rejected message {id} claiming to be from {from}: {reason}")
            }
        }
    }
    c.close().await;
    Ok(ExitCode::SUCCESS)
}
