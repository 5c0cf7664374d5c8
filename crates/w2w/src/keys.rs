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

/// Loads the key, creating it on first use.
pub fn load_or_create(path: &Path) -> Result<(Identity, bool)> {
    if path.exists() {
        Ok((load_key(path)?, false))
    } else {
        Ok((create_key(path)?, true))
    }
}

/// Relay URL → relay key, pinned on first successful registration.
pub struct KnownRelays {
    path: PathBuf,
    map: BTreeMap<String, String>,
}

impl KnownRelays {
    pub fn load(path: PathBuf) -> Result<Self> {
        let map = match std::fs::read_to_string(&path) {
            Ok(t) => {
                serde_json::from_str(&t).with_context(|| format!("parsing {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(KnownRelays { path, map })
    }

    pub fn get(&self, url: &str) -> Result<Option<Address>> {
        match self.map.get(url) {
            None => Ok(None),
            Some(h) => Ok(Some(h.parse().with_context(|| {
                format!("bad key for {url} in {}", self.path.display())
            })?)),
        }
    }

    /// Records `key` for `url`; returns true if it was new or changed.
    pub fn pin(&mut self, url: &str, key: Address) -> Result<bool> {
        if self.map.get(url) == Some(&key.to_hex()) {
            return Ok(false);
        }
        self.map.insert(url.to_owned(), key.to_hex());
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
