//! Run logic shared by the tests that run `uprobe_tool` (or, with [`run_tool`], one of its Rust
//! ports) against `victim`: under kernel uprobes (`tests/kernel.rs`, `tests/rust_tools.rs`)
//! and, with wrapper commands, under bpftime-rs (for instance a tool prefix
//! `["bpftime-rs", "load", "--"]` and a victim prefix `["bpftime-rs", "start", "--"]`). Both
//! compare [`normalise`]d tool output with [`expected_output`].

// Each test binary that includes this module uses a different part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use bpftime_example_libbpf_apps::{tool_path, victim_path};

/// The victim's call count and the tools' `-m` in the tests.
pub const CALLS: u64 = 10;
pub const MIN_ARG: u64 = 3;

/// The tool's arguments: the victim binary, `-m MIN_ARG`, then `extra`.
pub fn tool_args(extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-b".to_string(),
        victim_path().display().to_string(),
        "-m".into(),
        MIN_ARG.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A live process that is not the victim, for pid filters; killed when dropped.
pub struct Bystander(pub Child);

impl Bystander {
    /// `sleep 60`.
    pub fn start() -> Self {
        Self(
            Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("spawning sleep"),
        )
    }

    /// Its pid, as a tool argument.
    pub fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How long the tool may take to load and print `attached`.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the victim, and then the tool, may each run after that.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// A tool started with `-p -1` sees every process that runs the victim binary, so runs in one
/// test binary must not overlap.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// What one run of the tool against the victim produced.
#[derive(Debug)]
pub struct Run {
    /// The tool's whole stdout, `attached` line included.
    pub stdout: String,
    /// The tool's stderr.
    pub stderr: String,
    /// The tool's exit status.
    pub status: ExitStatus,
    /// The pid of the victim command (of its prefix's process when it has one).
    pub victim_pid: u32,
    /// The victim command's stdout (`done SUM`).
    pub victim_stdout: String,
    /// The victim command's exit status.
    pub victim_status: ExitStatus,
    /// Whether the tool was still running when the victim exited: its probes were attached for
    /// all of the victim's calls.
    pub tool_outlived_victim: bool,
}

/// Kills and reaps its child when dropped before [`Reaped::wait_for`] reaped it.
struct Reaped(Option<Child>);

impl Reaped {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already reaped")
    }

    /// Waits at most `timeout` for the child; kills it on timeout.
    fn wait_for(&mut self, what: &str, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child().try_wait() {
                Ok(Some(status)) => {
                    self.0 = None;
                    return Ok(status);
                }
                Ok(None) if Instant::now() >= deadline => {
                    self.kill();
                    return Err(format!("{what} did not exit within {timeout:?}; killed it"));
                }
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("waiting for {what}: {e}")),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills the tool (a no-op when it was reaped) and returns what it wrote on stderr.
fn kill_and_read_stderr(tool: &mut Reaped, reader: thread::JoinHandle<String>) -> String {
    tool.kill();
    reader.join().unwrap_or_default()
}

/// `prefix... program args...` as a command.
pub fn command(prefix: &[&str], program: &Path, args: &[String]) -> Command {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.args(args);
    cmd
}

/// [`run_tool`] with `uprobe_tool` (the C libbpf application) as the tool.
pub fn run(
    tool_prefix: &[&str],
    tool_args: &[String],
    victim_prefix: &[&str],
    victim_args: &[String],
) -> Result<Run, String> {
    run_tool(
        &tool_path(),
        tool_prefix,
        tool_args,
        victim_prefix,
        victim_args,
    )
}

/// Runs `tool_prefix... TOOL tool_args...` (`uprobe_tool` or one of its Rust ports: they take
/// the same options and print the same lines), waits for its `attached` line, then runs
/// `victim_prefix... victim victim_args...`, starts it with a line on its stdin, and waits for
/// the victim and then for the tool to exit (each bounded; killed on timeout). An error says
/// what went wrong, with the tool's output so far.
pub fn run_tool(
    tool: &Path,
    tool_prefix: &[&str],
    tool_args: &[String],
    victim_prefix: &[&str],
    victim_args: &[String],
) -> Result<Run, String> {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut tool_cmd = command(tool_prefix, tool, tool_args);
    let mut tool = Reaped(Some(
        tool_cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {tool_cmd:?}: {e}"))?,
    ));

    let stdout = tool.child().stdout.take().expect("piped stdout");
    let (lines_tx, lines) = mpsc::channel();
    let stdout_reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = tool.child().stderr.take().expect("piped stderr");
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut seen = Vec::new();

    // 1. The tool attaches.
    let attach_deadline = Instant::now() + ATTACH_TIMEOUT;
    loop {
        let left = attach_deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let attached = line == "attached";
                seen.push(line);
                if attached {
                    break;
                }
            }
            Err(e) => {
                let status = tool.child().try_wait().ok().flatten();
                let why = match e {
                    RecvTimeoutError::Timeout => format!("no `attached` within {ATTACH_TIMEOUT:?}"),
                    RecvTimeoutError::Disconnected => {
                        format!("exited ({status:?}) before `attached`")
                    }
                };
                let stderr = kill_and_read_stderr(&mut tool, stderr_reader);
                return Err(format!(
                    "{tool_cmd:?}: {why}; stdout: {seen:?}; stderr:\n{stderr}"
                ));
            }
        }
    }

    // 2. The victim runs its calls.
    let mut victim_cmd = command(victim_prefix, &victim_path(), victim_args);
    let mut victim = match victim_cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(child) => Reaped(Some(child)),
        Err(e) => {
            let stderr = kill_and_read_stderr(&mut tool, stderr_reader);
            return Err(format!(
                "spawning {victim_cmd:?}: {e}; tool stderr:\n{stderr}"
            ));
        }
    };
    let victim_pid = victim.child().id();
    let mut victim_out = victim.child().stdout.take().expect("piped stdout");
    let victim_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = victim_out.read_to_string(&mut text);
        text
    });
    let started = victim
        .child()
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(b"go\n");
    let victim_status = started
        .map_err(|e| format!("starting the victim: {e}"))
        .and_then(|()| victim.wait_for("the victim", RUN_TIMEOUT));
    let victim_status = match victim_status {
        Ok(status) => status,
        Err(e) => {
            let stderr = kill_and_read_stderr(&mut tool, stderr_reader);
            return Err(format!(
                "{e}; tool stdout: {seen:?}; tool stderr:\n{stderr}"
            ));
        }
    };
    let victim_stdout = victim_reader.join().unwrap_or_default();
    let tool_outlived_victim = matches!(tool.child().try_wait(), Ok(None));

    // 3. The tool finishes.
    let status = match tool.wait_for("the tool", RUN_TIMEOUT) {
        Ok(status) => status,
        Err(e) => {
            seen.extend(lines.try_iter());
            let stderr = kill_and_read_stderr(&mut tool, stderr_reader);
            return Err(format!("{e}; stdout: {seen:?}; stderr:\n{stderr}"));
        }
    };
    // The pipe closes when the tool (and anything it left holding the pipe) is gone.
    loop {
        match lines.recv_timeout(RUN_TIMEOUT) {
            Ok(line) => seen.push(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!(
                "the tool's stdout stayed open {RUN_TIMEOUT:?} after it exited; stdout: {seen:?}"
            ))
            }
        }
    }
    let _ = stdout_reader.join();
    let stderr = stderr_reader.join().unwrap_or_default();
    let mut stdout = seen.join("\n");
    stdout.push('\n');
    Ok(Run {
        stdout,
        stderr,
        status,
        victim_pid,
        victim_stdout,
        victim_status,
        tool_outlived_victim,
    })
}

/// The tool's output with every `pid=<digits>` replaced by `pid=PID`, so runs of different
/// processes (and of the kernel and bpftime) compare equal.
pub fn normalise(stdout: &str) -> String {
    const KEY: &str = "pid=";
    let mut out = String::with_capacity(stdout.len());
    let mut rest = stdout;
    while let Some(at) = rest.find(KEY) {
        let after = &rest[at + KEY.len()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        out.push_str(&rest[..at + KEY.len()]);
        if digits > 0 {
            out.push_str("PID");
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// What the victim's `lt_work` returns for `a`.
pub fn lt_work(a: u64) -> u64 {
    a * 2 + 1
}

/// How many ring buffer events the tool receives when it sees `calls` calls with `-m min_arg`:
/// an entry for each argument at least `min_arg`, a return for every call.
pub fn expected_events(calls: u64, min_arg: u64) -> u64 {
    calls.saturating_sub(min_arg) + calls
}

/// The victim's own output for `victim calls`.
pub fn expected_victim_output(calls: u64) -> String {
    format!("done {}\n", (0..calls).map(lt_work).sum::<u64>())
}

/// The [`normalise`]d tool output for a run with `-m min_arg` that sees the victim's `calls`
/// calls `lt_work(i)`, `i` in `0..calls` (0 when a pid filter excludes the victim).
pub fn expected_output(calls: u64, min_arg: u64) -> String {
    let mut out = String::from("attached\n");
    for i in 0..calls {
        if i >= min_arg {
            out.push_str(&format!("entry pid=PID arg={i}\n"));
        }
        out.push_str(&format!("return pid=PID rc={}\n", lt_work(i)));
    }
    for key in 0..8 {
        let count = (min_arg..calls).filter(|i| i % 8 == key).count();
        if count > 0 {
            out.push_str(&format!("hist {key} {count}\n"));
        }
    }
    out.push_str(&format!(
        "bss entries={} returns={calls}\n",
        calls.saturating_sub(min_arg)
    ));
    out
}

/// The pids in the tool's `pid=` fields.
pub fn event_pids(stdout: &str) -> Vec<u32> {
    stdout
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("pid="))
        .map(|pid| pid.parse().expect("numeric pid"))
        .collect()
}

/// The file offset of `symbol` in the ELF `binary`, as libbpf computes it for a uprobe: the
/// symbol's virtual address translated through the `PT_LOAD` segment that contains it
/// (`st_value - p_vaddr + p_offset`).
pub fn symbol_file_offset(binary: &Path, symbol: &str) -> Result<u64, String> {
    use goblin::elf::{program_header::PT_LOAD, Elf};

    let bytes = std::fs::read(binary).map_err(|e| format!("reading {}: {e}", binary.display()))?;
    let elf = Elf::parse(&bytes).map_err(|e| format!("parsing {}: {e}", binary.display()))?;
    let sym = elf
        .syms
        .iter()
        .find(|s| s.is_function() && elf.strtab.get_at(s.st_name) == Some(symbol))
        .ok_or_else(|| format!("no function symbol {symbol} in {}", binary.display()))?;
    let segment = elf
        .program_headers
        .iter()
        .find(|ph| {
            ph.p_type == PT_LOAD
                && ph.p_vaddr <= sym.st_value
                && sym.st_value < ph.p_vaddr + ph.p_filesz
        })
        .ok_or_else(|| {
            format!(
                "{symbol} at {:#x} is in no PT_LOAD segment of {}",
                sym.st_value,
                binary.display()
            )
        })?;
    Ok(sym.st_value - segment.p_vaddr + segment.p_offset)
}
