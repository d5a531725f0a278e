//! Each instruction shape, decoded by iced-x86 (an independent decoder) and compared with the
//! instruction it must be: mnemonic, operands, operand sizes and the displacement's form.

use iced_x86::{Code, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use iced_x86::{MemorySizeOptions, Mnemonic, OpKind};

use super::*;

fn formatter() -> IntelFormatter {
    let mut f = IntelFormatter::new();
    let o = f.options_mut();
    o.set_space_after_operand_separator(true);
    o.set_hex_prefix("0x");
    o.set_hex_suffix("");
    o.set_uppercase_hex(false);
    o.set_memory_size_options(MemorySizeOptions::Always);
    o.set_show_zero_displacements(true);
    o.set_show_useless_prefixes(true);
    o.set_small_hex_numbers_in_decimal(false);
    f
}

/// Every instruction in `code` (which must decode completely and validly).
fn decode(code: &[u8]) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let i = decoder.decode();
        assert!(!i.is_invalid(), "invalid instruction in {code:02x?}");
        out.push(i);
    }
    out
}

/// The instruction in Intel syntax. A memory operand's displacement is a disp32 unless
/// ` ; disp8` or ` ; no disp` follows.
fn text(i: &Instruction) -> String {
    let mut s = String::new();
    formatter().format(i, &mut s);
    let has_memory = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
    if has_memory {
        // iced counts a disp32 as 8 bytes in 64-bit addressing (it is sign-extended).
        match i.memory_displ_size() {
            0 => s.push_str(" ; no disp"),
            1 => s.push_str(" ; disp8"),
            _ => {}
        }
    }
    s
}

/// The single instruction `emit` encodes, with its bytes (for failure messages).
fn one(emit: impl FnOnce(&mut Emitter)) -> (Instruction, Vec<u8>) {
    let mut e = Emitter::with_capacity(32, 0);
    emit(&mut e);
    let code = e.code().to_vec();
    let insns = decode(&code);
    assert_eq!(insns.len(), 1, "{code:02x?} is not one instruction");
    (insns[0], code)
}

/// Asserts that each `shape(operands) => "instruction";` encodes exactly that instruction.
macro_rules! check {
    ($($shape:ident($($arg:expr),* $(,)?) => $want:expr;)*) => {$(
        let (insn, code) = one(|e| e.$shape($($arg),*));
        assert_eq!(text(&insn), $want, "{}: bytes {code:02x?}", stringify!($shape));
    )*};
}

#[test]
fn register_moves() {
    use Width::*;
    check! {
        mov_rr(W64, RAX, RDI) => "mov rax, rdi";
        mov_rr(W64, R12, R9) => "mov r12, r9";
        mov_rr(W64, RSP, R11) => "mov rsp, r11";
        mov_rr(W64, R15, RBX) => "mov r15, rbx";
        mov_rr(W32, R11, R11) => "mov r11d, r11d";
        mov_rr(W32, RDX, R8) => "mov edx, r8d";
        movzx_r16(RAX, RAX) => "movzx eax, ax";
        movzx_r16(R13, R13) => "movzx r13d, r13w";
        movsx_r8(W64, RAX, RDI) => "movsx rax, dil";
        movsx_r8(W64, R14, RBP) => "movsx r14, bpl";
        movsx_r8(W32, RAX, RSI) => "movsx eax, sil";
        movsx_r8(W32, R8, RBP) => "movsx r8d, bpl";
        movsx_r8(W32, RCX, R15) => "movsx ecx, r15b";
        movsx_r8(W32, RBX, RDX) => "movsx ebx, dl";
        movsx_r16(W64, R14, RCX) => "movsx r14, cx";
        movsx_r16(W32, RDX, R15) => "movsx edx, r15w";
        movsxd(RBX, R13) => "movsxd rbx, r13d";
        movsxd(R8, RSI) => "movsxd r8, esi";
        push(RBX) => "push rbx";
        push(R12) => "push r12";
        pop(R15) => "pop r15";
        pop(RBP) => "pop rbp";
    }
}

#[test]
fn low_byte_of_rsi_rdi_rbp_needs_a_rex_prefix() {
    // Without REX, sil/dil/bpl would decode as dh/bh/ch.
    let (_, code) = one(|e| e.movsx_r8(Width::W32, RAX, RSI));
    assert_eq!(code, [0x40, 0x0f, 0xbe, 0xc6]);
    let (_, code) = one(|e| e.store(Size::Byte, mem(RAX, 0), RDI));
    assert_eq!(code[0], 0x40);
    // Not needed for the low byte of rax-rbx.
    let (_, code) = one(|e| e.store(Size::Byte, mem(RAX, 0), RBX));
    assert_eq!(code[0], 0x88);
}

#[test]
fn immediate_moves_pick_the_shortest_form() {
    check! {
        mov_ri32(RAX, 7) => "mov eax, 0x7";
        mov_ri32(R11, u32::MAX) => "mov r11d, 0xffffffff";
        mov_ri64(RDI, 5) => "mov edi, 0x5";
        mov_ri64(R9, 0xffff_ffff) => "mov r9d, 0xffffffff";
        mov_ri64(R11, 0xffff_ffff_8000_0000) => "mov r11, 0xffffffff80000000";
        mov_ri64(RBX, u64::MAX) => "mov rbx, 0xffffffffffffffff";
        mov_ri64(R10, 0x1234_5678_9abc_def0) => "mov r10, 0x123456789abcdef0";
        mov_ri64(RCX, 0x1_0000_0000) => "mov rcx, 0x100000000";
    }
    let code = |imm| one(|e| e.mov_ri64(R11, imm)).0.code();
    assert_eq!(code(0x8000_0000), Code::Mov_r32_imm32);
    assert_eq!(code(-2i64 as u64), Code::Mov_rm64_imm32);
    assert_eq!(code(0x7fff_ffff_ffff), Code::Mov_r64_imm64);
}

#[test]
fn loads_of_each_width_and_base() {
    use Size::*;
    check! {
        load(Byte, RAX, mem(RDI, 0x10)) => "movzx eax, byte ptr [rdi+0x10]";
        load(Word, R9, mem(R13, -8)) => "movzx r9d, word ptr [r13-0x8]";
        load(Dword, RCX, mem(RSP, 0x200)) => "mov ecx, dword ptr [rsp+0x200]";
        load(Qword, R11, mem(R12, 0)) => "mov r11, qword ptr [r12+0x0]";
        load(Qword, RBX, mem(RBP, -32768)) => "mov rbx, qword ptr [rbp-0x8000]";
        load(Dword, R15, mem(R8, i32::MAX)) => "mov r15d, dword ptr [r8+0x7fffffff]";
        load(Qword, RAX, mem(R9, i32::MIN)) => "mov rax, qword ptr [r9-0x80000000]";
        load(Byte, R14, mem(RBP, 127)) => "movzx r14d, byte ptr [rbp+0x7f]";
        load_sx(Byte, RAX, mem(RSI, -1)) => "movsx rax, byte ptr [rsi-0x1]";
        load_sx(Word, R13, mem(R12, 2)) => "movsx r13, word ptr [r12+0x2]";
        load_sx(Dword, R14, mem(RSP, 4)) => "movsxd r14, dword ptr [rsp+0x4]";
        load_sx(Qword, RDX, mem(R15, 8)) => "mov rdx, qword ptr [r15+0x8]";
    }
}

#[test]
fn stores_of_each_width_and_base() {
    use Size::*;
    check! {
        store(Byte, mem(RDI, 3), RSI) => "mov byte ptr [rdi+0x3], sil";
        store(Byte, mem(RBP, -1), RDX) => "mov byte ptr [rbp-0x1], dl";
        store(Byte, mem(R12, 0), R15) => "mov byte ptr [r12+0x0], r15b";
        store(Byte, mem(RAX, 0), RBP) => "mov byte ptr [rax+0x0], bpl";
        store(Word, mem(R8, -512), R15) => "mov word ptr [r8-0x200], r15w";
        store(Word, mem(RSP, 6), RAX) => "mov word ptr [rsp+0x6], ax";
        store(Dword, mem(R12, 0x10), R11) => "mov dword ptr [r12+0x10], r11d";
        store(Dword, mem(R13, 0), RCX) => "mov dword ptr [r13+0x0], ecx";
        store(Qword, mem(R12, 0), RSP) => "mov qword ptr [r12+0x0], rsp";
        store(Qword, mem(RBP, -8), R14) => "mov qword ptr [rbp-0x8], r14";
        store_imm(Byte, mem(RBP, -4), 0x17f) => "mov byte ptr [rbp-0x4], 0x7f";
        store_imm(Word, mem(R12, 8), 0x1_1234) => "mov word ptr [r12+0x8], 0x1234";
        store_imm(Dword, mem(RSP, 0), -2) => "mov dword ptr [rsp+0x0], 0xfffffffe";
        store_imm(Qword, mem(R13, 100), -1) => "mov qword ptr [r13+0x64], 0xffffffffffffffff";
        store_imm(Qword, mem(RDI, 0), 0x7fff_ffff) => "mov qword ptr [rdi+0x0], 0x7fffffff";
    }
}

#[test]
fn addressing_forms() {
    check! {
        lea(RBP, mem(RSP, 512)) => "lea rbp, [rsp+0x200]";
        lea(R9, mem(R13, -16)) => "lea r9, [r13-0x10]";
        lea(R9, mem(R12, 0)) => "lea r9, [r12+0x0]";
        load(Size::Qword, R11, Mem::Indexed { base: R10, index: R11, scale: Scale::X8 })
            => "mov r11, qword ptr [r10+r11*8] ; no disp";
        test_mi(Width::W32, Mem::Indexed { base: R11, index: RAX, scale: Scale::X4 }, 4)
            => "test dword ptr [r11+rax*4], 0x4 ; no disp";
        load(Size::Dword, RAX, Mem::Indexed { base: RBX, index: R9, scale: Scale::X4 })
            => "mov eax, dword ptr [rbx+r9*4] ; no disp";
        // rbp/r13 bases need an explicit (zero) displacement with an index.
        load(Size::Qword, RCX, Mem::Indexed { base: R13, index: RSI, scale: Scale::X4 })
            => "mov rcx, qword ptr [r13+rsi*4+0x0] ; disp8";
        load(Size::Qword, RCX, Mem::Indexed { base: RBP, index: R15, scale: Scale::X8 })
            => "mov rcx, qword ptr [rbp+r15*8+0x0] ; disp8";
        load(Size::Qword, RDX, Mem::Indexed { base: RSP, index: RAX, scale: Scale::X8 })
            => "mov rdx, qword ptr [rsp+rax*8] ; no disp";
        load(Size::Qword, RDX, Mem::Disp8 { base: RDI, disp: -8 })
            => "mov rdx, qword ptr [rdi-0x8] ; disp8";
        load(Size::Qword, RDX, Mem::Disp8 { base: R12, disp: 0 })
            => "mov rdx, qword ptr [r12+0x0] ; disp8";
        load(Size::Qword, RDX, Mem::Disp8 { base: R13, disp: 127 })
            => "mov rdx, qword ptr [r13+0x7f] ; disp8";
    }
}

#[test]
fn arithmetic() {
    use AluOp::*;
    use Width::*;
    check! {
        alu_rr(Add, W64, RAX, R11) => "add rax, r11";
        alu_rr(Sub, W32, R8, RDI) => "sub r8d, edi";
        alu_rr(Or, W64, R15, R14) => "or r15, r14";
        alu_rr(And, W32, RBX, RCX) => "and ebx, ecx";
        alu_rr(Xor, W32, RAX, RAX) => "xor eax, eax";
        alu_rr(Cmp, W64, RDI, R11) => "cmp rdi, r11";
        alu_ri(Add, W64, RSP, 512) => "add rsp, 0x200";
        alu_ri(Sub, W64, RSP, 128) => "sub rsp, 0x80";
        alu_ri(Cmp, W32, R10, 0x1234) => "cmp r10d, 0x1234";
        alu_ri(Cmp, W64, R11, -1) => "cmp r11, 0xffffffffffffffff";
        alu_ri(And, W64, R13, 0xff) => "and r13, 0xff";
        alu_ri(Or, W32, RDX, 1) => "or edx, 0x1";
        alu_ri(Xor, W64, R9, i32::MIN) => "xor r9, 0xffffffff80000000";
        alu_mi8(Cmp, W32, mem(R12, 8), 0) => "cmp dword ptr [r12+0x8], 0x0";
        alu_mi8(Cmp, W64, mem(R12, 40), 0) => "cmp qword ptr [r12+0x28], 0x0";
        alu_mi8(Cmp, W32, mem(RBP, -4), 7) => "cmp dword ptr [rbp-0x4], 0x7";
        test_rr(W64, RSI, RSI) => "test rsi, rsi";
        test_rr(W32, R10, RAX) => "test r10d, eax";
        test_ri(W64, R14, 0x100) => "test r14, 0x100";
        test_ri(W32, RCX, -1) => "test ecx, 0xffffffff";
        imul_rr(W64, RAX, R15) => "imul rax, r15";
        imul_rr(W32, R8, RDX) => "imul r8d, edx";
        // iced writes `imul r, r, imm` as `imul r, imm`.
        imul_rri(W64, RAX, RAX, 24) => "imul rax, 0x18";
        imul_rri(W64, R13, RBX, 24) => "imul r13, rbx, 0x18";
        imul_rri(W32, R9, RDI, -3) => "imul r9d, edi, 0xfffffffd";
        neg(W64, R15) => "neg r15";
        neg(W32, RDI) => "neg edi";
        div(W64, R11) => "div r11";
        div(W32, R11) => "div r11d";
        idiv(W64, R11) => "idiv r11";
        idiv(W32, RCX) => "idiv ecx";
        sign_extend_rax(W32) => "cdq";
        sign_extend_rax(W64) => "cqo";
        inc_mem(W32, mem(R12, 20)) => "inc dword ptr [r12+0x14]";
        dec_mem(W32, mem(R12, 20)) => "dec dword ptr [r12+0x14]";
        inc_mem(W64, mem(RAX, -8)) => "inc qword ptr [rax-0x8]";
    }
}

#[test]
fn immediate_forms() {
    // Group-1 register operations always take an imm32, memory compares an imm8.
    let code = |f: fn(&mut Emitter)| one(f).0.code();
    assert_eq!(
        code(|e| e.alu_ri(AluOp::Add, Width::W64, RSP, 1)),
        Code::Add_rm64_imm32
    );
    assert_eq!(
        code(|e| e.alu_ri(AluOp::Cmp, Width::W32, RAX, 0)),
        Code::Cmp_rm32_imm32
    );
    assert_eq!(
        code(|e| e.alu_mi8(AluOp::Cmp, Width::W32, mem(R12, 8), 0)),
        Code::Cmp_rm32_imm8
    );
    assert_eq!(
        code(|e| e.alu_mi8(AluOp::Cmp, Width::W64, mem(R12, 8), -1)),
        Code::Cmp_rm64_imm8
    );
    assert_eq!(
        code(|e| e.shift_ri(ShiftOp::Shl, Width::W64, RAX, 1)),
        Code::Shl_rm64_imm8
    );
    assert_eq!(
        code(|e| e.test_ri(Width::W32, RAX, 1)),
        Code::Test_rm32_imm32
    );
    assert_eq!(
        code(|e| e.imul_rri(Width::W64, RAX, RAX, 1)),
        Code::Imul_r64_rm64_imm32
    );
}

#[test]
fn shifts_and_byte_swaps() {
    use ShiftOp::*;
    use Width::*;
    check! {
        shift_ri(Shl, W64, R13, 63) => "shl r13, 0x3f";
        shift_ri(Shr, W64, R10, 32) => "shr r10, 0x20";
        shift_ri(Sar, W32, RAX, 31) => "sar eax, 0x1f";
        shift_ri(Shr, W32, RBX, 0) => "shr ebx, 0x0";
        shift_cl(Shl, W64, R10) => "shl r10, cl";
        shift_cl(Sar, W32, RBX) => "sar ebx, cl";
        shift_cl(Shr, W64, RDI) => "shr rdi, cl";
        shift16_ri(Ror, RAX, 8) => "ror ax, 0x8";
        shift16_ri(Ror, R9, 8) => "ror r9w, 0x8";
        bswap(W32, RAX) => "bswap eax";
        bswap(W32, R13) => "bswap r13d";
        bswap(W64, R15) => "bswap r15";
        bswap(W64, RSI) => "bswap rsi";
    }
}

#[test]
fn atomics() {
    use AluOp::*;
    use Width::*;
    check! {
        lock_alu_mr(Add, W64, mem(RDI, 16), RAX) => "lock add qword ptr [rdi+0x10], rax";
        lock_alu_mr(Or, W32, mem(RBP, -8), R8) => "lock or dword ptr [rbp-0x8], r8d";
        lock_alu_mr(And, W64, mem(R12, 0), R15) => "lock and qword ptr [r12+0x0], r15";
        lock_alu_mr(Xor, W32, mem(RSP, 4), RSI) => "lock xor dword ptr [rsp+0x4], esi";
        lock_xadd(W64, mem(R13, -16), RCX) => "lock xadd qword ptr [r13-0x10], rcx";
        lock_xadd(W32, mem(RAX, 0), R14) => "lock xadd dword ptr [rax+0x0], r14d";
        xchg_mr(W64, mem(RDI, 8), RSI) => "xchg qword ptr [rdi+0x8], rsi";
        xchg_mr(W32, mem(R9, 0), RBX) => "xchg dword ptr [r9+0x0], ebx";
        lock_cmpxchg(W64, mem(R9, 0), R11) => "lock cmpxchg qword ptr [r9+0x0], r11";
        lock_cmpxchg(W32, mem(RBP, -4), RDX) => "lock cmpxchg dword ptr [rbp-0x4], edx";
    }
}

#[test]
fn calls_returns_and_vector_saves() {
    check! {
        call_reg(R11) => "call r11";
        call_reg(RAX) => "call rax";
        call_mem(mem(R12, 32)) => "call qword ptr [r12+0x20]";
        ret() => "ret";
        movdqu_store(Mem::Disp8 { base: RSP, disp: 0 }, Xmm(0))
            => "movdqu xmmword ptr [rsp+0x0], xmm0 ; disp8";
        movdqu_store(Mem::Disp8 { base: RSP, disp: 112 }, Xmm(7))
            => "movdqu xmmword ptr [rsp+0x70], xmm7 ; disp8";
        movdqu_load(Xmm(3), Mem::Disp8 { base: RSP, disp: 48 })
            => "movdqu xmm3, xmmword ptr [rsp+0x30] ; disp8";
        movdqu_load(Xmm(9), mem(R13, -16)) => "movdqu xmm9, xmmword ptr [r13-0x10]";
    }
}

#[test]
fn branches_reach_their_bound_labels() {
    let mut e = Emitter::with_capacity(64, 2);
    let back = e.new_label();
    let fwd = e.new_label();
    e.bind(back);
    e.ret();
    e.jcc(Cond::NotEqual, fwd);
    e.jmp(back);
    e.call(fwd);
    e.jmp(fwd);
    e.mov_ri64(R11, u64::MAX); // 10 bytes to jump over
    e.bind(fwd);
    e.jcc(Cond::Below, back);
    e.resolve_fixups().unwrap();
    let fwd_at = e.label_offset(fwd).unwrap() as u64;
    let insns = decode(e.code());
    let got: Vec<(Mnemonic, u64)> = insns
        .iter()
        .filter(|i| i.op_count() == 1 && i.op0_kind() == OpKind::NearBranch64)
        .map(|i| (i.mnemonic(), i.near_branch_target()))
        .collect();
    assert_eq!(
        got,
        [
            (Mnemonic::Jne, fwd_at),
            (Mnemonic::Jmp, 0),
            (Mnemonic::Call, fwd_at),
            (Mnemonic::Jmp, fwd_at),
            (Mnemonic::Jb, 0),
        ]
    );
    // Near forms with a rel32 (patched in place), never the short ones.
    assert_eq!(insns[1].code(), Code::Jne_rel32_64);
    assert_eq!(insns[2].code(), Code::Jmp_rel32_64);
    assert_eq!(insns[3].code(), Code::Call_rel32_64);
}

#[test]
fn every_condition_code() {
    use Cond::*;
    for (cond, want) in [
        (Below, Mnemonic::Jb),
        (AboveOrEqual, Mnemonic::Jae),
        (Equal, Mnemonic::Je),
        (NotEqual, Mnemonic::Jne),
        (BelowOrEqual, Mnemonic::Jbe),
        (Above, Mnemonic::Ja),
        (Less, Mnemonic::Jl),
        (GreaterOrEqual, Mnemonic::Jge),
        (LessOrEqual, Mnemonic::Jle),
        (Greater, Mnemonic::Jg),
    ] {
        let mut e = Emitter::with_capacity(16, 1);
        let l = e.new_label();
        e.bind(l);
        e.jcc(cond, l);
        e.resolve_fixups().unwrap();
        let i = decode(e.code())[0];
        assert_eq!(
            (i.mnemonic(), i.near_branch_target()),
            (want, 0),
            "{cond:?}"
        );
    }
}

#[test]
fn an_unbound_label_is_reported() {
    let mut e = Emitter::with_capacity(16, 2);
    let bound = e.new_label();
    let never = e.new_label();
    e.bind(bound);
    e.jmp(bound);
    e.jmp(never);
    assert_eq!(e.resolve_fixups(), Err(never));
}
