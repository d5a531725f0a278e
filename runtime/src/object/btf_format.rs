//! BTF-driven formatting of map keys and values, as `bpftool map dump` prints them under
//! `"formatted"`: integers as numbers, `bool`s as booleans, enums by enumerator name, `char`
//! arrays as strings, other arrays as JSON arrays, structs and unions as objects of their
//! members (anonymous struct/union members are flattened into the parent, as C accesses them;
//! unnamed padding bitfields are left out),
//! bitfields as numbers, pointers as numbers, typedefs and `const`/`volatile` resolved.
//!
//! The loader and `bpftime-rs maps` are different processes, so the types are first turned into a
//! self-contained [`TypeDesc`] tree ([`describe`]) that serializes with serde and needs no BTF to
//! format bytes ([`TypeDesc::format`]). [`MapBtfInfo`] holds one key/value description per map of
//! an object ([`map_types`]) and persists as JSON.
//!
//! Every input is untrusted: malformed BTF, malformed (deserialized) descriptions and byte slices
//! of the wrong size give `None`, never a panic. Type chains are followed to a bounded depth and a
//! description has a bounded number of nodes; pointers are leaves, so valid BTF never loops.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::btf::{kind, Btf, BtfType};
use super::{BpfObject, MapOrigin};

/// How many nested types (struct in struct in array ...) a description may have. Kept well below
/// serde_json's recursion limit (128) so a saved description always reads back.
const MAX_DEPTH: usize = 24;
/// How many nodes one description may have (a whole `task_struct` is a few thousand).
const MAX_NODES: usize = 1 << 16;
/// Largest number of elements printed for an array of zero-sized elements.
const MAX_EMPTY_ELEMS: u64 = 1 << 16;

use bpftime_abi::btf::int_encoding::{BOOL as INT_BOOL, CHAR as INT_CHAR, SIGNED as INT_SIGNED};

/// A self-contained description of a BTF type's layout, enough to format its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TypeDesc {
    /// An integer of 1, 2, 4, 8 or 16 bytes. `bool` prints `true`/`false`; `char` only changes
    /// how arrays of it print (as strings).
    Int {
        /// Width in bytes.
        size: u32,
        /// `BTF_INT_SIGNED`: printed as a signed number.
        signed: bool,
        /// `BTF_INT_BOOL`: printed as `true`/`false`.
        bool: bool,
        /// `BTF_INT_CHAR`: arrays of it print as strings.
        char: bool,
    },
    /// An IEEE float of 4 or 8 bytes.
    Float {
        /// Width in bytes.
        size: u32,
    },
    /// A pointer (8 bytes), printed as a number.
    Ptr,
    /// `len` consecutive `elem`s.
    Array {
        /// The element type.
        elem: Box<TypeDesc>,
        /// Number of elements.
        len: u32,
    },
    /// A struct, or a `DATASEC` (its variables as members).
    Struct {
        /// Total size in bytes.
        size: u32,
        /// Its members (a `DATASEC`'s variables), in BTF order.
        members: Vec<Field>,
    },
    /// A union: every member reads the same bytes.
    Union {
        /// Total size in bytes.
        size: u32,
        /// Its members, in BTF order.
        members: Vec<Field>,
    },
    /// An enum; `values` hold the raw 64-bit pattern (sign-extended when `signed`).
    Enum {
        /// Width in bytes.
        size: u32,
        /// Whether the enum is signed (the BTF kind flag).
        signed: bool,
        /// Enumerator names and values; a value not listed prints as a number.
        values: Vec<(String, u64)>,
    },
}

/// One member of a [`TypeDesc::Struct`] or [`TypeDesc::Union`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    /// Member name; empty for an anonymous struct/union member (flattened when formatting).
    pub name: String,
    /// Offset from the start of the parent, in bits.
    pub bit_offset: u32,
    /// Bitfield width in bits; 0 for an ordinary member.
    pub bitfield_size: u32,
    /// The member's type.
    pub ty: TypeDesc,
}

/// Describes type `type_id` of `btf` (typedefs, modifiers and `VAR`s resolved; a `DATASEC`
/// becomes a [`TypeDesc::Struct`] of its variables). `None` for `void`, functions, forward
/// declarations, unsupported integer sizes, malformed or too deeply nested types.
pub fn describe(btf: &Btf, type_id: u32) -> Option<TypeDesc> {
    let mut d = Describer { btf, nodes: 0 };
    d.describe(type_id, 0)
}

/// Formats `bytes` as a value of type `type_id` (see the module docs). `None` if the type cannot
/// be described or `bytes` is not exactly the type's size.
pub fn format_value(btf: &Btf, type_id: u32, bytes: &[u8]) -> Option<Value> {
    describe(btf, type_id)?.format(bytes)
}

/// Key and value descriptions of every map of `obj`, by map name. Global-data maps get a `u32`
/// key (their only key is 0) and their `DATASEC` as the value, laid out with the section's real
/// variable offsets ([`BpfObject::kernel_btf`], since clang leaves them 0 in `.BTF`). Maps without
/// BTF types (legacy `maps` section) get `(None, None)`.
pub fn map_types(obj: &BpfObject) -> BTreeMap<String, (Option<TypeDesc>, Option<TypeDesc>)> {
    let fixed = obj.kernel_btf.as_ref().and_then(|raw| Btf::parse(raw).ok());
    let btf = fixed.as_ref().or(obj.btf.as_deref());
    let mut out = BTreeMap::new();
    for m in &obj.maps {
        let global_data = matches!(m.origin, MapOrigin::GlobalData { .. });
        let t = btf.map_or_else(MapTypes::default, |b| {
            MapTypes::from_btf(
                b,
                m.btf_key_type_id,
                m.btf_value_type_id,
                global_data,
                m.key_size,
                m.value_size,
            )
        });
        out.insert(m.name.clone(), (t.key, t.value));
    }
    out
}

/// What `bpftime-rs maps` needs to format the entries of an object's maps, saved by the loader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapBtfInfo {
    /// By map name.
    pub maps: BTreeMap<String, MapTypes>,
}

/// The key and value types of one map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapTypes {
    /// The key's type; `None` when the map has no usable BTF for it.
    pub key: Option<TypeDesc>,
    /// The value's type; `None` when the map has no usable BTF for it.
    pub value: Option<TypeDesc>,
}

impl MapTypes {
    /// The types of a map with key and value type ids `key_id` and `value_id` in `btf`: a
    /// global-data map (`global_data`, its only key 0, no key type) gets a `u32` key; a
    /// description that does not match the map's sizes is dropped (it would only ever format to
    /// `None`).
    pub fn from_btf(
        btf: &Btf,
        key_id: Option<u32>,
        value_id: Option<u32>,
        global_data: bool,
        key_size: u32,
        value_size: u32,
    ) -> Self {
        let key = match key_id {
            None if global_data && key_size == 4 => Some(TypeDesc::Int {
                size: 4,
                signed: false,
                bool: false,
                char: false,
            }),
            id => id.and_then(|id| describe(btf, id)),
        };
        Self {
            key: key.filter(|k| k.size() == Some(u64::from(key_size))),
            value: value_id
                .and_then(|id| describe(btf, id))
                .filter(|v| v.size() == Some(u64::from(value_size))),
        }
    }
}

impl MapBtfInfo {
    /// Descriptions of every map of `obj` (see [`map_types`]).
    pub fn from_object(obj: &BpfObject) -> Self {
        let maps = map_types(obj)
            .into_iter()
            .map(|(name, (key, value))| (name, MapTypes { key, value }))
            .collect();
        Self { maps }
    }

    /// The types of map `name`.
    pub fn get(&self, name: &str) -> Option<&MapTypes> {
        self.maps.get(name)
    }

    /// bpftool's `"formatted"` object for one entry of map `name`: `{"key": .., "value": ..}`,
    /// each part present when its type is known and the bytes have its size; `None` if neither
    /// part formats. (For per-CPU maps, call it once per CPU's value slice.)
    pub fn format_entry(&self, name: &str, key: &[u8], value: &[u8]) -> Option<Value> {
        let t = self.maps.get(name)?;
        let mut obj = Map::new();
        if let Some(k) = t.key.as_ref().and_then(|d| d.format(key)) {
            obj.insert("key".into(), k);
        }
        if let Some(v) = t.value.as_ref().and_then(|d| d.format(value)) {
            obj.insert("value".into(), v);
        }
        (!obj.is_empty()).then_some(Value::Object(obj))
    }

    /// JSON text of this description.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses [`MapBtfInfo::to_json`] output.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads a description `load` saved in a state directory of `owner` (root's or this
    /// user's; see `crate::state`), refusing a file anyone else could have written.
    pub fn load(path: impl AsRef<Path>, owner: u32) -> std::io::Result<Self> {
        let bytes = crate::state::fs::read_trusted(path.as_ref(), &[0, owner], 64 << 20)
            .map_err(std::io::Error::other)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Self::from_json(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

impl TypeDesc {
    /// Size in bytes; `None` if it overflows or the description is invalid.
    pub fn size(&self) -> Option<u64> {
        match self {
            TypeDesc::Int { size, .. }
            | TypeDesc::Float { size }
            | TypeDesc::Struct { size, .. }
            | TypeDesc::Union { size, .. }
            | TypeDesc::Enum { size, .. } => Some(u64::from(*size)),
            TypeDesc::Ptr => Some(8),
            TypeDesc::Array { elem, len } => elem.size()?.checked_mul(u64::from(*len)),
        }
    }

    /// Formats `bytes` (little-endian) as this type. `None` if `bytes` is not exactly
    /// [`TypeDesc::size`] long or the description is invalid.
    pub fn format(&self, bytes: &[u8]) -> Option<Value> {
        if self.size()? != bytes.len() as u64 {
            return None;
        }
        self.format_exact(bytes, 0)
    }

    /// `bytes.len()` equals `self.size()` here.
    fn format_exact(&self, bytes: &[u8], depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self {
            TypeDesc::Int {
                size,
                signed,
                bool: is_bool,
                ..
            } => {
                if *size == 16 {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(bytes.get(..16)?);
                    return Some(Value::String(format!("{:#x}", u128::from_le_bytes(b))));
                }
                let raw = read_le(bytes)?;
                Some(int_value(raw, size.saturating_mul(8), *signed, *is_bool))
            }
            TypeDesc::Float { size } => {
                let f = match size {
                    4 => f64::from(f32::from_le_bytes(bytes.get(..4)?.try_into().ok()?)),
                    8 => f64::from_le_bytes(bytes.get(..8)?.try_into().ok()?),
                    _ => return None,
                };
                Some(
                    serde_json::Number::from_f64(f)
                        .map(Value::Number)
                        .unwrap_or_else(|| Value::String(f.to_string())),
                )
            }
            TypeDesc::Ptr => Some(Value::from(read_le(bytes.get(..8)?)?)),
            TypeDesc::Enum {
                size,
                signed,
                values,
            } => Some(enum_value(
                read_le(bytes)?,
                size.saturating_mul(8),
                *signed,
                values,
            )),
            TypeDesc::Array { elem, len } => {
                let esz = usize::try_from(elem.size()?).ok()?;
                if let TypeDesc::Int { size: 1, char, .. } = **elem {
                    if char {
                        if let Some(s) = as_string(bytes) {
                            return Some(Value::String(s));
                        }
                    }
                }
                if esz == 0 {
                    if u64::from(*len) > MAX_EMPTY_ELEMS {
                        return None;
                    }
                    let v = elem.format_exact(&[], depth + 1)?;
                    return Some(Value::Array(vec![v; *len as usize]));
                }
                bytes
                    .chunks_exact(esz)
                    .map(|c| elem.format_exact(c, depth + 1))
                    .collect::<Option<Vec<_>>>()
                    .map(Value::Array)
            }
            TypeDesc::Struct { members, .. } | TypeDesc::Union { members, .. } => {
                let mut obj = Map::new();
                for m in members {
                    let v = m.format_in(bytes, depth + 1)?;
                    match (m.name.is_empty(), v) {
                        (true, Value::Object(inner)) => obj.extend(inner),
                        // An unnamed bitfield is padding.
                        (true, _) => {}
                        (false, v) => {
                            obj.insert(m.name.clone(), v);
                        }
                    }
                }
                Some(Value::Object(obj))
            }
        }
    }
}

impl Field {
    /// Formats this member from its parent's bytes.
    fn format_in(&self, parent: &[u8], depth: usize) -> Option<Value> {
        if self.bitfield_size == 0 {
            if self.bit_offset & 7 != 0 {
                return None;
            }
            let start = usize::try_from(self.bit_offset / 8).ok()?;
            let len = usize::try_from(self.ty.size()?).ok()?;
            let bytes = parent.get(start..start.checked_add(len)?)?;
            return self.ty.format_exact(bytes, depth);
        }
        let bits = self.bitfield_size;
        if bits > 64 {
            return None;
        }
        let first = usize::try_from(self.bit_offset / 8).ok()?;
        let shift = self.bit_offset % 8;
        let last =
            usize::try_from((u64::from(self.bit_offset) + u64::from(bits)).div_ceil(8)).ok()?;
        let window = parent.get(first..last)?;
        let mut b = [0u8; 16];
        b.get_mut(..window.len())?.copy_from_slice(window);
        let raw = (u128::from_le_bytes(b) >> shift) as u64 & mask(bits);
        match &self.ty {
            TypeDesc::Int {
                signed,
                bool: is_bool,
                ..
            } => Some(int_value(raw, bits, *signed, *is_bool)),
            TypeDesc::Enum { signed, values, .. } => Some(enum_value(raw, bits, *signed, values)),
            _ => None,
        }
    }
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Sign-extends the low `bits` bits of `raw`.
fn sign_extend(raw: u64, bits: u32) -> i64 {
    if bits == 0 || bits >= 64 {
        return raw as i64;
    }
    let s = 64 - bits;
    ((raw << s) as i64) >> s
}

/// Little-endian integer of 1..=8 bytes.
fn read_le(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 8 {
        return None;
    }
    let mut b = [0u8; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    Some(u64::from_le_bytes(b))
}

fn int_value(raw: u64, bits: u32, signed: bool, is_bool: bool) -> Value {
    if is_bool {
        Value::Bool(raw & mask(bits) != 0)
    } else if signed {
        Value::from(sign_extend(raw, bits))
    } else {
        Value::from(raw & mask(bits))
    }
}

fn enum_value(raw: u64, bits: u32, signed: bool, values: &[(String, u64)]) -> Value {
    let norm = if signed {
        sign_extend(raw, bits) as u64
    } else {
        raw & mask(bits)
    };
    match values.iter().find(|(_, v)| *v == norm) {
        Some((name, _)) => Value::String(name.clone()),
        None if signed => Value::from(norm as i64),
        None => Value::from(norm),
    }
}

/// A char array's text: the bytes before the first NUL, if they are printable UTF-8 and the
/// array is NUL-terminated or full. Otherwise the array prints as numbers.
fn as_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let s = std::str::from_utf8(&bytes[..end]).ok()?;
    if s.chars().any(|c| c.is_control() && c != '\t' && c != '\n') {
        return None;
    }
    Some(s.to_string())
}

struct Describer<'a> {
    btf: &'a Btf,
    nodes: usize,
}

impl<'a> Describer<'a> {
    fn resolved(&self, id: u32) -> Option<(u32, &'a BtfType)> {
        let btf: &'a Btf = self.btf;
        let mut id = btf.skip_mods_and_typedefs(id).ok()?;
        let mut t = btf.type_by_id(id).ok()?;
        // A VAR (a DATASEC entry, or an id a caller took from a symbol) stands for its type.
        for _ in 0..2 {
            if t.kind != kind::VAR {
                break;
            }
            id = btf.skip_mods_and_typedefs(t.size_or_type).ok()?;
            t = btf.type_by_id(id).ok()?;
        }
        Some((id, t))
    }

    fn describe(&mut self, id: u32, depth: usize) -> Option<TypeDesc> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return None;
        }
        let btf: &'a Btf = self.btf;
        let (_, t) = self.resolved(id)?;
        match t.kind {
            kind::INT => {
                let enc = (t.extra >> 24) & 0x0f;
                let size = t.size_or_type;
                if !matches!(size, 1 | 2 | 4 | 8 | 16) {
                    return None;
                }
                Some(TypeDesc::Int {
                    size,
                    signed: enc & INT_SIGNED != 0,
                    bool: enc & INT_BOOL != 0,
                    char: enc & INT_CHAR != 0 || self.btf.str_at(t.name_off).ok()? == "char",
                })
            }
            kind::FLOAT if matches!(t.size_or_type, 4 | 8) => Some(TypeDesc::Float {
                size: t.size_or_type,
            }),
            kind::PTR => Some(TypeDesc::Ptr),
            kind::ARRAY => {
                let (elem, _, len) = t.array?;
                let elem = self.describe(elem, depth + 1)?;
                let d = TypeDesc::Array {
                    elem: Box::new(elem),
                    len,
                };
                u32::try_from(d.size()?).ok()?;
                Some(d)
            }
            kind::ENUM | kind::ENUM64 => {
                let size = t.size_or_type;
                if !matches!(size, 1 | 2 | 4 | 8) {
                    return None;
                }
                let signed = t.kind_flag;
                let mut values = Vec::with_capacity(t.members.len());
                for m in &t.members {
                    let v = if t.kind == kind::ENUM64 {
                        (u64::from(m.extra) << 32) | u64::from(m.offset)
                    } else if signed {
                        i64::from(m.offset as i32) as u64
                    } else {
                        u64::from(m.offset)
                    };
                    values.push((self.btf.str_at(m.name_off).ok()?.to_string(), v));
                }
                Some(TypeDesc::Enum {
                    size,
                    signed,
                    values,
                })
            }
            kind::STRUCT | kind::UNION => {
                let size = t.size_or_type;
                let mut members = Vec::with_capacity(t.members.len());
                for m in &t.members {
                    let name = self.btf.str_at(m.name_off).ok()?.to_string();
                    let ty = self.describe(m.type_id, depth + 1)?;
                    let (mut bit_offset, mut bitfield_size) = (m.offset, m.extra);
                    // Old-style bitfields (no kind_flag): the INT itself carries offset and width.
                    if bitfield_size == 0 {
                        if let Some((_, it)) = self.resolved(m.type_id) {
                            if it.kind == kind::INT {
                                let (off, bits) = ((it.extra >> 16) & 0xff, it.extra & 0xff);
                                if off != 0 || bits != it.size_or_type.saturating_mul(8) {
                                    bit_offset = bit_offset.checked_add(off)?;
                                    bitfield_size = bits;
                                }
                            }
                        }
                    }
                    let end_bits = if bitfield_size == 0 {
                        if bit_offset & 7 != 0 {
                            return None;
                        }
                        u64::from(bit_offset) + ty.size()? * 8
                    } else {
                        if bitfield_size > 64
                            || !matches!(ty, TypeDesc::Int { .. } | TypeDesc::Enum { .. })
                        {
                            return None;
                        }
                        u64::from(bit_offset) + u64::from(bitfield_size)
                    };
                    if end_bits > u64::from(size) * 8 {
                        return None;
                    }
                    members.push(Field {
                        name,
                        bit_offset,
                        bitfield_size,
                        ty,
                    });
                }
                Some(if t.kind == kind::STRUCT {
                    TypeDesc::Struct { size, members }
                } else {
                    TypeDesc::Union { size, members }
                })
            }
            kind::DATASEC => {
                let mut members = Vec::with_capacity(t.members.len());
                let mut end = 0u64;
                for m in &t.members {
                    let var = btf.type_by_id(m.type_id).ok()?;
                    if var.kind != kind::VAR {
                        return None;
                    }
                    let name = self.btf.str_at(var.name_off).ok()?.to_string();
                    let ty = self.describe(var.size_or_type, depth + 1)?;
                    end = end.max(u64::from(m.offset) + ty.size()?);
                    members.push(Field {
                        name,
                        bit_offset: m.offset.checked_mul(8)?,
                        bitfield_size: 0,
                        ty,
                    });
                }
                // clang leaves sizes and offsets 0; only a fixed-up DATASEC (or one variable at
                // offset 0) has a known layout.
                let size = match t.size_or_type {
                    0 if members.len() <= 1 => u32::try_from(end).ok()?,
                    0 => return None,
                    s if u64::from(s) >= end => s,
                    _ => return None,
                };
                Some(TypeDesc::Struct { size, members })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A minimal BTF blob builder for layouts the test objects do not have.
    #[derive(Default)]
    struct B {
        types: Vec<u8>,
        strs: Vec<u8>,
    }

    impl B {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strs: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend_from_slice(name.as_bytes());
            self.strs.push(0);
            off
        }
        fn w(&mut self, v: u32) {
            self.types.extend_from_slice(&v.to_le_bytes());
        }
        fn head(&mut self, name: &str, k: u8, vlen: u32, kflag: bool, st: u32) {
            let n = self.s(name);
            self.w(n);
            self.w(vlen | (u32::from(k) << 24) | (u32::from(kflag) << 31));
            self.w(st);
        }
        fn int(&mut self, name: &str, size: u32, enc: u32, bits: u32) {
            self.head(name, kind::INT, 0, false, size);
            self.w((enc << 24) | bits);
        }
        fn composite(
            &mut self,
            k: u8,
            name: &str,
            size: u32,
            kflag: bool,
            ms: &[(&str, u32, u32)],
        ) {
            self.head(name, k, ms.len() as u32, kflag, size);
            for (n, ty, off) in ms {
                let n = self.s(n);
                self.w(n);
                self.w(*ty);
                self.w(*off);
            }
        }
        fn enm(&mut self, name: &str, size: u32, signed: bool, vs: &[(&str, i32)]) {
            self.head(name, kind::ENUM, vs.len() as u32, signed, size);
            for (n, v) in vs {
                let n = self.s(n);
                self.w(n);
                self.w(*v as u32);
            }
        }
        fn array(&mut self, elem: u32, idx: u32, n: u32) {
            self.head("", kind::ARRAY, 0, false, 0);
            self.w(elem);
            self.w(idx);
            self.w(n);
        }
        fn build(&self) -> Btf {
            let mut raw = Vec::new();
            raw.extend_from_slice(&0xeb9fu16.to_le_bytes());
            raw.push(1);
            raw.push(0);
            for v in [24u32, 0, self.types.len() as u32, self.types.len() as u32] {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            raw.extend_from_slice(&(self.strs.len() as u32).to_le_bytes());
            raw.extend_from_slice(&self.types);
            raw.extend_from_slice(&self.strs);
            Btf::parse(&raw).expect("test BTF parses")
        }
    }

    /// 1 int, 2 unsigned int, 3 _Bool, 4 enum state, 5 struct flags (kind_flag bitfields),
    /// 6 union, 7 unsigned char, 8 char, 9 char[6], 10 typedef u8, 11 struct with anon union,
    /// 12 volatile int, 13 const volatile int, 14 pointer, 15 u8[4].
    fn sample() -> Btf {
        let mut b = B::new();
        b.int("int", 4, 1, 32); // 1
        b.int("unsigned int", 4, 0, 32); // 2
        b.int("_Bool", 1, 4, 8); // 3
        b.enm("state", 4, true, &[("IDLE", 0), ("BUSY", 1), ("GONE", -1)]); // 4
        b.composite(
            kind::STRUCT,
            "flags",
            4,
            true,
            &[
                ("a", 2, 3 << 24),
                ("neg", 1, (4 << 24) | 3),
                ("on", 3, (1 << 24) | 7),
                ("st", 4, (2 << 24) | 8),
                ("rest", 2, (22 << 24) | 10),
            ],
        ); // 5
        b.composite(kind::UNION, "u", 4, false, &[("i", 1, 0), ("x", 2, 0)]); // 6
        b.int("unsigned char", 1, 0, 8); // 7
        b.int("char", 1, 1, 8); // 8
        b.array(8, 2, 6); // 9
        b.head("u8", kind::TYPEDEF, 0, false, 7); // 10
        b.composite(
            kind::STRUCT,
            "outer",
            16,
            false,
            &[("id", 2, 0), ("", 6, 32), ("name", 9, 64)],
        ); // 11
        b.head("", kind::VOLATILE, 0, false, 1); // 12
        b.head("", kind::CONST, 0, false, 12); // 13
        b.head("", kind::PTR, 0, false, 5); // 14
        b.array(10, 2, 4); // 15
        b.build()
    }

    #[test]
    fn btf_format_scalars() {
        let btf = sample();
        assert_eq!(
            format_value(&btf, 1, &(-5i32).to_le_bytes()),
            Some(json!(-5))
        );
        assert_eq!(
            format_value(&btf, 2, &u32::MAX.to_le_bytes()),
            Some(json!(u32::MAX))
        );
        assert_eq!(format_value(&btf, 3, &[1]), Some(json!(true)));
        assert_eq!(format_value(&btf, 3, &[0]), Some(json!(false)));
        assert_eq!(
            format_value(&btf, 4, &1u32.to_le_bytes()),
            Some(json!("BUSY"))
        );
        assert_eq!(
            format_value(&btf, 4, &(-1i32).to_le_bytes()),
            Some(json!("GONE"))
        );
        assert_eq!(format_value(&btf, 4, &9u32.to_le_bytes()), Some(json!(9)));
        assert_eq!(format_value(&btf, 13, &7i32.to_le_bytes()), Some(json!(7)));
        assert_eq!(
            format_value(&btf, 14, &0xdead_beefu64.to_le_bytes()),
            Some(json!(0xdead_beefu64))
        );
        assert_eq!(
            format_value(&btf, 15, &[1, 2, 3, 4]),
            Some(json!([1, 2, 3, 4]))
        );
        // Wrong sizes, void, bad ids.
        assert_eq!(format_value(&btf, 1, &[0; 3]), None);
        assert_eq!(format_value(&btf, 0, &[]), None);
        assert_eq!(format_value(&btf, 999, &[0; 4]), None);
    }

    #[test]
    fn btf_format_bitfields_unions_anon() {
        let btf = sample();
        // a=5 (3 bits), neg=-2 (4 bits at 3), on=1 (bit 7), st=GONE (2 bits at 8: 0b11 = -1),
        // rest=12345 (22 bits at 10).
        let v: u32 = 5 | (0b1110 << 3) | (1 << 7) | (0b11 << 8) | (12345 << 10);
        assert_eq!(
            format_value(&btf, 5, &v.to_le_bytes()),
            Some(json!({"a": 5, "neg": -2, "on": true, "st": "GONE", "rest": 12345}))
        );
        assert_eq!(
            format_value(&btf, 6, &(-1i32).to_le_bytes()),
            Some(json!({"i": -1, "x": u32::MAX}))
        );
        let mut bytes = vec![0u8; 16];
        bytes[..4].copy_from_slice(&7u32.to_le_bytes());
        bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        bytes[8..11].copy_from_slice(b"hey");
        let v = format_value(&btf, 11, &bytes).unwrap();
        assert_eq!(v, json!({"id": 7, "i": 3, "x": 3, "name": "hey"}));
        // Key order is the member order.
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["id", "i", "x", "name"]);
        // Non-printable bytes in a char array print as numbers.
        bytes[8..14].copy_from_slice(&[1, 2, 0, 0, 0, 0]);
        assert_eq!(
            format_value(&btf, 11, &bytes).unwrap()["name"],
            json!([1, 2, 0, 0, 0, 0])
        );
    }

    #[test]
    fn btf_format_desc_roundtrip_and_bad_descs() {
        let btf = sample();
        let d = describe(&btf, 11).unwrap();
        let text = serde_json::to_string(&d).unwrap();
        let back: TypeDesc = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
        // Hand-made (e.g. corrupted) descriptions never panic.
        let bad = TypeDesc::Struct {
            size: 4,
            members: vec![Field {
                name: "x".into(),
                bit_offset: 16,
                bitfield_size: 0,
                ty: TypeDesc::Ptr,
            }],
        };
        assert_eq!(bad.format(&[0; 4]), None);
        let bits = TypeDesc::Struct {
            size: 1,
            members: vec![Field {
                name: "x".into(),
                bit_offset: 7,
                bitfield_size: 60,
                ty: TypeDesc::Ptr,
            }],
        };
        assert_eq!(bits.format(&[0xff]), None);
        let huge = TypeDesc::Array {
            elem: Box::new(TypeDesc::Array {
                elem: Box::new(TypeDesc::Ptr),
                len: u32::MAX,
            }),
            len: u32::MAX,
        };
        assert_eq!(huge.size(), None);
        assert_eq!(huge.format(&[0; 8]), None);
        let empty = TypeDesc::Array {
            elem: Box::new(TypeDesc::Struct {
                size: 0,
                members: vec![],
            }),
            len: u32::MAX,
        };
        assert_eq!(empty.format(&[]), None);
    }

    #[test]
    fn btf_format_padding_and_old_style_bitfields() {
        let mut b = B::new();
        b.int("unsigned int", 4, 0, 32); // 1
        b.composite(
            kind::STRUCT,
            "padded",
            4,
            true,
            &[("", 1, 3 << 24), ("b", 1, (5 << 24) | 3)],
        ); // 2
        b.int("", 4, 0, 4); // 3: old-style 4-bit int
        b.composite(kind::STRUCT, "old", 4, false, &[("lo", 3, 0), ("hi", 3, 4)]); // 4
        let btf = b.build();
        assert_eq!(
            format_value(&btf, 2, &((0b10101u32 << 3) | 0b111).to_le_bytes()),
            Some(json!({"b": 0b10101}))
        );
        assert_eq!(
            format_value(&btf, 4, &0xa5u32.to_le_bytes()),
            Some(json!({"lo": 5, "hi": 10}))
        );
    }

    #[test]
    fn btf_format_malformed_btf() {
        // A struct containing itself by value, and a member past the struct's end.
        let mut b = B::new();
        b.composite(kind::STRUCT, "loop", 4, false, &[("self", 1, 0)]); // 1
        b.int("int", 4, 1, 32); // 2
        b.composite(kind::STRUCT, "short", 2, false, &[("x", 2, 0)]); // 3
        b.head("t", kind::TYPEDEF, 0, false, 4); // 4: typedef cycle
        let btf = b.build();
        assert_eq!(describe(&btf, 1), None);
        assert_eq!(describe(&btf, 3), None);
        assert_eq!(describe(&btf, 4), None);
    }
}
