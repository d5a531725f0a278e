//! `bpftime-rs`: the command line of the userspace eBPF runtime and its kernel bridge.

mod cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bpftime-rs",
    version,
    about = "Userspace eBPF runtime with a kernel bridge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a BPF object: verify, create shared maps, publish programs, sync, print events.
    Load(cmd::load::LoadArgs),
    /// Run one program once on a context read from a file and print r0.
    Run(cmd::run::RunArgs),
    /// Run a command with the agent preloaded: hooks are in place before its `main` runs.
    Start(cmd::attach::StartArgs),
    /// Inject the agent into a running process (ptrace + dlopen) and hook the loaded programs.
    Attach(cmd::attach::AttachArgs),
    /// Remove every hook from a process (or from every process with the agent).
    Detach(cmd::attach::DetachArgs),
    /// Remove an object's shared memory and kernel pins (or, without OBJ, those of dead loaders).
    Unload(cmd::unload::UnloadArgs),
    /// The kernel bridge (user ringbuf -> kernel mirror maps -> confirmations).
    Bridge {
        #[command(subcommand)]
        command: BridgeCommand,
    },
    /// Every map bpftime-rs knows, one row per map.
    Maps(cmd::maps::MapsArgs),
}

#[derive(Subcommand)]
enum BridgeCommand {
    /// Create mirrors of several shapes, send N updates/deletes, wait, compare with the kernel.
    Selftest(cmd::bridge::SelftestArgs),
}

fn main() {
    // Behave like other command-line tools when piped into `head`: die quietly on EPIPE.
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BPFTIME_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(error) = run(Cli::parse()) {
        eprintln!("bpftime-rs: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Load(args) => cmd::load::run(&args),
        Command::Run(args) => cmd::run::run(&args),
        Command::Unload(args) => cmd::unload::run(&args),
        Command::Start(args) => cmd::attach::start(&args),
        Command::Attach(args) => cmd::attach::attach(&args),
        Command::Detach(args) => cmd::attach::detach(&args),
        Command::Bridge {
            command: BridgeCommand::Selftest(args),
        } => cmd::bridge::selftest(&args),
        Command::Maps(args) => cmd::maps::run(&args),
    }
}
