//! The malloc example: `malloc.bpf.c` (a uprobe and a uretprobe on libc's `malloc`), its victim,
//! and runners that execute the same object under **real kernel uprobes** (aya, scoped to the
//! victim's pid) and under the **userspace runtime** (the agent preloaded into the victim), so
//! tests can compare what each saw. The benchmark's programs and victim live here too.

use std::collections::BTreeMap;
use std::io::Write;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use aya::programs::{uprobe::UProbeScope, UProbe};
use bpftime_abi::ErrorChain;
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_runtime::maps::{EntryValue, ShmObject};

/// Allocation sizes in `[MARK_LO, MARK_HI)` are counted exactly (see malloc.bpf.c, victim.c).
pub const MARK_LO: u32 = 700;
pub const MARK_HI: u32 = 800;

/// Path of a compiled object (`malloc`, `bench_uprobe`, `bench_uretprobe`).
pub fn object_path(stem: &str) -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join(format!("{stem}.bpf.o"))
}

/// `victim ROUNDS [--sleep-ms MS] [--no-wait]` (see victim.c).
pub fn victim_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("victim")
}

/// `bench_victim FUNC ITERS [REPS]` (see bench/bench_victim.c).
pub fn bench_victim_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("bench_victim")
}

/// The allocation sizes of one victim round (must match victim.c).
pub fn round_sizes(round: u64) -> [u64; 6] {
    [16, 100, 777, 701 + 2 * (round % 50), 4000, 40000]
}

/// What the victim allocates in `rounds` rounds: (calls, bytes, count per marked size).
pub fn victim_model(rounds: u64) -> (u64, u64, BTreeMap<u32, u64>) {
    let (mut calls, mut bytes, mut marked) = (0, 0, BTreeMap::new());
    for round in 0..rounds {
        for size in round_sizes(round) {
            calls += 1;
            bytes += size;
            if (u64::from(MARK_LO)..u64::from(MARK_HI)).contains(&size) {
                *marked.entry(size as u32).or_insert(0) += 1;
            }
        }
    }
    (calls, bytes, marked)
}

/// The agent library cargo built next to the running test or bench binary (as a dev-dependency
/// it lands in `deps/`; `target/<profile>/` only has it after a build of the agent itself).
pub fn agent_path() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let deps = exe.parent().context("exe dir")?;
    [
        deps.join("libbpftime_agent.so"),
        deps.join("../libbpftime_agent.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .context("libbpftime_agent.so is not next to this binary; build with the agent dev-dependency")
}

/// A process started with piped stdio, waiting for its go line (probes attach meanwhile).
pub struct Waiting {
    /// Taken by `go`; still here in `drop` only on an error path.
    child: Option<Child>,
}

impl Waiting {
    pub fn spawn(command: &mut Command) -> Result<Self> {
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(Self { child: Some(child) })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends the go line and waits; the stdout of a successful run.
    pub fn go(mut self) -> Result<String> {
        let mut child = self.child.take().context("already started")?;
        child.stdin.take().context("stdin")?.write_all(b"go\n")?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "victim failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Only reached without `go` on an error path: do not leave the victim waiting forever.
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The file `/proc/PID/maps` shows mapped for a library whose name starts with `stem`
/// (`libc.so` finds `libc.so.6`), so the kernel probe goes on the very file the process runs.
pub fn mapped_library(pid: u32, stem: &str) -> Result<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(stem))
        })
        .map(PathBuf::from)
        .with_context(|| format!("process {pid} maps no {stem}*"))
}

/// Attaches program `name` of `ebpf` as a kernel uprobe (or uretprobe: aya's UProbe is both,
/// by section) to `function` in `target`, for process `pid` only.
pub fn kernel_attach(
    ebpf: &mut aya::Ebpf,
    name: &str,
    function: &str,
    target: &Path,
    pid: u32,
) -> Result<()> {
    let program: &mut UProbe = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not a uprobe"))?;
    program.load().with_context(|| format!("loading {name}"))?;
    let pid = NonZeroU32::new(pid).context("pid 0")?;
    program
        .attach(function, target, UProbeScope::OneProcess(pid))
        .with_context(|| format!("attaching {name} to {}:{function}", target.display()))?;
    Ok(())
}

/// Preloads the agent into `command` so it attaches every uprobe program of the loaded object
/// `segment`; returns the agent's config file (its `.status` appears next to it).
pub fn with_agent(command: &mut Command, segment: &str) -> Result<PathBuf> {
    let config = std::env::temp_dir().join(format!("bpftime-malloc-{segment}.conf"));
    std::fs::write(&config, format!("object {segment}\n"))?;
    command
        .env("LD_PRELOAD", agent_path()?)
        .env("BPFTIME_AGENT_CONFIG", &config);
    Ok(config)
}

/// The agent's status lines for `config`; an error unless every program was attached.
pub fn agent_status(config: &Path) -> Result<String> {
    let path = format!("{}.status", config.display());
    let status = std::fs::read_to_string(&path).with_context(|| format!("no {path}"))?;
    ensure!(
        status.contains("ok ") && !status.lines().any(|l| l.starts_with("error")),
        "agent status: {status}"
    );
    Ok(status)
}

/// Removes an agent config and what the agent wrote next to it.
pub fn remove_agent_files(config: &Path) {
    for suffix in ["", ".status", ".counts"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", config.display()));
    }
}

/// The maps of malloc.bpf.o after a run, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MallocMaps {
    /// tgid -> (calls, bytes)
    pub stats: BTreeMap<u32, (u64, u64)>,
    /// (tgid, log2 size) -> calls
    pub sizes: BTreeMap<(u32, u32), u64>,
    /// (tgid, size in [MARK_LO, MARK_HI)) -> calls
    pub marked: BTreeMap<(u32, u32), u64>,
    /// (tgid, size in [MARK_LO, MARK_HI)) -> returns of a non-NULL 16-byte aligned pointer
    pub marked_ret: BTreeMap<(u32, u32), u64>,
    /// log2 ns -> returns (all processes; not deterministic)
    pub latency_ns: Vec<u64>,
}

/// The deterministic part for one process: what kernel and userspace must agree on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deterministic {
    /// size -> calls
    pub marked: BTreeMap<u32, u64>,
    /// size -> aligned non-NULL returns
    pub marked_ret: BTreeMap<u32, u64>,
}

impl MallocMaps {
    /// The marked sizes of process `tgid`, split into those `sizes` selects (the victim's own)
    /// and the rest (other allocations that happened to fall into the marked range).
    pub fn deterministic(
        &self,
        tgid: u32,
        sizes: impl Fn(u32) -> bool + Copy,
    ) -> (Deterministic, Deterministic) {
        (
            self.marked_of(tgid, sizes),
            self.marked_of(tgid, move |s| !sizes(s)),
        )
    }

    fn marked_of(&self, tgid: u32, sizes: impl Fn(u32) -> bool + Copy) -> Deterministic {
        let of = |m: &BTreeMap<(u32, u32), u64>| {
            m.iter()
                .filter(|((t, s), _)| *t == tgid && sizes(*s))
                .map(|((_, s), n)| (*s, *n))
                .collect()
        };
        Deterministic {
            marked: of(&self.marked),
            marked_ret: of(&self.marked_ret),
        }
    }

    fn from_entries(
        mut entries: impl FnMut(&str) -> Result<Vec<(Vec<u8>, Vec<u8>)>>,
    ) -> Result<Self> {
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let pairs = |entries: Vec<(Vec<u8>, Vec<u8>)>| -> BTreeMap<(u32, u32), u64> {
            entries
                .iter()
                .map(|(k, v)| ((u32_at(k, 0), u32_at(k, 4)), u64_at(v, 0)))
                .collect()
        };
        let mut maps = MallocMaps {
            stats: entries("stats")?
                .iter()
                .map(|(k, v)| (u32_at(k, 0), (u64_at(v, 0), u64_at(v, 8))))
                .collect(),
            sizes: pairs(entries("sizes")?),
            marked: pairs(entries("marked")?),
            marked_ret: pairs(entries("marked_ret")?),
            latency_ns: vec![0; 64],
        };
        for (k, v) in entries("latency_ns")? {
            let slot = u32_at(&k, 0) as usize;
            if slot < maps.latency_ns.len() {
                maps.latency_ns[slot] = u64_at(&v, 0);
            }
        }
        Ok(maps)
    }

    /// Reads the userspace runtime's maps (shared memory).
    pub fn from_shm(shm: &ShmObject) -> Result<Self> {
        Self::from_entries(|name| {
            let map = shm.map(name).with_context(|| format!("map {name}"))?;
            Ok(map
                .iter()
                .into_iter()
                .filter_map(|e| match e.value {
                    EntryValue::Single(v) => Some((e.key, v)),
                    EntryValue::PerCpu(_) => None,
                })
                .collect())
        })
    }

    /// Reads the kernel's maps through aya.
    pub fn from_kernel(ebpf: &aya::Ebpf) -> Result<Self> {
        Self::from_entries(|name| {
            let map = ebpf
                .map(name)
                .with_context(|| format!("kernel map {name}"))?;
            let entries = match name {
                "stats" => aya::maps::HashMap::<_, u32, [u64; 2]>::try_from(map)?
                    .iter()
                    .map(|r| {
                        r.map(|(k, v)| {
                            let value: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                            (k.to_le_bytes().to_vec(), value)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                "latency_ns" => aya::maps::Array::<_, u64>::try_from(map)?
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        r.map(|v| ((i as u32).to_le_bytes().to_vec(), v.to_le_bytes().to_vec()))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => aya::maps::HashMap::<_, [u32; 2], u64>::try_from(map)?
                    .iter()
                    .map(|r| {
                        r.map(|(k, v)| {
                            let key: Vec<u8> = k.iter().flat_map(|x| x.to_le_bytes()).collect();
                            (key, v.to_le_bytes().to_vec())
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            Ok(entries)
        })
    }
}

/// Runs the victim for `rounds` rounds with malloc.bpf.o under kernel uprobes on the libc the
/// victim maps, scoped to the victim's pid. Returns the victim's pid and the maps.
pub fn run_kernel(rounds: u64) -> Result<(u32, MallocMaps)> {
    let bytes = std::fs::read(object_path("malloc"))?;
    let mut ebpf = aya::EbpfLoader::new()
        .load(&bytes)
        .context("loading malloc.bpf.o into the kernel")?;
    let victim = Waiting::spawn(Command::new(victim_path()).arg(rounds.to_string()))?;
    let pid = victim.pid();
    // The victim is blocked reading stdin, after the dynamic loader mapped libc.
    let libc = wait_for_library(pid, "libc.so")?;
    kernel_attach(&mut ebpf, "malloc_enter", "malloc", &libc, pid)?;
    kernel_attach(&mut ebpf, "malloc_exit", "malloc", &libc, pid)?;
    let out = victim.go()?;
    ensure!(out.contains("done"), "victim: {out}");
    Ok((pid, MallocMaps::from_kernel(&ebpf)?))
}

/// A freshly spawned process may not have run the dynamic loader yet: retry for a while.
pub fn wait_for_library(pid: u32, stem: &str) -> Result<PathBuf> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match mapped_library(pid, stem) {
            Ok(p) => return Ok(p),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    }
}

/// Runs the victim for `rounds` rounds with malloc.bpf.o loaded into shared memory as segment
/// `segment` and the agent preloaded. Returns the victim's pid, the maps, and the agent status.
pub fn run_userspace(
    rounds: u64,
    options: LoadOptions,
    segment: &str,
) -> Result<(u32, MallocMaps, String)> {
    bpftime_runtime::loaded::unload_object(segment);
    let loaded = LoadedObject::load(&object_path("malloc"), Some(segment), options)
        .map_err(|e| anyhow::anyhow!("loading malloc.bpf.o: {e}"))?;
    let result = (|| {
        if let Some((name, why)) = loaded.refused.first() {
            bail!("{name} refused: {}", ErrorChain(why.as_ref()));
        }
        let mut command = Command::new(victim_path());
        command.arg(rounds.to_string());
        let config = with_agent(&mut command, segment)?;
        let run = (|| {
            let victim = Waiting::spawn(&mut command)?;
            let pid = victim.pid();
            let out = victim.go()?;
            ensure!(out.contains("done"), "victim: {out}");
            let status = agent_status(&config)?;
            Ok((pid, MallocMaps::from_shm(&loaded.shm)?, status))
        })();
        remove_agent_files(&config);
        run
    })();
    let _ = loaded.unload();
    result
}
