//! eBPF instruction model: opcode constants, decoding and encoding of 8-byte slots.

use super::error::VmError;

// Opcode fields, atomic codes and pseudo sources: the generated UAPI's values.
pub use bpftime_abi::insn::*;

/// Common full opcodes: `lddw` (64-bit immediate load, two slots).
pub const LDDW: u8 = BPF_LD | BPF_DW | BPF_IMM;
/// `call imm`: a helper (`src` 0) or a subprogram (`src` = `BPF_PSEUDO_CALL`); `callx` is
/// this opcode with `BPF_X` set.
pub const CALL: u8 = BPF_JMP | BPF_CALL;
/// `exit`: return r0 to the caller.
pub const EXIT: u8 = BPF_JMP | BPF_EXIT;

/// Size of one instruction slot in bytes.
pub const INSN_SIZE: usize = 8;

/// One decoded 8-byte instruction slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Insn {
    /// The opcode byte (class, size/source and operation bits).
    pub opc: u8,
    /// Destination register (low nibble of byte 1).
    pub dst: u8,
    /// Source register, or the pseudo source of `lddw` and `call` (high nibble of byte 1).
    pub src: u8,
    /// Signed offset: memory displacement or jump distance in slots.
    pub off: i16,
    /// Signed 32-bit immediate.
    pub imm: i32,
}

impl Insn {
    /// An instruction from its fields.
    pub const fn new(opc: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Self {
            opc,
            dst,
            src,
            off,
            imm,
        }
    }

    /// Decode one little-endian slot.
    pub fn decode(b: &[u8; 8]) -> Self {
        Self {
            opc: b[0],
            dst: b[1] & 0x0f,
            src: b[1] >> 4,
            off: i16::from_le_bytes([b[2], b[3]]),
            imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// Encode to a little-endian slot.
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.opc;
        b[1] = (self.dst & 0x0f) | (self.src << 4);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }

    /// Instruction class (low 3 bits: `BPF_LD`, `BPF_ALU64`, `BPF_JMP`, ...).
    pub fn class(&self) -> u8 {
        self.opc & 0x07
    }

    /// ALU/JMP operation (high 4 bits).
    pub fn op(&self) -> u8 {
        self.opc & 0xf0
    }

    /// Memory access size bits.
    pub fn size(&self) -> u8 {
        self.opc & 0x18
    }

    /// Memory access mode bits.
    pub fn mode(&self) -> u8 {
        self.opc & 0xe0
    }

    /// Whether the source operand is a register.
    pub fn is_reg_src(&self) -> bool {
        self.opc & BPF_X != 0
    }
}

/// Number of bytes accessed for a size code.
pub fn size_bytes(size: u8) -> usize {
    match size {
        BPF_B => 1,
        BPF_H => 2,
        BPF_W => 4,
        _ => 8,
    }
}

/// Decode a byte buffer into instruction slots.
pub fn decode_bytes(bytes: &[u8]) -> Result<Vec<Insn>, VmError> {
    if !bytes.len().is_multiple_of(INSN_SIZE) {
        return Err(VmError::BadLength(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(INSN_SIZE)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            Insn::decode(&a)
        })
        .collect())
}

/// Encode instruction slots into bytes.
pub fn encode_insns(insns: &[Insn]) -> Vec<u8> {
    insns.iter().flat_map(|i| i.encode()).collect()
}
