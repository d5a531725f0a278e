//! The register-saving stubs shared by every hook.
//!
//! Frame built by both stubs (offsets from the final `rsp`, which is 16-byte aligned):
//! `[0, 168)` kernel-layout `struct pt_regs`, `[168, 296)` xmm0-7, `[296]` saved rflags,
//! `[304]` the continuation slot (where the final `ret` goes).
//!
//! Entry stub: reached from a per-site thunk that pushed the site pointer (the slot) and jumped
//! here, so at entry `[rsp]` = site, `[rsp+8]` = the caller's return address. The dispatcher
//! returns the continuation (the detour trampoline = the original function, or the address of a
//! `ret` to skip the function for `override_return`), stored in the slot; registers (possibly
//! changed by handlers) are restored and `ret` jumps there with `rsp` as at function entry.
//!
//! Return stub: reached by the hooked function's `ret` (its return address was replaced); the
//! dispatcher pops the shadow stack and returns the original return address; `ret 8` jumps there
//! with `rsp` as right after the original return.

use super::{dispatch_entry, dispatch_return};

macro_rules! save_regs {
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
            "movdqu [rsp+168], xmm0\n",
            "movdqu [rsp+184], xmm1\n",
            "movdqu [rsp+200], xmm2\n",
            "movdqu [rsp+216], xmm3\n",
            "movdqu [rsp+232], xmm4\n",
            "movdqu [rsp+248], xmm5\n",
            "movdqu [rsp+264], xmm6\n",
            "movdqu [rsp+280], xmm7\n",
            "mov rax, [rsp+296]\n",
            "mov [rsp+144], rax\n",
            "mov qword ptr [rsp+120], -1\n",
            "mov qword ptr [rsp+136], 0x33\n",
            "mov qword ptr [rsp+160], 0x2b\n",
            "cld\n",
        )
    };
}

macro_rules! restore_regs {
    () => {
        concat!(
            "mov [rsp+304], rax\n",
            "movdqu xmm0, [rsp+168]\n",
            "movdqu xmm1, [rsp+184]\n",
            "movdqu xmm2, [rsp+200]\n",
            "movdqu xmm3, [rsp+216]\n",
            "movdqu xmm4, [rsp+232]\n",
            "movdqu xmm5, [rsp+248]\n",
            "movdqu xmm6, [rsp+264]\n",
            "movdqu xmm7, [rsp+280]\n",
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
            "sub rsp, 296\n",
            save_regs!(),
            "lea rax, [rsp+",
            $rsp_off,
            "]\n",
            "mov [rsp+152], rax\n",
            "mov rdi, [rsp+304]\n",
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
    // Leave without `popfq` (slow; flags are not live at a function entry) and with an indirect
    // `jmp` rather than `ret`, which would unbalance the return stack buffer and cost two
    // mispredictions per call. The slot at S-8 is inside the red zone, which signal delivery
    // skips, so it survives until the jump.
    entry_stub!(
        "bpftime_attach_entry_stub",
        "312",
        "lea rsp, [rsp+312]\njmp qword ptr [rsp-8]\n"
    ),
    ".p2align 4",
    // variant for hooks inside a function (FUNC+OFFSET): the thunk first steps over the
    // 128-byte red zone, which may hold live data there
    entry_stub!(
        "bpftime_attach_entry_stub_rz",
        "440",
        concat!(
            "mov rax, [rsp+144]\n",
            "mov [rsp+296], rax\n",
            "mov rax, [rsp+80]\n",
            "add rsp, 296\n",
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
    "sub rsp, 296",
    save_regs!(),
    "lea rax, [rsp+320]",
    "mov [rsp+152], rax",
    "mov rdi, rsp",
    "mov rbx, rsp",
    "and rsp, -16",
    "call {ret}",
    "mov rsp, rbx",
    restore_regs!(),
    // flags are not live after a return; jump (slot at R-16, inside the red zone)
    "lea rsp, [rsp+320]",
    "jmp qword ptr [rsp-16]",
    ".size bpftime_attach_return_stub, .-bpftime_attach_return_stub",
    entry = sym dispatch_entry,
    ret = sym dispatch_return,
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
