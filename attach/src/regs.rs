//! The BPF program context of a uprobe: the kernel's x86_64 `struct pt_regs`.

/// Kernel-layout x86_64 `struct pt_regs` (the uprobe program context), so `PT_REGS_PARM1..6`
/// (`rdi rsi rdx rcx r8 r9`) and `PT_REGS_RC` (`rax`) work unchanged.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PtRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
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
