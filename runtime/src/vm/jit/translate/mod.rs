//! Translation of a validated program to x86-64: the driver (the outer entry and its abort path,
//! function frames, one dispatch per instruction class) and what the per-class modules share.

mod alu;
mod call;
mod fast_path;
mod jump;
mod memory;

use std::collections::HashMap;
use std::sync::Arc;

use bpftime_abi::{HelperId, Mmap};

use super::super::error::VmError;
use super::super::insn::*;
use super::super::program::{Program, STACK_SIZE};
use super::encoder::*;
use super::env::{
    helper_trampoline, ENV_ENTRY, ENV_HELPER_ID, ENV_PC, ENV_SAVED_RSP, ENV_STATUS, ST_HELPER_ERR,
};
use super::{JitMap, JitMapResolver, JitProgram};
use fast_path::{MapTokens, HELPER_MAP_DELETE, HELPER_MAP_LOOKUP, HELPER_MAP_UPDATE};

/// BPF register -> x86 register.
const REG: [Reg; 11] = [RAX, RDI, RSI, RDX, RCX, R8, RBX, R13, R14, R15, RBP];

/// The x86 register holding BPF register `r`.
fn reg(r: u8) -> Reg {
    REG[r as usize]
}

/// Holds the run's `JitEnv` in all generated code.
const ENV: Reg = R12;

/// The `JitEnv` field at `offset`.
fn env(offset: i32) -> Mem {
    mem(ENV, offset)
}

/// Registers every function prologue pushes, in push order (BPF r6-r10; callee-saved in
/// SysV, so they also preserve the native caller's values). The outer entry's abort path
/// reads them back from the first function's frame.
const FRAME_SAVES: [Reg; 5] = [RBX, R13, R14, R15, RBP];

/// `Width::W64` for the 64-bit classes, `W32` for the 32-bit ones.
fn width(is64: bool) -> Width {
    if is64 {
        Width::W64
    } else {
        Width::W32
    }
}

/// The state of one translation.
struct Translator<'p> {
    asm: Emitter,
    insns: &'p [Insn],
    /// Label of each instruction: jump targets and fallthrough. For the first instruction of a
    /// function it is bound after the prologue, so a loop back to it allocates no new frame.
    insn_labels: Vec<Label>,
    /// Label of the prologue of each function: call targets.
    func_labels: HashMap<usize, Label>,
    /// Where the generated code goes on a failed helper, call depth or `callx` (the status is
    /// already set): it unwinds to the outer entry's caller.
    abort: Label,
    /// Keep xmm0-7 across calls of native (Rust) code: see [`JitHook`](super::JitHook).
    preserve_vectors: bool,
    /// Address of the image's function table (`callx` targets).
    func_table: u64,
    trampoline: u64,
    /// The resolver the map fast paths are chosen with, and its answers so far, per token.
    resolver: Option<&'p Arc<dyn JitMapResolver>>,
    resolved: HashMap<u64, Option<JitMap>>,
}

impl JitProgram {
    /// Compile a validated program to native code.
    pub fn compile(prog: &Program) -> Result<Self, VmError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(VmError::Jit("the JIT supports x86_64 only".into()));
        }
        let insns = prog.insns();
        let n = insns.len();
        let mut func_table = vec![0u64; n].into_boxed_slice();
        let leaf = is_leaf(insns);
        let funcs = prog.functions();
        let mut asm = Emitter::with_capacity(n * 16 + 256, n + funcs.len() + 2);
        let insn_labels = (0..n).map(|_| asm.new_label()).collect();
        let func_labels = funcs.iter().map(|&f| (f, asm.new_label())).collect();
        let abort = asm.new_label();
        let mut t = Translator {
            asm,
            insns,
            insn_labels,
            func_labels,
            abort,
            preserve_vectors: leaf,
            func_table: func_table.as_mut_ptr() as u64,
            trampoline: helper_trampoline as *const () as usize as u64,
            resolver: prog.jit_maps(),
            resolved: HashMap::new(),
        };
        t.outer_entry();
        t.program();
        t.fell_off_end();
        let mut asm = t.asm;
        asm.resolve_fixups()
            .map_err(|l| VmError::Jit(format!("unbound label {l}")))?;

        let code = Mmap::executable(asm.code())
            .map_err(|err| VmError::Jit(format!("mapping code: {err}")))?;
        for &f in funcs.iter() {
            let off = asm
                .label_offset(t.func_labels[&f])
                .expect("function label bound");
            func_table[f] = code.as_ptr() as u64 + off as u64;
        }
        let resolver = prog.jit_maps();
        Ok(Self {
            code,
            leaf,
            len: asm.code().len(),
            func_table,
            map_set: resolver.map(|r| r.map_set_id()),
            _maps: resolver.cloned(),
        })
    }
}

impl Translator<'_> {
    /// The outer entry (the start of the code) and the abort path.
    fn outer_entry(&mut self) {
        let a = &mut self.asm;
        let outer_ret = a.new_label();
        // Outer entry: SysV arguments rdi..r8 are r1..r5 already; r9 = env. Every function
        // prologue saves rbx, r13, r14, r15 and rbp (BPF r6-r10) and its exit restores them,
        // so on a normal return the outer entry only has r12 (the env) to restore itself:
        // saving all six here too cost ~1 ns a run. The abort path skips the function exits
        // and restores those five from where the first function's prologue pushed them, just
        // below the return address of `call [r12+entry]` (see `FRAME_SAVES`).
        a.push(ENV); // also aligns rsp to 16 for the call
        a.mov_rr(Width::W64, ENV, R9);
        a.store(Size::Qword, env(ENV_SAVED_RSP), RSP);
        a.alu_rr(AluOp::Xor, Width::W32, RAX, RAX);
        a.call_mem(env(ENV_ENTRY));
        a.bind(outer_ret);
        a.pop(ENV);
        a.ret();
        a.bind(self.abort);
        a.load(Size::Qword, R11, env(ENV_SAVED_RSP));
        for (k, &r) in FRAME_SAVES.iter().enumerate() {
            // mov r, [r11 - 16 - 8k]: below the return address, in push order (read before
            // rsp moves above them).
            a.load(Size::Qword, r, mem(R11, -16 - 8 * k as i32));
        }
        a.mov_rr(Width::W64, RSP, R11);
        a.jmp(outer_ret);
    }

    /// Every instruction, in order, with a prologue before each function.
    fn program(&mut self) {
        // Map token each register holds, as a forward scan in program order sees it. Only a
        // guess for choosing fast paths (jumps are ignored): every fast path re-checks r1.
        let mut tokens = MapTokens::default();
        let mut pc = 0;
        while pc < self.insns.len() {
            let i = self.insns[pc];
            let func_label = self.func_labels.get(&pc).copied();
            if func_label.is_some() {
                tokens = MapTokens::default();
            }
            let r1_token = tokens.r1();
            tokens.track(&i, self.insns.get(pc + 1));
            if let Some(label) = func_label {
                if pc != 0 {
                    // Fallthrough from the previous function skips this prologue.
                    self.asm.jmp(self.insn_labels[pc]);
                }
                self.asm.bind(label);
                self.prologue();
            }
            self.asm.bind(self.insn_labels[pc]);
            pc = self.insn(pc, &i, r1_token);
        }
    }

    /// Translates instruction `pc`; returns the pc of the next one.
    fn insn(&mut self, pc: usize, i: &Insn, r1_token: Option<u64>) -> usize {
        let a = &mut self.asm;
        match i.class() {
            BPF_ALU | BPF_ALU64 => alu::alu(a, i),
            BPF_LD => {
                memory::load_imm64(a, i, &self.insns[pc + 1]);
                return pc + 2;
            }
            BPF_LDX => memory::load(a, i),
            BPF_ST => memory::store_imm(a, i),
            BPF_STX if i.mode() == BPF_ATOMIC => memory::atomic(a, i),
            BPF_STX => memory::store(a, i),
            _ => match i.op() {
                BPF_EXIT => self.exit(),
                BPF_CALL => self.call(pc, i, r1_token),
                _ => self.jump(pc, i),
            },
        }
        pc + 1
    }

    /// Function prologue: save r6-r10, allocate the frame.
    fn prologue(&mut self) {
        for r in FRAME_SAVES {
            self.asm.push(r);
        }
        self.asm
            .alu_ri(AluOp::Sub, Width::W64, RSP, STACK_SIZE as i32);
        self.asm.lea(RBP, mem(RSP, STACK_SIZE as i32));
    }

    /// `exit`: the prologue undone, r0 (rax) is the return value.
    fn exit(&mut self) {
        self.asm
            .alu_ri(AluOp::Add, Width::W64, RSP, STACK_SIZE as i32);
        for &r in FRAME_SAVES.iter().rev() {
            self.asm.pop(r);
        }
        self.asm.ret();
    }

    /// Falling off the end: the verifier forbids it; report an error like the interpreter.
    fn fell_off_end(&mut self) {
        let a = &mut self.asm;
        let end = a.new_label();
        a.bind(end);
        a.store_imm(Size::Dword, env(ENV_STATUS), ST_HELPER_ERR as i32);
        a.store_imm(Size::Dword, env(ENV_PC), (self.insns.len() - 1) as i32);
        a.store_imm(Size::Dword, env(ENV_HELPER_ID), u32::MAX as i32);
        a.jmp(self.abort);
    }
}

/// Whether a program is a *leaf* for [`JitHook`](super::JitHook): its helper calls are all map
/// lookup/update/delete (no per-run helper state: no tail call, no override, no ringbuf
/// reservation) and it makes no `callx` (which may reach any helper).
fn is_leaf(insns: &[Insn]) -> bool {
    insns.iter().all(|i| {
        !(i.class() == BPF_JMP && i.op() == BPF_CALL)
            || (!i.is_reg_src()
                && (i.src == BPF_PSEUDO_CALL
                    || matches!(
                        HelperId(i.imm as u32),
                        HELPER_MAP_LOOKUP | HELPER_MAP_UPDATE | HELPER_MAP_DELETE
                    )))
    })
}
