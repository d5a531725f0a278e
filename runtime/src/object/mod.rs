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
mod kconfig;
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
    /// Global variables of the global-data sections (`.rodata`, `.data`, `.bss`), from the ELF
    /// symbols: what [`BpfObject::set_global`] writes.
    pub globals: Vec<GlobalVar>,
}

/// A global variable: `const volatile` configuration in `.rodata`, state in `.data`/`.bss`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalVar {
    /// The variable's name.
    pub name: String,
    /// Index of its section's map in [`BpfObject::maps`].
    pub map: usize,
    /// Byte offset in the section.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// A program that failed to load, and why.
#[derive(Debug, Clone)]
pub struct SkippedProgram {
    /// The program's function symbol, or the section name when the whole section failed.
    pub name: String,
    /// The ELF section it is in.
    pub section: String,
    /// Why it could not be loaded.
    pub error: ObjectError,
}

/// One program: instructions with all relocations applied and all subprograms appended.
#[derive(Debug, Clone)]
pub struct ProgramSpec {
    /// Function symbol name (or the section name if the section has no symbols).
    pub name: String,
    /// ELF section name, e.g. `uprobe//usr/bin/app:main`.
    pub section: String,
    /// The program kind its section name declares.
    pub kind: ProgramKind,
    /// `bpf_prog_type` the kernel must load this as; `None` for unknown sections.
    pub kernel_prog_type: Option<u32>,
    /// `expected_attach_type` for the kernel load (0 if none needed).
    pub expected_attach_type: u32,
    /// Load flags (`BPF_F_SLEEPABLE`, `BPF_F_XDP_HAS_FRAGS`).
    pub prog_flags: u32,
    /// What its section name says to attach to.
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
    /// Whether the `lddw` loads the map or an address in its value.
    pub kind: MapRelocKind,
}

/// What a map reference loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapRelocKind {
    /// The map itself (`BPF_PSEUDO_MAP_IDX`).
    Map,
    /// The address of byte `offset` in the map's single value (`BPF_PSEUDO_MAP_IDX_VALUE`).
    Value {
        /// Byte offset into the value (the variable's offset in its section).
        offset: u32,
    },
}

/// A resolved bpf-to-bpf call or callback reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallReloc {
    /// Index in [`ProgramSpec::insns`] of the `call` or of the `lddw`'s first slot.
    pub insn_index: usize,
    /// Absolute target index in [`ProgramSpec::insns`].
    pub target: usize,
    /// `true` for `lddw rX, func` (callback address), `false` for `call`.
    pub is_callback: bool,
}

/// A function placed in a linked program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    /// The function's ELF symbol name.
    pub name: String,
    /// First instruction in [`ProgramSpec::insns`].
    pub start: usize,
    /// Its length in instructions (8-byte slots).
    pub len: usize,
    /// BTF `FUNC` type id from `.BTF.ext` func_info, if any (the kernel needs it for callbacks).
    pub btf_type_id: Option<u32>,
}

/// A `.BTF.ext` line-info record remapped to a linked program. The three `u32`s are those of
/// the kernel's `struct bpf_line_info`, passed through unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineInfo {
    /// The instruction it describes, in [`ProgramSpec::insns`].
    pub insn_index: usize,
    /// Offset of the source file name in the BTF string section.
    pub file_name_off: u32,
    /// Offset of the source line's text in the BTF string section.
    pub line_off: u32,
    /// Line number and column, packed as the kernel's `BPF_LINE_INFO_LINE_NUM` (high 22 bits)
    /// and `BPF_LINE_INFO_LINE_COL` (low 10 bits).
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
    GlobalData {
        /// The ELF section (e.g. `.rodata.str1.1`).
        section: String,
    },
}

/// `LIBBPF_PIN_*`: the `pinning` attribute of a BTF-defined map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    /// `LIBBPF_PIN_NONE` (0, and every legacy or global-data map): not pinned.
    None,
    /// `LIBBPF_PIN_BY_NAME` (1): pinned under the pin root by the map's name.
    ByName,
    /// A value libbpf does not define, kept as written.
    Other(u32),
}

/// One map the object declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSpec {
    /// Variable name (`counts`) or section name for global data (`.rodata`).
    pub name: String,
    /// Which kind of definition it came from.
    pub origin: MapOrigin,
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes (4 for global-data maps).
    pub key_size: u32,
    /// Value size in bytes (the section size for global-data maps).
    pub value_size: u32,
    /// Capacity in entries, as declared (1 for global-data maps).
    pub max_entries: u32,
    /// `map_flags` (`BPF_F_*`); `.rodata*` maps get `BPF_F_RDONLY_PROG`.
    pub flags: u32,
    /// The `pinning` attribute (BTF maps only).
    pub pinning: Pinning,
    /// The `numa_node` attribute; used only with `BPF_F_NUMA_NODE` in `flags`.
    pub numa_node: u32,
    /// The `map_extra` attribute (e.g. a bloom filter's hash count), passed to the kernel.
    pub map_extra: u64,
    /// Initial value bytes of a global-data map; `None` means zero-filled (`.bss`, ordinary maps).
    pub initial_data: Option<Vec<u8>>,
    /// BTF type of the key (BTF maps `__type(key, ..)`), for formatting entries.
    pub btf_key_type_id: Option<u32>,
    /// BTF type of the value (`__type(value, ..)`, or the `DATASEC` of a global-data section).
    pub btf_value_type_id: Option<u32>,
    /// A map of maps' inner-map template (`__array(values, struct { ... })`, named
    /// `<map>.inner`): every map stored in it must have this shape.
    pub inner: Option<Box<MapSpec>>,
    /// A map of maps' initial slots (`.values = { [slot] = &map }`): (slot, index of the
    /// stored map in [`BpfObject::maps`]), as libbpf stores them after creating the maps
    /// (the slot is the key, for HASH_OF_MAPS too).
    pub init_slots: Vec<(u32, usize)>,
}

impl MapSpec {
    /// A map of this shape with no other attribute (no pinning, BTF types, initial data or
    /// inner map): what every kind of definition starts from.
    pub fn new(
        name: impl Into<String>,
        origin: MapOrigin,
        map_type: u32,
        (key_size, value_size, max_entries): (u32, u32, u32),
        flags: u32,
    ) -> Self {
        Self {
            name: name.into(),
            origin,
            map_type,
            key_size,
            value_size,
            max_entries,
            flags,
            pinning: Pinning::None,
            numa_node: 0,
            map_extra: 0,
            initial_data: None,
            btf_key_type_id: None,
            btf_value_type_id: None,
            inner: None,
            init_slots: Vec::new(),
        }
    }

    /// `true` for `.rodata*` maps: programs may not write them (the kernel map gets frozen).
    pub fn is_readonly(&self) -> bool {
        self.flags & BPF_F_RDONLY_PROG != 0
    }
}

/// Errors while loading an object. Each names the file and, where it applies, the section and
/// instruction index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// The file could not be read.
    #[error("{file}: cannot read: {reason}")]
    Io {
        /// The path, as given.
        file: String,
        /// The I/O error's message.
        reason: String,
    },
    /// The bytes are not an ELF file, or not one for `EM_BPF`.
    #[error("{file}: not a valid BPF ELF object: {reason}")]
    Elf {
        /// The file, as named to the parser.
        file: String,
        /// What goblin or the machine check reported.
        reason: String,
    },
    /// A section is malformed (bad symbols, relocations, sizes, ...).
    #[error("{file}: section {section}: {reason}")]
    Section {
        /// The file, as named to the parser.
        file: String,
        /// The section's name.
        section: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An instruction cannot be relocated or linked.
    #[error("{file}: section {section}, instruction {insn}: {reason}")]
    Insn {
        /// The file, as named to the parser.
        file: String,
        /// The code section holding the instruction.
        section: String,
        /// Index of the instruction in that section (8-byte slots).
        insn: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The object's BTF (or the kernel's, for CO-RE) is missing or does not parse.
    #[error("{file}: section {section}: BTF: {source}")]
    Btf {
        /// The file, as named to the parser.
        file: String,
        /// The section concerned: `.BTF`, `.BTF.ext`, `.maps`, or a code section whose CO-RE
        /// relocations needed the kernel's BTF.
        section: String,
        /// The BTF parser's error.
        source: BtfError,
    },
    /// A map definition is malformed.
    #[error("{file}: map {map}: {reason}")]
    Map {
        /// The file, as named to the parser.
        file: String,
        /// The map's name.
        map: String,
        /// What is wrong with its definition.
        reason: String,
    },
    /// [`BpfObject::set_global`] found no global variable of that name, or a value of
    /// another size.
    #[error("{file}: global variable {name}: {reason}")]
    Global {
        /// The object's name ([`BpfObject::name`]).
        file: String,
        /// The name asked for.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// [`BpfObject::program`] found no program, loaded or skipped, of that name.
    #[error("{file}: no program named {name}")]
    NoSuchProgram {
        /// The object's name ([`BpfObject::name`]).
        file: String,
        /// The name asked for.
        name: String,
    },
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

    /// Sets the initial value of a global variable before the object is loaded, as a libbpf
    /// skeleton's `skel->rodata->NAME = ...` between open and load (or aya's `set_global`):
    /// a `.rodata` value is what the verifier then sees as a constant. `value` must have the
    /// variable's size.
    pub fn set_global(&mut self, name: &str, value: &[u8]) -> Result<(), ObjectError> {
        let err = |reason: String| ObjectError::Global {
            file: self.name.clone(),
            name: name.to_string(),
            reason,
        };
        let Some(var) = self.globals.iter().find(|g| g.name == name).cloned() else {
            let known: Vec<&str> = self.globals.iter().map(|g| g.name.as_str()).collect();
            return Err(err(format!(
                "not a global of .rodata, .data or .bss (globals: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        if value.len() != var.size as usize {
            return Err(err(format!(
                "is {} bytes, the value given is {}",
                var.size,
                value.len()
            )));
        }
        let map = &mut self.maps[var.map];
        let size = map.value_size as usize;
        let data = map.initial_data.get_or_insert_with(|| vec![0u8; size]);
        let at = var.offset as usize;
        data[at..at + value.len()].copy_from_slice(value);
        Ok(())
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

    /// `lddw`, the one instruction two slots wide.
    pub const LDDW: u8 = 0x18;

    /// `(index of its first slot, slots it takes)` of each instruction of `insns`, in order.
    pub fn starts(insns: &[RawInsn]) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut k = 0;
        std::iter::from_fn(move || {
            let i = insns.get(k)?;
            let slots = if opc(i) == LDDW { 2 } else { 1 };
            let at = k;
            k += slots;
            Some((at, slots))
        })
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
