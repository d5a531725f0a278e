//! The example BPF programs (`examples/programs/*.bpf.c`), the victim they probe, and a runner
//! that executes an example under **real kernel uprobes** (aya), so tests can compare the
//! kernel's map contents with the userspace runtime's on the same calls.

pub mod model;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use aya::programs::{uprobe::UProbeScope, UProbe};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

/// Every example object, by stem.
pub const EXAMPLES: &[&str] = &[
    "hash_counter",
    "array_counters",
    "rodata_config",
    "bss_atomics",
    "ringbuf_events",
    "percpu_array",
    "probe_read_str",
    "bpf_to_bpf",
    "bloom_filter",
    "lpm_prefixes",
    "map_in_map",
];

/// Examples whose kernel run goes through libbpf (libbpf-rs) instead of aya: aya 0.14 creates
/// maps of maps but does not fill their `.values` slots, which libbpf does at load.
const LOADED_BY_LIBBPF: &[&str] = &["map_in_map"];

/// Path of a compiled example object.
pub fn object_path(example: &str) -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join(format!("{example}.bpf.o"))
}

/// The agent library cargo built for the running test or bench: as a dependency it stays in
/// `deps/`, beside the test binary (`target/<profile>/` only has it after building the agent
/// package itself).
pub fn agent_library() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir").to_path_buf();
    let profile = deps
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| deps.clone());
    [
        deps.join("libbpftime_agent.so"),
        profile.join("libbpftime_agent.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("libbpftime_agent.so is built with the tests (dev-dependency bpftime-agent)")
}

/// Path of the multi-threaded victim (`victim_mt THREADS CALLS`, starts on a line of stdin).
pub fn victim_mt_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim_mt")
}

/// Path of the sync scale victim (`victim_keys THREADS KEYS BASE`, starts on a line of stdin).
pub fn victim_keys_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim_keys")
}

/// Path of the victim binary (`victim ROUNDS`, starts on a line of stdin).
pub fn victim_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim")
}

/// Map contents after a run: per map, (key, value) sorted by key. Per-CPU values are summed
/// per 8-byte word (threads migrate between CPUs, so only sums are comparable). Ringbuf maps
/// list their records in order, keyed by their index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub maps: BTreeMap<String, Entries>,
}

/// A map's `(key, value)` pairs.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Sums per-CPU values word by word (u64 little endian).
pub fn sum_per_cpu(values: &[Vec<u8>]) -> Vec<u8> {
    let len = values.first().map_or(0, Vec::len);
    let mut out = vec![0u8; len];
    for word in (0..len).step_by(8) {
        let end = (word + 8).min(len);
        let mut sum: u64 = 0;
        for v in values {
            let mut bytes = [0u8; 8];
            bytes[..end - word].copy_from_slice(&v[word..end]);
            sum = sum.wrapping_add(u64::from_le_bytes(bytes));
        }
        out[word..end].copy_from_slice(&sum.to_le_bytes()[..end - word]);
    }
    out
}

/// Runs the victim for `rounds` rounds with every program of `example` attached as a kernel
/// uprobe, and returns the maps afterwards.
pub fn run_kernel(example: &str, rounds: u32) -> Result<Snapshot> {
    // Every example targets `victim:FUNC` in its section name.
    let function = match example {
        "probe_read_str" => "vt_message",
        _ => "vt_add",
    };
    if LOADED_BY_LIBBPF.contains(&example) {
        return run_kernel_libbpf(example, &victim_path(), rounds, function);
    }
    let bytes = std::fs::read(object_path(example))?;
    let names: Vec<String> = aya::EbpfLoader::new()
        .load(&bytes)
        .map(|e| e.programs().map(|(n, _)| n.to_string()).collect())
        .unwrap_or_default();
    let attach: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), function)).collect();
    run_kernel_with(example, &victim_path(), rounds, &attach)
}

/// Runs `victim ROUNDS` with the programs of `example` attached as kernel uprobes (or
/// uretprobes, as their sections say), each to the function `attach` names for it (in the
/// victim, or `FILE:FUNCTION` for a library), and returns the maps afterwards (rings as their
/// records in order).
pub fn run_kernel_with(
    example: &str,
    victim: &std::path::Path,
    rounds: u32,
    attach: &[(&str, &str)],
) -> Result<Snapshot> {
    let path = object_path(example);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut ebpf = aya::EbpfLoader::new()
        .load(&bytes)
        .with_context(|| format!("loading {example} into the kernel"))?;
    for (name, function) in attach {
        let program: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("{example}: no program {name}"))?
            .try_into()
            .with_context(|| format!("{example}: {name} is not a uprobe"))?;
        program.load()?;
        let (file, function) = match function.split_once(':') {
            Some((file, function)) => (std::path::Path::new(file), function),
            None => (victim, *function),
        };
        program
            .attach(function, file, UProbeScope::AllProcesses)
            .with_context(|| format!("attaching {name} to {}:{function}", file.display()))?;
    }
    run_command(Command::new(victim).arg(rounds.to_string()))?;

    let mut snapshot = Snapshot::default();
    let map_names: Vec<String> = ebpf.maps().map(|(n, _)| n.to_string()).collect();
    for name in map_names {
        let map = ebpf.take_map(&name).context("map")?;
        let entries = match map {
            Map::RingBuf(data) => ring_records(RingBuf::try_from(Map::RingBuf(data))?),
            Map::PerCpuArray(data) | Map::PerCpuHashMap(data) => dump(&data, true)?,
            Map::Array(data)
            | Map::HashMap(data)
            | Map::StackTraceMap(data)
            | Map::LpmTrie(data) => dump(&data, false)?,
            // Bloom filters cannot be listed; what they answered is in the other maps.
            Map::BloomFilter(_) => continue,
            other => bail!("{example}: map {name} has an unexpected type {other:?}"),
        };
        snapshot.maps.insert(name, entries);
    }
    Ok(snapshot)
}

/// [`run_kernel`] through libbpf: every program of `example` attached to `function` of
/// `victim` as a kernel uprobe. A map of maps is listed by the names of the maps it holds
/// (the kernel answers ids, user space indices: names compare).
pub fn run_kernel_libbpf(
    example: &str,
    victim: &std::path::Path,
    rounds: u32,
    function: &str,
) -> Result<Snapshot> {
    use libbpf_rs::UprobeOpts;
    let object = libbpf_load(example)?;
    let mut links = Vec::new();
    for program in object.progs_mut() {
        let opts = UprobeOpts {
            func_name: Some(function.to_string()),
            ..Default::default()
        };
        links.push(
            program
                .attach_uprobe_with_opts(-1, victim, 0, opts)
                .with_context(|| format!("attaching {example} to {}", victim.display()))?,
        );
    }
    run_command(Command::new(victim).arg(rounds.to_string()))?;
    drop(links);
    libbpf_snapshot(&object, example)
}

/// [`run_kernel_libbpf`] with each program attached where its section says (libbpf's
/// auto-attach: `usdt/PATH:PROVIDER:NAME` as kernel USDT probes, semaphores counted by the
/// kernel); also returns the victim's output.
pub fn run_kernel_libbpf_sections(
    example: &str,
    victim: &std::path::Path,
    rounds: u32,
) -> Result<(Snapshot, String)> {
    run_kernel_libbpf_sections_with(example, victim, &[rounds.to_string()])
}

/// [`run_kernel_libbpf_sections`] with the victim's arguments.
pub fn run_kernel_libbpf_sections_with(
    example: &str,
    victim: &std::path::Path,
    args: &[String],
) -> Result<(Snapshot, String)> {
    let object = libbpf_load(example)?;
    let mut links = Vec::new();
    for program in object.progs_mut() {
        let section = program.section().to_string_lossy().into_owned();
        links.push(
            program
                .attach()
                .with_context(|| format!("attaching {example} ({section}) with libbpf"))?,
        );
    }
    let out = run_command(Command::new(victim).args(args))?;
    drop(links);
    Ok((libbpf_snapshot(&object, example)?, out))
}

/// `example`'s object opened and loaded into the kernel by libbpf.
fn libbpf_load(example: &str) -> Result<libbpf_rs::Object> {
    libbpf_rs::ObjectBuilder::default()
        .open_file(object_path(example))
        .with_context(|| format!("opening {example} with libbpf"))?
        .load()
        .with_context(|| format!("loading {example} into the kernel with libbpf"))
}

/// Every map of a libbpf-loaded `object` but its global-data maps, as [`Snapshot`] holds them.
fn libbpf_snapshot(object: &libbpf_rs::Object, example: &str) -> Result<Snapshot> {
    use libbpf_rs::MapType as LibbpfMapType;
    let mut snapshot = Snapshot::default();
    for map in object.maps() {
        let name = map.name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let handle = MapHandle::from_map_id(map.info()?.info.id)?;
        let mut entries = Vec::new();
        let per_cpu = matches!(
            map.map_type(),
            LibbpfMapType::PercpuArray | LibbpfMapType::PercpuHash
        );
        for key in handle.keys() {
            if per_cpu {
                // Summed per 8-byte word over the CPUs, as Snapshot holds per-CPU values.
                if let Some(values) = handle.lookup_percpu(&key, MapFlags::ANY)? {
                    entries.push((key, sum_per_cpu(&values)));
                }
                continue;
            }
            let Some(value) = handle.lookup(&key, MapFlags::ANY)? else {
                continue;
            };
            let value = match map.map_type() {
                LibbpfMapType::ArrayOfMaps | LibbpfMapType::HashOfMaps => {
                    let id = u32::from_le_bytes(value[..4].try_into()?);
                    let inner = MapHandle::from_map_id(id)?;
                    inner.name().to_string_lossy().as_bytes().to_vec()
                }
                LibbpfMapType::Array | LibbpfMapType::Hash => value,
                other => bail!("{example}: map {name} has an unexpected type {other:?}"),
            };
            entries.push((key, value));
        }
        entries.sort();
        snapshot.maps.insert(name, entries);
    }
    Ok(snapshot)
}

/// Path of the short-function victim (`victim_short N`: N calls of the 4-byte `short_add`;
/// starts on a line of stdin).
pub fn victim_short_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim_short")
}

/// Path of the USDT victim (`victim_usdt N`: probes vt:add, vt:konst and, behind a
/// semaphore, vt:sem; starts on a line of stdin).
pub fn victim_usdt_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim_usdt")
}

/// Path of the pid victim (`victim_pids`: vp_mark(id) from threads and fork, vfork and clone
/// children; prints "ID PID TID" per call; starts on a line of stdin).
pub fn victim_pids_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim_pids")
}

/// Path of the allocating victim (`victim_alloc N`: exactly N mallocs between va_begin and
/// va_end; starts on a line of stdin).
pub fn victim_alloc_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim_alloc")
}

/// Path of the stack-trace victim (`victim_stacks ROUNDS`, starts on a line of stdin; built
/// without PIE so its code addresses are the same in every run).
pub fn victim_stacks_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim_stacks")
}

/// Starts the victim, lets it run `rounds` rounds, and checks it finished normally.
pub fn run_victim(rounds: u32) -> Result<String> {
    run_command(Command::new(victim_path()).arg(rounds.to_string()))
}

/// Runs a victim command (e.g. wrapped in `bpftime-rs start --`): one line on stdin starts it.
pub fn run_command(command: &mut Command) -> Result<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the victim")?;
    child.stdin.take().context("stdin")?.write_all(b"go\n")?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !stdout.contains("done") {
        bail!(
            "victim failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn dump(data: &MapData, per_cpu: bool) -> Result<Entries> {
    let id = data.info()?.id();
    let handle = MapHandle::from_map_id(id).context("opening the map by id")?;
    let mut out = Vec::new();
    for key in handle.keys() {
        let value = if per_cpu {
            match handle.lookup_percpu(&key, MapFlags::ANY)? {
                Some(values) => sum_per_cpu(&values),
                None => continue,
            }
        } else {
            match handle.lookup(&key, MapFlags::ANY)? {
                Some(value) => value,
                None => continue,
            }
        };
        out.push((key, value));
    }
    out.sort();
    Ok(out)
}

fn ring_records(mut ring: RingBuf<MapData>) -> Entries {
    let mut out = Vec::new();
    while let Some(record) = ring.next() {
        out.push(((out.len() as u32).to_le_bytes().to_vec(), record.to_vec()));
    }
    out
}

/// The argument registers of each victim call, in order: `(function, rdi, rsi)`; string
/// arguments point at `words`, which the caller keeps alive.
pub fn victim_calls(rounds: u32, words: &[std::ffi::CString]) -> Vec<(&'static str, u64, u64)> {
    let mut calls = Vec::new();
    for i in 0..u64::from(rounds) {
        calls.push(("vt_add", i % 7, i));
        let word = &words[(i % 5) as usize];
        calls.push((
            "vt_message",
            word.as_ptr() as u64,
            word.as_bytes().len() as u64,
        ));
    }
    calls
}

/// The victim's words as C strings (see victim.c).
pub fn victim_words() -> Vec<std::ffi::CString> {
    ["alpha", "bravo", "charlie", "delta", "echo-echo-echo-echo"]
        .iter()
        .map(|w| std::ffi::CString::new(*w).expect("no NUL"))
        .collect()
}

/// A kernel-layout x86_64 `struct pt_regs` with the first two argument registers set.
pub fn pt_regs(rdi: u64, rsi: u64) -> Vec<u8> {
    // Field order: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs
    // eflags rsp ss.
    let mut regs = [0u64; 21];
    regs[13] = rsi;
    regs[14] = rdi;
    regs.iter().flat_map(|r| r.to_le_bytes()).collect()
}
