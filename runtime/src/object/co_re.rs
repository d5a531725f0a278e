//! CO-RE ("compile once, run everywhere") relocations: rewrite field offsets, sizes, existence
//! checks, type and enum facts that clang recorded in `.BTF.ext` against the *target* kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), following the semantics documented for libbpf's relo_core.
//!
//! A relocation that cannot be satisfied is not an error by itself (the code may be guarded by
//! `bpf_core_field_exists`): like libbpf, the instruction is "poisoned" into a call to the invalid
//! helper [`POISON_HELPER`], which the kernel verifier rejects only if that path is reachable and
//! our VM reports as an unknown helper.

use super::btf::{essential_name, kind, Btf, BtfError, ExtRecord};
use super::insn;
use super::RawInsn;

/// The helper id libbpf uses to poison unresolvable CO-RE instructions (0xbad2310).
pub const POISON_HELPER: i32 = 0xbad2310;

/// `enum bpf_core_relo_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoreReloKind {
    /// `BPF_CORE_FIELD_BYTE_OFFSET` (0): the field's byte offset in the target type.
    FieldByteOffset,
    /// `BPF_CORE_FIELD_BYTE_SIZE` (1): the field's size in bytes.
    FieldByteSize,
    /// `BPF_CORE_FIELD_EXISTS` (2): 1 if the target kernel has the field, else 0.
    FieldExists,
    /// `BPF_CORE_FIELD_SIGNED` (3): 1 if the field is signed.
    FieldSigned,
    /// `BPF_CORE_FIELD_LSHIFT_U64` (4): left shift that brings a bitfield to the top of a u64.
    FieldLshiftU64,
    /// `BPF_CORE_FIELD_RSHIFT_U64` (5): right shift that then brings it down to bit 0.
    FieldRshiftU64,
    /// `BPF_CORE_TYPE_ID_LOCAL` (6): the type's id in the object's own BTF.
    TypeIdLocal,
    /// `BPF_CORE_TYPE_ID_TARGET` (7): the matching type's id in the target kernel's BTF.
    TypeIdTarget,
    /// `BPF_CORE_TYPE_EXISTS` (8): 1 if the target has a compatible type.
    TypeExists,
    /// `BPF_CORE_TYPE_SIZE` (9): the target type's size in bytes.
    TypeSize,
    /// `BPF_CORE_ENUMVAL_EXISTS` (10): 1 if the target enum has the enumerator.
    EnumvalExists,
    /// `BPF_CORE_ENUMVAL_VALUE` (11): the enumerator's value in the target.
    EnumvalValue,
    /// `BPF_CORE_TYPE_MATCHES` (12): 1 if the target type matches by libbpf's stricter
    /// `bpf_core_type_matches` rules.
    TypeMatches,
}

impl CoreReloKind {
    fn from_u32(v: u32) -> Option<Self> {
        use CoreReloKind::*;
        Some(match v {
            0 => FieldByteOffset,
            1 => FieldByteSize,
            2 => FieldExists,
            3 => FieldSigned,
            4 => FieldLshiftU64,
            5 => FieldRshiftU64,
            6 => TypeIdLocal,
            7 => TypeIdTarget,
            8 => TypeExists,
            9 => TypeSize,
            10 => EnumvalExists,
            11 => EnumvalValue,
            12 => TypeMatches,
            _ => return None,
        })
    }

    fn is_field(self) -> bool {
        (self as u32) <= CoreReloKind::FieldRshiftU64 as u32
    }
}

/// What one CO-RE relocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreRelocation {
    /// Instruction index (in the section while relocating, in the program once linked).
    pub insn_index: usize,
    /// What the relocation asks for.
    pub kind: CoreReloKind,
    /// Name of the local root type (e.g. `pt_regs`).
    pub type_name: String,
    /// clang's access string (e.g. `0:14`).
    pub access: String,
    /// Value written into the instruction, or `None` when it was poisoned.
    pub value: Option<u64>,
}

/// Why a CO-RE relocation failed (reported with the section and instruction index by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreError {
    /// Index of the instruction in its section (8-byte slots).
    pub insn_index: usize,
    /// What could not be done (a malformed record or instruction, not an unmatched type,
    /// which poisons the instruction instead).
    pub reason: String,
}

fn err(insn_index: usize, reason: impl Into<String>) -> CoreError {
    CoreError {
        insn_index,
        reason: reason.into(),
    }
}

/// One step of an access path.
#[derive(Debug, Clone)]
struct Acc {
    /// Member name (named struct/union member) or `None` for an array index.
    name: Option<String>,
    idx: u32,
}

/// A resolved access path in one BTF.
#[derive(Debug, Clone, Copy)]
struct FieldPos {
    bit_offset: u64,
    /// Type id of the accessed field (after the last step).
    type_id: u32,
    /// Bitfield size in bits, 0 for a regular field.
    bitfield_bits: u32,
}

/// Applies every CO-RE relocation of one section to its instructions.
pub fn relocate_section(
    insns: &mut [RawInsn],
    records: &[&ExtRecord],
    local: &Btf,
    target: &Btf,
) -> Result<Vec<CoreRelocation>, CoreError> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        if r.insn_off % 8 != 0 {
            return Err(err(
                (r.insn_off / 8) as usize,
                "CO-RE relocation offset is not instruction-aligned",
            ));
        }
        let idx = (r.insn_off / 8) as usize;
        if idx >= insns.len() {
            return Err(err(idx, "CO-RE relocation points past the section end"));
        }
        let kind = CoreReloKind::from_u32(r.c)
            .ok_or_else(|| err(idx, format!("unknown CO-RE relocation kind {}", r.c)))?;
        let access = local
            .str_at(r.b)
            .map_err(|e| err(idx, format!("CO-RE access string: {e}")))?
            .to_string();
        let type_name = local.name(r.a).unwrap_or("").to_string();
        let value = compute(kind, r.a, &access, local, target).map_err(|e| err(idx, e))?;
        match value {
            Some(v) => {
                let local_size = if kind == CoreReloKind::FieldByteOffset {
                    compute(CoreReloKind::FieldByteSize, r.a, &access, local, local)
                        .ok()
                        .flatten()
                } else {
                    None
                };
                let target_size = if kind == CoreReloKind::FieldByteOffset {
                    compute(CoreReloKind::FieldByteSize, r.a, &access, local, target)
                        .ok()
                        .flatten()
                } else {
                    None
                };
                patch(insns, idx, v, local_size, target_size).map_err(|e| err(idx, e))?;
            }
            None => poison(insns, idx),
        }
        out.push(CoreRelocation {
            insn_index: idx,
            kind,
            type_name,
            access,
            value,
        });
    }
    Ok(out)
}

/// The relocated value, or `None` if no target type matches (the instruction gets poisoned).
fn compute(
    kind: CoreReloKind,
    local_id: u32,
    access: &str,
    local: &Btf,
    target: &Btf,
) -> Result<Option<u64>, String> {
    let e = |x: BtfError| x.to_string();
    if kind == CoreReloKind::TypeIdLocal {
        return Ok(Some(local_id as u64));
    }
    let raw: Vec<u32> = access
        .split(':')
        .map(|s| s.parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad CO-RE access string {access:?}"))?;
    if raw.is_empty() {
        return Err("empty CO-RE access string".into());
    }
    let local_root = local.skip_mods(local_id).map_err(e)?;
    let local_t = local.type_by_id(local_root).map_err(e)?;
    let local_name = local.name(local_root).map_err(e)?;
    if local_name.is_empty() {
        return Err(format!(
            "CO-RE relocation on anonymous type id {local_id} is not supported"
        ));
    }
    let cands: Vec<u32> = target
        .ids_by_essential_name(essential_name(local_name))
        .iter()
        .copied()
        .filter(|&id| {
            target
                .type_by_id(id)
                .map(|t| same_kind_class(t.kind, local_t.kind))
                .unwrap_or(false)
        })
        .collect();

    if kind.is_field() {
        let spec = local_spec(local, local_root, &raw).map_err(|x| x.to_string())?;
        let local_pos = resolve(local, local_root, &spec)?
            .ok_or("CO-RE access string does not resolve in the object's own BTF")?;
        // Like libbpf, every matching candidate must give the same answer.
        let mut found: Option<u64> = None;
        for &c in &cands {
            if let Some(p) = resolve(target, c, &spec)? {
                if fields_compatible(local, local_pos.type_id, target, p.type_id)? {
                    let v = field_value(kind, p, target)?;
                    match found {
                        Some(prev) if prev != v => {
                            return Err(format!(
                                "ambiguous CO-RE relocation: candidates for {local_name} give \
                                 {prev} and {v}"
                            ))
                        }
                        _ => found = Some(v),
                    }
                }
            }
        }
        return Ok(match (found, kind) {
            (None, CoreReloKind::FieldExists) => Some(0),
            (v, _) => v,
        });
    }

    match kind {
        CoreReloKind::TypeIdTarget => Ok(cands.first().map(|&c| c as u64)),
        CoreReloKind::TypeExists | CoreReloKind::TypeMatches => {
            Ok(Some(u64::from(!cands.is_empty())))
        }
        CoreReloKind::TypeSize => match cands.first() {
            Some(&c) => Ok(Some(target.resolve_size(c).map_err(e)?)),
            None => Ok(None),
        },
        CoreReloKind::EnumvalExists | CoreReloKind::EnumvalValue => {
            let lt = local
                .type_by_id(local.skip_mods_and_typedefs(local_root).map_err(e)?)
                .map_err(e)?;
            let m = lt
                .members
                .get(raw[0] as usize)
                .ok_or("CO-RE enum value index out of range")?;
            let name = local.str_at(m.name_off).map_err(e)?;
            for &c in &cands {
                let t = target
                    .type_by_id(target.skip_mods_and_typedefs(c).map_err(e)?)
                    .map_err(e)?;
                if t.kind != kind::ENUM && t.kind != kind::ENUM64 {
                    continue;
                }
                for tm in &t.members {
                    if target.str_at(tm.name_off).map_err(e)? == name {
                        let v = if t.kind == kind::ENUM64 {
                            (tm.extra as u64) << 32 | tm.offset as u64
                        } else if t.kind_flag {
                            tm.offset as i32 as i64 as u64
                        } else {
                            tm.offset as u64
                        };
                        return Ok(Some(if kind == CoreReloKind::EnumvalExists {
                            1
                        } else {
                            v
                        }));
                    }
                }
            }
            Ok(if kind == CoreReloKind::EnumvalExists {
                Some(0)
            } else {
                None
            })
        }
        _ => Err(format!("unsupported CO-RE relocation kind {kind:?}")),
    }
}

/// Parses the local access path: the first index is an array index on the root, the others are
/// member or array indices. Anonymous members are kept by index (libbpf searches through them by
/// name in the target, which [`resolve`] does when a step has a name).
fn local_spec(local: &Btf, root: u32, raw: &[u32]) -> Result<Vec<Acc>, BtfError> {
    let mut spec = vec![Acc {
        name: None,
        idx: raw[0],
    }];
    let mut cur = root;
    for &i in &raw[1..] {
        let id = local.skip_mods_and_typedefs(cur)?;
        let t = local.type_by_id(id)?;
        match t.kind {
            kind::STRUCT | kind::UNION => {
                let m = t.members.get(i as usize).ok_or(BtfError::BadTypeId(id))?;
                let name = local.str_at(m.name_off)?;
                spec.push(Acc {
                    name: (!name.is_empty()).then(|| name.to_string()),
                    idx: i,
                });
                if name.is_empty() {
                    // An anonymous member: keep its index; the named step after it is searched
                    // for by name in the target, through anonymous members.
                    spec.pop();
                }
                cur = m.type_id;
            }
            kind::ARRAY => {
                spec.push(Acc { name: None, idx: i });
                cur = t.array.map(|a| a.0).unwrap_or(0);
            }
            _ => return Err(BtfError::BadTypeId(id)),
        }
    }
    Ok(spec)
}

/// Resolves an access path in `btf` starting from `root`; `None` if a member is missing.
fn resolve(btf: &Btf, root: u32, spec: &[Acc]) -> Result<Option<FieldPos>, String> {
    let e = |x: BtfError| x.to_string();
    let root_size = btf.resolve_size(root).map_err(e)?;
    let too_big = || "CO-RE field offset overflows".to_string();
    let mut pos = FieldPos {
        bit_offset: (spec[0].idx as u64)
            .checked_mul(root_size)
            .and_then(|x| x.checked_mul(8))
            .ok_or_else(too_big)?,
        type_id: root,
        bitfield_bits: 0,
    };
    for acc in &spec[1..] {
        let id = btf.skip_mods_and_typedefs(pos.type_id).map_err(e)?;
        let t = btf.type_by_id(id).map_err(e)?;
        match (&acc.name, t.kind) {
            (Some(name), kind::STRUCT | kind::UNION) => match find_member(btf, id, name, 0)? {
                Some((bit_off, member_type, bits)) => {
                    pos.bit_offset = pos.bit_offset.checked_add(bit_off).ok_or_else(too_big)?;
                    pos.type_id = member_type;
                    pos.bitfield_bits = bits;
                }
                None => return Ok(None),
            },
            (None, kind::ARRAY) => {
                let (elem, _, n) = t.array.unwrap_or((0, 0, 0));
                // A flexible array (nelems 0) may be indexed anywhere, as in libbpf.
                if n != 0 && acc.idx >= n {
                    return Ok(None);
                }
                let sz = btf.resolve_size(elem).map_err(e)?;
                pos.bit_offset = (acc.idx as u64)
                    .checked_mul(sz)
                    .and_then(|x| x.checked_mul(8))
                    .and_then(|x| x.checked_add(pos.bit_offset))
                    .ok_or_else(too_big)?;
                pos.type_id = elem;
                pos.bitfield_bits = 0;
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(pos))
}

/// Finds a member by name, descending into anonymous struct/union members.
fn find_member(
    btf: &Btf,
    id: u32,
    name: &str,
    depth: usize,
) -> Result<Option<(u64, u32, u32)>, String> {
    if depth > 32 {
        return Err("struct nesting too deep".into());
    }
    let e = |x: BtfError| x.to_string();
    let t = btf.type_by_id(id).map_err(e)?;
    for m in &t.members {
        let n = btf.str_at(m.name_off).map_err(e)?;
        if n == name {
            return Ok(Some((m.offset as u64, m.type_id, m.extra)));
        }
        if n.is_empty() {
            let inner = btf.skip_mods_and_typedefs(m.type_id).map_err(e)?;
            let it = btf.type_by_id(inner).map_err(e)?;
            if matches!(it.kind, kind::STRUCT | kind::UNION) {
                if let Some((off, ty, bits)) = find_member(btf, inner, name, depth + 1)? {
                    return Ok(Some(((m.offset as u64).saturating_add(off), ty, bits)));
                }
            }
        }
    }
    Ok(None)
}

fn same_kind_class(a: u8, b: u8) -> bool {
    let class = |k: u8| match k {
        kind::ENUM | kind::ENUM64 => kind::ENUM,
        kind::STRUCT | kind::UNION | kind::FWD => k,
        other => other,
    };
    class(a) == class(b)
}

/// libbpf's field compatibility: same kind class; names of composite types are not compared.
fn fields_compatible(local: &Btf, l: u32, target: &Btf, t: u32) -> Result<bool, String> {
    let e = |x: BtfError| x.to_string();
    let (mut l, mut t) = (l, t);
    for _ in 0..32 {
        let lt = local
            .type_by_id(local.skip_mods_and_typedefs(l).map_err(e)?)
            .map_err(e)?;
        let tt = target
            .type_by_id(target.skip_mods_and_typedefs(t).map_err(e)?)
            .map_err(e)?;
        return Ok(match (lt.kind, tt.kind) {
            (kind::STRUCT | kind::UNION, kind::STRUCT | kind::UNION) => true,
            (kind::INT, kind::INT) | (kind::PTR, kind::PTR) | (kind::FLOAT, kind::FLOAT) => true,
            (kind::ENUM | kind::ENUM64, kind::ENUM | kind::ENUM64) => true,
            (kind::INT, kind::ENUM | kind::ENUM64) | (kind::ENUM | kind::ENUM64, kind::INT) => true,
            (kind::ARRAY, kind::ARRAY) => {
                l = lt.array.map(|a| a.0).unwrap_or(0);
                t = tt.array.map(|a| a.0).unwrap_or(0);
                continue;
            }
            _ => false,
        });
    }
    Err("array nesting too deep".into())
}

fn field_value(kind: CoreReloKind, pos: FieldPos, btf: &Btf) -> Result<u64, String> {
    let e = |x: BtfError| x.to_string();
    let field_t = btf
        .type_by_id(btf.skip_mods_and_typedefs(pos.type_id).map_err(e)?)
        .map_err(e)?;
    let full_size = btf.resolve_size(pos.type_id).map_err(e)?;
    let bitfield = pos.bitfield_bits != 0 || !pos.bit_offset.is_multiple_of(8);
    let (byte_off, byte_sz, bit_sz) = if bitfield {
        let bit_sz = if pos.bitfield_bits != 0 {
            pos.bitfield_bits as u64
        } else {
            (field_t.extra & 0xff) as u64
        };
        // The smallest naturally aligned load (starting at the field type's size) that covers
        // the bitfield.
        let mut sz = full_size.clamp(1, 8);
        let mut off = pos.bit_offset / 8 / sz * sz;
        if bit_sz == 0 || bit_sz > 64 || pos.bit_offset > u32::MAX as u64 * 8 {
            return Err("bad bitfield".into());
        }
        while pos.bit_offset + bit_sz - off * 8 > sz * 8 {
            if sz >= 8 {
                return Err("bitfield does not fit in 8 bytes".into());
            }
            sz *= 2;
            off = pos.bit_offset / 8 / sz * sz;
        }
        (off, sz, bit_sz)
    } else {
        (pos.bit_offset / 8, full_size, full_size * 8)
    };
    Ok(match kind {
        CoreReloKind::FieldByteOffset => byte_off,
        CoreReloKind::FieldByteSize => byte_sz,
        CoreReloKind::FieldExists => 1,
        CoreReloKind::FieldSigned => match field_t.kind {
            kind::INT => u64::from((field_t.extra >> 24) & 1 == 1),
            kind::ENUM | kind::ENUM64 => u64::from(field_t.kind_flag),
            _ => 0,
        },
        CoreReloKind::FieldLshiftU64 => {
            if bitfield {
                64u64.saturating_sub(pos.bit_offset + bit_sz - byte_off * 8)
            } else {
                64u64.saturating_sub(byte_sz.saturating_mul(8))
            }
        }
        CoreReloKind::FieldRshiftU64 => 64u64.saturating_sub(bit_sz),
        _ => return Err(format!("{kind:?} is not a field relocation")),
    })
}

/// Writes `value` into the instruction the way libbpf's `bpf_core_patch_insn` does.
fn patch(
    insns: &mut [RawInsn],
    idx: usize,
    value: u64,
    local_size: Option<u64>,
    target_size: Option<u64>,
) -> Result<(), String> {
    let i = insns[idx];
    let class = insn::opc(&i) & 0x07;
    match class {
        // ALU / ALU64 with an immediate operand.
        0x04 | 0x07 => {
            if insn::opc(&i) & 0x08 != 0 {
                return Err("CO-RE relocation on an ALU instruction with a register source".into());
            }
            let v = i32::try_from(value as i64)
                .or_else(|_| i32::try_from(value).map_err(|_| ()))
                .map_err(|_| format!("CO-RE value {value} does not fit a 32-bit immediate"))?;
            insn::set_imm(&mut insns[idx], v);
        }
        // LDX / ST / STX: the value is the offset; a load may need its size adjusted.
        0x01..=0x03 => {
            let off = i16::try_from(value)
                .map_err(|_| format!("CO-RE offset {value} does not fit 16 bits"))?;
            insn::set_off(&mut insns[idx], off);
            if let (Some(l), Some(t)) = (local_size, target_size) {
                if l != t && class == 0x01 {
                    let cur = match insn::opc(&i) & 0x18 {
                        0x00 => 4,
                        0x08 => 2,
                        0x10 => 1,
                        _ => 8,
                    };
                    if cur == l {
                        let size_bits = match t {
                            1 => 0x10,
                            2 => 0x08,
                            4 => 0x00,
                            8 => 0x18,
                            _ => return Err(format!("cannot load a field of {t} bytes")),
                        };
                        insns[idx][0] = (insn::opc(&i) & !0x18) | size_bits;
                    }
                }
            }
        }
        // LD: only the 64-bit immediate load.
        0x00 if insn::opc(&i) == 0x18 => {
            if idx + 1 >= insns.len() {
                return Err("lddw without a second slot".into());
            }
            insn::set_imm(&mut insns[idx], value as u32 as i32);
            insn::set_imm(&mut insns[idx + 1], (value >> 32) as u32 as i32);
        }
        _ => {
            return Err(format!(
                "CO-RE relocation on unsupported instruction opcode {:#04x}",
                insn::opc(&i)
            ))
        }
    }
    Ok(())
}

fn poison(insns: &mut [RawInsn], idx: usize) {
    let lddw = insn::opc(&insns[idx]) == 0x18;
    insns[idx] = insn::make(0x85, 0, 0, 0, POISON_HELPER);
    if lddw && idx + 1 < insns.len() {
        insns[idx + 1] = insn::make(0x85, 0, 0, 0, POISON_HELPER);
    }
}
