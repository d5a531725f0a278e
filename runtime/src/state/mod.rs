//! What bpftime-rs keeps outside shared memory, in directories only their owner can write.
//!
//! The trust rule (the README's threat model): what a target runs, and how, is decided only by
//! files of the loader's user, never by shared memory that targets (and, with a grant, other
//! users) can write. A loaded object is described by its **manifest** (`manifest.rs`): the
//! verified instruction bytes of its programs, how each runs, its map definitions and the
//! identity (device, inode, owner) of its shared-memory segment. Agents read programs only
//! from manifests and check the segment they map against it.
//!
//! Layout of a user's state directory ([`StateDir`]):
//!
//! ```text
//! /run/bpftime-rs/                 root (0755); other users: /run/user/UID/bpftime-rs
//!                                  or /tmp/bpftime-rs-UID (0700)
//!   objects/<object>/manifest.json the loaded object (0644, replaced by rename)
//!   objects/<object>/maps-btf.json BTF of its map keys and values, for `maps`
//!   agents/<tag>.conf              what `start`/`attach` asked an agent to hook (0644)
//!   agents/<tag>.conf.status       the agent's report (owned by the target's user)
//!   agents/<tag>.conf.counts       the agent's built-in call counters
//! ```

pub mod fs;
pub mod manifest;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use crate::maps::SegmentIdentity;
pub use fs::{euid, trusted_owners, TrustError};
pub use manifest::{Manifest, ManifestError, ManifestProgram};

/// Root's state directory.
pub const ROOT_STATE_DIR: &str = "/run/bpftime-rs";

/// The state directory of `uid`: `/run/bpftime-rs` for root; for another user
/// `/run/user/UID/bpftime-rs` when that user's runtime directory exists, else
/// `/tmp/bpftime-rs-UID`. A pure function of the uid (no environment), so an agent inside a
/// target finds the same directory its user's CLI wrote.
pub fn state_dir_path(uid: u32) -> PathBuf {
    if uid == 0 {
        return PathBuf::from(ROOT_STATE_DIR);
    }
    let runtime = PathBuf::from(format!("/run/user/{uid}"));
    match std::fs::symlink_metadata(&runtime) {
        Ok(m) if m.is_dir() && m.uid() == uid => runtime.join("bpftime-rs"),
        _ => PathBuf::from(format!("/tmp/bpftime-rs-{uid}")),
    }
}

/// A state directory: ours (created and checked by [`StateDir::ours`]), or another trusted
/// user's that we only read ([`StateDir::readable`]).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    uid: u32,
}

impl StateDir {
    /// This process's user's state directory, created if missing, with its `objects/` and
    /// `agents/` subdirectories; refused if anyone else could write it.
    pub fn ours() -> Result<Self, TrustError> {
        let uid = euid();
        let root = state_dir_path(uid);
        let mode = if uid == 0 { 0o755 } else { 0o700 };
        fs::ensure_dir(&root, mode)?;
        let dir = Self { root, uid };
        fs::ensure_dir(&dir.objects_dir(), 0o755)?;
        fs::ensure_dir(&dir.agents_dir(), 0o755)?;
        Ok(dir)
    }

    /// The state directories this process reads objects from, in order: root's, then its own
    /// user's. Directories that do not exist are left out; one that exists but is not
    /// trustworthy is an error in the list (the caller reports it and goes on).
    pub fn readable() -> Vec<Result<Self, TrustError>> {
        let mut out = Vec::new();
        for uid in trusted_owners() {
            let root = state_dir_path(uid);
            match fs::check_dir_chain(&root, &[0, uid]) {
                Ok(()) => out.push(Ok(Self { root, uid })),
                Err(e) if e.is_not_found() => {}
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    /// Whose directory this is.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The directory itself (see [`state_dir_path`]).
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `objects/`: one subdirectory per loaded object (manifest, map BTF).
    pub fn objects_dir(&self) -> PathBuf {
        self.root.join("objects")
    }

    /// The directory of one loaded object.
    pub fn object_dir(&self, object: &str) -> PathBuf {
        self.objects_dir().join(object)
    }

    /// `agents/`: agent configurations and the agents' status and counter files.
    pub fn agents_dir(&self) -> PathBuf {
        self.root.join("agents")
    }

    /// Creates (if missing) the directory of `object` in our own state directory.
    pub fn ensure_object_dir(&self, object: &str) -> Result<PathBuf, TrustError> {
        let dir = self.object_dir(object);
        fs::ensure_dir(&dir, 0o755)?;
        Ok(dir)
    }

    /// Names of the objects that have a directory here (unchecked: read each manifest).
    pub fn object_names(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.objects_dir()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| crate::maps::valid_object_name(n))
            .collect();
        names.sort();
        names
    }
}

/// A loaded object as discovery finds it.
#[derive(Debug)]
pub struct FoundObject {
    /// Its manifest, read and validated.
    pub manifest: Manifest,
    /// The state directory it was found in (root's or this user's).
    pub dir: StateDir,
}

/// Every object with a trusted manifest, from root's state directory and this user's; and one
/// line for each thing skipped (an untrusted directory or manifest) saying why.
pub fn discover() -> (Vec<FoundObject>, Vec<String>) {
    discover_except(&[])
}

/// [`discover`] without reading the manifests of the objects named in `known` (an agent
/// looking for objects loaded since it last looked reads only the new ones' manifests).
pub fn discover_except(known: &[String]) -> (Vec<FoundObject>, Vec<String>) {
    let mut found: Vec<FoundObject> = Vec::new();
    let mut skipped = Vec::new();
    for dir in StateDir::readable() {
        let dir = match dir {
            Ok(d) => d,
            Err(e) => {
                skipped.push(format!("skipping a state directory: {e}"));
                continue;
            }
        };
        for name in dir.object_names() {
            if known.contains(&name) {
                continue;
            }
            if found.iter().any(|f| f.manifest.object == name) {
                skipped.push(format!(
                    "skipping object {name} of uid {}: root's object of that name comes first",
                    dir.uid()
                ));
                continue;
            }
            match Manifest::read(&dir, &name) {
                Ok(manifest) => found.push(FoundObject {
                    manifest,
                    dir: dir.clone(),
                }),
                Err(ManifestError::Trust(e)) if e.is_not_found() => {}
                Err(e) => skipped.push(format!("skipping object {name}: {e}")),
            }
        }
    }
    (found, skipped)
}

/// Finds the manifest of `object` in the readable state directories (root's first).
pub fn find_object(object: &str) -> Result<FoundObject, ManifestError> {
    let mut first_error = None;
    for dir in StateDir::readable() {
        let dir = match dir {
            Ok(d) => d,
            Err(e) => {
                first_error.get_or_insert(ManifestError::Trust(e));
                continue;
            }
        };
        match Manifest::read(&dir, object) {
            Ok(manifest) => return Ok(FoundObject { manifest, dir }),
            Err(ManifestError::Trust(e)) if e.is_not_found() => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| ManifestError::NotLoaded {
        object: object.to_string(),
    }))
}
