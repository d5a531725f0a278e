//! Fuzz-style tests with fixed seeds: random bytecode never panics the loader or the
//! interpreter, and random well-formed programs give the same result on the interpreter and
//! the JIT.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use bpftime_runtime::vm::insn::*;
use bpftime_runtime::vm::{
    interpret, CallContext, HelperError, HelperTable, Insn, InterpOptions, MemoryMap, Program,
    VmError,
};

const OPCODES: &[u8] = &[
    0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3c, 0x44, 0x4c, 0x54, 0x5c, 0x64, 0x6c, 0x74, 0x7c,
    0x84, 0x94, 0x9c, 0xa4, 0xac, 0xb4, 0xbc, 0xc4, 0xcc, 0xd4, 0xdc, 0x07, 0x0f, 0x17, 0x1f, 0x27,
    0x2f, 0x37, 0x3f, 0x47, 0x4f, 0x57, 0x5f, 0x67, 0x6f, 0x77, 0x7f, 0x87, 0x97, 0x9f, 0xa7, 0xaf,
    0xb7, 0xbf, 0xc7, 0xcf, 0xd7, 0x18, 0x61, 0x69, 0x71, 0x79, 0x81, 0x89, 0x91, 0x62, 0x6a, 0x72,
    0x7a, 0x63, 0x6b, 0x73, 0x7b, 0xc3, 0xdb, 0x05, 0x15, 0x1d, 0x25, 0x2d, 0x35, 0x3d, 0x45, 0x4d,
    0x55, 0x5d, 0x65, 0x6d, 0x75, 0x7d, 0x85, 0x8d, 0x95, 0xa5, 0xad, 0xb5, 0xbd, 0xc5, 0xcd, 0xd5,
    0xdd, 0x06, 0x16, 0x1e, 0x26, 0x2e, 0x36, 0x3e, 0x46, 0x4e, 0x56, 0x5e, 0x66, 0x6e, 0x76, 0x7e,
    0xa6, 0xae, 0xb6, 0xbe, 0xc6, 0xce, 0xd6, 0xde,
];

fn helpers<'e>() -> HelperTable<'e> {
    let mut h = HelperTable::new();
    h.register(1, |a: [u64; 5], _c: &mut CallContext<'_, '_>| {
        Ok::<u64, HelperError>(a[0].wrapping_mul(31) ^ a[1].rotate_left(7) ^ a[4])
    });
    h
}

fn interesting_imm(rng: &mut StdRng) -> i32 {
    match rng.random_range(0..8) {
        0 => 0,
        1 => 1,
        2 => -1,
        3 => i32::MIN,
        4 => i32::MAX,
        5 => [16, 31, 32, 63, 64][rng.random_range(0..5)],
        _ => rng.random(),
    }
}

#[test]
fn random_bytecode_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x5eed_b9f0);
    let (mut loaded, mut ran_ok, mut errors, mut faults) = (0, 0, 0, 0);
    let mut buf = vec![0u8; 256];
    for round in 0..20_000 {
        let n = rng.random_range(1..48);
        let insns: Vec<Insn> = if round % 2 == 0 {
            buf.resize(n * 8, 0);
            rng.fill(&mut buf[..]);
            decode_bytes(&buf).unwrap()
        } else {
            (0..n)
                .map(|pc| {
                    let opc = OPCODES[rng.random_range(0..OPCODES.len())];
                    let mut i = Insn::new(
                        opc,
                        rng.random_range(0..11),
                        rng.random_range(0..11),
                        rng.random_range(-(pc as i16) - 1..(n - pc) as i16),
                        interesting_imm(&mut rng),
                    );
                    if i.dst == 10 && !matches!(i.class(), BPF_ST | BPF_STX) {
                        i.dst = rng.random_range(0..10);
                    }
                    if matches!(i.class(), BPF_ALU | BPF_ALU64) && i.op() == BPF_END {
                        i.imm = [16, 32, 64][rng.random_range(0..3)];
                    }
                    if matches!(i.class(), BPF_LDX | BPF_ST | BPF_STX) && rng.random() {
                        i.off = -8 * rng.random_range(0..8);
                    }
                    if matches!(i.class(), BPF_ALU | BPF_ALU64) && rng.random_range(0..4) != 0 {
                        i.off = 0;
                    }
                    if i.opc & 0xe7 == (BPF_STX | BPF_ATOMIC) {
                        let ops = [0x00, 0x01, 0x40, 0x41, 0x50, 0x51, 0xa0, 0xa1, 0xe1, 0xf1];
                        i.imm = ops[rng.random_range(0..ops.len())];
                    }
                    if i.opc == CALL {
                        i.src = rng.random_range(0..2);
                        if i.src == 1 {
                            i.imm = rng.random_range(-(pc as i32) - 1..(n - pc - 1) as i32);
                        } else {
                            i.imm = rng.random_range(0..3);
                        }
                    }
                    if i.opc == LDDW {
                        i.opc = EXIT;
                    }
                    i
                })
                .collect()
        };
        let Ok(prog) = Program::new(insns) else {
            continue;
        };
        loaded += 1;
        let mut ctx = [0u8; 64];
        let ptr = ctx.as_mut_ptr() as u64;
        let mut mem = MemoryMap::new();
        mem.add_mut_slice(&mut ctx);
        let r = interpret(
            &prog,
            [ptr, 64, 0, 0, 0],
            &mut mem,
            &mut helpers(),
            InterpOptions {
                insn_budget: Some(10_000),
            },
        );
        match r {
            Ok(_) => ran_ok += 1,
            Err(e) => {
                // A run-time error names the instruction it stopped at, inside the program
                // (README: "a fault names the instruction").
                let text = e.to_string();
                if let VmError::MemoryFault { pc, .. } | VmError::MisalignedAtomic { pc, .. } = e {
                    assert!(
                        pc < prog.len(),
                        "fault at {pc} of {} instructions",
                        prog.len()
                    );
                    assert!(text.contains(&format!("instruction {pc}")), "{text}");
                    faults += 1;
                }
                errors += 1;
            }
        }
    }
    println!(
        "random bytecode: {loaded} loaded, {ran_ok} ran to exit, {errors} errors, {faults} memory faults"
    );
    assert!(
        faults > 0,
        "no random program touched memory it may not: nothing was checked"
    );
    assert!(
        loaded > 2_000,
        "too few programs passed validation: {loaded}"
    );
}

/// A random well-formed program: registers initialised, stack initialised, forward jumps only,
/// memory only through r10 within the frame, r1-r5 reinitialised after helper calls, and all
/// registers plus some stack words folded into r0 at the end.
fn gen_program(rng: &mut StdRng) -> Vec<Insn> {
    let mut body: Vec<Vec<Insn>> = Vec::new();
    let mov_imm64 = |r: u8, v: u64| {
        vec![
            Insn::new(LDDW, r, 0, 0, v as u32 as i32),
            Insn::new(0, 0, 0, 0, (v >> 32) as u32 as i32),
        ]
    };
    let mut pro = Vec::new();
    for r in 0..10u8 {
        pro.extend(mov_imm64(r, rng.random()));
    }
    for k in 1..=64i16 {
        pro.push(Insn::new(
            BPF_ST | BPF_MEM | BPF_DW,
            10,
            0,
            -8 * k,
            rng.random(),
        ));
    }
    let n = rng.random_range(5..60);
    for _ in 0..n {
        let dst = rng.random_range(0..10u8);
        let src = rng.random_range(0..10u8);
        let kind = rng.random_range(0..100);
        let unit: Vec<Insn> = if kind < 45 {
            let class = if rng.random() { BPF_ALU64 } else { BPF_ALU };
            let ops = [
                BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH, BPF_NEG,
                BPF_MOD, BPF_XOR, BPF_MOV, BPF_ARSH,
            ];
            let op = ops[rng.random_range(0..ops.len())];
            let x = rng.random::<bool>() && op != BPF_NEG;
            let mut off = 0i16;
            if (op == BPF_DIV || op == BPF_MOD) && rng.random() {
                off = 1;
            }
            if op == BPF_MOV && x && rng.random() {
                off = if class == BPF_ALU64 {
                    [8, 16, 32][rng.random_range(0..3)]
                } else {
                    [8, 16][rng.random_range(0..2)]
                };
            }
            let imm = interesting_imm(rng);
            vec![Insn::new(
                class | op | if x { BPF_X } else { BPF_K },
                dst,
                if x { src } else { 0 },
                off,
                imm,
            )]
        } else if kind < 50 {
            let (class, x) =
                [(BPF_ALU, BPF_K), (BPF_ALU, BPF_X), (BPF_ALU64, BPF_K)][rng.random_range(0..3)];
            vec![Insn::new(
                class | BPF_END | x,
                dst,
                0,
                0,
                [16, 32, 64][rng.random_range(0..3)],
            )]
        } else if kind < 55 {
            mov_imm64(dst, rng.random())
        } else if kind < 68 {
            // Conditional forward jump over the next few units (patched below).
            let ops = [
                BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE, BPF_JLT, BPF_JLE,
                BPF_JSLT, BPF_JSLE,
            ];
            let op = ops[rng.random_range(0..ops.len())];
            let class = if rng.random() { BPF_JMP } else { BPF_JMP32 };
            let x = rng.random::<bool>();
            vec![Insn::new(
                class | op | if x { BPF_X } else { BPF_K },
                dst,
                if x { src } else { 0 },
                i16::MIN, // placeholder: number of units to skip in `imm`-less form
                interesting_imm(rng),
            )]
        } else if kind < 84 {
            let sizes = [BPF_B, BPF_H, BPF_W, BPF_DW];
            let size = sizes[rng.random_range(0..4)];
            let len = size_bytes(size) as i16;
            let off = -(rng.random_range(1..=(512 / len))) * len;
            match rng.random_range(0..4) {
                0 => vec![Insn::new(
                    BPF_ST | BPF_MEM | size,
                    10,
                    0,
                    off,
                    interesting_imm(rng),
                )],
                1 => vec![Insn::new(BPF_STX | BPF_MEM | size, 10, src, off, 0)],
                2 => vec![Insn::new(BPF_LDX | BPF_MEM | size, dst, 10, off, 0)],
                _ if size != BPF_DW => {
                    vec![Insn::new(BPF_LDX | BPF_MEMSX | size, dst, 10, off, 0)]
                }
                _ => vec![Insn::new(BPF_LDX | BPF_MEM | size, dst, 10, off, 0)],
            }
        } else if kind < 94 {
            let size = if rng.random() { BPF_W } else { BPF_DW };
            let len = size_bytes(size) as i16;
            let off = -(rng.random_range(1..=(512 / len))) * len;
            let ops = [
                0x00,
                0x01,
                0x40,
                0x41,
                0x50,
                0x51,
                0xa0,
                0xa1,
                BPF_XCHG,
                BPF_CMPXCHG,
            ];
            let op = ops[rng.random_range(0..ops.len())];
            vec![Insn::new(BPF_STX | BPF_ATOMIC | size, 10, src, off, op)]
        } else {
            let mut v = vec![Insn::new(CALL, 0, 0, 0, 1)];
            for r in 1..=5u8 {
                v.push(Insn::new(
                    BPF_ALU64 | BPF_MOV | BPF_K,
                    r,
                    0,
                    0,
                    rng.random(),
                ));
            }
            v
        };
        body.push(unit);
    }
    // Patch jumps: skip a random number of following units.
    let starts: Vec<usize> = body
        .iter()
        .scan(0usize, |acc, u| {
            let s = *acc;
            *acc += u.len();
            Some(s)
        })
        .collect();
    let total: usize = body.iter().map(Vec::len).sum();
    for ui in 0..body.len() {
        if body[ui][0].off == i16::MIN && body[ui][0].class() != BPF_ALU64 {
            let skip = rng.random_range(0..=3usize).min(body.len() - ui - 1);
            let target = if ui + 1 + skip < body.len() {
                starts[ui + 1 + skip]
            } else {
                total
            };
            body[ui][0].off = (target - starts[ui] - 1) as i16;
        }
    }
    let mut out = pro;
    for u in body {
        out.extend(u);
    }
    // Epilogue: fold r1..r9 and eight stack words into r0.
    for r in 1..10u8 {
        out.push(Insn::new(BPF_ALU64 | BPF_MUL | BPF_K, 0, 0, 0, 0x0100_0193));
        out.push(Insn::new(BPF_ALU64 | BPF_XOR | BPF_X, 0, r, 0, 0));
    }
    for k in 0..8i16 {
        out.push(Insn::new(BPF_LDX | BPF_MEM | BPF_DW, 1, 10, -8 - 64 * k, 0));
        out.push(Insn::new(BPF_ALU64 | BPF_MUL | BPF_K, 0, 0, 0, 0x0100_0193));
        out.push(Insn::new(BPF_ALU64 | BPF_XOR | BPF_X, 0, 1, 0, 0));
    }
    out.push(Insn::new(EXIT, 0, 0, 0, 0));
    out
}

#[test]
fn interpreter_and_jit_agree_on_random_programs() {
    let mut rng = StdRng::seed_from_u64(0xd1ff_0001);
    let rounds = 3_000;
    let mut compared = 0;
    for round in 0..rounds {
        let insns = gen_program(&mut rng);
        let prog = Program::new(insns.clone()).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let mut mem = MemoryMap::new();
        let a = interpret(
            &prog,
            [0; 5],
            &mut mem,
            &mut helpers(),
            InterpOptions {
                insn_budget: Some(100_000),
            },
        );
        let mut mem = MemoryMap::new();
        // SAFETY: generated programs access only their own stack frame through r10.
        let b = unsafe { prog.jit().unwrap().run([0; 5], &mut mem, &mut helpers()) };
        if a != b {
            // Shrink the report: print the program.
            let listing: Vec<String> = insns
                .iter()
                .enumerate()
                .map(|(i, x)| format!("{i}: {x:?}"))
                .collect();
            panic!(
                "round {round}: interpreter {a:?} != jit {b:?}\n{}",
                listing.join("\n")
            );
        }
        compared += 1;
    }
    println!("differential: {compared}/{rounds} programs agree");
}
