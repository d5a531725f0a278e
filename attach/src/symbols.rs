//! Resolution of libbpf-style uprobe targets to runtime addresses.
//!
//! Accepted forms (the part after `uprobe/` in a libbpf section name):
//! `PATH:FUNC`, `PATH:FUNC+OFFSET`, `LIB:FUNC` with a bare library name (`libc.so.6`, `libc.so`,
//! `libc`), `FUNC` / `FUNC+OFFSET` (the main executable). `OFFSET` is decimal or `0x` hex.
//! Symbols come from `.dynsym` and `.symtab` of the ELF file that `/proc/PID/maps` shows mapped.

use crate::error::AttachError;
use crate::procmaps::{self, MapEntry};
use goblin::elf::{program_header::PT_LOAD, sym, Elf};
use std::collections::HashMap;
use std::path::PathBuf;

/// A parsed attach target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// `None`: the main executable.
    pub module: Option<String>,
    /// The function name, any `@VERSION` suffix dropped.
    pub symbol: String,
    /// Bytes from the function's start (`+OFFSET`; 0 without one).
    pub offset: u64,
}

impl TargetSpec {
    /// Parses one of the forms in the [module documentation](self); `OFFSET` is decimal or
    /// `0x` hex. Only the syntax is checked: nothing is looked up.
    pub fn parse(spec: &str) -> Result<Self, AttachError> {
        let bad = |reason: &str| AttachError::BadTarget {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let spec = spec.trim();
        let (module, func) = match spec.rsplit_once(':') {
            Some((m, f)) if !m.is_empty() => (Some(m.to_string()), f),
            Some(_) => return Err(bad("empty module before `:`")),
            None => (None, spec),
        };
        let (symbol, offset) = match func.split_once('+') {
            Some((s, o)) => {
                let o = o.trim();
                let off =
                    if let Some(hex) = o.strip_prefix("0x").or_else(|| o.strip_prefix("0X")) {
                        u64::from_str_radix(hex, 16)
                    } else {
                        o.parse()
                    }
                    .map_err(|_| bad("offset after `+` is not a number"))?;
                (s, off)
            }
            None => (func, 0),
        };
        // `malloc@GLIBC_2.2.5` / `f@@VER`: symbol versions are not distinguished; the default
        // (or only) definition is taken.
        let symbol = symbol.split('@').next().unwrap_or("");
        if symbol.is_empty() {
            return Err(bad("no function name"));
        }
        Ok(TargetSpec {
            module,
            symbol: symbol.to_string(),
            offset,
        })
    }
}

/// A target resolved to an address in a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// The spec as written.
    pub spec: String,
    /// The file as mapped in the process.
    pub module: PathBuf,
    /// The function name, without `@VERSION`.
    pub symbol: String,
    /// Bytes from the function's start.
    pub offset: u64,
    /// Runtime address of `symbol + offset`.
    pub address: u64,
    /// Bytes from `address` to the end of the symbol (`st_size - offset`); 0 if unknown.
    pub size: u64,
}

impl ResolvedTarget {
    /// `file:symbol[+off]`, for messages.
    pub fn display_name(&self) -> String {
        let file = self
            .module
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if self.offset == 0 {
            format!("{file}:{}", self.symbol)
        } else {
            format!("{file}:{}+{:#x}", self.symbol, self.offset)
        }
    }
}

/// Resolves `spec` in this process.
pub fn resolve(spec: &str) -> Result<ResolvedTarget, AttachError> {
    Resolver::new(None)?.resolve(spec)
}

/// Resolves `spec` in process `pid`.
pub fn resolve_in(pid: u32, spec: &str) -> Result<ResolvedTarget, AttachError> {
    Resolver::new(Some(pid))?.resolve(spec)
}

/// Resolves many targets against one snapshot of a process's maps, caching ELF files.
pub struct Resolver {
    pid: Option<u32>,
    maps: Vec<MapEntry>,
    files: HashMap<String, Vec<u8>>,
}

impl Resolver {
    /// `pid = None` resolves in this process.
    pub fn new(pid: Option<u32>) -> Result<Self, AttachError> {
        Ok(Resolver {
            pid,
            maps: procmaps::read_maps(pid)?,
            files: HashMap::new(),
        })
    }

    fn pid_num(&self) -> u32 {
        self.pid.unwrap_or_else(std::process::id)
    }

    /// The snapshot of `/proc/PID/maps` taken by [`Resolver::new`]; later mappings (a library
    /// loaded since) are not in it.
    pub fn maps(&self) -> &[MapEntry] {
        &self.maps
    }

    /// Finds the mapped file named by `module` (`None`: main executable); returns its maps path.
    pub fn find_module(&self, module: Option<&str>) -> Result<String, AttachError> {
        let not_loaded = || AttachError::ModuleNotLoaded {
            module: module.unwrap_or("<main executable>").to_string(),
            pid: self.pid_num(),
        };
        let by_inode = |p: PathBuf| -> Result<String, AttachError> {
            let meta = std::fs::metadata(&p).map_err(|source| AttachError::Io {
                path: p.clone(),
                source,
            })?;
            use std::os::unix::fs::MetadataExt;
            let (dev, ino) = (meta.dev(), meta.ino());
            let (maj, min) = (libc::major(dev), libc::minor(dev));
            self.maps
                .iter()
                .find(|m| m.is_file() && m.inode == ino && m.dev == (maj, min))
                .map(|m| m.path.clone())
                .ok_or_else(not_loaded)
        };
        match module {
            None => by_inode(procmaps::proc_dir(self.pid).join("exe")),
            Some(m) if m.contains('/') => by_inode(procmaps::host_path(self.pid, m)),
            Some(name) => {
                let matches = |f: &str| {
                    f == name
                        || f.strip_prefix(name)
                            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
                };
                self.maps
                    .iter()
                    .find(|m| m.is_file() && matches(m.file_name()))
                    .map(|m| m.path.clone())
                    .ok_or_else(not_loaded)
            }
        }
    }

    /// Where this process maps byte `file_offset` of `module` (a path [`Self::find_module`]
    /// returned) writable: where a USDT semaphore of the file is counted (the kernel's
    /// `valid_ref_ctr_vma`: the file's writable mapping holding the offset).
    pub fn writable_address(&self, module: &str, file_offset: u64) -> Option<u64> {
        self.mapped_at(module, file_offset, |m| m.write)
    }

    /// Where this process maps byte `file_offset` of `module` executable (a code site of the
    /// file, such as a USDT probe's `nop`).
    pub fn executable_address(&self, module: &str, file_offset: u64) -> Option<u64> {
        self.mapped_at(module, file_offset, |m| m.exec)
    }

    fn mapped_at(
        &self,
        module: &str,
        file_offset: u64,
        wanted: impl Fn(&MapEntry) -> bool,
    ) -> Option<u64> {
        let file = self.maps.iter().find(|m| m.path == module)?;
        self.maps
            .iter()
            .filter(|m| m.inode == file.inode && m.dev == file.dev && wanted(m))
            .find(|m| (m.offset..m.offset + (m.end - m.start)).contains(&file_offset))
            .map(|m| m.start + (file_offset - m.offset))
    }

    fn file(&mut self, path: &str) -> Result<&[u8], AttachError> {
        if !self.files.contains_key(path) {
            let hp = procmaps::host_path(self.pid, path);
            let bytes =
                std::fs::read(&hp).map_err(|source| AttachError::Io { path: hp, source })?;
            self.files.insert(path.to_string(), bytes);
        }
        Ok(&self.files[path])
    }

    /// Resolves one target spec.
    pub fn resolve(&mut self, spec: &str) -> Result<ResolvedTarget, AttachError> {
        let t = TargetSpec::parse(spec)?;
        let module = self.find_module(t.module.as_deref())?;
        let pid = self.pid_num();
        if !self.maps.iter().any(|m| m.path == module) {
            return Err(AttachError::ModuleNotLoaded {
                module: module.clone(),
                pid,
            });
        }
        let path = PathBuf::from(&module);
        let bytes = self.file(&module)?;
        let elf = Elf::parse(bytes).map_err(|e| AttachError::Elf {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let (value, size) = find_symbol(&elf, &t.symbol, &path)?;
        if size != 0 && t.offset >= size {
            return Err(AttachError::OffsetOutOfRange {
                path,
                symbol: t.symbol,
                offset: t.offset,
                size,
            });
        }
        let vaddr = value + t.offset;
        let not_mapped = || AttachError::NotMapped {
            path: path.clone(),
            symbol: t.symbol.clone(),
            address: vaddr,
            pid,
        };
        let (foff, exec) = file_offset_of(&elf, vaddr).ok_or_else(not_mapped)?;
        // The same file may be mapped more than once (e.g. read-only by a symbolizer): take
        // the mapping with the segment's permissions, as the loader made it.
        let address = self
            .mapped_at(&module, foff, |m| m.exec == exec)
            .ok_or_else(not_mapped)?;
        Ok(ResolvedTarget {
            spec: spec.to_string(),
            module: path.clone(),
            symbol: t.symbol,
            offset: t.offset,
            address,
            size: size.saturating_sub(t.offset),
        })
    }
}

/// The file offset of virtual address `vaddr` and whether its segment is executable, from the
/// loadable segment whose file bytes hold it (what a uprobe's offset and a USDT semaphore's
/// reference-counter offset are).
pub(crate) fn file_offset_of(elf: &Elf, vaddr: u64) -> Option<(u64, bool)> {
    elf.program_headers
        .iter()
        .filter(|ph| ph.p_type == PT_LOAD)
        .find(|ph| (ph.p_vaddr..ph.p_vaddr + ph.p_filesz).contains(&vaddr))
        .map(|ph| (vaddr - ph.p_vaddr + ph.p_offset, ph.is_executable()))
}

/// Finds a defined function symbol: `(st_value, st_size)`. Prefers global over local,
/// `.dynsym` over `.symtab`.
fn find_symbol(elf: &Elf, name: &str, path: &std::path::Path) -> Result<(u64, u64), AttachError> {
    let mut best: Option<(u64, u64, bool)> = None;
    let mut ifunc = false;
    let tables = [(&elf.dynsyms, &elf.dynstrtab), (&elf.syms, &elf.strtab)];
    for (syms, strs) in tables {
        for s in syms.iter() {
            if s.st_shndx == 0 || s.st_value == 0 {
                continue;
            }
            if strs.get_at(s.st_name) != Some(name) {
                continue;
            }
            match s.st_type() {
                sym::STT_GNU_IFUNC => ifunc = true,
                sym::STT_FUNC | sym::STT_NOTYPE => {
                    let global = s.st_bind() != sym::STB_LOCAL;
                    let better = match best {
                        None => true,
                        Some((_, _, g)) => global && !g,
                    };
                    if better {
                        best = Some((s.st_value, s.st_size, global));
                    }
                }
                _ => {}
            }
        }
    }
    match best {
        Some((v, s, _)) => Ok((v, s)),
        None if ifunc => Err(AttachError::IndirectFunction {
            path: path.to_path_buf(),
            symbol: name.to_string(),
        }),
        None => Err(AttachError::UnknownSymbol {
            path: path.to_path_buf(),
            symbol: name.to_string(),
        }),
    }
}

/// The `PATH:FUNC+OFFSET` target for a file offset in the ELF file at `path`, as the kernel's
/// uprobe PMU takes a probe (`config1` the path, `config2` the offset into the file, which
/// libbpf computes from a symbol as `st_value - p_vaddr + p_offset`): the function symbol whose
/// bytes hold that offset, so the hook knows where the function ends.
pub fn target_at_file_offset(
    path: &std::path::Path,
    file_offset: u64,
) -> Result<String, AttachError> {
    let bytes = std::fs::read(path).map_err(|source| AttachError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let elf = Elf::parse(&bytes).map_err(|e| AttachError::Elf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    target_in(path, &elf, file_offset)
}

/// [`target_at_file_offset`] on an ELF file already parsed.
pub(crate) fn target_in(
    path: &std::path::Path,
    elf: &Elf,
    file_offset: u64,
) -> Result<String, AttachError> {
    let bad = |reason: String| AttachError::BadTarget {
        spec: format!("{}:{file_offset:#x}", path.display()),
        reason,
    };
    let vaddr = elf
        .program_headers
        .iter()
        .filter(|ph| ph.p_type == PT_LOAD && ph.is_executable())
        .find(|ph| (ph.p_offset..ph.p_offset + ph.p_filesz).contains(&file_offset))
        .map(|ph| file_offset - ph.p_offset + ph.p_vaddr)
        .ok_or_else(|| bad("the offset is in no executable segment of the file".into()))?;
    let tables = [(&elf.dynsyms, &elf.dynstrtab), (&elf.syms, &elf.strtab)];
    let mut best: Option<(&str, u64)> = None;
    for (syms, strs) in tables {
        for s in syms.iter() {
            let is_func = matches!(s.st_type(), sym::STT_FUNC);
            if !is_func || s.st_shndx == 0 || s.st_value == 0 {
                continue;
            }
            let inside = (s.st_value..s.st_value + s.st_size.max(1)).contains(&vaddr);
            match strs.get_at(s.st_name) {
                Some(name) if inside && !name.is_empty() && best.is_none() => {
                    best = Some((name, vaddr - s.st_value))
                }
                _ => {}
            }
        }
    }
    let (name, delta) =
        best.ok_or_else(|| bad(format!("no function symbol holds address {vaddr:#x}")))?;
    Ok(if delta == 0 {
        format!("{}:{name}", path.display())
    } else {
        format!("{}:{name}+{delta:#x}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        let t = TargetSpec::parse("/usr/lib/libc.so.6:malloc+0x10").unwrap();
        assert_eq!(t.module.as_deref(), Some("/usr/lib/libc.so.6"));
        assert_eq!((t.symbol.as_str(), t.offset), ("malloc", 16));
        let t = TargetSpec::parse("main+4").unwrap();
        assert_eq!((t.module, t.symbol.as_str(), t.offset), (None, "main", 4));
        assert!(TargetSpec::parse("libc.so.6:").is_err());
        let t = TargetSpec::parse("libc.so.6:malloc@GLIBC_2.2.5").unwrap();
        assert_eq!(t.symbol, "malloc");
        assert!(TargetSpec::parse("f+zz").is_err());
    }

    #[test]
    fn resolves_libc_malloc_in_self() {
        let r = resolve("libc.so.6:malloc").unwrap();
        // SAFETY: dlsym on the default namespace with a NUL-terminated name.
        let direct = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as u64;
        assert_eq!(r.address, direct);
        assert!(r.size > 5);
        let r2 = resolve("libc:malloc").unwrap();
        assert_eq!(r2.address, direct);
    }

    #[test]
    fn unknown_symbol_names_file_and_symbol() {
        let e = resolve("libc.so.6:no_such_function_xyz").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("no_such_function_xyz") && msg.contains("libc.so.6"),
            "{msg}"
        );
        let e = resolve("libnotloaded.so:f").unwrap_err();
        assert!(matches!(e, AttachError::ModuleNotLoaded { .. }));
    }
}
