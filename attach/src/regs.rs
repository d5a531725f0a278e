//! The BPF program context of a uprobe: the kernel's x86_64 `struct pt_regs`.

/// Kernel-layout x86_64 `struct pt_regs` (the uprobe program context), so `PT_REGS_PARM1..6`
/// (`rdi rsi rdx rcx r8 r9`) and `PT_REGS_RC` (`rax`) work unchanged.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PtRegs {
    /// Callee-saved (r15-r12, rbp, rbx): the caller's values, restored from here on the way out.
    pub r15: u64,
    /// Callee-saved, see [`PtRegs::r15`].
    pub r14: u64,
    /// Callee-saved, see [`PtRegs::r15`].
    pub r13: u64,
    /// Callee-saved, see [`PtRegs::r15`].
    pub r12: u64,
    /// Callee-saved frame pointer (when the code keeps one).
    pub rbp: u64,
    /// Callee-saved, see [`PtRegs::r15`].
    pub rbx: u64,
    /// Caller-saved scratch register.
    pub r11: u64,
    /// Caller-saved scratch register (the static chain pointer, for the few ABIs that use one).
    pub r10: u64,
    /// Sixth integer argument (`PT_REGS_PARM6`).
    pub r9: u64,
    /// Fifth integer argument (`PT_REGS_PARM5`).
    pub r8: u64,
    /// Return value (`PT_REGS_RC`) in a return hook; at an entry, whatever the caller left (for
    /// a variadic call, `al` is the number of vector registers holding arguments).
    pub rax: u64,
    /// Fourth integer argument (`PT_REGS_PARM4`).
    pub rcx: u64,
    /// Third integer argument (`PT_REGS_PARM3`), or the high half of a 128-bit return value.
    pub rdx: u64,
    /// Second integer argument (`PT_REGS_PARM2`).
    pub rsi: u64,
    /// First integer argument (`PT_REGS_PARM1`).
    pub rdi: u64,
    /// The kernel's syscall number slot; the hook stubs store -1 (`u64::MAX`), "not in a
    /// syscall", as a uprobe outside a syscall sees it.
    pub orig_rax: u64,
    /// The hooked address at an entry (function start, or start + offset); the original return
    /// address in a return hook.
    pub rip: u64,
    /// Code segment selector: always `0x33` (`__USER_CS`, 64-bit user mode) from the stubs.
    pub cs: u64,
    /// RFLAGS at the hook, as `pushfq` saved it.
    pub eflags: u64,
    /// Stack pointer as the hooked code had it: at a function entry it points at the return
    /// address, in a return hook just above where that was.
    pub rsp: u64,
    /// Stack segment selector: always `0x2b` (`__USER_DS`) from the stubs.
    pub ss: u64,
}

const _: () = assert!(std::mem::size_of::<PtRegs>() == 168);

impl PtRegs {
    /// `PT_REGS_PARM1..6` (1-based), `None` beyond 6.
    pub fn arg(&self, n: usize) -> Option<u64> {
        Some(match n {
            1 => self.rdi,
            2 => self.rsi,
            3 => self.rdx,
            4 => self.rcx,
            5 => self.r8,
            6 => self.r9,
            _ => return None,
        })
    }

    /// `PT_REGS_RC`.
    pub fn rc(&self) -> u64 {
        self.rax
    }

    /// Raw bytes of the context as a BPF program reads them.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: PtRegs is repr(C), made only of u64 fields, no padding.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }

    /// Mutable raw bytes of the context.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; every bit pattern is a valid PtRegs.
        unsafe {
            std::slice::from_raw_parts_mut(
                (self as *mut Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }
}

/// The saved vector argument/return registers (xmm0-7), 8 bytes after the [`PtRegs`] in the frame
/// built by the hook stubs.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct XmmRegs(pub [[u64; 2]; 8]);
