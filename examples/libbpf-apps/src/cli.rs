//! What the Rust ports of `uprobe_tool` (`aya_uprobe_tool`, `libbpf_rs_uprobe_tool`) share with
//! each other and with `uprobe_tool.c`: its command line (getopt-style, the same options,
//! defaults and error messages), the ring buffer event layout, the output lines and the
//! SIGINT/SIGTERM stop flag. What differs between them — loading, attaching, reading maps — is
//! in each binary.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `struct event` of `uprobe_tool.bpf.c`: `u32 pid; u32 kind; u64 value;`.
pub const EVENT_SIZE: usize = 16;
/// `kind` of an entry event (`value` is the first argument).
pub const EVENT_ENTRY: u32 = 0;
/// `kind` of a return event (`value` is the return value).
pub const EVENT_RETURN: u32 = 1;
/// Most `hist` keys the tool prints (`MAX_HIST` of uprobe_tool.c; the map holds 64).
pub const MAX_HIST: usize = 64;
/// How long one wait for ring buffer events lasts, as uprobe_tool.c's `ring_buffer__poll`.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// Where to attach in the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `-f FUNC`: a function, resolved to a file offset from the binary's symbols.
    Function(String),
    /// `-o OFFSET`: a file offset.
    Offset(u64),
}

/// The options of `uprobe_tool.c`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// `-b BINARY`.
    pub binary: PathBuf,
    /// `-f FUNC` or `-o OFFSET`.
    pub target: Target,
    /// `-p PID`: -1 (the default) for every process, 0 for the tool itself.
    pub pid: i32,
    /// `-m MIN`: the `.rodata` global `min_arg`.
    pub min_arg: u64,
    /// `-n N`: exit after N events; 0 (the default) runs until the deadline.
    pub max_events: u64,
    /// `-d SECONDS`: how long to poll after attaching (default 10 s).
    pub duration: Duration,
    /// `-v`: print the loader library's messages on stderr.
    pub verbose: bool,
    /// `-M`: attach with one uprobe_multi link per program (libbpf-rs's libbpf 1.7 only).
    pub multi: bool,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run with these options.
    Run(Options),
    /// `-h`: print [`usage`] on stdout and exit 0.
    Help,
}

/// A tool's `main`: parses the command line as uprobe_tool.c does (exit 2 on a bad one, the
/// usage on `-h`), then runs `run`, printing its error as `PROG: error` (exit 1).
pub fn main(
    prog: &str,
    run: impl FnOnce(&Options) -> anyhow::Result<std::process::ExitCode>,
) -> std::process::ExitCode {
    let options = match parse_args(prog, std::env::args_os().skip(1)) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            print!("{}", usage(prog));
            return std::process::ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("{}", message.trim_end());
            return std::process::ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("{prog}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The usage text (uprobe_tool.c's, with `prog` as the program name).
pub fn usage(prog: &str) -> String {
    format!(
        "usage: {prog} -b BINARY (-f FUNC | -o OFFSET) [-p PID] [-m MIN] [-n N] [-d SECONDS] [-v]\n\
         \x20 -b BINARY   the binary to probe\n\
         \x20 -f FUNC     attach to this function (resolved to a file offset from its symbols)\n\
         \x20 -o OFFSET   attach at this file offset instead\n\
         \x20 -p PID      only this process (default -1: all processes)\n\
         \x20 -m MIN      report entries only for a first argument >= MIN (default 0)\n\
         \x20 -n N        exit after N ring buffer events (default 0: run until -d)\n\
         \x20 -d SECONDS  poll for at most SECONDS after attaching (default 10)\n\
         \x20 -v          print the loader library's messages on stderr\n\
         \x20 -M          attach through uprobe_multi links (where the loader library has them)\n"
    )
}

/// An unsigned number as `strtoull(text, &end, 0)` reads it in uprobe_tool.c (`0x` hex, a
/// leading `0` octal, else decimal; the whole text, no sign).
fn parse_ull(text: &str) -> Option<u64> {
    let (digits, radix) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (hex, 16)
        } else if text.len() > 1 && text.starts_with('0') {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Parses the arguments after the program name the way uprobe_tool.c's getopt loop does
/// (`b:f:o:p:m:n:d:vh`: grouped flags, values attached or in the next argument, `--` ends
/// the options). An error is the message to print on stderr before exiting 2; `prog` names
/// the tool in it.
pub fn parse_args(prog: &str, args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let mut binary = None;
    let mut func = None;
    let mut offset = None;
    let mut pid = -1;
    let mut min_arg = 0;
    let mut max_events = 0;
    let mut duration = Duration::from_secs(10);
    let mut verbose = false;
    let mut multi = false;
    let usage_error = |msg: String| format!("{msg}\n{}", usage(prog));

    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|arg| format!("{prog}: argument {arg:?} is not UTF-8"))?;
        if arg == "--" {
            if let Some(extra) = args.next() {
                return Err(format!(
                    "{prog}: unexpected argument '{}'",
                    extra.to_string_lossy()
                ));
            }
            break;
        }
        let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            return Err(format!("{prog}: unexpected argument '{arg}'"));
        };
        let mut rest = flags;
        while let Some(opt) = rest.chars().next() {
            rest = &rest[opt.len_utf8()..];
            match opt {
                'v' => {
                    verbose = true;
                    continue;
                }
                'M' => {
                    multi = true;
                    continue;
                }
                'h' => return Ok(Command::Help),
                'b' | 'f' | 'o' | 'p' | 'm' | 'n' | 'd' => {}
                _ => return Err(usage_error(format!("{prog}: invalid option -- '{opt}'"))),
            }
            let value = if rest.is_empty() {
                match args.next() {
                    Some(value) => value.into_string().map_err(|value| {
                        format!("{prog}: argument {value:?} of -{opt} is not UTF-8")
                    })?,
                    None => {
                        return Err(usage_error(format!(
                            "{prog}: option requires an argument -- '{opt}'"
                        )))
                    }
                }
            } else {
                std::mem::take(&mut rest).to_string()
            };
            match opt {
                'b' => binary = Some(PathBuf::from(value)),
                'f' => func = Some(value),
                'o' => match parse_ull(&value) {
                    Some(v) if v <= i64::MAX as u64 => offset = Some(v),
                    _ => return Err(format!("{prog}: bad offset '{value}'")),
                },
                'p' => match value.parse::<i32>() {
                    Ok(v) if v >= -1 => pid = v,
                    _ => return Err(format!("{prog}: bad pid '{value}'")),
                },
                'm' => {
                    min_arg =
                        parse_ull(&value).ok_or_else(|| format!("{prog}: bad minimum '{value}'"))?
                }
                'n' => {
                    max_events = parse_ull(&value)
                        .ok_or_else(|| format!("{prog}: bad event count '{value}'"))?
                }
                'd' => match value.parse::<f64>() {
                    // An interval too long for a Duration is as good as forever.
                    Ok(v) if v > 0.0 => {
                        duration = Duration::try_from_secs_f64(v).unwrap_or(Duration::MAX)
                    }
                    _ => return Err(format!("{prog}: bad duration '{value}'")),
                },
                _ => unreachable!("options with a value are matched above"),
            }
        }
    }

    let target = match (binary.is_some(), func, offset) {
        (true, Some(func), None) => Target::Function(func),
        (true, None, Some(offset)) => Target::Offset(offset),
        _ => {
            return Err(usage_error(format!(
                "{prog}: need -b BINARY and exactly one of -f FUNC, -o OFFSET"
            )))
        }
    };
    Ok(Command::Run(Options {
        binary: binary.unwrap_or_default(),
        target,
        pid,
        min_arg,
        max_events,
        duration,
        verbose,
        multi,
    }))
}

/// The line uprobe_tool.c prints for one ring buffer record (`entry pid=%u arg=%llu`,
/// `return pid=%u rc=%llu`, or `unknown ...`), or an error for a record shorter than
/// `struct event`.
pub fn event_line(data: &[u8]) -> Result<String, String> {
    let Some(event) = data.get(..EVENT_SIZE) else {
        return Err(format!("short event ({} bytes)", data.len()));
    };
    let word =
        |at: usize| u32::from_ne_bytes([event[at], event[at + 1], event[at + 2], event[at + 3]]);
    let (pid, kind) = (word(0), word(4));
    let mut value = [0u8; 8];
    value.copy_from_slice(&event[8..16]);
    let value = u64::from_ne_bytes(value);
    Ok(match kind {
        EVENT_ENTRY => format!("entry pid={pid} arg={value}"),
        EVENT_RETURN => format!("return pid={pid} rc={value}"),
        _ => format!("unknown pid={pid} kind={kind} value={value}"),
    })
}

/// The `hist K V` lines for `entries`, sorted by key.
pub fn hist_lines(mut entries: Vec<(u32, u64)>) -> String {
    entries.sort_unstable();
    let mut out = String::new();
    for (key, count) in entries {
        let _ = writeln!(out, "hist {key} {count}");
    }
    out
}

/// The `bss entries=%llu returns=%llu` line.
pub fn bss_line(entries: u64, returns: u64) -> String {
    format!("bss entries={entries} returns={returns}")
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set the flag [`stop_requested`] reads (and interrupt a wait, which
/// then returns `EINTR`), as uprobe_tool.c's `signal(SIGINT, on_signal)`.
pub fn install_stop_handler() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let handler = on_signal as extern "C" fn(libc::c_int);
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let previous = unsafe { libc::signal(sig, handler as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`install_stop_handler`].
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args("t", args.iter().map(OsString::from))
    }

    fn options(args: &[&str]) -> Options {
        match parse(args) {
            Ok(Command::Run(options)) => options,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn parses_like_getopt() {
        let o = options(&[
            "-b", "/bin/x", "-f", "lt_work", "-m", "3", "-n0x10", "-vd", "1.5",
        ]);
        assert_eq!(o.binary, PathBuf::from("/bin/x"));
        assert_eq!(o.target, Target::Function("lt_work".into()));
        assert_eq!((o.pid, o.min_arg, o.max_events), (-1, 3, 16));
        assert_eq!(o.duration, Duration::from_millis(1500));
        assert!(o.verbose);
        let o = options(&["-b/bin/x", "-o", "0x1139", "-p", "-1", "--"]);
        assert_eq!(o.target, Target::Offset(0x1139));
        assert_eq!(o.pid, -1);
        assert_eq!(
            options(&["-b", "x", "-o", "010", "-p", "42"]).target,
            Target::Offset(8)
        );
        assert_eq!(parse(&["-h"]), Ok(Command::Help));
    }

    #[test]
    fn rejects_what_uprobe_tool_c_rejects() {
        for bad in [
            &["-b", "x"][..],
            &["-b", "x", "-f", "f", "-o", "1"],
            &["-f", "f"],
            &["-b", "x", "-f", "f", "-p", "-2"],
            &["-b", "x", "-f", "f", "-m", "-1"],
            &["-b", "x", "-f", "f", "-m", ""],
            &["-b", "x", "-f", "f", "-n", "1x"],
            &["-b", "x", "-o", "0x8000000000000000"],
            &["-b", "x", "-f", "f", "-d", "0"],
            &["-b", "x", "-f", "f", "-d", "nan"],
            &["-b", "x", "-f", "f", "-z"],
            &["-b", "x", "-f", "f", "extra"],
            &["-b", "x", "-f"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn formats_events_as_uprobe_tool_c() {
        let mut record = Vec::new();
        record.extend_from_slice(&7u32.to_ne_bytes());
        record.extend_from_slice(&EVENT_RETURN.to_ne_bytes());
        record.extend_from_slice(&9u64.to_ne_bytes());
        assert_eq!(event_line(&record).as_deref(), Ok("return pid=7 rc=9"));
        record[4] = EVENT_ENTRY as u8;
        assert_eq!(event_line(&record).as_deref(), Ok("entry pid=7 arg=9"));
        assert!(event_line(&record[..15]).is_err());
        assert_eq!(
            hist_lines(vec![(5, 1), (3, 2)]),
            "hist 3 2\nhist 5 1\n".to_string()
        );
        assert_eq!(bss_line(7, 10), "bss entries=7 returns=10");
    }
}
