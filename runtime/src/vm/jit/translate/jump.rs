//! Jumps of the JMP and JMP32 classes (`ja` and the conditional jumps; calls and `exit` are in
//! `call` and the driver).

use super::super::super::insn::*;
use super::super::encoder::*;
use super::{reg, width, Translator};

impl Translator<'_> {
    /// The jump at `pc`: to `pc + 1 + off` (`imm` for the JMP32 `ja`).
    pub(super) fn jump(&mut self, pc: usize, i: &Insn) {
        let is32 = i.class() == BPF_JMP32;
        let next = pc as i64 + 1;
        let op = i.op();
        if op == BPF_JA {
            let off = if is32 { i.imm as i64 } else { i.off as i64 };
            self.asm.jmp(self.insn_labels[(next + off) as usize]);
            return;
        }
        let a = &mut self.asm;
        let w = width(!is32);
        let dst = reg(i.dst);
        if i.is_reg_src() {
            let src = reg(i.src);
            if op == BPF_JSET {
                a.test_rr(w, dst, src);
            } else {
                a.alu_rr(AluOp::Cmp, w, dst, src);
            }
        } else if op == BPF_JSET {
            a.test_ri(w, dst, i.imm);
        } else {
            a.alu_ri(AluOp::Cmp, w, dst, i.imm);
        }
        let cond = match op {
            BPF_JEQ => Cond::Equal,
            BPF_JNE | BPF_JSET => Cond::NotEqual,
            BPF_JGT => Cond::Above,
            BPF_JGE => Cond::AboveOrEqual,
            BPF_JLT => Cond::Below,
            BPF_JLE => Cond::BelowOrEqual,
            BPF_JSGT => Cond::Greater,
            BPF_JSGE => Cond::GreaterOrEqual,
            BPF_JSLT => Cond::Less,
            _ => Cond::LessOrEqual,
        };
        a.jcc(cond, self.insn_labels[(next + i.off as i64) as usize]);
    }
}
