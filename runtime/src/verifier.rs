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
//! Its `bpf()` commands go through [`bpftime_abi::sys`] (libbpf's thin wrappers underneath): the
//! kernel objects are `OwnedFd`s, and every failure keeps its command and errno, so the gate's
//! error paths are unit-tested below with that layer's test override, without root.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use bpftime_abi::sys::{self as bpf, MapBtf, MapCreate, ProgLoad, SyscallError};
use bpftime_abi::{HelperId, MapType};
use libbpf_sys as sys;

use crate::object::btf::kind as btf_kind;
use crate::object::{
    insn, AttachTarget, BpfObject, Btf, BtfError, MapOrigin, MapSpec, ProgramKind, ProgramSpec,
    RawInsn,
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
/// Every instruction and state the verifier visits (for [`visited_instructions`]).
const LOG_LEVEL2: u32 = 2;
/// Room for a level-2 log of a tool-sized program; a larger log is not read (the program
/// then keeps its dead code, and is refused if that names what user space lacks).
const LIVENESS_LOG_SIZE: usize = 16 << 20;
const LOG_STATS: u32 = 4;

/// A helper call replaced in the copy that the kernel verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelperSubstitution {
    /// Index of the `call` in the program's instructions (8-byte slots).
    pub insn_index: usize,
    /// The helper id the program calls ([`HELPER_OVERRIDE_RETURN`]).
    pub original: i32,
    /// The helper id the kernel verified in its place ([`HELPER_GET_FUNC_IP`]).
    pub replacement: i32,
}

/// A program the kernel verifier accepted.
#[derive(Debug, Clone)]
pub struct VerifiedProgram {
    /// Index of the program in [`BpfObject::programs`].
    pub program_index: usize,
    /// The program's name.
    pub name: String,
    /// Its ELF section.
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
    /// Instructions of [`VerifiedProgram::insns`] the verifier proved unreachable and that
    /// were replaced by `exit` (see [`verify`]); 0 when nothing needed it.
    pub dead_removed: usize,
}

/// Why the gate did not accept a program. Every variant names the program and its section.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The index is past the object's programs (the one variant that names no program).
    #[error("{object}: no program #{index} (the object has {count})")]
    NoSuchProgram {
        /// The object's name.
        object: String,
        /// The index asked for.
        index: usize,
        /// How many programs the object has.
        count: usize,
    },
    /// An unknown section ([`ProgramKind::Unknown`]): there is no program type to load it as.
    #[error(
        "program {program} (section {section}): the section declares no kernel program type, so \
         the kernel verifier cannot check it (use --no-verify to run it unverified)"
    )]
    UnknownProgramType {
        /// The program's name.
        program: String,
        /// Its ELF section.
        section: String,
    },
    /// The gate cannot set the program up for the kernel (no or unknown attach target in
    /// kernel BTF, struct_ops, map-in-map, a map index outside the object).
    #[error("program {program} (section {section}): cannot verify: {reason}")]
    Unsupported {
        /// The program's name.
        program: String,
        /// Its ELF section.
        section: String,
        /// What is missing or unsupported.
        reason: String,
    },
    /// The kernel's BTF, needed to find the attach target of a BTF-attached program
    /// (fentry, lsm, tp_btf, ...), could not be read or parsed.
    #[error("program {program} (section {section}): cannot verify: kernel BTF: {source}")]
    KernelBtf {
        /// The program's name.
        program: String,
        /// Its ELF section.
        section: String,
        /// The BTF error.
        #[source]
        source: BtfError,
    },
    /// Creating (or, for global data, filling or freezing) a kernel map of the program failed:
    /// `source` names the command and keeps the errno.
    #[error(
        "program {program} (section {section}): creating kernel map {map} failed: {}",
        .source.source
    )]
    MapCreate {
        /// The program's name.
        program: String,
        /// Its ELF section.
        section: String,
        /// The object's map that could not be created.
        map: String,
        /// The failed `bpf()` command and its errno.
        #[source]
        source: SyscallError,
    },
    /// `BPF_PROG_LOAD` failed with EPERM before the verifier said anything: this process may
    /// not load programs of this type.
    #[error(
        "program {program} (section {section}): the kernel refused to load it ({}): loading \
         BPF programs needs root or CAP_BPF (with CAP_PERFMON for tracing programs)",
        .source.source
    )]
    NotPermitted {
        /// The program's name.
        program: String,
        /// Its ELF section.
        section: String,
        /// The failed `BPF_PROG_LOAD` and its errno.
        #[source]
        source: SyscallError,
    },
    /// The kernel verifier rejected the program; its log says why.
    #[error(
        "program {program} (section {section}) rejected by the kernel verifier ({}); \
         log tail:\n{log_tail}",
        .source.source
    )]
    Rejected {
        /// The program's name.
        program: String,
        /// Its ELF section.
        section: String,
        /// The failed `BPF_PROG_LOAD` and its errno.
        #[source]
        source: SyscallError,
        /// The whole log the kernel returned.
        log: String,
        /// Its last lines (also in the message).
        log_tail: String,
    },
}

/// Kernel object names: at most 15 bytes of `[A-Za-z0-9_.]`.
fn kernel_name(name: &str) -> CString {
    bpf::object_name(name)
}

/// The kernel's BPF is not usable by this process.
#[derive(Debug, thiserror::Error)]
#[error("creating a BPF array map failed ({}); are you root with CAP_BPF?", .0.source)]
pub struct BpfUnavailable(#[source] pub SyscallError);

/// Checks that this process can use the kernel's BPF (creates and closes a tiny array map), for
/// callers that want a clear message before verifying anything.
pub fn kernel_bpf_available() -> Result<(), BpfUnavailable> {
    let spec = MapSpec::new(
        "bpftime_probe",
        MapOrigin::BtfMaps,
        MapType::Array.as_raw(),
        (4, 4, 1),
        0,
    );
    create_map(&spec, None).map(drop).map_err(BpfUnavailable)
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
    let attach_btf_id = attach_btf_id(prog).map_err(|e| match e {
        AttachError::Unsupported(reason) => unsupported(reason),
        AttachError::KernelBtf(source) => VerifyError::KernelBtf {
            program: prog.name.clone(),
            section: prog.section.clone(),
            source,
        },
    })?;

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
        Err((e, log)) => {
            tracing::warn!(object = %obj.name, error = %e.source, log = %log.trim(), "kernel rejected the object's BTF; verifying without BTF");
            None
        }
    });

    // Kernel maps for the maps this program references, placed at their indices in fd_array.
    let mut fd_array: Vec<RawFd> = vec![-1; obj.maps.len()];
    let mut map_fds = Vec::new();
    let mut used: Vec<usize> = prog.map_relocs.iter().map(|r| r.map_index).collect();
    used.sort_unstable();
    used.dedup();
    for idx in used {
        let spec = obj
            .maps
            .get(idx)
            .ok_or_else(|| unsupported(format!("map index {idx} is outside the object's maps")))?;
        let fd = create_map(spec, btf_fd.as_ref()).map_err(|source| VerifyError::MapCreate {
            program: prog.name.clone(),
            section: prog.section.clone(),
            map: spec.name.clone(),
            source,
        })?;
        fd_array[idx] = fd.as_raw_fd();
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
        btf_fd: btf_fd.as_ref(),
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
    // Dead code the runtime cannot run (a helper it lacks, a map type it does not hold), as
    // libbpf tools keep behind `const volatile` switches: the verifier proved it unreachable,
    // so it is replaced by `exit` (a run that reached it would be a fault anyway).
    let live = match &result {
        Ok(_) if needs_liveness(obj, prog, &verified) => load
            .run(LOG_LEVEL2 | LOG_STATS, LIVENESS_LOG_SIZE)
            .ok()
            .and_then(|log| visited_instructions(&log, verified.len())),
        _ => None,
    };
    drop(map_fds);
    drop(btf_fd);
    match result {
        Ok(stats) => {
            // What the kernel accepted, with the substituted calls put back: the runtime's
            // bytes are derived from the verified copy, never taken separately.
            let mut insns = restore_helpers(&verified, &substitutions);
            let dead_removed = live.map_or(0, |live| remove_dead(&mut insns, &live));
            Ok(VerifiedProgram {
                program_index,
                name: prog.name.clone(),
                section: prog.section.clone(),
                insns,
                verified_insns: verified,
                substitutions,
                stats,
                dead_removed,
            })
        }
        // EPERM with an empty log: the verifier never ran, the process lacks the privilege.
        Err((source, log)) if source.errno() == libc::EPERM && log.trim().is_empty() => {
            Err(VerifyError::NotPermitted {
                program: prog.name.clone(),
                section: prog.section.clone(),
                source,
            })
        }
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

/// Whether `insns` call a helper the runtime lacks or reference a map whose type user space
/// does not hold: only then is the verifier asked which instructions are live.
fn needs_liveness(obj: &BpfObject, prog: &ProgramSpec, insns: &[RawInsn]) -> bool {
    let unknown_helper = insn::starts(insns).map(|(k, _)| &insns[k]).any(|i| {
        insn::opc(i) == 0x85
            && insn::src(i) == 0
            && !crate::helpers::is_supported(insn::imm(i) as u32)
            && insn::imm(i) as u32 != crate::helpers::POISON_HELPER
    });
    let unknown_map = prog.map_relocs.iter().any(|r| {
        obj.maps
            .get(r.map_index)
            .is_some_and(|m| crate::maps::MapType::from_raw(m.map_type).is_none())
    });
    unknown_helper || unknown_map
}

/// Replaces every instruction `live` marks unvisited by `exit` (both slots of an `lddw`);
/// returns how many instructions were replaced.
fn remove_dead(insns: &mut [RawInsn], live: &[bool]) -> usize {
    const EXIT: RawInsn = [0x95, 0, 0, 0, 0, 0, 0, 0];
    let dead: Vec<(usize, usize)> = insn::starts(insns)
        .filter(|&(k, _)| !live.get(k).copied().unwrap_or(true))
        .collect();
    for &(k, slots) in &dead {
        for slot in insns.iter_mut().skip(k).take(slots) {
            *slot = EXIT;
        }
    }
    dead.len()
}

fn substitute_helpers(prog: &ProgramSpec, insns: &mut [RawInsn]) -> Vec<HelperSubstitution> {
    let mut subs = Vec::new();
    if prog.kernel_prog_type != Some(sys::BPF_PROG_TYPE_KPROBE) {
        return subs;
    }
    let calls: Vec<usize> = insn::starts(insns)
        .map(|(k, _)| k)
        .filter(|&k| {
            let i = &insns[k];
            insn::opc(i) == 0x85 && insn::src(i) == 0 && insn::imm(i) == HELPER_OVERRIDE_RETURN
        })
        .collect();
    for k in calls {
        insn::set_imm(&mut insns[k], HELPER_GET_FUNC_IP);
        subs.push(HelperSubstitution {
            insn_index: k,
            original: HELPER_OVERRIDE_RETURN,
            replacement: HELPER_GET_FUNC_IP,
        });
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

enum AttachError {
    Unsupported(String),
    KernelBtf(BtfError),
}

/// BTF id of the kernel function/hook a tracing or LSM program attaches to.
fn attach_btf_id(prog: &ProgramSpec) -> Result<u32, AttachError> {
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
        ) => {
            return Err(AttachError::Unsupported(
                "the section names no attach target".into(),
            ))
        }
        (ProgramKind::StructOps, _) => {
            return Err(AttachError::Unsupported(
                "struct_ops programs need their struct_ops map; not supported".into(),
            ))
        }
        _ => return Ok(0),
    };
    let vmlinux = Btf::vmlinux().map_err(AttachError::KernelBtf)?;
    vmlinux
        .find_by_name_kind(&name, k)
        .ok_or_else(|| AttachError::Unsupported(format!("kernel BTF has no {name}")))
}

/// Loads the object's BTF; on failure, the error and the kernel's log.
fn load_btf(raw: &[u8]) -> Result<OwnedFd, (SyscallError, String)> {
    let mut log = vec![0u8; 256 * 1024];
    bpf::btf_load(raw, &mut log, 0).map_err(|e| (e, bpf::log_text(&log)))
}

/// A kernel copy of `spec`; a map of maps gets its inner template created first (closed
/// once the outer map holds its shape, as libbpf does).
fn create_map(spec: &MapSpec, btf_fd: Option<&OwnedFd>) -> Result<OwnedFd, SyscallError> {
    let inner = spec
        .inner
        .as_deref()
        .map(|inner| create_map(inner, btf_fd))
        .transpose()?;
    let mut max_entries = spec.max_entries;
    if spec.map_type == sys::BPF_MAP_TYPE_PERF_EVENT_ARRAY && max_entries == 0 {
        // libbpf's convention: one slot per possible CPU.
        max_entries = bpftime_abi::possible_cpus().max(1);
    }
    let name = kernel_name(&spec.name);
    let mut args = MapCreate {
        map_flags: spec.flags,
        map_extra: spec.map_extra,
        inner_map_fd: inner.as_ref().map(|fd| fd.as_fd()),
        ..MapCreate::new(
            spec.map_type,
            &name,
            spec.key_size,
            spec.value_size,
            max_entries,
        )
    };
    if spec.flags & sys::BPF_F_NUMA_NODE != 0 {
        args.numa_node = spec.numa_node;
    }
    let btf = btf_fd
        .filter(|_| spec.btf_key_type_id.is_some() || spec.btf_value_type_id.is_some())
        .map(|fd| MapBtf {
            fd: fd.as_fd(),
            key_type_id: spec.btf_key_type_id.unwrap_or(0),
            value_type_id: spec.btf_value_type_id.unwrap_or(0),
        });
    let fd = match bpf::map_create(&MapCreate { btf, ..args }) {
        // As libbpf does: BTF type info is optional for the map itself; retry without it.
        Err(_) if btf.is_some() => bpf::map_create(&args),
        other => other,
    }?;
    if let MapOrigin::GlobalData { .. } = spec.origin {
        if let Some(data) = &spec.initial_data {
            bpf::map_update_elem(fd.as_fd(), &0u32.to_ne_bytes(), data, 0)?;
        }
        if spec.is_readonly() {
            // Frozen + BPF_F_RDONLY_PROG: the verifier treats .rodata values as constants, as it
            // does for libbpf-loaded programs.
            bpf::map_freeze(fd.as_fd())?;
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
    btf_fd: Option<&'a OwnedFd>,
    fd_array: &'a [RawFd],
    func_info: &'a [sys::bpf_func_info],
    line_info: &'a [sys::bpf_line_info],
}

impl LoadArgs<'_> {
    /// One `BPF_PROG_LOAD`; returns the log's statistics on success, the error and log on failure.
    /// The program is unloaded again at once: only the verdict is wanted.
    fn run(&self, log_level: u32, log_size: usize) -> Result<String, (SyscallError, String)> {
        let mut log = vec![0u8; log_size];
        let load = ProgLoad {
            prog_type: self.prog_type,
            name: self.name,
            license: self.license,
            insns: self.insns,
            expected_attach_type: self.expected_attach_type,
            prog_flags: self.prog_flags,
            kern_version: self.kern_version,
            attach_btf_id: self.attach_btf_id,
            btf: self.btf_fd.map(|fd| fd.as_fd()),
            fd_array: self.fd_array,
            func_info: self.func_info,
            line_info: self.line_info,
            log_level,
        };
        let result = bpf::prog_load(&load, &mut log);
        let text = bpf::log_text(&log);
        match result {
            Ok(fd) => {
                drop(fd);
                Ok(text.trim().to_string())
            }
            Err(e) => Err((e, text)),
        }
    }
}

/// Which instructions the kernel verifier visited, from its log at `log_level` 2 (it prints
/// every instruction it processes as `N: (code) ...` and each state as `N: R0=...`; `from N
/// to M:` lines and source comments name no visit). An instruction it never visited is dead:
/// no run can reach it (typically code behind a `const volatile` switch in a frozen `.rodata`,
/// such as libbpf-tools' `filter_cg` test of a CGROUP_ARRAY). `None` when the log shows no
/// instruction at all (truncated, or not a level-2 log).
pub fn visited_instructions(log: &str, insn_count: usize) -> Option<Vec<bool>> {
    let mut visited = vec![false; insn_count];
    let mut any = false;
    for line in log.lines() {
        let Some((index, rest)) = line.split_once(": ") else {
            continue;
        };
        let Ok(index) = index.trim().parse::<usize>() else {
            continue;
        };
        if !(rest.starts_with('(') || rest.starts_with('R') || rest.starts_with("frame")) {
            continue;
        }
        if let Some(v) = visited.get_mut(index) {
            *v = true;
            any = true;
        }
    }
    any.then_some(visited)
}

#[cfg(test)]
mod tests {
    //! The gate's error paths, with the kernel's answers chosen through `sys`'s test override:
    //! no root needed, and every answer (EPERM, E2BIG, a rejecting log) is exactly the one
    //! under test.

    use std::cell::RefCell;
    use std::rc::Rc;

    use bpftime_abi::sys::{fake, Call};

    use super::*;

    fn object(name: &str) -> BpfObject {
        let path = format!("{}/{name}.bpf.o", env!("BPFTIME_TEST_BPF_DIR"));
        BpfObject::from_file(&path).unwrap_or_else(|e| panic!("loading {path}: {e}"))
    }

    /// `uprobe_counter`'s `count_arg`: one hash map, object BTF, no attach target.
    fn count_arg() -> (BpfObject, usize) {
        let obj = object("uprobe_counter");
        let index = obj.program_index("count_arg").expect("count_arg");
        (obj, index)
    }

    fn os_text(errno: i32) -> String {
        std::io::Error::from_raw_os_error(errno).to_string()
    }

    #[test]
    fn eperm_from_prog_load_says_what_is_missing() {
        let (obj, index) = count_arg();
        let _fake = fake::install(|call: &mut Call<'_>| match call {
            Call::ProgLoad { .. } => Err(libc::EPERM),
            other => Ok(fake::success(other)),
        });
        let err = verify(&obj, index).unwrap_err();
        match &err {
            VerifyError::NotPermitted {
                program,
                section,
                source,
            } => {
                assert_eq!(program, "count_arg");
                assert!(section.starts_with("uprobe"), "{section}");
                assert_eq!(
                    (source.call, source.errno()),
                    ("BPF_PROG_LOAD", libc::EPERM)
                );
            }
            other => panic!("expected NotPermitted, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("count_arg"), "{msg}");
        assert!(msg.contains(&os_text(libc::EPERM)), "{msg}");
        assert!(msg.contains("needs root or CAP_BPF"), "{msg}");
        assert!(!msg.contains("rejected by the kernel verifier"), "{msg}");
    }

    #[test]
    fn a_rejected_program_keeps_its_log_and_the_message_its_last_lines() {
        let (obj, index) = count_arg();
        let text: String = (0..100).map(|i| format!("insn {i:03}: bad\n")).collect();
        let levels = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&levels);
        let log_text = text.clone();
        let _fake = fake::install(move |call: &mut Call<'_>| match call {
            Call::ProgLoad { load, log } => {
                seen.borrow_mut().push(load.log_level);
                // The kernel writes the verifier's trace only at level 1 and up.
                if load.log_level & LOG_LEVEL1 != 0 {
                    fake::write_log(log, &log_text);
                }
                Err(libc::EACCES)
            }
            other => Ok(fake::success(other)),
        });
        let err = verify(&obj, index).unwrap_err();
        // A quiet first attempt, then one with the whole log.
        assert_eq!(*levels.borrow(), [LOG_STATS, LOG_LEVEL1 | LOG_STATS]);
        let msg = err.to_string();
        match err {
            VerifyError::Rejected {
                program,
                source,
                log,
                log_tail,
                ..
            } => {
                assert_eq!(program, "count_arg");
                assert_eq!(
                    (source.call, source.errno()),
                    ("BPF_PROG_LOAD", libc::EACCES)
                );
                assert_eq!(log, text);
                let tail: Vec<&str> = log_tail.lines().collect();
                assert_eq!(tail.len(), LOG_TAIL_LINES);
                assert_eq!(tail.first(), Some(&"insn 060: bad"));
                assert_eq!(tail.last(), Some(&"insn 099: bad"));
            }
            other => panic!("expected Rejected, got {other}"),
        }
        assert!(msg.contains("rejected by the kernel verifier"), "{msg}");
        assert!(msg.contains(&os_text(libc::EACCES)), "{msg}");
        assert!(msg.contains("insn 099: bad"), "{msg}");
        assert!(!msg.contains("insn 059"), "{msg}");
    }

    #[test]
    fn e2big_on_map_create_names_the_map_and_loads_nothing() {
        let (obj, index) = count_arg();
        let calls = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&calls);
        let _fake = fake::install(move |call: &mut Call<'_>| {
            seen.borrow_mut().push(call.name());
            match call {
                Call::MapCreate(_) => Err(libc::E2BIG),
                other => Ok(fake::success(other)),
            }
        });
        let err = verify(&obj, index).unwrap_err();
        let msg = err.to_string();
        match err {
            VerifyError::MapCreate { map, source, .. } => {
                assert_eq!(map, "counts");
                assert_eq!(
                    (source.call, source.errno()),
                    ("BPF_MAP_CREATE", libc::E2BIG)
                );
            }
            other => panic!("expected MapCreate, got {other}"),
        }
        assert!(msg.contains("creating kernel map counts failed"), "{msg}");
        assert!(msg.contains(&os_text(libc::E2BIG)), "{msg}");
        assert!(
            !calls.borrow().contains(&"BPF_PROG_LOAD"),
            "{:?}",
            calls.borrow()
        );
    }

    #[test]
    fn a_map_refusing_its_btf_types_is_created_without_them() {
        let (obj, index) = count_arg();
        let creates = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&creates);
        let _fake = fake::install(move |call: &mut Call<'_>| match call {
            Call::MapCreate(args) => {
                seen.borrow_mut().push(args.btf.is_some());
                if args.btf.is_some() {
                    Err(libc::EINVAL)
                } else {
                    Ok(fake::success(call))
                }
            }
            Call::ProgLoad { log, .. } => {
                fake::write_log(log, "processed 12 insns (limit 1000000)\n");
                Ok(fake::success(call))
            }
            other => Ok(fake::success(other)),
        });
        let v = verify(&obj, index).expect("accepted");
        assert_eq!(*creates.borrow(), [true, false]);
        assert_eq!(v.stats, "processed 12 insns (limit 1000000)");
        assert_eq!(v.insns, obj.programs[index].insns);
    }

    #[test]
    fn rejected_object_btf_is_left_out_of_the_load() {
        let (obj, index) = count_arg();
        let with_btf = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&with_btf);
        let _fake = fake::install(move |call: &mut Call<'_>| match call {
            Call::BtfLoad { .. } => Err(libc::EINVAL),
            Call::ProgLoad { load, .. } => {
                seen.borrow_mut()
                    .push((load.btf.is_some(), load.func_info.len()));
                Ok(fake::success(call))
            }
            Call::MapCreate(args) => {
                seen.borrow_mut().push((args.btf.is_some(), 0));
                Ok(fake::success(call))
            }
            other => Ok(fake::success(other)),
        });
        verify(&obj, index).expect("accepted");
        assert_eq!(*with_btf.borrow(), [(false, 0), (false, 0)]);
    }

    #[test]
    fn unusable_bpf_is_a_typed_error_with_the_hint() {
        let _fake = fake::install(|call: &mut Call<'_>| match call {
            Call::MapCreate(_) => Err(libc::EPERM),
            other => Ok(fake::success(other)),
        });
        let err = kernel_bpf_available().unwrap_err();
        assert_eq!(err.0.errno(), libc::EPERM);
        let msg = err.to_string();
        assert!(msg.contains(&os_text(libc::EPERM)), "{msg}");
        assert!(msg.contains("are you root with CAP_BPF?"), "{msg}");
    }

    #[test]
    fn visited_instructions_come_from_a_level_2_log() {
        let log = "func#0 @0\n0: R1=ctx() R10=fp0\n0: (b7) r0 = 0                      ; R0_w=0\n\
                   1: (15) if r0 == 0x0 goto pc+2\nfrom 1 to 4: R0=0\n; return 0; @ x.c:3\n\
                   4: (95) exit\nprocessed 3 insns (limit 1000000)\n";
        assert_eq!(
            visited_instructions(log, 5),
            Some(vec![true, true, false, false, true])
        );
        assert_eq!(visited_instructions("processed 0 insns\n", 5), None);
    }
}
