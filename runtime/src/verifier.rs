//! Kernel verifier gate: before a program runs in user space, the running kernel's verifier must
//! accept it.
//!
//! For one program of a [`BpfObject`] the gate creates kernel maps of the same shapes as the ones
//! the program references, loads the object's BTF (so `func_info` can be passed: the kernel
//! refuses callbacks such as `bpf_loop`'s without it, "missing btf func_info"), loads the program
//! as the kernel program type its section declares, then closes everything (unloading the
//! program and maps).
//!
//! The gate loads the *very bytes* the runtime runs: map references stay in the object loader's
//! `BPF_PSEUDO_MAP_IDX`/`BPF_PSEUDO_MAP_IDX_VALUE` encoding and the kernel resolves them through
//! `fd_array`, so no second relocation pass (which could differ from ours) is involved. The only
//! difference allowed is a documented helper substitution: this kernel has no
//! `CONFIG_BPF_KPROBE_OVERRIDE` and rejects `bpf_override_return` (helper 58) in kprobe programs,
//! so a copy with that call replaced by `bpf_get_func_ip` (helper 173: same `ctx` argument, same
//! `u64`-compatible return, same program types) is verified instead, and a warning says so.
//!
//! Raw `bpf()` commands go through libbpf's thin wrappers (`bpf_map_create`, `bpf_btf_load`,
//! `bpf_prog_load` from libbpf-sys, the crate kernel-bridge already builds through libbpf-rs):
//! they handle `attr` sizes and retries, and leave the object model entirely to us.

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_void};

use bpftime_abi::{HelperId, MapType};
use libbpf_sys as sys;

use crate::object::btf::kind as btf_kind;
use crate::object::{
    insn, AttachTarget, BpfObject, Btf, MapOrigin, MapSpec, ProgramKind, ProgramSpec, RawInsn,
};

/// `bpf_override_return`.
pub const HELPER_OVERRIDE_RETURN: i32 = HelperId::OVERRIDE_RETURN.0 as i32;
/// `bpf_get_func_ip`, the stand-in verified in place of `bpf_override_return`.
pub const HELPER_GET_FUNC_IP: i32 = HelperId::GET_FUNC_IP.0 as i32;

/// Verifier log buffer for a rejected program (the kernel keeps the tail when it overflows).
const LOG_SIZE: usize = 4 << 20;
/// Log lines kept in [`VerifyError::Rejected`]'s message.
const LOG_TAIL_LINES: usize = 40;
/// `BPF_LOG_LEVEL1` and `BPF_LOG_STATS`.
const LOG_LEVEL1: u32 = 1;
const LOG_STATS: u32 = 4;

/// A helper call replaced in the copy that the kernel verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelperSubstitution {
    pub insn_index: usize,
    pub original: i32,
    pub replacement: i32,
}

/// A program the kernel verifier accepted.
#[derive(Debug, Clone)]
pub struct VerifiedProgram {
    pub program_index: usize,
    pub name: String,
    pub section: String,
    /// The bytes to run: the loader's relocated instructions, exactly as given to the kernel
    /// except at [`VerifiedProgram::substitutions`].
    pub insns: Vec<RawInsn>,
    /// The exact bytes the kernel verified.
    pub verified_insns: Vec<RawInsn>,
    /// Helper calls replaced for verification (see the module docs).
    pub substitutions: Vec<HelperSubstitution>,
    /// The verifier's statistics line(s) (`processed N insns ...`).
    pub stats: String,
}

/// Why the gate did not accept a program. Every variant names the program and its section.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{object}: no program #{index} (the object has {count})")]
    NoSuchProgram {
        object: String,
        index: usize,
        count: usize,
    },
    #[error(
        "program {program} (section {section}): the section declares no kernel program type, so \
         the kernel verifier cannot check it (use --no-verify to run it unverified)"
    )]
    UnknownProgramType { program: String, section: String },
    #[error("program {program} (section {section}): cannot verify: {reason}")]
    Unsupported {
        program: String,
        section: String,
        reason: String,
    },
    #[error("program {program} (section {section}): creating kernel map {map} failed: {source}")]
    MapCreate {
        program: String,
        section: String,
        map: String,
        source: std::io::Error,
    },
    #[error(
        "program {program} (section {section}) rejected by the kernel verifier ({source}); \
         log tail:\n{log_tail}"
    )]
    Rejected {
        program: String,
        section: String,
        source: std::io::Error,
        /// The whole log the kernel returned.
        log: String,
        /// Its last lines (also in the message).
        log_tail: String,
    },
}

/// An owned file descriptor, closed on drop (this is what unloads maps, BTF and the program).
struct Fd(c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd was returned by a successful bpf() call and is owned only by this guard.
        unsafe {
            libc::close(self.0);
        }
    }
}

fn last_os_error(ret: c_int) -> std::io::Error {
    // libbpf returns -errno.
    if ret < 0 {
        std::io::Error::from_raw_os_error(-ret)
    } else {
        std::io::Error::last_os_error()
    }
}

/// Kernel object names: at most 15 bytes of `[A-Za-z0-9_.]`.
fn kernel_name(name: &str) -> CString {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(15)
        .collect();
    CString::new(cleaned).unwrap_or_default()
}

/// Checks that this process can use the kernel's BPF (creates and closes a tiny array map), for
/// callers that want a clear message before verifying anything.
pub fn kernel_bpf_available() -> Result<(), String> {
    let spec = MapSpec {
        name: "bpftime_probe".into(),
        origin: MapOrigin::BtfMaps,
        map_type: MapType::Array.as_raw(),
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        flags: 0,
        pinning: crate::object::Pinning::None,
        numa_node: 0,
        map_extra: 0,
        initial_data: None,
        btf_key_type_id: None,
        btf_value_type_id: None,
    };
    create_map(&spec, None)
        .map(drop)
        .map_err(|e| format!("creating a BPF array map failed ({e}); are you root with CAP_BPF?"))
}

/// Verifies every program of `obj` (convenience for loaders).
pub fn verify_all(obj: &BpfObject) -> Vec<Result<VerifiedProgram, VerifyError>> {
    (0..obj.programs.len()).map(|i| verify(obj, i)).collect()
}

/// Runs program `program_index` of `obj` through the kernel verifier and returns the bytes it
/// accepted. Needs CAP_BPF (root here).
pub fn verify(obj: &BpfObject, program_index: usize) -> Result<VerifiedProgram, VerifyError> {
    let prog = obj
        .programs
        .get(program_index)
        .ok_or(VerifyError::NoSuchProgram {
            object: obj.name.clone(),
            index: program_index,
            count: obj.programs.len(),
        })?;
    let unsupported = |reason: String| VerifyError::Unsupported {
        program: prog.name.clone(),
        section: prog.section.clone(),
        reason,
    };
    let prog_type = prog
        .kernel_prog_type
        .ok_or_else(|| VerifyError::UnknownProgramType {
            program: prog.name.clone(),
            section: prog.section.clone(),
        })?;
    let attach_btf_id = attach_btf_id(prog).map_err(unsupported)?;

    // The copy the kernel sees.
    let mut verified = prog.insns.clone();
    let substitutions = substitute_helpers(prog, &mut verified);
    if !substitutions.is_empty() {
        tracing::warn!(
            program = %prog.name,
            section = %prog.section,
            calls = substitutions.len(),
            "verifying a copy with bpf_override_return (helper 58) replaced by bpf_get_func_ip \
             (helper 173): this kernel rejects bpf_override_return in kprobe programs"
        );
    }

    // Object BTF (optional: without it, programs that need func_info are rejected with the
    // kernel's own message).
    let btf_fd = obj.kernel_btf.as_ref().and_then(|raw| match load_btf(raw) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(object = %obj.name, error = %e, "kernel rejected the object's BTF; verifying without BTF");
            None
        }
    });

    // Kernel maps for the maps this program references, placed at their indices in fd_array.
    let mut fd_array: Vec<c_int> = vec![-1; obj.maps.len()];
    let mut map_fds = Vec::new();
    let mut used: Vec<usize> = prog.map_relocs.iter().map(|r| r.map_index).collect();
    used.sort_unstable();
    used.dedup();
    for idx in used {
        let spec = obj
            .maps
            .get(idx)
            .ok_or_else(|| unsupported(format!("map index {idx} is outside the object's maps")))?;
        let fd = create_map(spec, btf_fd.as_ref().map(|f| f.0)).map_err(|source| {
            VerifyError::MapCreate {
                program: prog.name.clone(),
                section: prog.section.clone(),
                map: spec.name.clone(),
                source,
            }
        })?;
        fd_array[idx] = fd.0;
        map_fds.push(fd);
    }

    // func_info only if every placed function has one (the kernel wants all or none).
    let func_info: Vec<sys::bpf_func_info> =
        if btf_fd.is_some() && prog.functions.iter().all(|f| f.btf_type_id.is_some()) {
            prog.functions
                .iter()
                .map(|f| sys::bpf_func_info {
                    insn_off: f.start as u32,
                    type_id: f.btf_type_id.unwrap_or(0),
                })
                .collect()
        } else {
            Vec::new()
        };
    let line_info: Vec<sys::bpf_line_info> = if func_info.is_empty() {
        Vec::new()
    } else {
        prog.line_info
            .iter()
            .map(|l| sys::bpf_line_info {
                insn_off: l.insn_index as u32,
                file_name_off: l.file_name_off,
                line_off: l.line_off,
                line_col: l.line_col,
            })
            .collect()
    };

    let name = kernel_name(&prog.name);
    let license = CString::new(obj.license.clone()).unwrap_or_default();
    let load = LoadArgs {
        prog_type,
        name: &name,
        license: &license,
        insns: &verified,
        expected_attach_type: prog.expected_attach_type,
        prog_flags: prog.prog_flags,
        kern_version: obj.kernel_version,
        attach_btf_id,
        btf_fd: btf_fd.as_ref().map(|f| f.0),
        fd_array: &fd_array,
        func_info: &func_info,
        line_info: &line_info,
    };
    let mut result = load.run(LOG_STATS, 64 * 1024);
    if result.is_err() {
        // Again with the full log, so the error says why.
        result = load.run(LOG_LEVEL1 | LOG_STATS, LOG_SIZE);
        if let Err((_, log)) = &result {
            if !line_info.is_empty() && log.contains("line_info") {
                let retry = LoadArgs {
                    line_info: &[],
                    ..load
                };
                result = retry.run(LOG_LEVEL1 | LOG_STATS, LOG_SIZE);
            }
        }
    }
    drop(map_fds);
    drop(btf_fd);
    match result {
        Ok(stats) => Ok(VerifiedProgram {
            program_index,
            name: prog.name.clone(),
            section: prog.section.clone(),
            // What the kernel accepted, with the substituted calls put back: the runtime's
            // bytes are derived from the verified copy, never taken separately.
            insns: restore_helpers(&verified, &substitutions),
            verified_insns: verified,
            substitutions,
            stats,
        }),
        Err((source, log)) => {
            let lines: Vec<&str> = log.lines().collect();
            let log_tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            Err(VerifyError::Rejected {
                program: prog.name.clone(),
                section: prog.section.clone(),
                source,
                log,
                log_tail,
            })
        }
    }
}

fn substitute_helpers(prog: &ProgramSpec, insns: &mut [RawInsn]) -> Vec<HelperSubstitution> {
    let mut subs = Vec::new();
    if prog.kernel_prog_type != Some(sys::BPF_PROG_TYPE_KPROBE) {
        return subs;
    }
    let mut k = 0;
    while k < insns.len() {
        let i = insns[k];
        if insn::opc(&i) == 0x85 && insn::src(&i) == 0 && insn::imm(&i) == HELPER_OVERRIDE_RETURN {
            insn::set_imm(&mut insns[k], HELPER_GET_FUNC_IP);
            subs.push(HelperSubstitution {
                insn_index: k,
                original: HELPER_OVERRIDE_RETURN,
                replacement: HELPER_GET_FUNC_IP,
            });
        }
        k += if insn::opc(&i) == 0x18 { 2 } else { 1 };
    }
    subs
}

/// The verified instructions with each substituted helper call back to its original.
fn restore_helpers(verified: &[RawInsn], subs: &[HelperSubstitution]) -> Vec<RawInsn> {
    let mut insns = verified.to_vec();
    for s in subs {
        insn::set_imm(&mut insns[s.insn_index], s.original);
    }
    insns
}

/// BTF id of the kernel function/hook a tracing or LSM program attaches to.
fn attach_btf_id(prog: &ProgramSpec) -> Result<u32, String> {
    let (name, k) = match (&prog.kind, &prog.attach) {
        (
            ProgramKind::Fentry | ProgramKind::Fexit | ProgramKind::FmodRet,
            AttachTarget::BtfTarget { name },
        ) => (name.clone(), btf_kind::FUNC),
        (ProgramKind::Lsm, AttachTarget::BtfTarget { name }) => {
            (format!("bpf_lsm_{name}"), btf_kind::FUNC)
        }
        (ProgramKind::Iter, AttachTarget::BtfTarget { name }) => {
            (format!("bpf_iter_{name}"), btf_kind::FUNC)
        }
        (ProgramKind::TpBtf, AttachTarget::RawTracepoint { name }) => {
            (format!("btf_trace_{name}"), btf_kind::TYPEDEF)
        }
        (
            ProgramKind::Fentry
            | ProgramKind::Fexit
            | ProgramKind::FmodRet
            | ProgramKind::Lsm
            | ProgramKind::Iter
            | ProgramKind::TpBtf,
            _,
        ) => return Err("the section names no attach target".into()),
        (ProgramKind::StructOps, _) => {
            return Err("struct_ops programs need their struct_ops map; not supported".into())
        }
        _ => return Ok(0),
    };
    let vmlinux = Btf::vmlinux().map_err(|e| format!("kernel BTF: {e}"))?;
    vmlinux
        .find_by_name_kind(&name, k)
        .ok_or_else(|| format!("kernel BTF has no {name}"))
}

fn load_btf(raw: &[u8]) -> Result<Fd, String> {
    let mut log = vec![0u8; 256 * 1024];
    let mut opts = sys::bpf_btf_load_opts {
        sz: std::mem::size_of::<sys::bpf_btf_load_opts>() as _,
        log_buf: log.as_mut_ptr() as *mut c_char,
        log_size: log.len() as u32,
        log_level: 0,
        ..Default::default()
    };
    // SAFETY: `raw` and `log` outlive the call; `opts.sz` is this struct's size.
    let fd = unsafe { sys::bpf_btf_load(raw.as_ptr() as *const c_void, raw.len() as _, &mut opts) };
    if fd < 0 {
        let err = last_os_error(fd);
        return Err(format!("{err}: {}", c_log(&log)));
    }
    Ok(Fd(fd))
}

fn create_map(spec: &MapSpec, btf_fd: Option<c_int>) -> Result<Fd, std::io::Error> {
    if matches!(
        spec.map_type,
        sys::BPF_MAP_TYPE_ARRAY_OF_MAPS | sys::BPF_MAP_TYPE_HASH_OF_MAPS
    ) {
        return Err(std::io::Error::other(
            "map-in-map definitions are not supported by the verifier gate",
        ));
    }
    let mut max_entries = spec.max_entries;
    if spec.map_type == sys::BPF_MAP_TYPE_PERF_EVENT_ARRAY && max_entries == 0 {
        // libbpf's convention: one slot per possible CPU.
        // SAFETY: plain query of /sys/devices/system/cpu/possible, no pointers.
        max_entries = unsafe { sys::libbpf_num_possible_cpus() }.max(1) as u32;
    }
    let name = kernel_name(&spec.name);
    let create = |with_btf: bool| -> c_int {
        let mut opts = sys::bpf_map_create_opts {
            sz: std::mem::size_of::<sys::bpf_map_create_opts>() as _,
            map_flags: spec.flags,
            map_extra: spec.map_extra,
            ..Default::default()
        };
        if spec.flags & sys::BPF_F_NUMA_NODE != 0 {
            opts.numa_node = spec.numa_node;
        }
        if let (true, Some(fd)) = (with_btf, btf_fd) {
            if spec.btf_key_type_id.is_some() || spec.btf_value_type_id.is_some() {
                opts.btf_fd = fd as u32;
                opts.btf_key_type_id = spec.btf_key_type_id.unwrap_or(0);
                opts.btf_value_type_id = spec.btf_value_type_id.unwrap_or(0);
            }
        }
        // SAFETY: `name` is a valid C string and `opts` a properly sized struct; both outlive
        // the call.
        unsafe {
            sys::bpf_map_create(
                spec.map_type,
                name.as_ptr(),
                spec.key_size,
                spec.value_size,
                max_entries,
                &opts,
            )
        }
    };
    let mut fd = create(true);
    if fd < 0 && btf_fd.is_some() {
        // As libbpf does: BTF type info is optional for the map itself; retry without it.
        fd = create(false);
    }
    if fd < 0 {
        return Err(last_os_error(fd));
    }
    let fd = Fd(fd);
    if let MapOrigin::GlobalData { .. } = spec.origin {
        if let Some(data) = &spec.initial_data {
            let key = 0u32;
            // SAFETY: key is 4 bytes and `data` has value_size bytes (the section size).
            let r = unsafe {
                sys::bpf_map_update_elem(
                    fd.0,
                    &key as *const u32 as *const c_void,
                    data.as_ptr() as *const c_void,
                    0,
                )
            };
            if r < 0 {
                return Err(last_os_error(r));
            }
        }
        if spec.is_readonly() {
            // Frozen + BPF_F_RDONLY_PROG: the verifier treats .rodata values as constants, as it
            // does for libbpf-loaded programs.
            // SAFETY: fd is a map fd we own.
            let r = unsafe { sys::bpf_map_freeze(fd.0) };
            if r < 0 {
                return Err(last_os_error(r));
            }
        }
    }
    Ok(fd)
}

#[derive(Clone, Copy)]
struct LoadArgs<'a> {
    prog_type: u32,
    name: &'a CString,
    license: &'a CString,
    insns: &'a [RawInsn],
    expected_attach_type: u32,
    prog_flags: u32,
    kern_version: u32,
    attach_btf_id: u32,
    btf_fd: Option<c_int>,
    fd_array: &'a [c_int],
    func_info: &'a [sys::bpf_func_info],
    line_info: &'a [sys::bpf_line_info],
}

impl LoadArgs<'_> {
    /// One `BPF_PROG_LOAD`; returns the log's statistics on success, the error and log on failure.
    fn run(&self, log_level: u32, log_size: usize) -> Result<String, (std::io::Error, String)> {
        // 8-byte aligned copy of the instructions for the C side.
        let words: Vec<u64> = self.insns.iter().map(|i| u64::from_le_bytes(*i)).collect();
        let mut log = vec![0u8; log_size];
        let mut opts = sys::bpf_prog_load_opts {
            sz: std::mem::size_of::<sys::bpf_prog_load_opts>() as _,
            expected_attach_type: self.expected_attach_type,
            prog_flags: self.prog_flags,
            kern_version: self.kern_version,
            attach_btf_id: self.attach_btf_id,
            fd_array: if self.fd_array.is_empty() {
                std::ptr::null()
            } else {
                self.fd_array.as_ptr()
            },
            log_level,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as *mut c_char,
            ..Default::default()
        };
        if let Some(fd) = self.btf_fd {
            opts.prog_btf_fd = fd as u32;
            if !self.func_info.is_empty() {
                opts.func_info = self.func_info.as_ptr() as *const c_void;
                opts.func_info_cnt = self.func_info.len() as u32;
                opts.func_info_rec_size = std::mem::size_of::<sys::bpf_func_info>() as u32;
            }
            if !self.line_info.is_empty() {
                opts.line_info = self.line_info.as_ptr() as *const c_void;
                opts.line_info_cnt = self.line_info.len() as u32;
                opts.line_info_rec_size = std::mem::size_of::<sys::bpf_line_info>() as u32;
            }
        }
        // SAFETY: every pointer in `opts` and the arguments (names, license, instructions,
        // fd_array, func/line info, log) points into buffers that outlive this call, with the
        // counts and sizes set next to them; `opts.sz` is this struct's size.
        let fd = unsafe {
            sys::bpf_prog_load(
                self.prog_type,
                self.name.as_ptr(),
                self.license.as_ptr(),
                words.as_ptr() as *const sys::bpf_insn,
                words.len() as _,
                &mut opts,
            )
        };
        let text = c_log(&log);
        if fd < 0 {
            return Err((last_os_error(fd), text));
        }
        drop(Fd(fd));
        Ok(text.trim().to_string())
    }
}

fn c_log(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
