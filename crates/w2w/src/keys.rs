//! Key files and the known-relays pin file (trust on first use).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use w2w_proto::{Address, Identity};

/// `~/.config/w2w` (or the platform's config dir).
pub fn config_dir() -> PathBuf {
    dirs::config_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("w2w")
}

pub fn default_id_path() -> PathBuf {
    config_dir().join("id.key")
}

/// Writes a new random key to `path` with mode 0600 (refuses to overwrite).
pub fn create_key(path: &Path) -> Result<Identity> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let id = Identity::from_seed(rand::random());
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| {
        format!(
            "creating key file {} (it must not exist already)",
            path.display()
        )
    })?;
    writeln!(f, "{}", hex::encode(id.seed()))?;
    Ok(id)
}

/// Reads a key file: 64 hex characters of secret seed.
pub fn load_key(path: &Path) -> Result<Identity> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading key file {}", path.display()))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).with_context(|| {
        format!(
            "{} is not a w2w key file (expected 64 hex characters)",
            path.display()
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "key file {} has permissions {:o}; run: chmod 600 {}",
                path.display(),
                mode,
                path.display()
            );
        }
    }
    Ok(Identity::from_seed(seed))
}

/// A client's identity: the key file must exist. Only `w2w id new` creates
/// one, so a mistyped `--id` path is an error instead of a new identity.
/// `given` says whether the path came from `--id`/`W2W_ID` (the message
/// then names the flag) or is the default.
pub fn load_identity(path: &Path, given: bool) -> Result<Identity> {
    match std::fs::metadata(path) {
        Ok(_) => load_key(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if given {
                bail!(
                    "no key file at {p} (--id or W2W_ID): check the path, or create a new identity there with: w2w id new --id {p}",
                    p = path.display()
                )
            }
            bail!(
                "you have no identity yet ({} does not exist): create one with: w2w id new",
                path.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("reading key file {}", path.display())),
    }
}

/// Loads the key, creating it on first use (the relay's own key).
pub fn load_or_create(path: &Path) -> Result<(Identity, bool)> {
    if path.exists() {
        Ok((load_key(path)?, false))
    } else {
        Ok((create_key(path)?, true))
    }
}

/// The form of a relay URL that keys its pin: scheme and host in lower
/// case, the scheme's default port (80 for ws, 443 for wss) left out, and
/// an empty path written `/`. So `WS://Relay.example:80` and
/// `ws://relay.example/` share one pin. Different host names for one
/// machine (`localhost` and `127.0.0.1`) stay different URLs: a name says
/// nothing about which machine answers, so each gets its own pin. A URL
/// that does not parse is returned as it is (connecting reports it).
pub fn normalize_relay_url(url: &str) -> String {
    let Ok(uri) = url.trim().parse::<http::Uri>() else {
        return url.to_owned();
    };
    let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority()) else {
        return url.to_owned();
    };
    let scheme = scheme.to_ascii_lowercase();
    let host = auth.host().to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "ws" => Some(80),
        "wss" => Some(443),
        _ => None,
    };
    let port = match auth.port_u16() {
        Some(p) if Some(p) != default_port => format!(":{p}"),
        _ => String::new(),
    };
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") => "/",
        Some(p) => p,
    };
    format!("{scheme}://{host}{port}{path}")
}

/// Relay URL → relay key, pinned on first successful registration. URLs
/// are kept in [`normalize_relay_url`] form; entries an older version wrote
/// under another spelling are read under their normal form.
pub struct KnownRelays {
    path: PathBuf,
    map: BTreeMap<String, String>,
}

impl KnownRelays {
    pub fn load(path: PathBuf) -> Result<Self> {
        let raw: BTreeMap<String, String> = match std::fs::read_to_string(&path) {
            Ok(t) => {
                serde_json::from_str(&t).with_context(|| format!("parsing {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut map = BTreeMap::new();
        // An entry already in normal form wins over other spellings of it.
        let (normal, other): (Vec<_>, Vec<_>) = raw
            .into_iter()
            .partition(|(url, _)| normalize_relay_url(url) == *url);
        for (url, key) in normal.into_iter().chain(other) {
            let n = normalize_relay_url(&url);
            match map.get(&n) {
                Some(k) if *k != key => tracing::warn!(
                    "{}: {url} and {n} pin different keys; using the one for {n}",
                    path.display()
                ),
                Some(_) => {}
                None => {
                    map.insert(n, key);
                }
            }
        }
        Ok(KnownRelays { path, map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, url: &str) -> Result<Option<Address>> {
        let url = normalize_relay_url(url);
        match self.map.get(&url) {
            None => Ok(None),
            Some(h) => Ok(Some(h.parse().with_context(|| {
                format!("bad key for {url} in {}", self.path.display())
            })?)),
        }
    }

    /// Records `key` for `url`; returns true if it was new or changed.
    pub fn pin(&mut self, url: &str, key: Address) -> Result<bool> {
        let url = normalize_relay_url(url);
        if self.map.get(&url) == Some(&key.to_hex()) {
            return Ok(false);
        }
        self.map.insert(url, key.to_hex());
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&self.map)?)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(true)
    }
}

pub fn check_not_exists(path: &Path) -> Result<()> {
    if path.exists() {
        bail!(
            "{} already exists; refusing to overwrite a key (use another --id path)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_are_normalized_for_pinning() {
        for (given, want) in [
            ("ws://127.0.0.1:7777/", "ws://127.0.0.1:7777/"),
            ("ws://127.0.0.1:7777", "ws://127.0.0.1:7777/"),
            (
                "WS://Relay.Example.ORG:7777",
                "ws://relay.example.org:7777/",
            ),
            ("ws://relay.example.org:80/", "ws://relay.example.org/"),
            ("wss://relay.example.org:443", "wss://relay.example.org/"),
            ("wss://relay.example.org:80/", "wss://relay.example.org:80/"),
            ("ws://[::1]:7777", "ws://[::1]:7777/"),
            ("wss://relay.example.org/w2w", "wss://relay.example.org/w2w"),
            ("ws://localhost:7777/", "ws://localhost:7777/"),
        ] {
            assert_eq!(normalize_relay_url(given), want, "{given}");
        }
        assert_ne!(
            normalize_relay_url("ws://localhost:7777/"),
            normalize_relay_url("ws://127.0.0.1:7777/"),
            "different host names keep their own pins"
        );
    }

    #[test]
    fn pins_written_under_another_spelling_are_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("known_relays.json");
        let a = Identity::from_seed([1; 32]).address();
        let b = Identity::from_seed([2; 32]).address();
        std::fs::write(
            &path,
            serde_json::json!({
                "ws://127.0.0.1:7777": a.to_hex(),
                "WS://127.0.0.1:7778/": b.to_hex(),
                "ws://127.0.0.1:7778/": a.to_hex(),
            })
            .to_string(),
        )
        .expect("writing pins");
        let mut known = KnownRelays::load(path.clone()).expect("loading pins");
        assert_eq!(known.get("ws://127.0.0.1:7777/").expect("get"), Some(a));
        // The entry in normal form wins over another spelling of it.
        assert_eq!(known.get("ws://127.0.0.1:7778").expect("get"), Some(a));
        assert!(
            !known.pin("ws://127.0.0.1:7777", a).expect("pin"),
            "same pin"
        );
        assert!(known.pin("ws://127.0.0.1:7779", b).expect("pin"), "new pin");
        let saved: BTreeMap<String, String> =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(
            saved.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "ws://127.0.0.1:7777/",
                "ws://127.0.0.1:7778/",
                "ws://127.0.0.1:7779/"
            ]
        );
    }
}
