//! A BTF reader: the object's `.BTF` / `.BTF.ext` sections and the kernel's
//! `/sys/kernel/btf/vmlinux`.
//!
//! Written here (not taken from aya-obj) so that every malformed byte becomes a [`BtfError`]
//! instead of a panic, and so the raw bytes stay available: the verifier gate hands the object's
//! BTF to the kernel after fixing up `DATASEC` sizes and variable offsets, as libbpf does.

use std::collections::HashMap;
use std::sync::OnceLock;

/// BTF kinds (`BTF_KIND_*` in `linux/btf.h`).
pub use bpftime_abi::btf::kind;
use bpftime_abi::btf::{func_linkage, var_linkage, MAGIC as BTF_MAGIC};

/// A malformed BTF blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    /// A header field, type record or string runs past the blob (the byte offset reached).
    #[error("BTF is truncated at byte {0}")]
    Truncated(usize),
    /// The blob does not start with the BTF magic `0xeb9f` (the value found).
    #[error("bad BTF magic {0:#x}")]
    BadMagic(u16),
    /// A type record of a kind this reader does not know.
    #[error("unknown BTF kind {kind} for type id {id}")]
    UnknownKind {
        /// The type id the record would have.
        id: u32,
        /// Its `BTF_KIND_*` value.
        kind: u8,
    },
    /// A name offset outside the string section, or a string there without its NUL or not
    /// UTF-8 (the offset).
    #[error("BTF string offset {0} is out of range")]
    BadString(u32),
    /// A reference to a type id past the last type (the id).
    #[error("BTF type id {0} does not exist")]
    BadTypeId(u32),
    /// Following modifiers, typedefs or arrays took more than 32 steps (the kernel's limit as
    /// well); the value is the id reached when it gave up.
    #[error("BTF type chain starting at {0} is too deep or cyclic")]
    TooDeep(u32),
    /// A BTF file (such as vmlinux's) could not be read.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The file's path.
        path: String,
        /// The I/O error's message.
        reason: String,
    },
}

/// One member of a struct/union, enum value, func_proto parameter or datasec entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Offset of the name in the string section (0: anonymous; unused for datasec entries).
    pub name_off: u32,
    /// Member/param/var type (enum: unused).
    pub type_id: u32,
    /// Struct member: bit offset (already split from the bitfield size); datasec: byte offset;
    /// enum: low 32 bits of the value.
    pub offset: u32,
    /// Struct member: bitfield size in bits (0 = not a bitfield); datasec: byte size;
    /// enum64: high 32 bits of the value.
    pub extra: u32,
}

/// One BTF type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtfType {
    /// Offset of the name in the string section (0: anonymous).
    pub name_off: u32,
    /// `BTF_KIND_*` (see [`kind`]).
    pub kind: u8,
    /// The `info` word's kind flag: bitfield member offsets for STRUCT/UNION, signed values
    /// for ENUM/ENUM64, a union for FWD.
    pub kind_flag: bool,
    /// The `info` word's count: members, enum values, parameters or datasec entries.
    pub vlen: u16,
    /// `size` for INT/STRUCT/UNION/ENUM/DATASEC/FLOAT, `type` for the others.
    pub size_or_type: u32,
    /// INT: encoding word; VAR: linkage; DECL_TAG: component index.
    pub extra: u32,
    /// ARRAY: (element type, index type, nelems).
    pub array: Option<(u32, u32, u32)>,
    /// The `vlen` records that follow the type: struct/union members, enum values,
    /// func_proto parameters or datasec entries (empty for other kinds).
    pub members: Vec<Member>,
    /// Byte offset of this type's record inside the types section (to patch a copy).
    pub raw_offset: usize,
}

/// A parsed BTF blob.
#[derive(Debug, Clone)]
pub struct Btf {
    raw: Vec<u8>,
    hdr_len: usize,
    type_off: usize,
    str_off: usize,
    str_len: usize,
    /// Index 0 is `void`.
    types: Vec<BtfType>,
    by_name: OnceLock<HashMap<String, Vec<u32>>>,
}

pub(crate) fn rd_u32(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at.checked_add(4).ok_or(BtfError::Truncated(at))?)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated(at))
}

fn rd_u16(b: &[u8], at: usize) -> Result<u16, BtfError> {
    b.get(at..at.checked_add(2).ok_or(BtfError::Truncated(at))?)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(BtfError::Truncated(at))
}

/// Depth limit for following modifier/typedef chains (the kernel uses 32 as well).
const MAX_CHAIN: usize = 32;

impl Btf {
    /// Parses a BTF blob (little-endian only: BPF objects built for x86_64).
    pub fn parse(raw: &[u8]) -> Result<Self, BtfError> {
        let magic = rd_u16(raw, 0)?;
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        let hdr_len = rd_u32(raw, 4)? as usize;
        let type_off = rd_u32(raw, 8)? as usize;
        let type_len = rd_u32(raw, 12)? as usize;
        let str_off = rd_u32(raw, 16)? as usize;
        let str_len = rd_u32(raw, 20)? as usize;
        let types_start = hdr_len
            .checked_add(type_off)
            .ok_or(BtfError::Truncated(8))?;
        let types_end = types_start
            .checked_add(type_len)
            .ok_or(BtfError::Truncated(12))?;
        let strs_start = hdr_len
            .checked_add(str_off)
            .ok_or(BtfError::Truncated(16))?;
        let strs_end = strs_start
            .checked_add(str_len)
            .ok_or(BtfError::Truncated(20))?;
        if types_end > raw.len() {
            return Err(BtfError::Truncated(types_end));
        }
        if strs_end > raw.len() {
            return Err(BtfError::Truncated(strs_end));
        }
        let mut types = vec![BtfType {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            vlen: 0,
            size_or_type: 0,
            extra: 0,
            array: None,
            members: Vec::new(),
            raw_offset: 0,
        }];
        let mut at = types_start;
        while at < types_end {
            let id = types.len() as u32;
            let name_off = rd_u32(raw, at)?;
            let info = rd_u32(raw, at + 4)?;
            let size_or_type = rd_u32(raw, at + 8)?;
            let vlen = (info & 0xffff) as u16;
            let kind = ((info >> 24) & 0x1f) as u8;
            let kind_flag = info >> 31 == 1;
            let raw_offset = at - types_start;
            at += 12;
            let mut t = BtfType {
                name_off,
                kind,
                kind_flag,
                vlen,
                size_or_type,
                extra: 0,
                array: None,
                members: Vec::new(),
                raw_offset,
            };
            let n = vlen as usize;
            match kind {
                kind::INT | kind::VAR | kind::DECL_TAG => {
                    t.extra = rd_u32(raw, at)?;
                    at += 4;
                }
                kind::PTR
                | kind::FWD
                | kind::TYPEDEF
                | kind::VOLATILE
                | kind::CONST
                | kind::RESTRICT
                | kind::FUNC
                | kind::FLOAT
                | kind::TYPE_TAG => {}
                kind::ARRAY => {
                    t.array = Some((rd_u32(raw, at)?, rd_u32(raw, at + 4)?, rd_u32(raw, at + 8)?));
                    at += 12;
                }
                kind::STRUCT | kind::UNION => {
                    check_room(at, n, 12, types_end)?;
                    for i in 0..n {
                        let o = at + i * 12;
                        let off = rd_u32(raw, o + 8)?;
                        let (bit_off, bits) = if kind_flag {
                            (off & 0xff_ffff, off >> 24)
                        } else {
                            (off, 0)
                        };
                        t.members.push(Member {
                            name_off: rd_u32(raw, o)?,
                            type_id: rd_u32(raw, o + 4)?,
                            offset: bit_off,
                            extra: bits,
                        });
                    }
                    at += n * 12;
                }
                kind::ENUM => {
                    check_room(at, n, 8, types_end)?;
                    for i in 0..n {
                        let o = at + i * 8;
                        t.members.push(Member {
                            name_off: rd_u32(raw, o)?,
                            type_id: 0,
                            offset: rd_u32(raw, o + 4)?,
                            extra: 0,
                        });
                    }
                    at += n * 8;
                }
                kind::ENUM64 => {
                    check_room(at, n, 12, types_end)?;
                    for i in 0..n {
                        let o = at + i * 12;
                        t.members.push(Member {
                            name_off: rd_u32(raw, o)?,
                            type_id: 0,
                            offset: rd_u32(raw, o + 4)?,
                            extra: rd_u32(raw, o + 8)?,
                        });
                    }
                    at += n * 12;
                }
                kind::FUNC_PROTO => {
                    check_room(at, n, 8, types_end)?;
                    for i in 0..n {
                        let o = at + i * 8;
                        t.members.push(Member {
                            name_off: rd_u32(raw, o)?,
                            type_id: rd_u32(raw, o + 4)?,
                            offset: 0,
                            extra: 0,
                        });
                    }
                    at += n * 8;
                }
                kind::DATASEC => {
                    check_room(at, n, 12, types_end)?;
                    for i in 0..n {
                        let o = at + i * 12;
                        t.members.push(Member {
                            name_off: 0,
                            type_id: rd_u32(raw, o)?,
                            offset: rd_u32(raw, o + 4)?,
                            extra: rd_u32(raw, o + 8)?,
                        });
                    }
                    at += n * 12;
                }
                k => return Err(BtfError::UnknownKind { id, kind: k }),
            }
            if at > types_end {
                return Err(BtfError::Truncated(at));
            }
            types.push(t);
        }
        Ok(Self {
            raw: raw.to_vec(),
            hdr_len,
            type_off,
            str_off,
            str_len,
            types,
            by_name: OnceLock::new(),
        })
    }

    /// The running kernel's BTF, parsed once per process.
    pub fn vmlinux() -> Result<&'static Btf, BtfError> {
        static VMLINUX: OnceLock<Result<Btf, BtfError>> = OnceLock::new();
        VMLINUX
            .get_or_init(|| Self::from_file(crate::object::VMLINUX_BTF_PATH))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Parses a raw BTF file such as `/sys/kernel/btf/vmlinux`.
    pub fn from_file(path: &str) -> Result<Btf, BtfError> {
        let raw = std::fs::read(path).map_err(|e| BtfError::Io {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        Btf::parse(&raw)
    }

    /// The raw bytes as parsed.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Number of type ids including `void` (valid ids are `0..len()`).
    pub fn len(&self) -> u32 {
        self.types.len() as u32
    }

    /// Never true: id 0 (`void`) always exists.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The type with this id.
    pub fn type_by_id(&self, id: u32) -> Result<&BtfType, BtfError> {
        self.types.get(id as usize).ok_or(BtfError::BadTypeId(id))
    }

    /// A string from the string section.
    pub fn str_at(&self, off: u32) -> Result<&str, BtfError> {
        if off as usize >= self.str_len {
            return Err(BtfError::BadString(off));
        }
        let start = self.hdr_len + self.str_off + off as usize;
        let end_limit = self.hdr_len + self.str_off + self.str_len;
        let bytes = self
            .raw
            .get(start..end_limit)
            .ok_or(BtfError::BadString(off))?;
        let len = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::BadString(off))?;
        std::str::from_utf8(&bytes[..len]).map_err(|_| BtfError::BadString(off))
    }

    /// Name of a type ("" for anonymous ones).
    pub fn name(&self, id: u32) -> Result<&str, BtfError> {
        self.str_at(self.type_by_id(id)?.name_off)
    }

    /// Follows typedefs and modifiers (const, volatile, restrict, type tags).
    pub fn skip_mods_and_typedefs(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_CHAIN {
            let t = self.type_by_id(id)?;
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::TooDeep(id))
    }

    /// Follows modifiers only (keeps typedefs), as CO-RE type matching does for the root type.
    pub fn skip_mods(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_CHAIN {
            let t = self.type_by_id(id)?;
            match t.kind {
                kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::TooDeep(id))
    }

    /// Size in bytes of a type (as `btf__resolve_size`).
    pub fn resolve_size(&self, id: u32) -> Result<u64, BtfError> {
        let mut id = id;
        let mut mult: u64 = 1;
        for _ in 0..MAX_CHAIN {
            let t = self.type_by_id(id)?;
            match t.kind {
                kind::INT
                | kind::STRUCT
                | kind::UNION
                | kind::ENUM
                | kind::ENUM64
                | kind::DATASEC
                | kind::FLOAT => return Ok(mult.saturating_mul(t.size_or_type as u64)),
                kind::PTR => return Ok(mult.saturating_mul(8)),
                kind::TYPEDEF
                | kind::VOLATILE
                | kind::CONST
                | kind::RESTRICT
                | kind::TYPE_TAG
                | kind::VAR => id = t.size_or_type,
                kind::ARRAY => {
                    let (elem, _, n) = t.array.unwrap_or((0, 0, 0));
                    mult = mult.saturating_mul(n as u64);
                    id = elem;
                }
                _ => return Err(BtfError::BadTypeId(id)),
            }
        }
        Err(BtfError::TooDeep(id))
    }

    /// Ids of all named types whose name, without a `___flavor` suffix, is `name`.
    pub fn ids_by_essential_name(&self, name: &str) -> &[u32] {
        let map = self.by_name.get_or_init(|| {
            let mut m: HashMap<String, Vec<u32>> = HashMap::new();
            for (id, t) in self.types.iter().enumerate().skip(1) {
                if t.name_off == 0 {
                    continue;
                }
                if let Ok(n) = self.str_at(t.name_off) {
                    m.entry(essential_name(n).to_string())
                        .or_default()
                        .push(id as u32);
                }
            }
            m
        });
        map.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Finds a type by exact name and kind.
    pub fn find_by_name_kind(&self, name: &str, k: u8) -> Option<u32> {
        self.ids_by_essential_name(essential_name(name))
            .iter()
            .copied()
            .find(|&id| {
                self.type_by_id(id).map(|t| t.kind == k).unwrap_or(false)
                    && self.name(id).map(|n| n == name).unwrap_or(false)
            })
    }

    /// Offset of the types section inside [`Btf::raw`].
    /// The byte offset of the `struct bpf_spin_lock` in a map value of type `value_type`
    /// (searched in nested structs too, as the kernel's `btf_find_field`), if it has one.
    pub fn spin_lock_offset(&self, value_type: u32) -> Option<u32> {
        self.spin_lock_in(value_type, 0, 0)
    }

    fn spin_lock_in(&self, id: u32, base_bits: u32, depth: u32) -> Option<u32> {
        let id = self.skip_mods_and_typedefs(id).ok()?;
        let t = self.type_by_id(id).ok()?;
        if t.kind != kind::STRUCT || depth > 8 {
            return None;
        }
        if self.str_at(t.name_off).ok() == Some("bpf_spin_lock") {
            return Some(base_bits / 8);
        }
        t.members
            .iter()
            .find_map(|m| self.spin_lock_in(m.type_id, base_bits + m.offset, depth + 1))
    }

    pub(crate) fn types_start(&self) -> usize {
        self.hdr_len + self.type_off
    }
}

fn check_room(at: usize, n: usize, rec: usize, end: usize) -> Result<(), BtfError> {
    let need = n
        .checked_mul(rec)
        .and_then(|x| x.checked_add(at))
        .ok_or(BtfError::Truncated(at))?;
    if need > end {
        Err(BtfError::Truncated(need))
    } else {
        Ok(())
    }
}

/// `task_struct___v2` -> `task_struct` (libbpf's "flavor" convention for CO-RE).
pub fn essential_name(name: &str) -> &str {
    match name.find("___") {
        Some(i) => &name[..i],
        None => name,
    }
}

/// One `.BTF.ext` record with its ELF section name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtRecord {
    /// The ELF code section the record belongs to.
    pub section: String,
    /// Byte offset of the instruction in its section.
    pub insn_off: u32,
    /// func_info: FUNC type id; line_info: file name offset; core_relo: root type id.
    pub a: u32,
    /// line_info: line offset; core_relo: access string offset.
    pub b: u32,
    /// line_info: line/column; core_relo: relocation kind.
    pub c: u32,
}

/// Parsed `.BTF.ext`: function info, line info and CO-RE relocations.
#[derive(Debug, Clone, Default)]
pub struct BtfExt {
    /// `bpf_func_info` records: where each function starts and its FUNC type.
    pub func_info: Vec<ExtRecord>,
    /// `bpf_line_info` records: source lines of instructions.
    pub line_info: Vec<ExtRecord>,
    /// `bpf_core_relo` records: the CO-RE relocations to apply.
    pub core_relos: Vec<ExtRecord>,
}

impl BtfExt {
    /// Parses `.BTF.ext`; section names are resolved through the object's `btf` strings.
    pub fn parse(raw: &[u8], btf: &Btf) -> Result<Self, BtfError> {
        let magic = rd_u16(raw, 0)?;
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        let hdr_len = rd_u32(raw, 4)? as usize;
        let mut ext = BtfExt::default();
        let sub = |off_at: usize, len_at: usize, min_rec: usize, out: &mut Vec<ExtRecord>| {
            if hdr_len < len_at + 4 {
                return Ok(());
            }
            let off = rd_u32(raw, off_at)? as usize;
            let len = rd_u32(raw, len_at)? as usize;
            parse_ext_sub(raw, hdr_len, off, len, min_rec, btf, out)
        };
        sub(8, 12, 8, &mut ext.func_info)?;
        sub(16, 20, 16, &mut ext.line_info)?;
        sub(24, 28, 16, &mut ext.core_relos)?;
        Ok(ext)
    }
}

fn parse_ext_sub(
    raw: &[u8],
    hdr_len: usize,
    off: usize,
    len: usize,
    min_rec: usize,
    btf: &Btf,
    out: &mut Vec<ExtRecord>,
) -> Result<(), BtfError> {
    if len == 0 {
        return Ok(());
    }
    let start = hdr_len.checked_add(off).ok_or(BtfError::Truncated(off))?;
    let end = start.checked_add(len).ok_or(BtfError::Truncated(start))?;
    if end > raw.len() {
        return Err(BtfError::Truncated(end));
    }
    let rec_size = rd_u32(raw, start)? as usize;
    if rec_size < min_rec {
        return Err(BtfError::Truncated(start));
    }
    let mut at = start + 4;
    while at < end {
        let sec_name_off = rd_u32(raw, at)?;
        let num = rd_u32(raw, at + 4)? as usize;
        at += 8;
        let section = btf.str_at(sec_name_off)?.to_string();
        check_room(at, num, rec_size, end)?;
        for i in 0..num {
            let o = at + i * rec_size;
            let word = |k: usize| {
                if 4 * k + 4 <= rec_size {
                    rd_u32(raw, o + 4 * k)
                } else {
                    Ok(0)
                }
            };
            out.push(ExtRecord {
                section: section.clone(),
                insn_off: word(0)?,
                a: word(1)?,
                b: word(2)?,
                c: word(3)?,
            });
        }
        at += num * rec_size;
    }
    Ok(())
}

/// Returns a copy of `btf`'s raw bytes fixed up as libbpf hands BTF to the kernel: every
/// `DATASEC` sized and its variables placed as the ELF says (clang leaves sizes and offsets 0;
/// the kernel rejects a 0-sized DATASEC), and hidden global functions made static.
/// `section_size(name)` gives the section size, `var_offset(name)` a variable's symbol value
/// and `is_hidden(name)` whether a function's symbol is `STV_HIDDEN` (`__hidden`).
pub fn fixup_for_kernel(
    btf: &Btf,
    section_size: impl Fn(&str) -> Option<u32>,
    var_offset: impl Fn(&str) -> Option<u32>,
    is_hidden: impl Fn(&str) -> bool,
) -> Vec<u8> {
    let mut raw = btf.raw.clone();
    let base = btf.types_start();
    for t in btf.types.iter().skip(1) {
        if t.kind == kind::FUNC
            && t.vlen == func_linkage::GLOBAL
            && btf.str_at(t.name_off).is_ok_and(&is_hidden)
        {
            // libbpf (`mark_btf_static`): a hidden global subprogram, such as usdt.bpf.h's
            // `__weak __hidden` bpf_usdt_arg(), cannot be called from outside the object, so
            // the verifier may check it in its callers' context, where (say) a pointer
            // argument is known non-NULL; as a global function it is checked alone.
            let at = base + t.raw_offset + 4;
            if let Some(info) = raw.get(at..at + 4) {
                let info = u32::from_le_bytes(info.try_into().expect("4 bytes"));
                put_u32(
                    &mut raw,
                    at,
                    info & !0xffff | u32::from(func_linkage::STATIC),
                );
            }
            continue;
        }
        if t.kind != kind::DATASEC {
            continue;
        }
        let Ok(name) = btf.str_at(t.name_off) else {
            continue;
        };
        if let Some(size) = section_size(name) {
            put_u32(&mut raw, base + t.raw_offset + 8, size);
        }
        // Entries in offset order, as the kernel requires (`btf_datasec_check_meta`); extern
        // variables (`__kconfig`) become allocated ones, as libbpf makes them, since the
        // kernel accepts no extern linkage.
        let mut entries: Vec<(u32, u32, u32)> = t
            .members
            .iter()
            .map(|m| {
                let var = btf.type_by_id(m.type_id).ok();
                if let Some(var) = var.filter(|v| v.kind == kind::VAR) {
                    if var.extra == var_linkage::GLOBAL_EXTERN {
                        put_u32(
                            &mut raw,
                            base + var.raw_offset + 12,
                            var_linkage::GLOBAL_ALLOCATED,
                        );
                    }
                }
                let off = var
                    .and_then(|v| btf.str_at(v.name_off).ok())
                    .and_then(&var_offset)
                    .unwrap_or(m.offset);
                (m.type_id, off, m.extra)
            })
            .collect();
        entries.sort_by_key(|&(_, off, _)| off);
        for (i, (type_id, off, size)) in entries.into_iter().enumerate() {
            let at = base + t.raw_offset + 12 + i * 12;
            put_u32(&mut raw, at, type_id);
            put_u32(&mut raw, at + 4, off);
            put_u32(&mut raw, at + 8, size);
        }
    }
    raw
}

fn put_u32(raw: &mut [u8], at: usize, v: u32) {
    if let Some(s) = raw.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}
