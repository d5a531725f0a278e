//! The manifest of a loaded object: the one place agents take programs from.
//!
//! `load` writes it after the kernel verifier accepted the programs (the bytes in it are the
//! verified bytes, with how each program must run), and replaces it atomically when the
//! object changes. It also names the object's shared-memory segment by device, inode and owner,
//! so an agent maps exactly the segment the loader created and checks its map table against the
//! definitions here: a segment someone else created under the same name is refused.
//!
//! Why a file and not a sealed memfd: a file in a directory only the loader's user can write is
//! protected by the kernel's permission checks for any reader, found by name by `attach PID`
//! and by discovery (no descriptor has to be passed into a running process), outlives a
//! restarted loader, and can be inspected with `cat`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fs::{self, TrustError};
use super::StateDir;
use crate::maps::{InnerMapDef, MapDef, MapType, SegmentIdentity};
use crate::vm::VmKind;

/// File name of a manifest inside its object's directory.
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: u32 = 1;
/// Manifests larger than this are refused (they hold at most a few MiB of instructions).
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// Why a manifest could not be written, found or used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest file or a directory on its way is missing, unreadable or untrusted.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// No readable state directory has a manifest for the object.
    #[error("object {object} is not loaded (no manifest in a trusted state directory)")]
    NotLoaded {
        /// The object asked for.
        object: String,
    },
    /// The file is not a manifest this version reads, or is inconsistent (format, object,
    /// owner, map types, program indices, instructions, VM names, links).
    #[error("{path}: not a valid manifest: {why}")]
    Invalid {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// One map as the loader defined it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestMap {
    /// The map's name ([`MapDef::name`]).
    pub name: String,
    /// Kernel `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (one CPU's slot for per-CPU maps).
    pub value_size: u32,
    /// Capacity, as in [`MapDef::max_entries`].
    pub max_entries: u32,
    /// `map_flags`.
    pub flags: u32,
    /// `map_extra` (a bloom filter's hash count); absent in manifests of older loaders.
    #[serde(default)]
    pub map_extra: u64,
    /// A map of maps' inner-map template (type, key size, value size, max_entries, flags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<[u32; 5]>,
    /// [`MapDef::spin_lock`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spin_lock: Option<u32>,
}

/// One published program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestProgram {
    /// What PROG_ARRAY slots hold.
    pub index: u32,
    /// The program's name in the object.
    pub name: String,
    /// Its ELF section.
    pub section: String,
    /// Where it attaches, as in
    /// [`RunnableProgram::attach_target`](crate::loaded::RunnableProgram::attach_target).
    pub attach_target: String,
    /// Kernel `BPF_PROG_TYPE_*`.
    pub prog_type: u32,
    /// `jit`, `interpreter`, `rbpf` or `rbpf-interpreter`.
    pub vm: String,
    /// The kernel verifier accepted exactly `insns`.
    pub verified: bool,
    /// The instructions, as hex (8 bytes per instruction).
    pub insns: String,
}

/// One attachment a loader made itself, as agents install it: `load -- APP` publishes one per
/// perf-event link APP made on a uprobe PMU event (an object loaded from a file has none: its
/// programs attach where their sections say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestLink {
    /// Index of the program in [`Manifest::programs`].
    pub program: u32,
    /// A return probe (the PMU's retprobe bit) rather than an entry probe.
    pub retprobe: bool,
    /// Where, as `PATH:FUNC[+OFFSET]` (`bpftime_attach::symbols`).
    pub target: String,
    /// Only this process runs it (perf_event_open's pid); `None`: every process.
    pub pid: Option<u32>,
    /// What `bpf_get_attach_cookie` returns (the link's `bpf_cookie`).
    pub cookie: u64,
    /// The file offset of the probe's reference counter (a USDT semaphore: the PMU's
    /// `ref_ctr_offset`), which the agent counts up while the hook is in.
    #[serde(default)]
    pub ref_ctr_offset: Option<u64>,
}

/// A loaded object, as its loader published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of this file's layout; [`Manifest::read`] refuses others.
    pub format: u32,
    /// The object's name (also its segment's name and its directory's).
    pub object: String,
    /// The object file it was loaded from.
    pub source: String,
    /// The loader's effective uid: the state directory's user, or root.
    pub owner_uid: u32,
    /// Pid of the loader process.
    pub loader_pid: u32,
    /// Start time of the loader (clock ticks since boot), to tell it from a recycled pid.
    pub loader_start: u64,
    /// Bumped each time the manifest is replaced.
    pub generation: u64,
    /// The shared-memory segment the loader created (device, inode, owner); agents map no
    /// other file.
    pub segment: SegmentIdentity,
    /// The segment's maps, in index order (what agents check its map table against).
    pub maps: Vec<ManifestMap>,
    /// The published programs, in index order.
    pub programs: Vec<ManifestProgram>,
    /// Users and groups granted read-write access to the segment (POSIX ACL entries).
    #[serde(default)]
    pub granted_uids: Vec<u32>,
    /// Groups granted access, as `granted_uids` for users.
    #[serde(default)]
    pub granted_gids: Vec<u32>,
    /// The attachments the loader made (`load -- APP`), replacing the programs' sections as
    /// the place agents take attach points from; `None` for objects loaded from a file.
    #[serde(default)]
    pub links: Option<Vec<ManifestLink>>,
}

/// The VM a manifest names.
pub fn vm_name(kind: VmKind) -> &'static str {
    match kind {
        VmKind::Jit => "jit",
        VmKind::Interpreter => "interpreter",
        VmKind::Rbpf => "rbpf",
        VmKind::RbpfInterpreter => "rbpf-interpreter",
    }
}

fn vm_from_name(name: &str) -> Option<VmKind> {
    Some(match name {
        "jit" => VmKind::Jit,
        "interpreter" => VmKind::Interpreter,
        "rbpf" => VmKind::Rbpf,
        "rbpf-interpreter" => VmKind::RbpfInterpreter,
        _ => return None,
    })
}

impl ManifestMap {
    /// The manifest's record of `def`.
    pub fn from_def(def: &MapDef) -> Self {
        Self {
            name: def.name.clone(),
            map_type: def.map_type.as_raw(),
            key_size: def.key_size,
            value_size: def.value_size,
            max_entries: def.max_entries,
            flags: def.flags,
            map_extra: def.map_extra,
            inner: def.inner.map(InnerMapDef::to_raw),
            spin_lock: def.spin_lock,
        }
    }

    /// The definition back, `None` for a map type this runtime does not know.
    pub fn to_def(&self) -> Option<MapDef> {
        Some(MapDef {
            map_type: MapType::from_raw(self.map_type)?,
            key_size: self.key_size,
            value_size: self.value_size,
            max_entries: self.max_entries,
            flags: self.flags,
            map_extra: self.map_extra,
            name: self.name.clone(),
            inner: match self.inner {
                Some(raw) => Some(InnerMapDef::from_raw(raw).ok()??),
                None => None,
            },
            spin_lock: self.spin_lock,
        })
    }
}

impl ManifestProgram {
    /// Instruction bytes as a manifest holds them.
    pub fn encode_insns(insns: &[u8]) -> String {
        insns.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The VM it must run on. Bytes the kernel did not verify never run unchecked, whatever
    /// the manifest says: they go to our checked interpreter.
    pub fn vm_kind(&self) -> VmKind {
        match vm_from_name(&self.vm) {
            Some(VmKind::Jit | VmKind::Rbpf) if !self.verified => VmKind::Interpreter,
            Some(k) => k,
            None => VmKind::Interpreter,
        }
    }

    /// The instruction bytes (validated by [`Manifest::read`]).
    pub fn insn_bytes(&self) -> Vec<u8> {
        decode_hex(&self.insns).unwrap_or_default()
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Manifest {
    /// A manifest for `object` without programs, owned and loaded by this process.
    pub fn new(object: &str, source: &str, defs: &[MapDef], segment: SegmentIdentity) -> Self {
        let pid = std::process::id();
        Self {
            format: FORMAT,
            object: object.to_string(),
            source: source.to_string(),
            owner_uid: fs::euid(),
            loader_pid: pid,
            loader_start: crate::maps::process_start_time(pid).unwrap_or(0),
            generation: 0,
            segment,
            maps: defs.iter().map(ManifestMap::from_def).collect(),
            programs: Vec::new(),
            granted_uids: Vec::new(),
            granted_gids: Vec::new(),
            links: None,
        }
    }

    /// The map definitions (validated by [`Manifest::read`]).
    pub fn map_defs(&self) -> Vec<MapDef> {
        self.maps.iter().filter_map(ManifestMap::to_def).collect()
    }

    /// Whether a target started or attached without naming objects takes this one: its loader
    /// runs, and it is not the private segment of a `bpftime-rs run` (named `run-...`).
    pub fn attachable(&self) -> bool {
        self.loader_alive() && !self.object.starts_with("run-")
    }

    /// Whether the loader that wrote it still runs (same pid and start time).
    pub fn loader_alive(&self) -> bool {
        crate::maps::process_start_time(self.loader_pid)
            .is_some_and(|t| self.loader_start == 0 || t == self.loader_start)
    }

    /// Path of `object`'s manifest in `dir`.
    pub fn path(dir: &StateDir, object: &str) -> PathBuf {
        dir.object_dir(object).join(MANIFEST_FILE)
    }

    /// Writes (or atomically replaces) this manifest in our own state directory, bumping its
    /// generation.
    pub fn publish(&mut self, dir: &StateDir) -> Result<PathBuf, ManifestError> {
        self.generation += 1;
        let object_dir = dir.ensure_object_dir(&self.object)?;
        let path = object_dir.join(MANIFEST_FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            why: e.to_string(),
        })?;
        fs::write_atomic(&path, &bytes, 0o644)?;
        Ok(path)
    }

    /// Reads and validates `object`'s manifest from `dir`: the file must belong to the
    /// directory's user (or root), be writable by nobody else and lie in a trusted chain.
    pub fn read(dir: &StateDir, object: &str) -> Result<Self, ManifestError> {
        let path = Self::path(dir, object);
        let bytes = fs::read_trusted(&path, &[0, dir.uid()], MAX_MANIFEST_BYTES)?;
        let invalid = |why: String| ManifestError::Invalid {
            path: path.clone(),
            why,
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if m.format != FORMAT {
            return Err(invalid(format!(
                "format {} (this bpftime-rs reads {FORMAT})",
                m.format
            )));
        }
        if m.object != object {
            return Err(invalid(format!("it names object {:?}", m.object)));
        }
        if m.owner_uid != dir.uid() && m.owner_uid != 0 {
            return Err(invalid(format!(
                "it names owner uid {}, but lies in uid {}'s directory",
                m.owner_uid,
                dir.uid()
            )));
        }
        for map in &m.maps {
            if map.to_def().is_none() {
                return Err(invalid(format!(
                    "map {}: unknown type {}",
                    map.name, map.map_type
                )));
            }
        }
        for (i, p) in m.programs.iter().enumerate() {
            if p.index as usize != i {
                return Err(invalid(format!(
                    "program {}: index {} at {i}",
                    p.name, p.index
                )));
            }
            match decode_hex(&p.insns) {
                Some(b) if b.len().is_multiple_of(8) && !b.is_empty() => {}
                _ => {
                    return Err(invalid(format!(
                        "program {}: instructions are not whole 8-byte instructions in hex",
                        p.name
                    )))
                }
            }
            if vm_from_name(&p.vm).is_none() {
                return Err(invalid(format!(
                    "program {}: unknown vm {:?}",
                    p.name, p.vm
                )));
            }
        }
        for link in m.links.iter().flatten() {
            if link.program as usize >= m.programs.len() || link.target.is_empty() {
                return Err(invalid(format!(
                    "link to {}: program {} of {}",
                    link.target,
                    link.program,
                    m.programs.len()
                )));
            }
        }
        Ok(m)
    }

    /// Removes `object`'s directory (manifest, BTF) from our own state directory.
    pub fn remove(dir: &StateDir, object: &str) -> std::io::Result<bool> {
        match std::fs::remove_dir_all(dir.object_dir(object)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
