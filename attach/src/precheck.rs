//! Pre-checks a hook site against the symbol's `st_size` before anything is written.
//!
//! The detour writes a 5-byte `jmp rel32` at the function entry. The site is refused when:
//! its size is unknown or under 5 bytes; the instructions that would be displaced do not end
//! inside the function; one of them (before byte 5) leaves the function (`ret`, `jmp`, indirect
//! branch), so the patch would spill into padding or the next function; or any branch in the
//! function targets the middle of the displaced bytes (it would land inside the `jmp`).

use crate::error::AttachError;
use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};

/// Length of the entry patch (`jmp rel32`).
pub const PATCH_LEN: u64 = 5;

/// Largest function body scanned for branches into the patch area.
const MAX_SCAN: u64 = 1 << 20;

/// Checks that `size` bytes of code at `address` (already readable in this process) can take a
/// 5-byte entry patch. `name` is used in errors. Returns the length of the displaced instructions.
///
/// # Safety
/// `address..address + size` must be readable memory of this process.
pub unsafe fn check_site(address: u64, size: u64, name: &str) -> Result<u64, AttachError> {
    let too_short = |reason: String| AttachError::TooShort {
        function: name.to_string(),
        size,
        reason,
    };
    if size == 0 {
        return Err(too_short(
            "symbol size unknown (st_size = 0); refusing to patch blindly".into(),
        ));
    }
    if size < PATCH_LEN {
        return Err(too_short(format!(
            "an entry detour needs {PATCH_LEN} bytes and would overwrite the following code"
        )));
    }
    let scan = size.min(MAX_SCAN);
    // SAFETY: guaranteed readable by the caller.
    let code = unsafe { std::slice::from_raw_parts(address as *const u8, scan as usize) };
    let mut dec = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut displaced = 0u64;
    let mut instr = iced_x86::Instruction::default();
    // 1. the displaced instructions
    while displaced < PATCH_LEN {
        if !dec.can_decode() {
            return Err(too_short(format!(
                "the instructions at the entry end at byte {} beyond the function's end",
                displaced + 1
            )));
        }
        dec.decode_out(&mut instr);
        if instr.is_invalid() {
            return Err(AttachError::Unpatchable {
                function: name.to_string(),
                reason: format!("undecodable instruction at +{displaced:#x}"),
            });
        }
        displaced += instr.len() as u64;
        let leaves = matches!(
            instr.flow_control(),
            FlowControl::Return | FlowControl::IndirectBranch | FlowControl::UnconditionalBranch
        );
        if leaves && displaced < PATCH_LEN {
            return Err(too_short(format!(
                "it leaves at +{:#x} ({}), before the {PATCH_LEN} bytes a detour needs",
                instr.ip() - address,
                instr.mnemonic_str()
            )));
        }
    }
    if displaced > size {
        return Err(too_short(format!(
            "the displaced instructions span {displaced} bytes, past the function's end"
        )));
    }
    // 2. branches into the middle of the displaced bytes
    let mut dec = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let inside = address + 1..address + displaced;
    while dec.can_decode() {
        dec.decode_out(&mut instr);
        if instr.is_invalid() {
            continue;
        }
        if matches!(
            instr.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) && inside.contains(&instr.near_branch_target())
        {
            return Err(AttachError::Unpatchable {
                function: name.to_string(),
                reason: format!(
                    "the instruction at +{:#x} branches to +{:#x}, inside the {displaced} bytes the detour replaces",
                    instr.ip() - address,
                    instr.near_branch_target() - address
                ),
            });
        }
    }
    Ok(displaced)
}

/// Helper for the mnemonic in messages.
trait MnemonicStr {
    fn mnemonic_str(&self) -> String;
}

impl MnemonicStr for iced_x86::Instruction {
    fn mnemonic_str(&self) -> String {
        format!("{:?}", self.mnemonic()).to_lowercase()
    }
}

/// Length of the instruction at `address` (`None` if undecodable within `max` bytes).
///
/// # Safety
/// `address..address + max` must be readable.
pub unsafe fn instruction_len(address: u64, max: u64) -> Option<u64> {
    // SAFETY: forwarded.
    let code = unsafe { std::slice::from_raw_parts(address as *const u8, max.min(15) as usize) };
    let mut dec = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let i = dec.decode();
    (!i.is_invalid()).then(|| i.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(code: &[u8]) -> Result<u64, AttachError> {
        // SAFETY: reading a live slice.
        unsafe { check_site(code.as_ptr() as u64, code.len() as u64, "f") }
    }

    #[test]
    fn accepts_and_refuses() {
        // push rbp; mov rbp,rsp; mov eax,1; pop rbp; ret
        assert_eq!(
            check(&[0x55, 0x48, 0x89, 0xe5, 0xb8, 1, 0, 0, 0, 0x5d, 0xc3]).unwrap(),
            9
        );
        // mov eax, edi; ret  (3 bytes)
        let e = check(&[0x89, 0xf8, 0xc3]).unwrap_err();
        assert!(e.to_string().contains("3 bytes"), "{e}");
        // lea eax,[rdi+1]; ret; nop -> 5 bytes but ret at +3
        assert!(check(&[0x8d, 0x47, 0x01, 0xc3, 0x90]).is_err());
        // nop5 entry then ret
        assert_eq!(check(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3]).unwrap(), 5);
        // xor eax,eax (2); inc eax (2); inc eax (2) ; jmp back to +2 (jmp rel8 -4); ret
        let e = check(&[0x31, 0xc0, 0xff, 0xc0, 0xff, 0xc0, 0xeb, 0xfa, 0xc3]).unwrap_err();
        assert!(e.to_string().contains("branches to"), "{e}");
    }
}
