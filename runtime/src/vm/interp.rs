//! The bounds-checked interpreter.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::error::{AccessKind, VmError};
use super::helpers::{CallContext, FuncInvoker, Helpers};
use super::insn::*;
use super::memory::MemoryMap;
use super::program::{
    Program, FUNC_PTR_MASK, FUNC_PTR_TAG, MAX_CALL_FRAMES, MAX_TAIL_CALLS, STACK_SIZE,
};

/// Options of one interpreter run.
#[derive(Debug, Clone, Copy, Default)]
pub struct InterpOptions {
    /// Abort after this many executed instructions (`None`: unlimited).
    pub insn_budget: Option<u64>,
}

#[derive(Clone, Copy, Default)]
struct Frame {
    ret_pc: usize,
    saved: [u64; 4],
}

/// The return frames of one `run_one`: fixed capacity (the call-depth limit), so a run
/// allocates nothing.
struct Frames {
    frames: [Frame; MAX_CALL_FRAMES],
    len: usize,
}

impl Frames {
    fn new() -> Self {
        Self {
            frames: [Frame::default(); MAX_CALL_FRAMES],
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Callers check the depth limit first; a full stack panics (index out of bounds).
    fn push(&mut self, f: Frame) {
        self.frames[self.len] = f;
        self.len += 1;
    }

    fn pop(&mut self) -> Option<Frame> {
        self.len = self.len.checked_sub(1)?;
        Some(self.frames[self.len])
    }
}

enum Outcome {
    Exit(u64),
    TailCall(Arc<Program>, u64),
}

/// Run `prog` on the interpreter with r1..r5 = `args`. Every memory access is checked against
/// `mem` and the program's own stack.
pub fn interpret(
    prog: &Program,
    args: [u64; 5],
    mem: &mut MemoryMap<'_>,
    helpers: &mut dyn Helpers,
    opts: InterpOptions,
) -> Result<u64, VmError> {
    // Zeroed lazily, frame by frame as calls first reach it (`Run::reach`): most runs use one
    // 512-byte frame of the 4 KiB, and zeroing all of it was a large part of a short run.
    let mut stack = std::mem::MaybeUninit::<[u64; MAX_CALL_FRAMES * STACK_SIZE / 8]>::uninit();
    let stack_start = stack.as_mut_ptr() as u64;
    let stack_len = (MAX_CALL_FRAMES * STACK_SIZE) as u64;
    let top = stack_start + stack_len;
    // SAFETY: nothing of the stack is initialised yet, so nothing is registered; `reach`
    // registers what it zeroes. Unset before `stack` goes away.
    let prev = unsafe { mem.set_stack(Some((top, 0))) };
    let mut budget = opts.insn_budget;
    let mut zeroed = top;
    let mut run = Run {
        prog,
        stack_start,
        zeroed,
        budget: &mut budget,
    };
    let mut outcome = run_one(&mut run, 0, args, top, 0, mem, helpers);
    zeroed = run.zeroed;
    let mut tail_calls = 0;
    let mut holder: Arc<Program>;
    while let Ok(Outcome::TailCall(next, r1)) = outcome {
        tail_calls += 1;
        if tail_calls > MAX_TAIL_CALLS {
            outcome = Err(VmError::TailCallLimit(MAX_TAIL_CALLS));
            break;
        }
        holder = next;
        // The tail-called program starts on a zeroed stack, as the first one did.
        // SAFETY: `[zeroed, top)` lies inside `stack` (see `Run::reach`).
        unsafe { std::ptr::write_bytes(zeroed as *mut u8, 0, (top - zeroed) as usize) };
        let mut run = Run {
            prog: &holder,
            stack_start,
            zeroed,
            budget: &mut budget,
        };
        outcome = run_one(&mut run, 0, [r1, 0, 0, 0, 0], top, 0, mem, helpers);
        zeroed = run.zeroed;
    }
    // SAFETY: restoring the previous (outer run's) stack, still alive if any.
    unsafe { mem.set_stack(prev) };
    let outcome = outcome.map_err(|e| match e {
        VmError::Budget(_) => VmError::Budget(opts.insn_budget.unwrap_or(0)),
        e => e,
    });
    match outcome? {
        Outcome::Exit(v) => Ok(v),
        Outcome::TailCall(..) => unreachable!("handled above"),
    }
}

fn fault(pc: usize, addr: u64, len: usize, kind: AccessKind) -> VmError {
    VmError::MemoryFault {
        pc,
        addr,
        len,
        kind,
    }
}

/// Bounds of the interpreter's stack: `[start, top)` holds all frames (deeper frames at lower
/// addresses); `lo` is the bottom of the current frame. Only `[lo, top)` (the current frame and
/// its callers) is accessible.
#[derive(Clone, Copy)]
struct StackBounds {
    start: u64,
    top: u64,
    lo: u64,
}

fn access_ok(mem: &mut MemoryMap<'_>, sb: StackBounds, addr: u64, len: u64, write: bool) -> bool {
    if addr >= sb.start && addr < sb.top {
        return addr >= sb.lo && addr.checked_add(len).is_some_and(|e| e <= sb.top);
    }
    mem.check(addr, len, write)
}

fn load(
    mem: &mut MemoryMap<'_>,
    sb: StackBounds,
    pc: usize,
    addr: u64,
    size: u8,
) -> Result<u64, VmError> {
    let len = size_bytes(size);
    if !access_ok(mem, sb, addr, len as u64, false) {
        return Err(fault(pc, addr, len, AccessKind::Load));
    }
    let p = addr as *const u8;
    // SAFETY: `[addr, addr+len)` lies inside a region registered in `mem`, valid for reads for
    // the duration of the run (contract of `MemoryMap`); unaligned reads are used.
    let v = unsafe {
        match size {
            BPF_B => p.read() as u64,
            BPF_H => (p as *const u16).read_unaligned() as u64,
            BPF_W => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    };
    Ok(v)
}

fn store(
    mem: &mut MemoryMap<'_>,
    sb: StackBounds,
    pc: usize,
    addr: u64,
    size: u8,
    v: u64,
) -> Result<(), VmError> {
    let len = size_bytes(size);
    if !access_ok(mem, sb, addr, len as u64, true) {
        return Err(fault(pc, addr, len, AccessKind::Store));
    }
    let p = addr as *mut u8;
    // SAFETY: `[addr, addr+len)` lies inside a writable region registered in `mem`, valid for
    // writes for the duration of the run; unaligned writes are used.
    unsafe {
        match size {
            BPF_B => p.write(v as u8),
            BPF_H => (p as *mut u16).write_unaligned(v as u16),
            BPF_W => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
    Ok(())
}

fn atomic(
    mem: &mut MemoryMap<'_>,
    sb: StackBounds,
    pc: usize,
    i: &Insn,
    addr: u64,
    regs: &mut [u64; 11],
) -> Result<(), VmError> {
    let len = size_bytes(i.size());
    if !access_ok(mem, sb, addr, len as u64, true) {
        return Err(fault(pc, addr, len, AccessKind::Atomic));
    }
    if !addr.is_multiple_of(len as u64) {
        return Err(VmError::MisalignedAtomic { pc, addr });
    }
    let src = regs[i.src as usize];
    let op = i.imm;
    if i.size() == BPF_DW {
        // SAFETY: checked above: inside a writable registered region and 8-byte aligned.
        let a = unsafe { AtomicU64::from_ptr(addr as *mut u64) };
        let old = match op & !BPF_FETCH {
            0x00 => a.fetch_add(src, Ordering::SeqCst),
            0x40 => a.fetch_or(src, Ordering::SeqCst),
            0x50 => a.fetch_and(src, Ordering::SeqCst),
            0xa0 => a.fetch_xor(src, Ordering::SeqCst),
            0xe0 => a.swap(src, Ordering::SeqCst),
            _ => match a.compare_exchange(regs[0], src, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        };
        if op == BPF_CMPXCHG {
            regs[0] = old;
        } else if op & BPF_FETCH != 0 {
            regs[i.src as usize] = old;
        }
    } else {
        // SAFETY: checked above: inside a writable registered region and 4-byte aligned.
        let a = unsafe { AtomicU32::from_ptr(addr as *mut u32) };
        let s = src as u32;
        let old = match op & !BPF_FETCH {
            0x00 => a.fetch_add(s, Ordering::SeqCst),
            0x40 => a.fetch_or(s, Ordering::SeqCst),
            0x50 => a.fetch_and(s, Ordering::SeqCst),
            0xa0 => a.fetch_xor(s, Ordering::SeqCst),
            0xe0 => a.swap(s, Ordering::SeqCst),
            _ => match a.compare_exchange(regs[0] as u32, s, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        };
        if op == BPF_CMPXCHG {
            regs[0] = old as u64;
        } else if op & BPF_FETCH != 0 {
            regs[i.src as usize] = old as u64;
        }
    }
    Ok(())
}

/// 64-bit ALU operation (shared with the JIT's constant tests).
pub(crate) fn alu64(op: u8, off: i16, dst: u64, src: u64) -> u64 {
    match op {
        BPF_ADD => dst.wrapping_add(src),
        BPF_SUB => dst.wrapping_sub(src),
        BPF_MUL => dst.wrapping_mul(src),
        BPF_DIV => {
            if src == 0 {
                0
            } else if off == 1 {
                (dst as i64).wrapping_div(src as i64) as u64
            } else {
                dst / src
            }
        }
        BPF_MOD => {
            if src == 0 {
                dst
            } else if off == 1 {
                (dst as i64).wrapping_rem(src as i64) as u64
            } else {
                dst % src
            }
        }
        BPF_OR => dst | src,
        BPF_AND => dst & src,
        BPF_XOR => dst ^ src,
        BPF_LSH => dst.wrapping_shl(src as u32 & 63),
        BPF_RSH => dst.wrapping_shr(src as u32 & 63),
        BPF_ARSH => ((dst as i64).wrapping_shr(src as u32 & 63)) as u64,
        BPF_NEG => (dst as i64).wrapping_neg() as u64,
        BPF_MOV => match off {
            8 => src as i8 as i64 as u64,
            16 => src as i16 as i64 as u64,
            32 => src as i32 as i64 as u64,
            _ => src,
        },
        _ => dst,
    }
}

/// 32-bit ALU operation; the result is zero-extended.
pub(crate) fn alu32(op: u8, off: i16, dst: u64, src: u64) -> u64 {
    let d = dst as u32;
    let s = src as u32;
    let r: u32 = match op {
        BPF_ADD => d.wrapping_add(s),
        BPF_SUB => d.wrapping_sub(s),
        BPF_MUL => d.wrapping_mul(s),
        BPF_DIV => {
            if s == 0 {
                0
            } else if off == 1 {
                (d as i32).wrapping_div(s as i32) as u32
            } else {
                d / s
            }
        }
        BPF_MOD => {
            if s == 0 {
                d
            } else if off == 1 {
                (d as i32).wrapping_rem(s as i32) as u32
            } else {
                d % s
            }
        }
        BPF_OR => d | s,
        BPF_AND => d & s,
        BPF_XOR => d ^ s,
        BPF_LSH => d.wrapping_shl(s & 31),
        BPF_RSH => d.wrapping_shr(s & 31),
        BPF_ARSH => ((d as i32).wrapping_shr(s & 31)) as u32,
        BPF_NEG => (d as i32).wrapping_neg() as u32,
        BPF_MOV => match off {
            8 => s as i8 as i32 as u32,
            16 => s as i16 as i32 as u32,
            _ => s,
        },
        _ => d,
    };
    r as u64
}

/// Byte swap / endianness conversion.
pub(crate) fn endian(class: u8, to_be: bool, width: i32, v: u64) -> u64 {
    let swap = class == BPF_ALU64 || (to_be != cfg!(target_endian = "big"));
    match (width, swap) {
        (16, true) => (v as u16).swap_bytes() as u64,
        (16, false) => v as u16 as u64,
        (32, true) => (v as u32).swap_bytes() as u64,
        (32, false) => v as u32 as u64,
        (_, true) => v.swap_bytes(),
        (_, false) => v,
    }
}

/// Condition of a conditional jump.
pub(crate) fn cond(op: u8, is32: bool, a: u64, b: u64) -> bool {
    let (a, b) = if is32 {
        (a as u32 as u64, b as u32 as u64)
    } else {
        (a, b)
    };
    let (sa, sb) = if is32 {
        (a as u32 as i32 as i64, b as u32 as i32 as i64)
    } else {
        (a as i64, b as i64)
    };
    match op {
        BPF_JEQ => a == b,
        BPF_JNE => a != b,
        BPF_JGT => a > b,
        BPF_JGE => a >= b,
        BPF_JLT => a < b,
        BPF_JLE => a <= b,
        BPF_JSET => a & b != 0,
        BPF_JSGT => sa > sb,
        BPF_JSGE => sa >= sb,
        BPF_JSLT => sa < sb,
        BPF_JSLE => sa <= sb,
        _ => false,
    }
}

/// What a run (and every callback a helper starts in it) shares.
struct Run<'p, 'b> {
    prog: &'p Program,
    stack_start: u64,
    /// `[zeroed, top)` of the stack is initialised (and registered in the memory map).
    zeroed: u64,
    budget: &'b mut Option<u64>,
}

impl Run<'_, '_> {
    /// Makes the stack from `lo` (the bottom of a frame being entered) up initialised: zeroes
    /// what no frame reached before, and registers it for helpers. Stack memory is thus zero
    /// until the program writes it, as when the whole stack was zeroed up front.
    #[inline]
    fn reach(&mut self, lo: u64, mem: &mut MemoryMap<'_>) {
        if lo < self.zeroed && lo >= self.stack_start {
            // SAFETY: `[stack_start, top)` is the run's stack allocation (`interpret`), and
            // `stack_start <= lo < zeroed <= top`.
            unsafe { std::ptr::write_bytes(lo as *mut u8, 0, (self.zeroed - lo) as usize) };
            self.zeroed = lo;
            let top = self.stack_start + (MAX_CALL_FRAMES * STACK_SIZE) as u64;
            // SAFETY: `[lo, top)` is initialised and stays valid until `interpret` unsets it.
            unsafe { mem.set_stack(Some((lo, top - lo))) };
        }
    }
}

/// Runs callbacks for helpers called at `pc` from a frame with stack pointer `r10` at call
/// depth `depth` (0 = main program).
struct Invoker<'r, 'p, 'b> {
    run: &'r mut Run<'p, 'b>,
    pc: usize,
    r10: u64,
    depth: usize,
}

impl FuncInvoker for Invoker<'_, '_, '_> {
    fn invoke(
        &mut self,
        func: u64,
        args: [u64; 5],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError> {
        let entry = (func & !FUNC_PTR_MASK) as usize;
        if func & FUNC_PTR_MASK != FUNC_PTR_TAG || !self.run.prog.functions().contains(&entry) {
            return Err(VmError::BadCallback { pc: self.pc, func });
        }
        if self.depth + 1 >= MAX_CALL_FRAMES {
            return Err(VmError::CallDepth {
                pc: self.pc,
                max: MAX_CALL_FRAMES,
            });
        }
        let r10 = self.r10 - STACK_SIZE as u64;
        match run_one(self.run, entry, args, r10, self.depth + 1, mem, helpers)? {
            Outcome::Exit(v) => Ok(v),
            // run_one refuses tail calls below depth 0.
            Outcome::TailCall(..) => Err(VmError::TailCallInSubprog { pc: self.pc }),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn call_helper(
    id: u32,
    pc: usize,
    depth: usize,
    regs: &mut [u64; 11],
    run: &mut Run<'_, '_>,
    mem: &mut MemoryMap<'_>,
    helpers: &mut dyn Helpers,
) -> Result<Option<(Arc<Program>, u64)>, VmError> {
    let args = [regs[1], regs[2], regs[3], regs[4], regs[5]];
    let mut inv = Invoker {
        run,
        pc,
        r10: regs[10],
        depth,
    };
    let mut ctx = CallContext::with_invoker(pc, mem, &mut inv, true);
    let r = helpers
        .call(id, args, &mut ctx)
        .map_err(|source| VmError::from_helper(pc, id, source))?;
    regs[0] = r;
    if let Some(p) = ctx.take_tail_call() {
        if depth != 0 {
            return Err(VmError::TailCallInSubprog { pc });
        }
        return Ok(Some((p, args[0])));
    }
    Ok(None)
}

/// Run the function at `entry` of `run.prog` with r1..r5 = `args` and r10 = `r10`, at call
/// depth `base_depth`, until it returns (or requests a tail call, at depth 0 only).
#[allow(clippy::too_many_arguments)]
fn run_one(
    run: &mut Run<'_, '_>,
    entry: usize,
    args: [u64; 5],
    r10: u64,
    base_depth: usize,
    mem: &mut MemoryMap<'_>,
    helpers: &mut dyn Helpers,
) -> Result<Outcome, VmError> {
    let prog = run.prog;
    let stack_start = run.stack_start;
    let insns = prog.insns();
    let n = insns.len();
    let mut regs = [0u64; 11];
    regs[1..6].copy_from_slice(&args);
    let top = stack_start + (MAX_CALL_FRAMES * STACK_SIZE) as u64;
    regs[10] = r10;
    run.reach(r10 - STACK_SIZE as u64, mem);
    let stack = |r10: u64| StackBounds {
        start: stack_start,
        top,
        lo: r10 - STACK_SIZE as u64,
    };
    let mut frames = Frames::new();
    let mut pc = entry;
    let mut last = entry;
    loop {
        if pc >= n {
            return Err(VmError::FellOffEnd { pc: last });
        }
        if let Some(b) = run.budget.as_mut() {
            if *b == 0 {
                return Err(VmError::Budget(0));
            }
            *b -= 1;
        }
        let i = insns[pc];
        last = pc;
        let cur = pc;
        pc += 1;
        let dst = i.dst as usize;
        let src = i.src as usize;
        match i.class() {
            BPF_ALU64 | BPF_ALU => {
                let is64 = i.class() == BPF_ALU64;
                let op = i.op();
                if op == BPF_END {
                    regs[dst] = endian(i.class(), i.is_reg_src(), i.imm, regs[dst]);
                    continue;
                }
                let s = if i.is_reg_src() {
                    regs[src]
                } else if is64 {
                    i.imm as i64 as u64
                } else {
                    i.imm as u32 as u64
                };
                regs[dst] = if is64 {
                    alu64(op, i.off, regs[dst], s)
                } else {
                    alu32(op, i.off, regs[dst], s)
                };
            }
            BPF_LD => {
                // lddw (validated)
                let hi = insns[pc].imm as u32 as u64;
                regs[dst] = (i.imm as u32 as u64) | (hi << 32);
                pc += 1;
            }
            BPF_LDX => {
                let addr = regs[src].wrapping_add(i.off as i64 as u64);
                let v = load(mem, stack(regs[10]), cur, addr, i.size())?;
                regs[dst] = if i.mode() == BPF_MEMSX {
                    match i.size() {
                        BPF_B => v as i8 as i64 as u64,
                        BPF_H => v as i16 as i64 as u64,
                        _ => v as i32 as i64 as u64,
                    }
                } else {
                    v
                };
            }
            BPF_ST => {
                let addr = regs[dst].wrapping_add(i.off as i64 as u64);
                store(
                    mem,
                    stack(regs[10]),
                    cur,
                    addr,
                    i.size(),
                    i.imm as i64 as u64,
                )?;
            }
            BPF_STX => {
                let addr = regs[dst].wrapping_add(i.off as i64 as u64);
                if i.mode() == BPF_ATOMIC {
                    atomic(mem, stack(regs[10]), cur, &i, addr, &mut regs)?;
                } else {
                    store(mem, stack(regs[10]), cur, addr, i.size(), regs[src])?;
                }
            }
            _ => {
                // BPF_JMP | BPF_JMP32
                let is32 = i.class() == BPF_JMP32;
                match i.op() {
                    BPF_JA => {
                        let off = if is32 { i.imm as i64 } else { i.off as i64 };
                        pc = (pc as i64 + off) as usize;
                    }
                    BPF_EXIT => match frames.pop() {
                        None => return Ok(Outcome::Exit(regs[0])),
                        Some(f) => {
                            regs[6..10].copy_from_slice(&f.saved);
                            regs[10] += STACK_SIZE as u64;
                            pc = f.ret_pc;
                        }
                    },
                    BPF_CALL => {
                        let local_target = if i.is_reg_src() {
                            let t = regs[dst];
                            if t & FUNC_PTR_MASK == FUNC_PTR_TAG {
                                let t = (t & !FUNC_PTR_MASK) as usize;
                                if t >= n {
                                    return Err(VmError::BadCallx {
                                        pc: cur,
                                        target: regs[dst],
                                    });
                                }
                                Some(t)
                            } else {
                                if t > u32::MAX as u64 {
                                    return Err(VmError::BadCallx { pc: cur, target: t });
                                }
                                if let Some(tc) = call_helper(
                                    t as u32,
                                    cur,
                                    base_depth + frames.len(),
                                    &mut regs,
                                    run,
                                    mem,
                                    helpers,
                                )? {
                                    return Ok(Outcome::TailCall(tc.0, tc.1));
                                }
                                None
                            }
                        } else if i.src == BPF_PSEUDO_CALL {
                            Some((pc as i64 + i.imm as i64) as usize)
                        } else {
                            if let Some(tc) = call_helper(
                                i.imm as u32,
                                cur,
                                base_depth + frames.len(),
                                &mut regs,
                                run,
                                mem,
                                helpers,
                            )? {
                                return Ok(Outcome::TailCall(tc.0, tc.1));
                            }
                            None
                        };
                        if let Some(t) = local_target {
                            if base_depth + frames.len() + 1 >= MAX_CALL_FRAMES {
                                return Err(VmError::CallDepth {
                                    pc: cur,
                                    max: MAX_CALL_FRAMES,
                                });
                            }
                            let mut saved = [0u64; 4];
                            saved.copy_from_slice(&regs[6..10]);
                            frames.push(Frame { ret_pc: pc, saved });
                            regs[10] -= STACK_SIZE as u64;
                            run.reach(regs[10] - STACK_SIZE as u64, mem);
                            pc = t;
                        }
                    }
                    op => {
                        let b = if i.is_reg_src() {
                            regs[src]
                        } else {
                            i.imm as i64 as u64
                        };
                        if cond(op, is32, regs[dst], b) {
                            pc = (pc as i64 + i.off as i64) as usize;
                        }
                    }
                }
            }
        }
    }
}
