//! The data directory: private by default, and one relay at a time.
//!
//! The directory holds the relay's key and its store (every queued message
//! and registration), so it is created 0700 and the store's files 0600; a
//! looser directory or file found at start is tightened, with a warning.
//! [`DataDirLock`] is an exclusive `flock` on `<dir>/lock`: two relays on
//! one store would each believe they own its queues and budgets, so the
//! second refuses to start. The lock is released by the kernel when the
//! process ends, however it ends; the file stays (with the last pid in it).

use std::fs::File;
use std::path::{Path, PathBuf};

/// The files of the store (SQLite's main file and its WAL companions).
pub const STORE_FILES: [&str; 3] = ["w2w.sqlite", "w2w.sqlite-wal", "w2w.sqlite-shm"];
/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "lock";

/// Errors preparing or locking a data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("creating data directory {}: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setting permissions on {}: {source}", path.display())]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening lock file {}: {source}", path.display())]
    LockFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error(
        "another w2w relay{} is already using the data directory {} (it holds {}); \
         stop it, or give this one its own --data directory",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir.display(),
        dir.join(LOCK_FILE).display()
    )]
    InUse { dir: PathBuf, pid: Option<u32> },
}

/// Creates `dir` (mode 0700) if needed, tightens it and the store's files
/// if another user could read them (group or other bits set: a warning
/// names each), and creates the store's main file 0600 if it is missing
/// (SQLite gives its WAL files the main file's mode).
pub fn prepare(dir: &Path) -> Result<(), DataDirError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    // A directory that holds other things (say `--data ~`) is not ours to
    // chmod: only one that is new or already a w2w data directory is
    // tightened; any other gets a warning.
    let ours = !dir.exists()
        || ["w2w.sqlite", "relay.key", LOCK_FILE]
            .iter()
            .any(|f| dir.join(f).exists())
        || std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    builder.create(dir).map_err(|source| DataDirError::Create {
        path: dir.to_owned(),
        source,
    })?;
    if ours {
        tighten(dir, 0o700)?;
    } else {
        warn_if_open(dir);
    }
    for name in STORE_FILES {
        tighten(&dir.join(name), 0o600)?;
    }
    let main = dir.join(STORE_FILES[0]);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(&main).map_err(|source| DataDirError::Create {
        path: main.clone(),
        source,
    })?;
    Ok(())
}

/// Removes group and other permission bits from `path` if any are set
/// (missing files are fine).
#[cfg(unix)]
fn tighten(path: &Path, mode: u32) -> Result<(), DataDirError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let was = meta.permissions().mode() & 0o777;
    if was & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        DataDirError::Permissions {
            path: path.to_owned(),
            source,
        }
    })?;
    tracing::warn!(
        "{} had mode {was:o}, readable by other users; set it to {mode:o}",
        path.display()
    );
    Ok(())
}

#[cfg(not(unix))]
fn tighten(_path: &Path, _mode: u32) -> Result<(), DataDirError> {
    Ok(())
}

/// Warns (without changing anything) if other users can read `dir`.
fn warn_if_open(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "{} (mode {mode:o}) holds other files, so it was left as it is; \
                     the store files in it are private, but a dedicated --data directory is safer",
                    dir.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// An exclusive lock on a data directory, held until dropped (or the
/// process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock without waiting: [`DataDirError::InUse`] (with the
    /// holder's pid, read from the file) if another process has it. On
    /// success our pid is written to the file.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, DataDirError> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(LOCK_FILE);
        let lock_err = |source| DataDirError::LockFile {
            path: path.clone(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&path).map_err(lock_err)?;
        if !try_lock(&file).map_err(lock_err)? {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(DataDirError::InUse {
                dir: dir.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        file.set_len(0).map_err(lock_err)?;
        file.rewind().map_err(lock_err)?;
        writeln!(file, "{}", std::process::id()).map_err(lock_err)?;
        Ok(DataDirLock { _file: file })
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: Ok(false) if another open file holds it.
/// (std's `File::try_lock` does the same from Rust 1.89; our minimum is
/// older.) flock locks belong to the open file, so a second lock from the
/// same process on a separately opened file is refused too.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own for the call's duration.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_private_and_tightens_loose() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("w2w.sqlite")), 0o600);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let wal = dir.join("w2w.sqlite-wal");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o644)).unwrap();
        prepare(&dir).unwrap();
        assert_eq!((mode(&dir), mode(&wal)), (0o700, 0o600));
    }

    #[test]
    fn a_directory_holding_other_files_is_not_chmodded() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::write(home.join("notes.txt"), b"mine").unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&home).unwrap();
        assert_eq!(mode(&home), 0o755, "left as the user had it");
        assert_eq!(
            mode(&home.join("w2w.sqlite")),
            0o600,
            "the store is private"
        );
    }

    #[test]
    fn second_lock_is_refused_with_the_holders_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(tmp.path()).unwrap();
        match DataDirLock::acquire(tmp.path()) {
            Err(DataDirError::InUse { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(first);
        DataDirLock::acquire(tmp.path()).unwrap();
    }
}
