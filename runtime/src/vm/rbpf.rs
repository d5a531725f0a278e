//! Adapter running programs on rbpf 0.4 (unmodified) as a second VM.
//!
//! rbpf 0.4.1 lacks or mis-executes several instructions (see the project's rbpf evidence note),
//! so a program is accepted only when every instruction is one rbpf runs correctly; otherwise
//! [`rbpf_check`] names the first offending instruction. rbpf helpers are plain `fn` pointers,
//! so each helper id gets a fixed trampoline that reaches the caller's stateful [`Helpers`]
//! through a thread-local set around each run.

use std::cell::RefCell;

use super::error::{HelperError, VmError};
use super::helpers::{CallContext, Helpers};
use super::insn::*;
use super::memory::MemoryMap;
use super::program::Program;

/// Which rbpf engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RbpfMode {
    /// rbpf's x86_64 JIT (the default).
    #[default]
    Jit,
    /// rbpf's interpreter (checks the start address of each access only).
    Interpreter,
}

/// Highest helper id the adapter has a trampoline for.
pub const MAX_RBPF_HELPER: u32 = 255;

/// Why rbpf 0.4.1 cannot run `i` correctly in `mode`, if it cannot.
pub fn rbpf_unsupported(i: &Insn, mode: RbpfMode) -> Option<&'static str> {
    let class = i.class();
    match class {
        BPF_STX if i.mode() == BPF_ATOMIC => Some("atomic operations are rejected by rbpf 0.4"),
        BPF_LDX if i.mode() == BPF_MEMSX => Some("sign-extending loads are rejected by rbpf 0.4"),
        BPF_ALU | BPF_ALU64 => {
            let op = i.op();
            if (op == BPF_DIV || op == BPF_MOD) && i.off != 0 {
                Some("sdiv/smod would run as unsigned div/mod (rbpf ignores the offset field)")
            } else if op == BPF_MOV && i.is_reg_src() && i.off != 0 {
                Some("movsx would run as a plain mov (rbpf ignores the offset field)")
            } else if op == BPF_END && class == BPF_ALU64 {
                Some("bswap is rejected by rbpf 0.4")
            } else if mode == RbpfMode::Jit && class == BPF_ALU && op == BPF_MOV && i.is_reg_src() {
                Some("rbpf's JIT does not clear the upper 32 bits on mov32 between registers")
            } else if mode == RbpfMode::Jit
                && class == BPF_ALU
                && op == BPF_END
                && !i.is_reg_src()
                && i.imm != 64
            {
                Some("rbpf's JIT does not truncate le16/le32")
            } else if mode == RbpfMode::Interpreter && class == BPF_ALU64 && op == BPF_NEG {
                Some("rbpf's interpreter panics on neg of INT64_MIN in debug builds")
            } else {
                None
            }
        }
        BPF_JMP | BPF_JMP32 => match i.op() {
            BPF_JA if class == BPF_JMP32 => Some("ja32 (gotol) is rejected by rbpf 0.4"),
            BPF_CALL if i.is_reg_src() => Some("callx is rejected by rbpf 0.4"),
            BPF_CALL if i.src == BPF_PSEUDO_CALL => {
                Some("rbpf 0.4 bpf-to-bpf calls share or shrink the caller's stack frame")
            }
            BPF_CALL if i.imm as u32 > MAX_RBPF_HELPER => {
                Some("helper id beyond the adapter's trampoline table")
            }
            BPF_JA | BPF_CALL | BPF_EXIT => None,
            _ if mode == RbpfMode::Interpreter && !i.is_reg_src() && i.imm < 0 => {
                Some("rbpf's interpreter zero-extends negative jump immediates")
            }
            _ => None,
        },
        _ => None,
    }
}

/// Check that rbpf can run every instruction of `prog` in `mode`.
pub fn rbpf_check(prog: &Program, mode: RbpfMode) -> Result<(), VmError> {
    let insns = prog.insns();
    let mut pc = 0;
    while pc < insns.len() {
        let i = &insns[pc];
        if let Some(reason) = rbpf_unsupported(i, mode) {
            return Err(VmError::RbpfRefused {
                pc,
                opc: i.opc,
                reason: reason.into(),
            });
        }
        pc += if i.opc == LDDW { 2 } else { 1 };
    }
    Ok(())
}

struct Current {
    helpers: *mut (dyn Helpers + 'static),
    mem: *mut MemoryMap<'static>,
    error: Option<VmError>,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

fn dispatch(id: u32, args: [u64; 5]) -> u64 {
    CURRENT.with(|c| {
        let mut guard = c.borrow_mut();
        let Some(cur) = guard.as_mut() else {
            return 0;
        };
        if cur.error.is_some() {
            return 0;
        }
        // SAFETY: `run_rbpf` stores pointers derived from live `&mut` borrows for the duration
        // of the rbpf call on this thread and clears them before returning.
        let (helpers, mem) = unsafe { (&mut *cur.helpers, &mut *cur.mem) };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut ctx = CallContext::new(0, mem);
            let r = helpers.call(id, args, &mut ctx);
            (r, ctx.take_tail_call().is_some())
        }));
        match r {
            Ok((Ok(v), false)) => v,
            Ok((Ok(_), true)) => {
                cur.error = Some(VmError::Rbpf("tail calls are not supported on rbpf".into()));
                0
            }
            Ok((Err(source), _)) => {
                cur.error = Some(VmError::from_helper(0, id, source));
                0
            }
            Err(_) => {
                cur.error = Some(VmError::Helper {
                    pc: 0,
                    id,
                    source: HelperError::Panicked,
                });
                0
            }
        }
    })
}

fn tramp<const ID: u32>(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
    dispatch(ID, [a, b, c, d, e])
}

macro_rules! tramp_table {
    ($($n:literal),*) => { [$(tramp::<$n> as rbpf::Helper),*] };
}

static TRAMPOLINES: [rbpf::Helper; 256] = tramp_table!(
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49,
    50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73,
    74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97,
    98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116,
    117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130, 131, 132, 133, 134, 135,
    136, 137, 138, 139, 140, 141, 142, 143, 144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154,
    155, 156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172, 173,
    174, 175, 176, 177, 178, 179, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 191, 192,
    193, 194, 195, 196, 197, 198, 199, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211,
    212, 213, 214, 215, 216, 217, 218, 219, 220, 221, 222, 223, 224, 225, 226, 227, 228, 229, 230,
    231, 232, 233, 234, 235, 236, 237, 238, 239, 240, 241, 242, 243, 244, 245, 246, 247, 248, 249,
    250, 251, 252, 253, 254, 255
);

extern "C" fn dispatch_c(a: u64, b: u64, c: u64, d: u64, e: u64, id: u64) -> u64 {
    dispatch(id as u32, [a, b, c, d, e])
}

/// rbpf 0.4.1's JIT calls helpers with `rsp` misaligned by 8, which breaks any helper using
/// aligned SSE spills. For its JIT each helper id therefore gets a tiny native stub that aligns
/// the stack and calls [`dispatch_c`] with the id in the sixth argument register.
struct AlignStubs {
    base: usize,
}

const STUB_STRIDE: usize = 32;

fn align_stubs() -> Result<&'static AlignStubs, VmError> {
    static STUBS: std::sync::OnceLock<Result<AlignStubs, VmError>> = std::sync::OnceLock::new();
    STUBS
        .get_or_init(|| {
            let n = MAX_RBPF_HELPER as usize + 1;
            let mut code = Vec::with_capacity(n * STUB_STRIDE);
            let target = dispatch_c as *const () as usize as u64;
            for id in 0..n as u32 {
                let start = code.len();
                code.extend_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xe4, 0xf0]);
                code.extend_from_slice(&[0x41, 0xb9]);
                code.extend_from_slice(&id.to_le_bytes());
                code.extend_from_slice(&[0x48, 0xb8]);
                code.extend_from_slice(&target.to_le_bytes());
                code.extend_from_slice(&[0xff, 0xd0, 0x48, 0x89, 0xec, 0x5d, 0xc3]);
                code.resize(start + STUB_STRIDE, 0xcc);
            }
            // The stubs live for the rest of the process: rbpf programs hold their addresses.
            let stubs = bpftime_abi::Mmap::executable(&code)
                .map_err(|e| VmError::Rbpf(format!("mapping helper stubs: {e}")))?
                .leak();
            Ok(AlignStubs {
                base: stubs.as_ptr() as usize,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn jit_helper(id: u32) -> Result<rbpf::Helper, VmError> {
    let stubs = align_stubs()?;
    let addr = stubs.base + id as usize * STUB_STRIDE;
    // SAFETY: rbpf's JIT only takes the address of a registered helper and calls it with the
    // SysV convention (args in rdi, rsi, rdx, rcx, r8), which is what the stub expects; the stub
    // is valid executable code for the rest of the process. These pointers are never called
    // from Rust (the interpreter mode registers `tramp::<ID>` instead).
    Ok(unsafe { std::mem::transmute::<usize, rbpf::Helper>(addr) })
}

/// A program compiled once for rbpf (its JIT image or its interpreter), run many times.
pub struct RbpfProgram {
    // Field order matters: `vm` borrows `_bytes` and is dropped first.
    vm: rbpf::EbpfVmRaw<'static>,
    _bytes: Box<[u8]>,
    mode: RbpfMode,
}

// SAFETY: rbpf's `EbpfVmRaw` is neither `Send` nor `Sync` only because its stack verifier can
// hold a `Box<dyn Any>` given to `set_stack_usage_calculator`, which this adapter never calls
// (the field stays `None`). Everything else it holds is plain data (the bytes, a helper table of
// `fn` pointers, allowed-memory ranges) or the JIT's code buffer, which is written once by
// `jit_compile` in `new` and only executed afterwards. Shared use goes through `&self` methods
// that only read (`run_shared`, JIT mode); mutation (`run` in interpreter mode registers allowed
// memory) needs `&mut self`.
unsafe impl Send for RbpfProgram {}
// SAFETY: see `Send` above.
unsafe impl Sync for RbpfProgram {}

impl std::fmt::Debug for RbpfProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbpfProgram")
            .field("mode", &self.mode)
            .finish()
    }
}

fn rbpf_err(e: std::io::Error) -> VmError {
    VmError::Rbpf(e.to_string())
}

impl RbpfProgram {
    /// Check `prog` with [`rbpf_check`], load it into rbpf, register a trampoline for every
    /// helper id it calls and (in JIT mode) compile it.
    pub fn new(prog: &Program, mode: RbpfMode) -> Result<Self, VmError> {
        rbpf_check(prog, mode)?;
        let bytes: Box<[u8]> = encode_insns(prog.insns()).into_boxed_slice();
        // SAFETY: the boxed bytes never move or change and outlive `vm` (declared before
        // `_bytes`, so dropped first); rbpf only reads them.
        let static_bytes: &'static [u8] =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) };
        let mut vm = rbpf::EbpfVmRaw::new(Some(static_bytes)).map_err(rbpf_err)?;
        let insns = prog.insns();
        let mut pc = 0;
        while pc < insns.len() {
            let i = &insns[pc];
            if i.opc == CALL && i.src == 0 {
                let id = i.imm as u32;
                let f = match mode {
                    RbpfMode::Jit => jit_helper(id)?,
                    RbpfMode::Interpreter => TRAMPOLINES[id as usize],
                };
                vm.register_helper(id, f).map_err(rbpf_err)?;
            }
            pc += if i.opc == LDDW { 2 } else { 1 };
        }
        if mode == RbpfMode::Jit {
            let compiled =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.jit_compile()));
            match compiled {
                Ok(r) => r.map_err(rbpf_err)?,
                Err(_) => {
                    return Err(VmError::Rbpf(
                        "rbpf 0.4.1's JIT overflowed its single 4 KiB code page".into(),
                    ))
                }
            }
        }
        Ok(Self {
            vm,
            _bytes: bytes,
            mode,
        })
    }

    /// Whether this is rbpf's interpreter or its JIT image.
    pub fn mode(&self) -> RbpfMode {
        self.mode
    }

    /// Run with r1 = `data` (rbpf passes no length in r2). Helper errors cannot stop rbpf
    /// mid-run: the failing helper returns 0 and the error is reported after the run. In
    /// interpreter mode the regions of `mem` are registered as allowed memory before the run
    /// (regions added by helpers during the run are not visible to rbpf's checks).
    ///
    /// # Safety
    /// In JIT mode rbpf checks no memory access: the program must only touch valid memory.
    pub unsafe fn run(
        &mut self,
        data: &mut [u8],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError> {
        if self.mode == RbpfMode::Interpreter {
            for r in mem.regions() {
                self.vm.register_allowed_memory(r.start..r.start + r.len);
            }
        }
        // SAFETY: see the function contract.
        unsafe { self.execute(data, mem, helpers) }
    }

    /// [`run`](Self::run) through a shared reference, for a JIT-mode program compiled once and
    /// run many times (possibly from several threads: each run's helper state is per thread).
    /// Interpreter mode needs [`run`](Self::run), which registers the run's memory with rbpf.
    ///
    /// # Safety
    /// rbpf's JIT checks no memory access: the program must only touch valid memory.
    pub unsafe fn run_shared(
        &self,
        data: &mut [u8],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError> {
        if self.mode != RbpfMode::Jit {
            return Err(VmError::Rbpf(
                "a shared rbpf program must be JIT-compiled (the interpreter needs `run`)".into(),
            ));
        }
        // SAFETY: see the function contract.
        unsafe { self.execute(data, mem, helpers) }
    }

    /// # Safety
    /// See [`run`](Self::run).
    unsafe fn execute(
        &self,
        data: &mut [u8],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError> {
        let cur = Current {
            // SAFETY: lifetime erasure: the pointers are only used by `dispatch` on this thread
            // while `vm` runs below, during which `helpers` and `mem` stay exclusively borrowed.
            helpers: unsafe {
                std::mem::transmute::<*mut (dyn Helpers + '_), *mut (dyn Helpers + 'static)>(
                    helpers as *mut (dyn Helpers + '_),
                )
            },
            mem: (mem as *mut MemoryMap<'_>).cast::<MemoryMap<'static>>(),
            error: None,
        };
        // SAFETY: lifetime extension: rbpf uses `data` only during this call (it passes the
        // pointer to the program and keeps nothing afterwards); the borrow outlives the call.
        let data: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr(), data.len()) };
        let prev = CURRENT.with(|c| c.borrow_mut().replace(cur));
        let result = match self.mode {
            // SAFETY: see the function contract.
            RbpfMode::Jit => unsafe { self.vm.execute_program_jit(data) },
            RbpfMode::Interpreter => self.vm.execute_program(data),
        };
        let cur = CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), prev));
        if let Some(e) = cur.and_then(|c| c.error) {
            return Err(e);
        }
        result.map_err(rbpf_err)
    }
}

/// Run `prog` once on rbpf (see [`RbpfProgram`]). In JIT mode the compiled image is cached in
/// the program ([`Program::rbpf_jit`]), so only the first run pays for rbpf's JIT. The
/// interpreter is set up afresh for every run: rbpf can only add allowed-memory ranges, never
/// remove them, so a cached interpreter would keep allowing the buffers of earlier runs.
///
/// # Safety
/// In JIT mode rbpf checks no memory access: the program must only touch valid memory.
pub unsafe fn run_rbpf(
    prog: &Program,
    data: &mut [u8],
    mem: &mut MemoryMap<'_>,
    helpers: &mut dyn Helpers,
    mode: RbpfMode,
) -> Result<u64, VmError> {
    match mode {
        // SAFETY: see the function contract.
        RbpfMode::Jit => unsafe { prog.rbpf_jit()?.run_shared(data, mem, helpers) },
        RbpfMode::Interpreter => {
            let mut p = RbpfProgram::new(prog, mode)?;
            // SAFETY: see the function contract.
            unsafe { p.run(data, mem, helpers) }
        }
    }
}
