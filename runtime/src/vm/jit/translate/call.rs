//! Calls: helpers (through the trampoline, or a map fast path), BPF-to-BPF calls and `callx`.

use super::super::super::insn::*;
use super::super::super::program::{FUNC_PTR_TAG, MAX_CALL_FRAMES};
use super::super::encoder::*;
use super::super::env::{
    ENV_AUX, ENV_DEPTH, ENV_HELPER_ID, ENV_PC, ENV_STATUS, ST_BAD_CALLX, ST_DEPTH,
};
use super::{env, reg, Translator, ENV};

impl Translator<'_> {
    /// The `call` at `pc`; `r1_token` is the map token r1 is believed to hold there.
    pub(super) fn call(&mut self, pc: usize, i: &Insn, r1_token: Option<u64>) {
        let pc32 = pc as u32;
        if i.is_reg_src() {
            self.callx(reg(i.dst), pc32);
        } else if i.src == BPF_PSEUDO_CALL {
            let target = self.func_labels[&((pc as i64 + 1 + i.imm as i64) as usize)];
            self.local_call(pc32, |a| a.call(target));
        } else {
            let id = i.imm as u32;
            match self.fast_map(r1_token, id) {
                Some((token, map)) => self.fast_map_call(pc32, id, token, &map),
                None => {
                    self.asm
                        .store_imm(Size::Dword, env(ENV_HELPER_ID), id as i32);
                    self.helper_call(pc32);
                }
            }
        }
    }

    /// A call of the helper whose id is in `JitEnv::helper_id`, through the trampoline.
    pub(super) fn helper_call(&mut self, pc: u32) {
        self.asm.store_imm(Size::Dword, env(ENV_PC), pc as i32);
        self.native_call_checked(self.trampoline);
    }

    /// Calls the native function at `target` with the program's r1-r5 as its first five
    /// arguments and the `JitEnv` as the sixth, then takes the abort path if it set a status.
    pub(super) fn native_call_checked(&mut self, target: u64) {
        self.asm.mov_rr(Width::W64, R9, ENV);
        self.asm.mov_ri64(R11, target);
        self.native_call_r11();
        self.asm.alu_mi8(AluOp::Cmp, Width::W32, env(ENV_STATUS), 0);
        self.asm.jcc(Cond::NotEqual, self.abort);
    }

    /// `call r11` into native code (a helper or map function), keeping xmm0-7 around it when
    /// the image must preserve them. rsp stays 16-byte aligned.
    fn native_call_r11(&mut self) {
        let a = &mut self.asm;
        if !self.preserve_vectors {
            a.call_reg(R11);
            return;
        }
        let slot = |x: u8| Mem::Disp8 {
            base: RSP,
            disp: 16 * x as i8,
        };
        a.alu_ri(AluOp::Sub, Width::W64, RSP, 128);
        for x in 0..8u8 {
            a.movdqu_store(slot(x), Xmm(x));
        }
        a.call_reg(R11);
        for x in 0..8u8 {
            a.movdqu_load(Xmm(x), slot(x));
        }
        a.alu_ri(AluOp::Add, Width::W64, RSP, 128);
    }

    /// A BPF-to-BPF call (`call` emits the call instruction), counted in `JitEnv::depth`
    /// against the kernel's frame limit.
    fn local_call(&mut self, pc: u32, call: impl FnOnce(&mut Emitter)) {
        let a = &mut self.asm;
        let ok = a.new_label();
        a.alu_mi8(
            AluOp::Cmp,
            Width::W32,
            env(ENV_DEPTH),
            (MAX_CALL_FRAMES - 1) as i8,
        );
        a.jcc(Cond::Below, ok);
        a.store_imm(Size::Dword, env(ENV_PC), pc as i32);
        a.store_imm(Size::Dword, env(ENV_STATUS), ST_DEPTH as i32);
        a.jmp(self.abort);
        a.bind(ok);
        a.inc_mem(Width::W32, env(ENV_DEPTH));
        call(a);
        a.dec_mem(Width::W32, env(ENV_DEPTH));
    }

    /// `callx reg`: a subprogram when `reg` holds a tagged function value (see
    /// `FUNC_PTR_TAG`) naming a function start, otherwise the helper with id `reg` (a 32-bit
    /// value); anything else is `ST_BAD_CALLX`.
    fn callx(&mut self, target: Reg, pc: u32) {
        let n = self.insns.len();
        let a = &mut self.asm;
        let helper = a.new_label();
        let bad = a.new_label();
        let done = a.new_label();
        a.mov_rr(Width::W64, R11, target);
        a.mov_rr(Width::W64, R10, R11);
        a.shift_ri(ShiftOp::Shr, Width::W64, R10, 32);
        a.alu_ri(
            AluOp::Cmp,
            Width::W32,
            R10,
            (FUNC_PTR_TAG >> 32) as u32 as i32,
        );
        a.jcc(Cond::NotEqual, helper);
        a.mov_rr(Width::W32, R11, R11);
        a.alu_ri(AluOp::Cmp, Width::W64, R11, n as i32);
        a.jcc(Cond::AboveOrEqual, bad);
        a.mov_ri64(R10, self.func_table);
        a.load(
            Size::Qword,
            R11,
            Mem::Indexed {
                base: R10,
                index: R11,
                scale: Scale::X8,
            },
        );
        a.test_rr(Width::W64, R11, R11);
        a.jcc(Cond::Equal, bad);
        self.local_call(pc, |a| a.call_reg(R11));
        let a = &mut self.asm;
        a.jmp(done);
        a.bind(helper);
        a.test_rr(Width::W64, R10, R10);
        a.jcc(Cond::NotEqual, bad);
        a.store(Size::Dword, env(ENV_HELPER_ID), R11);
        self.helper_call(pc);
        let a = &mut self.asm;
        a.jmp(done);
        a.bind(bad);
        a.store(Size::Qword, env(ENV_AUX), target);
        a.store_imm(Size::Dword, env(ENV_PC), pc as i32);
        a.store_imm(Size::Dword, env(ENV_STATUS), ST_BAD_CALLX as i32);
        a.jmp(self.abort);
        a.bind(done);
    }
}
