//! Instruction encoding constants (`linux/bpf_common.h`, `linux/bpf.h`), narrowed to the
//! instruction fields that hold them. Each narrowing is checked at compile time.

use libbpf_sys as sys;

/// `u8` opcode-field constants from the `u32` bindings; a value that does not fit fails the build.
macro_rules! opcode_bits {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $($(#[$doc])*
        #[doc = concat!("`", stringify!($name), "` of the UAPI.")]
        pub const $name: u8 = {
            assert!(sys::$name <= u8::MAX as u32);
            sys::$name as u8
        };)*
    };
}

opcode_bits! {
    // Instruction classes (low 3 bits of the opcode).
    BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_JMP32, BPF_ALU64,
    // Source operand bit.
    BPF_K, BPF_X,
    // Memory access sizes.
    BPF_W, BPF_H, BPF_B, BPF_DW,
    // Memory access modes.
    BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MEMSX, BPF_ATOMIC,
    // ALU operations (high 4 bits).
    BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD,
    BPF_XOR, BPF_MOV, BPF_ARSH, BPF_END,
    // Jump operations (high 4 bits).
    BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE, BPF_CALL,
    BPF_EXIT, BPF_JLT, BPF_JLE, BPF_JSLT, BPF_JSLE,
    // `src` of `call`: a bpf-to-bpf call, a kfunc.
    BPF_PSEUDO_CALL, BPF_PSEUDO_KFUNC_CALL,
    // `src` of `lddw`: what the 64-bit immediate names.
    BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE, BPF_PSEUDO_BTF_ID, BPF_PSEUDO_FUNC,
    BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE,
}

// Atomic operation codes, as the `imm` of a `BPF_ATOMIC` instruction holds them.
/// The old value is returned in the source register.
pub const BPF_FETCH: i32 = sys::BPF_FETCH as i32;
/// Exchange (always fetching).
pub const BPF_XCHG: i32 = sys::BPF_XCHG as i32;
/// Compare with r0 and exchange (always fetching, into r0).
pub const BPF_CMPXCHG: i32 = sys::BPF_CMPXCHG as i32;
