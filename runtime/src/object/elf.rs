//! The ELF side of the loader: sections, symbols, relocations, maps and bpf-to-bpf linking.

use std::collections::HashMap;
use std::sync::Arc;

use goblin::elf::{header, section_header as sh, sym, Elf};

use super::btf::{fixup_for_kernel, kind, Btf, BtfError, BtfExt, ExtRecord};
use super::co_re::{self, CoreRelocation};
use super::insn;
use super::kconfig::{self, KconfigLayout};
use super::section::parse_section;
use super::{
    BpfObject, CallReloc, FunctionInfo, GlobalVar, LineInfo, MapOrigin, MapReloc, MapRelocKind,
    MapSpec, ObjectError, Pinning, ProgramSpec, RawInsn, SkippedProgram, BPF_F_RDONLY_PROG,
    BPF_PSEUDO_CALL, BPF_PSEUDO_FUNC, BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE,
};

/// Upper bound on a linked program (the kernel's limit is 1M verified instructions).
const MAX_LINKED_INSNS: usize = 1 << 20;
/// `struct bpf_map_def` in the legacy `maps` section: type, key_size, value_size, max_entries,
/// map_flags (later fields, if any, are ignored).
const LEGACY_MAP_DEF_SIZE: usize = 20;

struct Section<'a> {
    name: String,
    data: &'a [u8],
    size: u64,
    exec: bool,
}

struct Symbol {
    name: String,
    shndx: usize,
    value: u64,
    size: u64,
    typ: u8,
    /// `STB_WEAK` (`__weak`): an unresolved extern reads 0 instead of refusing the program.
    weak: bool,
    /// `STV_HIDDEN` (`__hidden`): not visible outside the object.
    hidden: bool,
}

#[derive(Clone, Copy)]
struct Reloc {
    sym: usize,
}

/// A function inside an executable section, in instruction units.
#[derive(Clone)]
struct Func {
    name: String,
    start: usize,
    len: usize,
}

/// An executable section after CO-RE relocation.
struct CodeSection {
    insns: Vec<RawInsn>,
    funcs: Vec<Func>,
    core: Vec<CoreRelocation>,
}

/// What a relocation's symbol refers to.
enum Target {
    Code,
    Map(usize),
    DataMap(usize),
    /// A `__kconfig` extern: its offset in the `.kconfig` map, or why it is unresolved.
    Kconfig(usize, Result<u32, String>),
    Undefined,
    Other,
}

struct Ctx<'a> {
    file: &'a str,
    sections: Vec<Section<'a>>,
    symbols: Vec<Symbol>,
    relocs: HashMap<usize, HashMap<usize, Reloc>>,
    code: HashMap<usize, Result<CodeSection, ObjectError>>,
    /// Map index by symbol name in `.maps`, and by (section, offset) in legacy `maps`.
    btf_map_by_name: HashMap<String, usize>,
    legacy_map_by_off: HashMap<(usize, u64), usize>,
    /// Byte offset of the `values` field in a BTF map's definition, by map name.
    values_field: HashMap<String, u32>,
    data_map_by_sec: HashMap<usize, usize>,
    /// The `.kconfig` map's index and layout, when the object declares `__kconfig` externs.
    kconfig: Option<(usize, KconfigLayout)>,
    ext: Option<BtfExt>,
}

impl Ctx<'_> {
    fn sec_name(&self, idx: usize) -> &str {
        self.sections
            .get(idx)
            .map(|s| s.name.as_str())
            .unwrap_or("?")
    }

    fn section_err(&self, sec: usize, reason: impl Into<String>) -> ObjectError {
        ObjectError::Section {
            file: self.file.to_string(),
            section: self.sec_name(sec).to_string(),
            reason: reason.into(),
        }
    }

    fn insn_err(&self, sec: usize, insn: usize, reason: impl Into<String>) -> ObjectError {
        ObjectError::Insn {
            file: self.file.to_string(),
            section: self.sec_name(sec).to_string(),
            insn,
            reason: reason.into(),
        }
    }
}

fn object_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = base.strip_suffix(".o").unwrap_or(base);
    base.strip_suffix(".bpf").unwrap_or(base).to_string()
}

pub(super) fn parse(file: &str, bytes: &[u8]) -> Result<BpfObject, ObjectError> {
    let elf_err = |reason: String| ObjectError::Elf {
        file: file.to_string(),
        reason,
    };
    let elf = Elf::parse(bytes).map_err(|e| elf_err(e.to_string()))?;
    if elf.header.e_machine != header::EM_BPF {
        return Err(elf_err(format!(
            "e_machine is {} (not EM_BPF {})",
            elf.header.e_machine,
            header::EM_BPF
        )));
    }
    if !elf.is_64 || !elf.little_endian {
        return Err(elf_err(
            "only 64-bit little-endian BPF objects are supported".into(),
        ));
    }

    let mut sections = Vec::with_capacity(elf.section_headers.len());
    for (i, h) in elf.section_headers.iter().enumerate() {
        let name = elf.shdr_strtab.get_at(h.sh_name).unwrap_or("").to_string();
        let data: &[u8] = if h.sh_type == sh::SHT_NOBITS || h.sh_type == sh::SHT_NULL {
            &[]
        } else {
            let start = usize::try_from(h.sh_offset).ok();
            let end = start.and_then(|s| s.checked_add(usize::try_from(h.sh_size).ok()?));
            match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() => &bytes[s..e],
                _ => {
                    return Err(ObjectError::Section {
                        file: file.to_string(),
                        section: if name.is_empty() {
                            format!("#{i}")
                        } else {
                            name
                        },
                        reason: "section data extends past the end of the file".into(),
                    })
                }
            }
        };
        sections.push(Section {
            exec: h.sh_type == sh::SHT_PROGBITS && h.sh_flags & u64::from(sh::SHF_EXECINSTR) != 0,
            size: h.sh_size,
            name,
            data,
        });
    }

    let symbols: Vec<Symbol> = elf
        .syms
        .iter()
        .map(|s| Symbol {
            name: elf.strtab.get_at(s.st_name).unwrap_or("").to_string(),
            shndx: s.st_shndx,
            value: s.st_value,
            size: s.st_size,
            typ: s.st_type(),
            weak: s.st_bind() == sym::STB_WEAK,
            hidden: s.st_other & 0x3 == sym::STV_HIDDEN,
        })
        .collect();

    let mut relocs: HashMap<usize, HashMap<usize, Reloc>> = HashMap::new();
    let mut maps_relocs: Vec<(u64, usize)> = Vec::new();
    for (ridx, rs) in &elf.shdr_relocs {
        let target = elf
            .section_headers
            .get(*ridx)
            .map(|h| h.sh_info as usize)
            .unwrap_or(usize::MAX);
        if sections.get(target).is_some_and(|s| s.name == ".maps") {
            // `.values = { [i] = &inner }` of maps of maps: slot i holds the map the symbol
            // names (resolved with the maps, below).
            maps_relocs.extend(rs.iter().map(|r| (r.r_offset, r.r_sym)));
            continue;
        }
        if !sections.get(target).map(|s| s.exec).unwrap_or(false) {
            // Relocations of debug info, .BTF, .BTF.ext: not needed.
            continue;
        }
        let entry = relocs.entry(target).or_default();
        for r in rs.iter() {
            if r.r_offset % 8 != 0 {
                return Err(ObjectError::Insn {
                    file: file.to_string(),
                    section: sections[target].name.clone(),
                    insn: (r.r_offset / 8) as usize,
                    reason: format!("relocation offset {:#x} is not 8-byte aligned", r.r_offset),
                });
            }
            if r.r_sym >= symbols.len() {
                return Err(ObjectError::Insn {
                    file: file.to_string(),
                    section: sections[target].name.clone(),
                    insn: (r.r_offset / 8) as usize,
                    reason: format!("relocation refers to missing symbol #{}", r.r_sym),
                });
            }
            entry.insert((r.r_offset / 8) as usize, Reloc { sym: r.r_sym });
        }
    }

    let find = |n: &str| sections.iter().position(|s| s.name == n);
    let license = find("license")
        .map(|i| {
            let d = sections[i].data;
            let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
            String::from_utf8_lossy(&d[..end]).into_owned()
        })
        .unwrap_or_default();
    let kernel_version = find("version")
        .and_then(|i| sections[i].data.get(..4))
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);

    let btf: Option<Result<Btf, BtfError>> = find(".BTF").map(|i| Btf::parse(sections[i].data));
    let btf_err = |source: BtfError, section: &str| ObjectError::Btf {
        file: file.to_string(),
        section: section.to_string(),
        source,
    };
    let ext = match (find(".BTF.ext"), btf.as_ref()) {
        (Some(i), Some(Ok(b))) => {
            Some(BtfExt::parse(sections[i].data, b).map_err(|e| btf_err(e, ".BTF.ext"))?)
        }
        _ => None,
    };

    let mut ctx = Ctx {
        file,
        sections,
        symbols,
        relocs,
        code: HashMap::new(),
        btf_map_by_name: HashMap::new(),
        legacy_map_by_off: HashMap::new(),
        values_field: HashMap::new(),
        data_map_by_sec: HashMap::new(),
        kconfig: None,
        ext,
    };

    // Maps, in libbpf's order.
    let mut maps = Vec::new();
    if let Some(i) = ctx.sections.iter().position(|s| s.name == "maps") {
        legacy_maps(&mut ctx, i, &mut maps)?;
    }
    if let Some(i) = ctx.sections.iter().position(|s| s.name == ".maps") {
        let b = match btf.as_ref() {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(btf_err(e.clone(), ".BTF")),
            None => return Err(ctx.section_err(i, "BTF-defined maps need a .BTF section")),
        };
        btf_maps(&mut ctx, b, &mut maps)?;
        init_slots(&ctx, i, &maps_relocs, &mut maps)?;
    }
    for (i, s) in ctx.sections.iter().enumerate() {
        if s.exec || s.size == 0 || !is_data_section(&s.name) {
            continue;
        }
        let value_size = u32::try_from(s.size)
            .map_err(|_| ctx.section_err(i, "global-data section larger than 4 GiB"))?;
        let readonly = s.name.starts_with(".rodata");
        let bss = s.name.starts_with(".bss");
        let btf_value_type_id = match btf.as_ref() {
            Some(Ok(b)) => b.find_by_name_kind(&s.name, kind::DATASEC),
            _ => None,
        };
        ctx.data_map_by_sec.insert(i, maps.len());
        maps.push(MapSpec {
            initial_data: if bss { None } else { Some(s.data.to_vec()) },
            btf_value_type_id,
            ..MapSpec::new(
                s.name.clone(),
                MapOrigin::GlobalData {
                    section: s.name.clone(),
                },
                // Global-data sections become one-element arrays, as in libbpf.
                bpftime_abi::MapType::Array.as_raw(),
                (4, value_size, 1),
                if readonly { BPF_F_RDONLY_PROG } else { 0 },
            )
        });
    }

    // `__kconfig` externs: one more read-only global-data map, as libbpf adds.
    if let Some(Ok(b)) = btf.as_ref() {
        let symbols = &ctx.symbols;
        let is_weak = |name: &str| {
            symbols
                .iter()
                .any(|s| s.name == name && s.shndx == sh::SHN_UNDEF as usize && s.weak)
        };
        if let Some(layout) = KconfigLayout::build(b, is_weak, bpftime_abi::os::kernel_config) {
            if !layout.data.is_empty() {
                maps.push(MapSpec {
                    initial_data: Some(layout.data.clone()),
                    btf_value_type_id: layout.datasec,
                    ..MapSpec::new(
                        kconfig::SECTION,
                        MapOrigin::GlobalData {
                            section: kconfig::SECTION.to_string(),
                        },
                        bpftime_abi::MapType::Array.as_raw(),
                        (4, layout.data.len() as u32, 1),
                        BPF_F_RDONLY_PROG,
                    )
                });
                ctx.kconfig = Some((maps.len() - 1, layout));
            }
        }
    }

    // CO-RE relocations per executable section, against the running kernel's BTF.
    for i in 0..ctx.sections.len() {
        if ctx.sections[i].exec {
            let cs = code_section(&ctx, i, btf.as_ref());
            ctx.code.insert(i, cs);
        }
    }

    // Programs: every function symbol of every executable section except .text.
    let mut programs = Vec::new();
    let mut skipped = Vec::new();
    for i in 0..ctx.sections.len() {
        if !ctx.sections[i].exec || ctx.sections[i].name == ".text" {
            continue;
        }
        let funcs = match &ctx.code[&i] {
            Ok(cs) => cs.funcs.clone(),
            Err(e) => {
                skipped.push(SkippedProgram {
                    name: ctx.sections[i].name.clone(),
                    section: ctx.sections[i].name.clone(),
                    error: e.clone(),
                });
                continue;
            }
        };
        for f in funcs {
            match link(&ctx, i, &f) {
                Ok(p) => programs.push(p),
                Err(error) => skipped.push(SkippedProgram {
                    name: f.name.clone(),
                    section: ctx.sections[i].name.clone(),
                    error,
                }),
            }
        }
    }
    for s in &skipped {
        tracing::warn!(program = %s.name, section = %s.section, error = %s.error, "program skipped");
    }

    let (btf, kernel_btf) = match btf {
        Some(Ok(b)) => {
            let fixed = fixup_for_kernel(
                &b,
                |name| match &ctx.kconfig {
                    Some((_, k)) if name == kconfig::SECTION => Some(k.data.len() as u32),
                    _ => ctx
                        .sections
                        .iter()
                        .find(|s| s.name == name)
                        .and_then(|s| u32::try_from(s.size).ok()),
                },
                |var| {
                    ctx.kconfig
                        .as_ref()
                        .and_then(|(_, k)| k.offset(var))
                        .or_else(|| {
                            ctx.symbols
                                .iter()
                                .find(|s| s.name == var && s.typ == sym::STT_OBJECT)
                                .and_then(|s| u32::try_from(s.value).ok())
                        })
                },
                |func| {
                    ctx.symbols
                        .iter()
                        .any(|s| s.name == func && s.typ == sym::STT_FUNC && s.hidden)
                },
            );
            (Some(Arc::new(b)), Some(Arc::new(fixed)))
        }
        Some(Err(e)) => {
            tracing::warn!(file, error = %e, "ignoring malformed .BTF");
            (None, None)
        }
        None => (None, None),
    };

    let globals = ctx
        .symbols
        .iter()
        .filter(|s| s.typ == sym::STT_OBJECT && !s.name.is_empty() && !s.name.starts_with('.'))
        .filter_map(|s| {
            let map = *ctx.data_map_by_sec.get(&s.shndx)?;
            let (offset, size) = (u32::try_from(s.value).ok()?, u32::try_from(s.size).ok()?);
            (u64::from(offset) + u64::from(size) <= u64::from(maps[map].value_size)).then(|| {
                GlobalVar {
                    name: s.name.clone(),
                    map,
                    offset,
                    size,
                }
            })
        })
        .collect();
    Ok(BpfObject {
        name: object_name(file),
        programs,
        skipped,
        maps,
        license,
        kernel_version,
        btf,
        kernel_btf,
        globals,
    })
}

fn is_data_section(name: &str) -> bool {
    [".rodata", ".data", ".bss"].iter().any(|p| {
        name == *p
            || name
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

fn legacy_maps(ctx: &mut Ctx, sec: usize, maps: &mut Vec<MapSpec>) -> Result<(), ObjectError> {
    let data = ctx.sections[sec].data;
    let mut syms: Vec<(String, u64)> = ctx
        .symbols
        .iter()
        .filter(|s| s.shndx == sec && s.typ != sym::STT_SECTION && !s.name.is_empty())
        .map(|s| (s.name.clone(), s.value))
        .collect();
    syms.sort_by_key(|s| s.1);
    if syms.is_empty() {
        if data.is_empty() {
            return Ok(());
        }
        return Err(ctx.section_err(sec, "legacy maps section has no map symbols"));
    }
    if !data.len().is_multiple_of(syms.len()) || data.len() / syms.len() < LEGACY_MAP_DEF_SIZE {
        return Err(ctx.section_err(
            sec,
            format!(
                "legacy maps section of {} bytes does not hold {} struct bpf_map_def",
                data.len(),
                syms.len()
            ),
        ));
    }
    for (name, off) in syms {
        let at = usize::try_from(off).unwrap_or(usize::MAX);
        let def = at
            .checked_add(LEGACY_MAP_DEF_SIZE)
            .and_then(|end| data.get(at..end))
            .ok_or_else(|| ObjectError::Map {
                file: ctx.file.to_string(),
                map: name.clone(),
                reason: format!("definition at offset {off} is outside the maps section"),
            })?;
        let w = |k: usize| u32::from_le_bytes([def[k], def[k + 1], def[k + 2], def[k + 3]]);
        ctx.legacy_map_by_off.insert((sec, off), maps.len());
        maps.push(MapSpec::new(
            name,
            MapOrigin::LegacyMaps,
            w(0),
            (w(4), w(8), w(12)),
            w(16),
        ));
    }
    Ok(())
}

fn btf_maps(ctx: &mut Ctx, btf: &Btf, maps: &mut Vec<MapSpec>) -> Result<(), ObjectError> {
    let file = ctx.file.to_string();
    let map_err = |map: &str, reason: String| ObjectError::Map {
        file: file.clone(),
        map: map.to_string(),
        reason,
    };
    let Some(ds) = btf.find_by_name_kind(".maps", kind::DATASEC) else {
        return Err(ObjectError::Btf {
            file: file.clone(),
            section: ".maps".into(),
            source: BtfError::BadTypeId(0),
        });
    };
    let ds_t = btf
        .type_by_id(ds)
        .map_err(|e| map_err(".maps", e.to_string()))?;
    for m in ds_t.members.clone() {
        let var = btf
            .type_by_id(m.type_id)
            .map_err(|e| map_err(".maps", e.to_string()))?;
        let name = btf
            .str_at(var.name_off)
            .map_err(|e| map_err(".maps", e.to_string()))?
            .to_string();
        if var.kind != kind::VAR {
            return Err(map_err(&name, "entry of .maps is not a variable".into()));
        }
        let e = |x: BtfError| map_err(&name, x.to_string());
        let def_id = btf.skip_mods_and_typedefs(var.size_or_type).map_err(e)?;
        let (spec, values_at) = btf_map_def(btf, def_id, &name, &map_err)?;
        if let Some(at) = values_at {
            ctx.values_field.insert(name.clone(), at);
        }
        ctx.btf_map_by_name.insert(name, maps.len());
        maps.push(spec);
    }
    Ok(())
}

/// A map of maps' initial slots from the `.maps` section's relocations, as libbpf's
/// `bpf_object__collect_map_relos`: a relocation at byte `values + 8 * i` of a map's
/// definition stores the map its symbol names in slot `i`.
fn init_slots(
    ctx: &Ctx,
    sec: usize,
    relocs: &[(u64, usize)],
    maps: &mut [MapSpec],
) -> Result<(), ObjectError> {
    for &(offset, sym) in relocs {
        let err = |map: &str, reason: String| ObjectError::Map {
            file: ctx.file.to_string(),
            map: map.to_string(),
            reason,
        };
        let Some(target) = ctx.symbols.get(sym) else {
            return Err(err(
                ".maps",
                format!("relocation at {offset:#x} refers to missing symbol #{sym}"),
            ));
        };
        // The map whose definition holds the relocated pointer.
        let Some((outer, start)) = ctx
            .symbols
            .iter()
            .filter(|s| s.shndx == sec && s.typ != sym::STT_SECTION && s.value <= offset)
            .filter(|s| offset < s.value.saturating_add(s.size.max(1)))
            .map(|s| (s.name.as_str(), s.value))
            .next()
        else {
            return Err(err(
                ".maps",
                format!("relocation at {offset:#x} is in no map definition"),
            ));
        };
        let Some(&outer_idx) = ctx.btf_map_by_name.get(outer) else {
            return Err(err(
                outer,
                "relocation in a map that .BTF does not define".into(),
            ));
        };
        let Some(&values) = ctx.values_field.get(outer) else {
            return Err(err(
                outer,
                "relocation outside the map's `values` field".into(),
            ));
        };
        let Some(field_off) = (offset - start).checked_sub(u64::from(values)) else {
            return Err(err(
                outer,
                "relocation before the map's `values` field".into(),
            ));
        };
        if field_off % 8 != 0 {
            return Err(err(
                outer,
                format!("misaligned `values` slot at byte {field_off}"),
            ));
        }
        let slot = u32::try_from(field_off / 8).map_err(|_| {
            err(
                outer,
                format!("`values` slot at byte {field_off} is too far"),
            )
        })?;
        if maps[outer_idx].inner.is_none() {
            // A PROG_ARRAY's program slots (see btf_map_def).
            continue;
        }
        let Some(&inner_idx) = ctx.btf_map_by_name.get(&target.name) else {
            return Err(err(
                outer,
                format!(
                    "slot {slot} names {}, which is not a map of .maps",
                    target.name
                ),
            ));
        };
        if slot >= maps[outer_idx].max_entries {
            return Err(err(
                outer,
                format!(
                    "slot {slot} (= {}) is beyond max_entries {}",
                    target.name, maps[outer_idx].max_entries
                ),
            ));
        }
        maps[outer_idx].init_slots.push((slot, inner_idx));
    }
    Ok(())
}

/// One BTF-defined map definition (the struct `def_id`), as libbpf's `parse_btf_map_def`
/// reads it; also the byte offset of its `values` field when it has one (where `.rel.maps`
/// places a map of maps' initial slots). A map of maps' `__array(values, struct {...})` is
/// its inner-map template, parsed the same way.
fn btf_map_def(
    btf: &Btf,
    def_id: u32,
    name: &str,
    map_err: &dyn Fn(&str, String) -> ObjectError,
) -> Result<(MapSpec, Option<u32>), ObjectError> {
    let e = |x: BtfError| map_err(name, x.to_string());
    let def = btf.type_by_id(def_id).map_err(e)?;
    if def.kind != kind::STRUCT {
        return Err(map_err(name, "map definition is not a struct".into()));
    }
    let name = name.to_string();
    let mut values_at = None;
    let mut spec = MapSpec::new(name.clone(), MapOrigin::BtfMaps, 0, (0, 0, 0), 0);
    let mut have_type = false;
    for f in &def.members {
        let fname = btf.str_at(f.name_off).map_err(e)?;
        // `__uint(name, N)` is `int (*name)[N]`; `__type(name, T)` is `T *name`.
        let pointee = || -> Result<u32, ObjectError> {
            let p = btf.skip_mods_and_typedefs(f.type_id).map_err(e)?;
            let pt = btf.type_by_id(p).map_err(e)?;
            if pt.kind != kind::PTR {
                return Err(map_err(&name, format!("field {fname} is not a pointer")));
            }
            Ok(pt.size_or_type)
        };
        let uint = || -> Result<u32, ObjectError> {
            let arr = btf.type_by_id(pointee()?).map_err(e)?;
            match arr.array {
                Some((_, _, n)) if arr.kind == kind::ARRAY => Ok(n),
                _ => Err(map_err(
                    &name,
                    format!("field {fname} is not __uint(...) (pointer to array)"),
                )),
            }
        };
        match fname {
            "type" => {
                spec.map_type = uint()?;
                have_type = true;
            }
            "max_entries" => spec.max_entries = uint()?,
            "map_flags" => spec.flags = uint()?,
            "numa_node" => spec.numa_node = uint()?,
            "key_size" => spec.key_size = uint()?,
            "value_size" => spec.value_size = uint()?,
            "map_extra" => spec.map_extra = uint()? as u64,
            "pinning" => {
                spec.pinning = match uint()? {
                    0 => Pinning::None,
                    1 => Pinning::ByName,
                    n => Pinning::Other(n),
                }
            }
            "key" | "value" => {
                let t = pointee()?;
                let size = btf.resolve_size(t).map_err(e)?;
                let size = u32::try_from(size)
                    .map_err(|_| map_err(&name, format!("{fname} type is too large")))?;
                if fname == "key" {
                    spec.key_size = size;
                    spec.btf_key_type_id = Some(t);
                } else {
                    spec.value_size = size;
                    spec.btf_value_type_id = Some(t);
                }
            }
            "values" => {
                // `__array(values, T)` is `T *values[]`: an array of pointers, no elements.
                let arr = btf
                    .type_by_id(btf.skip_mods_and_typedefs(f.type_id).map_err(e)?)
                    .map_err(e)?;
                let not_array = || {
                    map_err(
                        &name,
                        "field values is not __array(values, ...) (an array of pointers with no \
                     elements)"
                            .into(),
                    )
                };
                let Some((elem, _, 0)) = arr.array.filter(|_| arr.kind == kind::ARRAY) else {
                    return Err(not_array());
                };
                let ptr = btf
                    .type_by_id(btf.skip_mods_and_typedefs(elem).map_err(e)?)
                    .map_err(e)?;
                if ptr.kind != kind::PTR {
                    return Err(not_array());
                }
                let target = btf.skip_mods_and_typedefs(ptr.size_or_type).map_err(e)?;
                values_at = Some(f.offset / 8);
                match btf.type_by_id(target).map_err(e)?.kind {
                    kind::STRUCT => {
                        let inner_name = format!("{name}.inner");
                        let (inner, nested) = btf_map_def(btf, target, &inner_name, map_err)?;
                        if nested.is_some() || inner.inner.is_some() {
                            return Err(map_err(
                                &name,
                                "the inner map of a map of maps cannot be a map of maps with \
                             values"
                                    .into(),
                            ));
                        }
                        spec.inner = Some(Box::new(inner));
                    }
                    // A PROG_ARRAY's `.values = { [i] = &prog }`: tail-call slots are set by
                    // user space in bpftime-rs.
                    kind::FUNC_PROTO => {
                        tracing::debug!(map = %name, "ignoring initial program slots")
                    }
                    _ => return Err(not_array()),
                }
            }
            other => tracing::debug!(map = %name, field = other, "ignoring unknown map field"),
        }
    }
    if !have_type {
        return Err(map_err(&name, "map definition has no `type`".into()));
    }
    if bpftime_abi::MapType::from_raw(spec.map_type).is_some_and(|t| t.is_map_of_maps()) {
        // libbpf's rules: the template comes from `values`; values are 4-byte map references.
        if spec.inner.is_none() {
            return Err(map_err(
                &name,
                "a map of maps needs __array(values, struct { ... }) to declare its inner map"
                    .into(),
            ));
        }
        if spec.value_size != 0 && spec.value_size != 4 {
            return Err(map_err(
                &name,
                format!(
                    "a map of maps holds 4-byte map references, not {}-byte values",
                    spec.value_size
                ),
            ));
        }
        spec.value_size = 4;
    } else if spec.inner.is_some() {
        return Err(map_err(
            &name,
            "an inner map template (__array(values, struct { ... })) on a map that is not a \
             map of maps"
                .into(),
        ));
    }
    Ok((spec, values_at))
}

/// Reads one executable section, finds its functions and applies its CO-RE relocations.
fn code_section(
    ctx: &Ctx,
    sec: usize,
    btf: Option<&Result<Btf, BtfError>>,
) -> Result<CodeSection, ObjectError> {
    let s = &ctx.sections[sec];
    if !s.data.len().is_multiple_of(8) {
        return Err(ctx.section_err(
            sec,
            format!("code size {} is not a multiple of 8", s.data.len()),
        ));
    }
    let mut insns: Vec<RawInsn> = s
        .data
        .chunks_exact(8)
        .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
        .collect();
    let n = insns.len();
    let mut funcs: Vec<Func> = ctx
        .symbols
        .iter()
        .filter(|x| x.shndx == sec && x.typ == sym::STT_FUNC)
        .map(|x| Func {
            name: x.name.clone(),
            start: (x.value / 8) as usize,
            len: (x.size / 8) as usize,
        })
        .collect();
    funcs.sort_by_key(|f| f.start);
    funcs.dedup_by_key(|f| f.start);
    for k in 0..funcs.len() {
        let f = &funcs[k];
        let next = funcs.get(k + 1).map(|g| g.start).unwrap_or(n);
        if f.start >= n || f.start.saturating_add(f.len) > n {
            return Err(ctx.insn_err(
                sec,
                f.start,
                format!("function {} extends past the section end", f.name),
            ));
        }
        if f.len == 0 {
            funcs[k].len = next - funcs[k].start;
        }
    }
    if funcs.is_empty() && n > 0 {
        funcs.push(Func {
            name: s.name.clone(),
            start: 0,
            len: n,
        });
    }

    let records: Vec<&ExtRecord> = ctx
        .ext
        .as_ref()
        .map(|x| {
            x.core_relos
                .iter()
                .filter(|r| r.section == s.name)
                .collect()
        })
        .unwrap_or_default();
    let mut core = Vec::new();
    if !records.is_empty() {
        let local = match btf {
            Some(Ok(b)) => b,
            _ => return Err(ctx.section_err(sec, "CO-RE relocations without a valid .BTF")),
        };
        let target = Btf::vmlinux().map_err(|source| ObjectError::Btf {
            file: ctx.file.to_string(),
            section: s.name.clone(),
            source,
        })?;
        core = co_re::relocate_section(&mut insns, &records, local, target)
            .map_err(|e| ctx.insn_err(sec, e.insn_index, format!("CO-RE: {}", e.reason)))?;
    }
    Ok(CodeSection { insns, funcs, core })
}

/// A function copied into the linked program.
struct Placed {
    sec: usize,
    start: usize,
    len: usize,
    dst: usize,
    name: String,
}

/// Links one program: copies its function, then appends every subprogram it reaches through
/// calls or callback references (like libbpf), fixing call offsets and resolving map references.
fn link(ctx: &Ctx, sec: usize, func: &Func) -> Result<ProgramSpec, ObjectError> {
    let section = ctx.sections[sec].name.clone();
    let info = parse_section(&section);
    let mut out: Vec<RawInsn> = Vec::new();
    let mut placed: Vec<Placed> = Vec::new();
    let mut map_relocs = Vec::new();
    let mut call_relocs = Vec::new();

    // Places the function of `tsec` containing `tidx` (if not yet placed) and returns where
    // `tidx` ended up.
    let ensure = |out: &mut Vec<RawInsn>,
                  placed: &mut Vec<Placed>,
                  from_sec: usize,
                  from_idx: usize,
                  tsec: usize,
                  tidx: i64|
     -> Result<usize, ObjectError> {
        let cs = match ctx.code.get(&tsec) {
            Some(Ok(cs)) => cs,
            Some(Err(e)) => return Err(e.clone()),
            None => {
                return Err(ctx.insn_err(
                    from_sec,
                    from_idx,
                    format!("call target is in non-code section {}", ctx.sec_name(tsec)),
                ))
            }
        };
        if tidx < 0 || tidx as usize >= cs.insns.len() {
            return Err(ctx.insn_err(
                from_sec,
                from_idx,
                format!(
                    "call target {tidx} is outside section {} ({} instructions)",
                    ctx.sec_name(tsec),
                    cs.insns.len()
                ),
            ));
        }
        let tidx = tidx as usize;
        let f = cs
            .funcs
            .iter()
            .find(|f| tidx >= f.start && tidx < f.start + f.len)
            .ok_or_else(|| {
                ctx.insn_err(from_sec, from_idx, "call target is not inside any function")
            })?;
        if let Some(p) = placed.iter().find(|p| p.sec == tsec && p.start == f.start) {
            return Ok(p.dst + (tidx - f.start));
        }
        let dst = out.len();
        if dst + f.len > MAX_LINKED_INSNS {
            return Err(ctx.insn_err(from_sec, from_idx, "linked program is too large"));
        }
        out.extend_from_slice(&cs.insns[f.start..f.start + f.len]);
        placed.push(Placed {
            sec: tsec,
            start: f.start,
            len: f.len,
            dst,
            name: f.name.clone(),
        });
        Ok(dst + (tidx - f.start))
    };

    ensure(
        &mut out,
        &mut placed,
        sec,
        func.start,
        sec,
        func.start as i64,
    )?;
    let mut pi = 0;
    while pi < placed.len() {
        let (psec, pstart, plen, pdst) = {
            let p = &placed[pi];
            (p.sec, p.start, p.len, p.dst)
        };
        let relocs = ctx.relocs.get(&psec);
        let mut k = 0;
        while k < plen {
            let src_idx = pstart + k;
            let pos = pdst + k;
            let i = out[pos];
            let is_lddw = insn::opc(&i) == 0x18;
            if is_lddw && k + 1 >= plen {
                return Err(ctx.insn_err(psec, src_idx, "lddw without its second half"));
            }
            let reloc = relocs.and_then(|r| r.get(&src_idx)).copied();
            if insn::opc(&i) == 0x85 && insn::src(&i) == BPF_PSEUDO_CALL {
                let imm = insn::imm(&i) as i64;
                let (tsec, tidx) = match reloc {
                    Some(r) => {
                        let s = &ctx.symbols[r.sym];
                        if s.shndx == sh::SHN_UNDEF as usize {
                            return Err(ctx.insn_err(
                                psec,
                                src_idx,
                                format!(
                                    "call to extern function {} (kfunc) is not supported",
                                    s.name
                                ),
                            ));
                        }
                        (s.shndx, (s.value / 8) as i64 + imm + 1)
                    }
                    None => (psec, src_idx as i64 + imm + 1),
                };
                let target = ensure(&mut out, &mut placed, psec, src_idx, tsec, tidx)?;
                let rel = target as i64 - (pos as i64 + 1);
                insn::set_imm(&mut out[pos], rel as i32);
                call_relocs.push(CallReloc {
                    insn_index: pos,
                    target,
                    is_callback: false,
                });
            } else if let Some(r) = reloc {
                let s = &ctx.symbols[r.sym];
                if !is_lddw {
                    return Err(ctx.insn_err(
                        psec,
                        src_idx,
                        format!(
                            "relocation against {} on an instruction (opcode {:#04x}) that is \
                             neither lddw nor call",
                            s.name,
                            insn::opc(&i)
                        ),
                    ));
                }
                let imm = insn::imm(&i) as i64;
                match classify(ctx, s) {
                    Target::Code => {
                        let byte = (s.value as i64).wrapping_add(imm);
                        if byte % 8 != 0 {
                            return Err(ctx.insn_err(
                                psec,
                                src_idx,
                                "callback address is not instruction-aligned",
                            ));
                        }
                        let target =
                            ensure(&mut out, &mut placed, psec, src_idx, s.shndx, byte / 8)?;
                        insn::set_src(&mut out[pos], BPF_PSEUDO_FUNC);
                        insn::set_imm(&mut out[pos], (target as i64 - (pos as i64 + 1)) as i32);
                        insn::set_imm(&mut out[pos + 1], 0);
                        call_relocs.push(CallReloc {
                            insn_index: pos,
                            target,
                            is_callback: true,
                        });
                    }
                    Target::Map(map_index) => {
                        insn::set_src(&mut out[pos], BPF_PSEUDO_MAP_IDX);
                        insn::set_imm(&mut out[pos], map_index as i32);
                        insn::set_imm(&mut out[pos + 1], 0);
                        map_relocs.push(MapReloc {
                            insn_index: pos,
                            map_index,
                            kind: MapRelocKind::Map,
                        });
                    }
                    Target::DataMap(map_index) => {
                        let base = if s.typ == sym::STT_SECTION {
                            0
                        } else {
                            s.value
                        };
                        let offset =
                            u32::try_from((base as i64).wrapping_add(imm)).map_err(|_| {
                                ctx.insn_err(psec, src_idx, "global variable offset out of range")
                            })?;
                        map_relocs.push(point_at_value(&mut out, pos, map_index, offset));
                    }
                    Target::Kconfig(map_index, resolved) => {
                        let base = resolved.map_err(|why| ctx.insn_err(psec, src_idx, why))?;
                        let offset =
                            u32::try_from(i64::from(base).wrapping_add(imm)).map_err(|_| {
                                ctx.insn_err(psec, src_idx, "kconfig offset out of range")
                            })?;
                        map_relocs.push(point_at_value(&mut out, pos, map_index, offset));
                    }
                    Target::Undefined => {
                        return Err(ctx.insn_err(
                            psec,
                            src_idx,
                            format!(
                                "extern symbol {} is not supported (only __kconfig externs \
                                 are; __ksym kernel symbols have no meaning in user space)",
                                s.name
                            ),
                        ))
                    }
                    Target::Other => {
                        return Err(ctx.insn_err(
                            psec,
                            src_idx,
                            format!(
                                "relocation against {} in section {}, which is neither code, \
                                 a map nor global data",
                                s.name,
                                ctx.sec_name(s.shndx)
                            ),
                        ))
                    }
                }
            }
            k += if is_lddw { 2 } else { 1 };
        }
        pi += 1;
    }

    // Remap BTF.ext records and CO-RE results from section offsets to linked offsets.
    let mut functions = Vec::new();
    let mut line_info = Vec::new();
    let mut core_relocations = Vec::new();
    for p in &placed {
        let sname = ctx.sec_name(p.sec);
        let in_range = |r: &ExtRecord| {
            r.section == sname
                && (r.insn_off / 8) as usize >= p.start
                && ((r.insn_off / 8) as usize) < p.start + p.len
        };
        let btf_type_id = ctx.ext.as_ref().and_then(|x| {
            x.func_info
                .iter()
                .find(|r| r.section == sname && (r.insn_off / 8) as usize == p.start)
                .map(|r| r.a)
        });
        functions.push(FunctionInfo {
            name: p.name.clone(),
            start: p.dst,
            len: p.len,
            btf_type_id,
        });
        if let Some(x) = &ctx.ext {
            for r in x.line_info.iter().filter(|r| in_range(r)) {
                line_info.push(LineInfo {
                    insn_index: p.dst + (r.insn_off / 8) as usize - p.start,
                    file_name_off: r.a,
                    line_off: r.b,
                    line_col: r.c,
                });
            }
        }
        if let Some(Ok(cs)) = ctx.code.get(&p.sec) {
            for c in &cs.core {
                if c.insn_index >= p.start && c.insn_index < p.start + p.len {
                    let mut c = c.clone();
                    c.insn_index = p.dst + c.insn_index - p.start;
                    core_relocations.push(c);
                }
            }
        }
    }
    line_info.sort_by_key(|l| l.insn_index);

    Ok(ProgramSpec {
        name: func.name.clone(),
        section,
        kind: info.kind,
        kernel_prog_type: info.kernel_prog_type,
        expected_attach_type: info.expected_attach_type,
        prog_flags: info.prog_flags,
        attach: info.attach,
        insns: out,
        map_relocs,
        call_relocs,
        functions,
        line_info,
        core_relocations,
    })
}

/// Makes the `lddw` at `pos` load the address of byte `offset` of map `map_index`'s value
/// (`BPF_PSEUDO_MAP_IDX_VALUE`: global data and `__kconfig` externs), and records it.
fn point_at_value(out: &mut [RawInsn], pos: usize, map_index: usize, offset: u32) -> MapReloc {
    insn::set_src(&mut out[pos], BPF_PSEUDO_MAP_IDX_VALUE);
    insn::set_imm(&mut out[pos], map_index as i32);
    insn::set_imm(&mut out[pos + 1], offset as i32);
    MapReloc {
        insn_index: pos,
        map_index,
        kind: MapRelocKind::Value { offset },
    }
}

fn classify(ctx: &Ctx, s: &Symbol) -> Target {
    if s.shndx == sh::SHN_UNDEF as usize {
        return match &ctx.kconfig {
            Some((map, k)) => match k.externs.get(&s.name) {
                Some((at, resolved)) => Target::Kconfig(*map, resolved.clone().map(|()| *at)),
                None => Target::Undefined,
            },
            None => Target::Undefined,
        };
    }
    let Some(sec) = ctx.sections.get(s.shndx) else {
        return Target::Other;
    };
    if sec.exec {
        return Target::Code;
    }
    match sec.name.as_str() {
        ".maps" => ctx
            .btf_map_by_name
            .get(&s.name)
            .map(|&i| Target::Map(i))
            .unwrap_or(Target::Other),
        "maps" => ctx
            .legacy_map_by_off
            .get(&(s.shndx, s.value))
            .map(|&i| Target::Map(i))
            .unwrap_or(Target::Other),
        _ => ctx
            .data_map_by_sec
            .get(&s.shndx)
            .map(|&i| Target::DataMap(i))
            .unwrap_or(Target::Other),
    }
}
