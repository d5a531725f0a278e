//! The x86-64 encoder behind the JIT: registers, condition codes, the REX/ModRM/SIB encoding of
//! operands, one method per instruction shape the translator emits (operands in Intel order,
//! destination first), and labels whose rel32 references are patched once all code is out.

/// A general-purpose register, by its 4-bit hardware number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reg(u8);

pub(super) const RAX: Reg = Reg(0);
pub(super) const RCX: Reg = Reg(1);
pub(super) const RDX: Reg = Reg(2);
pub(super) const RBX: Reg = Reg(3);
pub(super) const RSP: Reg = Reg(4);
pub(super) const RBP: Reg = Reg(5);
pub(super) const RSI: Reg = Reg(6);
pub(super) const RDI: Reg = Reg(7);
pub(super) const R8: Reg = Reg(8);
pub(super) const R9: Reg = Reg(9);
pub(super) const R10: Reg = Reg(10);
pub(super) const R11: Reg = Reg(11);
pub(super) const R12: Reg = Reg(12);
pub(super) const R13: Reg = Reg(13);
pub(super) const R14: Reg = Reg(14);
pub(super) const R15: Reg = Reg(15);

impl Reg {
    /// The three bits a ModRM or SIB field (or a `+r` opcode) holds; bit 3 goes to REX.
    fn low(self) -> u8 {
        self.0 & 7
    }

    /// Without a REX prefix the byte registers 4-7 are ah/ch/dh/bh, not spl/bpl/sil/dil.
    fn byte_needs_rex(self) -> bool {
        (4..8).contains(&self.0)
    }
}

/// An SSE register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Xmm(pub(super) u8);

/// Condition of `jcc` (its low opcode nibble).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Cond {
    Below = 0x2,
    AboveOrEqual = 0x3,
    Equal = 0x4,
    NotEqual = 0x5,
    BelowOrEqual = 0x6,
    Above = 0x7,
    Less = 0xc,
    GreaterOrEqual = 0xd,
    LessOrEqual = 0xe,
    Greater = 0xf,
}

/// Operand size of a register operation. 32-bit results zero the upper half of the register,
/// which is what BPF's 32-bit ALU class requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Width {
    W32,
    W64,
}

impl Width {
    fn rex_w(self) -> bool {
        self == Width::W64
    }
}

/// Size of a memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Size {
    Byte,
    Word,
    Dword,
    Qword,
}

/// Group-1 arithmetic, by its `/digit` (the `op r/m, reg` opcode is `digit * 8 + 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum AluOp {
    Add = 0,
    Or = 1,
    And = 4,
    Sub = 5,
    Xor = 6,
    Cmp = 7,
}

impl AluOp {
    fn rm_reg_opcode(self) -> u8 {
        ((self as u8) << 3) | 1
    }
}

/// Group-2 shifts and rotates, by their `/digit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum ShiftOp {
    Ror = 1,
    Shl = 4,
    Shr = 5,
    Sar = 7,
}

/// Index scale of a SIB byte (its two-bit field; 1 and 2 are not used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Scale {
    X4 = 2,
    X8 = 3,
}

/// A memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mem {
    /// `[base + disp32]`. BPF accesses use this form whatever the offset, so an instruction's
    /// length never depends on it (a disp8 form would be 3 bytes shorter for small offsets).
    Disp32 { base: Reg, disp: i32 },
    /// `[base + disp8]`.
    Disp8 { base: Reg, disp: i8 },
    /// `[base + index * scale]`; `index` must not be rsp (that SIB value means no index).
    Indexed { base: Reg, index: Reg, scale: Scale },
}

/// `[base + disp]` in the disp32 form (see [`Mem::Disp32`]).
pub(super) fn mem(base: Reg, disp: i32) -> Mem {
    Mem::Disp32 { base, disp }
}

/// A position in the code, bound once; references to it are patched by
/// [`Emitter::resolve_fixups`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Label(usize);

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Machine code being emitted, with its labels and the rel32 fields waiting for them.
pub(super) struct Emitter {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (offset of a rel32 field, its target).
    fixups: Vec<(usize, Label)>,
}

impl Emitter {
    pub(super) fn with_capacity(bytes: usize, labels: usize) -> Self {
        Self {
            code: Vec::with_capacity(bytes),
            labels: Vec::with_capacity(labels),
            fixups: Vec::new(),
        }
    }

    /// The code emitted so far (complete after [`resolve_fixups`](Self::resolve_fixups)).
    pub(super) fn code(&self) -> &[u8] {
        &self.code
    }

    // ---- labels ----

    pub(super) fn new_label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the current position.
    pub(super) fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    /// Where `l` was bound, if it was.
    pub(super) fn label_offset(&self, l: Label) -> Option<usize> {
        self.labels[l.0]
    }

    /// Writes every rel32 field with the distance from its end to its label; fails with the
    /// first label that was referenced but never bound.
    pub(super) fn resolve_fixups(&mut self) -> Result<(), Label> {
        for (pos, l) in std::mem::take(&mut self.fixups) {
            let target = self.labels[l.0].ok_or(l)?;
            let rel = target as i64 - (pos as i64 + 4);
            self.code[pos..pos + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        Ok(())
    }

    // ---- raw encoding ----

    fn byte(&mut self, b: u8) {
        self.code.push(b);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    fn imm32(&mut self, v: i32) {
        self.bytes(&v.to_le_bytes());
    }

    /// A rel32 field for `l`, patched by `resolve_fixups`. Always the last field of its
    /// instruction, so the displacement counts from the field's end.
    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.code.len(), l));
        self.imm32(0);
    }

    /// REX with W and the high bits of the ModRM reg field, the SIB index and the base (or
    /// r/m); omitted when it would be a plain 0x40, unless `force`d.
    fn rex(&mut self, w: bool, reg: u8, index: u8, base: u8, force: bool) {
        let v = 0x40
            | ((w as u8) << 3)
            | (((reg >> 3) & 1) << 2)
            | (((index >> 3) & 1) << 1)
            | ((base >> 3) & 1);
        if v != 0x40 || force {
            self.byte(v);
        }
    }

    /// `opcode reg, rm` with a register in r/m; `reg` is a register number or a `/digit`.
    fn op_reg(&mut self, w: bool, opcode: &[u8], reg: u8, rm: Reg) {
        self.op_reg_rex(w, opcode, reg, rm, false);
    }

    fn op_reg_rex(&mut self, w: bool, opcode: &[u8], reg: u8, rm: Reg, force_rex: bool) {
        self.rex(w, reg, 0, rm.0, force_rex);
        self.bytes(opcode);
        self.byte(0xc0 | ((reg & 7) << 3) | rm.low());
    }

    /// `[prefixes] opcode reg, m`; `reg` is a register number or a `/digit`. Prefixes (0x66,
    /// lock, the mandatory 0xf3) come before REX, as the architecture requires.
    fn op_mem(
        &mut self,
        prefixes: &[u8],
        w: bool,
        opcode: &[u8],
        reg: u8,
        m: Mem,
        force_rex: bool,
    ) {
        self.bytes(prefixes);
        let (index, base) = match m {
            Mem::Disp32 { base, .. } | Mem::Disp8 { base, .. } => (0, base),
            Mem::Indexed { base, index, .. } => (index.0, base),
        };
        self.rex(w, reg, index, base.0, force_rex);
        self.bytes(opcode);
        let reg = (reg & 7) << 3;
        // r/m = 100 means "a SIB byte follows": rsp/r12 bases need one (base only, no index).
        let sib_for_base = |e: &mut Self| {
            if base.low() == 4 {
                e.byte(0x24);
            }
        };
        match m {
            Mem::Disp32 { disp, .. } => {
                self.byte(0x80 | reg | base.low());
                sib_for_base(self);
                self.imm32(disp);
            }
            Mem::Disp8 { disp, .. } => {
                self.byte(0x40 | reg | base.low());
                sib_for_base(self);
                self.byte(disp as u8);
            }
            Mem::Indexed { index, scale, .. } => {
                debug_assert!(index != RSP, "rsp cannot be an index");
                let sib = ((scale as u8) << 6) | (index.low() << 3) | base.low();
                // With mod 00 a base of rbp/r13 means "no base, disp32": those take a zero disp8.
                if base.low() == 5 {
                    self.bytes(&[0x44 | reg, sib, 0]);
                } else {
                    self.bytes(&[0x04 | reg, sib]);
                }
            }
        }
    }

    // ---- data movement ----

    /// `mov dst, src`.
    pub(super) fn mov_rr(&mut self, w: Width, dst: Reg, src: Reg) {
        self.op_reg(w.rex_w(), &[0x89], src.0, dst);
    }

    /// `mov dst32, imm32` (zero-extends to 64 bits).
    pub(super) fn mov_ri32(&mut self, dst: Reg, imm: u32) {
        self.rex(false, 0, 0, dst.0, false);
        self.byte(0xb8 + dst.low());
        self.imm32(imm as i32);
    }

    /// `dst = imm` in the shortest of `mov r32, imm32` (zero-extending), `mov r64, simm32`
    /// (sign-extending) and `mov r64, imm64`.
    pub(super) fn mov_ri64(&mut self, dst: Reg, imm: u64) {
        if imm <= u32::MAX as u64 {
            self.mov_ri32(dst, imm as u32);
        } else if imm as i64 >= i32::MIN as i64 && imm as i64 <= i32::MAX as i64 {
            self.op_reg(true, &[0xc7], 0, dst);
            self.imm32(imm as i32);
        } else {
            self.rex(true, 0, 0, dst.0, false);
            self.byte(0xb8 + dst.low());
            self.bytes(&imm.to_le_bytes());
        }
    }

    /// `movzx dst32, src16`.
    pub(super) fn movzx_r16(&mut self, dst: Reg, src: Reg) {
        self.op_reg(false, &[0x0f, 0xb7], dst.0, src);
    }

    /// `movsx dst, src8`. The REX prefix is also emitted when only `dst` is 4-7, where it is
    /// redundant but harmless.
    pub(super) fn movsx_r8(&mut self, w: Width, dst: Reg, src: Reg) {
        let force = dst.byte_needs_rex() || src.byte_needs_rex();
        self.op_reg_rex(w.rex_w(), &[0x0f, 0xbe], dst.0, src, force);
    }

    /// `movsx dst, src16`.
    pub(super) fn movsx_r16(&mut self, w: Width, dst: Reg, src: Reg) {
        self.op_reg(w.rex_w(), &[0x0f, 0xbf], dst.0, src);
    }

    /// `movsxd dst64, src32`.
    pub(super) fn movsxd(&mut self, dst: Reg, src: Reg) {
        self.op_reg(true, &[0x63], dst.0, src);
    }

    /// Zero-extending load: `movzx dst32, byte/word [m]`, `mov dst32, [m]`, `mov dst64, [m]`.
    pub(super) fn load(&mut self, size: Size, dst: Reg, m: Mem) {
        let (w, opcode): (bool, &[u8]) = match size {
            Size::Byte => (false, &[0x0f, 0xb6]),
            Size::Word => (false, &[0x0f, 0xb7]),
            Size::Dword => (false, &[0x8b]),
            Size::Qword => (true, &[0x8b]),
        };
        self.op_mem(&[], w, opcode, dst.0, m, false);
    }

    /// Sign-extending load to 64 bits: `movsx dst64, byte/word [m]`, `movsxd dst64, [m]` (a
    /// qword has nothing to extend: `mov dst64, [m]`).
    pub(super) fn load_sx(&mut self, size: Size, dst: Reg, m: Mem) {
        let opcode: &[u8] = match size {
            Size::Byte => &[0x0f, 0xbe],
            Size::Word => &[0x0f, 0xbf],
            Size::Dword => &[0x63],
            Size::Qword => &[0x8b],
        };
        self.op_mem(&[], true, opcode, dst.0, m, false);
    }

    /// `mov [m], src` of `size` (the low byte, word, dword or all of `src`).
    pub(super) fn store(&mut self, size: Size, m: Mem, src: Reg) {
        match size {
            Size::Byte => self.op_mem(&[], false, &[0x88], src.0, m, src.byte_needs_rex()),
            Size::Word => self.op_mem(&[0x66], false, &[0x89], src.0, m, false),
            Size::Dword => self.op_mem(&[], false, &[0x89], src.0, m, false),
            Size::Qword => self.op_mem(&[], true, &[0x89], src.0, m, false),
        }
    }

    /// `mov size [m], imm`: the low byte or word of `imm`, or `imm` (a qword sign-extends it).
    pub(super) fn store_imm(&mut self, size: Size, m: Mem, imm: i32) {
        match size {
            Size::Byte => {
                self.op_mem(&[], false, &[0xc6], 0, m, false);
                self.byte(imm as u8);
            }
            Size::Word => {
                self.op_mem(&[0x66], false, &[0xc7], 0, m, false);
                self.bytes(&(imm as u16).to_le_bytes());
            }
            Size::Dword | Size::Qword => {
                self.op_mem(&[], size == Size::Qword, &[0xc7], 0, m, false);
                self.imm32(imm);
            }
        }
    }

    /// `lea dst64, [m]`.
    pub(super) fn lea(&mut self, dst: Reg, m: Mem) {
        self.op_mem(&[], true, &[0x8d], dst.0, m, false);
    }

    pub(super) fn push(&mut self, r: Reg) {
        self.rex(false, 0, 0, r.0, false);
        self.byte(0x50 + r.low());
    }

    pub(super) fn pop(&mut self, r: Reg) {
        self.rex(false, 0, 0, r.0, false);
        self.byte(0x58 + r.low());
    }

    // ---- arithmetic ----

    /// `op dst, src`.
    pub(super) fn alu_rr(&mut self, op: AluOp, w: Width, dst: Reg, src: Reg) {
        self.op_reg(w.rex_w(), &[op.rm_reg_opcode()], src.0, dst);
    }

    /// `op dst, imm32` (sign-extended for 64 bits). Always the imm32 form, also for small
    /// immediates.
    pub(super) fn alu_ri(&mut self, op: AluOp, w: Width, dst: Reg, imm: i32) {
        self.op_reg(w.rex_w(), &[0x81], op as u8, dst);
        self.imm32(imm);
    }

    /// `op dword/qword [m], imm8` (sign-extended).
    pub(super) fn alu_mi8(&mut self, op: AluOp, w: Width, m: Mem, imm: i8) {
        self.op_mem(&[], w.rex_w(), &[0x83], op as u8, m, false);
        self.byte(imm as u8);
    }

    /// `test a, b`.
    pub(super) fn test_rr(&mut self, w: Width, a: Reg, b: Reg) {
        self.op_reg(w.rex_w(), &[0x85], b.0, a);
    }

    /// `test r, imm32`.
    pub(super) fn test_ri(&mut self, w: Width, r: Reg, imm: i32) {
        self.op_reg(w.rex_w(), &[0xf7], 0, r);
        self.imm32(imm);
    }

    /// `test dword/qword [m], imm32`.
    pub(super) fn test_mi(&mut self, w: Width, m: Mem, imm: i32) {
        self.op_mem(&[], w.rex_w(), &[0xf7], 0, m, false);
        self.imm32(imm);
    }

    /// `imul dst, src`.
    pub(super) fn imul_rr(&mut self, w: Width, dst: Reg, src: Reg) {
        self.op_reg(w.rex_w(), &[0x0f, 0xaf], dst.0, src);
    }

    /// `imul dst, src, imm32`.
    pub(super) fn imul_rri(&mut self, w: Width, dst: Reg, src: Reg, imm: i32) {
        self.op_reg(w.rex_w(), &[0x69], dst.0, src);
        self.imm32(imm);
    }

    pub(super) fn neg(&mut self, w: Width, r: Reg) {
        self.op_reg(w.rex_w(), &[0xf7], 3, r);
    }

    /// `div r`: unsigned rdx:rax / r, quotient in rax, remainder in rdx.
    pub(super) fn div(&mut self, w: Width, r: Reg) {
        self.op_reg(w.rex_w(), &[0xf7], 6, r);
    }

    /// `idiv r`: signed rdx:rax / r.
    pub(super) fn idiv(&mut self, w: Width, r: Reg) {
        self.op_reg(w.rex_w(), &[0xf7], 7, r);
    }

    /// `cdq` (edx = sign of eax) or `cqo` (rdx = sign of rax).
    pub(super) fn sign_extend_rax(&mut self, w: Width) {
        if w.rex_w() {
            self.byte(0x48);
        }
        self.byte(0x99);
    }

    /// `op r, imm8`.
    pub(super) fn shift_ri(&mut self, op: ShiftOp, w: Width, r: Reg, imm: u8) {
        self.op_reg(w.rex_w(), &[0xc1], op as u8, r);
        self.byte(imm);
    }

    /// `op r16, imm8`.
    pub(super) fn shift16_ri(&mut self, op: ShiftOp, r: Reg, imm: u8) {
        self.byte(0x66);
        self.shift_ri(op, Width::W32, r, imm);
    }

    /// `op r, cl`.
    pub(super) fn shift_cl(&mut self, op: ShiftOp, w: Width, r: Reg) {
        self.op_reg(w.rex_w(), &[0xd3], op as u8, r);
    }

    pub(super) fn bswap(&mut self, w: Width, r: Reg) {
        self.rex(w.rex_w(), 0, 0, r.0, false);
        self.bytes(&[0x0f, 0xc8 + r.low()]);
    }

    /// `inc dword/qword [m]`.
    pub(super) fn inc_mem(&mut self, w: Width, m: Mem) {
        self.op_mem(&[], w.rex_w(), &[0xff], 0, m, false);
    }

    /// `dec dword/qword [m]`.
    pub(super) fn dec_mem(&mut self, w: Width, m: Mem) {
        self.op_mem(&[], w.rex_w(), &[0xff], 1, m, false);
    }

    // ---- atomics ----

    /// `lock op [m], src`.
    pub(super) fn lock_alu_mr(&mut self, op: AluOp, w: Width, m: Mem, src: Reg) {
        self.op_mem(&[0xf0], w.rex_w(), &[op.rm_reg_opcode()], src.0, m, false);
    }

    /// `lock xadd [m], src`.
    pub(super) fn lock_xadd(&mut self, w: Width, m: Mem, src: Reg) {
        self.op_mem(&[0xf0], w.rex_w(), &[0x0f, 0xc1], src.0, m, false);
    }

    /// `xchg [m], src` (locked without a prefix).
    pub(super) fn xchg_mr(&mut self, w: Width, m: Mem, src: Reg) {
        self.op_mem(&[], w.rex_w(), &[0x87], src.0, m, false);
    }

    /// `lock cmpxchg [m], src` (compares with and loads into rax).
    pub(super) fn lock_cmpxchg(&mut self, w: Width, m: Mem, src: Reg) {
        self.op_mem(&[0xf0], w.rex_w(), &[0x0f, 0xb1], src.0, m, false);
    }

    // ---- control flow ----

    pub(super) fn jmp(&mut self, l: Label) {
        self.byte(0xe9);
        self.rel32(l);
    }

    pub(super) fn jcc(&mut self, cond: Cond, l: Label) {
        self.bytes(&[0x0f, 0x80 + cond as u8]);
        self.rel32(l);
    }

    /// `call rel32` to a label.
    pub(super) fn call(&mut self, l: Label) {
        self.byte(0xe8);
        self.rel32(l);
    }

    /// `call r`.
    pub(super) fn call_reg(&mut self, r: Reg) {
        self.op_reg(false, &[0xff], 2, r);
    }

    /// `call qword [m]`.
    pub(super) fn call_mem(&mut self, m: Mem) {
        self.op_mem(&[], false, &[0xff], 2, m, false);
    }

    pub(super) fn ret(&mut self) {
        self.byte(0xc3);
    }

    // ---- vector registers ----

    /// `movdqu [m], x`.
    pub(super) fn movdqu_store(&mut self, m: Mem, x: Xmm) {
        self.op_mem(&[0xf3], false, &[0x0f, 0x7f], x.0, m, false);
    }

    /// `movdqu x, [m]`.
    pub(super) fn movdqu_load(&mut self, x: Xmm, m: Mem) {
        self.op_mem(&[0xf3], false, &[0x0f, 0x6f], x.0, m, false);
    }
}

#[cfg(test)]
mod tests;
