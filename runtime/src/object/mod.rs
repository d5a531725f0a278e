//! Object loader: turns a clang-compiled BPF ELF object (libbpf conventions) into a
//! [`BpfObject`]: programs with fully linked and relocated instructions, map specifications and
//! the object's BTF.
//!
//! # Why goblin and our own BTF/CO-RE code, not aya-obj
//! aya-obj 0.3.0 has BTF and CO-RE code, but `Object::parse` fails the *whole* object on any
//! executable section whose name it does not know (e.g. `SEC("syscall")`: its `ProgramSection`
//! has no such variant), and its relocation entry points are tied to its own
//! object model. The runtime must load every program it can run from such objects, keep unknown
//! sections as "unknown" programs, and report malformed input as typed errors with the file,
//! section and instruction index (never a panic). So the ELF container is read with goblin (a
//! plain, fuzzed ELF reader) and the BPF-specific parts (sections, maps, BTF, CO-RE, bpf-to-bpf
//! linking) are written here, where every bound is checked.
//!
//! # Instruction encoding of relocations
//! Map references are resolved to *map indices* into [`BpfObject::maps`] with the kernel's own
//! `fd_array` encoding, so the same bytes run in our VM and pass the kernel verifier:
//! `lddw` with `src = BPF_PSEUDO_MAP_IDX` (5), `imm = map index` for a map pointer, and
//! `src = BPF_PSEUDO_MAP_IDX_VALUE` (6), `imm = map index`, second slot `imm = offset` for a
//! pointer into a global-data map. Subprogram calls are `call` with `src = BPF_PSEUDO_CALL` and a
//! pc-relative `imm`; callbacks are `lddw` with `src = BPF_PSEUDO_FUNC` and a pc-relative `imm`.

pub mod btf;
pub mod btf_format;
pub mod co_re;
mod elf;
pub mod section;

use std::path::Path;
use std::sync::Arc;

pub use self::btf::{Btf, BtfError};
pub use self::section::{parse_section, AttachTarget, ProgramKind, SectionInfo};
pub use co_re::{CoreReloKind, CoreRelocation, POISON_HELPER};

/// Where the running kernel publishes its BTF (the CO-RE target).
pub const VMLINUX_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

pub use bpftime_abi::flags::BPF_F_RDONLY_PROG;
pub use bpftime_abi::insn::{
    BPF_PSEUDO_CALL, BPF_PSEUDO_FUNC, BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE,
};

/// One 8-byte BPF instruction, exactly as in the ELF (little-endian).
pub type RawInsn = [u8; 8];

/// A parsed BPF object.
#[derive(Debug, Clone)]
pub struct BpfObject {
    /// Object name: the file stem (`prog` for `prog.bpf.o`).
    pub name: String,
    /// Programs that were parsed and linked successfully, in section order then symbol order.
    pub programs: Vec<ProgramSpec>,
    /// Programs that could not be loaded (unsupported relocation, malformed section, ...), each
    /// with its error. The other programs still load.
    pub skipped: Vec<SkippedProgram>,
    /// Maps, in libbpf's order: legacy `maps`, BTF `.maps`, then global-data sections.
    pub maps: Vec<MapSpec>,
    /// Contents of the `license` section (`""` if absent).
    pub license: String,
    /// Contents of the legacy `version` section (0 if absent).
    pub kernel_version: u32,
    /// The object's BTF, if it has a `.BTF` section that parses.
    pub btf: Option<Arc<Btf>>,
    /// The object's BTF with `DATASEC` sizes and variable offsets filled in, ready for
    /// `BPF_BTF_LOAD` (clang leaves them 0 and the kernel rejects that).
    pub kernel_btf: Option<Arc<Vec<u8>>>,
}

/// A program that failed to load, and why.
#[derive(Debug, Clone)]
pub struct SkippedProgram {
    pub name: String,
    pub section: String,
    pub error: ObjectError,
}

/// One program: instructions with all relocations applied and all subprograms appended.
#[derive(Debug, Clone)]
pub struct ProgramSpec {
    /// Function symbol name (or the section name if the section has no symbols).
    pub name: String,
    /// ELF section name, e.g. `uprobe//usr/bin/app:main`.
    pub section: String,
    pub kind: ProgramKind,
    /// `bpf_prog_type` the kernel must load this as; `None` for unknown sections.
    pub kernel_prog_type: Option<u32>,
    /// `expected_attach_type` for the kernel load (0 if none needed).
    pub expected_attach_type: u32,
    /// Load flags (`BPF_F_SLEEPABLE`, `BPF_F_XDP_HAS_FRAGS`).
    pub prog_flags: u32,
    pub attach: AttachTarget,
    /// Linked instructions: the program first, then each subprogram it (transitively) calls.
    pub insns: Vec<RawInsn>,
    /// Every map reference, by instruction index (also encoded in the instructions).
    pub map_relocs: Vec<MapReloc>,
    /// Every bpf-to-bpf call and callback address, by instruction index, after linking.
    pub call_relocs: Vec<CallReloc>,
    /// Where each function starts in `insns` (index 0 is the program itself).
    pub functions: Vec<FunctionInfo>,
    /// BTF line info remapped to `insns` (for verifier logs).
    pub line_info: Vec<LineInfo>,
    /// CO-RE relocations applied, remapped to `insns`.
    pub core_relocations: Vec<CoreRelocation>,
}

impl ProgramSpec {
    /// The instructions as one byte string (what `Program::from_bytes` and the kernel take).
    pub fn bytecode(&self) -> Vec<u8> {
        self.insns.iter().flatten().copied().collect()
    }
}

/// A map reference inside a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapReloc {
    /// Index of the `lddw` (first slot).
    pub insn_index: usize,
    /// Index into [`BpfObject::maps`].
    pub map_index: usize,
    pub kind: MapRelocKind,
}

/// What a map reference loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapRelocKind {
    /// The map itself (`BPF_PSEUDO_MAP_IDX`).
    Map,
    /// The address of byte `offset` in the map's single value (`BPF_PSEUDO_MAP_IDX_VALUE`).
    Value { offset: u32 },
}

/// A resolved bpf-to-bpf call or callback reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallReloc {
    pub insn_index: usize,
    /// Absolute target index in [`ProgramSpec::insns`].
    pub target: usize,
    /// `true` for `lddw rX, func` (callback address), `false` for `call`.
    pub is_callback: bool,
}

/// A function placed in a linked program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    pub name: String,
    /// First instruction in [`ProgramSpec::insns`].
    pub start: usize,
    pub len: usize,
    /// BTF `FUNC` type id from `.BTF.ext` func_info, if any (the kernel needs it for callbacks).
    pub btf_type_id: Option<u32>,
}

/// A `.BTF.ext` line-info record remapped to a linked program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineInfo {
    pub insn_index: usize,
    pub file_name_off: u32,
    pub line_off: u32,
    pub line_col: u32,
}

/// Where a map definition came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOrigin {
    /// A variable in the BTF-defined `.maps` section.
    BtfMaps,
    /// A `struct bpf_map_def` in the legacy `maps` section.
    LegacyMaps,
    /// A global-data section (`.rodata`, `.data`, `.bss` and their `.*` variants), one value.
    GlobalData { section: String },
}

/// `LIBBPF_PIN_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    None,
    ByName,
    Other(u32),
}

/// One map the object declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSpec {
    /// Variable name (`counts`) or section name for global data (`.rodata`).
    pub name: String,
    pub origin: MapOrigin,
    /// `bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub pinning: Pinning,
    pub numa_node: u32,
    pub map_extra: u64,
    /// Initial value bytes of a global-data map; `None` means zero-filled (`.bss`, ordinary maps).
    pub initial_data: Option<Vec<u8>>,
    /// BTF type of the key (BTF maps `__type(key, ..)`), for formatting entries.
    pub btf_key_type_id: Option<u32>,
    /// BTF type of the value (`__type(value, ..)`, or the `DATASEC` of a global-data section).
    pub btf_value_type_id: Option<u32>,
}

impl MapSpec {
    /// `true` for `.rodata*` maps: programs may not write them (the kernel map gets frozen).
    pub fn is_readonly(&self) -> bool {
        self.flags & BPF_F_RDONLY_PROG != 0
    }
}

/// Errors while loading an object. Each names the file and, where it applies, the section and
/// instruction index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("{file}: cannot read: {reason}")]
    Io { file: String, reason: String },
    #[error("{file}: not a valid BPF ELF object: {reason}")]
    Elf { file: String, reason: String },
    #[error("{file}: section {section}: {reason}")]
    Section {
        file: String,
        section: String,
        reason: String,
    },
    #[error("{file}: section {section}, instruction {insn}: {reason}")]
    Insn {
        file: String,
        section: String,
        insn: usize,
        reason: String,
    },
    #[error("{file}: section {section}: BTF: {source}")]
    Btf {
        file: String,
        section: String,
        source: BtfError,
    },
    #[error("{file}: map {map}: {reason}")]
    Map {
        file: String,
        map: String,
        reason: String,
    },
    #[error("{file}: no program named {name}")]
    NoSuchProgram { file: String, name: String },
}

impl BpfObject {
    /// Reads and parses an object file; its name is the file stem without `.bpf`/`.o`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ObjectError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ObjectError::Io {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        Self::parse(&file, &bytes)
    }

    /// Parses an object from memory; `file` names it in errors and gives [`BpfObject::name`].
    pub fn parse(file: &str, bytes: &[u8]) -> Result<Self, ObjectError> {
        elf::parse(file, bytes)
    }

    /// Index of the program with this function name.
    pub fn program_index(&self, name: &str) -> Option<usize> {
        self.programs.iter().position(|p| p.name == name)
    }

    /// The program with this name, or the error that made it skipped, or "no such program".
    pub fn program(&self, name: &str) -> Result<&ProgramSpec, ObjectError> {
        if let Some(p) = self.programs.iter().find(|p| p.name == name) {
            return Ok(p);
        }
        if let Some(s) = self.skipped.iter().find(|s| s.name == name) {
            return Err(s.error.clone());
        }
        Err(ObjectError::NoSuchProgram {
            file: self.name.clone(),
            name: name.to_string(),
        })
    }

    /// Index of the map with this name.
    pub fn map_index(&self, name: &str) -> Option<usize> {
        self.maps.iter().position(|m| m.name == name)
    }
}

/// Field accessors for raw instructions.
pub(crate) mod insn {
    use super::RawInsn;

    pub fn opc(i: &RawInsn) -> u8 {
        i[0]
    }
    pub fn src(i: &RawInsn) -> u8 {
        i[1] >> 4
    }
    pub fn imm(i: &RawInsn) -> i32 {
        i32::from_le_bytes([i[4], i[5], i[6], i[7]])
    }
    pub fn set_src(i: &mut RawInsn, src: u8) {
        i[1] = (i[1] & 0x0f) | (src << 4);
    }
    pub fn set_off(i: &mut RawInsn, off: i16) {
        i[2..4].copy_from_slice(&off.to_le_bytes());
    }
    pub fn set_imm(i: &mut RawInsn, imm: i32) {
        i[4..8].copy_from_slice(&imm.to_le_bytes());
    }
    pub fn make(opc: u8, dst: u8, src: u8, off: i16, imm: i32) -> RawInsn {
        let mut i = [0u8; 8];
        i[0] = opc;
        i[1] = (dst & 0x0f) | (src << 4);
        set_off(&mut i, off);
        set_imm(&mut i, imm);
        i
    }
}
