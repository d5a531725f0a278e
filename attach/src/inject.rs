//! ptrace injection: load the agent into a running process with `dlopen`, and call its exported
//! control functions (`bpftime_agent_start`, `bpftime_agent_detach`).
//!
//! How a remote call is made safe:
//! * **Safe point.** A thread is only hijacked where it cannot hold the malloc or loader lock:
//!   not inside the dynamic loader, not inside libc unless blocked in one of a few blocking
//!   syscalls that glibc never issues with those locks held (nanosleep, read, poll, epoll_wait,
//!   ...), and with no loader return address in the top of its stack. Otherwise the thread is
//!   let run for a millisecond and stopped again, and the other threads of the process are tried;
//!   after `max_tries` rounds injection fails with [`InjectError::NoSafePoint`] and the target is
//!   left untouched.
//! * **Syscall restart.** A thread stopped in a blocking syscall has `rax = -ERESTART*`; the
//!   injected call runs with `orig_rax = -1` so the kernel does not rewind `rip`, and the original
//!   registers (with `orig_rax`) are restored afterwards, so the sleep restarts normally.
//! * **Stack.** The call runs below the 128-byte red zone, with strings copied below that,
//!   `rsp % 16 == 8` at function entry, and a return address of 0: the call is finished when the
//!   thread faults at `rip == 0` (SIGSEGV, swallowed). Other signals arriving meanwhile are
//!   delivered.

use crate::error::InjectError;
use crate::procmaps::{self, MapEntry};
use crate::symbols::Resolver;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Tunables of remote calls.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// How long one remote call may take.
    pub call_timeout: Duration,
    /// Rounds over the process's threads looking for a safe point.
    pub max_tries: u32,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            call_timeout: Duration::from_secs(10),
            max_tries: 2000,
        }
    }
}

/// What an injection did.
#[derive(Debug, Clone)]
pub struct InjectReport {
    /// The thread that made the calls.
    pub tid: i32,
    /// `dlopen`'s handle in the target.
    pub handle: u64,
    /// `bpftime_agent_start`'s return value, if called.
    pub start_result: Option<i64>,
    /// Stops rejected as unsafe before a safe point was found.
    pub unsafe_stops: u32,
    /// Wall time of the whole injection, resolution and safe-point search included.
    pub elapsed: Duration,
}

const PTRACE_EVENT_STOP: i32 = 128;

fn perr(op: &'static str, tid: i32) -> InjectError {
    InjectError::Ptrace {
        op,
        tid,
        source: std::io::Error::last_os_error(),
    }
}

/// Syscalls glibc does not issue while holding the allocator or loader locks.
const SAFE_SYSCALLS: &[u64] = &[
    0,   // read
    7,   // poll
    23,  // select
    34,  // pause
    35,  // nanosleep
    43,  // accept
    45,  // recvfrom
    47,  // recvmsg
    61,  // wait4
    128, // rt_sigtimedwait
    130, // rt_sigsuspend
    230, // clock_nanosleep
    232, // epoll_wait
    247, // waitid
    270, // pselect6
    271, // ppoll
    281, // epoll_pwait
    288, // accept4
    441, // epoll_pwait2
];

/// One seized thread. Detached (registers restored) on drop.
struct Tracee {
    pid: i32,
    tid: i32,
    saved: Option<libc::user_regs_struct>,
    mem: std::fs::File,
}

impl Tracee {
    /// Seizes and stops `tid`.
    fn seize(pid: i32, tid: i32) -> Result<Self, InjectError> {
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|source| InjectError::Memory { pid, source })?;
        // SAFETY: plain ptrace requests on a thread id; errors are checked.
        unsafe {
            if libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, 0usize) != 0 {
                return Err(perr("SEIZE", tid));
            }
        }
        let mut t = Tracee {
            pid,
            tid,
            saved: None,
            mem,
        };
        t.interrupt()?;
        Ok(t)
    }

    fn interrupt(&mut self) -> Result<(), InjectError> {
        // SAFETY: ptrace on a seized thread.
        if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, self.tid, 0usize, 0usize) } != 0 {
            return Err(perr("INTERRUPT", self.tid));
        }
        self.wait_for_event_stop()
    }

    /// Waits until the thread reports the interrupt stop, delivering other signals.
    fn wait_for_event_stop(&mut self) -> Result<(), InjectError> {
        loop {
            let status = self.wait(None)?.expect("blocking wait");
            let sig = libc::WSTOPSIG(status);
            if status >> 16 == PTRACE_EVENT_STOP {
                return Ok(());
            }
            // a signal-delivery stop that came first: deliver it and keep waiting
            self.cont(sig)?;
        }
    }

    /// `waitpid` on the thread; `timeout = None` blocks. Returns `None` on timeout.
    fn wait(&self, timeout: Option<Duration>) -> Result<Option<i32>, InjectError> {
        let start = Instant::now();
        loop {
            let mut status = 0;
            let flags = libc::__WALL | if timeout.is_some() { libc::WNOHANG } else { 0 };
            // SAFETY: waitpid on our tracee with a valid status pointer.
            let r = unsafe { libc::waitpid(self.tid, &mut status, flags) };
            if r < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(perr("waitpid", self.tid));
            }
            if r == self.tid {
                if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                    return Err(InjectError::Exited {
                        pid: self.pid,
                        status,
                    });
                }
                return Ok(Some(status));
            }
            if let Some(t) = timeout {
                if start.elapsed() > t {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn cont(&self, sig: i32) -> Result<(), InjectError> {
        // SAFETY: ptrace on a stopped seized thread.
        if unsafe { libc::ptrace(libc::PTRACE_CONT, self.tid, 0usize, sig as usize) } != 0 {
            return Err(perr("CONT", self.tid));
        }
        Ok(())
    }

    fn getregs(&self) -> Result<libc::user_regs_struct, InjectError> {
        // SAFETY: user_regs_struct is plain data; ptrace fills it.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointer for a stopped tracee.
        if unsafe { libc::ptrace(libc::PTRACE_GETREGS, self.tid, 0usize, &mut r) } != 0 {
            return Err(perr("GETREGS", self.tid));
        }
        Ok(r)
    }

    fn setregs(&self, r: &libc::user_regs_struct) -> Result<(), InjectError> {
        // SAFETY: valid in-pointer for a stopped tracee.
        if unsafe { libc::ptrace(libc::PTRACE_SETREGS, self.tid, 0usize, r) } != 0 {
            return Err(perr("SETREGS", self.tid));
        }
        Ok(())
    }

    fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), InjectError> {
        self.mem
            .write_all_at(data, addr)
            .map_err(|source| InjectError::Memory {
                pid: self.pid,
                source,
            })
    }

    fn read_mem(&self, addr: u64, len: usize) -> Result<Vec<u8>, InjectError> {
        let mut buf = vec![0u8; len];
        let n = self
            .mem
            .read_at(&mut buf, addr)
            .map_err(|source| InjectError::Memory {
                pid: self.pid,
                source,
            })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Why the current stop is not a safe point (`None` = safe).
    fn unsafe_reason(
        &self,
        regs: &libc::user_regs_struct,
        maps: &[MapEntry],
    ) -> Option<&'static str> {
        let is_ld = |m: &MapEntry| m.exec && m.file_name().starts_with("ld-");
        let is_libc = |m: &MapEntry| {
            m.exec && (m.file_name().starts_with("libc.so") || m.file_name().starts_with("libc-"))
        };
        let rip = regs.rip;
        if maps.iter().any(|m| is_ld(m) && m.contains(rip)) {
            return Some("inside the dynamic loader");
        }
        if maps
            .iter()
            .any(|m| m.exec && m.file_name().starts_with("libbpftime_agent") && m.contains(rip))
        {
            return Some("inside the agent (it may hold its own locks)");
        }
        if maps.iter().any(|m| is_libc(m) && m.contains(rip)) {
            let in_syscall = (regs.orig_rax as i64) >= 0;
            if !(in_syscall && SAFE_SYSCALLS.contains(&regs.orig_rax)) {
                return Some("inside libc");
            }
        }
        let stack = self.read_mem(regs.rsp, 1024).unwrap_or_default();
        let loader_frame = stack.chunks_exact(8).any(|w| {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            maps.iter().any(|m| is_ld(m) && m.contains(v))
        });
        if loader_frame {
            return Some("a loader frame is on the stack");
        }
        None
    }

    /// Calls `func(args..)` in the stopped thread; `strings` are copied into the target and
    /// their addresses substituted for args equal to `STR0`, `STR0 + 1`, ...
    fn call(
        &mut self,
        func: u64,
        args: &[u64],
        strings: &[&[u8]],
        name: &str,
        timeout: Duration,
    ) -> Result<u64, InjectError> {
        let saved = match self.saved {
            Some(r) => r,
            None => {
                let r = self.getregs()?;
                self.saved = Some(r);
                r
            }
        };
        let mut sp = saved.rsp - 128; // red zone
        let mut addrs = Vec::new();
        for s in strings {
            sp -= s.len() as u64 + 1;
            let mut bytes = s.to_vec();
            bytes.push(0);
            self.write_mem(sp, &bytes)?;
            addrs.push(sp);
        }
        sp &= !15;
        sp -= 8;
        self.write_mem(sp, &0u64.to_le_bytes())?; // return address 0: the "done" trap
        let mut r = saved;
        let argv: Vec<u64> = args
            .iter()
            .map(|&a| {
                if (STR0..STR0 + addrs.len() as u64).contains(&a) {
                    addrs[(a - STR0) as usize]
                } else {
                    a
                }
            })
            .collect();
        let regs_slots = [
            &mut r.rdi, &mut r.rsi, &mut r.rdx, &mut r.rcx, &mut r.r8, &mut r.r9,
        ];
        for (slot, v) in regs_slots.into_iter().zip(argv.iter()) {
            *slot = *v;
        }
        r.rsp = sp;
        r.rip = func;
        r.rax = 0;
        r.orig_rax = u64::MAX; // -1: not in a syscall, no restart rewinding
        self.setregs(&r)?;
        self.cont(0)?;
        let start = Instant::now();
        let result = loop {
            let left = timeout.saturating_sub(start.elapsed());
            let Some(status) = self.wait(Some(left))? else {
                let _ = self.interrupt();
                return Err(InjectError::Timeout {
                    pid: self.pid,
                    function: name.to_string(),
                    ms: timeout.as_millis(),
                });
            };
            let sig = libc::WSTOPSIG(status);
            if status >> 16 == PTRACE_EVENT_STOP {
                self.cont(0)?;
                continue;
            }
            if sig == libc::SIGSEGV || sig == libc::SIGBUS || sig == libc::SIGILL {
                let now = self.getregs()?;
                if now.rip == 0 && sig == libc::SIGSEGV {
                    break now.rax;
                }
                // leave the thread where it was: restore and report
                self.setregs(&saved)?;
                return Err(InjectError::Crashed {
                    pid: self.pid,
                    function: name.to_string(),
                    signal: sig,
                    rip: now.rip,
                });
            }
            self.cont(sig)?; // deliver unrelated signals
        };
        self.setregs(&saved)?;
        Ok(result)
    }
}

/// Placeholder argument values replaced by the addresses of the call's strings.
pub const STR0: u64 = 0xB9F7_0000_0000_0000;

impl Drop for Tracee {
    fn drop(&mut self) {
        if let Some(r) = self.saved.take() {
            let _ = self.setregs(&r);
        }
        // SAFETY: detaching our own tracee.
        unsafe {
            libc::ptrace(libc::PTRACE_DETACH, self.tid, 0usize, 0usize);
        }
    }
}

fn threads_of(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_by_key(|&t| (t != pid, t)); // main thread first
    tids
}

/// Seizes some thread of `pid` stopped at a safe point.
fn seize_at_safe_point(pid: i32, opts: &InjectOptions) -> Result<(Tracee, u32), InjectError> {
    let mut rejected = 0;
    let mut last_reason = "no thread could be stopped";
    for _ in 0..opts.max_tries {
        let maps = procmaps::read_maps(Some(pid as u32))?;
        for tid in threads_of(pid) {
            let attempt = Tracee::seize(pid, tid).and_then(|t| {
                let regs = t.getregs()?;
                Ok((t.unsafe_reason(&regs, &maps), t))
            });
            match attempt {
                Ok((None, t)) => return Ok((t, rejected)),
                Ok((Some(reason), t)) => {
                    rejected += 1;
                    last_reason = reason;
                    drop(t); // detach: let it run on
                }
                // a thread other than the main one may have exited meanwhile
                Err(_) if tid != pid => continue,
                Err(e) => return Err(e),
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(InjectError::NoSafePoint {
        pid,
        tries: opts.max_tries,
        last_reason,
    })
}

fn c_string(t: &Tracee, addr: u64) -> String {
    if addr == 0 {
        return "(no dlerror message)".into();
    }
    let b = t.read_mem(addr, 512).unwrap_or_default();
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Loads `agent` into process `pid` with `dlopen(agent, RTLD_NOW)`, then, if `config` is given,
/// calls the agent's `bpftime_agent_start(config)`, which installs the hooks from a new thread
/// of the target and writes `<config>.status` when done. The target keeps running afterwards.
pub fn inject_agent(
    pid: i32,
    agent: &Path,
    config: Option<&Path>,
    opts: &InjectOptions,
) -> Result<InjectReport, InjectError> {
    let start = Instant::now();
    let agent = std::fs::canonicalize(agent)
        .map_err(|e| InjectError::Other(format!("agent {}: {e}", agent.display())))?;
    let mut res = Resolver::new(Some(pid as u32))?;
    // glibc >= 2.34 exports dlopen from libc; older ones have __libc_dlopen_mode, which wants
    // __RTLD_DLOPEN in the mode
    let (dlopen, mode) = match res.resolve("libc.so.6:dlopen") {
        Ok(t) => (t, libc::RTLD_NOW as u64),
        Err(_) => (
            res.resolve("libc.so.6:__libc_dlopen_mode")?,
            libc::RTLD_NOW as u64 | 0x8000_0000,
        ),
    };
    let dlerror = res.resolve("libc.so.6:dlerror").ok();
    let (mut t, unsafe_stops) = seize_at_safe_point(pid, opts)?;
    let path_bytes = agent.as_os_str().as_encoded_bytes();
    let handle = t.call(
        dlopen.address,
        &[STR0, mode],
        &[path_bytes],
        "dlopen",
        opts.call_timeout,
    )?;
    if handle == 0 {
        let msg = match dlerror {
            Some(e) => {
                let p = t.call(e.address, &[], &[], "dlerror", opts.call_timeout)?;
                c_string(&t, p)
            }
            None => "(dlerror not found)".into(),
        };
        return Err(InjectError::Dlopen {
            pid,
            path: agent,
            message: msg,
        });
    }
    let mut start_result = None;
    if let Some(cfg) = config {
        let cfg = std::fs::canonicalize(cfg)
            .map_err(|e| InjectError::Other(format!("config {}: {e}", cfg.display())))?;
        let mut res = Resolver::new(Some(pid as u32))?;
        let f = res.resolve(&format!("{}:bpftime_agent_start", agent.display()))?;
        let r = t.call(
            f.address,
            &[STR0],
            &[cfg.as_os_str().as_encoded_bytes()],
            "bpftime_agent_start",
            opts.call_timeout,
        )?;
        start_result = Some(r as i32 as i64);
    }
    let tid = t.tid;
    drop(t);
    Ok(InjectReport {
        tid,
        handle,
        start_result,
        unsafe_stops,
        elapsed: start.elapsed(),
    })
}

/// Calls the exported `symbol` of the loaded `module` (path or bare name) in `pid` with integer
/// arguments, at a safe point; returns its `rax`.
pub fn call_export(
    pid: i32,
    module: &str,
    symbol: &str,
    args: &[u64],
    opts: &InjectOptions,
) -> Result<u64, InjectError> {
    let mut res = Resolver::new(Some(pid as u32))?;
    let f = res.resolve(&format!("{module}:{symbol}"))?;
    let (mut t, _) = seize_at_safe_point(pid, opts)?;
    t.call(f.address, args, &[], symbol, opts.call_timeout)
}

/// Asks the agent loaded in `pid` to remove every hook (`bpftime_agent_detach()`); returns its
/// result (0 = ok). The agent library stays loaded (pending return hooks may still use it).
pub fn detach_agent(pid: i32, opts: &InjectOptions) -> Result<i64, InjectError> {
    for _ in 0..200 {
        let r = call_export(
            pid,
            "libbpftime_agent.so",
            "bpftime_agent_detach",
            &[],
            opts,
        )?;
        let r = r as i32 as i64;
        if r != -2 {
            return Ok(r);
        }
        // the agent is busy installing: try again from a later stop
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(InjectError::Other(format!(
        "the agent in process {pid} stayed busy; detach not done"
    )))
}
