//! `bpftime-rs start -- CMD`, `attach PID`, `detach [PID]`: getting the agent
//! (`libbpftime_agent.so`) into target processes, where it hooks the uprobe programs that
//! `bpftime-rs load` published.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bpftime_attach::inject::{detach_agent, inject_agent, InjectOptions};
use bpftime_runtime::maps::list_segments;

const AGENT_FILE: &str = "libbpftime_agent.so";

#[derive(clap::Args)]
pub struct StartArgs {
    /// Attach only the programs of these loaded objects (default: every loaded object).
    #[arg(long = "object", value_name = "OBJECT")]
    objects: Vec<String>,
    /// The command to run with the agent preloaded.
    #[arg(trailing_var_arg = true, required = true, value_name = "CMD [ARGS..]")]
    command: Vec<String>,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    /// The running process to attach to.
    pid: i32,
    /// Attach only the programs of these loaded objects (default: every loaded object).
    #[arg(long = "object", value_name = "OBJECT")]
    objects: Vec<String>,
}

#[derive(clap::Args)]
pub struct DetachArgs {
    /// The process to detach from (default: every process with the agent loaded).
    pid: Option<i32>,
}

/// The agent library: `BPFTIME_AGENT`, or next to this executable (cargo builds both into the
/// same target directory).
fn agent_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BPFTIME_AGENT") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating bpftime-rs")?;
    let dir = exe.parent().context("bpftime-rs has no directory")?;
    // `cargo build` puts it beside the binary; as a test dependency it stays in `deps/`. Take
    // the newer, so a stale copy from an older build is never preloaded.
    let newest = [dir.join(AGENT_FILE), dir.join("deps").join(AGENT_FILE)]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max_by_key(|(modified, _)| *modified);
    if let Some((_, path)) = newest {
        return Ok(path.canonicalize()?);
    }
    bail!(
        "{AGENT_FILE} not found next to {} (build it with `cargo build -p bpftime-agent`, or set \
         BPFTIME_AGENT)",
        exe.display()
    )
}

/// Writes the agent's config: one `object NAME` line per object to attach.
fn write_config(objects: &[String], tag: &str) -> Result<PathBuf> {
    let objects: Vec<String> = if objects.is_empty() {
        list_segments()
            .context("listing loaded objects")?
            .into_iter()
            .filter(|s| s.creator_alive && s.unreadable.is_none() && !s.object.starts_with("run-"))
            .map(|s| s.object)
            .collect()
    } else {
        objects.to_vec()
    };
    if objects.is_empty() {
        bail!("no object is loaded: run `bpftime-rs load OBJ` first");
    }
    let dir = Path::new("/tmp/bpftime-rs");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join(format!("agent-{tag}.conf"));
    let text: String = objects.iter().map(|o| format!("object {o}\n")).collect();
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let _ = std::fs::remove_file(status_path(&config));
    Ok(config)
}

fn status_path(config: &Path) -> PathBuf {
    let mut s = config.as_os_str().to_owned();
    s.push(".status");
    PathBuf::from(s)
}

/// Prints the agent's per-program status; returns how many programs failed to attach.
fn report_status(config: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(status_path(config)) else {
        return 0;
    };
    let mut failed = 0;
    for line in text.lines() {
        if line.starts_with("error") {
            failed += 1;
        }
        eprintln!("bpftime-rs: agent: {line}");
    }
    failed
}

pub fn start(args: &StartArgs) -> Result<()> {
    let agent = agent_path()?;
    let config = write_config(&args.objects, &format!("start-{}", std::process::id()))?;
    let (program, rest) = args.command.split_first().context("no command")?;
    let mut preload = agent.as_os_str().to_owned();
    if let Some(existing) = std::env::var_os("LD_PRELOAD") {
        preload.push(":");
        preload.push(existing);
    }
    let mut child = std::process::Command::new(program)
        .args(rest)
        .env("LD_PRELOAD", preload)
        .env("BPFTIME_AGENT_CONFIG", &config)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    // The agent installs its hooks before `main`; its status file says how it went.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !status_path(&config).exists() && Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if std::env::var_os("BPFTIME_QUIET").is_none() {
        report_status(&config);
    }
    let status = child.wait()?;
    std::process::exit(status.code().unwrap_or(128 + 9));
}

pub fn attach(args: &AttachArgs) -> Result<()> {
    let agent = agent_path()?;
    let config = write_config(&args.objects, &format!("pid-{}", args.pid))?;
    let report = inject_agent(args.pid, &agent, Some(&config), &InjectOptions::default())
        .with_context(|| format!("injecting the agent into pid {}", args.pid))?;
    if report.start_result != Some(0) {
        bail!(
            "the agent in pid {} did not start (bpftime_agent_start returned {:?})",
            args.pid,
            report.start_result
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status_path(&config).exists() {
        if Instant::now() > deadline {
            bail!("the agent in pid {} did not report within 10 s", args.pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let failed = report_status(&config);
    println!(
        "attached to pid {} in {:.1?}{}",
        args.pid,
        report.elapsed,
        if failed > 0 {
            format!(" ({failed} program(s) not attached, see above)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Pids whose memory maps show the agent library.
fn pids_with_agent() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .is_ok_and(|maps| maps.contains(AGENT_FILE))
        })
        .collect()
}

pub fn detach(args: &DetachArgs) -> Result<()> {
    let pids = match args.pid {
        Some(pid) => vec![pid],
        None => pids_with_agent(),
    };
    if pids.is_empty() {
        println!("no process has the agent loaded");
    }
    for pid in pids {
        match detach_agent(pid, &InjectOptions::default()) {
            Ok(0) => println!("detached from pid {pid}"),
            Ok(r) => bail!("the agent in pid {pid} could not remove every hook (returned {r})"),
            Err(e) => return Err(e).with_context(|| format!("detaching from pid {pid}")),
        }
    }
    Ok(())
}
