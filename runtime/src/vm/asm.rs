//! A small assembler for the bpf_conformance / ubpf assembly syntax:
//! `mov %r0, 1`, `ldxw %r1, [%r2+4]`, `stxdw [%r10-8], %r1`, `jeq %r1, 0, label`,
//! `lock fetch add32 [%r10-8], %r1`, `call 5`, `call %r2`, `call local func`, `lddw %r0, 0x..`,
//! `lddw %r2, func` (subprogram address, `BPF_PSEUDO_FUNC`), `ldmap %r1, 0` / `ldmapval %r1, 0, 8`
//! (map by index / address in a map value, as the object loader encodes them),
//! labels (`name:`), `#` comments. A jump to the undefined label `exit` goes to the last
//! instruction.

use std::collections::HashMap;

use thiserror::Error;

use super::insn::*;

/// Assembly error with its 1-based line.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("line {line}: {msg}")]
pub struct AsmError {
    /// The source line, counting from 1.
    pub line: usize,
    /// What is wrong on it.
    pub msg: String,
}

#[derive(Debug, Clone)]
enum Operand {
    Reg(u8),
    Imm(i128),
    Mem(u8, i64),
    Label(String),
}

fn parse_int(s: &str) -> Option<i128> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i128::from_str_radix(h, 16).ok()?
    } else {
        body.parse::<i128>().ok()?
    };
    Some(if neg { -v } else { v })
}

fn parse_reg(s: &str) -> Option<u8> {
    let r = s.strip_prefix("%r").or_else(|| s.strip_prefix('r'))?;
    let n: u8 = r.parse().ok()?;
    (n <= 10).then_some(n)
}

fn parse_operand(s: &str) -> Result<Operand, String> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        let inner = inner.trim();
        let split = inner.find(['+', '-']);
        let (r, off) = match split {
            Some(p) => (
                &inner[..p],
                parse_int(inner[p..].trim()).ok_or_else(|| format!("bad offset in {s}"))?,
            ),
            None => (inner, 0),
        };
        let reg = parse_reg(r.trim()).ok_or_else(|| format!("bad register in {s}"))?;
        return Ok(Operand::Mem(reg, off as i64));
    }
    if let Some(r) = parse_reg(s) {
        return Ok(Operand::Reg(r));
    }
    if let Some(v) = parse_int(s) {
        return Ok(Operand::Imm(v));
    }
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        return Ok(Operand::Label(s.to_string()));
    }
    Err(format!("bad operand '{s}'"))
}

fn imm32(v: i128) -> Result<i32, String> {
    if (i32::MIN as i128..=u32::MAX as i128).contains(&v) {
        Ok(v as i64 as u32 as i32)
    } else {
        Err(format!("immediate {v} does not fit in 32 bits"))
    }
}

fn off16(v: i128) -> Result<i16, String> {
    if (i16::MIN as i128..=i16::MAX as i128).contains(&v) {
        Ok(v as i16)
    } else {
        Err(format!("offset {v} does not fit in 16 bits"))
    }
}

fn alu_op(name: &str) -> Option<(u8, i16)> {
    Some(match name {
        "add" => (BPF_ADD, 0),
        "sub" => (BPF_SUB, 0),
        "mul" => (BPF_MUL, 0),
        "div" => (BPF_DIV, 0),
        "sdiv" => (BPF_DIV, 1),
        "or" => (BPF_OR, 0),
        "and" => (BPF_AND, 0),
        "lsh" => (BPF_LSH, 0),
        "rsh" => (BPF_RSH, 0),
        "neg" => (BPF_NEG, 0),
        "mod" => (BPF_MOD, 0),
        "smod" => (BPF_MOD, 1),
        "xor" => (BPF_XOR, 0),
        "mov" => (BPF_MOV, 0),
        "arsh" => (BPF_ARSH, 0),
        _ => return None,
    })
}

fn jmp_op(name: &str) -> Option<u8> {
    Some(match name {
        "ja" => BPF_JA,
        "jeq" => BPF_JEQ,
        "jgt" => BPF_JGT,
        "jge" => BPF_JGE,
        "jset" => BPF_JSET,
        "jne" => BPF_JNE,
        "jsgt" => BPF_JSGT,
        "jsge" => BPF_JSGE,
        "jlt" => BPF_JLT,
        "jle" => BPF_JLE,
        "jslt" => BPF_JSLT,
        "jsle" => BPF_JSLE,
        _ => return None,
    })
}

fn size_code(s: &str) -> Option<u8> {
    Some(match s {
        "b" => BPF_B,
        "h" => BPF_H,
        "w" => BPF_W,
        "dw" => BPF_DW,
        _ => return None,
    })
}

struct Line {
    no: usize,
    words: Vec<String>,
    operands: Vec<Operand>,
}

fn split_line(text: &str, no: usize) -> Result<Option<Line>, AsmError> {
    let text = match text.find(['#', ';']) {
        Some(p) => &text[..p],
        None => text,
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    // Mnemonic words are everything before the first operand-looking token.
    let mut words = Vec::new();
    let mut rest = text;
    loop {
        let rest_trim = rest.trim_start();
        let end = rest_trim.find([' ', '\t']).unwrap_or(rest_trim.len());
        let w = &rest_trim[..end];
        let is_word = !w.is_empty()
            && w.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && !w.contains(',')
            && (words.is_empty()
                || matches!(w, "fetch" | "local")
                || (words.len() == 1 && words[0] == "lock")
                || (words.len() == 2 && words[1] == "fetch"));
        if !is_word {
            break;
        }
        words.push(w.to_ascii_lowercase());
        rest = &rest_trim[end..];
        if rest.is_empty() {
            break;
        }
    }
    let rest = rest.trim();
    let operands = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split(',')
            .map(parse_operand)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|msg| AsmError { line: no, msg })?
    };
    Ok(Some(Line {
        no,
        words,
        operands,
    }))
}

/// Assemble source text into instruction slots.
pub fn assemble(src: &str) -> Result<Vec<Insn>, AsmError> {
    let mut lines = Vec::new();
    let mut labels: HashMap<String, usize> = HashMap::new();
    let mut pc = 0usize;
    for (idx, raw) in src.lines().enumerate() {
        let no = idx + 1;
        let t = raw.split(['#', ';']).next().unwrap_or("").trim();
        if let Some(l) = t.strip_suffix(':') {
            if !l.contains(char::is_whitespace) && !l.is_empty() {
                labels.insert(l.to_string(), pc);
                continue;
            }
        }
        if let Some(line) = split_line(raw, no)? {
            pc += if matches!(
                line.words.first().map(String::as_str),
                Some("lddw" | "ldmap" | "ldmapval")
            ) {
                2
            } else {
                1
            };
            lines.push(line);
        }
    }
    let total = pc;
    let mut out = Vec::with_capacity(total);
    for line in &lines {
        let here = out.len();
        let insns = encode_line(line, here, total, &labels)
            .map_err(|msg| AsmError { line: line.no, msg })?;
        out.extend(insns);
    }
    Ok(out)
}

fn target(
    op: &Operand,
    here: usize,
    total: usize,
    labels: &HashMap<String, usize>,
) -> Result<i64, String> {
    match op {
        Operand::Imm(v) => Ok(*v as i64),
        Operand::Label(l) => {
            let t = match labels.get(l) {
                Some(t) => *t,
                None if l == "exit" && total > 0 => total - 1,
                None => return Err(format!("unknown label '{l}'")),
            };
            Ok(t as i64 - here as i64 - 1)
        }
        _ => Err("bad jump target".into()),
    }
}

fn encode_line(
    line: &Line,
    here: usize,
    total: usize,
    labels: &HashMap<String, usize>,
) -> Result<Vec<Insn>, String> {
    let w: Vec<&str> = line.words.iter().map(String::as_str).collect();
    let ops = &line.operands;
    let one = |i: Insn| Ok(vec![i]);
    let m = *w.first().ok_or("missing mnemonic")?;
    let nops = |n: usize| -> Result<(), String> {
        if ops.len() == n {
            Ok(())
        } else {
            Err(format!("'{m}' expects {n} operands, got {}", ops.len()))
        }
    };
    let reg = |k: usize| -> Result<u8, String> {
        match ops.get(k) {
            Some(Operand::Reg(r)) => Ok(*r),
            _ => Err(format!("operand {} of '{m}' must be a register", k + 1)),
        }
    };
    if m == "lock" {
        let (fetch, name) = match w.as_slice() {
            ["lock", "fetch", n] => (true, *n),
            ["lock", n] => (false, *n),
            _ => return Err("bad atomic syntax".into()),
        };
        let (base, size) = match name.strip_suffix("32") {
            Some(b) => (b, BPF_W),
            None => (name.strip_suffix("64").unwrap_or(name), BPF_DW),
        };
        let imm = match base {
            "add" => 0x00,
            "or" => 0x40,
            "and" => 0x50,
            "xor" => 0xa0,
            "xchg" => BPF_XCHG,
            "cmpxchg" => BPF_CMPXCHG,
            _ => return Err(format!("unknown atomic '{name}'")),
        } | if fetch { BPF_FETCH } else { 0 };
        nops(2)?;
        let (d, off) = match &ops[0] {
            Operand::Mem(r, o) => (*r, off16(*o as i128)?),
            _ => return Err("atomic needs a memory operand".into()),
        };
        let s = reg(1)?;
        return one(Insn::new(BPF_STX | BPF_ATOMIC | size, d, s, off, imm));
    }
    if w.len() > 1 && !(m == "call" && w.len() == 2 && w[1] == "local") {
        return Err(format!("unknown mnemonic '{}'", w.join(" ")));
    }
    match m {
        "exit" => {
            nops(0)?;
            return one(Insn::new(EXIT, 0, 0, 0, 0));
        }
        "call" => {
            if w.len() == 2 {
                nops(1)?;
                let t = target(&ops[0], here, total, labels)?;
                return one(Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, imm32(t as i128)?));
            }
            nops(1)?;
            return match &ops[0] {
                Operand::Reg(r) => one(Insn::new(BPF_JMP | BPF_CALL | BPF_X, *r, 0, 0, 0)),
                Operand::Imm(v) => one(Insn::new(CALL, 0, 0, 0, imm32(*v)?)),
                Operand::Label(_) => {
                    let t = target(&ops[0], here, total, labels)?;
                    one(Insn::new(CALL, 0, BPF_PSEUDO_CALL, 0, imm32(t as i128)?))
                }
                _ => Err("bad call operand".into()),
            };
        }
        "lddw" => {
            nops(2)?;
            let d = reg(0)?;
            let v = match &ops[1] {
                Operand::Imm(v) if (i64::MIN as i128..=u64::MAX as i128).contains(v) => {
                    *v as i64 as u64
                }
                Operand::Label(_) => {
                    // `lddw %rX, func`: the address of a subprogram (BPF_PSEUDO_FUNC).
                    let t = target(&ops[1], here, total, labels)?;
                    return Ok(vec![
                        Insn::new(LDDW, d, BPF_PSEUDO_FUNC, 0, imm32(t as i128)?),
                        Insn::new(0, 0, 0, 0, 0),
                    ]);
                }
                _ => return Err("lddw needs a 64-bit immediate or a label".into()),
            };
            return Ok(vec![
                Insn::new(LDDW, d, 0, 0, v as u32 as i32),
                Insn::new(0, 0, 0, 0, (v >> 32) as u32 as i32),
            ]);
        }
        // `ldmap %rX, IDX`: map IDX (BPF_PSEUDO_MAP_IDX); `ldmapval %rX, IDX, OFF`: address
        // of byte OFF of map IDX's value (BPF_PSEUDO_MAP_IDX_VALUE), as the object loader emits.
        "ldmap" | "ldmapval" => {
            let val = m == "ldmapval";
            nops(if val { 3 } else { 2 })?;
            let d = reg(0)?;
            let imm = |i: usize| match &ops[i] {
                Operand::Imm(v) => imm32(*v),
                _ => Err(format!("{m} needs immediates")),
            };
            let (src, off) = if val {
                (BPF_PSEUDO_MAP_IDX_VALUE, imm(2)?)
            } else {
                (BPF_PSEUDO_MAP_IDX, 0)
            };
            return Ok(vec![
                Insn::new(LDDW, d, src, 0, imm(1)?),
                Insn::new(0, 0, 0, 0, off),
            ]);
        }
        _ => {}
    }
    // Byte swaps.
    for (pfx, class, x) in [
        ("le", BPF_ALU, BPF_K),
        ("be", BPF_ALU, BPF_X),
        ("bswap", BPF_ALU64, BPF_K),
        ("swap", BPF_ALU64, BPF_K),
    ] {
        if let Some(width) = m.strip_prefix(pfx) {
            if let Ok(wd @ (16 | 32 | 64)) = width.parse::<i32>() {
                nops(1)?;
                return one(Insn::new(class | BPF_END | x, reg(0)?, 0, 0, wd));
            }
        }
    }
    // movsx<from><to>
    if let Some(rest) = m.strip_prefix("movsx") {
        let (from, class) = match rest {
            "832" => (8, BPF_ALU),
            "1632" => (16, BPF_ALU),
            "864" => (8, BPF_ALU64),
            "1664" => (16, BPF_ALU64),
            "3264" => (32, BPF_ALU64),
            _ => return Err(format!("unknown mnemonic '{m}'")),
        };
        nops(2)?;
        return one(Insn::new(
            class | BPF_MOV | BPF_X,
            reg(0)?,
            reg(1)?,
            from,
            0,
        ));
    }
    // Loads and stores.
    if let Some(rest) = m.strip_prefix("ldx") {
        let (sx, sz) = match rest.strip_prefix('s') {
            Some(s) => (true, s),
            None => (false, rest),
        };
        if let Some(size) = size_code(sz) {
            nops(2)?;
            let d = reg(0)?;
            let (s, off) = match &ops[1] {
                Operand::Mem(r, o) => (*r, off16(*o as i128)?),
                _ => return Err("load needs a memory operand".into()),
            };
            let mode = if sx { BPF_MEMSX } else { BPF_MEM };
            return one(Insn::new(BPF_LDX | mode | size, d, s, off, 0));
        }
    }
    if let Some(rest) = m.strip_prefix("stx") {
        if let Some(size) = size_code(rest) {
            nops(2)?;
            let (d, off) = match &ops[0] {
                Operand::Mem(r, o) => (*r, off16(*o as i128)?),
                _ => return Err("store needs a memory operand".into()),
            };
            return one(Insn::new(BPF_STX | BPF_MEM | size, d, reg(1)?, off, 0));
        }
    }
    if let Some(rest) = m.strip_prefix("st") {
        if let Some(size) = size_code(rest) {
            nops(2)?;
            let (d, off) = match &ops[0] {
                Operand::Mem(r, o) => (*r, off16(*o as i128)?),
                _ => return Err("store needs a memory operand".into()),
            };
            let imm = match &ops[1] {
                Operand::Imm(v) => imm32(*v)?,
                _ => return Err("st needs an immediate".into()),
            };
            return one(Insn::new(BPF_ST | BPF_MEM | size, d, 0, off, imm));
        }
    }
    // Jumps.
    let (base, is32) = match m.strip_suffix("32") {
        Some(b) => (b, true),
        None => (m.strip_suffix("64").unwrap_or(m), false),
    };
    if let Some(op) = jmp_op(base) {
        let class = if is32 { BPF_JMP32 } else { BPF_JMP };
        if op == BPF_JA {
            nops(1)?;
            let t = target(&ops[0], here, total, labels)?;
            return if is32 {
                one(Insn::new(BPF_JMP32 | BPF_JA, 0, 0, 0, imm32(t as i128)?))
            } else {
                one(Insn::new(BPF_JMP | BPF_JA, 0, 0, off16(t as i128)?, 0))
            };
        }
        nops(3)?;
        let d = reg(0)?;
        let t = off16(target(&ops[2], here, total, labels)? as i128)?;
        return match &ops[1] {
            Operand::Reg(s) => one(Insn::new(class | op | BPF_X, d, *s, t, 0)),
            Operand::Imm(v) => one(Insn::new(class | op | BPF_K, d, 0, t, imm32(*v)?)),
            _ => Err("bad jump comparand".into()),
        };
    }
    if let Some((op, off)) = alu_op(base) {
        let class = if is32 { BPF_ALU } else { BPF_ALU64 };
        let d = reg(0)?;
        if op == BPF_NEG {
            nops(1)?;
            return one(Insn::new(class | op, d, 0, 0, 0));
        }
        nops(2)?;
        return match &ops[1] {
            Operand::Reg(s) => one(Insn::new(class | op | BPF_X, d, *s, off, 0)),
            Operand::Imm(v) => one(Insn::new(class | op | BPF_K, d, 0, off, imm32(*v)?)),
            _ => Err("bad ALU operand".into()),
        };
    }
    Err(format!("unknown mnemonic '{m}'"))
}
