//! `GET /status`: the relay at a glance for its operator, one plain HTML
//! page rendered on the server (no script, no external resources). The
//! same numbers as `/metrics`, for a person instead of a scraper.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use w2w_proto::ErrorCode;

use crate::shared::Shared;

/// `&`, `<`, `>`, `"` and `'` as entities: URLs and details are operator or
/// peer supplied.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// The page.
pub fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let g = shared.gauges();
    let mut s = String::with_capacity(4096);
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>w2w relay {short}</title>\
         <style>body{{font:15px/1.4 system-ui,sans-serif;margin:1.5em;max-width:60em}}\
         table{{border-collapse:collapse;margin:.3em 0 1.2em}}td,th{{padding:.2em .8em;text-align:left;border-bottom:1px solid #ddd}}\
         td.n{{text-align:right;font-variant-numeric:tabular-nums}}.up{{color:#070}}.down{{color:#b00}}code{{font-size:90%}}</style>\
         </head><body>\n<h1>w2w relay</h1>\n<table>\
         <tr><th>relay key</th><td><code>{key}</code></td></tr>\
         <tr><th>URL</th><td>{url}</td></tr>\
         <tr><th>version</th><td>w2w {version}</td></tr>\
         <tr><th>up for</th><td>{uptime}</td></tr></table>\n",
        short = shared.relay_key.short(),
        key = shared.relay_key,
        url = esc(&shared.advertised_url(None)),
        version = env!("CARGO_PKG_VERSION"),
        uptime = duration(g.uptime),
    );
    let rows = [
        (
            "open connections",
            m.connections.load(Relaxed).max(0) as u64,
        ),
        (
            "registered clients",
            m.registered.load(Relaxed).max(0) as u64,
        ),
        (
            "bytes waiting in send queues",
            m.queued_bytes.load(Relaxed).max(0) as u64,
        ),
        (
            "peer links up",
            g.peers.iter().filter(|p| p.up).count() as u64,
        ),
        (
            "relays reachable",
            m.known_relays.load(Relaxed).max(0) as u64,
        ),
        (
            "addresses in the directory",
            m.known_addresses.load(Relaxed).max(0) as u64,
        ),
        ("messages queued on disk", g.store_messages),
        ("bytes queued on disk", g.store_bytes),
        ("bytes being written", g.store_pending_bytes),
    ];
    s.push_str("<h2>Now</h2>\n<table>");
    for (what, n) in rows {
        let _ = write!(s, "<tr><th>{what}</th><td class=\"n\">{n}</td></tr>");
    }
    s.push_str("</table>\n<h2>Peer links</h2>\n");
    if g.peers.is_empty() {
        s.push_str(
            "<p>None: this relay is not federated (<code>--peer URL</code> links it).</p>\n",
        );
    } else {
        s.push_str("<table><tr><th>state</th><th>relay</th><th>URL</th><th>how</th></tr>");
        for p in &g.peers {
            let _ = write!(
                s,
                "<tr><td class=\"{c}\">{c}</td><td><code>{k}</code></td><td>{u}</td><td>{how}</td></tr>",
                c = if p.up { "up" } else { "down" },
                k = p.peer.map(|k| k.short()).unwrap_or_else(|| "?".into()),
                u = esc(&p.url),
                how = if p.configured { "dialled (--peer)" } else { "dialled in" },
            );
        }
        s.push_str("</table>\n");
    }
    s.push_str("<h2>Refusals and errors since start, by reason</h2>\n");
    let mut codes: Vec<(ErrorCode, u64)> = ErrorCode::ALL
        .iter()
        .map(|c| (*c, m.error_count(*c)))
        .filter(|(_, n)| *n > 0)
        .collect();
    codes.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    if codes.is_empty() {
        s.push_str("<p>None.</p>\n");
    } else {
        s.push_str("<table><tr><th>reason</th><th>code</th><th>count</th></tr>");
        for (c, n) in codes {
            let _ = write!(
                s,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{n}</td></tr>",
                c.as_str(),
                c.as_u16()
            );
        }
        s.push_str("</table>\n");
    }
    s.push_str(
        "<p>Counters and histograms for scraping: <a href=\"/metrics\">/metrics</a>. \
         Health: <a href=\"/healthz\">/healthz</a>. The log has one line per refusal \
         reason every 10 s.</p>\n</body></html>\n",
    );
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::esc("ws://x/<script>\"'&"),
            "ws://x/&lt;script&gt;&quot;&#39;&amp;"
        );
    }
}
