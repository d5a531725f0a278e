//! The LD (`lddw`), LDX, ST and STX classes, atomics included. Accesses are unchecked (see the
//! JIT's module docs): one x86 instruction each, with the BPF offset as a disp32.

use super::super::super::insn::*;
use super::super::encoder::*;
use super::reg;

fn size(i: &Insn) -> Size {
    match i.size() {
        BPF_B => Size::Byte,
        BPF_H => Size::Word,
        BPF_W => Size::Dword,
        _ => Size::Qword,
    }
}

/// `[dst + off]`.
fn dst_mem(i: &Insn) -> Mem {
    mem(reg(i.dst), i.off as i32)
}

/// `lddw`: the 64-bit immediate of both slots (pseudo sources were resolved when the program
/// was loaded).
pub(super) fn load_imm64(a: &mut Emitter, i: &Insn, next: &Insn) {
    let v = (i.imm as u32 as u64) | ((next.imm as u32 as u64) << 32);
    a.mov_ri64(reg(i.dst), v);
}

/// `ldx*`: zero-extending, or sign-extending for `BPF_MEMSX`.
pub(super) fn load(a: &mut Emitter, i: &Insn) {
    let m = mem(reg(i.src), i.off as i32);
    if i.mode() == BPF_MEMSX {
        a.load_sx(size(i), reg(i.dst), m);
    } else {
        a.load(size(i), reg(i.dst), m);
    }
}

/// `st*`: an immediate.
pub(super) fn store_imm(a: &mut Emitter, i: &Insn) {
    a.store_imm(size(i), dst_mem(i), i.imm);
}

/// `stx*`: a register.
pub(super) fn store(a: &mut Emitter, i: &Insn) {
    a.store(size(i), dst_mem(i), reg(i.src));
}

const ADD: i32 = BPF_ADD as i32;
const OR: i32 = BPF_OR as i32;
const AND: i32 = BPF_AND as i32;
const XOR: i32 = BPF_XOR as i32;
const FETCH_ADD: i32 = ADD | BPF_FETCH;

/// The read-modify-write atomics (`imm` names the operation).
pub(super) fn atomic(a: &mut Emitter, i: &Insn) {
    let w = if i.size() == BPF_DW {
        Width::W64
    } else {
        Width::W32
    };
    let src = reg(i.src);
    let m = dst_mem(i);
    match i.imm {
        op @ (ADD | OR | AND | XOR) => a.lock_alu_mr(bitwise_or_add(op), w, m, src),
        FETCH_ADD => a.lock_xadd(w, m, src),
        BPF_XCHG => a.xchg_mr(w, m, src),
        BPF_CMPXCHG => {
            a.lock_cmpxchg(w, m, src);
            // A 32-bit cmpxchg leaves the upper half of rax alone when it succeeds; BPF's r0
            // is the zero-extended old value either way.
            if w == Width::W32 {
                a.mov_rr(Width::W32, RAX, RAX);
            }
        }
        op => {
            // fetch or/and/xor: no x86 instruction returns the old value, so a cmpxchg loop
            // (rax is the compared value: r0 is kept in r10).
            let op = bitwise_or_add(op & !BPF_FETCH);
            a.lea(R9, m);
            a.mov_rr(Width::W64, R10, RAX);
            let operand = if src == RAX { R10 } else { src };
            let again = a.new_label();
            a.bind(again);
            a.load(
                if w == Width::W64 {
                    Size::Qword
                } else {
                    Size::Dword
                },
                RAX,
                mem(R9, 0),
            );
            a.mov_rr(Width::W64, R11, RAX);
            a.alu_rr(op, w, R11, operand);
            a.lock_cmpxchg(w, mem(R9, 0), R11);
            a.jcc(Cond::NotEqual, again);
            if src != RAX {
                a.mov_rr(Width::W64, src, RAX);
                a.mov_rr(Width::W64, RAX, R10);
            }
        }
    }
}

/// The x86 operation of atomic `op` (without `BPF_FETCH`).
fn bitwise_or_add(op: i32) -> AluOp {
    match op {
        ADD => AluOp::Add,
        OR => AluOp::Or,
        AND => AluOp::And,
        _ => AluOp::Xor,
    }
}
