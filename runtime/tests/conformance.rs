//! Runs every bpf_conformance `.data` file on the interpreter, the JIT and (where it accepts the
//! program) rbpf 0.4, comparing r0 with `-- result`.

use std::path::PathBuf;

use bpftime_runtime::vm::rbpf::{rbpf_check, run_rbpf, RbpfMode};
use bpftime_runtime::vm::{
    self, asm, insn, CallContext, HelperError, HelperTable, InterpOptions, MemoryMap, Program,
};

/// Tests expected to fail on the interpreter, with the reason.
const KNOWN_INTERP: &[(&str, &str)] = &[];
/// Tests expected to fail on the JIT, with the reason.
const KNOWN_JIT: &[(&str, &str)] = &[];
/// Tests where rbpf accepts the program but is known to compute a different result.
const KNOWN_RBPF: &[(&str, &str)] = &[("mem-len", "rbpf never passes the memory length in r2")];

struct Case {
    name: String,
    asm: String,
    mem: Vec<u8>,
    raw: Option<Vec<u64>>,
    result: Option<u64>,
    error: Option<String>,
}

fn conformance_dir() -> PathBuf {
    match std::env::var_os("BPF_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/bpf_conformance/tests"
        )),
    }
}

fn parse_case(name: &str, text: &str) -> Case {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("-- ") {
            sections.push((h.trim().to_string(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    let get = |k: &str| {
        sections
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, b)| b.clone())
    };
    let strip = |s: String| {
        s.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mem = get("mem")
        .map(|m| {
            strip(m)
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("mem byte"))
                .collect()
        })
        .unwrap_or_default();
    let parse_hex = |s: &str| {
        let s = s.trim();
        u64::from_str_radix(s.trim_start_matches("0x").trim_start_matches("0X"), 16)
            .unwrap_or_else(|_| panic!("{name}: bad hex {s}"))
    };
    let result = get("result").map(|r| {
        let r = strip(r);
        parse_hex(r.trim())
    });
    let raw = get("raw").map(|r| strip(r).split_whitespace().map(parse_hex).collect());
    let error = get("error").map(|e| strip(e).trim().to_string());
    Case {
        name: name.to_string(),
        asm: get("asm").unwrap_or_default(),
        mem,
        raw,
        result,
        error,
    }
}

fn load_cases() -> Vec<Case> {
    let dir = conformance_dir();
    let rd = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "conformance directory {} missing ({e}); set BPF_CONFORMANCE_DIR",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .data files in {}", dir.display());
    files
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            let text = std::fs::read_to_string(p).unwrap();
            parse_case(&name, &text)
        })
        .collect()
}

/// The helpers the conformance suite's programs call (ubpf's numbering).
fn conformance_helpers<'e>() -> HelperTable<'e> {
    let mut h = HelperTable::new();
    // 5: "unwind" in ubpf's test plugin; returns its argument.
    h.register(5, |a: [u64; 5], _c: &mut CallContext<'_, '_>| {
        Ok::<u64, HelperError>(a[0])
    });
    h
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Engine {
    Interp,
    Jit,
}

fn run_case(case: &Case, engine: Engine) -> Result<u64, String> {
    let insns = asm::assemble(&case.asm).map_err(|e| format!("assemble: {e}"))?;
    let prog = Program::new(insns).map_err(|e| format!("load: {e}"))?;
    let mut mem = case.mem.clone();
    let (ptr, len) = if mem.is_empty() {
        (0, 0)
    } else {
        (mem.as_mut_ptr() as u64, mem.len() as u64)
    };
    let mut helpers = conformance_helpers();
    let mut map = MemoryMap::new();
    if !mem.is_empty() {
        map.add_mut_slice(&mut mem);
    }
    let args = [ptr, len, 0, 0, 0];
    let r = match engine {
        Engine::Interp => vm::interpret(
            &prog,
            args,
            &mut map,
            &mut helpers,
            InterpOptions {
                insn_budget: Some(1_000_000),
            },
        ),
        Engine::Jit => {
            let jit = prog.jit().map_err(|e| format!("jit compile: {e}"))?;
            // SAFETY: conformance programs only touch their `-- mem` buffer (registered above and
            // alive for the call) and their stack; the interpreter run checks this independently.
            unsafe { jit.run(args, &mut map, &mut helpers) }
        }
    };
    r.map_err(|e| e.to_string())
}

fn check(case: &Case, r: Result<u64, String>) -> Result<(), String> {
    match (&case.result, &case.error, r) {
        (Some(want), _, Ok(got)) if *want == got => Ok(()),
        (Some(want), _, Ok(got)) => Err(format!("r0 = {got:#x}, expected {want:#x}")),
        (Some(want), _, Err(e)) => Err(format!("error '{e}', expected r0 = {want:#x}")),
        (None, Some(_), Err(_)) => Ok(()),
        (None, Some(want), Ok(got)) => Err(format!("r0 = {got:#x}, expected error '{want}'")),
        (None, None, _) => Err("test has neither result nor error".into()),
    }
}

/// The suite this README's table counts: every file of the conformance directory.
const SUITE_FILES: usize = 313;

/// The cases, checked to be the whole suite when it is the default one (a smaller directory
/// would make every count below meaningless).
fn suite() -> Vec<Case> {
    let cases = load_cases();
    if std::env::var_os("BPF_CONFORMANCE_DIR").is_none() {
        assert_eq!(
            cases.len(),
            SUITE_FILES,
            "files in {}",
            conformance_dir().display()
        );
    }
    cases
}

fn run_engine(cases: &[Case], engine: Engine, known: &[(&str, &str)]) -> (usize, Vec<String>) {
    let label = match engine {
        Engine::Interp => "interpreter",
        Engine::Jit => "jit",
    };
    let mut passed = 0;
    let mut unexpected = Vec::new();
    for c in cases {
        match check(c, run_case(c, engine)) {
            Ok(()) => {
                passed += 1;
                if known.iter().any(|(n, _)| *n == c.name) {
                    println!(
                        "[{label}] {}: passes but is listed as known failure",
                        c.name
                    );
                }
            }
            Err(why) => match known.iter().find(|(n, _)| *n == c.name) {
                Some((_, reason)) => {
                    println!("[{label}] {} fails (known: {reason}): {why}", c.name)
                }
                None => {
                    println!("[{label}] {} FAILED: {why}", c.name);
                    unexpected.push(format!("{label}/{}: {why}", c.name));
                }
            },
        }
    }
    println!("conformance {label}: {passed}/{} passed", cases.len());
    (passed, unexpected)
}

fn run_rbpf_case(case: &Case, mode: RbpfMode) -> Result<Result<u64, String>, String> {
    let insns = asm::assemble(&case.asm).map_err(|e| format!("assemble: {e}"))?;
    let prog = Program::new(insns).map_err(|e| format!("load: {e}"))?;
    if let Err(e) = rbpf_check(&prog, mode) {
        return Err(e.to_string());
    }
    let mut data = case.mem.clone();
    let mut helpers = conformance_helpers();
    let mut map = MemoryMap::new();
    // SAFETY: the programs rbpf accepts only touch `data` (alive for the call) and the stack.
    let r = unsafe { run_rbpf(&prog, &mut data, &mut map, &mut helpers, mode) };
    Ok(r.map_err(|e| e.to_string()))
}

/// rbpf's outcome over the suite: passed, refused by our gate, and the names of the programs
/// it ran and got wrong.
struct RbpfCounts {
    passed: usize,
    refused: usize,
    wrong: Vec<String>,
    unexpected: Vec<String>,
}

fn run_rbpf_engine(cases: &[Case], mode: RbpfMode) -> RbpfCounts {
    let label = match mode {
        RbpfMode::Jit => "rbpf",
        RbpfMode::Interpreter => "rbpf-interpreter",
    };
    let (mut passed, mut refused) = (0, 0);
    let (mut wrong, mut unexpected) = (Vec::new(), Vec::new());
    for c in cases {
        match run_rbpf_case(c, mode) {
            Err(why) => {
                refused += 1;
                println!("[{label}] {} refused: {why}", c.name);
            }
            Ok(r) => match check(c, r) {
                Ok(()) => passed += 1,
                Err(why) => match KNOWN_RBPF.iter().find(|(n, _)| *n == c.name) {
                    Some((_, reason)) => {
                        println!("[{label}] {} fails (known: {reason}): {why}", c.name);
                        wrong.push(c.name.clone());
                    }
                    None => {
                        println!("[{label}] {} FAILED: {why}", c.name);
                        wrong.push(c.name.clone());
                        unexpected.push(format!("{label}/{}: {why}", c.name));
                    }
                },
            },
        }
    }
    println!(
        "conformance {label}: {passed}/{} passed, {refused} refused, {} failed",
        cases.len(),
        wrong.len()
    );
    RbpfCounts {
        passed,
        refused,
        wrong,
        unexpected,
    }
}

/// The README's rbpf rows: JIT 208 passed / 104 refused / 1 wrong, interpreter 192 / 120 / 1
/// (`mem-len`). A gate that refused more (or less), or an rbpf that computed more wrong
/// results, changes these counts.
#[test]
fn conformance_rbpf() {
    let cases = suite();
    let jit = run_rbpf_engine(&cases, RbpfMode::Jit);
    let interp = run_rbpf_engine(&cases, RbpfMode::Interpreter);
    let mut bad = jit.unexpected.clone();
    bad.extend(interp.unexpected.iter().cloned());
    assert!(bad.is_empty(), "unexpected failures:\n{}", bad.join("\n"));
    if std::env::var_os("BPF_CONFORMANCE_DIR").is_none() {
        assert_eq!((jit.passed, jit.refused), (208, 104), "rbpf JIT");
        assert_eq!(
            (interp.passed, interp.refused),
            (192, 120),
            "rbpf interpreter"
        );
        assert_eq!(jit.wrong, ["mem-len"]);
        assert_eq!(interp.wrong, ["mem-len"]);
    }
}

/// Our assembler against an independent one (rbpf's, which shares no code or opcode table
/// with ours), on every program it can assemble: an opcode both our assembler and VMs got
/// wrong the same way would pass every run above and fail here.
#[test]
fn assembler_agrees_with_rbpfs_assembler() {
    let cases = suite();
    let (mut compared, mut mismatched) = (0, Vec::new());
    for c in &cases {
        // rbpf's syntax: registers without `%`, no comments.
        let text: String = c
            .asm
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").replace('%', ""))
            .filter(|l| !l.trim().is_empty())
            .map(|l| l + "\n")
            .collect();
        let Ok(theirs) = rbpf::assembler::assemble(&text) else {
            continue;
        };
        compared += 1;
        let ours = insn::encode_insns(&asm::assemble(&c.asm).unwrap());
        if ours != theirs {
            let first = ours
                .chunks(8)
                .zip(theirs.chunks(8))
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(theirs.len()) / 8);
            mismatched.push(format!(
                "{}: instruction {first}: ours {:02x?}, rbpf {:02x?}",
                c.name,
                ours.chunks(8).nth(first),
                theirs.chunks(8).nth(first)
            ));
        }
    }
    println!("assembler: {compared} programs compared with rbpf's assembler");
    assert!(mismatched.is_empty(), "{}", mismatched.join("\n"));
    // rbpf's assembler knows ISA v1 (no JMP32, atomics, signed or v4 forms): 116 of the 313
    // programs on this suite; far fewer means the comparison stopped working.
    assert!(compared >= 100, "only {compared} programs compared");
}

#[test]
fn assembler_matches_raw_sections() {
    for c in suite() {
        if let Some(raw) = &c.raw {
            let insns = asm::assemble(&c.asm).unwrap();
            let bytes = insn::encode_insns(&insns);
            let words: Vec<u64> = bytes
                .chunks_exact(8)
                .map(|ch| u64::from_be_bytes(ch.try_into().unwrap()))
                .collect();
            let words_le: Vec<u64> = bytes
                .chunks_exact(8)
                .map(|ch| u64::from_le_bytes(ch.try_into().unwrap()))
                .collect();
            assert!(
                &words == raw || &words_le == raw,
                "{}: assembled {words_le:x?}, raw {raw:x?}",
                c.name
            );
        }
    }
}

#[test]
fn conformance_interpreter() {
    let cases = suite();
    let (passed, bad) = run_engine(&cases, Engine::Interp, KNOWN_INTERP);
    assert!(bad.is_empty(), "unexpected failures:\n{}", bad.join("\n"));
    assert_eq!(passed, cases.len() - KNOWN_INTERP.len());
}

#[test]
fn conformance_jit() {
    let cases = suite();
    let (passed, bad) = run_engine(&cases, Engine::Jit, KNOWN_JIT);
    assert!(bad.is_empty(), "unexpected failures:\n{}", bad.join("\n"));
    assert_eq!(passed, cases.len() - KNOWN_JIT.len());
}
