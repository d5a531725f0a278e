//! The classic user_ringbuf tutorial on aya 0.14 and bpftime's [`UserRingBuf`].
//!
//! User space writes samples (a sequence number and a message) into a
//! `BPF_MAP_TYPE_USER_RINGBUF`, then calls `kill(getpid(), 0)`. The `sys_exit_kill` tracepoint
//! program (`user_ringbuf.bpf.c`) drains the samples and echoes each as an event carrying the
//! caller's pid and comm through a `BPF_MAP_TYPE_RINGBUF`, which this program prints.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use aya::maps::{Array, MapData, RingBuf};
use aya::programs::TracePoint;
use aya::EbpfLoader;
use bpftime_kernel_bridge::user_ringbuf::{UserRingBuf, UserRingBufError};
use clap::Parser;

/// Must match `user_ringbuf.h`.
const TASK_COMM_LEN: usize = 16;
const MSG_LEN: usize = 48;

/// `struct user_sample` in `user_ringbuf.h`.
#[repr(C)]
struct UserSample {
    seq: u32,
    pad: u32,
    msg: [u8; MSG_LEN],
}

/// `struct event` in `user_ringbuf.h`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Event {
    pid: u32,
    seq: u32,
    comm: [u8; TASK_COMM_LEN],
    msg: [u8; MSG_LEN],
}

#[derive(Parser, Debug)]
#[command(about = "Send samples to a BPF program through a user ringbuf and print its echoes")]
struct Args {
    /// Send this many samples, print their echoes and exit (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u32>,
    /// Pause between samples, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let tgid = std::process::id();
    let mut ebpf = EbpfLoader::new()
        // aya 0.14 creates the user ringbuf only if allowed to create map types it cannot wrap.
        .allow_unsupported_maps()
        .override_global("target_tgid", &tgid, true)
        .load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/user_ringbuf.bpf.o"
        )))
        .context("loading user_ringbuf.bpf.o (needs root or CAP_BPF + CAP_PERFMON)")?;
    let program: &mut TracePoint = ebpf
        .program_mut("kill_exit")
        .context("program kill_exit missing")?
        .try_into()?;
    program.load()?;
    program.attach("syscalls", "sys_exit_kill").context(
        "attaching to syscalls/sys_exit_kill (is tracefs mounted at /sys/kernel/tracing?)",
    )?;

    let user_ringbuf = UserRingBuf::from_map(ebpf.take_map("user_ringbuf").context("no map")?)?;
    let mut events = RingBuf::try_from(ebpf.take_map("kernel_ringbuf").context("no map")?)?;
    let lost: Array<MapData, u64> = Array::try_from(ebpf.take_map("lost").context("no map lost")?)?;

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let previous =
        unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        bail!(
            "installing the SIGINT handler: {}",
            std::io::Error::last_os_error()
        );
    }

    println!(
        "{:<8} {:<6} {:<16} {:>7} {:>6}  MESSAGE",
        "TIME", "EVENT", "COMM", "PID", "SEQ"
    );
    let mut sent = 0u32;
    let mut received = 0u32;
    while !STOP.load(Ordering::Relaxed) && args.count.is_none_or(|count| sent < count) {
        send_sample(&user_ringbuf, sent)?;
        sent += 1;
        trigger_drain()?;
        received += print_events(&mut events);
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    received += print_events(&mut events);

    let lost = lost.get(&0, 0).context("reading the lost counter")?;
    if received != sent || lost != 0 {
        bail!("sent {sent} samples but {received} came back ({lost} lost in the kernel)");
    }
    Ok(())
}

/// Writes sample `seq`. This thread is also the one that makes the kernel drain the ring, so it
/// must never wait for space: on `Full` it triggers the drain itself and retries once.
fn send_sample(ring: &UserRingBuf, seq: u32) -> anyhow::Result<()> {
    let sample = UserSample {
        seq,
        pad: 0,
        msg: message(seq),
    };
    let bytes = as_bytes(&sample);
    let mut slot = match ring.reserve(bytes.len()) {
        Err(UserRingBufError::Full) => {
            trigger_drain()?;
            ring.reserve(bytes.len())?
        }
        other => other?,
    };
    slot.copy_from_slice(bytes);
    slot.submit();
    Ok(())
}

fn message(seq: u32) -> [u8; MSG_LEN] {
    let text = format!("hello from user space #{seq}");
    let mut msg = [0u8; MSG_LEN];
    // Keep a NUL at the end, as the C side expects a string.
    let len = text.len().min(MSG_LEN - 1);
    msg[..len].copy_from_slice(&text.as_bytes()[..len]);
    msg
}

fn as_bytes(sample: &UserSample) -> &[u8] {
    // SAFETY: UserSample is repr(C) with only integer fields and no padding (4 + 4 + 48 bytes),
    // so all its bytes are initialised; the slice borrows `sample`.
    unsafe {
        std::slice::from_raw_parts(
            (sample as *const UserSample).cast::<u8>(),
            size_of::<UserSample>(),
        )
    }
}

/// kill(getpid(), 0) checks that we may signal ourselves and sends nothing; its exit fires the
/// tracepoint, whose program drains the user ringbuf synchronously in this thread.
fn trigger_drain() -> anyhow::Result<()> {
    // SAFETY: signal 0 performs only the permission check; no signal is delivered.
    let rc = unsafe { libc::kill(libc::getpid(), 0) };
    if rc != 0 {
        bail!("kill(getpid(), 0): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Prints every pending event; returns how many there were.
fn print_events(events: &mut RingBuf<MapData>) -> u32 {
    let mut printed = 0;
    while let Some(item) = events.next() {
        let Some(event) = parse_event(&item) else {
            eprintln!("skipping a malformed event of {} bytes", item.len());
            continue;
        };
        println!(
            "{:<8} {:<6} {:<16} {:>7} {:>6}  {}",
            clock(),
            "echo",
            c_str(&event.comm),
            event.pid,
            event.seq,
            c_str(&event.msg)
        );
        printed += 1;
    }
    printed
}

fn parse_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the length is checked above, read_unaligned needs no alignment, and every bit
    // pattern is a valid Event (integers and byte arrays only).
    Some(unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() })
}

fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Wall-clock time of day, UTC, as HH:MM:SS.
fn clock() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}
