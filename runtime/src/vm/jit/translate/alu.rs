//! The ALU and ALU64 classes.

use super::super::super::insn::*;
use super::super::encoder::*;
use super::{reg, width};

pub(super) fn alu(a: &mut Emitter, i: &Insn) {
    let w = width(i.class() == BPF_ALU64);
    let dst = reg(i.dst);
    let src = reg(i.src);
    match i.op() {
        op @ (BPF_ADD | BPF_SUB | BPF_OR | BPF_AND | BPF_XOR) => {
            let op = match op {
                BPF_ADD => AluOp::Add,
                BPF_SUB => AluOp::Sub,
                BPF_OR => AluOp::Or,
                BPF_AND => AluOp::And,
                _ => AluOp::Xor,
            };
            if i.is_reg_src() {
                a.alu_rr(op, w, dst, src);
            } else {
                a.alu_ri(op, w, dst, i.imm);
            }
        }
        BPF_MUL => {
            if i.is_reg_src() {
                a.imul_rr(w, dst, src);
            } else {
                a.imul_rri(w, dst, dst, i.imm);
            }
        }
        BPF_MOV => mov(a, i, w, dst, src),
        BPF_NEG => a.neg(w, dst),
        op @ (BPF_LSH | BPF_RSH | BPF_ARSH) => {
            let op = match op {
                BPF_LSH => ShiftOp::Shl,
                BPF_RSH => ShiftOp::Shr,
                _ => ShiftOp::Sar,
            };
            shift(a, i, op, w, dst, src);
        }
        BPF_DIV | BPF_MOD => div_mod(a, i, w, dst, src),
        BPF_END => byte_swap(a, i, w, dst),
        _ => {}
    }
}

/// `mov` and `movsx` (a register source with `off` = the source width).
fn mov(a: &mut Emitter, i: &Insn, w: Width, dst: Reg, src: Reg) {
    if !i.is_reg_src() {
        match w {
            Width::W64 => a.mov_ri64(dst, i.imm as i64 as u64),
            Width::W32 => a.mov_ri32(dst, i.imm as u32),
        }
        return;
    }
    match (w, i.off) {
        (_, 0) => a.mov_rr(w, dst, src),
        (_, 8) => a.movsx_r8(w, dst, src),
        (Width::W64, 16) => a.movsx_r16(w, dst, src),
        (Width::W64, _) => a.movsxd(dst, src),
        (Width::W32, _) => a.movsx_r16(w, dst, src),
    }
}

/// Shifts by an immediate (masked like the hardware does) or by a register, which must be
/// moved to cl: rcx (BPF r4) is kept in r10 around it.
fn shift(a: &mut Emitter, i: &Insn, op: ShiftOp, w: Width, dst: Reg, src: Reg) {
    if !i.is_reg_src() {
        let mask = match w {
            Width::W64 => 63,
            Width::W32 => 31,
        };
        a.shift_ri(op, w, dst, (i.imm & mask) as u8);
        return;
    }
    a.mov_rr(Width::W64, R10, RCX);
    if src != RCX {
        a.mov_rr(Width::W64, RCX, src);
    }
    if dst == RCX {
        a.shift_cl(op, w, R10);
    } else {
        a.shift_cl(op, w, dst);
    }
    a.mov_rr(Width::W64, RCX, R10);
}

/// Division and modulo with BPF's results for a zero divisor (`x / 0 = 0`, `x % 0 = x`) and
/// for a divisor of -1 in the signed forms (`MIN / -1` faults on x86). rax and rdx are kept in
/// r10 and r9 around `div`/`idiv`, the divisor goes to r11.
fn div_mod(a: &mut Emitter, i: &Insn, w: Width, dst: Reg, src: Reg) {
    let is_div = i.op() == BPF_DIV;
    let signed = i.off == 1;
    let done = a.new_label();
    let nonzero = a.new_label();
    if i.is_reg_src() {
        a.mov_rr(w, R11, src);
    } else if w == Width::W64 {
        a.mov_ri64(R11, i.imm as i64 as u64);
    } else {
        a.mov_ri32(R11, i.imm as u32);
    }
    a.test_rr(w, R11, R11);
    a.jcc(Cond::NotEqual, nonzero);
    if is_div {
        a.alu_rr(AluOp::Xor, Width::W32, dst, dst);
    } else if w == Width::W32 {
        a.mov_rr(Width::W32, dst, dst);
    }
    a.jmp(done);
    a.bind(nonzero);
    if signed {
        let normal = a.new_label();
        a.alu_ri(AluOp::Cmp, w, R11, -1);
        a.jcc(Cond::NotEqual, normal);
        if is_div {
            a.neg(w, dst);
        } else {
            a.alu_rr(AluOp::Xor, Width::W32, dst, dst);
        }
        a.jmp(done);
        a.bind(normal);
    }
    a.mov_rr(Width::W64, R10, RAX);
    a.mov_rr(Width::W64, R9, RDX);
    if dst != RAX {
        a.mov_rr(Width::W64, RAX, dst);
    }
    if signed {
        a.sign_extend_rax(w);
        a.idiv(w, R11);
    } else {
        a.alu_rr(AluOp::Xor, Width::W32, RDX, RDX);
        a.div(w, R11);
    }
    a.mov_rr(Width::W64, R11, if is_div { RAX } else { RDX });
    a.mov_rr(Width::W64, RAX, R10);
    a.mov_rr(Width::W64, RDX, R9);
    a.mov_rr(Width::W64, dst, R11);
    a.bind(done);
}

/// `le`/`be` (the 32-bit class; `be` swaps) and `bswap` (ALU64): x86 is little-endian, so `le`
/// only truncates.
fn byte_swap(a: &mut Emitter, i: &Insn, w: Width, dst: Reg) {
    let swap = w == Width::W64 || i.is_reg_src();
    match (i.imm, swap) {
        (16, false) => a.movzx_r16(dst, dst),
        (32, false) => a.mov_rr(Width::W32, dst, dst),
        (64, false) => {}
        (16, true) => {
            a.shift16_ri(ShiftOp::Ror, dst, 8);
            a.movzx_r16(dst, dst);
        }
        (32, true) => a.bswap(Width::W32, dst),
        _ => a.bswap(Width::W64, dst),
    }
}
