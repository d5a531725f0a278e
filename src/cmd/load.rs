//! `bpftime-rs load OBJ`: loads, verifies, creates the shared maps, publishes the programs for
//! agents, runs the sync forwarder, and prints trace_printk lines and ringbuf/perf events until
//! Ctrl-C. The maps stay after it exits (targets keep running); `bpftime-rs unload` removes them.
//! `bpftime-rs load -- APP [ARGS]` runs an unmodified libbpf application instead
//! ([`super::load_app`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use bpftime_abi::ErrorChain;
use bpftime_runtime::helpers::TRACE_MAP_NAME;
use bpftime_runtime::loaded::LoadedObject;
use bpftime_runtime::maps::{MapType, RingBufConsumer};
use bpftime_runtime::object::BpfObject;
use bpftime_sync::{Forwarder, SyncOptions, SyncSelection};

use super::run::VmArgs;

#[derive(clap::Args)]
pub struct LoadArgs {
    /// The clang-compiled BPF object.
    #[arg(required_unless_present = "app", conflicts_with = "app")]
    object: Option<PathBuf>,
    /// An unmodified libbpf application (and its arguments) to run with the syscall shim
    /// preloaded: its BPF objects become a loaded object named after it.
    #[arg(last = true, value_name = "APP [ARGS]")]
    pub(super) app: Vec<String>,
    #[command(flatten)]
    pub(super) vm: VmArgs,
    /// Sync only these maps to kernel mirrors (default: every mirrorable map).
    #[arg(long, value_delimiter = ',', value_name = "MAP[,MAP]")]
    sync: Option<Vec<String>>,
    /// Sync no map to the kernel.
    #[arg(long, conflicts_with = "sync")]
    no_sync: bool,
    /// One kernel confirmation per synced update instead of one per batch.
    #[arg(long)]
    confirm_each: bool,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Give these users (names or uids) read-write access to the object's maps, so their
    /// processes can be targets (the segment is otherwise the loader's user's alone).
    #[arg(long, value_delimiter = ',', value_name = "USER[,USER]")]
    grant: Vec<String>,
    /// Give these groups (names or gids) read-write access to the object's maps.
    #[arg(long, value_delimiter = ',', value_name = "GROUP[,GROUP]")]
    grant_group: Vec<String>,
    /// Set a global variable before the programs are verified, as a libbpf skeleton does
    /// between open and load (`const volatile` filters in `.rodata`, `.data`/`.bss` state):
    /// an integer for 1/2/4/8-byte variables (decimal, 0x hex, negative), else a string for
    /// a char array. Repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE", conflicts_with = "app")]
    set: Vec<String>,
}

/// Applies `--set NAME=VALUE` arguments to `object`'s globals.
pub(super) fn set_globals(object: &mut BpfObject, sets: &[String]) -> Result<()> {
    for set in sets {
        let (name, value) = set
            .split_once('=')
            .with_context(|| format!("--set {set}: expected NAME=VALUE"))?;
        let size = object
            .globals
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.size as usize);
        let bytes = match size {
            Some(size @ (1 | 2 | 4 | 8)) => global_integer(value, size)
                .with_context(|| format!("--set {set}: not a {}-byte integer", size))?,
            Some(size) => {
                if value.len() >= size {
                    anyhow::bail!(
                        "--set {set}: the string does not fit {name} ({size} bytes with its NUL)"
                    );
                }
                let mut b = value.as_bytes().to_vec();
                b.resize(size, 0);
                b
            }
            // set_global names the globals there are.
            None => Vec::new(),
        };
        object
            .set_global(name, &bytes)
            .with_context(|| format!("--set {set}"))?;
    }
    Ok(())
}

/// `value` as a little-endian integer of `size` bytes (signed or unsigned, in range).
fn global_integer(value: &str, size: usize) -> Option<Vec<u8>> {
    let (negative, digits) = match value.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, value),
    };
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<u64>().ok()?,
    };
    let bits = 8 * size as u32;
    let raw = if negative {
        let limit = 1u64 << (bits - 1);
        if magnitude > limit {
            return None;
        }
        magnitude.wrapping_neg()
    } else {
        if bits < 64 && magnitude >> bits != 0 {
            return None;
        }
        magnitude
    };
    Some(raw.to_le_bytes()[..size].to_vec())
}

impl LoadArgs {
    /// The uids and gids of `--grant` and `--grant-group`.
    pub(super) fn grants(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        let uids = self
            .grant
            .iter()
            .map(|u| resolve_user(u))
            .collect::<Result<Vec<_>>>()?;
        let gids = self
            .grant_group
            .iter()
            .map(|g| resolve_group(g))
            .collect::<Result<Vec<_>>>()?;
        Ok((uids, gids))
    }

    /// `--duration`, if given.
    pub(super) fn duration(&self) -> Option<Duration> {
        self.duration.map(Duration::from_secs_f64)
    }
}

/// The line saying whom `object`'s maps were granted to.
pub(super) fn shared_with(object: &str, uids: &[u32], gids: &[u32]) -> String {
    format!(
        "maps of {object} shared read-write with{}{}",
        uids.iter().map(|u| format!(" uid {u}")).collect::<String>(),
        gids.iter().map(|g| format!(" gid {g}")).collect::<String>()
    )
}

/// A uid from a user name or number.
fn resolve_user(name: &str) -> Result<u32> {
    if let Ok(uid) = name.parse() {
        return Ok(uid);
    }
    let c = std::ffi::CString::new(name).context("user name with a NUL byte")?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: passwd is a plain C struct; getpwnam_r writes into it and into buf (its length
    // given); result points at pwd or is null.
    let uid = unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (r == 0 && !result.is_null()).then_some(pwd.pw_uid)
    };
    uid.with_context(|| format!("--grant: no user named {name}"))
}

/// A gid from a group name or number.
fn resolve_group(name: &str) -> Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).context("group name with a NUL byte")?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: group is a plain C struct; getgrnam_r writes into it and into buf (its length
    // given); result points at grp or is null.
    let gid = unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let r = libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (r == 0 && !result.is_null()).then_some(grp.gr_gid)
    };
    gid.with_context(|| format!("--grant-group: no group named {name}"))
}

pub fn run(args: &LoadArgs) -> Result<()> {
    let Some(object_path) = &args.object else {
        return super::load_app::run(args);
    };
    let (uids, gids) = args.grants()?;
    let mut parsed = BpfObject::from_file(object_path)
        .with_context(|| format!("loading {}", object_path.display()))?;
    set_globals(&mut parsed, &args.set)?;
    let mut loaded = LoadedObject::load_object(parsed, object_path, None, args.vm.options())
        .with_context(|| format!("loading {}", object_path.display()))?;
    let object = loaded.object.name.clone();
    if !uids.is_empty() || !gids.is_empty() {
        loaded
            .grant(&uids, &gids)
            .with_context(|| format!("granting access to the maps of {object}"))?;
        println!("{}", shared_with(&object, &uids, &gids));
    }
    for program in &loaded.programs {
        println!(
            "program {} ({}) -> {} on {:?}{}",
            program.name,
            program.section,
            if program.attach_target.is_empty() {
                "-"
            } else {
                &program.attach_target
            },
            program.vm,
            if program.verified {
                ", verified by the kernel"
            } else {
                ", not verified"
            }
        );
    }
    for map in &loaded.unsupported_maps {
        println!(
            "map {} NOT in user space: {map}; programs using it are refused",
            map.map
        );
    }
    for (name, why) in &loaded.refused {
        println!("program {name} NOT loaded: {}", ErrorChain(why.as_ref()));
    }
    if loaded.programs.is_empty() {
        anyhow::bail!("{}: no program could be loaded", object_path.display());
    }

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }

    let sync_thread = start_sync(args, &loaded.shm, &stop, &mut std::io::stdout())?;

    println!(
        "loaded {object}: {} program(s); attach with `bpftime-rs start -- CMD` or `bpftime-rs \
         attach PID`; Ctrl-C to stop",
        loaded.programs.len()
    );
    std::io::stdout().flush()?;

    let mut consumers = Vec::new();
    for handle in loaded.shm.maps() {
        if matches!(
            handle.map_type(),
            MapType::Ringbuf | MapType::PerfEventArray
        ) {
            let name = handle.name().to_string();
            consumers.push((name, RingBufConsumer::new(&handle)?));
        }
    }
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut out = std::io::stdout().lock();
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        let mut printed = 0;
        for (name, consumer) in &mut consumers {
            printed += consumer.poll(|record| {
                if name == TRACE_MAP_NAME {
                    let _ = writeln!(out, "trace: {}", String::from_utf8_lossy(record.data));
                } else {
                    let _ = writeln!(out, "{name}: {}", hex(record.data));
                }
            });
        }
        if printed > 0 {
            out.flush()?;
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(out);
    stop.store(true, Ordering::Relaxed);
    finish_sync(sync_thread, &mut std::io::stdout())?;
    println!("stopped; the maps of {object} stay for running targets: `bpftime-rs unload {object}` removes them");
    Ok(())
}

/// The sync forwarder's thread, if the maps are synced.
pub(super) type SyncThread = Option<std::thread::JoinHandle<Result<Forwarder>>>;

/// Starts the sync forwarder of `shm` as `args` ask (`--sync`, `--no-sync`, `--confirm-each`)
/// on its own thread, which runs until `stop`; its messages go to `out`.
pub(super) fn start_sync(
    args: &LoadArgs,
    shm: &bpftime_runtime::maps::ShmObject,
    stop: &Arc<AtomicBool>,
    out: &mut dyn Write,
) -> Result<SyncThread> {
    let object = shm.object_name().to_string();
    let forwarder = if args.no_sync {
        None
    } else {
        let selection = match &args.sync {
            Some(names) => SyncSelection::Only(names.clone()),
            None => SyncSelection::All,
        };
        let (forwarder, unmirrorable) = Forwarder::start(
            shm,
            SyncOptions {
                selection,
                confirm_each: args.confirm_each,
                ..SyncOptions::default()
            },
        )
        .context("starting the sync forwarder (use --no-sync to run without the kernel)")?;
        for map in unmirrorable.iter().filter(|m| m.name != TRACE_MAP_NAME) {
            writeln!(
                out,
                "map {} ({}) has no kernel mirror: not synced",
                map.name, map.map_type
            )?;
        }
        for name in forwarder.map_names() {
            writeln!(
                out,
                "map {name} synced to {}",
                bpftime_kernel_bridge::mirror::pin_path(&object, name).display()
            )?;
        }
        Some(forwarder)
    };
    let sync_thread = forwarder.map(|mut forwarder| {
        let stop = Arc::clone(stop);
        std::thread::Builder::new()
            .name("bpftime-sync".into())
            .spawn(move || -> Result<Forwarder> {
                forwarder.run(&stop)?;
                // Let the last changes out before exiting.
                forwarder.run_until_idle(Duration::from_secs(2))?;
                Ok(forwarder)
            })
    });
    sync_thread.transpose().context("starting the sync thread")
}

/// Waits for the sync thread (after `stop` was set) and prints each map's counters to `out`.
pub(super) fn finish_sync(thread: SyncThread, out: &mut dyn Write) -> Result<()> {
    if let Some(thread) = thread {
        let forwarder = thread
            .join()
            .map_err(|_| anyhow::anyhow!("the sync thread panicked"))??;
        for (name, c) in forwarder.counters() {
            writeln!(
                out,
                "sync {name}: sent {} confirmed {} failed {} pending {}",
                c.sent, c.confirmed, c.failed, c.pending
            )?;
        }
        let b = forwarder.bridge().counters();
        // One confirmation record per update with --confirm-each, per drained batch without.
        writeln!(
            out,
            "bridge: {} updates sent, {} confirmation records in {} drain runs",
            b.sent, b.confirmations, b.drain_runs
        )?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
