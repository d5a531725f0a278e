//! x86_64 JIT for the verified path.
//!
//! Register mapping follows the kernel's `bpf_jit_comp.c`: r0=rax, r1=rdi, r2=rsi, r3=rdx,
//! r4=rcx, r5=r8, r6=rbx, r7=r13, r8=r14, r9=r15, r10=rbp. r12 holds the run environment
//! (`JitEnv`); r9, r10 and r11 are scratch. Every BPF function (main program and each
//! subprogram) is a native function with its own 512-byte stack frame that saves r6-r10.
//! Memory accesses are unchecked: only run programs that the kernel verifier accepted (or that
//! are otherwise known to touch only valid memory).
//!
//! # Map fast paths
//! Helper calls normally go through `helper_trampoline` into the stateful [`Helpers`] (a dyn
//! call, a `catch_unwind`, a [`CallContext`], a match on the id): ~10 ns per call, as much as the
//! map operation itself. The kernel avoids this because its verifier knows which map each call
//! site uses. Given a [`JitMapResolver`] (see [`Program::with_jit_maps`]), the JIT does the
//! same for `bpf_map_lookup_elem`, `bpf_map_update_elem` and `bpf_map_delete_elem`: when the
//! value in r1 at a call site is known at JIT time (an `lddw` map token), the call goes straight
//! to a specialised `extern "C"` [`JitMapFn`] with r1 replaced by the map's handle, and ARRAY
//! lookups are inlined (bounds check, change-mark test, `base + index * stride`). Every fast path
//! is guarded at run time: r1 must still hold the expected token (the JIT's tracking of r1 is a
//! simple forward scan, so a path it did not foresee just takes the generic call), and the
//! running [`Helpers`] must name the same maps ([`Helpers::map_set_id`], checked once per run);
//! otherwise the generic trampoline runs, so behaviour never depends on the fast path.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

use bpftime_abi::{HelperId, Mmap};

use super::error::{HelperError, VmError};
use super::helpers::{CallContext, FuncInvoker, Helpers};
use super::insn::*;
use super::memory::MemoryMap;
use super::program::{
    Program, FUNC_PTR_MASK, FUNC_PTR_TAG, MAX_CALL_FRAMES, MAX_TAIL_CALLS, STACK_SIZE,
};

const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RBX: u8 = 3;
const RSP: u8 = 4;
const RBP: u8 = 5;
const R9: u8 = 9;
const R10: u8 = 10;
const R11: u8 = 11;
const R12: u8 = 12;
const R13: u8 = 13;
const R14: u8 = 14;
const R15: u8 = 15;

/// BPF register -> x86 register.
const REG: [u8; 11] = [RAX, 7, 6, RDX, RCX, 8, RBX, R13, R14, R15, RBP];

/// Registers every function prologue pushes, in push order (BPF r6-r10; callee-saved in
/// SysV, so they also preserve the native caller's values). The outer entry's abort path
/// reads them back from the first function's frame.
const FRAME_SAVES: [u8; 5] = [RBX, R13, R14, R15, RBP];

// Condition codes.
const CC_B: u8 = 0x2;
const CC_AE: u8 = 0x3;
const CC_E: u8 = 0x4;
const CC_NE: u8 = 0x5;
const CC_BE: u8 = 0x6;
const CC_A: u8 = 0x7;
const CC_L: u8 = 0xc;
const CC_GE: u8 = 0xd;
const CC_LE: u8 = 0xe;
const CC_G: u8 = 0xf;

// Status codes written to `JitEnv::status`.
const ST_OK: u32 = 0;
const ST_HELPER_ERR: u32 = 1;
const ST_TAIL_CALL: u32 = 2;
const ST_DEPTH: u32 = 3;
const ST_BAD_CALLX: u32 = 4;

// Offsets of the fields of `JitEnv` the generated code touches.
const ENV_SAVED_RSP: i32 = 0;
const ENV_STATUS: i32 = 8;
const ENV_PC: i32 = 12;
const ENV_HELPER_ID: i32 = 16;
const ENV_DEPTH: i32 = 20;
const ENV_AUX: i32 = 24;
const ENV_ENTRY: i32 = 32;
const ENV_FAST: i32 = 40;

const _: () = {
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, saved_rsp) == ENV_SAVED_RSP as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, status) == ENV_STATUS as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, pc) == ENV_PC as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, helper_id) == ENV_HELPER_ID as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, depth) == ENV_DEPTH as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, aux) == ENV_AUX as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, entry) == ENV_ENTRY as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, fast) == ENV_FAST as usize);
};

/// Helper ids with map fast paths.
const HELPER_MAP_LOOKUP: HelperId = HelperId::MAP_LOOKUP_ELEM;
const HELPER_MAP_UPDATE: HelperId = HelperId::MAP_UPDATE_ELEM;
const HELPER_MAP_DELETE: HelperId = HelperId::MAP_DELETE_ELEM;

/// A map helper the JIT calls directly (see the module docs), with the SysV ABI: r1 replaced by
/// [`JitMap::handle`], r2..r5 as the program passed them, and the run's [`JitCall`] (for
/// [`JitCall::fail`]). Returns the helper's r0. Must not unwind (catch panics and report them
/// with [`JitCall::fail`]).
pub type JitMapFn = unsafe extern "C" fn(
    handle: *const (),
    a2: u64,
    a3: u64,
    a4: u64,
    a5: u64,
    call: *mut JitCall,
) -> u64;

/// The run state a [`JitMapFn`] receives (opaque).
pub struct JitCall {
    _opaque: [u8; 0],
}

impl JitCall {
    /// Abort the running program with `error` from helper `id` once the function returns.
    ///
    /// # Safety
    /// `call` must be the pointer the JIT passed to the [`JitMapFn`] now running.
    pub unsafe fn fail(call: *mut JitCall, id: u32, error: HelperError) {
        let env = call as *mut JitEnv<'_, '_>;
        // SAFETY: the JIT passes its live `JitEnv` (exclusively borrowed by `run`; the generated
        // code holds no reference across the call) as `call`.
        unsafe {
            (*env).error = Some(VmError::from_helper((*env).pc as usize, id, error));
            (*env).status = ST_HELPER_ERR;
        }
    }
}

/// An ARRAY map whose `bpf_map_lookup_elem` the JIT inlines (as the kernel's JIT does): value
/// `i` is at `values + i * stride` for `i < max_entries`. A lookup must leave a change mark
/// (`mark_bit` in the 32-bit word at `marks + 4 * i`) for the sync forwarder; inline code only
/// tests it (one load of a word the sync protocol allows to be read plainly) and, when the bit
/// is missing, calls [`JitMap::lookup`] instead, which sets it.
#[derive(Debug, Clone, Copy)]
pub struct InlineArray {
    pub values: *mut u8,
    pub stride: u32,
    pub max_entries: u32,
    pub marks: *const u32,
    pub mark_bit: u32,
}

/// How JIT code reaches one map directly. Every pointer must stay valid while the
/// [`JitMapResolver`] that returned it lives (the JIT image keeps the resolver).
#[derive(Debug, Clone, Copy)]
pub struct JitMap {
    /// First argument of the functions below.
    pub handle: *const (),
    /// `bpf_map_lookup_elem(map, key)`.
    pub lookup: Option<JitMapFn>,
    /// `bpf_map_update_elem(map, key, value, flags)`.
    pub update: Option<JitMapFn>,
    /// `bpf_map_delete_elem(map, key)`.
    pub delete: Option<JitMapFn>,
    /// Inline lookups (needs `lookup` for the unmarked case).
    pub inline_array: Option<InlineArray>,
}

/// Resolves the map values `lddw` loads (map tokens) to direct entry points for the JIT.
pub trait JitMapResolver: Send + Sync {
    /// Identity of the maps the tokens name: fast paths run only when the running
    /// [`Helpers::map_set_id`] returns the same value (equal ids must mean the same maps).
    fn map_set_id(&self) -> u64;

    /// The map `token` names, if JIT code may reach it directly.
    fn resolve(&self, token: u64) -> Option<JitMap>;
}

/// State shared between the generated code and the helper trampoline.
#[repr(C)]
struct JitEnv<'h, 'm> {
    saved_rsp: u64,
    status: u32,
    pc: u32,
    helper_id: u32,
    depth: u32,
    aux: u64,
    /// Native address of the function the outer entry calls (the program, or a callback).
    entry: u64,
    /// Nonzero when the running helpers name the maps the image's fast paths were compiled
    /// against (see the module docs); the fast paths test it before anything else.
    fast: u64,
    /// The image running (for callbacks: its function table).
    jit: *const JitProgram,
    helpers: *mut (dyn Helpers + 'h),
    mem: *mut MemoryMap<'m>,
    error: Option<VmError>,
    tail: Option<(Arc<Program>, u64)>,
}

type Label = usize;

struct Emitter {
    buf: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
    /// Keep xmm0-7 across calls of native (Rust) code: see [`JitHook`].
    preserve_vectors: bool,
}

impl Emitter {
    fn byte(&mut self, b: u8) {
        self.buf.push(b);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    fn imm32(&mut self, v: i32) {
        self.bytes(&v.to_le_bytes());
    }
    fn new_label(&mut self) -> Label {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, l: Label) {
        self.labels[l] = Some(self.buf.len());
    }
    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.buf.len(), l));
        self.imm32(0);
    }
    fn rex(&mut self, w: bool, r: u8, x: u8, b: u8, force: bool) {
        let v = 0x40
            | ((w as u8) << 3)
            | (((r >> 3) & 1) << 2)
            | (((x >> 3) & 1) << 1)
            | ((b >> 3) & 1);
        if v != 0x40 || force {
            self.byte(v);
        }
    }
    /// `op reg, rm` with a register operand in r/m.
    fn rr(&mut self, w: bool, op: &[u8], reg: u8, rm: u8) {
        self.rex(w, reg, 0, rm, false);
        self.bytes(op);
        self.byte(0xc0 | ((reg & 7) << 3) | (rm & 7));
    }
    /// Like `rr` but forces a REX prefix so byte registers 4-7 mean spl/bpl/sil/dil.
    fn rr_byte(&mut self, w: bool, op: &[u8], reg: u8, rm: u8) {
        let force = (4..8).contains(&reg) || (4..8).contains(&rm);
        self.rex(w, reg, 0, rm, force);
        self.bytes(op);
        self.byte(0xc0 | ((reg & 7) << 3) | (rm & 7));
    }
    /// `[prefix] op reg, [base+disp32]`.
    #[allow(clippy::too_many_arguments)]
    fn mem(
        &mut self,
        prefix: &[u8],
        w: bool,
        op: &[u8],
        reg: u8,
        base: u8,
        disp: i32,
        force: bool,
    ) {
        self.bytes(prefix);
        self.rex(w, reg, 0, base, force);
        self.bytes(op);
        self.byte(0x80 | ((reg & 7) << 3) | (base & 7));
        if base & 7 == 4 {
            self.byte(0x24);
        }
        self.imm32(disp);
    }
    fn mov_rr(&mut self, w: bool, dst: u8, src: u8) {
        self.rr(w, &[0x89], src, dst);
    }
    fn alu_rr(&mut self, w: bool, op: u8, dst: u8, src: u8) {
        self.rr(w, &[op], src, dst);
    }
    fn alu_ri(&mut self, w: bool, ext: u8, dst: u8, imm: i32) {
        self.rr(w, &[0x81], ext, dst);
        self.imm32(imm);
    }
    fn mov_ri32(&mut self, dst: u8, imm: u32) {
        self.rex(false, 0, 0, dst, false);
        self.byte(0xb8 + (dst & 7));
        self.imm32(imm as i32);
    }
    fn mov_ri64(&mut self, dst: u8, imm: u64) {
        if imm <= u32::MAX as u64 {
            self.mov_ri32(dst, imm as u32);
        } else if imm as i64 >= i32::MIN as i64 && imm as i64 <= i32::MAX as i64 {
            self.rr(true, &[0xc7], 0, dst);
            self.imm32(imm as i32);
        } else {
            self.rex(true, 0, 0, dst, false);
            self.byte(0xb8 + (dst & 7));
            self.bytes(&imm.to_le_bytes());
        }
    }
    fn push(&mut self, r: u8) {
        self.rex(false, 0, 0, r, false);
        self.byte(0x50 + (r & 7));
    }
    fn pop(&mut self, r: u8) {
        self.rex(false, 0, 0, r, false);
        self.byte(0x58 + (r & 7));
    }
    fn jmp(&mut self, l: Label) {
        self.byte(0xe9);
        self.rel32(l);
    }
    fn jcc(&mut self, cc: u8, l: Label) {
        self.bytes(&[0x0f, 0x80 + cc]);
        self.rel32(l);
    }
    fn call_label(&mut self, l: Label) {
        self.byte(0xe8);
        self.rel32(l);
    }
    fn call_reg(&mut self, r: u8) {
        self.rr(false, &[0xff], 2, r);
    }
    /// `call r11` into native code (a helper or map function), keeping xmm0-7 around it when
    /// the image must preserve them. rsp stays 16-byte aligned.
    fn native_call_r11(&mut self) {
        if !self.preserve_vectors {
            self.call_reg(R11);
            return;
        }
        self.bytes(&[0x48, 0x81, 0xec, 0x80, 0, 0, 0]); // sub rsp, 128
        for x in 0..8u8 {
            self.bytes(&[0xf3, 0x0f, 0x7f, 0x44 | (x << 3), 0x24, 16 * x]); // movdqu [rsp+16x], xmmx
        }
        self.call_reg(R11);
        for x in 0..8u8 {
            self.bytes(&[0xf3, 0x0f, 0x6f, 0x44 | (x << 3), 0x24, 16 * x]); // movdqu xmmx, [rsp+16x]
        }
        self.bytes(&[0x48, 0x81, 0xc4, 0x80, 0, 0, 0]); // add rsp, 128
    }
    fn env_store_imm(&mut self, off: i32, v: u32) {
        self.mem(&[], false, &[0xc7], 0, R12, off, false);
        self.imm32(v as i32);
    }
    fn env_store_r32(&mut self, off: i32, r: u8) {
        self.mem(&[], false, &[0x89], r, R12, off, false);
    }
}

/// Compiled native code of a program.
pub struct JitProgram {
    /// Read+execute copy of the generated code (W^X, see [`Mmap::executable`]).
    code: Mmap,
    /// Calls no helper but the map lookup/update/delete and no `callx` (see [`JitHook`]);
    /// then its native calls keep xmm0-7.
    leaf: bool,
    len: usize,
    /// Native entry of each instruction that starts a function (for `callx` and callbacks);
    /// 0 elsewhere.
    func_table: Box<[u64]>,
    /// The resolver the map fast paths were compiled against: keeps alive the map memory and
    /// the map handles that the generated code points at.
    _maps: Option<Arc<dyn JitMapResolver>>,
    /// `_maps`' [`JitMapResolver::map_set_id`].
    map_set: Option<u64>,
}

// SAFETY: the code mapping is immutable (read+execute) after `compile` and the function table is
// never written after it; sharing them between threads is sound. The map fast paths in the code
// reach shared-memory maps built for concurrent use (from many processes), through handles that
// `_maps` (`Send + Sync`) keeps alive.
unsafe impl Send for JitProgram {}
// SAFETY: as above, no interior mutability.
unsafe impl Sync for JitProgram {}

impl std::fmt::Debug for JitProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitProgram")
            .field("size", &self.code.len())
            .finish()
    }
}

type EntryFn = unsafe extern "C" fn(u64, u64, u64, u64, u64, *mut JitEnv<'_, '_>) -> u64;

impl JitProgram {
    /// Compile a validated program to native code.
    pub fn compile(prog: &Program) -> Result<Self, VmError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(VmError::Jit("the JIT supports x86_64 only".into()));
        }
        let insns = prog.insns();
        let n = insns.len();
        let mut func_table = vec![0u64; n].into_boxed_slice();
        let table_addr = func_table.as_mut_ptr() as u64;
        let leaf = is_leaf(insns);
        let mut e = Emitter {
            buf: Vec::with_capacity(n * 16 + 256),
            labels: vec![None; n],
            fixups: Vec::new(),
            preserve_vectors: leaf,
        };
        let funcs = prog.functions();
        // Call targets: the prologue of each function. The instruction's own label (used by
        // jumps and fallthrough) is bound after the prologue, so a loop back to the first
        // instruction of a function does not allocate another frame.
        let func_labels: std::collections::HashMap<usize, Label> =
            funcs.iter().map(|&f| (f, e.new_label())).collect();
        let outer_ret = e.new_label();
        let abort = e.new_label();
        // Outer entry: SysV arguments rdi..r8 are r1..r5 already; r9 = env. Every function
        // prologue saves rbx, r13, r14, r15 and rbp (BPF r6-r10) and its exit restores them,
        // so on a normal return the outer entry only has r12 (the env) to restore itself:
        // saving all six here too cost ~1 ns a run. The abort path skips the function exits
        // and restores those five from where the first function's prologue pushed them, just
        // below the return address of `call [r12+entry]` (see `FRAME_SAVES`).
        e.push(R12); // also aligns rsp to 16 for the call
        e.mov_rr(true, R12, R9);
        e.mem(&[], true, &[0x89], RSP, R12, ENV_SAVED_RSP, false);
        e.alu_rr(false, 0x31, RAX, RAX);
        e.mem(&[], false, &[0xff], 2, R12, ENV_ENTRY, false); // call [r12+entry]
        e.bind(outer_ret);
        e.pop(R12);
        e.byte(0xc3);
        e.bind(abort);
        e.mem(&[], true, &[0x8b], R11, R12, ENV_SAVED_RSP, false);
        for (k, &r) in FRAME_SAVES.iter().enumerate() {
            // mov r, [r11 - 16 - 8k]: below the return address, in push order (read before
            // rsp moves above them).
            e.mem(&[], true, &[0x8b], r, R11, -16 - 8 * k as i32, false);
        }
        e.mov_rr(true, RSP, R11);
        e.jmp(outer_ret);

        let tramp = helper_trampoline as *const () as usize as u64;
        let resolver = prog.jit_maps();
        let mut resolved: std::collections::HashMap<u64, Option<JitMap>> = Default::default();
        // Map token each register holds, as a forward scan in program order sees it. Only a
        // guess for choosing fast paths (jumps are ignored): every fast path re-checks r1.
        let mut tokens: [Option<u64>; 11] = [None; 11];
        let mut pc = 0;
        while pc < n {
            let i = insns[pc];
            if func_labels.contains_key(&pc) {
                tokens = [None; 11];
            }
            let r1_token = tokens[1];
            track_tokens(&mut tokens, &i, insns.get(pc + 1));
            if let Some(&fl) = func_labels.get(&pc) {
                if pc != 0 {
                    // Fallthrough from the previous function skips this prologue.
                    e.jmp(pc);
                }
                e.bind(fl);
                // Function prologue: save r6-r10, allocate the frame.
                for r in FRAME_SAVES {
                    e.push(r);
                }
                e.alu_ri(true, 5, RSP, STACK_SIZE as i32);
                e.mem(&[], true, &[0x8d], RBP, RSP, STACK_SIZE as i32, false);
            }
            e.bind(pc);
            pc += 1;
            let dst = REG[i.dst as usize];
            let src = REG[i.src as usize];
            let class = i.class();
            match class {
                BPF_ALU | BPF_ALU64 => emit_alu(&mut e, &i, dst, src),
                BPF_LD => {
                    let v = (i.imm as u32 as u64) | ((insns[pc].imm as u32 as u64) << 32);
                    e.mov_ri64(dst, v);
                    pc += 1;
                }
                BPF_LDX => {
                    let off = i.off as i32;
                    match (i.mode() == BPF_MEMSX, i.size()) {
                        (false, BPF_B) => e.mem(&[], false, &[0x0f, 0xb6], dst, src, off, false),
                        (false, BPF_H) => e.mem(&[], false, &[0x0f, 0xb7], dst, src, off, false),
                        (false, BPF_W) => e.mem(&[], false, &[0x8b], dst, src, off, false),
                        (false, _) => e.mem(&[], true, &[0x8b], dst, src, off, false),
                        (true, BPF_B) => e.mem(&[], true, &[0x0f, 0xbe], dst, src, off, false),
                        (true, BPF_H) => e.mem(&[], true, &[0x0f, 0xbf], dst, src, off, false),
                        (true, _) => e.mem(&[], true, &[0x63], dst, src, off, false),
                    }
                }
                BPF_ST => {
                    let off = i.off as i32;
                    match i.size() {
                        BPF_B => {
                            e.mem(&[], false, &[0xc6], 0, dst, off, false);
                            e.byte(i.imm as u8);
                        }
                        BPF_H => {
                            e.mem(&[0x66], false, &[0xc7], 0, dst, off, false);
                            e.bytes(&(i.imm as u16).to_le_bytes());
                        }
                        BPF_W => {
                            e.mem(&[], false, &[0xc7], 0, dst, off, false);
                            e.imm32(i.imm);
                        }
                        _ => {
                            e.mem(&[], true, &[0xc7], 0, dst, off, false);
                            e.imm32(i.imm);
                        }
                    }
                }
                BPF_STX => {
                    let off = i.off as i32;
                    if i.mode() == BPF_ATOMIC {
                        emit_atomic(&mut e, &i, dst, src);
                    } else {
                        match i.size() {
                            BPF_B => {
                                let force = (4..8).contains(&src);
                                e.mem(&[], false, &[0x88], src, dst, off, force)
                            }
                            BPF_H => e.mem(&[0x66], false, &[0x89], src, dst, off, false),
                            BPF_W => e.mem(&[], false, &[0x89], src, dst, off, false),
                            _ => e.mem(&[], true, &[0x89], src, dst, off, false),
                        }
                    }
                }
                _ => {
                    let is32 = class == BPF_JMP32;
                    match i.op() {
                        BPF_JA => {
                            let off = if is32 { i.imm as i64 } else { i.off as i64 };
                            e.jmp((pc as i64 + off) as usize);
                        }
                        BPF_EXIT => {
                            e.alu_ri(true, 0, RSP, STACK_SIZE as i32);
                            for r in [RBP, R15, R14, R13, RBX] {
                                e.pop(r);
                            }
                            e.byte(0xc3);
                        }
                        BPF_CALL => {
                            let cur = (pc - 1) as u32;
                            if i.is_reg_src() {
                                emit_callx(&mut e, dst, cur, n, table_addr, tramp, abort);
                            } else if i.src == BPF_PSEUDO_CALL {
                                let t = (pc as i64 + i.imm as i64) as usize;
                                let fl = func_labels[&t];
                                emit_local_call(&mut e, cur, abort, |e| e.call_label(fl));
                            } else {
                                let id = i.imm as u32;
                                let fast = resolver.and_then(|r| {
                                    let token = r1_token?;
                                    let map =
                                        *resolved.entry(token).or_insert_with(|| r.resolve(token));
                                    Some((token, map?))
                                });
                                match fast {
                                    Some((token, map)) if has_fast_path(&map, id) => {
                                        emit_fast_map_call(
                                            &mut e, cur, id, token, &map, tramp, abort,
                                        );
                                    }
                                    _ => {
                                        e.env_store_imm(ENV_HELPER_ID, id);
                                        emit_helper_call(&mut e, cur, tramp, abort);
                                    }
                                }
                            }
                        }
                        op => {
                            let w = !is32;
                            if i.is_reg_src() {
                                let opb = if op == BPF_JSET { 0x85 } else { 0x39 };
                                e.alu_rr(w, opb, dst, src);
                            } else if op == BPF_JSET {
                                e.rr(w, &[0xf7], 0, dst);
                                e.imm32(i.imm);
                            } else {
                                e.alu_ri(w, 7, dst, i.imm);
                            }
                            let cc = match op {
                                BPF_JEQ => CC_E,
                                BPF_JNE | BPF_JSET => CC_NE,
                                BPF_JGT => CC_A,
                                BPF_JGE => CC_AE,
                                BPF_JLT => CC_B,
                                BPF_JLE => CC_BE,
                                BPF_JSGT => CC_G,
                                BPF_JSGE => CC_GE,
                                BPF_JSLT => CC_L,
                                _ => CC_LE,
                            };
                            e.jcc(cc, (pc as i64 + i.off as i64) as usize);
                        }
                    }
                }
            }
        }
        // Falling off the end: the verifier forbids it; report an error like the interpreter.
        let end = e.new_label();
        e.bind(end);
        e.env_store_imm(ENV_STATUS, ST_HELPER_ERR);
        e.env_store_imm(ENV_PC, (n - 1) as u32);
        e.env_store_imm(ENV_HELPER_ID, u32::MAX);
        e.jmp(abort);

        for (pos, l) in std::mem::take(&mut e.fixups) {
            let target = e.labels[l].ok_or_else(|| VmError::Jit(format!("unbound label {l}")))?;
            let rel = target as i64 - (pos as i64 + 4);
            e.buf[pos..pos + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }

        let code =
            Mmap::executable(&e.buf).map_err(|err| VmError::Jit(format!("mapping code: {err}")))?;
        for &f in funcs.iter() {
            let off = e.labels[func_labels[&f]].expect("function label bound");
            func_table[f] = code.as_ptr() as u64 + off as u64;
        }
        Ok(Self {
            code,
            leaf,
            len: e.buf.len(),
            func_table,
            map_set: resolver.map(|r| r.map_set_id()),
            _maps: resolver.cloned(),
        })
    }

    /// Whether the fast paths may run with helpers whose [`Helpers::map_set_id`] is `map_set`.
    #[inline]
    fn fast_for(&self, map_set: Option<u64>) -> u64 {
        u64::from(self.map_set.is_some() && self.map_set == map_set)
    }

    /// The generated machine code (for disassembly when debugging).
    pub fn code(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the read+execute mapping hold the code; the mapping
        // lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.code.as_ptr(), self.len) }
    }

    /// Size of the generated code mapping in bytes.
    pub fn code_size(&self) -> usize {
        self.code.len()
    }

    /// Run the compiled code with r1..r5 = `args`; helpers reach `helpers` and `mem` through
    /// the trampoline. Tail calls requested by a helper run the target's JIT image.
    ///
    /// # Safety
    /// Memory accesses are not checked: the program must only touch memory that is valid for
    /// the whole run (verified by the kernel verifier, or known to use only its stack and
    /// buffers that stay alive, like the conformance suite's `-- mem`).
    pub unsafe fn run(
        &self,
        args: [u64; 5],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError> {
        let map_set = helpers.map_set_id();
        // SAFETY: the caller's contract.
        unsafe { self.run_with_map_set(args, mem, helpers, map_set) }
    }

    /// [`run`](Self::run) for a caller that knows `helpers.map_set_id()` already (saves a
    /// dynamic call per run).
    ///
    /// # Safety
    /// As [`run`](Self::run); `map_set` must be `helpers.map_set_id()`.
    #[inline]
    pub unsafe fn run_with_map_set(
        &self,
        args: [u64; 5],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
        map_set: Option<u64>,
    ) -> Result<u64, VmError> {
        let mut env = self.fresh_env(
            map_set,
            helpers as *mut (dyn Helpers + '_),
            mem as *mut MemoryMap<'_>,
        );
        // SAFETY: the caller upholds the memory contract; `env` outlives the call.
        let r = unsafe { self.enter(args, &mut env) };
        if env.status == ST_OK {
            return Ok(r);
        }
        // SAFETY: as above.
        unsafe { Self::finish(env, r, map_set) }
    }

    /// The environment of a run starting in this image's main function.
    #[inline(always)]
    fn fresh_env<'h, 'm>(
        &self,
        map_set: Option<u64>,
        helpers: *mut (dyn Helpers + 'h),
        mem: *mut MemoryMap<'m>,
    ) -> JitEnv<'h, 'm> {
        JitEnv {
            saved_rsp: 0,
            status: ST_OK,
            pc: 0,
            helper_id: 0,
            depth: 0,
            aux: 0,
            entry: self.func_table[0],
            fast: self.fast_for(map_set),
            jit: self,
            helpers,
            mem,
            error: None,
            tail: None,
        }
    }

    /// A run that did not simply return: tail calls (run here) and errors.
    ///
    /// # Safety
    /// As [`run`](Self::run), for the `env` of that run.
    #[cold]
    #[inline(never)]
    unsafe fn finish(
        mut env: JitEnv<'_, '_>,
        r: u64,
        map_set: Option<u64>,
    ) -> Result<u64, VmError> {
        // SAFETY: forwarded.
        unsafe { Self::finish_in_place(&mut env, r, map_set) }
    }

    /// [`finish`](Self::finish) on an environment that stays in place (a [`JitSession`]'s).
    /// Leaves `env.entry`, `env.fast` and `env.jit` naming the last tail-called image.
    ///
    /// # Safety
    /// As [`finish`](Self::finish).
    unsafe fn finish_in_place(
        env: &mut JitEnv<'_, '_>,
        mut r: u64,
        map_set: Option<u64>,
    ) -> Result<u64, VmError> {
        let mut holder: Arc<Program>;
        let mut tail_calls = 0;
        loop {
            if env.status == ST_TAIL_CALL {
                let (next, r1) = env.tail.take().expect("tail call target");
                tail_calls += 1;
                if tail_calls > MAX_TAIL_CALLS {
                    return Err(VmError::TailCallLimit(MAX_TAIL_CALLS));
                }
                holder = next;
                let jit = holder.jit()?;
                env.status = ST_OK;
                env.depth = 0;
                env.entry = jit.func_table[0];
                env.fast = jit.fast_for(map_set);
                env.jit = jit;
                // SAFETY: as above; the tail-called program is under the same contract.
                r = unsafe { jit.enter([r1, 0, 0, 0, 0], env) };
                continue;
            }
            return take_outcome(env, r);
        }
    }

    /// # Safety
    /// See [`JitProgram::run`].
    #[inline(always)]
    unsafe fn enter(&self, args: [u64; 5], env: *mut JitEnv<'_, '_>) -> u64 {
        // SAFETY: `code` starts with the outer entry, which follows the SysV ABI with the
        // signature `EntryFn`.
        let f: EntryFn = unsafe { std::mem::transmute::<*mut u8, EntryFn>(self.code.as_ptr()) };
        // SAFETY: see the function contract.
        unsafe { f(args[0], args[1], args[2], args[3], args[4], env) }
    }
}

/// A run environment kept across runs of one image with the same helpers: a hook runs the
/// same program with the same per-thread helpers on every call, so the environment is filled
/// once and a run that returns normally stores only its arguments (filling it per run, with the
/// memory map and the result moves around it, was ~40 stores on every hooked call).
pub struct JitSession<'h> {
    env: JitEnv<'h, 'static>,
    /// Where helpers may register regions (the JIT never checks them); emptied after a run
    /// that did.
    mem: MemoryMap<'static>,
    image: *const JitProgram,
    map_set: Option<u64>,
}

impl JitProgram {
    /// A session running this image with `helpers`, boxed so the environment can point at
    /// its own memory map.
    ///
    /// # Safety
    /// `helpers` must stay valid, and be used by nothing else while a run is in progress, for
    /// as long as the session lives; so must this image.
    pub unsafe fn session<'h>(&self, helpers: *mut (dyn Helpers + 'h)) -> Box<JitSession<'h>> {
        // SAFETY: the caller's contract: `helpers` is valid.
        let map_set = unsafe { (*helpers).map_set_id() };
        let mut session = Box::new(JitSession {
            env: self.fresh_env(map_set, helpers, std::ptr::null_mut()),
            mem: MemoryMap::new(),
            image: self,
            map_set,
        });
        session.env.mem = &mut session.mem;
        session
    }
}

impl JitSession<'_> {
    /// Runs the image with r1 = `r1`, r2 = `r2`.
    ///
    /// # Safety
    /// As [`JitProgram::run`], plus the contract of [`JitProgram::session`].
    #[inline(always)]
    pub unsafe fn run(&mut self, r1: u64, r2: u64) -> Result<u64, VmError> {
        // SAFETY: the caller's contract; the image outlives the session.
        let r = unsafe { (*self.image).enter([r1, r2, 0, 0, 0], &mut self.env) };
        if self.env.status == ST_OK && self.mem.regions().is_empty() {
            return Ok(r);
        }
        // SAFETY: as above.
        unsafe { self.finish(r) }
    }

    /// What [`JitHook`]'s entry leaves to its `after` callback: the outcome of a run (of
    /// this session) that returned `r0` without status OK; the session is ready again after.
    ///
    /// # Safety
    /// As [`run`](Self::run); only right after such a run, before any other.
    pub unsafe fn finish_hook_run(&mut self, r0: u64) -> Result<u64, VmError> {
        // SAFETY: forwarded.
        unsafe { self.finish(r0) }
    }

    /// Tail calls and errors ([`JitProgram::finish`]); then puts the environment back as
    /// [`JitProgram::session`] filled it.
    ///
    /// # Safety
    /// As [`run`](Self::run).
    #[cold]
    #[inline(never)]
    unsafe fn finish(&mut self, r: u64) -> Result<u64, VmError> {
        let result = if self.env.status == ST_OK {
            Ok(r)
        } else {
            // SAFETY: forwarded.
            unsafe { JitProgram::finish_in_place(&mut self.env, r, self.map_set) }
        };
        // SAFETY: the image outlives the session.
        let image = unsafe { &*self.image };
        self.mem = MemoryMap::new();
        self.env = image.fresh_env(self.map_set, self.env.helpers, &mut self.mem);
        result
    }
}

/// Whether a program is a *leaf* for [`JitHook`]: its helper calls are all map
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

/// Called by [`JitHook`]'s entry, with xmm0-7 saved: `(data, ctx, slot)`, as the entry itself.
pub type JitHookSlowFn = unsafe extern "C" fn(data: *const (), ctx: *mut u8, slot: usize) -> u64;
/// Called by [`JitHook`]'s entry, with xmm0-7 saved, after a run that did not simply return
/// (an error, see [`JitSession::finish_hook_run`]): `(data, slot, r0)`; returns what the entry
/// returns.
pub type JitHookAfterFn = unsafe extern "C" fn(data: *const (), slot: usize, r0: u64) -> u64;

/// A machine-code entry point running an image in per-thread-slot sessions, for a hook engine
/// to call directly: `entry(hook, ctx, slot) -> 0`, with `ctx` the context of `ctx_len` bytes
/// and `slot` the calling thread's slot. With the per-slot environment set up once, a run is a
/// few loads, the image's code and one status test; the helpers' per-run reset is skipped, so
/// only images whose runs need none get an entry (see [`new`](Self::new)). The entry itself
/// touches no vector register (it saves xmm0-7 around its callbacks); a *leaf* image (its only
/// helper calls are map lookup/update/delete, and no `callx`) saves them around its own native
/// calls too, so a caller need not save them at all ([`preserves_vector_regs`]
/// (Self::preserves_vector_regs)). The first run of a slot (no session registered yet, see
/// [`set_slot`](Self::set_slot)) goes to `slow`, a run that did not simply return to `after`.
#[repr(C)]
pub struct JitHook {
    envs: *const AtomicPtr<JitEnv<'static, 'static>>,
    slots: usize,
    code: u64,
    ctx_len: u64,
    slow: JitHookSlowFn,
    after: JitHookAfterFn,
    data: *const (),
    image: *const JitProgram,
    /// Owns what `envs` points at.
    env_table: Box<[AtomicPtr<JitEnv<'static, 'static>>]>,
}

// SAFETY: the slot table is atomics; the other fields are immutable after `new`. What the
// pointers name (the image, the callbacks' data) is owned by whoever made the hook, who keeps it
// alive (the contract of `new`).
unsafe impl Send for JitHook {}
// SAFETY: as above.
unsafe impl Sync for JitHook {}

const HOOK_ENVS: usize = std::mem::offset_of!(JitHook, envs);
const HOOK_SLOTS: usize = std::mem::offset_of!(JitHook, slots);
const HOOK_CODE: usize = std::mem::offset_of!(JitHook, code);
const HOOK_CTX_LEN: usize = std::mem::offset_of!(JitHook, ctx_len);
const HOOK_SLOW: usize = std::mem::offset_of!(JitHook, slow);
const HOOK_AFTER: usize = std::mem::offset_of!(JitHook, after);
const HOOK_DATA: usize = std::mem::offset_of!(JitHook, data);

/// xmm0-7 to / from the 128 bytes at `rsp`.
macro_rules! save_xmm_at_rsp {
    () => {
        concat!(
            "movdqu [rsp], xmm0\n",
            "movdqu [rsp+16], xmm1\n",
            "movdqu [rsp+32], xmm2\n",
            "movdqu [rsp+48], xmm3\n",
            "movdqu [rsp+64], xmm4\n",
            "movdqu [rsp+80], xmm5\n",
            "movdqu [rsp+96], xmm6\n",
            "movdqu [rsp+112], xmm7\n",
        )
    };
}

macro_rules! restore_xmm_at_rsp {
    () => {
        concat!(
            "movdqu xmm0, [rsp]\n",
            "movdqu xmm1, [rsp+16]\n",
            "movdqu xmm2, [rsp+32]\n",
            "movdqu xmm3, [rsp+48]\n",
            "movdqu xmm4, [rsp+64]\n",
            "movdqu xmm5, [rsp+80]\n",
            "movdqu xmm6, [rsp+96]\n",
            "movdqu xmm7, [rsp+112]\n",
        )
    };
}

core::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl bpftime_jit_hook_entry",
    ".hidden bpftime_jit_hook_entry",
    ".type bpftime_jit_hook_entry,@function",
    "bpftime_jit_hook_entry:",
    // rdi = hook, rsi = ctx, rdx = slot
    "cmp rdx, [rdi+{slots}]",
    "jae 5f",
    "mov rax, [rdi+{envs}]",
    "mov r9, [rax+rdx*8]",
    "test r9, r9",
    "jz 5f",
    // three pushes: rsp 16-byte aligned for the call
    "push rbx",
    "push r12",
    "push r13",
    "mov rbx, r9",
    "mov r12, rdi",
    "mov r13, rdx",
    "mov rdi, rsi",
    "mov rsi, [r12+{ctx_len}]",
    // the image's outer entry: r1 = rdi, r2 = rsi, env = r9
    "call [r12+{code}]",
    "cmp dword ptr [rbx+{status}], 0",
    "jne 6f",
    "xor eax, eax",
    "2:",
    "pop r13",
    "pop r12",
    "pop rbx",
    "ret",
    // a run that did not simply return: `after(data, slot, r0)`, vector registers saved
    "6:",
    "sub rsp, 128",
    save_xmm_at_rsp!(),
    "mov rdi, [r12+{data}]",
    "mov rsi, r13",
    "mov rdx, rax",
    "call [r12+{after}]",
    restore_xmm_at_rsp!(),
    "add rsp, 128",
    "jmp 2b",
    // no session for this slot yet: `slow(data, ctx, slot)`, vector registers saved
    "5:",
    "sub rsp, 136",
    save_xmm_at_rsp!(),
    "mov rax, rdi",
    "mov rdi, [rax+{data}]",
    "call [rax+{slow}]",
    restore_xmm_at_rsp!(),
    "add rsp, 136",
    "ret",
    ".size bpftime_jit_hook_entry, .-bpftime_jit_hook_entry",
    slots = const HOOK_SLOTS,
    envs = const HOOK_ENVS,
    ctx_len = const HOOK_CTX_LEN,
    code = const HOOK_CODE,
    status = const ENV_STATUS,
    data = const HOOK_DATA,
    after = const HOOK_AFTER,
    slow = const HOOK_SLOW,
);

extern "C" {
    fn bpftime_jit_hook_entry(hook: *const (), ctx: *mut u8, slot: usize) -> u64;
}

impl JitHook {
    /// A hook entry for `image` with `slots` thread slots, or `None` when its runs may need the
    /// helpers' per-run reset, which the entry does not do (run those through
    /// [`JitSession::run`] and the helpers' `begin_run`/`end_run`). A leaf image never does;
    /// for others the caller says so with `no_run_reset` (it knows what its helpers keep per
    /// run: `helpers::needs_no_run_reset`).
    ///
    /// # Safety
    /// `image` must outlive the hook, and `data` must stay valid for `slow` and `after` while
    /// the entry may be called; `no_run_reset` must be true only if the image's runs need no
    /// reset of the helpers' state between them.
    pub unsafe fn new(
        image: &JitProgram,
        slots: usize,
        ctx_len: u64,
        slow: JitHookSlowFn,
        after: JitHookAfterFn,
        data: *const (),
        no_run_reset: bool,
    ) -> Option<Box<Self>> {
        if !image.leaf && !no_run_reset {
            return None;
        }
        let envs: Box<[AtomicPtr<JitEnv<'static, 'static>>]> = (0..slots)
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect();
        let mut hook = Box::new(Self {
            envs: std::ptr::null(),
            slots,
            code: image.code.as_ptr() as u64,
            ctx_len,
            slow,
            after,
            data,
            image,
            env_table: envs,
        });
        // Taken from the table in its final place.
        hook.envs = hook.env_table.as_ptr();
        Some(hook)
    }

    /// Whether a run through the entry leaves xmm0-7 as they were (a leaf image saves them
    /// around its own native calls); otherwise the caller must save them.
    pub fn preserves_vector_regs(&self) -> bool {
        // SAFETY: the image outlives the hook (the contract of `new`).
        unsafe { (*self.image).leaf }
    }

    /// The entry point, to be called as `entry(hook as *const JitHook as *const (), ctx, slot)`.
    pub fn entry() -> JitHookSlowFn {
        bpftime_jit_hook_entry
    }

    /// Registers `session` as slot `slot`'s: later runs of that slot go straight to the image.
    /// Returns false (and registers nothing) when the slot is out of range or the session runs
    /// another image.
    ///
    /// # Safety
    /// The session must stay alive and in place, and be used only by the thread holding the
    /// slot (as the entry uses it), for as long as the entry may be called with this slot.
    pub unsafe fn set_slot(&self, slot: usize, session: &mut JitSession<'_>) -> bool {
        if slot >= self.slots || !std::ptr::eq(session.image, self.image) {
            return false;
        }
        let env: *mut JitEnv<'static, 'static> =
            (&mut session.env as *mut JitEnv<'_, 'static>).cast();
        self.env_table[slot].store(env, Ordering::Release);
        true
    }
}

/// The result of a (nested) entry that returned `r`: `Ok(r)`, or the error its status names.
/// Resets the status for the caller. Not for `ST_TAIL_CALL`.
fn take_outcome(env: &mut JitEnv<'_, '_>, r: u64) -> Result<u64, VmError> {
    let status = std::mem::replace(&mut env.status, ST_OK);
    match status {
        ST_OK => Ok(r),
        ST_DEPTH => Err(VmError::CallDepth {
            pc: env.pc as usize,
            max: MAX_CALL_FRAMES,
        }),
        ST_BAD_CALLX => Err(VmError::BadCallx {
            pc: env.pc as usize,
            target: env.aux,
        }),
        _ => Err(env.error.take().unwrap_or(VmError::FellOffEnd {
            pc: env.pc as usize,
        })),
    }
}

/// Runs callbacks for a helper called from JIT code at `pc`, call depth `depth`.
struct JitInvoker<'h, 'm> {
    env: *mut JitEnv<'h, 'm>,
    pc: usize,
    depth: u32,
}

impl FuncInvoker for JitInvoker<'_, '_> {
    fn invoke(
        &mut self,
        func: u64,
        args: [u64; 5],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError> {
        let env = self.env;
        // SAFETY: `env` is the live `JitEnv` of the run whose helper trampoline created this
        // invoker; nothing else accesses it while the helper runs (the trampoline holds no
        // reference to it across the helper call). `jit` points at the image running, kept
        // alive by `run`.
        let jit = unsafe { &*(*env).jit };
        let idx = (func & !FUNC_PTR_MASK) as usize;
        let target = if func & FUNC_PTR_MASK == FUNC_PTR_TAG {
            jit.func_table.get(idx).copied().unwrap_or(0)
        } else {
            0
        };
        if target == 0 {
            return Err(VmError::BadCallback { pc: self.pc, func });
        }
        if self.depth as usize + 1 >= MAX_CALL_FRAMES {
            return Err(VmError::CallDepth {
                pc: self.pc,
                max: MAX_CALL_FRAMES,
            });
        }
        // SAFETY: see above. The helpers and memory map the nested code reaches are the ones
        // the helper passed in (reborrows of what the trampoline handed it), so no `&mut` is
        // derived twice from the outer pointers; the lifetimes are erased only for the nested
        // run and the previous pointers are restored before returning.
        unsafe {
            let saved = (
                (*env).saved_rsp,
                (*env).entry,
                (*env).depth,
                (*env).helpers,
                (*env).mem,
                (*env).fast,
            );
            (*env).entry = target;
            (*env).depth = self.depth + 1;
            // The callback's helper calls go to `helpers`, which may name other maps.
            (*env).fast = jit.fast_for(helpers.map_set_id());
            (*env).helpers = std::mem::transmute::<*mut (dyn Helpers + '_), *mut (dyn Helpers + '_)>(
                helpers as *mut (dyn Helpers + '_),
            );
            (*env).mem = (mem as *mut MemoryMap<'_>).cast();
            let r = jit.enter(args, env);
            (*env).saved_rsp = saved.0;
            (*env).entry = saved.1;
            (*env).depth = saved.2;
            (*env).helpers = saved.3;
            (*env).mem = saved.4;
            (*env).fast = saved.5;
            if (*env).status == ST_TAIL_CALL {
                (*env).status = ST_OK;
                (*env).tail = None;
                return Err(VmError::TailCallInSubprog { pc: self.pc });
            }
            take_outcome(&mut *env, r)
        }
    }
}

/// Called from generated code for every helper call.
unsafe extern "C" fn helper_trampoline(
    a1: u64,
    a2: u64,
    a3: u64,
    a4: u64,
    a5: u64,
    env: *mut JitEnv<'_, '_>,
) -> u64 {
    // SAFETY: generated code passes the `JitEnv` given to `enter`, exclusively borrowed by `run`
    // for the duration of the call; its `helpers` and `mem` pointers come from live `&mut`s.
    // No reference to `*env` is held across the helper call (callbacks the helper starts use
    // `env` through the invoker's raw pointer).
    let (id, pc, depth, helpers, mem) = unsafe {
        (
            (*env).helper_id,
            (*env).pc as usize,
            (*env).depth,
            (*env).helpers,
            (*env).mem,
        )
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: see above.
        let (helpers, mem) = unsafe { (&mut *helpers, &mut *mem) };
        let mut inv = JitInvoker { env, pc, depth };
        let mut ctx = CallContext::with_invoker(pc, mem, &mut inv, false);
        let r = helpers.call(id, [a1, a2, a3, a4, a5], &mut ctx);
        (r, ctx.take_tail_call())
    }));
    // SAFETY: see above; the helper has returned.
    let env = unsafe { &mut *env };
    match outcome {
        Ok((Ok(v), None)) => v,
        Ok((Ok(v), Some(p))) => {
            if depth != 0 {
                env.error = Some(VmError::TailCallInSubprog { pc });
                env.status = ST_HELPER_ERR;
            } else {
                env.tail = Some((p, a1));
                env.status = ST_TAIL_CALL;
            }
            v
        }
        Ok((Err(source), _)) => {
            env.error = Some(VmError::from_helper(pc, id, source));
            env.status = ST_HELPER_ERR;
            0
        }
        Err(_) => {
            env.error = Some(VmError::Helper {
                pc,
                id,
                source: HelperError::Panicked,
            });
            env.status = ST_HELPER_ERR;
            0
        }
    }
}

fn emit_helper_call(e: &mut Emitter, pc: u32, tramp: u64, abort: Label) {
    e.env_store_imm(ENV_PC, pc);
    e.mov_rr(true, R9, R12);
    e.mov_ri64(R11, tramp);
    e.native_call_r11();
    // cmp dword [r12+status], 0 ; jne abort
    e.mem(&[], false, &[0x83], 7, R12, ENV_STATUS, false);
    e.byte(0);
    e.jcc(CC_NE, abort);
}

/// Updates the map tokens known per register after `i` (`next` is the second slot of an
/// `lddw`).
fn track_tokens(tokens: &mut [Option<u64>; 11], i: &Insn, next: Option<&Insn>) {
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

fn has_fast_path(map: &JitMap, id: u32) -> bool {
    match HelperId(id) {
        HELPER_MAP_LOOKUP => map.lookup.is_some(),
        HELPER_MAP_UPDATE => map.update.is_some(),
        HELPER_MAP_DELETE => map.delete.is_some(),
        _ => false,
    }
}

/// A map helper call with a known map (see the module docs): guards, then the inline ARRAY
/// lookup or a direct call of the map's [`JitMapFn`]; the generic trampoline call otherwise.
fn emit_fast_map_call(
    e: &mut Emitter,
    pc: u32,
    id: u32,
    token: u64,
    map: &JitMap,
    tramp: u64,
    abort: Label,
) {
    let generic = e.new_label();
    let done = e.new_label();
    // cmp qword [r12+fast], 0 ; je generic
    e.mem(&[], true, &[0x83], 7, R12, ENV_FAST, false);
    e.byte(0);
    e.jcc(CC_E, generic);
    // r1 must hold the token the fast path was chosen for.
    e.mov_ri64(R11, token);
    e.alu_rr(true, 0x39, 7, R11); // cmp rdi, r11
    e.jcc(CC_NE, generic);
    let f = match HelperId(id) {
        HELPER_MAP_LOOKUP => map.lookup,
        HELPER_MAP_UPDATE => map.update,
        _ => map.delete,
    }
    .expect("checked by has_fast_path");
    let call_fn = |e: &mut Emitter| {
        e.env_store_imm(ENV_PC, pc);
        e.mov_ri64(7, map.handle as u64); // rdi = handle
        e.mov_rr(true, R9, R12);
        e.mov_ri64(R11, f as usize as u64);
        e.native_call_r11();
        e.mem(&[], false, &[0x83], 7, R12, ENV_STATUS, false);
        e.byte(0);
        e.jcc(CC_NE, abort);
    };
    match map.inline_array {
        Some(a) if HelperId(id) == HELPER_MAP_LOOKUP && a.stride <= i32::MAX as u32 => {
            let null = e.new_label();
            let unmarked = e.new_label();
            // A NULL key (only in unverified code) goes to the function, which reports it
            // like the generic helper.
            e.alu_rr(true, 0x85, 6, 6); // test rsi, rsi
            e.jcc(CC_E, unmarked);
            // eax = index (the 4-byte key at rsi, r2)
            e.mem(&[], false, &[0x8b], RAX, 6, 0, false);
            e.alu_ri(false, 7, RAX, a.max_entries as i32); // cmp eax, max_entries
            e.jcc(CC_AE, null);
            // test dword [marks + rax*4], mark_bit ; jz unmarked
            e.mov_ri64(R11, a.marks as u64);
            e.bytes(&[0x41, 0xf7, 0x04, 0x83]); // test dword [r11 + rax*4], imm32
            e.imm32(a.mark_bit as i32);
            e.jcc(CC_E, unmarked);
            e.rr(true, &[0x69], RAX, RAX); // imul rax, rax, stride
            e.imm32(a.stride as i32);
            e.mov_ri64(R11, a.values as u64);
            e.alu_rr(true, 0x01, RAX, R11); // add rax, r11
            e.jmp(done);
            e.bind(null);
            e.alu_rr(false, 0x31, RAX, RAX);
            e.jmp(done);
            e.bind(unmarked);
            call_fn(e);
            e.jmp(done);
        }
        _ => {
            call_fn(e);
            e.jmp(done);
        }
    }
    e.bind(generic);
    e.env_store_imm(ENV_HELPER_ID, id);
    emit_helper_call(e, pc, tramp, abort);
    e.bind(done);
}

fn emit_local_call(e: &mut Emitter, pc: u32, abort: Label, call: impl FnOnce(&mut Emitter)) {
    let ok = e.new_label();
    e.mem(&[], false, &[0x83], 7, R12, ENV_DEPTH, false);
    e.byte((MAX_CALL_FRAMES - 1) as u8);
    e.jcc(CC_B, ok);
    e.env_store_imm(ENV_PC, pc);
    e.env_store_imm(ENV_STATUS, ST_DEPTH);
    e.jmp(abort);
    e.bind(ok);
    e.mem(&[], false, &[0xff], 0, R12, ENV_DEPTH, false); // inc
    call(e);
    e.mem(&[], false, &[0xff], 1, R12, ENV_DEPTH, false); // dec
}

fn emit_callx(e: &mut Emitter, reg: u8, pc: u32, n: usize, table: u64, tramp: u64, abort: Label) {
    let helper = e.new_label();
    let bad = e.new_label();
    let done = e.new_label();
    e.mov_rr(true, R11, reg);
    e.mov_rr(true, R10, R11);
    e.rr(true, &[0xc1], 5, R10); // shr r10, 32
    e.byte(32);
    e.alu_ri(false, 7, R10, (FUNC_PTR_TAG >> 32) as u32 as i32);
    e.jcc(CC_NE, helper);
    e.mov_rr(false, R11, R11);
    e.alu_ri(true, 7, R11, n as i32);
    e.jcc(CC_AE, bad);
    e.mov_ri64(R10, table);
    e.bytes(&[0x4f, 0x8b, 0x1c, 0xda]); // mov r11, [r10 + r11*8]
    e.alu_rr(true, 0x85, R11, R11);
    e.jcc(CC_E, bad);
    emit_local_call(e, pc, abort, |e| e.call_reg(R11));
    e.jmp(done);
    e.bind(helper);
    e.alu_rr(true, 0x85, R10, R10);
    e.jcc(CC_NE, bad);
    e.env_store_r32(ENV_HELPER_ID, R11);
    emit_helper_call(e, pc, tramp, abort);
    e.jmp(done);
    e.bind(bad);
    e.mem(&[], true, &[0x89], reg, R12, ENV_AUX, false);
    e.env_store_imm(ENV_PC, pc);
    e.env_store_imm(ENV_STATUS, ST_BAD_CALLX);
    e.jmp(abort);
    e.bind(done);
    let _ = FUNC_PTR_MASK;
}

fn emit_alu(e: &mut Emitter, i: &Insn, dst: u8, src: u8) {
    let w = i.class() == BPF_ALU64;
    let x = i.is_reg_src();
    let op = i.op();
    match op {
        BPF_ADD | BPF_SUB | BPF_OR | BPF_AND | BPF_XOR => {
            let (opb, ext) = match op {
                BPF_ADD => (0x01, 0),
                BPF_SUB => (0x29, 5),
                BPF_OR => (0x09, 1),
                BPF_AND => (0x21, 4),
                _ => (0x31, 6),
            };
            if x {
                e.alu_rr(w, opb, dst, src);
            } else {
                e.alu_ri(w, ext, dst, i.imm);
            }
        }
        BPF_MUL => {
            if x {
                e.rr(w, &[0x0f, 0xaf], dst, src);
            } else {
                e.rr(w, &[0x69], dst, dst);
                e.imm32(i.imm);
            }
        }
        BPF_MOV => {
            if !x {
                if w {
                    e.mov_ri64(dst, i.imm as i64 as u64);
                } else {
                    e.mov_ri32(dst, i.imm as u32);
                }
            } else {
                match (w, i.off) {
                    (_, 0) => e.mov_rr(w, dst, src),
                    (true, 8) => e.rr_byte(true, &[0x0f, 0xbe], dst, src),
                    (true, 16) => e.rr(true, &[0x0f, 0xbf], dst, src),
                    (true, _) => e.rr(true, &[0x63], dst, src),
                    (false, 8) => e.rr_byte(false, &[0x0f, 0xbe], dst, src),
                    (false, _) => e.rr(false, &[0x0f, 0xbf], dst, src),
                }
            }
        }
        BPF_NEG => e.rr(w, &[0xf7], 3, dst),
        BPF_LSH | BPF_RSH | BPF_ARSH => {
            let ext = match op {
                BPF_LSH => 4,
                BPF_RSH => 5,
                _ => 7,
            };
            if !x {
                let mask = if w { 63 } else { 31 };
                e.rr(w, &[0xc1], ext, dst);
                e.byte((i.imm & mask) as u8);
            } else {
                e.mov_rr(true, R10, RCX);
                if src != RCX {
                    e.mov_rr(true, RCX, src);
                }
                if dst == RCX {
                    e.rr(w, &[0xd3], ext, R10);
                    e.mov_rr(true, RCX, R10);
                } else {
                    e.rr(w, &[0xd3], ext, dst);
                    e.mov_rr(true, RCX, R10);
                }
            }
        }
        BPF_DIV | BPF_MOD => emit_divmod(e, i, w, dst, src),
        BPF_END => {
            let swap = w || x;
            match (i.imm, swap) {
                (16, false) => e.rr(false, &[0x0f, 0xb7], dst, dst),
                (32, false) => e.mov_rr(false, dst, dst),
                (64, false) => {}
                (16, true) => {
                    e.byte(0x66);
                    e.rr(false, &[0xc1], 1, dst);
                    e.byte(8);
                    e.rr(false, &[0x0f, 0xb7], dst, dst);
                }
                (32, true) => {
                    e.rex(false, 0, 0, dst, false);
                    e.bytes(&[0x0f, 0xc8 + (dst & 7)]);
                }
                _ => {
                    e.rex(true, 0, 0, dst, false);
                    e.bytes(&[0x0f, 0xc8 + (dst & 7)]);
                }
            }
        }
        _ => {}
    }
}

fn emit_divmod(e: &mut Emitter, i: &Insn, w: bool, dst: u8, src: u8) {
    let is_div = i.op() == BPF_DIV;
    let signed = i.off == 1;
    let done = e.new_label();
    let nonzero = e.new_label();
    // r11 = divisor
    if i.is_reg_src() {
        e.mov_rr(w, R11, src);
    } else if w {
        e.mov_ri64(R11, i.imm as i64 as u64);
    } else {
        e.mov_ri32(R11, i.imm as u32);
    }
    e.alu_rr(w, 0x85, R11, R11);
    e.jcc(CC_NE, nonzero);
    if is_div {
        e.alu_rr(false, 0x31, dst, dst);
    } else if !w {
        e.mov_rr(false, dst, dst);
    }
    e.jmp(done);
    e.bind(nonzero);
    if signed {
        let normal = e.new_label();
        e.alu_ri(w, 7, R11, -1);
        e.jcc(CC_NE, normal);
        if is_div {
            e.rr(w, &[0xf7], 3, dst); // neg
        } else {
            e.alu_rr(false, 0x31, dst, dst);
        }
        e.jmp(done);
        e.bind(normal);
    }
    e.mov_rr(true, R10, RAX);
    e.mov_rr(true, R9, RDX);
    if dst != RAX {
        e.mov_rr(true, RAX, dst);
    }
    if signed {
        if w {
            e.bytes(&[0x48, 0x99]);
        } else {
            e.byte(0x99);
        }
    } else {
        e.alu_rr(false, 0x31, RDX, RDX);
    }
    e.rr(w, &[0xf7], if signed { 7 } else { 6 }, R11);
    e.mov_rr(true, R11, if is_div { RAX } else { RDX });
    e.mov_rr(true, RAX, R10);
    e.mov_rr(true, RDX, R9);
    e.mov_rr(true, dst, R11);
    e.bind(done);
}

fn emit_atomic(e: &mut Emitter, i: &Insn, dst: u8, src: u8) {
    let w = i.size() == BPF_DW;
    let off = i.off as i32;
    let op = i.imm;
    match op {
        0x00 | 0x40 | 0x50 | 0xa0 => {
            let opb = match op {
                0x00 => 0x01,
                0x40 => 0x09,
                0x50 => 0x21,
                _ => 0x31,
            };
            e.mem(&[0xf0], w, &[opb], src, dst, off, false);
        }
        0x01 => e.mem(&[0xf0], w, &[0x0f, 0xc1], src, dst, off, false), // lock xadd
        BPF_XCHG => e.mem(&[], w, &[0x87], src, dst, off, false),
        BPF_CMPXCHG => {
            e.mem(&[0xf0], w, &[0x0f, 0xb1], src, dst, off, false);
            if !w {
                e.mov_rr(false, RAX, RAX);
            }
        }
        _ => {
            // fetch or/and/xor: cmpxchg loop.
            let opb = match op & !BPF_FETCH {
                0x40 => 0x09,
                0x50 => 0x21,
                _ => 0x31,
            };
            e.mem(&[], true, &[0x8d], R9, dst, off, false); // lea r9, [dst+off]
            e.mov_rr(true, R10, RAX);
            let s = if src == RAX { R10 } else { src };
            let again = e.new_label();
            e.bind(again);
            e.mem(&[], w, &[0x8b], RAX, R9, 0, false);
            e.mov_rr(true, R11, RAX);
            e.alu_rr(w, opb, R11, s);
            e.mem(&[0xf0], w, &[0x0f, 0xb1], R11, R9, 0, false);
            e.jcc(CC_NE, again);
            if src != RAX {
                e.mov_rr(true, src, RAX);
                e.mov_rr(true, RAX, R10);
            }
        }
    }
}
