//! Debugging aid: assembles a program and writes the JIT's machine code to a file, to read with
//! `objdump -D -b binary -mi386:x86-64 FILE`.
//! `cargo run -p bpftime-runtime --example dump_jit -- 'mov %r0, 1\nexit' /tmp/jit.bin`

use bpftime_runtime::vm::{asm::assemble, Program};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(src), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: dump_jit 'ASSEMBLY (\\n between instructions)' OUTPUT_FILE".into());
    };
    let program = Program::new(assemble(&src.replace("\\n", "\n"))?)?;
    let image = program.jit()?;
    std::fs::write(&out, image.code())?;
    println!(
        "{} bytes of machine code written to {out}",
        image.code().len()
    );
    Ok(())
}
