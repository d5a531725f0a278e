//! `aya_uprobe_tool`: uprobe_tool.c written on aya, as an ordinary aya user would: it loads
//! the same `uprobe_tool.bpf.o` with `min_arg` overridden, attaches `on_entry` (a uprobe) and
//! `on_return` (a uretprobe) to a function or file offset of a binary, prints every ring buffer
//! event (waiting for them with epoll on the ring buffer's fd), then the `hist` map (walked
//! from user space) and the `.bss` counters. Same options and output as uprobe_tool.c; run it
//! with `-h`.

use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::uprobe::{UProbeAttachLocation, UProbeScope};
use aya::programs::{ProbeKind, UProbe};
use aya::{Ebpf, EbpfLoader};
use bpftime_example_libbpf_apps::cli::{self, Options, Target};
use bpftime_example_libbpf_apps::object_path;

const PROG: &str = "aya_uprobe_tool";

fn main() -> ExitCode {
    cli::main(PROG, run)
}

/// aya's `log` messages on stderr under `-v` (warnings and information; no debug), as
/// uprobe_tool.c's libbpf print callback.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Runs the tool; an error is reported by `main` (exit 1), a timeout is reported here and also
/// exits 1, after the maps are printed, as in uprobe_tool.c.
fn run(options: &Options) -> Result<ExitCode> {
    if options.multi {
        anyhow::bail!("-M: aya 0.14 has no uprobe_multi links");
    }
    cli::install_stop_handler().context("installing the signal handlers")?;
    if options.verbose {
        log::set_logger(&LOGGER).map_err(|e| anyhow!("installing the logger: {e}"))?;
        log::set_max_level(log::LevelFilter::Info);
    }

    let path = object_path();
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let min_arg = options.min_arg;
    // The object also has maps this tool does not use (a USER_RINGBUF for uprobe_tool's -U)
    // whose types aya has no wrapper for.
    let mut ebpf = EbpfLoader::new()
        .allow_unsupported_maps()
        .override_global("min_arg", &min_arg, true)
        .load(&bytes)
        .context("loading the BPF object")?;

    attach(&mut ebpf, "on_entry", false, options)?;
    attach(&mut ebpf, "on_return", true, options)?;

    let ring = ebpf
        .take_map("events")
        .context("the object has no map `events`")?;
    let mut ring = RingBuf::try_from(ring).context("opening the ring buffer `events`")?;
    let epoll = Epoll::new().context("epoll_create1")?;
    epoll
        .add(ring.as_raw_fd())
        .context("adding the ring buffer to epoll")?;
    println!("attached");

    let mut received: u64 = 0;
    let mut timed_out = false;
    let deadline = Instant::now().checked_add(options.duration);
    while !cli::stop_requested() && (options.max_events == 0 || received < options.max_events) {
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            if options.max_events != 0 {
                eprintln!(
                    "{PROG}: timed out after {received} of {} events",
                    options.max_events
                );
                timed_out = true;
            }
            break;
        }
        match epoll.wait(cli::POLL_TIMEOUT.as_millis() as libc::c_int) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("waiting for ring buffer events"),
        }
        while let Some(record) = ring.next() {
            match cli::event_line(&record) {
                Ok(line) => println!("{line}"),
                Err(why) => eprintln!("{PROG}: {why}"),
            }
            received += 1;
        }
    }

    let hist = print_hist(&ebpf);
    let bss = bss_counters(&ebpf)?;
    println!("{}", cli::bss_line(bss[0], bss[1]));
    hist?;
    Ok(if timed_out {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Loads program `name` and attaches it to the binary of `options`, checking it is a uretprobe
/// when `retprobe` and a uprobe otherwise (aya takes the kind from the object's section name,
/// `uprobe` or `uretprobe`; it cannot be chosen at attach time).
fn attach(ebpf: &mut Ebpf, name: &str, retprobe: bool, options: &Options) -> Result<()> {
    let program: &mut UProbe = ebpf
        .program_mut(name)
        .with_context(|| format!("the object has no program `{name}`"))?
        .try_into()
        .with_context(|| format!("`{name}` is not a uprobe program"))?;
    if matches!(program.kind(), ProbeKind::Return) != retprobe {
        bail!(
            "`{name}` is a {:?} probe, expected a {} probe",
            program.kind(),
            if retprobe { "return" } else { "entry" }
        );
    }
    program
        .load()
        .with_context(|| format!("loading program `{name}`"))?;
    let scope = match options.pid {
        -1 => UProbeScope::AllProcesses,
        0 => UProbeScope::CallingProcess,
        pid => UProbeScope::OneProcess(
            u32::try_from(pid)
                .ok()
                .and_then(NonZeroU32::new)
                .with_context(|| format!("bad pid {pid}"))?,
        ),
    };
    let binary = &options.binary;
    let (location, at) = match &options.target {
        Target::Function(func) => (
            UProbeAttachLocation::Symbol(func),
            format!("{}:{func}", binary.display()),
        ),
        Target::Offset(offset) => (
            UProbeAttachLocation::AbsoluteOffset(*offset),
            format!("{}+{offset:#x}", binary.display()),
        ),
    };
    program
        .attach(location, binary, scope)
        .with_context(|| format!("attaching {name} to {at}"))?;
    Ok(())
}

/// Prints `hist K V` for every key of the `hist` map, sorted: the keys by walking the map
/// (`BPF_MAP_GET_NEXT_KEY`), then a lookup of each.
fn print_hist(ebpf: &Ebpf) -> Result<()> {
    let map = ebpf.map("hist").context("the object has no map `hist`")?;
    let hist: HashMap<&MapData, u32, u64> =
        HashMap::try_from(map).context("opening the hash map `hist`")?;
    let mut keys = Vec::new();
    for key in hist.keys() {
        if keys.len() == cli::MAX_HIST {
            bail!("more than {} hist keys", cli::MAX_HIST);
        }
        keys.push(key.context("walking hist")?);
    }
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        let count = hist
            .get(&key, 0)
            .with_context(|| format!("looking up hist key {key}"))?;
        entries.push((key, count));
    }
    print!("{}", cli::hist_lines(entries));
    Ok(())
}

/// The `.bss` counters `[entries, returns]`: element 0 of the `.bss` array map, whose value is
/// the section (the two `u64`s in the order the object declares them).
fn bss_counters(ebpf: &Ebpf) -> Result<[u64; 2]> {
    let map = ebpf.map(".bss").context("the object has no map `.bss`")?;
    let bss: Array<&MapData, [u64; 2]> =
        Array::try_from(map).context("opening the `.bss` map as an array of [u64; 2]")?;
    bss.get(&0, 0).context("looking up .bss")
}

/// An epoll instance watching one fd for input.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> std::io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 just returned this fd, and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: libc::c_int) -> std::io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call; the kernel
        // checks both fds.
        let rc =
            unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits at most `timeout_ms` for input; returns how many fds are ready.
    fn wait(&self, timeout_ms: libc::c_int) -> std::io::Result<usize> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 1];
        // SAFETY: `events` is a writable array of `events.len()` epoll_events.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}
