//! USDT probes as libbpf reads them (`usdt.c`): the `.note.stapsdt` notes of an ELF file
//! (`<sys/sdt.h>`'s `STAP_PROBE*` sites), each site's file offset and semaphore, and its
//! argument string (`-4@%eax 8@-16(%rbp) 4@$5`) turned into the `struct __bpf_usdt_spec` that
//! `usdt.bpf.h`'s `bpf_usdt_arg()` reads from the `__bpf_usdt_specs` map.
//!
//! The attach side (arming the sites, counting semaphores up and down, handing the spec id as
//! the cookie) uses these; nothing here touches a process.

use crate::regs::PtRegs;
use crate::symbols::{file_offset_of, target_in};
use crate::AttachError;
use goblin::elf::Elf;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};

/// `NT_STAPSDT`: the note type of a SystemTap SDT probe.
const NT_STAPSDT: u32 = 3;
/// The section holding the probes' notes, and the one whose address prelinking may move.
const NOTE_SECTION: &str = ".note.stapsdt";
const BASE_SECTION: &str = ".stapsdt.base";

/// `BPF_USDT_MAX_ARG_CNT` in `usdt.bpf.h`.
pub const MAX_ARGS: usize = 12;

/// The layouts of `struct __bpf_usdt_spec` that libbpf's `usdt.bpf.h` has had. Its user space
/// (libbpf's `usdt.c`, here: us) must write the one the object was compiled with, and they
/// differ in size, which the object's `__bpf_usdt_specs` map carries as its value size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecLayout {
    /// Before Scale-Index-Base arguments (libbpf 1.1, Debian 12's): 16-byte argument specs
    /// (`val_off`, a 4-byte `arg_type`, `reg_off` at 12, `arg_signed` at 14, `arg_bitshift`
    /// at 15); the cookie at 192, `arg_cnt` at 200; 208 bytes.
    Compact,
    /// With SIB arguments (libbpf 1.7): `arg_type` became an 8-bit bit-field followed by a
    /// 16-bit unit holding `idx_reg_off:12` and `scale_bitshift:4` (at 10, the bit-field
    /// cannot straddle its first unit) and an 8-bit reserved field, which moved `reg_off` to
    /// 14, `arg_signed` to 16, `arg_bitshift` to 17: 24-byte argument specs, the cookie at
    /// 288, `arg_cnt` at 296; 304 bytes.
    Sib,
}

impl SpecLayout {
    /// The layout of a spec map whose values are `value_size` bytes.
    pub fn of_value_size(value_size: u32) -> Option<Self> {
        match value_size {
            208 => Some(Self::Compact),
            304 => Some(Self::Sib),
            _ => None,
        }
    }

    /// `sizeof(struct __bpf_usdt_spec)`.
    pub fn size(self) -> usize {
        match self {
            Self::Compact => 208,
            Self::Sib => 304,
        }
    }

    fn arg_size(self) -> usize {
        match self {
            Self::Compact => 16,
            Self::Sib => 24,
        }
    }
}

/// Why a file's USDT notes or one site's arguments cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UsdtError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an ELF file goblin can parse.
    #[error("cannot parse ELF file {path}: {reason}")]
    Elf {
        /// The file.
        path: PathBuf,
        /// goblin's message.
        reason: String,
    },
    /// A note is malformed (truncated, or its address is in no loadable segment).
    #[error("{path}: USDT note {index}: {reason}")]
    Note {
        /// The file.
        path: PathBuf,
        /// The note's position in `.note.stapsdt`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A site's argument string uses a form libbpf does not accept either.
    #[error("USDT {provider}:{name}: argument {arg} `{text}`: {reason}")]
    Argument {
        /// The probe's provider.
        provider: String,
        /// The probe's name.
        name: String,
        /// 1-based argument number.
        arg: usize,
        /// The argument as written in the note.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// A `usdt/PATH:...` section names a file that is not there (searched as libbpf searches).
    #[error("USDT file {path} not found{searched}")]
    NotFound {
        /// The path as the section names it.
        path: String,
        /// Where it was looked for, when it is a bare name.
        searched: String,
    },
    /// The file has no site of the probe.
    #[error("{path} has no USDT probe {provider}:{name}")]
    NoProbe {
        /// The file.
        path: PathBuf,
        /// The probe's provider.
        provider: String,
        /// The probe's name.
        name: String,
    },
    /// A semaphore cannot be counted in this process.
    #[error("USDT semaphore at {address:#x}: {reason}")]
    Semaphore {
        /// Its address in this process.
        address: u64,
        /// What is wrong.
        reason: String,
    },
}

/// One USDT site of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsdtSite {
    /// The probe's provider (`STAP_PROBE(provider, name)`).
    pub provider: String,
    /// The probe's name.
    pub name: String,
    /// The site's virtual address in the file (after the `.stapsdt.base` prelink adjustment).
    pub address: u64,
    /// The site's offset in the file: what a uprobe on it is attached at.
    pub file_offset: u64,
    /// The semaphore's virtual address and file offset, when the probe has one (the program
    /// guards its argument set-up with `if (provider_name_semaphore)`).
    pub semaphore: Option<(u64, u64)>,
    /// The argument string as the note holds it.
    pub args: String,
}

/// How `bpf_usdt_arg()` finds an argument (`enum __bpf_usdt_arg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// A constant (`$5`): `val_off` is the value.
    Const,
    /// A register (`%eax`): `reg_off` selects it in `pt_regs`.
    Reg,
    /// Memory at a register plus `val_off` (`-16(%rbp)`), read with `bpf_probe_read_user`.
    RegDeref,
    /// Memory at a base register (`reg_off`) plus an index register shifted left by
    /// `scale_bitshift` plus `val_off` (`-96(%rbp,%rax,8)`): only [`SpecLayout::Sib`] holds it.
    Sib {
        /// The index register's offset in `struct pt_regs`.
        idx_reg_off: u16,
        /// log2 of the scale (1, 2, 4 or 8).
        scale_bitshift: u8,
    },
}

/// One argument's spec (`struct __bpf_usdt_arg_spec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsdtArg {
    /// Where the value is.
    pub kind: ArgKind,
    /// The constant, or the offset added to the register.
    pub val_off: u64,
    /// The register's offset in `struct pt_regs`.
    pub reg_off: u16,
    /// Sign-extend the value (a negative size, `-4@...`).
    pub signed: bool,
    /// `64 - 8 * size`: the bits to clear (or sign-extend) above the argument.
    pub bitshift: u8,
}

/// The USDT sites of the ELF file at `path`, in note order.
pub fn read_sites(path: &Path) -> Result<Vec<UsdtSite>, UsdtError> {
    let bytes = std::fs::read(path).map_err(|source| UsdtError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sites_of(path, &bytes)
}

/// [`read_sites`] on a file's bytes.
pub fn sites_of(path: &Path, bytes: &[u8]) -> Result<Vec<UsdtSite>, UsdtError> {
    let elf = Elf::parse(bytes).map_err(|e| UsdtError::Elf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let section = |name: &str| {
        elf.section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(name))
    };
    let Some(notes) = section(NOTE_SECTION) else {
        return Ok(Vec::new());
    };
    let base = section(BASE_SECTION).map(|s| s.sh_addr);
    let data = usize::try_from(notes.sh_offset)
        .ok()
        .zip(usize::try_from(notes.sh_size).ok())
        .and_then(|(off, len)| bytes.get(off..off.checked_add(len)?))
        .ok_or_else(|| UsdtError::Elf {
            path: path.to_path_buf(),
            reason: format!("{NOTE_SECTION} lies outside the file"),
        })?;
    let err = |index: usize, reason: String| UsdtError::Note {
        path: path.to_path_buf(),
        index,
        reason,
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
    };
    let mut sites = Vec::new();
    let mut at = 0usize;
    let mut index = 0;
    while at + 12 <= data.len() {
        let (namesz, descsz, typ) = match (u32_at(at), u32_at(at + 4), u32_at(at + 8)) {
            (Some(a), Some(b), Some(c)) => (a as usize, b as usize, c),
            _ => break,
        };
        let owner_at = at + 12;
        let desc_at = owner_at + namesz.next_multiple_of(4);
        let next = desc_at + descsz.next_multiple_of(4);
        let (Some(owner), Some(desc)) = (
            data.get(owner_at..owner_at + namesz),
            data.get(desc_at..desc_at + descsz),
        ) else {
            return Err(err(index, "truncated note".into()));
        };
        at = next;
        if typ != NT_STAPSDT || owner.split(|&b| b == 0).next() != Some(b"stapsdt") {
            continue;
        }
        if desc.len() < 24 {
            return Err(err(
                index,
                "descriptor shorter than its three addresses".into(),
            ));
        }
        let word = |i: usize| u64::from_le_bytes(desc[i * 8..i * 8 + 8].try_into().unwrap());
        let (loc, note_base, sema) = (word(0), word(1), word(2));
        let mut strings = desc[24..].split(|&b| b == 0);
        let mut text = || String::from_utf8_lossy(strings.next().unwrap_or_default()).into_owned();
        let (provider, name, args) = (text(), text(), text());
        // libbpf: a prelinked file moved `.stapsdt.base`; the note recorded the old address.
        let address = match base {
            Some(b) if note_base != 0 => loc.wrapping_add(b.wrapping_sub(note_base)),
            _ => loc,
        };
        let file_offset = file_offset_of(&elf, address)
            .filter(|&(_, exec)| exec)
            .map(|(off, _)| off)
            .ok_or_else(|| {
                err(
                    index,
                    format!("{provider}:{name}: address {address:#x} is in no executable segment"),
                )
            })?;
        let semaphore = if sema == 0 {
            None
        } else {
            let (off, _) = file_offset_of(&elf, sema).ok_or_else(|| {
                err(
                    index,
                    format!("{provider}:{name}: semaphore {sema:#x} is in no file-backed loadable segment"),
                )
            })?;
            Some((sema, off))
        };
        sites.push(UsdtSite {
            provider,
            name,
            address,
            file_offset,
            semaphore,
            args,
        });
        index += 1;
    }
    Ok(sites)
}

/// libbpf's `parse_usdt_arg` for x86-64: each space-separated `[-]SIZE@OPERAND` of a site's
/// argument string, `OPERAND` being `%reg`, `OFF(%reg)`, `(%reg)` or `$CONST`.
pub fn parse_args(site: &UsdtSite) -> Result<Vec<UsdtArg>, UsdtError> {
    let words: Vec<&str> = site.args.split_whitespace().collect();
    let bad = |arg: usize, text: &str, reason: String| UsdtError::Argument {
        provider: site.provider.clone(),
        name: site.name.clone(),
        arg,
        text: text.to_string(),
        reason,
    };
    if words.len() > MAX_ARGS {
        return Err(bad(
            MAX_ARGS + 1,
            words[MAX_ARGS],
            format!("more than {MAX_ARGS} arguments (usdt.bpf.h's BPF_USDT_MAX_ARG_CNT)"),
        ));
    }
    words
        .iter()
        .enumerate()
        .map(|(i, w)| parse_arg(w).map_err(|reason| bad(i + 1, w, reason)))
        .collect()
}

fn parse_arg(word: &str) -> Result<UsdtArg, String> {
    let (size, operand) = word
        .split_once('@')
        .ok_or_else(|| "no SIZE@ prefix".to_string())?;
    let size: i64 = size
        .parse()
        .map_err(|_| format!("size `{size}` is not a number"))?;
    let bytes = size.unsigned_abs();
    if !matches!(bytes, 1 | 2 | 4 | 8) {
        return Err(format!("size {size} is not 1, 2, 4 or 8 bytes"));
    }
    let spec = |kind, val_off, reg_off| UsdtArg {
        kind,
        val_off,
        reg_off,
        signed: size < 0,
        bitshift: (64 - 8 * bytes) as u8,
    };
    if let Some(c) = operand.strip_prefix('$') {
        return Ok(spec(ArgKind::Const, parse_int(c)?, 0));
    }
    if let Some(reg) = operand.strip_prefix('%') {
        return Ok(spec(ArgKind::Reg, 0, reg_offset(reg)?));
    }
    let (off, rest) = operand
        .split_once('(')
        .ok_or_else(|| format!("operand `{operand}` is not %reg, OFF(%reg) or $CONST"))?;
    let inside = rest
        .strip_suffix(')')
        .ok_or_else(|| format!("operand `{operand}` does not end in `)`"))?;
    let off = if off.is_empty() { 0 } else { parse_int(off)? };
    let reg = |r: &str| {
        r.trim()
            .strip_prefix('%')
            .ok_or_else(|| format!("`{r}` in `{operand}` is not a %register"))
            .and_then(reg_offset)
    };
    let parts: Vec<&str> = inside.split(',').collect();
    match parts[..] {
        [base] => Ok(spec(ArgKind::RegDeref, off, reg(base)?)),
        // Scale-Index-Base, as libbpf 1.7 reads it: `OFF(%base,%index[,scale])`.
        [base, index] | [base, index, _] => {
            let scale = match parts.get(2) {
                None => 1,
                Some(s) => s
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| format!("scale `{s}` is not a number"))?,
            };
            let scale_bitshift = match scale {
                1 => 0,
                2 => 1,
                4 => 2,
                8 => 3,
                _ => return Err(format!("scale {scale} is not 1, 2, 4 or 8")),
            };
            let kind = ArgKind::Sib {
                idx_reg_off: reg(index)?,
                scale_bitshift,
            };
            Ok(spec(kind, off, reg(base)?))
        }
        _ => Err(format!("operand `{operand}` has more than three parts")),
    }
}

/// A decimal or `0x` number, possibly negative, as a two's-complement u64.
fn parse_int(s: &str) -> Result<u64, String> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    let v = match digits.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => digits.parse(),
    }
    .map_err(|_| format!("`{s}` is not a number"))?;
    Ok(if neg { v.wrapping_neg() } else { v })
}

/// The offset in `struct pt_regs` of a register named in any of its widths (`rax`, `eax`,
/// `ax`, `al`; `r8`..`r15` with `d`/`w`/`b` suffixes), as libbpf's `calc_pt_regs_off`.
fn reg_offset(name: &str) -> Result<u16, String> {
    use std::mem::offset_of;
    let off = match name {
        "rip" | "eip" => offset_of!(PtRegs, rip),
        "rax" | "eax" | "ax" | "al" => offset_of!(PtRegs, rax),
        "rbx" | "ebx" | "bx" | "bl" => offset_of!(PtRegs, rbx),
        "rcx" | "ecx" | "cx" | "cl" => offset_of!(PtRegs, rcx),
        "rdx" | "edx" | "dx" | "dl" => offset_of!(PtRegs, rdx),
        "rsi" | "esi" | "si" | "sil" => offset_of!(PtRegs, rsi),
        "rdi" | "edi" | "di" | "dil" => offset_of!(PtRegs, rdi),
        "rbp" | "ebp" | "bp" | "bpl" => offset_of!(PtRegs, rbp),
        "rsp" | "esp" | "sp" | "spl" => offset_of!(PtRegs, rsp),
        _ => {
            let n = name
                .strip_prefix('r')
                .map(|r| r.trim_end_matches(['d', 'w', 'b']))
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| (8..=15).contains(n))
                .ok_or_else(|| format!("unknown register %{name}"))?;
            match n {
                8 => offset_of!(PtRegs, r8),
                9 => offset_of!(PtRegs, r9),
                10 => offset_of!(PtRegs, r10),
                11 => offset_of!(PtRegs, r11),
                12 => offset_of!(PtRegs, r12),
                13 => offset_of!(PtRegs, r13),
                14 => offset_of!(PtRegs, r14),
                _ => offset_of!(PtRegs, r15),
            }
        }
    };
    Ok(off as u16)
}

/// The file a `usdt/PATH:PROVIDER:NAME` section names, found as libbpf's `resolve_full_path`
/// finds it: a path with a `/` as it is; a bare library name (`libc.so.6`) in
/// `LD_LIBRARY_PATH`, `/usr/lib64`, `/usr/lib` and the architecture's library directory; a
/// bare program name in `PATH`, `/usr/bin` and `/usr/sbin`.
pub fn resolve_path(path: &str) -> Result<PathBuf, UsdtError> {
    if path.contains('/') {
        let p = PathBuf::from(path);
        return if p.exists() {
            Ok(p)
        } else {
            Err(UsdtError::NotFound {
                path: path.to_string(),
                searched: String::new(),
            })
        };
    }
    let library = path.ends_with(".so") || path.contains(".so.");
    let env = std::env::var(if library { "LD_LIBRARY_PATH" } else { "PATH" }).unwrap_or_default();
    let fixed = if library {
        "/usr/lib64:/usr/lib:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"
    } else {
        "/usr/bin:/usr/sbin"
    };
    let dirs: Vec<&str> = env
        .split(':')
        .chain(fixed.split(':'))
        .filter(|d| !d.is_empty())
        .collect();
    dirs.iter()
        .map(|d| Path::new(d).join(path))
        .find(|p| p.is_file())
        .ok_or_else(|| UsdtError::NotFound {
            path: path.to_string(),
            searched: format!(" in {}", dirs.join(":")),
        })
}

/// One `usdt/PATH:PROVIDER:NAME` program of an object, as [`plan`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct UsdtProbe<'a> {
    /// The program's index in its object.
    pub program: usize,
    /// `PATH` as the section names it.
    pub path: &'a str,
    /// `PROVIDER`.
    pub provider: &'a str,
    /// `NAME`.
    pub name: &'a str,
}

/// One site a USDT program is armed at.
#[derive(Debug)]
pub struct PlannedSite {
    /// The file holding the site, resolved ([`resolve_path`]).
    pub file: PathBuf,
    /// The site.
    pub site: UsdtSite,
    /// Its index in the object's `__bpf_usdt_specs`, and the attach cookie `usdt.bpf.h` finds
    /// the spec by (`bpf_get_attach_cookie`, as libbpf attaches where BPF cookies exist).
    pub spec_id: u32,
    /// `PATH:FUNC+OFF` of the site, as the hooks take a target.
    pub target: Result<String, AttachError>,
    /// The site's arguments, for the `struct __bpf_usdt_spec` at `spec_id` ([`spec_value`]).
    pub args: Result<Vec<UsdtArg>, UsdtError>,
}

/// Every site of `probes`, in program order and, within a program, in note order, each with
/// its spec id: a running index over that order. It depends only on the object and the files,
/// so every process arming the object writes the same spec at the same id of the shared spec
/// map. One entry per probe: its sites, or why it has none.
pub fn plan(probes: &[UsdtProbe<'_>]) -> Vec<Result<Vec<PlannedSite>, UsdtError>> {
    let mut next_id = 0u32;
    let mut files: std::collections::HashMap<PathBuf, Vec<u8>> = Default::default();
    probes
        .iter()
        .map(|p| {
            let file = resolve_path(p.path)?;
            if !files.contains_key(&file) {
                let bytes = std::fs::read(&file).map_err(|source| UsdtError::Io {
                    path: file.clone(),
                    source,
                })?;
                files.insert(file.clone(), bytes);
            }
            let bytes = &files[&file];
            let elf = Elf::parse(bytes).map_err(|e| UsdtError::Elf {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            let sites: Vec<PlannedSite> = sites_of(&file, bytes)?
                .into_iter()
                .filter(|s| s.provider == p.provider && s.name == p.name)
                .map(|site| {
                    let spec_id = next_id;
                    next_id += 1;
                    PlannedSite {
                        target: target_in(&file, &elf, site.file_offset),
                        args: parse_args(&site),
                        file: file.clone(),
                        site,
                        spec_id,
                    }
                })
                .collect();
            if sites.is_empty() {
                return Err(UsdtError::NoProbe {
                    path: file,
                    provider: p.provider.to_string(),
                    name: p.name.to_string(),
                });
            }
            Ok(sites)
        })
        .collect()
}

/// A USDT semaphore this process counted up: `<sys/sdt.h>` guards a probe's argument set-up
/// with `if (provider_name_semaphore)`, and the kernel adds one per attached uprobe
/// (`uprobe_register` with a `ref_ctr_offset`) and takes it off again on detach.
#[derive(Debug)]
pub struct Semaphore {
    address: u64,
}

impl Semaphore {
    /// Adds one to the `unsigned short` at `address`.
    ///
    /// # Safety
    /// `address` must be a writable mapping of this process (the semaphore's file offset in
    /// its module's writable mapping, [`crate::symbols::Resolver::writable_address`]).
    pub unsafe fn raise(address: u64) -> Result<Self, UsdtError> {
        if !address.is_multiple_of(2) {
            return Err(UsdtError::Semaphore {
                address,
                reason: "not aligned to 2 bytes".into(),
            });
        }
        // SAFETY: the caller's contract: a writable, aligned u16 of this process; the
        // target's own code only reads it.
        unsafe { &*(address as *const AtomicU16) }.fetch_add(1, Ordering::Relaxed);
        Ok(Self { address })
    }

    /// Where the semaphore is.
    pub fn address(&self) -> u64 {
        self.address
    }

    /// Takes the count added by [`Self::raise`] off again.
    ///
    /// # Safety
    /// The mapping `raise` counted in must still be there (the module was not unloaded).
    pub unsafe fn lower(self) {
        // SAFETY: the caller's contract; `raise` checked the alignment.
        unsafe { &*(self.address as *const AtomicU16) }.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `struct __bpf_usdt_spec` value for a site's arguments and the attach's cookie
/// (`usdt_cookie`, what `bpf_usdt_cookie()` returns), in `layout`; a SIB argument has no place
/// in the compact layout (the object's `usdt.bpf.h` cannot read one: libbpf of that header
/// refuses the site too).
pub fn spec_value(args: &[UsdtArg], cookie: u64, layout: SpecLayout) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; layout.size()];
    let stride = layout.arg_size();
    for (i, a) in args.iter().take(MAX_ARGS).enumerate() {
        let at = i * stride;
        v[at..at + 8].copy_from_slice(&a.val_off.to_le_bytes());
        let kind: u8 = match a.kind {
            ArgKind::Const => 0,
            ArgKind::Reg => 1,
            ArgKind::RegDeref => 2,
            ArgKind::Sib { .. } => 3,
        };
        // The 4-byte enum (compact) or the 8-bit bit-field (SIB) at 8: little-endian either way.
        v[at + 8] = kind;
        let fields = match (layout, a.kind) {
            (SpecLayout::Compact, ArgKind::Sib { .. }) => {
                return Err(format!(
                    "argument {} uses Scale-Index-Base addressing, which this object's usdt.bpf.h \
                     predates (rebuild it with libbpf 1.7's headers)",
                    i + 1
                ))
            }
            (SpecLayout::Compact, _) => at + 12,
            (SpecLayout::Sib, kind) => {
                if let ArgKind::Sib {
                    idx_reg_off,
                    scale_bitshift,
                } = kind
                {
                    let unit = (idx_reg_off & 0xfff) | (u16::from(scale_bitshift) << 12);
                    v[at + 10..at + 12].copy_from_slice(&unit.to_le_bytes());
                }
                at + 14
            }
        };
        v[fields..fields + 2].copy_from_slice(&a.reg_off.to_le_bytes());
        v[fields + 2] = u8::from(a.signed);
        v[fields + 3] = a.bitshift;
    }
    let cookie_at = MAX_ARGS * stride;
    v[cookie_at..cookie_at + 8].copy_from_slice(&cookie.to_le_bytes());
    v[cookie_at + 8..cookie_at + 10]
        .copy_from_slice(&(args.len().min(MAX_ARGS) as u16).to_le_bytes());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(args: &str) -> UsdtSite {
        UsdtSite {
            provider: "p".into(),
            name: "n".into(),
            address: 0,
            file_offset: 0,
            semaphore: None,
            args: args.into(),
        }
    }

    #[test]
    fn files_without_notes_have_no_sites_and_non_elf_files_are_named() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(read_sites(&exe).unwrap(), Vec::new());
        let e = sites_of(Path::new("junk.bin"), b"not an ELF file").unwrap_err();
        assert!(
            e.to_string().starts_with("cannot parse ELF file junk.bin"),
            "{e}"
        );
        let e = read_sites(Path::new("/nonexistent/victim")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/victim"), "{e}");
    }

    #[test]
    fn argument_strings_parse_as_libbpf_parses_them() {
        let args = parse_args(&site(
            "-4@%eax 8@-16(%rbp) 4@$5 1@(%r12) 2@%r9w 8@0x10(%rsp)",
        ))
        .unwrap();
        let regs = |f: usize| f as u16;
        assert_eq!(
            args[0],
            UsdtArg {
                kind: ArgKind::Reg,
                val_off: 0,
                reg_off: regs(std::mem::offset_of!(PtRegs, rax)),
                signed: true,
                bitshift: 32
            }
        );
        assert_eq!(args[1].kind, ArgKind::RegDeref);
        assert_eq!(args[1].val_off, (-16i64) as u64);
        assert_eq!(args[1].reg_off, 32, "rbp is pt_regs' fifth word");
        assert_eq!((args[2].kind, args[2].val_off), (ArgKind::Const, 5));
        assert_eq!((args[3].val_off, args[3].bitshift), (0, 56));
        assert_eq!(args[4].reg_off, 64, "r9");
        assert_eq!((args[5].val_off, args[5].reg_off), (16, 152));
        for bad in [
            "3@%eax",
            "4@%xyz",
            "4%eax",
            "8@8(%rax,%rbx,3)",
            "8@(rax)",
            "8@(%rax,%rbx,2,1)",
        ] {
            let e = parse_args(&site(bad)).unwrap_err().to_string();
            assert!(e.contains(bad), "the error quotes the argument: {e}");
        }
        let spec = spec_value(&args, 0xabc, SpecLayout::Compact).unwrap();
        assert_eq!(spec.len(), 208);
        assert_eq!(
            u64::from_le_bytes(spec[192..200].try_into().unwrap()),
            0xabc
        );
        assert_eq!(u16::from_le_bytes(spec[200..202].try_into().unwrap()), 6);
        assert_eq!(u32::from_le_bytes(spec[24..28].try_into().unwrap()), 2);
        let wide = spec_value(&args, 0xabc, SpecLayout::Sib).unwrap();
        assert_eq!(wide.len(), 304);
        assert_eq!(
            u64::from_le_bytes(wide[288..296].try_into().unwrap()),
            0xabc
        );
        assert_eq!(u16::from_le_bytes(wide[296..298].try_into().unwrap()), 6);
        assert_eq!(wide[24 + 8], 2, "the second argument's arg_type");
        assert_eq!(
            u16::from_le_bytes(wide[24 + 14..24 + 16].try_into().unwrap()),
            32,
            "its reg_off (rbp)"
        );
    }

    #[test]
    fn scale_index_base_arguments_parse_and_need_the_sib_layout() {
        let args = parse_args(&site("-1@-96(%rbp,%rax,8) 4@(%rdi,%rsi) 8@8(%rsp,%r9,2)")).unwrap();
        let off = |f: usize| f as u16;
        assert_eq!(
            args[0],
            UsdtArg {
                kind: ArgKind::Sib {
                    idx_reg_off: off(std::mem::offset_of!(PtRegs, rax)),
                    scale_bitshift: 3
                },
                val_off: (-96i64) as u64,
                reg_off: off(std::mem::offset_of!(PtRegs, rbp)),
                signed: true,
                bitshift: 56
            }
        );
        assert_eq!(
            args[1].kind,
            ArgKind::Sib {
                idx_reg_off: off(std::mem::offset_of!(PtRegs, rsi)),
                scale_bitshift: 0
            }
        );
        let e = spec_value(&args, 0, SpecLayout::Compact).unwrap_err();
        assert!(
            e.contains("argument 1") && e.contains("Scale-Index-Base"),
            "{e}"
        );
        let v = spec_value(&args, 0, SpecLayout::Sib).unwrap();
        assert_eq!(v[8], 3, "BPF_USDT_ARG_SIB");
        let unit = u16::from_le_bytes(v[10..12].try_into().unwrap());
        assert_eq!(
            (unit & 0xfff, unit >> 12),
            (80, 3),
            "idx_reg_off rax, scale 8"
        );
        assert_eq!(u16::from_le_bytes(v[14..16].try_into().unwrap()), 32);
        assert_eq!((v[16], v[17]), (1, 56));
        assert_eq!(SpecLayout::of_value_size(304), Some(SpecLayout::Sib));
        assert_eq!(SpecLayout::of_value_size(208), Some(SpecLayout::Compact));
        assert_eq!(SpecLayout::of_value_size(200), None);
    }
}
