//! Filesystem operations for files that decide what runs: every directory on the way is owned by
//! a trusted user and not writable by anyone else (or sticky, as `/tmp` is, where nobody can
//! replace another user's entry), files are never opened through a symbolic link, new files are
//! created exclusively and replaced by an atomic rename, and ownership is checked on the opened
//! file descriptor (`fstat`), never by a path looked up again later.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a file or directory was not used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A system call on the path failed (including `ENOENT`: see [`TrustError::is_not_found`]).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path exists but may not be trusted (wrong owner, writable by others, a symbolic
    /// link, not a regular file or directory, too large).
    #[error("{path}: refusing to use it: {why}")]
    Untrusted {
        /// The file or directory refused.
        path: PathBuf,
        /// Why it is refused.
        why: String,
    },
}

impl TrustError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn untrusted(path: &Path, why: impl Into<String>) -> Self {
        Self::Untrusted {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }

    /// The OS error, if the failure was one (`ENOENT` for a missing file).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Io { source, .. } => source.raw_os_error(),
            Self::Untrusted { .. } => None,
        }
    }

    /// Whether the file or directory does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

pub use crate::maps::{euid, trusted_owners};

fn who(uid: u32) -> String {
    if uid == 0 {
        "root".to_string()
    } else {
        format!("uid {uid}")
    }
}

fn owners_text(trusted: &[u32]) -> String {
    trusted
        .iter()
        .map(|&u| who(u))
        .collect::<Vec<_>>()
        .join(" or ")
}

const STICKY: u32 = 0o1000;

/// Checks every directory from `/` down to `dir` (after resolving links, whose targets are what
/// is checked): owned by one of `trusted` and not writable by group or others, unless sticky.
pub fn check_dir_chain(dir: &Path, trusted: &[u32]) -> Result<(), TrustError> {
    let canonical = dir.canonicalize().map_err(|e| TrustError::io(dir, e))?;
    let mut current = PathBuf::from("/");
    let components: Vec<_> = canonical.components().skip(1).collect();
    check_dir(&current, trusted)?;
    for component in components {
        current.push(component);
        check_dir(&current, trusted)?;
    }
    Ok(())
}

fn check_dir(dir: &Path, trusted: &[u32]) -> Result<(), TrustError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| TrustError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(TrustError::untrusted(dir, "not a directory"));
    }
    if !trusted.contains(&meta.uid()) {
        return Err(TrustError::untrusted(
            dir,
            format!(
                "owned by {}, not by {}",
                who(meta.uid()),
                owners_text(trusted)
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 && meta.mode() & STICKY == 0 {
        return Err(TrustError::untrusted(
            dir,
            format!(
                "writable by other users (mode {:o}) and not sticky",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Creates `dir` (mode `mode`) if it is missing, in a trusted parent, and checks that it is a
/// real directory owned by this process's user and writable by nobody else.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), TrustError> {
    let me = euid();
    let parent = dir
        .parent()
        .ok_or_else(|| TrustError::untrusted(dir, "has no parent directory"))?;
    check_dir_chain(parent, &trusted_owners())?;
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {
            // The umask may have narrowed the mode; set exactly what was asked.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| TrustError::io(dir, e))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(TrustError::io(dir, e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| TrustError::io(dir, e))?;
    if meta.file_type().is_symlink() {
        return Err(TrustError::untrusted(dir, "is a symbolic link"));
    }
    if !meta.is_dir() {
        return Err(TrustError::untrusted(dir, "not a directory"));
    }
    if meta.uid() != me {
        return Err(TrustError::untrusted(
            dir,
            format!("owned by {}, not by {}", who(meta.uid()), who(me)),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(TrustError::untrusted(
            dir,
            format!("writable by other users (mode {:o})", meta.mode() & 0o7777),
        ));
    }
    Ok(())
}

/// Opens `path` for reading if it is a regular file owned by one of `trusted`, writable by
/// nobody else, in a trusted directory chain. The checks are made on the opened descriptor.
pub fn open_trusted(path: &Path, trusted: &[u32]) -> Result<File, TrustError> {
    let parent = path
        .parent()
        .ok_or_else(|| TrustError::untrusted(path, "has no parent directory"))?;
    check_dir_chain(parent, trusted)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => TrustError::untrusted(path, "is a symbolic link"),
            _ => TrustError::io(path, e),
        })?;
    check_file(&file, path, trusted)?;
    Ok(file)
}

/// Checks an opened file: regular, owned by one of `trusted`, not writable by group or others.
pub fn check_file(file: &File, path: &Path, trusted: &[u32]) -> Result<(), TrustError> {
    let meta = file.metadata().map_err(|e| TrustError::io(path, e))?;
    if !meta.is_file() {
        return Err(TrustError::untrusted(path, "not a regular file"));
    }
    if !trusted.contains(&meta.uid()) {
        return Err(TrustError::untrusted(
            path,
            format!(
                "owned by {}, not by {}",
                who(meta.uid()),
                owners_text(trusted)
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(TrustError::untrusted(
            path,
            format!("writable by other users (mode {:o})", meta.mode() & 0o777),
        ));
    }
    Ok(())
}

/// Reads a whole trusted file (see [`open_trusted`]), at most `limit` bytes.
pub fn read_trusted(path: &Path, trusted: &[u32], limit: u64) -> Result<Vec<u8>, TrustError> {
    use std::io::Read;
    let file = open_trusted(path, trusted)?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TrustError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(TrustError::untrusted(
            path,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// Creates `path` exclusively (`O_CREAT|O_EXCL|O_NOFOLLOW`) with exactly `mode`.
pub fn create_new(path: &Path, mode: u32) -> Result<File, TrustError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| TrustError::io(path, e))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| TrustError::io(path, e))?;
    Ok(file)
}

/// Replaces `path` with `bytes` atomically: written to a new temporary file in the same
/// directory (created exclusively), then renamed over `path`. Readers see the old or the new
/// file, never a mix, and never a file anyone else placed there.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TrustError> {
    let name = path
        .file_name()
        .ok_or_else(|| TrustError::untrusted(path, "has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{}.tmp", std::process::id(), unique()));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> Result<(), TrustError> {
        let mut file = create_new(&tmp, mode)?;
        file.write_all(bytes).map_err(|e| TrustError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| TrustError::io(path, e))
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A number that differs between calls in this process (temporary file names).
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (NEXT.fetch_add(1, Ordering::Relaxed) << 32) ^ nanos
}

/// Random bytes from the kernel (for names nobody may guess).
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        u64::from_ne_bytes(buf)
    } else {
        unique() ^ u64::from(std::process::id()).rotate_left(17)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "bpftime-fs-test-{}-{name}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        dir
    }

    #[test]
    fn refuses_symlinks_and_foreign_writers() {
        let dir = scratch("links");
        let target = dir.join("target");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_trusted(&link, &trusted_owners()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(open_trusted(&target, &trusted_owners()).is_ok());
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = open_trusted(&target, &trusted_owners()).unwrap_err();
        assert!(e.to_string().contains("writable by other users"), "{e}");
        // A world-writable, non-sticky directory on the way is refused too.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = open_trusted(&target, &trusted_owners()).unwrap_err();
        assert!(e.to_string().contains("not sticky"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(open_trusted(&target, &trusted_owners()).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_new_never_follows_or_reuses() {
        let dir = scratch("create");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.join("planted");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(create_new(&link, 0o644).is_err());
        assert!(create_new(&victim, 0o644).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        // write_atomic over a planted link replaces the link, not what it points at.
        write_atomic(&link, b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
        let mode = std::fs::metadata(&link).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o644);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ensure_dir_refuses_a_planted_link() {
        let dir = scratch("ensure");
        let real = dir.join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.join("state");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ensure_dir(&link, 0o755).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let fresh = dir.join("fresh");
        ensure_dir(&fresh, 0o755).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o755);
        ensure_dir(&fresh, 0o755).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
