//! `bpftime-rs bridge selftest`: creates mirrors of several shapes, sends a deterministic stream of
//! updates and deletes through a [`Bridge`], and checks every kernel map entry by entry against a
//! model of the kernel's semantics, and every failure against the errno the model predicts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::bridge::{Bridge, BridgeConfig, BridgeCounters, MirrorId, Update, UpdateStatus};
use crate::error::BridgeError;
use crate::mirror::MirrorDesc;
use bpftime_abi::flags::{BPF_ANY, BPF_EXIST, BPF_NOEXIST};
use bpftime_abi::MapType;

/// The pin directory of the selftest's mirrors: `/sys/fs/bpf/bpftime-rs/selftest/<map>`.
pub const OBJECT: &str = "selftest";

const ENOENT: i32 = libc::ENOENT;
const EEXIST: i32 = libc::EEXIST;
const E2BIG: i32 = libc::E2BIG;
const EINVAL: i32 = libc::EINVAL;

/// What [`run`] sends.
#[derive(Debug, Clone)]
pub struct SelftestOptions {
    /// Updates, deletes and pushes to send, spread over the mirrors by a fixed weighting.
    pub updates: u64,
    /// Run the bridge in [`BridgeConfig::confirm_each`] mode.
    pub confirm_each: bool,
    /// Seed of the update stream: the same seed replays the same stream.
    pub seed: u64,
}

impl Default for SelftestOptions {
    fn default() -> Self {
        Self {
            updates: 100_000,
            confirm_each: false,
            seed: 0x5eed,
        }
    }
}

/// One mirror's outcome in a [`SelftestReport`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct MapReport {
    /// The mirror's map name.
    pub name: String,
    /// Its map type ([`MapType::name`]).
    pub kind: &'static str,
    /// Where it stays pinned for inspection.
    pub pin: String,
    /// Entries the model holds (for the queue: values pushed).
    pub expected_entries: usize,
    /// Entries read back from the kernel (arrays: model keys found; the queue: values popped).
    pub kernel_entries: usize,
}

/// What [`run`] found; [`SelftestReport::passed`] sums it up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelftestReport {
    /// The bridge's counters after the final flush.
    pub counters: BridgeCounters,
    /// Sent but neither applied nor failed once the bridge was flushed.
    pub lost: u64,
    /// Failures the model predicted, by errno name.
    pub expected_failures: HashMap<&'static str, u64>,
    /// Differences between the model and the kernel: entries and per-update errnos.
    pub mismatches: Vec<String>,
    /// One report per mirror, in creation order.
    pub maps: Vec<MapReport>,
    /// Wall time from the first send to the end of the flush (the read-back not included).
    pub seconds: f64,
    /// [`SelftestOptions::updates`] over `seconds`.
    pub updates_per_sec: f64,
}

impl SelftestReport {
    /// No update lost or left pending, and the kernel agrees with the model on every entry and
    /// every errno.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.counters.pending == 0 && self.mismatches.is_empty()
    }
}

/// SplitMix64: deterministic and dependency-free, so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One mirror and the model of what the kernel map must hold.
struct ModelMap {
    id: MirrorId,
    desc: MirrorDesc,
    /// How many distinct keys the stream draws from.
    key_pool: u64,
    entries: HashMap<Vec<u8>, Vec<u8>>,
    /// For queues: values in push order.
    pushed: Vec<Vec<u8>>,
}

impl ModelMap {
    fn key(&self, n: u64) -> Vec<u8> {
        let size = self.desc.key_size as usize;
        let mut key = vec![0u8; size];
        let bytes = n.to_ne_bytes();
        let take = size.min(8);
        key[..take].copy_from_slice(&bytes[..take]);
        if size > 8 {
            // Spread the number over wide keys so every byte matters.
            for (i, b) in key[8..].iter_mut().enumerate() {
                *b = bytes[i % 8] ^ (i as u8);
            }
        }
        key
    }

    fn value(&self, rng: &mut Rng, value_bytes: usize) -> Vec<u8> {
        let mut value = vec![0u8; value_bytes];
        let mut word = rng.next();
        for chunk in value.chunks_mut(8) {
            chunk.copy_from_slice(&word.to_ne_bytes()[..chunk.len()]);
            word = word.rotate_left(13) ^ 0x2545_f491_4f6c_dd1d;
        }
        if self.desc.kind.is_percpu() {
            // Only value_size bytes of each 8-byte-aligned per-CPU slot are stored.
            let slot = self.desc.value_size.next_multiple_of(8) as usize;
            for cpu_slot in value.chunks_mut(slot) {
                cpu_slot[self.desc.value_size as usize..].fill(0);
            }
        }
        value
    }

    /// Applies an update to the model and returns the errno the kernel must give (0 = success).
    fn apply_update(&mut self, key: Vec<u8>, value: Vec<u8>, flags: u64) -> i32 {
        let is_array = matches!(self.desc.kind, MapType::Array | MapType::PercpuArray);
        if is_array {
            let index = u32::from_ne_bytes(key[..4].try_into().unwrap());
            if index >= self.desc.max_entries {
                return E2BIG;
            }
            if flags == BPF_NOEXIST {
                return EEXIST;
            }
            self.entries.insert(key, value);
            return 0;
        }
        let exists = self.entries.contains_key(&key);
        match flags {
            BPF_NOEXIST if exists => return EEXIST,
            BPF_EXIST if !exists => return ENOENT,
            _ => {}
        }
        if !exists && self.entries.len() as u64 >= u64::from(self.desc.max_entries) {
            return E2BIG;
        }
        self.entries.insert(key, value);
        0
    }

    fn apply_delete(&mut self, key: &[u8]) -> i32 {
        if matches!(self.desc.kind, MapType::Array | MapType::PercpuArray) {
            return EINVAL;
        }
        if self.entries.remove(key).is_some() {
            0
        } else {
            ENOENT
        }
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        ENOENT => "ENOENT",
        EEXIST => "EEXIST",
        E2BIG => "E2BIG",
        EINVAL => "EINVAL",
        _ => "other",
    }
}

fn shapes() -> Vec<(MirrorDesc, u64)> {
    let desc = |name: &str, kind, key_size, value_size, max_entries| MirrorDesc {
        kind,
        key_size,
        value_size,
        max_entries,
        flags: 0,
        name: name.into(),
        object: OBJECT.into(),
    };
    vec![
        // (description, key pool): pools above max_entries make a hash fill up and give E2BIG.
        (desc("u32_u64", MapType::Hash, 4, 8, 65_536), 50_000),
        (desc("key16_val4000", MapType::Hash, 16, 4000, 512), 600),
        (
            desc("percpu_u32_u64", MapType::PercpuHash, 4, 8, 4096),
            3000,
        ),
        (desc("array_u32_u64", MapType::Array, 4, 8, 1024), 1030),
        (desc("percpu_array", MapType::PercpuArray, 4, 16, 256), 256),
        // The kernel LRU evicts before it is full: keep the pool far below capacity.
        (desc("lru_u64_u64", MapType::LruHash, 8, 8, 8192), 1024),
        (desc("small_u32_u64", MapType::Hash, 4, 8, 64), 256),
        (desc("queue_u64", MapType::Queue, 0, 8, 1 << 20), 0),
    ]
}

/// Runs the selftest; mirrors are recreated empty and stay pinned afterwards for inspection.
pub fn run(options: &SelftestOptions) -> Result<SelftestReport, BridgeError> {
    let bridge = Bridge::with_config(BridgeConfig {
        confirm_each: options.confirm_each,
        ..BridgeConfig::default()
    })?;
    let mut maps = Vec::new();
    for (desc, key_pool) in shapes() {
        let id = bridge.create_fresh_map(desc.clone())?;
        maps.push(ModelMap {
            id,
            desc,
            key_pool,
            entries: HashMap::new(),
            pushed: Vec::new(),
        });
    }

    let mut rng = Rng(options.seed);
    let mut expected: Vec<(u64, i32)> = Vec::with_capacity(options.updates as usize);
    // Most traffic goes to the common u32 -> u64 shape, as in real programs.
    let weights: [u64; 8] = [50, 4, 10, 10, 6, 10, 6, 4];
    let total_weight: u64 = weights.iter().sum();
    let started = Instant::now();
    for _ in 0..options.updates {
        let mut pick = rng.below(total_weight);
        let index = weights
            .iter()
            .position(|w| {
                if pick < *w {
                    true
                } else {
                    pick -= *w;
                    false
                }
            })
            .expect("weights cover the range");
        let map = &mut maps[index];
        let value_bytes = map.desc.value_bytes() as usize;
        if map.desc.kind == MapType::Queue {
            let value = map.value(&mut rng, value_bytes);
            let seq = bridge.send(&Update::push(map.id, &value, BPF_ANY))?;
            map.pushed.push(value);
            expected.push((seq, 0));
            continue;
        }
        let key = map.key(rng.below(map.key_pool));
        let roll = rng.below(100);
        let (seq, errno) = if roll < 15 {
            let seq = bridge.send(&Update::delete(map.id, &key))?;
            (seq, map.apply_delete(&key))
        } else {
            let flags = match roll {
                15..=24 => BPF_NOEXIST,
                25..=29 => BPF_EXIST,
                _ => BPF_ANY,
            };
            let value = map.value(&mut rng, value_bytes);
            let seq = bridge.send(&Update::put(map.id, &key, &value, flags))?;
            (seq, map.apply_update(key, value, flags))
        };
        expected.push((seq, errno));
    }
    let counters = bridge.flush(Duration::from_secs(120))?;
    let seconds = started.elapsed().as_secs_f64();

    let mut mismatches = Vec::new();
    let mut expected_failures: HashMap<&'static str, u64> = HashMap::new();
    for (seq, errno) in &expected {
        if *errno != 0 {
            *expected_failures.entry(errno_name(*errno)).or_default() += 1;
        }
        let want = if *errno == 0 {
            UpdateStatus::Applied
        } else {
            UpdateStatus::Failed { errno: *errno }
        };
        let got = bridge.status(*seq);
        if got != want && mismatches.len() < 20 {
            mismatches.push(format!(
                "update {seq}: expected {want:?}, kernel gave {got:?}"
            ));
        }
    }

    let mut reports = Vec::new();
    for map in &maps {
        let mirror = bridge.mirror(map.id)?;
        let kernel_entries = if map.desc.kind == MapType::Queue {
            compare_queue(&mirror, map, &mut mismatches)?
        } else {
            compare_entries(&mirror, map, &mut mismatches)?
        };
        reports.push(MapReport {
            name: map.desc.name.clone(),
            kind: map.desc.kind.name(),
            pin: map.desc.pin_path().display().to_string(),
            expected_entries: if map.desc.kind == MapType::Queue {
                map.pushed.len()
            } else {
                map.entries.len()
            },
            kernel_entries,
        });
    }

    Ok(SelftestReport {
        lost: counters.sent - counters.applied - counters.failed,
        counters,
        expected_failures,
        mismatches,
        maps: reports,
        seconds,
        updates_per_sec: options.updates as f64 / seconds,
    })
}

fn compare_entries(
    mirror: &crate::mirror::Mirror,
    map: &ModelMap,
    mismatches: &mut Vec<String>,
) -> Result<usize, BridgeError> {
    let name = &map.desc.name;
    let entries = mirror.entries()?;
    let is_array = matches!(map.desc.kind, MapType::Array | MapType::PercpuArray);
    let slot = map.desc.value_size.next_multiple_of(8) as usize;
    let mut seen = 0;
    for entry in &entries {
        let kernel_value: Vec<u8> = if map.desc.kind.is_percpu() {
            // The model keeps each CPU's 8-byte-aligned slot; the kernel returns value_size bytes.
            entry
                .values
                .iter()
                .flat_map(|v| {
                    let mut padded = v.clone();
                    padded.resize(slot, 0);
                    padded
                })
                .collect()
        } else {
            entry.values[0].clone()
        };
        match map.entries.get(&entry.key) {
            Some(want) => {
                seen += 1;
                if *want != kernel_value && mismatches.len() < 40 {
                    mismatches.push(format!("{name}: key {:02x?} has another value", entry.key));
                }
            }
            // Arrays hold every index; unwritten ones stay zero.
            None if is_array && kernel_value.iter().all(|b| *b == 0) => {}
            None => {
                if mismatches.len() < 40 {
                    mismatches.push(format!("{name}: unexpected key {:02x?}", entry.key));
                }
            }
        }
    }
    if seen != map.entries.len() && mismatches.len() < 40 {
        mismatches.push(format!(
            "{name}: kernel holds {seen} of the {} expected entries",
            map.entries.len()
        ));
    }
    Ok(if is_array { seen } else { entries.len() })
}

fn compare_queue(
    mirror: &crate::mirror::Mirror,
    map: &ModelMap,
    mismatches: &mut Vec<String>,
) -> Result<usize, BridgeError> {
    let popped = mirror.drain_queue()?;
    if popped != map.pushed {
        mismatches.push(format!(
            "{}: popped {} values, pushed {}, or in another order",
            map.desc.name,
            popped.len(),
            map.pushed.len()
        ));
    }
    Ok(popped.len())
}
