//! `w2w`: the relay (`serve`) and the command-line client.

mod demo;
mod keys;

use std::io::{IsTerminal, Read};
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
        Start a relay:       w2w serve\n\
        Make an identity:    w2w id new\n\
        Listen:              w2w listen\n\
        Send:                w2w send --to <ADDRESS> 'hello'\n\n\
        One key may hold several sessions on a relay: listen in two terminals (each gets every \
        live message), send, list and look up from others (send-only sessions that disturb no \
        listener). `w2w listen --exclusive` closes the key's other sessions; `w2w listen --also \
        URL` listens through a second relay too, each message printed once.",
    after_help = EXIT_HELP
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

/// Exit codes and environment, shown by `w2w --help` (the README says the same).
const EXIT_HELP: &str = "\
Exit codes:
  0  success (send: delivered or queued; lookup: found)
  1  error: the relay cannot be reached or refused us, a changed relay key,
     a missing key file, a group change the relay refused, ...
  2  usage: a flag or argument is wrong or missing
  3  send: the message was rejected (the reason is printed)
  4  send: not delivered (no_route, or partial for a list or group);
     lookup: the address is not known to the federation

Environment: W2W_RELAY sets --relay, W2W_ID sets --id, W2W_LISTEN sets
serve --listen, W2W_LOG sets --log, W2W_LOG_FORMAT sets --log-format.
Docs: README.md, docs/PROTOCOL.md";

/// Exit codes (see [`EXIT_HELP`]).
const EXIT_ERROR: u8 = 1;
const EXIT_REJECTED: u8 = 3;
const EXIT_NOT_DELIVERED: u8 = 4;

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
    Id(IdArgs),
    /// Send a message: one --to is a2b, several --to is a2g, --all is a2n, --self is a2a.
    Send(SendArgs),
    /// Print every message received, one line each (or JSON lines with --json).
    #[command(after_help = EXIT_HELP)]
    Listen(ListenArgs),
    /// List the addresses online on the relay.
    Online(ClientArgs),
    /// Which relay hosts an address, anywhere in the federation.
    #[command(after_help = EXIT_HELP)]
    Lookup {
        #[command(flatten)]
        client: ClientArgs,
        /// The address to look up.
        address: Address,
    },
    /// Named groups: create one on your relay; add, remove, admin, list any group of the federation.
    Group {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        op: GroupCmd,
    },
    /// Start three federated relays A-B-C, send a2b, a2g and a2n across them, show every hop.
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Where to listen: PORT (on 127.0.0.1), IP:PORT or HOST:PORT, e.g.
    /// 7777, 0.0.0.0:7777 (remote clients too), localhost:7777. Default
    /// 127.0.0.1:7777.
    #[arg(long, env = "W2W_LISTEN", value_name = "ADDR", value_parser = parse_listen)]
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
    /// Split the relay's message state over N cores, each with its own
    /// lock, so that N CPUs decide about messages at once (default 0: one
    /// per CPU the relay may run on, at most 8; more costs ~24 bytes per
    /// connection per shard). Each address, its directory records and the
    /// messages to it belong to one shard; 1 runs the relay as one core.
    #[arg(long, env = "W2W_SHARDS", value_name = "N")]
    shards: Option<usize>,
    /// Most sessions one address may hold at once (tabs, terminals,
    /// devices; receiving and send-only together). One more is refused
    /// with too_many_sessions (51) (default 8).
    #[arg(long)]
    max_sessions: Option<usize>,
    /// A reverse proxy in front of the relay (repeatable): connections from
    /// this IP are counted and logged by the client address in its
    /// X-Forwarded-For header.
    #[arg(long = "trusted-proxy", value_name = "IP")]
    trusted_proxies: Vec<std::net::IpAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Same forms as --listen.
    listen: Option<String>,
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

#[derive(Args)]
struct IdArgs {
    /// Key file. Default: ~/.config/w2w/id.key.
    #[arg(long, global = true, env = "W2W_ID", value_name = "FILE")]
    id: Option<PathBuf>,
    #[command(subcommand)]
    op: IdCmd,
}

#[derive(Subcommand)]
enum IdCmd {
    /// Create a new key file (mode 0600; never overwrites) and print its
    /// address. The only command that creates a key.
    New,
    /// Print the address of a key file.
    Show,
}

/// The flags of every client command. `global` so that they may also
/// follow a subcommand (`w2w group create --id F NAME`).
#[derive(Args, Clone)]
struct ClientArgs {
    /// Relay URL.
    #[arg(
        long,
        global = true,
        env = "W2W_RELAY",
        default_value = "ws://127.0.0.1:7777/",
        value_name = "URL"
    )]
    relay: String,
    /// Key file; it must exist (make one with `w2w id new`). Default:
    /// ~/.config/w2w/id.key.
    #[arg(long, global = true, env = "W2W_ID", value_name = "FILE")]
    id: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for wss, e.g. a self-signed relay.
    #[arg(long, global = true, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Accept a relay key that differs from the one pinned for this URL.
    #[arg(long, global = true)]
    accept_new_relay_key: bool,
}

#[derive(Args)]
#[command(
    group = clap::ArgGroup::new("dest").args(["to", "group", "all", "self_"]).required(true).multiple(false),
    after_help = EXIT_HELP
)]
struct SendArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Recipient address (repeat for a2g).
    #[arg(long = "to", value_name = "ADDRESS")]
    to: Vec<Address>,
    /// Send to a named group, on your relay or any relay of its federation (members only).
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// Send to everyone (a2n): the whole federation, or see --scope.
    #[arg(long)]
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
    /// The message; "-" or nothing reads standard input (to its end:
    /// Ctrl-D at a terminal).
    message: Option<String>,
}

/// `listen` prints text exactly only with --json; its lines escape control
/// characters so that a message cannot fake a line of its own.
#[derive(Args)]
struct ListenArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// One JSON object per line: from, route, e2e, id, body (exact; or
    /// body_hex if it is not UTF-8). Without --json, control characters,
    /// backslashes and invisible direction marks in the body are escaped
    /// (\n, \t, \\, \x1b, \u{202e}, ...), so each message is one line.
    #[arg(long)]
    json: bool,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Also print join/leave notices.
    #[arg(long)]
    presence: bool,
    /// Also listen through this relay (repeatable): the key registers
    /// there too, messages for it go to every relay where it is online,
    /// and each is printed once. Listening goes on while any of them is
    /// reachable (redundancy).
    #[arg(long = "also", value_name = "URL")]
    also: Vec<String>,
    /// Be this key's only session on the relay: close its other sessions
    /// (other listeners, tabs, a stale connection of this one), now and
    /// after every reconnect. Without it, several listeners with one key
    /// each get every live message, and `w2w send` never disturbs them.
    #[arg(long)]
    exclusive: bool,
}

/// How a command's session takes part (PROTOCOL 7.7).
#[derive(Clone, Copy)]
enum Session {
    /// Sends and asks only (send, online, lookup, group): never takes a
    /// delivery, never disturbs a listener with the same key.
    SendOnly,
    /// Takes deliveries (listen); `exclusive`: closes the key's other
    /// sessions.
    Receive { exclusive: bool },
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
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {}", error_line(&e));
            ExitCode::from(exit_code_of(&e))
        }
    }
}

/// One line for an error: each cause once (a message that already
/// contains the next cause's text is not followed by it again), then a
/// hint when the cause is a common mistake. Control characters are escaped
/// (a relay's reason is remote text); only a local error (a TOML parse
/// error pointing at the line) keeps its newlines.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    if let Some(h) = hint(e) {
        line.push_str("; ");
        line.push_str(&h);
    }
    if client_error(e).is_some() {
        escape_text(line.as_bytes())
    } else {
        line.split('\n')
            .map(|l| escape_text(l.as_bytes()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn client_error(e: &anyhow::Error) -> Option<&w2w_client::ClientError> {
    e.chain()
        .find_map(|c| c.downcast_ref::<w2w_client::ClientError>())
}

fn exit_code_of(e: &anyhow::Error) -> u8 {
    match client_error(e) {
        // Refused locally: larger than the relay accepts (nothing sent).
        Some(w2w_client::ClientError::TooLarge { .. }) => EXIT_REJECTED,
        _ => EXIT_ERROR,
    }
}

/// What to do about a client error, for the causes people meet: nothing
/// listening, ws:// and wss:// mixed up, an untrusted certificate, a
/// name that does not resolve, the relay expecting another URL.
fn hint(e: &anyhow::Error) -> Option<String> {
    use tokio_websockets::Error as Ws;
    use w2w_client::ClientError as C;
    use w2w_proto::handshake::HandshakeError;
    let Some(ce) = client_error(e) else {
        return io_hint(e);
    };
    let hint = match ce {
        C::Connect { url, error } => {
            let tls = url.trim_start().to_ascii_lowercase().starts_with("wss:");
            let tls_hint = |r: &rustls::Error| -> Option<String> {
                use rustls::{CertificateError as Ce, Error as R};
                Some(match r {
                    R::InvalidMessage(_) if tls =>
                    {
                        "that port does not speak TLS: is it a plain relay? Use ws:// instead of wss://".into()
                    }
                    R::InvalidCertificate(Ce::UnknownIssuer | Ce::BadSignature) => {
                        "the relay's certificate is not signed by a trusted authority: for a self-signed relay, pass its certificate with --ca cert.pem".into()
                    }
                    R::InvalidCertificate(Ce::NotValidForName | Ce::NotValidForNameContext { .. }) => {
                        "the relay's certificate does not name this host: use the host name it was issued for in --relay".into()
                    }
                    R::InvalidCertificate(Ce::Expired | Ce::ExpiredContext { .. }) => {
                        "the relay's certificate has expired (or this machine's clock is wrong)".into()
                    }
                    _ => return None,
                })
            };
            match error {
                Ws::Io(io) => {
                    if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                        tls_hint(r)?
                    } else {
                        use std::io::ErrorKind as K;
                        match io.kind() {
                            K::ConnectionRefused => format!(
                                "is the relay running? Nothing accepts connections at {}: start one with `w2w serve`, or check --relay",
                                authority_of(url)
                            ),
                            K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted if !tls => {
                                "the server closed the connection during the WebSocket upgrade: if the relay uses TLS, use wss:// instead of ws://".into()
                            }
                            K::TimedOut | K::HostUnreachable | K::NetworkUnreachable => {
                                "check the host and port in --relay, and that no firewall is in the way".into()
                            }
                            _ => return None,
                        }
                    }
                }
                Ws::Rustls(r) => tls_hint(r)?,
                Ws::CannotResolveHost => {
                    "the host name does not resolve: check its spelling in --relay".into()
                }
                Ws::Upgrade(tokio_websockets::upgrade::Error::Parsing(_)) if !tls => {
                    "the server there does not answer in plain HTTP: a relay with TLS? Use wss:// instead of ws://".into()
                }
                Ws::Upgrade(tokio_websockets::upgrade::Error::DidNotSwitchProtocols(code)) => {
                    format!("an HTTP server answered ({code}), but not as a WebSocket relay: check the host, port and path in --relay")
                }
                Ws::Upgrade(_) | Ws::Protocol(_) => {
                    "the server there answered, but not as a w2w relay: check --relay".into()
                }
                _ => return None,
            }
        }
        C::BadUrl { .. } => "a relay URL looks like ws://127.0.0.1:7777/ or wss://relay.example.org/".into(),
        C::Timeout(_) => {
            "no answer in time: check --relay (host, port, and ws:// or wss://: a TLS relay needs wss://)".into()
        }
        C::Handshake(HandshakeError::RelayKeyChanged { .. }) => {
            "if you trust the change, rerun with --accept-new-relay-key".into()
        }
        C::Refused {
            code: ErrorCode::WrongUrl,
            ..
        } => "the relay expects another URL: use the one `w2w serve` printed (or one of its --public-url), scheme, host, port and trailing slash alike".into(),
        C::Refused {
            code: ErrorCode::UnknownGroup,
            ..
        } => "no relay this one can reach hosts a group by that name: check the name (`w2w group create NAME` makes one)".into(),
        C::Refused {
            code: ErrorCode::NotMember,
            ..
        } => "only the group's members may do that (`w2w group list NAME` shows them)".into(),
        C::TlsRoots { .. } => "--ca takes a PEM file holding the relay's certificate".into(),
        _ => return None,
    };
    Some(hint)
}

/// The URL to dial: as given (the relay may require exactly the URL it
/// was configured with), but with a scheme in capitals (`WS://`) lowered.
fn relay_url(url: &str) -> String {
    let url = url.trim();
    match url.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("ws") || scheme.eq_ignore_ascii_case("wss") =>
        {
            format!("{}://{rest}", scheme.to_ascii_lowercase())
        }
        _ => url.to_owned(),
    }
}

/// Hints for the relay's own errors: the port it should listen on.
fn io_hint(e: &anyhow::Error) -> Option<String> {
    use std::io::ErrorKind as K;
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>())?;
    Some(match io.kind() {
        K::AddrInUse => {
            "another program (another relay?) listens on that port: stop it, or choose another with --listen".into()
        }
        K::AddrNotAvailable => {
            "that IP address is not one of this machine's: use 127.0.0.1, 0.0.0.0 (all addresses) or one of its own".into()
        }
        K::PermissionDenied if e.to_string().starts_with("binding") => {
            "ports below 1024 need privileges: use a higher port, or a reverse proxy in front".into()
        }
        _ => return None,
    })
}

/// `host:port` of a URL, for messages.
fn authority_of(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(u) => match (u.host(), u.port_u16(), u.scheme_str()) {
            (Some(h), Some(p), _) => format!("{h}:{p}"),
            (Some(h), None, Some("wss")) => format!("{h}:443"),
            (Some(h), None, _) => format!("{h}:80"),
            _ => url.to_owned(),
        },
        Err(_) => url.to_owned(),
    }
}

/// `--listen` (and `listen` in the config file): `PORT` (on 127.0.0.1),
/// `IP:PORT`, `[IPv6]:PORT`, or `HOST:PORT` with a host name (resolved;
/// an IPv4 address is preferred, as `localhost` means 127.0.0.1 to most).
fn parse_listen(s: &str) -> std::result::Result<SocketAddr, String> {
    let s = s.trim();
    let usage = "expected PORT, IP:PORT or HOST:PORT, e.g. 7777, 0.0.0.0:7777 or localhost:7777";
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = s
            .parse()
            .map_err(|_| format!("port {s} is out of range (0-65535)"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(usage.into());
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(usage.into());
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = (host, 0)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e} ({usage})"))?
        .collect();
    let port: u16 = port.parse().map_err(|_| usage.to_string())?;
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(|a| SocketAddr::new(a.ip(), port))
        .ok_or_else(|| format!("{host:?} resolves to no address ({usage})"))
}

/// Text from elsewhere (a message body, a relay's reason) made safe for one
/// terminal line: `\` becomes `\\`; newline, tab and carriage return become
/// `\n`, `\t`, `\r`; other control characters (C0, DEL, C1) and the
/// invisible characters that reorder or hide text (bidi controls, zero-width
/// marks) become `\u{..}`; bytes that are not UTF-8 become `\xNN`. Printable
/// text, other languages and emoji included, is unchanged.
fn escape_text(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() || is_invisible_format(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Unicode format characters that change how the text around them is
/// shown (Trojan Source) or are not shown at all.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{061c}' | '\u{180e}'
        | '\u{200b}'..='\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}')
}

async fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Serve(a) => serve(a).await,
        Cmd::Id(IdArgs { id, op: IdCmd::New }) => {
            let path = id.unwrap_or_else(keys::default_id_path);
            keys::check_not_exists(&path)?;
            let ident = keys::create_key(&path)?;
            eprintln!("created {}", path.display());
            out!("{}", ident.address());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Id(IdArgs {
            id,
            op: IdCmd::Show,
        }) => {
            let given = id.is_some();
            let path = id.unwrap_or_else(keys::default_id_path);
            out!("{}", keys::load_identity(&path, given)?.address());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Send(a) => send(a).await,
        Cmd::Listen(a) => listen(a).await,
        Cmd::Online(a) => {
            let mut c = connect(&a, Session::SendOnly).await?;
            let online = c.online().await;
            c.close().await;
            for addr in online? {
                out!("{addr}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Group { client, op } => {
            use w2w_proto::group::GroupAction;
            let c = connect(&client, Session::SendOnly).await?;
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
            out!(
                "group {} (owner {})",
                escape_text(info.name.as_bytes()),
                info.owner
            );
            for (m, admin) in &info.members {
                out!("  {m}{}", if *admin { "  admin" } else { "" });
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lookup { client, address } => {
            let c = connect(&client, Session::SendOnly).await?;
            let r = c
                .request(w2w_proto::frame::RequestOp::Lookup(address))
                .await;
            c.close().await;
            match r? {
                w2w_proto::frame::ResponseBody::Lookup(Some(h)) => {
                    out!(
                        "{address} is at relay {} ({})",
                        escape_text(h.relay_url.as_bytes()),
                        h.relay_key
                    );
                    Ok(ExitCode::SUCCESS)
                }
                _ => {
                    out!("{address} is not known to the federation");
                    Ok(ExitCode::from(EXIT_NOT_DELIVERED))
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
    let listen = match (a.listen, &file.listen) {
        (Some(l), _) => l,
        (None, Some(l)) => parse_listen(l).map_err(|e| anyhow::anyhow!("listen = {l:?}: {e}"))?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 7777)),
    };
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
    if let Some(n) = a.shards {
        federation.shards = n;
    }
    let mut limits = file.limits;
    if let Some(n) = a.max_sessions {
        if n == 0 {
            bail!("--max-sessions 0 would refuse every client: give at least 1");
        }
        limits.max_sessions = n;
    }
    let config = RelayConfig {
        identity,
        listen,
        data_dir: Some(data.clone()),
        public_urls,
        tls,
        trusted_proxies: [file.trusted_proxies, a.trusted_proxies].concat(),
        limits,
        federation,
    };
    let config_peers = config.federation.peers.clone();
    let relay = Relay::start(config).await?;
    let stop = shutdown_signal();
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
        _ = stop => tracing::info!("shutting down"),
        _ = relay.cancelled() => {}
    }
    relay.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a SIGTERM that comes right after the
/// relay printed its banner must shut it down, not kill it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{signal, SignalKind};
        signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)))
    };
    async move {
        #[cfg(unix)]
        if let Ok((mut term, mut int)) = handlers {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn connect(a: &ClientArgs, session: Session) -> Result<Client> {
    let given = a.id.is_some();
    let id_path = a.id.clone().unwrap_or_else(keys::default_id_path);
    let identity = keys::load_identity(&id_path, given)?;
    let mut known = keys::KnownRelays::load(keys::config_dir().join("known_relays.json"))?;
    let pinned = if a.accept_new_relay_key {
        None
    } else {
        known.get(&a.relay)?
    };
    let mut opts = ConnectOptions::new(relay_url(&a.relay)).pinned(pinned);
    opts = match session {
        Session::SendOnly => opts.send_only(true),
        Session::Receive { exclusive } => opts.exclusive(exclusive),
    };
    if let Some(ca) = &a.ca {
        opts = opts.trust_pem_file(ca)?;
    }
    let client = match Client::connect(identity, opts).await {
        Ok(c) => c,
        Err(
            e @ w2w_client::ClientError::Handshake(
                w2w_proto::handshake::HandshakeError::RelayKeyChanged { .. },
            ),
        ) => {
            return Err(anyhow::Error::new(e).context(format!(
                "the relay at {} presents another key than the one pinned for it in {}",
                a.relay,
                known.path().display()
            )))
        }
        // These name the URL themselves.
        Err(
            e @ (w2w_client::ClientError::Connect { .. } | w2w_client::ClientError::BadUrl { .. }),
        ) => return Err(e.into()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("relay {}", a.relay))),
    };
    if known.pin(&a.relay, client.relay_key())? {
        eprintln!(
            "pinned relay key {} for {}",
            client.relay_key(),
            keys::normalize_relay_url(&a.relay)
        );
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
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                // Otherwise it would look like a hang.
                eprintln!(
                    "reading the message from standard input: type it, then press Ctrl-D on a new line (or give it as an argument)"
                );
            }
            let mut s = Vec::new();
            stdin
                .lock()
                .read_to_end(&mut s)
                .context("reading the message from standard input")?;
            s
        }
        Some(m) => m.as_bytes().to_vec(),
    };
    // clap's "dest" group makes exactly one of these present.
    let dest = if let Some(g) = &a.group {
        Dest::Group(g.clone())
    } else if a.all && a.scope == "relay" {
        Dest::A2n(Scope::Relay)
    } else if a.all {
        Dest::A2n(Scope::Federation)
    } else if a.self_ {
        Dest::A2a
    } else if let [one] = a.to.as_slice() {
        Dest::A2b(*one)
    } else {
        Dest::A2g(a.to.clone())
    };
    let c = connect(&a.client, Session::SendOnly).await?;
    let r = if a.plain {
        c.send_plain(dest, body).await
    } else {
        c.send(dest, body).await
    };
    c.close().await;
    let r = match r {
        Ok(r) => r,
        // Refused before it had a receipt (e.g. `--group` with a name the
        // relay does not know): rejected, as a refusing receipt would be.
        Err(e @ w2w_client::ClientError::Refused { .. }) => {
            let e = anyhow::Error::new(e).context("message rejected");
            eprintln!("error: {}", error_line(&e));
            return Ok(ExitCode::from(EXIT_REJECTED));
        }
        Err(e) => return Err(e.into()),
    };
    if a.json {
        out!("{}", receipt_json(&r));
    } else {
        let reason = ErrorCode::from_u16(r.reason)
            .map(|c| format!(" ({})", c.as_str()))
            .unwrap_or_default();
        out!(
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
            out!("  {} {}{}", e.to, e.status.as_str(), reason);
        }
    }
    Ok(match r.status {
        Status::Delivered | Status::Queued => ExitCode::SUCCESS,
        Status::NoRoute | Status::Partial => ExitCode::from(EXIT_NOT_DELIVERED),
        Status::Rejected => ExitCode::from(EXIT_REJECTED),
    })
}

async fn listen(a: ListenArgs) -> Result<ExitCode> {
    let session = Session::Receive {
        exclusive: a.exclusive,
    };
    let first = connect(&a.client, session).await?;
    let address = first.address();
    let mut relays = vec![(a.client.relay.clone(), first)];
    for url in &a.also {
        let args = ClientArgs {
            relay: url.clone(),
            ..a.client.clone()
        };
        relays.push((url.clone(), connect(&args, session).await?));
    }
    let names: Vec<String> = relays.iter().map(|(u, _)| u.clone()).collect();
    let mut c = w2w_client::Homes::from_clients(relays);
    if a.presence {
        c.request_all(w2w_proto::frame::RequestOp::Presence(true))
            .await?;
    }
    let mut stop = std::pin::pin!(shutdown_signal());
    eprintln!(
        "listening as {address} on {} (Ctrl-C to stop)",
        names.join(" and ")
    );
    let mut stdout = std::io::stdout();
    let mut n = 0u64;
    loop {
        let ev = tokio::select! {
            ev = c.recv() => ev,
            _ = &mut stop => break,
        };
        match ev {
            None => bail!(
                "connection ended: {}",
                c.ended()
                    .iter()
                    .map(|(u, why)| format!("{u}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Some(Event::Msg(m)) => {
                use std::io::Write as _;
                let line = if a.json {
                    let text = std::str::from_utf8(&m.body).ok();
                    format!(
                        "{}",
                        serde_json::json!({
                            "from": m.from.to_hex(),
                            "route": m.dest.route().as_str(),
                            "e2e": m.security.as_str(),
                            "id": m.id.to_string(),
                            "body": text,
                            "body_hex": if text.is_none() { Some(hex::encode(&m.body)) } else { None },
                        })
                    )
                } else {
                    // One line per message, whatever it holds: a newline
                    // in a body must not start a line that looks like
                    // another message, nor escape codes reach the terminal.
                    format!(
                        "{} [{}] {} {}",
                        m.dest.route().as_str(),
                        m.security.as_str(),
                        m.from,
                        escape_text(&m.body)
                    )
                };
                // A closed pipe (`w2w listen | head`) ends listening.
                if writeln!(stdout, "{line}")
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break;
                }
                n += 1;
                if a.count.is_some_and(|c| n >= c) {
                    break;
                }
            }
            Some(Event::Notice(notice)) => match notice {
                Notice::Join(x) if a.presence => eprintln!("+ {x} joined"),
                Notice::Leave(x) if a.presence => eprintln!("- {x} left"),
                Notice::Replaced => eprintln!(
                    "closed: another session of this identity asked to be the only one (--exclusive)"
                ),
                Notice::ShuttingDown => eprintln!("the relay is shutting down"),
                Notice::Delivered { id, to } => {
                    eprintln!("message {id} (queued earlier) reached {to}")
                }
                _ => {}
            },
            Some(Event::Error { code, detail }) => {
                eprintln!("relay error {code}: {}", escape_text(detail.as_bytes()))
            }
            Some(Event::Rejected { id, from, reason }) => eprintln!(
                "rejected message {id} claiming to be from {from}: {}",
                escape_text(reason.to_string().as_bytes())
            ),
        }
    }
    c.close().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_text_keeps_one_line_and_the_terminal_safe() {
        assert_eq!(escape_text(b"hello, world"), "hello, world");
        assert_eq!(escape_text("héllo 世界 🙂".as_bytes()), "héllo 世界 🙂");
        assert_eq!(escape_text(b"a\nb\r\tc\\n"), "a\\nb\\r\\tc\\\\n");
        assert_eq!(escape_text(b"\x1b[2J\x07\x7f"), "\\u{1b}[2J\\u{7}\\u{7f}");
        assert_eq!(escape_text("\u{85}x".as_bytes()), "\\u{85}x", "C1 controls");
        assert_eq!(
            escape_text("a\u{202e}b\u{200b}c\u{2066}".as_bytes()),
            "a\\u{202e}b\\u{200b}c\\u{2066}"
        );
        assert_eq!(escape_text(b"ok\xff\xfeend"), "ok\\xff\\xfeend");
        // Escaping is unambiguous: a literal backslash-n differs from a newline.
        assert_ne!(escape_text(b"\\n"), escape_text(b"\n"));
    }

    #[test]
    fn listen_addresses() {
        let v4 = |s: &str| parse_listen(s).map(|a| a.to_string());
        assert_eq!(v4("7777").as_deref(), Ok("127.0.0.1:7777"));
        assert_eq!(v4("0").as_deref(), Ok("127.0.0.1:0"));
        assert_eq!(v4("0.0.0.0:7777").as_deref(), Ok("0.0.0.0:7777"));
        assert_eq!(v4("[::1]:7777").as_deref(), Ok("[::1]:7777"));
        assert_eq!(v4("localhost:7777").as_deref(), Ok("127.0.0.1:7777"));
        for bad in ["", "99999", "localhost", "localhost:port", ":7777", "a b:1"] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn error_lines_say_each_cause_once() {
        let e = anyhow::anyhow!("Connection refused (os error 111)")
            .context("connecting to ws://x/: Connection refused (os error 111)")
            .context("connecting to ws://x/: Connection refused (os error 111)");
        assert_eq!(
            error_line(&e),
            "connecting to ws://x/: Connection refused (os error 111)"
        );
        // Remote text (a relay's close reason): one line, escaped.
        let e = anyhow::Error::new(w2w_client::ClientError::Closed {
            reason: Some("bye \x1b[31mred\nerror: fake".into()),
        })
        .context("relay ws://x/");
        assert_eq!(
            error_line(&e),
            "relay ws://x/: connection closed: bye \\u{1b}[31mred\\nerror: fake"
        );
        // A local error keeps its lines (a TOML error points at the line).
        let e = anyhow::anyhow!("at line 2\n2 | x = 1\n  | ^\x07").context("parsing f.toml");
        assert_eq!(
            error_line(&e),
            "parsing f.toml: at line 2\n2 | x = 1\n  | ^\\u{7}"
        );
    }

    #[test]
    fn relay_url_lowers_only_the_scheme() {
        assert_eq!(relay_url("WS://Host:1/Path"), "ws://Host:1/Path");
        assert_eq!(relay_url("wss://h/"), "wss://h/");
        assert_eq!(relay_url("http://h/"), "http://h/");
    }
}
