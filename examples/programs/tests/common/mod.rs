//! What the userspace side of the kernel comparisons shares: running a victim with the agent
//! preloaded on a loaded object, and reading a loaded object's maps as a [`Snapshot`].

use bpftime_example_programs::{sum_per_cpu, Snapshot};
use bpftime_runtime::maps::{EntryValue, MapType, RingBufConsumer, ShmObject};

/// Runs `victim ROUNDS` with the agent preloaded, attaching the object of `segment`; fails
/// unless the victim finished and the agent reported its attachments without errors.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn run_agent_victim(
    victim: &std::path::Path,
    rounds: u32,
    segment: &str,
) -> Result<String, String> {
    run_agent_victim_with_config(victim, rounds, segment, &format!("object {segment}\n"))
}

/// [`run_agent_victim`] with the agent config `text`.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn run_agent_victim_with_config(
    victim: &std::path::Path,
    rounds: u32,
    segment: &str,
    text: &str,
) -> Result<String, String> {
    let config = std::env::temp_dir().join(format!("bpftime-test-{segment}.conf"));
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    let result = bpftime_example_programs::run_command(
        std::process::Command::new(victim)
            .arg(rounds.to_string())
            .env("LD_PRELOAD", bpftime_example_programs::agent_library())
            .env("BPFTIME_AGENT_CONFIG", &config),
    )
    .map_err(|e| format!("{e:#}"));
    let status =
        std::fs::read_to_string(format!("{}.status", config.display())).unwrap_or_default();
    let _ = std::fs::remove_file(&config);
    let out = result?;
    if status.lines().any(|l| l.starts_with("error")) || !status.contains("ok ") {
        return Err(format!("agent status: {status}"));
    }
    Ok(out)
}

/// Every map of `shm` but the trace ring, as the kernel runner reports maps: entries sorted by
/// key (per-CPU values summed), rings as their records in order keyed by index.
pub fn snapshot_of(shm: &ShmObject) -> Result<Snapshot, String> {
    let mut snapshot = Snapshot::default();
    for handle in shm.maps() {
        let name = handle.name().to_string();
        // Bloom filters cannot be listed (the kernel runner leaves them out too).
        if name == bpftime_runtime::helpers::TRACE_MAP_NAME
            || handle.map_type() == MapType::BloomFilter
        {
            continue;
        }
        let entries = match handle.map_type() {
            MapType::Ringbuf => {
                let mut consumer = RingBufConsumer::new(&handle).map_err(|e| e.to_string())?;
                let mut records = Vec::new();
                consumer.poll(|r| records.push(r.data.to_vec()));
                records
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| ((i as u32).to_le_bytes().to_vec(), r))
                    .collect()
            }
            // As the kernel runner lists them: by the names of the maps they hold.
            t if t.is_map_of_maps() => {
                let defs = shm.map_defs();
                let mut entries: Vec<_> = handle
                    .iter()
                    .into_iter()
                    .filter_map(|e| {
                        let EntryValue::Single(v) = e.value else {
                            return None;
                        };
                        let index = u32::from_le_bytes(v[..4].try_into().ok()?) as usize;
                        Some((e.key, defs.get(index)?.name.as_bytes().to_vec()))
                    })
                    .collect();
                entries.sort();
                entries
            }
            _ => {
                let mut entries: Vec<_> = handle
                    .iter()
                    .into_iter()
                    .map(|e| {
                        let value = match e.value {
                            EntryValue::Single(v) => v,
                            EntryValue::PerCpu(v) => sum_per_cpu(&v),
                        };
                        (e.key, value)
                    })
                    .collect();
                entries.sort();
                entries
            }
        };
        snapshot.maps.insert(name, entries);
    }
    Ok(snapshot)
}

/// What [`run_example_with_agent`] returns: the agent's status lines, the victim's output (or
/// why it failed) and the object's maps after the run.
#[allow(dead_code)]
pub struct AgentRun {
    pub status: String,
    pub out: Result<String, String>,
    pub snapshot: Snapshot,
}

/// Loads `example` (verified by the kernel) as object `segment` on our JIT, or on the
/// interpreter with `no_jit`, runs `victim` (its go line written on stdin) with the agent
/// preloaded on that object, and unloads the object after reading its maps.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn run_example_with_agent(
    example: &str,
    segment: &str,
    no_jit: bool,
    victim: &mut std::process::Command,
) -> AgentRun {
    use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
    bpftime_runtime::loaded::unload_object(segment);
    let loaded = LoadedObject::load(
        &bpftime_example_programs::object_path(example),
        Some(segment),
        LoadOptions {
            no_jit,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{example}: {}", bpftime_testutils::error_chain(&e)));
    assert!(loaded.refused.is_empty(), "{example}: {:?}", loaded.refused);
    let config = std::env::temp_dir().join(format!("bpftime-test-{segment}.conf"));
    std::fs::write(&config, format!("object {segment}\n")).unwrap();
    let out = bpftime_example_programs::run_command(
        victim
            .env("LD_PRELOAD", bpftime_example_programs::agent_library())
            .env("BPFTIME_AGENT_CONFIG", &config),
    )
    .map_err(|e| format!("{e:#}"));
    let status_file = format!("{}.status", config.display());
    let status = std::fs::read_to_string(&status_file).unwrap_or_default();
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&status_file);
    let snapshot = snapshot_of(&loaded.shm).unwrap();
    let _ = loaded.unload();
    AgentRun {
        status,
        out,
        snapshot,
    }
}
