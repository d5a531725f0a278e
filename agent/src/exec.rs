//! The agent follows what a process execs, as kernel uprobes belong to the file and probe every
//! process that runs it: an entry hook on libc's `execve` and `execveat` puts the agent's
//! variables (`LD_PRELOAD` with this library, `BPFTIME_AGENT_CONFIG`, the tree's root pid) into
//! the environment the new program gets, whatever environment the caller passes (`env -i`, an
//! attached process's own environment, which never had them). The program then loads the agent
//! with the same config and hooks what it runs (or nothing, if its tree was detached).
//!
//! The new environment is built in memory of its own (`mmap`, no allocator: the caller may be
//! a `vfork` child sharing its parent's heap), and the caller's array and strings are read with
//! `process_vm_readv` on this process, so a bad `envp` is left for the kernel to refuse
//! (EFAULT) instead of crashing the caller.

use std::ffi::{CStr, CString};

use bpftime_attach::{EntryAction, ProbeHandler, PtRegs};
// The runtime's reads that cannot fault (as `bpf_probe_read_user` does them).
use bpftime_runtime::helpers::probe;

/// The variables every exec'd program of the tree gets.
pub struct ExecFollower {
    /// `NAME=VALUE` entries set as they are (`LD_PRELOAD` is merged with the caller's apart).
    vars: Vec<CString>,
    /// This library's path, as `LD_PRELOAD` names it.
    library: String,
    /// Which argument holds `envp`: 3 for `execve`, 4 for `execveat`.
    envp_arg: usize,
}

/// At most this many environment entries and bytes are rewritten (a larger environment is
/// passed on as it is).
const MAX_ENTRIES: usize = 4096;
const MAX_BYTES: usize = 1 << 20;

impl ExecFollower {
    /// The follower for `execve` (`envp_arg` 3) or `execveat` (4), carrying `config`; `root`
    /// is the pid of the tree's first process (status files are named after it).
    pub fn new(library: &str, config: &std::path::Path, root: u32, envp_arg: usize) -> Self {
        let var = |name: &str, value: &str| CString::new(format!("{name}={value}")).ok();
        let vars = [
            var("BPFTIME_AGENT_CONFIG", &config.to_string_lossy()),
            var(super::ROOT_ENV, &root.to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        Self {
            vars,
            library: library.to_string(),
            envp_arg,
        }
    }

    /// The caller's environment with ours put in, as a NULL-terminated array in fresh memory;
    /// `None` to leave the call as it is (ours are there already, or `envp` is unreadable).
    fn rewrite(&self, envp: u64) -> Option<u64> {
        let mut entries: Vec<Vec<u8>> = Vec::new();
        let mut total = 0;
        if envp != 0 {
            // One buffer for every string (its untouched pages are never faulted in).
            let mut buf = vec![0u8; MAX_BYTES + 1];
            for i in 0..MAX_ENTRIES {
                let p = read_u64(envp + 8 * i as u64)?;
                if p == 0 {
                    break;
                }
                let s = read_cstr(p, &mut buf[..=MAX_BYTES.checked_sub(total)?])?;
                total += s.len() + 1;
                entries.push(s);
            }
        }
        const PRELOAD: &[u8] = b"LD_PRELOAD=";
        let name_of =
            |e: &[u8]| -> Vec<u8> { e.iter().take_while(|&&b| b != b'=').copied().collect() };
        let lib = self.library.as_bytes();
        let old_preload = entries
            .iter()
            .find_map(|e| e.strip_prefix(PRELOAD))
            .map(<[u8]>::to_vec);
        let preloaded = old_preload
            .as_deref()
            .is_some_and(|v| v.split(|&b| b == b':' || b == b' ').any(|l| l == lib));
        let vars_there = self
            .vars
            .iter()
            .all(|v| entries.iter().any(|e| e == v.as_bytes()));
        if preloaded && vars_there {
            return None;
        }
        let ours: Vec<Vec<u8>> = self.vars.iter().map(|v| name_of(v.as_bytes())).collect();
        let mut out: Vec<Vec<u8>> = entries
            .into_iter()
            .filter(|e| !e.starts_with(PRELOAD) && !ours.contains(&name_of(e)))
            .collect();
        let mut preload = PRELOAD.to_vec();
        preload.extend_from_slice(lib);
        match old_preload {
            Some(old) if preloaded => preload = [PRELOAD, &old].concat(),
            Some(old) if !old.is_empty() => {
                preload.push(b':');
                preload.extend_from_slice(&old);
            }
            _ => {}
        }
        out.push(preload);
        out.extend(self.vars.iter().map(|v| v.as_bytes().to_vec()));
        build(&out)
    }
}

/// `entries` as a NULL-terminated `char *[]` followed by the strings, in one anonymous mapping
/// (left mapped: the exec replaces this memory, or fails and leaks one mapping).
fn build(entries: &[Vec<u8>]) -> Option<u64> {
    let table = (entries.len() + 1) * 8;
    let strings: usize = entries.iter().map(|e| e.len() + 1).sum();
    let size = table + strings;
    // SAFETY: an anonymous private mapping; no memory of ours is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base as *mut u8;
    let mut at = table;
    for (i, e) in entries.iter().enumerate() {
        // SAFETY: `size` bytes are mapped: the table's slot i and the string's bytes (with its
        // NUL) lie inside it.
        unsafe {
            let s = base.add(at);
            std::ptr::copy_nonoverlapping(e.as_ptr(), s, e.len());
            *s.add(e.len()) = 0;
            (base as *mut u64).add(i).write(s as u64);
        }
        at += e.len() + 1;
    }
    // SAFETY: the table's last slot; the mapping is zeroed, written for clarity.
    unsafe { (base as *mut u64).add(entries.len()).write(0) };
    Some(base as u64)
}

fn read_u64(addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    probe::read(addr, &mut b).then(|| u64::from_le_bytes(b))
}

/// The NUL-terminated string at `addr`, read through `buf` (it may be at most `buf.len() - 1`
/// bytes long): `None` if unreadable or longer.
fn read_cstr(addr: u64, buf: &mut [u8]) -> Option<Vec<u8>> {
    let n = probe::read_str(addr, buf)?;
    // n counts the NUL; n == buf.len() may be a string cut short: refused, not shortened.
    (n > 0 && n < buf.len()).then(|| buf[..n - 1].to_vec())
}

impl ProbeHandler for ExecFollower {
    fn on_entry(&self, regs: &mut PtRegs) -> EntryAction {
        let Some(envp) = regs.arg(self.envp_arg) else {
            return EntryAction::Continue;
        };
        if let Some(new) = self.rewrite(envp) {
            match self.envp_arg {
                3 => regs.rdx = new,
                _ => regs.rcx = new,
            }
        }
        EntryAction::Continue
    }

    fn on_return(&self, _regs: &mut PtRegs) {}
}

/// This library's file (what `LD_PRELOAD` must name), from the dynamic loader.
pub fn agent_library_path() -> Option<String> {
    let mut info: libc::Dl_info = unsafe_zeroed();
    let here = agent_library_path as *const ();
    // SAFETY: dladdr only reads the loader's tables; `info` is ours.
    if unsafe { libc::dladdr(here.cast(), &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr returned a NUL-terminated path the loader keeps.
    Some(
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned(),
    )
}

fn unsafe_zeroed() -> libc::Dl_info {
    // SAFETY: Dl_info is plain pointers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// An entry hook on libc's `vfork`, `posix_spawn`, `posix_spawnp` and `clone`: the child may
/// run as the calling thread (same memory, same TCB) before it execs, so the thread's cached
/// identity must not answer for it ([`bpftime_runtime::helpers::TaskIdentity::suspect_clone`]).
pub struct CloneWatcher;

impl ProbeHandler for CloneWatcher {
    fn on_entry(&self, _regs: &mut PtRegs) -> EntryAction {
        EntryAction::Continue
    }

    fn on_return(&self, _regs: &mut PtRegs) {}

    fn on_entry_in(
        &self,
        _regs: &mut PtRegs,
        thread: bpftime_attach::hook::ThreadSlot,
    ) -> EntryAction {
        if let Some(identity) = super::bpf::TASK_IDENTITIES.get(thread.index()) {
            identity.suspect_clone();
        }
        EntryAction::Continue
    }
}
