//! Keeps stack walkers working when the displaced entry instructions end with a `call`
//! (e.g. `sub rsp, 8; call f`, common at -O2).
//!
//! Relocated as-is, the call pushes a return address inside the trampoline, for which no unwind
//! information exists: a C++ exception or Rust panic thrown below would `terminate`, and
//! backtraces stop there. The trampoline's call is therefore rewritten to push the *original*
//! return address (the instruction after the call in the function, which the 5-byte patch never
//! covers because a `call rel32` is 5 bytes long) and jump to the callee, so the callee returns
//! straight into the original function, whose CFI describes that point.

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, InstructionBlock,
};

/// Rewrites the trailing `call rel32` of the trampoline of the site at `target` (displaced
/// instructions decoded from the function itself). Returns whether anything was rewritten.
/// Leaves the trampoline untouched when it does not look exactly as expected.
///
/// # Safety
/// `target..target + size` must be a patchable function (pre-checked) not yet patched, `tramp` its
/// freshly built, not yet reachable trampoline.
pub(super) unsafe fn fix_trailing_call(target: u64, size: u64, tramp: u64) -> bool {
    // SAFETY: the pre-check read the same bytes: `size` bytes of the function.
    let code = unsafe { std::slice::from_raw_parts(target as *const u8, size.min(32) as usize) };
    let mut dec = Decoder::with_ip(64, code, target, DecoderOptions::NONE);
    let mut instrs = Vec::new();
    let mut len = 0u64;
    while len < crate::precheck::PATCH_LEN {
        if !dec.can_decode() {
            return false;
        }
        let i = dec.decode();
        if i.is_invalid() {
            return false;
        }
        len += i.len() as u64;
        instrs.push(i);
    }
    let Some(call) = instrs.pop() else {
        return false;
    };
    if call.code() != Code::Call_rel32_64 {
        return false;
    }
    let callee = call.near_branch_target();
    let ret = call.next_ip();
    // The instructions before the call, as the relocator encoded them.
    let before = if instrs.is_empty() {
        Vec::new()
    } else {
        let block = InstructionBlock::new(&instrs, tramp);
        match BlockEncoder::encode(64, block, BlockEncoderOptions::NONE) {
            Ok(r) => r.code_buffer,
            Err(_) => return false,
        }
    };
    // SAFETY: the trampoline holds at least the relocated instructions.
    let existing = unsafe { std::slice::from_raw_parts(tramp as *const u8, before.len()) };
    if existing != before.as_slice() {
        return false;
    }
    let mut patch = Vec::with_capacity(34);
    patch.extend_from_slice(&[0x48, 0x8d, 0x64, 0x24, 0xf8]); // lea rsp, [rsp-8] (flags kept)
    patch.extend_from_slice(&[0xc7, 0x04, 0x24]); // mov dword [rsp], lo32(ret)
    patch.extend_from_slice(&(ret as u32).to_le_bytes());
    patch.extend_from_slice(&[0xc7, 0x44, 0x24, 0x04]); // mov dword [rsp+4], hi32(ret)
    patch.extend_from_slice(&((ret >> 32) as u32).to_le_bytes());
    patch.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp qword [rip+0]
    patch.extend_from_slice(&callee.to_le_bytes());
    let at = tramp + before.len() as u64;
    // The relocator reserved room for every displaced instruction to grow, and for the jump
    // back; this replacement is at most the call's (5 bytes) plus 29.
    let page = 4096u64;
    let start = at & !(page - 1);
    let end = (at + patch.len() as u64 + page - 1) & !(page - 1);
    // SAFETY: the trampoline's pages (detour keeps them read-write-execute, or toggles them;
    // execute stays on, so other trampolines sharing the page keep running); the bytes written
    // belong to this not yet reachable trampoline.
    unsafe {
        if libc::mprotect(
            start as *mut libc::c_void,
            (end - start) as usize,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        ) != 0
        {
            return false;
        }
        std::ptr::copy_nonoverlapping(patch.as_ptr(), at as *mut u8, patch.len());
    }
    true
}
