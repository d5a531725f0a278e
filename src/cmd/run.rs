//! `bpftime-rs run OBJ --program NAME --ctx FILE`: one program, once, on a context from a file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject, VmChoice};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The clang-compiled BPF object.
    object: PathBuf,
    /// The program (function name) to run.
    #[arg(long)]
    program: String,
    /// File whose bytes are the program's context (e.g. a struct pt_regs); zero-padded to what
    /// the program type may read.
    #[arg(long)]
    ctx: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
}

/// The VM flags `load` and `run` share.
#[derive(clap::Args, Clone, Copy)]
pub struct VmArgs {
    /// Which VM runs the programs: ours (interpreter + x86_64 JIT) or rbpf 0.4.
    #[arg(long, default_value = "ours")]
    vm: VmChoice,
    /// Run the interpreter of the selected VM instead of its JIT.
    #[arg(long)]
    no_jit: bool,
    /// Skip the kernel verifier (programs then run on the checked interpreter).
    #[arg(long)]
    no_verify: bool,
}

impl VmArgs {
    pub fn options(&self) -> LoadOptions {
        if self.no_verify {
            eprintln!("warning: --no-verify: programs run unverified, on the checked interpreter");
        }
        LoadOptions {
            verify: !self.no_verify,
            vm: self.vm,
            no_jit: self.no_jit,
            publish: true,
        }
    }
}

pub fn run(args: &RunArgs) -> Result<()> {
    // A private segment: `run` must not disturb an object that `load` is serving.
    let segment = format!(
        "run-{}-{}",
        std::process::id(),
        args.object
            .file_stem()
            .map(|s| s.to_string_lossy().replace('.', "_"))
            .unwrap_or_default()
    );
    let options = LoadOptions {
        publish: false,
        ..args.vm.options()
    };
    let loaded = LoadedObject::load(&args.object, Some(&segment), options)
        .with_context(|| format!("loading {}", args.object.display()));
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            let _ = bpftime_runtime::maps::remove_object(&segment);
            return Err(e);
        }
    };
    let result = run_loaded(&loaded, args);
    let _ = loaded.shm.remove();
    result
}

fn run_loaded(loaded: &LoadedObject, args: &RunArgs) -> Result<()> {
    let program = loaded.program(&args.program)?;
    let mut ctx = match &args.ctx {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => Vec::new(),
    };
    let size = program.context_size();
    if ctx.len() > size {
        anyhow::bail!(
            "{}: the context is {} bytes, program {} ({}) reads at most {size}",
            args.ctx
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ctx.len(),
            program.name,
            program.section
        );
    }
    ctx.resize(size, 0);
    let mut helpers = loaded.helpers()?;
    let r0 = program
        .run(&mut helpers, &mut ctx)
        .with_context(|| format!("program {} ({})", program.name, program.section))?;
    println!("r0 = {r0}");
    Ok(())
}
