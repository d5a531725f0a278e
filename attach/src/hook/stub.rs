//! The register-saving stubs shared by every hook.
//!
//! Frame built by both stubs (offsets from the final `rsp`, which is 16-byte aligned at a
//! function entry): `[0, 168)` kernel-layout `struct pt_regs`, `[176, 304)` xmm0-7 (16-byte
//! aligned: unaligned vector saves split cache lines, which cost ~6 ns a call), `[312]` saved
//! rflags, `[320]` the continuation slot (where the final jump goes).
//!
//! Entry stub: reached from a per-site thunk that pushed the site pointer (the slot) and jumped
//! here, so at entry `[rsp]` = site, `[rsp+8]` = the caller's return address. The dispatcher
//! returns the continuation (the detour trampoline = the original function, or the address of a
//! `ret` to skip the function for `override_return`), stored in the slot; registers (possibly
//! changed by handlers) are restored and `ret` jumps there with `rsp` as at function entry.
//!
//! Return stub: reached by the hooked function's `ret` (its return address was replaced); it
//! pops the thread's top shadow frame itself when that frame is this return's (else the
//! dispatcher drops stale frames first), runs the site's return handlers (the only one's direct
//! entry, or through Rust) and jumps to the original return address with `rsp` as right after
//! the original return.
//!
//! Both stubs find the calling thread's slot with one probe of the thread table (the hash
//! `thread::current_indexed` uses) and leave anything unusual to the Rust dispatchers.

use super::{
    dispatch_entry, dispatch_return, stub_run_returns, stub_thread_slot, thread, DIRECT_DATA,
    DIRECT_FUNC, DIRECT_PRESERVES_VECTOR_REGS, REENTERED, SITE_ADDR, SITE_DIRECT,
    SITE_DIRECT_RETURN, SITE_ENABLED, SITE_RETURNS_ONLY, SITE_TRAMPOLINE,
};

macro_rules! save_gprs {
    () => {
        concat!(
            "mov [rsp+0], r15\n",
            "mov [rsp+8], r14\n",
            "mov [rsp+16], r13\n",
            "mov [rsp+24], r12\n",
            "mov [rsp+32], rbp\n",
            "mov [rsp+40], rbx\n",
            "mov [rsp+48], r11\n",
            "mov [rsp+56], r10\n",
            "mov [rsp+64], r9\n",
            "mov [rsp+72], r8\n",
            "mov [rsp+80], rax\n",
            "mov [rsp+88], rcx\n",
            "mov [rsp+96], rdx\n",
            "mov [rsp+104], rsi\n",
            "mov [rsp+112], rdi\n",
            "mov rax, [rsp+312]\n",
            "mov [rsp+144], rax\n",
            "mov qword ptr [rsp+120], -1\n",
            "mov qword ptr [rsp+136], 0x33\n",
            "mov qword ptr [rsp+160], 0x2b\n",
            "cld\n",
        )
    };
}

macro_rules! save_xmm {
    () => {
        concat!(
            "movdqu [rsp+176], xmm0\n",
            "movdqu [rsp+192], xmm1\n",
            "movdqu [rsp+208], xmm2\n",
            "movdqu [rsp+224], xmm3\n",
            "movdqu [rsp+240], xmm4\n",
            "movdqu [rsp+256], xmm5\n",
            "movdqu [rsp+272], xmm6\n",
            "movdqu [rsp+288], xmm7\n",
        )
    };
}

macro_rules! restore_xmm {
    () => {
        concat!(
            "movdqu xmm0, [rsp+176]\n",
            "movdqu xmm1, [rsp+192]\n",
            "movdqu xmm2, [rsp+208]\n",
            "movdqu xmm3, [rsp+224]\n",
            "movdqu xmm4, [rsp+240]\n",
            "movdqu xmm5, [rsp+256]\n",
            "movdqu xmm6, [rsp+272]\n",
            "movdqu xmm7, [rsp+288]\n",
        )
    };
}

/// Restores every general register from the frame (`rax` last).
macro_rules! restore_gprs {
    () => {
        concat!(
            "mov r15, [rsp+0]\n",
            "mov r14, [rsp+8]\n",
            "mov r13, [rsp+16]\n",
            "mov r12, [rsp+24]\n",
            "mov rbp, [rsp+32]\n",
            "mov rbx, [rsp+40]\n",
            "mov r11, [rsp+48]\n",
            "mov r10, [rsp+56]\n",
            "mov r9, [rsp+64]\n",
            "mov r8, [rsp+72]\n",
            "mov rcx, [rsp+88]\n",
            "mov rdx, [rsp+96]\n",
            "mov rsi, [rsp+104]\n",
            "mov rdi, [rsp+112]\n",
            "mov rax, [rsp+80]\n",
        )
    };
}

macro_rules! save_regs {
    () => {
        concat!(save_gprs!(), save_xmm!())
    };
}

/// Stores `rax` (the continuation) in the slot, then restores every register.
macro_rules! restore_regs {
    () => {
        concat!("mov [rsp+320], rax\n", restore_xmm!(), restore_gprs!())
    };
}

/// Saves xmm0-7 and notes it in r15 (which the leaving code tests).
macro_rules! save_xmm_noted {
    () => {
        concat!(save_xmm!(), "mov r15d, 1\n")
    };
}

/// Stores `rax` (the continuation) in the slot, restores xmm0-7 if r15 says they were saved,
/// then every general register.
macro_rules! restore_noted {
    () => {
        concat!(
            "mov [rsp+320], rax\n",
            "test r15d, r15d\n",
            "jz 12f\n",
            restore_xmm!(),
            "12:\n",
            restore_gprs!(),
        )
    };
}

/// The first probe of the thread table for the calling thread (the hash
/// `thread::current_indexed` computes): rcx = the index, rdx = the table; "not equal" when the
/// slot there is another thread's (the caller jumps to a slow path).
macro_rules! probe_thread_slot {
    () => {
        concat!(
            "mov rax, qword ptr fs:[0]\n",
            "mov rcx, {key_hash}\n",
            "imul rcx, rax\n",
            "shr rcx, {key_shift}\n",
            "lea rdx, [rip+{table}]\n",
            "cmp [rdx+rcx*8], rax\n",
        )
    };
}

/// r8 = the state of thread slot rcx (rdx = the table, as `probe_thread_slot!` leaves it).
macro_rules! thread_state {
    () => {
        concat!(
            "imul r8, rcx, {state_size}\n",
            "lea r8, [rdx+r8+{states_offset}]\n",
        )
    };
}

/// Calls the direct entry r12 for thread slot r13 on the frame r14 with the slot's guard set;
/// rax = what it returned.
macro_rules! call_direct {
    () => {
        concat!(
            "lea rdx, [rip+{guards}]\n",
            "mov byte ptr [rdx+r13], 1\n",
            "mov rdi, [r12+{direct_data}]\n",
            "mov rsi, r14\n",
            "mov rdx, r13\n",
            "and rsp, -16\n",
            "call [r12+{direct_func}]\n",
            "mov rsp, r14\n",
            "lea rdx, [rip+{guards}]\n",
            "mov byte ptr [rdx+r13], 0\n",
        )
    };
}

macro_rules! entry_stub {
    ($name:literal, $rsp_off:literal, $exit:expr) => {
        concat!(
            ".globl ",
            $name,
            "\n",
            ".hidden ",
            $name,
            "\n",
            ".type ",
            $name,
            ",@function\n",
            $name,
            ":\n",
            // [rsp] = site (pushed by the thunk), [rsp+8] = return address
            "pushfq\n",
            "sub rsp, 312\n",
            save_regs!(),
            "lea rax, [rsp+",
            $rsp_off,
            "]\n",
            "mov [rsp+152], rax\n",
            "mov rdi, [rsp+320]\n",
            "mov rsi, rsp\n",
            "mov rbx, rsp\n",
            "and rsp, -16\n",
            "call {entry}\n",
            "mov rsp, rbx\n",
            restore_regs!(),
            $exit,
            ".size ",
            $name,
            ", .-",
            $name,
            "\n",
        )
    };
}

core::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl bpftime_attach_entry_stub",
    ".hidden bpftime_attach_entry_stub",
    ".type bpftime_attach_entry_stub,@function",
    "bpftime_attach_entry_stub:",
    // [rsp] = site (pushed by the thunk), [rsp+8] = return address
    "pushfq",
    "sub rsp, 312",
    save_gprs!(),
    "lea rax, [rsp+328]",
    "mov [rsp+152], rax",
    "mov rbx, [rsp+320]",
    "mov rax, [rbx+{site_addr}]",
    "mov [rsp+128], rax",
    // rbx = site, r14 = frame, r15 = whether xmm0-7 are saved; all callee-saved, restored
    // from the frame on the way out
    "mov r14, rsp",
    "xor r15d, r15d",
    "mov r12, [rbx+{site_direct}]",
    "test r12, r12",
    "jz 14f",
    // Fast path: one handler with a direct entry. The vector registers are saved unless the
    // entry preserves them itself.
    "cmp byte ptr [r12+{direct_preserves}], 0",
    "jne 9f",
    save_xmm_noted!(),
    "9:",
    "cmp byte ptr [rbx+{site_enabled}], 0",
    "je 3f",
    // The thread's slot (else the slow lookup).
    probe_thread_slot!(),
    "jne 6f",
    "8:",
    "lea rdx, [rip+{guards}]",
    "cmp byte ptr [rdx+rcx], 0",
    "jne 7f",
    "mov r13, rcx",
    call_direct!(),
    "test rax, rax",
    "jnz 4f",
    // continue into the original function (its trampoline)
    "3:",
    "mov rax, [rbx+{site_trampoline}]",
    "2:",
    restore_noted!(),
    // Leave without `popfq` (slow; flags are not live at a function entry) and with an
    // indirect `jmp` rather than `ret`, which would unbalance the return stack buffer and cost
    // two mispredictions per call. The slot at S-8 is inside the red zone, which signal
    // delivery skips, so it survives until the jump.
    "lea rsp, [rsp+328]",
    "jmp qword ptr [rsp-8]",
    // skip the function: return regs.rax to the caller
    "4:",
    "lea rax, [rip+bpftime_attach_ret_insn]",
    "jmp 2b",
    // Return handlers only: push the shadow frame here (no call at all) unless this needs the
    // dispatcher (no slot yet, inside a handler, stale frames to drop, a full shadow stack).
    "14:",
    "cmp byte ptr [rbx+{site_returns_only}], 0",
    "je 5f",
    "cmp byte ptr [rbx+{site_enabled}], 0",
    "je 3b",
    probe_thread_slot!(),
    "jne 5f",
    "lea r8, [rip+{guards}]",
    "cmp byte ptr [r8+rcx], 0",
    "jne 7f",
    // r8 = the thread's state, r9 = its depth, rax = the slot holding the return address
    thread_state!(),
    "mov r9, [r8]",
    "lea rax, [r14+328]",
    "test r9, r9",
    "jz 15f",
    "lea r10, [r9+r9*2]",
    // the top frame at or below this slot: stale frames to drop, or a tail call to chain
    // (see `push_frame`): the dispatcher
    "cmp [r8+r10*8-16], rax",
    "jbe 5f",
    "15:",
    "cmp r9, {max_frames}",
    "jae 5f",
    "lea r10, [r9+r9*2]",
    "lea r10, [r8+r10*8+8]",
    "mov [r10], rax",
    "mov rdx, [rax]",
    "mov [r10+8], rdx",
    "mov [r10+16], rbx",
    "inc r9",
    "mov [r8], r9",
    "lea rdx, [rip+bpftime_attach_return_stub]",
    "mov [rax], rdx",
    "jmp 3b",
    // generic path: the dispatcher runs every handler and returns where to continue
    "5:",
    save_xmm_noted!(),
    "mov rdi, rbx",
    "mov rsi, r14",
    "and rsp, -16",
    "call {entry}",
    "mov rsp, r14",
    "jmp 2b",
    // slow thread lookup (Rust: saves the vector registers first): rax = slot index, or -1
    // (no slot: run unprobed)
    "6:",
    "test r15d, r15d",
    "jnz 13f",
    save_xmm_noted!(),
    "13:",
    "and rsp, -16",
    "call {thread_slot}",
    "mov rsp, r14",
    "mov rcx, rax",
    "test rax, rax",
    "jns 8b",
    "jmp 3b",
    // re-entered from inside a handler: run unprobed
    "7:",
    "lock inc qword ptr [rip+{reentered}]",
    "jmp 3b",
    ".size bpftime_attach_entry_stub, .-bpftime_attach_entry_stub",
    "",
    ".p2align 4",
    // variant for hooks inside a function (FUNC+OFFSET), generic path only: the thunk first
    // steps over the 128-byte red zone, which may hold live data there
    entry_stub!(
        "bpftime_attach_entry_stub_rz",
        "456",
        concat!(
            "mov rax, [rsp+144]\n",
            "mov [rsp+312], rax\n",
            "mov rax, [rsp+80]\n",
            "add rsp, 312\n",
            "popfq\n",
            "ret 128\n"
        )
    ),
    ".p2align 4",
    ".globl bpftime_attach_ret_insn",
    ".hidden bpftime_attach_ret_insn",
    ".type bpftime_attach_ret_insn,@function",
    "bpftime_attach_ret_insn:",
    "ret",
    ".size bpftime_attach_ret_insn, .-bpftime_attach_ret_insn",
    "",
    ".p2align 4",
    ".globl bpftime_attach_return_stub",
    ".hidden bpftime_attach_return_stub",
    ".type bpftime_attach_return_stub,@function",
    "bpftime_attach_return_stub:",
    // rsp = R (right after the original return); R-8 pad, R-16 slot, R-24 flags
    "lea rsp, [rsp-8]",
    "push 0",
    "pushfq",
    "sub rsp, 312",
    save_gprs!(),
    "lea rax, [rsp+336]",
    "mov [rsp+152], rax",
    // r14 = frame, r15 = whether xmm0-7 are saved, rbp = the original return address,
    // rbx = site, r13 = slot index, r12 = direct return entry
    "mov r14, rsp",
    "xor r15d, r15d",
    // Fast path: pop the top shadow frame when it is this return's (else the dispatcher
    // drops stale frames, or reports a broken stack).
    probe_thread_slot!(),
    "jne 5f",
    thread_state!(),
    "mov r9, [r8]",
    "test r9, r9",
    "jz 5f",
    "lea r10, [r9+r9*2]",
    "lea r10, [r8+r10*8-16]",
    "lea rax, [r14+328]",
    "cmp [r10], rax",
    "jne 5f",
    // a frame below it at the same slot (a tail call chain): the dispatcher runs both
    "cmp r9, 1",
    "je 16f",
    "cmp [r10-24], rax",
    "je 5f",
    "16:",
    "dec r9",
    "mov [r8], r9",
    "mov rbp, [r10+8]",
    "mov [r14+128], rbp",
    "mov rbx, [r10+16]",
    "mov r13, rcx",
    "mov r12, [rbx+{site_direct_return}]",
    "test r12, r12",
    "jz 6f",
    "cmp byte ptr [rbx+{site_enabled}], 0",
    "je 3f",
    "lea rdx, [rip+{guards}]",
    "cmp byte ptr [rdx+r13], 0",
    "jne 3f",
    "cmp byte ptr [r12+{direct_preserves}], 0",
    "jne 9f",
    save_xmm_noted!(),
    "9:",
    call_direct!(),
    "3:",
    "mov rax, rbp",
    "2:",
    restore_noted!(),
    // flags are not live after a return; jump (slot at R-16, inside the red zone)
    "lea rsp, [rsp+336]",
    "jmp qword ptr [rsp-16]",
    // the return handlers through Rust (vector registers saved)
    "6:",
    save_xmm_noted!(),
    "mov rdi, rbx",
    "mov rsi, r14",
    "mov rdx, r13",
    "and rsp, -16",
    "call {run_returns}",
    "mov rsp, r14",
    "jmp 3b",
    // the dispatcher pops the frame and runs the handlers; returns where to go
    "5:",
    save_xmm_noted!(),
    "mov rdi, r14",
    "and rsp, -16",
    "call {ret}",
    "mov rsp, r14",
    "jmp 2b",
    ".size bpftime_attach_return_stub, .-bpftime_attach_return_stub",
    entry = sym dispatch_entry,
    ret = sym dispatch_return,
    thread_slot = sym stub_thread_slot,
    table = sym thread::TABLE,
    guards = sym thread::GUARDS,
    reentered = sym REENTERED,
    key_hash = const thread::KEY_HASH,
    key_shift = const thread::KEY_SHIFT,
    site_addr = const SITE_ADDR,
    site_trampoline = const SITE_TRAMPOLINE,
    site_direct = const SITE_DIRECT,
    site_enabled = const SITE_ENABLED,
    direct_func = const DIRECT_FUNC,
    direct_data = const DIRECT_DATA,
    direct_preserves = const DIRECT_PRESERVES_VECTOR_REGS,
    run_returns = sym stub_run_returns,
    site_returns_only = const SITE_RETURNS_ONLY,
    site_direct_return = const SITE_DIRECT_RETURN,
    state_size = const thread::STATE_SIZE,
    states_offset = const thread::STATES_OFFSET,
    max_frames = const thread::MAX_FRAMES,
);

extern "C" {
    fn bpftime_attach_entry_stub();
    fn bpftime_attach_entry_stub_rz();
    fn bpftime_attach_return_stub();
    fn bpftime_attach_ret_insn();
}

pub(super) fn entry_stub() -> u64 {
    bpftime_attach_entry_stub as *const () as u64
}

pub(super) fn entry_stub_red_zone() -> u64 {
    bpftime_attach_entry_stub_rz as *const () as u64
}

pub(super) fn return_stub() -> u64 {
    bpftime_attach_return_stub as *const () as u64
}

pub(super) fn ret_insn() -> u64 {
    bpftime_attach_ret_insn as *const () as u64
}
