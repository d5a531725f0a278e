//! A loaded program: validated instructions with resolved `lddw` relocations.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use super::error::VmError;
use super::insn::*;
use super::jit::{JitMapResolver, JitProgram};
use super::rbpf::{RbpfMode, RbpfProgram};

/// Maximum number of call frames (main program + subprograms), as in the kernel.
pub const MAX_CALL_FRAMES: usize = 8;
/// Stack bytes per frame.
pub const STACK_SIZE: usize = 512;
/// Maximum number of chained tail calls, as in the kernel.
pub const MAX_TAIL_CALLS: usize = 33;

/// Tag of values produced by `lddw rX, <func>` (`src = BPF_PSEUDO_FUNC`): the low 32 bits hold
/// the target instruction index. `callx` on such a value calls the subprogram; on any other
/// value it calls the helper with that id.
pub const FUNC_PTR_TAG: u64 = 0xbbf0_0000_0000_0000;
/// Mask selecting the tag bits of [`FUNC_PTR_TAG`].
pub const FUNC_PTR_MASK: u64 = 0xffff_ffff_0000_0000;

/// An `lddw` with a pseudo source that the caller must resolve (map fd/idx, map value, BTF id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LddwReloc {
    /// Index of the first slot of the `lddw`.
    pub pc: usize,
    /// `src` field: one of `BPF_PSEUDO_MAP_FD`, `BPF_PSEUDO_MAP_VALUE`, `BPF_PSEUDO_BTF_ID`,
    /// `BPF_PSEUDO_MAP_IDX`, `BPF_PSEUDO_MAP_IDX_VALUE`.
    pub src: u8,
    /// `imm` of the first slot (map fd / index / BTF id).
    pub imm: i32,
    /// `imm` of the second slot (offset into the map value for `*_VALUE`).
    pub next_imm: i32,
}

/// A validated program.
pub struct Program {
    insns: Vec<Insn>,
    funcs: BTreeSet<usize>,
    jit: OnceLock<Result<JitProgram, VmError>>,
    /// rbpf's JIT image, compiled on first use: rbpf recompiling on every run cost ~800 ns.
    rbpf_jit: OnceLock<Result<RbpfProgram, VmError>>,
    /// Direct entry points for the maps `lddw` tokens name, for the JIT's map fast paths.
    jit_maps: Option<Arc<dyn JitMapResolver>>,
}

// Programs are shared between threads (agents run one program from many hooked threads), with
// their cached JIT images.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Program>();
};

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("insns", &self.insns.len())
            .field("funcs", &self.funcs)
            .finish()
    }
}

fn invalid(pc: usize, i: &Insn, reason: impl Into<String>) -> VmError {
    VmError::InvalidInsn {
        pc,
        opc: i.opc,
        reason: reason.into(),
    }
}

impl Program {
    /// Validate a program that has no pseudo `lddw` other than `BPF_PSEUDO_FUNC`.
    pub fn new(insns: Vec<Insn>) -> Result<Self, VmError> {
        Self::with_relocations(insns, |r| {
            Err(format!("no resolver for lddw pseudo source {}", r.src))
        })
    }

    /// Decode raw bytecode and validate it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VmError> {
        Self::new(decode_bytes(bytes)?)
    }

    /// Validate a program, resolving each pseudo `lddw` through `resolver`, which returns the
    /// 64-bit value to load (e.g. a map handle or the address of a map value).
    pub fn with_relocations(
        mut insns: Vec<Insn>,
        mut resolver: impl FnMut(&LddwReloc) -> Result<u64, String>,
    ) -> Result<Self, VmError> {
        if insns.is_empty() {
            return Err(VmError::EmptyProgram);
        }
        let n = insns.len();
        // Slots that are the second half of an lddw.
        let mut second = vec![false; n];
        let mut pc = 0;
        while pc < n {
            if insns[pc].opc == LDDW {
                if pc + 1 >= n || insns[pc + 1].opc != 0 {
                    return Err(invalid(pc, &insns[pc], "lddw without a second slot"));
                }
                let i = insns[pc];
                let value = match i.src {
                    0 => None,
                    BPF_PSEUDO_FUNC => {
                        let target = pc as i64 + i.imm as i64 + 1;
                        if target < 0 || target as usize >= n {
                            return Err(VmError::BadJump { pc, target });
                        }
                        Some(FUNC_PTR_TAG | target as u64)
                    }
                    BPF_PSEUDO_MAP_FD
                    | BPF_PSEUDO_MAP_VALUE
                    | BPF_PSEUDO_BTF_ID
                    | BPF_PSEUDO_MAP_IDX
                    | BPF_PSEUDO_MAP_IDX_VALUE => {
                        let r = LddwReloc {
                            pc,
                            src: i.src,
                            imm: i.imm,
                            next_imm: insns[pc + 1].imm,
                        };
                        Some(resolver(&r).map_err(|reason| VmError::Relocation { pc, reason })?)
                    }
                    s => return Err(invalid(pc, &i, format!("unknown lddw source {s}"))),
                };
                if let Some(v) = value {
                    insns[pc].src = 0;
                    insns[pc].imm = v as u32 as i32;
                    insns[pc + 1].imm = (v >> 32) as u32 as i32;
                }
                second[pc + 1] = true;
                pc += 2;
            } else {
                pc += 1;
            }
        }
        let mut funcs = BTreeSet::new();
        funcs.insert(0usize);
        for pc in 0..n {
            if second[pc] {
                continue;
            }
            let i = insns[pc];
            validate_one(pc, &i, n, &second)?;
            if i.opc == CALL && i.src == BPF_PSEUDO_CALL {
                funcs.insert((pc as i64 + i.imm as i64 + 1) as usize);
            }
            if i.opc == LDDW && (insns[pc + 1].imm as u32 as u64) << 32 == FUNC_PTR_TAG {
                funcs.insert(i.imm as u32 as usize);
            }
        }
        Ok(Self {
            insns,
            funcs,
            jit: OnceLock::new(),
            rbpf_jit: OnceLock::new(),
            jit_maps: None,
        })
    }

    /// The validated instructions (one per 8-byte slot), each pseudo `lddw` replaced by the
    /// value it loads.
    pub fn insns(&self) -> &[Insn] {
        &self.insns
    }

    /// Number of instruction slots.
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    /// Never true for a validated program ([`VmError::EmptyProgram`]).
    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }

    /// Entry points of the main program (0) and every subprogram.
    pub fn functions(&self) -> &BTreeSet<usize> {
        &self.funcs
    }

    /// Let the JIT call the maps that `resolver` resolves directly (see the map fast paths in
    /// [`super::jit`]). A JIT image compiled before is dropped (the next [`jit`](Self::jit)
    /// compiles against `resolver`).
    pub fn with_jit_maps(mut self, resolver: Arc<dyn JitMapResolver>) -> Self {
        self.jit_maps = Some(resolver);
        self.jit = OnceLock::new();
        self
    }

    /// The resolver given to [`with_jit_maps`](Self::with_jit_maps).
    pub fn jit_maps(&self) -> Option<&Arc<dyn JitMapResolver>> {
        self.jit_maps.as_ref()
    }

    /// The x86_64 JIT image of this program, compiled on first use.
    pub fn jit(&self) -> Result<&JitProgram, VmError> {
        self.jit
            .get_or_init(|| JitProgram::compile(self))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// rbpf's JIT image of this program ([`RbpfProgram`] in [`RbpfMode::Jit`]), compiled on
    /// first use and shared by every later run.
    pub fn rbpf_jit(&self) -> Result<&RbpfProgram, VmError> {
        self.rbpf_jit
            .get_or_init(|| RbpfProgram::new(self, RbpfMode::Jit))
            .as_ref()
            .map_err(Clone::clone)
    }
}

fn check_target(pc: usize, off: i64, n: usize, second: &[bool]) -> Result<(), VmError> {
    let target = pc as i64 + off + 1;
    if target < 0 || target as usize >= n || second[target as usize] {
        return Err(VmError::BadJump { pc, target });
    }
    Ok(())
}

fn validate_one(pc: usize, i: &Insn, n: usize, second: &[bool]) -> Result<(), VmError> {
    if i.dst > 10 || i.src > 10 {
        return Err(invalid(pc, i, "register number out of range"));
    }
    let class = i.class();
    let writes_dst = matches!(class, BPF_ALU | BPF_ALU64 | BPF_LDX | BPF_LD);
    if writes_dst && i.dst == 10 {
        return Err(invalid(pc, i, "r10 is read-only"));
    }
    match class {
        BPF_ALU | BPF_ALU64 => {
            let op = i.op();
            match op {
                BPF_ADD | BPF_SUB | BPF_MUL | BPF_OR | BPF_AND | BPF_LSH | BPF_RSH | BPF_XOR
                | BPF_ARSH => {}
                BPF_DIV | BPF_MOD => {
                    if i.off != 0 && i.off != 1 {
                        return Err(invalid(pc, i, "div/mod offset must be 0 or 1"));
                    }
                }
                BPF_NEG => {
                    if i.is_reg_src() {
                        return Err(invalid(pc, i, "neg takes no source"));
                    }
                }
                BPF_MOV => {
                    let ok = match (class, i.is_reg_src()) {
                        (_, false) => i.off == 0,
                        (BPF_ALU, true) => matches!(i.off, 0 | 8 | 16),
                        _ => matches!(i.off, 0 | 8 | 16 | 32),
                    };
                    if !ok {
                        return Err(invalid(pc, i, "bad mov/movsx offset"));
                    }
                }
                BPF_END => {
                    if class == BPF_ALU64 && i.is_reg_src() {
                        return Err(invalid(pc, i, "bad bswap encoding"));
                    }
                    if !matches!(i.imm, 16 | 32 | 64) {
                        return Err(invalid(pc, i, "byte swap width must be 16, 32 or 64"));
                    }
                }
                _ => return Err(invalid(pc, i, "unknown ALU operation")),
            }
        }
        BPF_JMP | BPF_JMP32 => {
            let op = i.op();
            match op {
                BPF_JA => {
                    if i.is_reg_src() {
                        return Err(invalid(pc, i, "bad ja encoding"));
                    }
                    let off = if class == BPF_JMP32 {
                        i.imm as i64
                    } else {
                        i.off as i64
                    };
                    check_target(pc, off, n, second)?;
                }
                BPF_CALL => {
                    if class != BPF_JMP {
                        return Err(invalid(pc, i, "call in JMP32 class"));
                    }
                    if i.is_reg_src() {
                        // callx: target in dst
                    } else if i.src == BPF_PSEUDO_CALL {
                        check_target(pc, i.imm as i64, n, second)?;
                    } else if i.src != 0 {
                        return Err(invalid(pc, i, "unsupported call kind (kfunc?)"));
                    }
                }
                BPF_EXIT => {
                    if class != BPF_JMP || i.is_reg_src() {
                        return Err(invalid(pc, i, "bad exit encoding"));
                    }
                }
                BPF_JEQ | BPF_JGT | BPF_JGE | BPF_JSET | BPF_JNE | BPF_JSGT | BPF_JSGE
                | BPF_JLT | BPF_JLE | BPF_JSLT | BPF_JSLE => {
                    check_target(pc, i.off as i64, n, second)?;
                }
                _ => return Err(invalid(pc, i, "unknown jump operation")),
            }
        }
        BPF_LD => {
            if i.opc != LDDW {
                return Err(invalid(
                    pc,
                    i,
                    "legacy packet loads (ABS/IND) are not supported",
                ));
            }
        }
        BPF_LDX => {
            if !matches!(i.mode(), BPF_MEM | BPF_MEMSX)
                || (i.mode() == BPF_MEMSX && i.size() == BPF_DW)
            {
                return Err(invalid(pc, i, "bad load mode"));
            }
        }
        BPF_ST => {
            if i.mode() != BPF_MEM {
                return Err(invalid(pc, i, "bad store mode"));
            }
        }
        BPF_STX => match i.mode() {
            BPF_MEM => {}
            BPF_ATOMIC => {
                if !matches!(i.size(), BPF_W | BPF_DW) {
                    return Err(invalid(pc, i, "atomic size must be W or DW"));
                }
                let op = i.imm;
                let base = op & !BPF_FETCH;
                let ok = matches!(base, 0x00 | 0x40 | 0x50 | 0xa0)
                    || op == BPF_XCHG
                    || op == BPF_CMPXCHG;
                if !ok {
                    return Err(invalid(pc, i, "unknown atomic operation"));
                }
                if op & BPF_FETCH != 0 && op != BPF_CMPXCHG && i.src == 10 {
                    return Err(invalid(pc, i, "r10 is read-only"));
                }
            }
            _ => return Err(invalid(pc, i, "bad store mode")),
        },
        _ => unreachable!("class is 3 bits"),
    }
    Ok(())
}
