//! USDT probes as libbpf reads them (`usdt.c`): the `.note.stapsdt` notes of an ELF file
//! (`<sys/sdt.h>`'s `STAP_PROBE*` sites), each site's file offset and semaphore, and its
//! argument string (`-4@%eax 8@-16(%rbp) 4@$5`) turned into the `struct __bpf_usdt_spec` that
//! `usdt.bpf.h`'s `bpf_usdt_arg()` reads from the `__bpf_usdt_specs` map.
//!
//! The attach side (arming the sites, counting semaphores up and down, handing the spec id as
//! the cookie) uses these; nothing here touches a process.

use crate::regs::PtRegs;
use crate::symbols::file_offset_of;
use goblin::elf::Elf;
use std::path::{Path, PathBuf};

/// `NT_STAPSDT`: the note type of a SystemTap SDT probe.
const NT_STAPSDT: u32 = 3;
/// The section holding the probes' notes, and the one whose address prelinking may move.
const NOTE_SECTION: &str = ".note.stapsdt";
const BASE_SECTION: &str = ".stapsdt.base";

/// `BPF_USDT_MAX_ARG_CNT` in `usdt.bpf.h`.
pub const MAX_ARGS: usize = 12;
/// `sizeof(struct __bpf_usdt_spec)`: 12 argument specs of 16 bytes, the cookie, the count.
pub const SPEC_SIZE: usize = 208;

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
    let reg = rest
        .strip_suffix(')')
        .and_then(|r| r.strip_prefix('%'))
        .ok_or_else(|| format!("operand `{operand}` is not OFF(%reg)"))?;
    if reg.contains(',') {
        return Err("indexed addressing (OFF(%base,%index,scale)) is not supported".into());
    }
    let off = if off.is_empty() { 0 } else { parse_int(off)? };
    Ok(spec(ArgKind::RegDeref, off, reg_offset(reg)?))
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

/// The `struct __bpf_usdt_spec` value for a site's arguments and the attach's cookie
/// (`usdt_cookie`, what `bpf_usdt_cookie()` returns).
pub fn spec_value(args: &[UsdtArg], cookie: u64) -> [u8; SPEC_SIZE] {
    let mut v = [0u8; SPEC_SIZE];
    for (i, a) in args.iter().take(MAX_ARGS).enumerate() {
        let at = i * 16;
        v[at..at + 8].copy_from_slice(&a.val_off.to_le_bytes());
        let kind: u32 = match a.kind {
            ArgKind::Const => 0,
            ArgKind::Reg => 1,
            ArgKind::RegDeref => 2,
        };
        v[at + 8..at + 12].copy_from_slice(&kind.to_le_bytes());
        v[at + 12..at + 14].copy_from_slice(&a.reg_off.to_le_bytes());
        v[at + 14] = u8::from(a.signed);
        v[at + 15] = a.bitshift;
    }
    v[192..200].copy_from_slice(&cookie.to_le_bytes());
    v[200..202].copy_from_slice(&(args.len().min(MAX_ARGS) as u16).to_le_bytes());
    v
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
        for bad in ["3@%eax", "4@%xyz", "4%eax", "8@8(%rax,%rbx,2)", "8@(rax)"] {
            let e = parse_args(&site(bad)).unwrap_err().to_string();
            assert!(e.contains(bad), "the error quotes the argument: {e}");
        }
        let spec = spec_value(&args, 0xabc);
        assert_eq!(
            u64::from_le_bytes(spec[192..200].try_into().unwrap()),
            0xabc
        );
        assert_eq!(u16::from_le_bytes(spec[200..202].try_into().unwrap()), 6);
        assert_eq!(u32::from_le_bytes(spec[24..28].try_into().unwrap()), 2);
    }
}
