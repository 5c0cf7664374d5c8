//! Exposes the resolved iroh-relay version (from Cargo.lock) as `IROH_RELAY_VERSION`.
use std::{env, fs, path::Path};

fn main() {
    let dir = env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let lock = Path::new(&dir).join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let mut version = String::from("unknown");
    if let Ok(text) = fs::read_to_string(&lock) {
        let mut in_pkg = false;
        for line in text.lines() {
            let line = line.trim();
            if line == "[[package]]" {
                in_pkg = false;
            } else if line == "name = \"iroh-relay\"" {
                in_pkg = true;
            } else if in_pkg {
                if let Some(v) = line.strip_prefix("version = \"") {
                    version = v.trim_end_matches('"').to_string();
                    break;
                }
            }
        }
    }
    println!("cargo:rustc-env=IROH_RELAY_VERSION={version}");
}
