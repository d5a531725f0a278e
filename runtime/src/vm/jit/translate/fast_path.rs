//! The map fast paths (see the JIT's module docs): which call sites get one, from the map
//! tokens a forward scan sees in r1, and their code: run-time guards, then an inline ARRAY
//! lookup or a direct call of the map's [`JitMapFn`](super::super::JitMapFn), with the generic
//! trampoline call as the fallback.

use bpftime_abi::HelperId;

use super::super::super::insn::*;
use super::super::encoder::*;
use super::super::env::{ENV_FAST, ENV_HELPER_ID, ENV_PC};
use super::super::JitMap;
use super::{env, Translator};

/// Helper ids with map fast paths.
pub(super) const HELPER_MAP_LOOKUP: HelperId = HelperId::MAP_LOOKUP_ELEM;
pub(super) const HELPER_MAP_UPDATE: HelperId = HelperId::MAP_UPDATE_ELEM;
pub(super) const HELPER_MAP_DELETE: HelperId = HelperId::MAP_DELETE_ELEM;

/// The map token each BPF register holds, as far as a forward scan can tell.
#[derive(Default)]
pub(super) struct MapTokens([Option<u64>; 11]);

impl MapTokens {
    pub(super) fn r1(&self) -> Option<u64> {
        self.0[1]
    }

    /// Updates the tokens after `i` (`next` is the second slot of an `lddw`).
    pub(super) fn track(&mut self, i: &Insn, next: Option<&Insn>) {
        let tokens = &mut self.0;
        let dst = i.dst as usize;
        match i.class() {
            BPF_LD => {
                let hi = next.map_or(0, |n| n.imm as u32 as u64);
                tokens[dst] = Some((i.imm as u32 as u64) | (hi << 32));
            }
            BPF_ALU64 if i.op() == BPF_MOV && i.is_reg_src() && i.off == 0 => {
                tokens[dst] = tokens[i.src as usize];
            }
            BPF_ALU | BPF_ALU64 | BPF_LDX => tokens[dst] = None,
            BPF_STX if i.mode() == BPF_ATOMIC => {
                tokens[i.src as usize] = None;
                tokens[0] = None;
            }
            // Calls clobber r0-r5; r6-r9 are callee-saved (helpers and BPF-to-BPF calls alike).
            BPF_JMP if i.op() == BPF_CALL => tokens[..6].fill(None),
            _ => {}
        }
    }
}

fn has_fast_path(map: &JitMap, id: u32) -> bool {
    match HelperId(id) {
        HELPER_MAP_LOOKUP => map.lookup.is_some(),
        HELPER_MAP_UPDATE => map.update.is_some(),
        HELPER_MAP_DELETE => map.delete.is_some(),
        _ => false,
    }
}

impl Translator<'_> {
    /// The map a call of helper `id` with `r1_token` in r1 goes to directly, if it has a fast
    /// path for that helper.
    pub(super) fn fast_map(&mut self, r1_token: Option<u64>, id: u32) -> Option<(u64, JitMap)> {
        let resolver = self.resolver?;
        let token = r1_token?;
        let map = (*self
            .resolved
            .entry(token)
            .or_insert_with(|| resolver.resolve(token)))?;
        has_fast_path(&map, id).then_some((token, map))
    }

    /// A map helper call with a known map: guards, then the inline ARRAY lookup or a direct
    /// call of the map's `JitMapFn`; the generic trampoline call when a guard fails.
    pub(super) fn fast_map_call(&mut self, pc: u32, id: u32, token: u64, map: &JitMap) {
        let generic = self.asm.new_label();
        let done = self.asm.new_label();
        let a = &mut self.asm;
        a.alu_mi8(AluOp::Cmp, Width::W64, env(ENV_FAST), 0);
        a.jcc(Cond::Equal, generic);
        // r1 must hold the token the fast path was chosen for.
        a.mov_ri64(R11, token);
        a.alu_rr(AluOp::Cmp, Width::W64, RDI, R11);
        a.jcc(Cond::NotEqual, generic);
        let function = match HelperId(id) {
            HELPER_MAP_LOOKUP => map.lookup,
            HELPER_MAP_UPDATE => map.update,
            _ => map.delete,
        }
        .expect("checked by has_fast_path");
        let call_function = |t: &mut Self| {
            t.asm.store_imm(Size::Dword, env(ENV_PC), pc as i32);
            t.asm.mov_ri64(RDI, map.handle as u64);
            t.native_call_checked(function as usize as u64);
        };
        match map.inline_array {
            Some(array) if HelperId(id) == HELPER_MAP_LOOKUP && array.stride <= i32::MAX as u32 => {
                let null = a.new_label();
                let unmarked = a.new_label();
                // A NULL key (only in unverified code) goes to the function, which reports it
                // like the generic helper.
                a.test_rr(Width::W64, RSI, RSI);
                a.jcc(Cond::Equal, unmarked);
                // eax = index (the 4-byte key at rsi, r2)
                a.load(Size::Dword, RAX, mem(RSI, 0));
                a.alu_ri(AluOp::Cmp, Width::W32, RAX, array.max_entries as i32);
                a.jcc(Cond::AboveOrEqual, null);
                // An entry without its change mark goes to the function, which sets it.
                a.mov_ri64(R11, array.marks as u64);
                let mark = Mem::Indexed {
                    base: R11,
                    index: RAX,
                    scale: Scale::X4,
                };
                a.test_mi(Width::W32, mark, array.mark_bit as i32);
                a.jcc(Cond::Equal, unmarked);
                a.imul_rri(Width::W64, RAX, RAX, array.stride as i32);
                a.mov_ri64(R11, array.values as u64);
                a.alu_rr(AluOp::Add, Width::W64, RAX, R11);
                a.jmp(done);
                a.bind(null);
                a.alu_rr(AluOp::Xor, Width::W32, RAX, RAX);
                a.jmp(done);
                a.bind(unmarked);
                call_function(self);
                self.asm.jmp(done);
            }
            _ => {
                call_function(self);
                self.asm.jmp(done);
            }
        }
        self.asm.bind(generic);
        self.asm
            .store_imm(Size::Dword, env(ENV_HELPER_ID), id as i32);
        self.helper_call(pc);
        self.asm.bind(done);
    }
}
