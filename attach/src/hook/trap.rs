//! The `int3` fallback, where a 5-byte detour does not fit: functions shorter than 5 bytes,
//! entries that leave or are branched into before byte 5, and any instruction probed by
//! offset (1-byte USDT nops). As kernel uprobes do, the site's first byte becomes `int3`; the
//! SIGTRAP handler finds the site, runs the dispatcher the detour stubs call on a `pt_regs`
//! built from the signal context, and continues at the site's out-of-line copy of the
//! displaced instruction followed by a jump back (the kernel's XOL slot, `arch_uprobe`).
//!
//! A `call` is emulated (the original return address is pushed, as the kernel's
//! `branch_emulate_op` does), so callees see their real caller. A SIGTRAP that is not ours
//! (another `int3`, `kill -TRAP`) goes to the handler the process had before, or gets the
//! default action. The handler is installed once and never removed; a program that installs
//! its own SIGTRAP handler later through libc's `sigaction` or `signal` keeps ours in place:
//! an entry hook on `sigaction` records its handler as the one traps that are not ours go to
//! ([`SigactionGuard`]). Only a raw `rt_sigaction` system call could replace ours.
//!
//! Cost: a signal delivery and `sigreturn` per call, about a microsecond (the uprobe
//! benchmark's `int3` row), where a detour costs nanoseconds: used only where a detour
//! cannot go.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, InstructionBlock,
};

use super::dispatch::{dispatch_entry, Site};
use crate::error::AttachError;
use crate::regs::PtRegs;

/// Trap sites by address: open addressing, never removed (sites are leaked; a thread may
/// trap on a site just disarmed and must still find it).
const SLOTS: usize = 4096;
static ADDRS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static SITES: [AtomicPtr<Site>; SLOTS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];

fn slot_of(addr: u64) -> usize {
    (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) as usize % SLOTS
}

/// Makes `site` findable by the handler (under the registry lock: one writer).
pub(super) fn register(site: &'static Site) -> Result<(), AttachError> {
    let mut i = slot_of(site.addr);
    for _ in 0..SLOTS {
        match ADDRS[i].load(Ordering::Acquire) {
            0 => {
                SITES[i].store(site as *const Site as *mut Site, Ordering::Release);
                ADDRS[i].store(site.addr, Ordering::Release);
                return Ok(());
            }
            a if a == site.addr => return Ok(()),
            _ => i = (i + 1) % SLOTS,
        }
    }
    Err(AttachError::Unpatchable {
        function: site.name.clone(),
        reason: format!("more than {SLOTS} int3 sites in one process"),
    })
}

fn lookup(addr: u64) -> Option<&'static Site> {
    let mut i = slot_of(addr);
    for _ in 0..SLOTS {
        match ADDRS[i].load(Ordering::Acquire) {
            0 => return None,
            a if a == addr => {
                let p = SITES[i].load(Ordering::Acquire);
                // SAFETY: published before the address, never freed.
                return (!p.is_null()).then(|| unsafe { &*p });
            }
            _ => i = (i + 1) % SLOTS,
        }
    }
    None
}

/// The first instruction at `addr` (readable for `max` bytes), as the site's displaced code.
///
/// # Safety
/// `addr..addr + max` is readable.
pub(super) unsafe fn first_instruction(
    addr: u64,
    max: u64,
    name: &str,
) -> Result<iced_x86::Instruction, AttachError> {
    // SAFETY: forwarded.
    let code = unsafe { std::slice::from_raw_parts(addr as *const u8, max.min(15) as usize) };
    let i = Decoder::with_ip(64, code, addr, DecoderOptions::NONE).decode();
    if i.is_invalid() {
        return Err(AttachError::Unpatchable {
            function: name.to_string(),
            reason: "the first instruction does not decode within the function".into(),
        });
    }
    Ok(i)
}

/// Builds the XOL slot of `instr` (the instruction at a trap site): its relocated copy, then
/// an absolute jump back after it; a `call` pushes the original return address and jumps to
/// the callee. Returns the slot's address.
pub(super) fn build_xol(instr: &iced_x86::Instruction, name: &str) -> Result<u64, AttachError> {
    let next = instr.next_ip();
    let fail = |reason: String| AttachError::Unpatchable {
        function: name.to_string(),
        reason,
    };
    let mut error = None;
    let page = bpftime_abi::Mmap::executable_near(instr.ip(), 1 << 31, |at| {
        let mut code = Vec::with_capacity(64);
        let absolute = |code: &mut Vec<u8>, target: u64| {
            code.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp qword [rip+0]
            code.extend_from_slice(&target.to_le_bytes());
        };
        if instr.code() == Code::Call_rel32_64 {
            code.extend_from_slice(&[0xff, 0x35, 0x06, 0, 0, 0]); // push qword [rip+6]
            absolute(&mut code, instr.near_branch_target());
            code.extend_from_slice(&next.to_le_bytes());
            return code;
        }
        match BlockEncoder::encode(
            64,
            InstructionBlock::new(std::slice::from_ref(instr), at),
            BlockEncoderOptions::NONE,
        ) {
            Ok(r) => code.extend_from_slice(&r.code_buffer),
            Err(e) => {
                error = Some(e.to_string());
                return code;
            }
        }
        absolute(&mut code, next);
        code
    })
    .map_err(|e| fail(format!("mapping its out-of-line slot: {e}")))?
    .ok_or_else(|| fail("no free page within 2 GiB for its out-of-line slot".into()))?;
    if let Some(e) = error {
        return Err(fail(format!("relocating its first instruction: {e}")));
    }
    // Slots live for the rest of the process: a thread may be executing one.
    Ok(page.leak().as_ptr() as u64)
}

/// Writes `byte` at `addr` in this process's code (through /proc/self/mem, which writes
/// read-only text without changing its protection, as ptrace does), then serialises every
/// thread's instruction stream (`membarrier` SYNC_CORE, the kernel's `text_poke_sync`).
pub(super) fn poke(addr: u64, byte: u8) -> Result<(), AttachError> {
    static MEM: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);
    let mut mem = MEM.lock().unwrap_or_else(|e| e.into_inner());
    if mem.is_none() {
        *mem = Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/self/mem")
                .map_err(|source| AttachError::Os {
                    what: "opening /proc/self/mem to write an int3",
                    source,
                })?,
        );
    }
    let file = mem.as_mut().expect("opened above");
    std::os::unix::fs::FileExt::write_all_at(&*file, &[byte], addr).map_err(|source| {
        AttachError::Os {
            what: if byte == 0xcc {
                "writing an int3"
            } else {
                "restoring a byte an int3 replaced"
            },
            source,
        }
    })?;
    sync_core();
    Ok(())
}

fn sync_core() {
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;
    static REGISTERED: Once = Once::new();
    // SAFETY: membarrier takes no pointers; failures (old kernels) leave the cross-modifying
    // write to the architecture's guarantee for a single int3 byte.
    unsafe {
        REGISTERED.call_once(|| {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            );
        });
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
            0,
            0,
        );
    }
}

/// What SIGTRAP did before us: called for traps that are not ours.
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// Our SIGTRAP action, what a guarded `sigaction(SIGTRAP, ...)` call installs instead of
/// the caller's.
static OURS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// The entry hook on libc's `sigaction` (glibc's `signal` calls it too): a new SIGTRAP
/// action becomes the one foreign traps are passed to, and the call installs ours again.
pub(super) struct SigactionGuard;

impl super::ProbeHandler for SigactionGuard {
    fn on_entry(&self, regs: &mut PtRegs) -> super::EntryAction {
        let ours = OURS.load(Ordering::Acquire);
        if regs.rdi != libc::SIGTRAP as u64 || regs.rsi == 0 || ours.is_null() {
            return super::EntryAction::Continue;
        }
        // SAFETY: the caller passes a `struct sigaction` to sigaction(2); a bad pointer
        // would have made the call fail with EFAULT: read it as the kernel would, once.
        let mut theirs: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a read of the caller's struct that cannot fault (process_vm_readv).
        let ok = unsafe {
            let local = libc::iovec {
                iov_base: (&mut theirs as *mut libc::sigaction).cast(),
                iov_len: std::mem::size_of::<libc::sigaction>(),
            };
            let remote = libc::iovec {
                iov_base: regs.rsi as *mut libc::c_void,
                iov_len: std::mem::size_of::<libc::sigaction>(),
            };
            libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0)
                == std::mem::size_of::<libc::sigaction>() as isize
        };
        if ok {
            // Leaked: a trap on another thread may be reading the previous one.
            PREVIOUS.store(Box::into_raw(Box::new(theirs)), Ordering::Release);
            regs.rsi = ours as u64;
        }
        super::EntryAction::Continue
    }
}

/// Installs the SIGTRAP handler (once per process).
pub(super) fn install_handler() -> Result<(), AttachError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction with a zeroed struct filled below; the old action is kept (leaked)
        // for chaining.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigtrap as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            let old = Box::into_raw(Box::new(std::mem::zeroed::<libc::sigaction>()));
            if libc::sigaction(libc::SIGTRAP, &act, old) != 0 {
                result = Err(AttachError::Os {
                    what: "installing the SIGTRAP handler for int3 sites",
                    source: std::io::Error::last_os_error(),
                });
                return;
            }
            PREVIOUS.store(old, Ordering::Release);
            OURS.store(Box::into_raw(Box::new(act)), Ordering::Release);
        }
    });
    result
}

/// Whether the SIGTRAP handler is installed (an int3 site exists).
pub(super) fn handler_installed() -> bool {
    !OURS.load(Ordering::Acquire).is_null()
}

const SI_KERNEL: i32 = 0x80;

extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to an SA_SIGINFO handler.
    let (code, uc) = unsafe { ((*info).si_code, &mut *(ctx as *mut libc::ucontext_t)) };
    let g = &mut uc.uc_mcontext.gregs;
    let at = (g[libc::REG_RIP as usize] as u64).wrapping_sub(1);
    let site = if code == SI_KERNEL { lookup(at) } else { None };
    let Some(site) = site else {
        chain(sig, info, ctx);
        return;
    };
    let r = |i: libc::c_int| g[i as usize] as u64;
    let mut regs = PtRegs {
        r15: r(libc::REG_R15),
        r14: r(libc::REG_R14),
        r13: r(libc::REG_R13),
        r12: r(libc::REG_R12),
        rbp: r(libc::REG_RBP),
        rbx: r(libc::REG_RBX),
        r11: r(libc::REG_R11),
        r10: r(libc::REG_R10),
        r9: r(libc::REG_R9),
        r8: r(libc::REG_R8),
        rax: r(libc::REG_RAX),
        rcx: r(libc::REG_RCX),
        rdx: r(libc::REG_RDX),
        rsi: r(libc::REG_RSI),
        rdi: r(libc::REG_RDI),
        orig_rax: u64::MAX,
        rip: at,
        cs: 0x33,
        eflags: r(libc::REG_EFL),
        rsp: r(libc::REG_RSP),
        ss: 0x2b,
    };
    // SAFETY: a leaked site; `regs` is a complete frame of the trapped thread at the site.
    let next = unsafe { dispatch_entry(site, &mut regs) };
    let mut w = |i: libc::c_int, v: u64| g[i as usize] = v as i64;
    w(libc::REG_R15, regs.r15);
    w(libc::REG_R14, regs.r14);
    w(libc::REG_R13, regs.r13);
    w(libc::REG_R12, regs.r12);
    w(libc::REG_RBP, regs.rbp);
    w(libc::REG_RBX, regs.rbx);
    w(libc::REG_R11, regs.r11);
    w(libc::REG_R10, regs.r10);
    w(libc::REG_R9, regs.r9);
    w(libc::REG_R8, regs.r8);
    w(libc::REG_RAX, regs.rax);
    w(libc::REG_RCX, regs.rcx);
    w(libc::REG_RDX, regs.rdx);
    w(libc::REG_RSI, regs.rsi);
    w(libc::REG_RDI, regs.rdi);
    w(libc::REG_RIP, next);
}

/// A SIGTRAP that is not one of our sites: what the process had installed before us.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.load(Ordering::Acquire);
    // SAFETY: `prev` is the leaked old action (or null before installation completed).
    let Some(prev) = (unsafe { prev.as_ref() }) else {
        return;
    };
    let h = prev.sa_sigaction;
    if h == libc::SIG_IGN {
        return;
    }
    if h == libc::SIG_DFL {
        // The default action (core dump), delivered once this handler returns.
        // SAFETY: async-signal-safe calls.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGTRAP, &dfl, std::ptr::null_mut());
            libc::raise(libc::SIGTRAP);
        }
        return;
    }
    // SAFETY: the process's own handler, called as the kernel would have called it.
    unsafe {
        if prev.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(h);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
            f(sig);
        }
    }
}
