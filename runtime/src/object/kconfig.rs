//! `__kconfig` externs: `extern int CONFIG_HZ __kconfig;`, `extern bool LINUX_HAS_BPF_COOKIE
//! __kconfig __weak;` and the like, laid out and valued as libbpf does
//! (`bpf_object__collect_externs`, `bpf_object__resolve_externs`): one read-only, frozen
//! global-data map named `.kconfig` whose bytes hold every extern the object's BTF declares in its
//! `.kconfig` DATASEC, ordered by alignment (descending), then size, then name; `CONFIG_*` values
//! from the running kernel's configuration, `LINUX_*` values computed (kernel version, bpf_cookie
//! and syscall-wrapper support). An extern that cannot be resolved is an error for the programs
//! that use it only; a `__weak` one that the configuration lacks is zero, as in libbpf.

use super::btf::{kind, Btf};
use bpftime_abi::btf::int_encoding;
use std::collections::{BTreeMap, HashMap};

/// The `.kconfig` section libbpf gives `__kconfig` externs (`SEC(".kconfig")`).
pub(super) const SECTION: &str = ".kconfig";

/// How libbpf classifies an extern's C type (`enum kcfg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KcfgType {
    Bool,
    /// A 1-byte integer (`char`): takes `y`/`n`/`m` as letters, or a number.
    Char {
        signed: bool,
    },
    Tristate,
    /// An integer of 2, 4 or 8 bytes.
    Int {
        signed: bool,
    },
    /// A `char[N]` string.
    CharArray,
}

/// `enum libbpf_tristate` values.
const TRI_NO: u64 = 0;
const TRI_YES: u64 = 1;
const TRI_MODULE: u64 = 2;

/// The `.kconfig` map of one object: its bytes and where each extern sits in them.
#[derive(Debug, Clone, Default)]
pub(super) struct KconfigLayout {
    /// The map's value (8-byte rounded, as libbpf sizes it).
    pub data: Vec<u8>,
    /// Per extern: its byte offset (every extern has a place, resolved or not, so the DATASEC
    /// handed to the kernel stays well-formed), and why it cannot be resolved if it cannot
    /// (the programs using it are refused with that reason).
    pub externs: HashMap<String, (u32, Result<(), String>)>,
    /// The DATASEC's BTF id (the map's value type).
    pub datasec: Option<u32>,
}

impl KconfigLayout {
    /// Lays out and values the `.kconfig` externs `btf` declares; `is_weak(name)` says whether
    /// the ELF symbol is `__weak`; `config()` gives the running kernel's configuration
    /// (`None`: unreadable, then every strong `CONFIG_*` extern is unresolved), asked for only
    /// when a `CONFIG_*` extern needs it (reading it may run `zcat`). `None` when the object
    /// declares no such extern.
    pub fn build<'c>(
        btf: &Btf,
        is_weak: impl Fn(&str) -> bool,
        config: impl Fn() -> Option<&'c BTreeMap<String, String>>,
    ) -> Option<Self> {
        let datasec = btf.find_by_name_kind(SECTION, kind::DATASEC)?;
        let sec = btf.type_by_id(datasec).ok()?;
        struct Ext {
            name: String,
            typ: Result<KcfgType, String>,
            size: u32,
            align: u32,
            weak: bool,
        }
        let mut exts = Vec::new();
        for m in &sec.members {
            let Ok(var) = btf.type_by_id(m.type_id) else {
                continue;
            };
            let Ok(name) = btf.str_at(var.name_off) else {
                continue;
            };
            let (typ, size, align) = match classify(btf, var.size_or_type) {
                Ok((t, size, align)) => (Ok(t), size, align),
                Err(e) => (Err(e), 0, 1),
            };
            exts.push(Ext {
                name: name.to_string(),
                typ,
                size,
                align,
                weak: is_weak(name),
            });
        }
        // libbpf's cmp_externs: alignment descending, size ascending, then the name.
        exts.sort_by(|a, b| {
            b.align
                .cmp(&a.align)
                .then(a.size.cmp(&b.size))
                .then(a.name.cmp(&b.name))
        });
        let mut off = 0u32;
        let mut placed = Vec::new();
        for e in &exts {
            off = off.next_multiple_of(e.align);
            placed.push(off);
            off += e.size;
        }
        let mut layout = KconfigLayout {
            data: vec![0; off.next_multiple_of(8) as usize],
            externs: HashMap::new(),
            datasec: Some(datasec),
        };
        for (e, &at) in exts.iter().zip(&placed) {
            let resolved = e.typ.clone().and_then(|t| {
                let slot = &mut layout.data[at as usize..(at + e.size) as usize];
                resolve(&e.name, t, slot, e.weak, &config)
            });
            if let Err(why) = &resolved {
                tracing::debug!(extern_name = %e.name, %why, "kconfig extern not resolved");
            }
            layout.externs.insert(e.name.clone(), (at, resolved));
        }
        Some(layout)
    }

    /// The byte offset of `name` in the map (for the DATASEC fix-up): resolved or not, each
    /// extern has a place.
    pub fn offset(&self, name: &str) -> Option<u32> {
        self.externs.get(name).map(|&(at, _)| at)
    }
}

/// libbpf's `find_kcfg_type`: the extern's kind, size and alignment.
fn classify(btf: &Btf, type_id: u32) -> Result<(KcfgType, u32, u32), String> {
    let id = btf
        .skip_mods_and_typedefs(type_id)
        .map_err(|e| e.to_string())?;
    let t = btf.type_by_id(id).map_err(|e| e.to_string())?;
    let unsupported = || "type is unsupported for a __kconfig extern".to_string();
    match t.kind {
        kind::INT => {
            let size = t.size_or_type;
            let enc = (t.extra >> 24) & 0x0f;
            let signed = enc & int_encoding::SIGNED != 0;
            let typ = match size {
                1 if enc & int_encoding::BOOL != 0 => KcfgType::Bool,
                _ if enc & int_encoding::BOOL != 0 => return Err(unsupported()),
                1 => KcfgType::Char { signed },
                2 | 4 | 8 => KcfgType::Int { signed },
                _ => return Err(unsupported()),
            };
            Ok((typ, size, size))
        }
        kind::ENUM => {
            let name = btf.str_at(t.name_off).unwrap_or("");
            if name != "libbpf_tristate" || t.size_or_type != 4 {
                return Err(unsupported());
            }
            Ok((KcfgType::Tristate, 4, 4))
        }
        kind::ARRAY => {
            let (elem, _, n) = t.array.ok_or_else(unsupported)?;
            let e = btf
                .skip_mods_and_typedefs(elem)
                .and_then(|e| btf.type_by_id(e))
                .map_err(|e| e.to_string())?;
            if e.kind != kind::INT || e.size_or_type != 1 || n == 0 {
                return Err(unsupported());
            }
            Ok((KcfgType::CharArray, n, 1))
        }
        _ => Err(unsupported()),
    }
}

/// libbpf's resolution of one extern into `slot` (zeroed).
fn resolve<'c>(
    name: &str,
    typ: KcfgType,
    slot: &mut [u8],
    weak: bool,
    config: &dyn Fn() -> Option<&'c BTreeMap<String, String>>,
) -> Result<(), String> {
    if name.starts_with("LINUX_") {
        let value = match name {
            "LINUX_KERNEL_VERSION" => u64::from(bpftime_abi::os::kernel_version_code()),
            // The attach cookie is served to every program, kernel-attached or ours.
            "LINUX_HAS_BPF_COOKIE" => 1,
            // x86_64 kernels since 4.17 wrap syscalls (`__x64_sys_*` with a pt_regs argument).
            "LINUX_HAS_SYSCALL_WRAPPER" => 1,
            _ if weak => return Ok(()),
            _ => return Err(format!("extern {name}: unrecognized virtual extern")),
        };
        return set_number(name, typ, slot, value);
    }
    if !name.starts_with("CONFIG_") {
        return Err(format!(
            "extern {name}: only CONFIG_* and LINUX_* externs are __kconfig"
        ));
    }
    let config = config();
    let Some(value) = config.and_then(|c| c.get(name)) else {
        return match (weak, config) {
            (true, _) => Ok(()),
            (false, None) => Err(format!(
                "extern {name} (strong): the kernel configuration is unreadable (neither \
                 /boot/config-$(uname -r) nor /proc/config.gz)"
            )),
            (false, Some(_)) => Err(format!(
                "extern {name} (strong): not set in the kernel configuration (declare it __weak \
                 to read 0)"
            )),
        };
    };
    match value.as_str() {
        v @ ("y" | "n" | "m") => set_tristate(name, typ, slot, v.as_bytes()[0]),
        v if v.starts_with('"') => set_string(name, typ, slot, v),
        v => {
            let n = parse_number(v)
                .ok_or_else(|| format!("extern {name}: cannot parse value {v:?}"))?;
            set_number(name, typ, slot, n)
        }
    }
}

/// libbpf's `set_kcfg_value_tri`.
fn set_tristate(name: &str, typ: KcfgType, slot: &mut [u8], v: u8) -> Result<(), String> {
    match typ {
        KcfgType::Bool if v == b'm' => Err(format!(
            "extern {name}: value 'm' implies a tristate or char type"
        )),
        KcfgType::Bool => {
            slot[0] = u8::from(v == b'y');
            Ok(())
        }
        KcfgType::Tristate => {
            let t = match v {
                b'y' => TRI_YES,
                b'm' => TRI_MODULE,
                _ => TRI_NO,
            };
            slot.copy_from_slice(&(t as u32).to_le_bytes());
            Ok(())
        }
        KcfgType::Char { .. } => {
            slot[0] = v;
            Ok(())
        }
        _ => Err(format!(
            "extern {name}: value '{}' needs a bool, tristate or char type",
            v as char
        )),
    }
}

/// libbpf's `set_kcfg_value_str`: a quoted string into a `char[N]`, truncated to N - 1 bytes.
fn set_string(name: &str, typ: KcfgType, slot: &mut [u8], v: &str) -> Result<(), String> {
    if typ != KcfgType::CharArray {
        return Err(format!("extern {name}: a string value needs a char array"));
    }
    let inner = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .ok_or_else(|| format!("extern {name}: unterminated string {v:?}"))?;
    let n = inner.len().min(slot.len() - 1);
    if n < inner.len() {
        tracing::warn!(extern_name = name, "kconfig string truncated to {n} bytes");
    }
    slot[..n].copy_from_slice(&inner.as_bytes()[..n]);
    Ok(())
}

/// libbpf's `set_kcfg_value_num`, with its range check.
fn set_number(name: &str, typ: KcfgType, slot: &mut [u8], v: u64) -> Result<(), String> {
    let size = slot.len();
    let fits = match typ {
        KcfgType::Bool => v <= 1,
        KcfgType::Tristate | KcfgType::CharArray => {
            return Err(format!("extern {name}: a number needs an integer type"))
        }
        KcfgType::Char { signed: false } | KcfgType::Int { signed: false } => {
            size == 8 || v >> (size * 8) == 0
        }
        KcfgType::Char { signed: true } | KcfgType::Int { signed: true } => {
            size == 8 || {
                let bits = size as u32 * 8;
                let s = v as i64;
                s >= -(1i64 << (bits - 1)) && s < (1i64 << (bits - 1))
            }
        }
    };
    if !fits {
        return Err(format!(
            "extern {name}: value {v} does not fit {size} bytes"
        ));
    }
    slot.copy_from_slice(&v.to_le_bytes()[..size]);
    Ok(())
}

/// `strtoull(v, 0)`: decimal, `0x` hex or leading-0 octal, with an optional minus sign.
fn parse_number(v: &str) -> Option<u64> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let n = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()?
    } else {
        v.parse().ok()?
    };
    Some(if neg { n.wrapping_neg() } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_strings_and_tristates_set_as_libbpf_sets_them() {
        let mut s = [0u8; 4];
        set_number("X", KcfgType::Int { signed: false }, &mut s, 250).unwrap();
        assert_eq!(u32::from_le_bytes(s), 250);
        let mut b = [0u8; 1];
        assert!(set_number("X", KcfgType::Int { signed: false }, &mut b, 256).is_err());
        assert!(set_number("X", KcfgType::Int { signed: true }, &mut b, 128).is_err());
        set_number("X", KcfgType::Int { signed: true }, &mut b, (-1i64) as u64).unwrap();
        assert_eq!(b[0], 0xff);
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("010"), Some(8));
        assert_eq!(parse_number("-3"), Some((-3i64) as u64));
        assert_eq!(parse_number("y"), None);
        let mut t = [0u8; 4];
        set_tristate("X", KcfgType::Tristate, &mut t, b'm').unwrap();
        assert_eq!(u32::from_le_bytes(t), 2);
        assert!(set_tristate("X", KcfgType::Bool, &mut b, b'm').is_err());
        set_tristate("X", KcfgType::Char { signed: true }, &mut b, b'y').unwrap();
        assert_eq!(b[0], b'y');
        let mut a = [0u8; 4];
        set_string("X", KcfgType::CharArray, &mut a, "\"hello\"").unwrap();
        assert_eq!(&a, b"hel\0");
        assert!(set_string("X", KcfgType::Int { signed: true }, &mut a, "\"a\"").is_err());
    }
}
