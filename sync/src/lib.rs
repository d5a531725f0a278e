//! The sync forwarder: userspace map state -> kernel mirror maps.
//!
//! Programs mostly change maps by writing through a looked-up pointer, not through an update
//! helper, so the forwarder does not replay helper calls: it reads the *current* value of every
//! entry the maps marked (updates, deletes, and lookups that handed out a pointer; see
//! `bpftime_runtime::maps::track`), re-reads pointer-marked entries for a grace period (the write
//! lands after the lookup's mark), compares global-data sections (`.data`, `.bss`, written
//! without any helper) with the last forwarded copy, and sends what differs from what the kernel
//! was last sent. The latest value of a key wins; per-key order is the ring's order. Targets
//! never wait for the forwarder: marks are single atomics in shared memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bpftime_kernel_bridge::{
    Bridge, BridgeConfig, BridgeError, MapKind, MirrorDesc, MirrorId, Update, UpdateStatus,
};
use bpftime_runtime::maps::{
    sync_slot, ChangeCursor, EntryValue, MapDef, MapHandle, MapType, ShmObject,
};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error("map {map}")]
    Map {
        map: String,
        #[source]
        source: bpftime_runtime::maps::MapError,
    },
    #[error("--sync names {map}, which {why}")]
    Selection { map: String, why: String },
}

/// Which maps to sync.
#[derive(Debug, Clone, Default)]
pub enum SyncSelection {
    /// Every map that can have a kernel mirror.
    #[default]
    All,
    /// Only these (by name); naming a map that cannot be mirrored is an error.
    Only(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub selection: SyncSelection,
    pub confirm_each: bool,
    /// How long an entry whose value pointer was handed out keeps being re-read. Must exceed
    /// the time a program takes between its lookup and its last write through the pointer.
    pub pointer_grace: Duration,
    /// Sleep between passes when nothing changed.
    pub poll_interval: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            selection: SyncSelection::All,
            confirm_each: false,
            pointer_grace: Duration::from_millis(2),
            poll_interval: Duration::from_micros(20),
        }
    }
}

/// The kernel mirror of a userspace map, if its type has one.
pub fn mirror_desc(def: &MapDef, object: &str) -> Option<MirrorDesc> {
    let kind = match def.map_type {
        MapType::Hash => MapKind::Hash,
        MapType::Array => MapKind::Array,
        MapType::PercpuHash => MapKind::PercpuHash,
        MapType::PercpuArray => MapKind::PercpuArray,
        MapType::LruHash => MapKind::LruHash,
        MapType::LruPercpuHash => MapKind::LruPercpuHash,
        MapType::Queue => MapKind::Queue,
        MapType::Stack => MapKind::Stack,
        MapType::ProgArray | MapType::PerfEventArray | MapType::Ringbuf => return None,
    };
    Some(MirrorDesc {
        kind,
        key_size: def.key_size,
        value_size: def.value_size,
        max_entries: def.max_entries,
        // Userspace-only flags (none today) would be dropped here; the kernel's own pass through.
        flags: def.flags,
        name: def.name.clone(),
        object: object.to_string(),
    })
}

/// A map the selection skipped because it cannot be mirrored, for `load` to report.
#[derive(Debug, Clone)]
pub struct Unmirrorable {
    pub name: String,
    pub map_type: &'static str,
}

/// Global data: written by plain stores, so it is compared with a shadow copy.
fn is_global_data(def: &MapDef) -> bool {
    def.map_type == MapType::Array && def.name.starts_with('.')
}

struct SyncedMap {
    handle: MapHandle,
    mirror: MirrorId,
    name: String,
    kind: MapKind,
    global_data: bool,
    cursor: ChangeCursor,
    /// What the kernel was last sent per key (`None` = deleted), so re-reads that find the
    /// same value send nothing.
    last_sent: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Queues/stacks: the next push sequence number to forward.
    next_push: u64,
}

struct InFlight {
    seq: u64,
    sent_at: Instant,
    key: Vec<u8>,
    delete: bool,
}

/// Per-map counters, also published in the map's shared-memory sync slots for `bpftime-rs maps`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounters {
    pub changes_seen: u64,
    pub sent: u64,
    pub confirmed: u64,
    pub failed: u64,
    pub pending: u64,
    pub oldest_pending: Duration,
}

pub struct Forwarder {
    bridge: Bridge,
    object: String,
    maps: Vec<SyncedMap>,
    counters: Vec<SyncCounters>,
    /// Per map, records sent and not yet confirmed, in send order.
    in_flight: Vec<VecDeque<InFlight>>,
    options: SyncOptions,
    grace_passes: u32,
}

impl Forwarder {
    /// Creates (or reopens) a kernel mirror for each selected map of `shm` and sends the full
    /// userspace state, so a restarted loader re-syncs every mirror: kernel entries that
    /// userspace no longer has are deleted.
    pub fn start(
        shm: &ShmObject,
        options: SyncOptions,
    ) -> Result<(Self, Vec<Unmirrorable>), SyncError> {
        let object = shm.object_name().to_string();
        let bridge = Bridge::with_config(BridgeConfig {
            confirm_each: options.confirm_each,
            ..BridgeConfig::default()
        })?;
        let mut maps = Vec::new();
        let mut unmirrorable = Vec::new();
        let handles = shm.maps();
        if let SyncSelection::Only(names) = &options.selection {
            for name in names {
                match handles.iter().find(|h| h.name() == name) {
                    None => {
                        return Err(SyncError::Selection {
                            map: name.clone(),
                            why: format!("is not a map of {object}"),
                        })
                    }
                    Some(h) if mirror_desc(h.def(), &object).is_none() => {
                        return Err(SyncError::Selection {
                            map: name.clone(),
                            why: format!(
                                "is a {} map, which has no kernel mirror",
                                h.map_type().name()
                            ),
                        })
                    }
                    Some(_) => {}
                }
            }
        }
        for handle in handles {
            let def = handle.def().clone();
            let Some(desc) = mirror_desc(&def, &object) else {
                unmirrorable.push(Unmirrorable {
                    name: def.name.clone(),
                    map_type: def.map_type.name(),
                });
                continue;
            };
            if let SyncSelection::Only(names) = &options.selection {
                if !names.contains(&def.name) {
                    continue;
                }
            }
            let mirror = bridge.create_map(desc.clone())?;
            if def.map_type.is_hash() {
                handle.set_track_deletes(true);
            }
            maps.push(SyncedMap {
                handle,
                mirror,
                name: def.name.clone(),
                kind: desc.kind,
                global_data: is_global_data(&def),
                cursor: ChangeCursor::new(1),
                last_sent: HashMap::new(),
                next_push: 0,
            });
        }
        let grace_passes = (options.pointer_grace.as_nanos()
            / options.poll_interval.as_nanos().max(1))
        .clamp(2, 100_000) as u32;
        for map in &mut maps {
            map.cursor = ChangeCursor::new(grace_passes);
        }
        let counters = vec![SyncCounters::default(); maps.len()];
        let in_flight = (0..maps.len()).map(|_| VecDeque::new()).collect();
        let mut forwarder = Self {
            bridge,
            object,
            maps,
            counters,
            in_flight,
            options,
            grace_passes,
        };
        forwarder.resync_all()?;
        Ok((forwarder, unmirrorable))
    }

    pub fn object(&self) -> &str {
        &self.object
    }

    /// Names of the synced maps, in counter order.
    pub fn map_names(&self) -> Vec<&str> {
        self.maps.iter().map(|m| m.name.as_str()).collect()
    }

    /// Sends every userspace entry and deletes kernel entries userspace does not have.
    pub fn resync_all(&mut self) -> Result<usize, SyncError> {
        let mut sent = 0;
        for index in 0..self.maps.len() {
            let map = &mut self.maps[index];
            map.last_sent.clear();
            if map.kind.is_keyless() {
                continue;
            }
            let mut current = Vec::new();
            map.handle.snapshot_changes(|c| {
                if let Some(value) = c.value {
                    current.push((c.key, value));
                }
            });
            let mirror = self.bridge.mirror(map.mirror)?;
            let kernel_keys: Vec<Vec<u8>> = mirror.entries()?.into_iter().map(|e| e.key).collect();
            let keep: std::collections::HashSet<&Vec<u8>> =
                current.iter().map(|(k, _)| k).collect();
            let stale: Vec<Vec<u8>> = if matches!(map.kind, MapKind::Array | MapKind::PercpuArray) {
                Vec::new()
            } else {
                kernel_keys
                    .into_iter()
                    .filter(|k| !keep.contains(k))
                    .collect()
            };
            for (key, value) in current {
                sent += self.forward(index, key, Some(value))? as usize;
            }
            for key in stale {
                // The kernel holds it and userspace does not: delete it unconditionally.
                self.send_record(index, key, None)?;
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// One pass over every synced map: forwards what changed. Returns records sent.
    pub fn pass(&mut self) -> Result<usize, SyncError> {
        let mut sent = 0;
        for index in 0..self.maps.len() {
            if self.maps[index].handle.take_resync_needed() {
                tracing::warn!(map = %self.maps[index].name, "tombstones were dropped: full resync");
                sent += self.resync_all()?;
            }
            let map = &mut self.maps[index];
            if map.kind.is_keyless() {
                let (pushes, next) =
                    map.handle
                        .pushes_since(map.next_push)
                        .map_err(|source| SyncError::Map {
                            map: map.name.clone(),
                            source,
                        })?;
                map.next_push = next;
                for push in pushes {
                    self.counters[index].changes_seen += 1;
                    let seq =
                        self.bridge
                            .send(&Update::push(self.maps[index].mirror, &push.value, 0))?;
                    self.track(seq, index, Vec::new(), false);
                    sent += 1;
                }
                continue;
            }
            let mut changes = Vec::new();
            map.cursor.pass(&map.handle, |c| changes.push(c));
            if map.global_data {
                // Plain stores leave no mark: compare the section with the last forwarded copy.
                if let Some(c) = map.handle.read_slot(0) {
                    changes.push(c);
                }
            }
            for change in changes {
                self.counters[index].changes_seen += 1;
                let deleted = change.value.is_none();
                let (slot, generation) = (change.slot, change.generation);
                sent += self.forward(index, change.key, change.value)? as usize;
                if deleted {
                    // The delete is in the ring (which never drops); the tombstone can go.
                    self.maps[index].handle.ack_deleted(slot, generation);
                }
            }
        }
        self.settle();
        Ok(sent)
    }

    fn forward(
        &mut self,
        index: usize,
        key: Vec<u8>,
        value: Option<EntryValue>,
    ) -> Result<bool, SyncError> {
        let map = &mut self.maps[index];
        let bytes = value.map(|v| match v {
            EntryValue::Single(bytes) => bytes,
            EntryValue::PerCpu(cpus) => {
                let slot = map.handle.def().value_size.next_multiple_of(8) as usize;
                cpus.into_iter()
                    .flat_map(|mut v| {
                        v.resize(slot, 0);
                        v
                    })
                    .collect()
            }
        });
        match (map.last_sent.get(&key), &bytes) {
            (Some(last), _) if *last == bytes => return Ok(false),
            // Created and deleted before it was ever forwarded: the kernel never had it.
            (None, None) => return Ok(false),
            _ => {}
        }
        self.send_record(index, key, bytes)?;
        Ok(true)
    }

    /// Sends one update (`Some`) or delete (`None`) and records it as the kernel's last state.
    fn send_record(
        &mut self,
        index: usize,
        key: Vec<u8>,
        bytes: Option<Vec<u8>>,
    ) -> Result<(), SyncError> {
        let map = &mut self.maps[index];
        let seq = match &bytes {
            Some(value) => self.bridge.send(&Update::put(map.mirror, &key, value, 0))?,
            None => self.bridge.send(&Update::delete(map.mirror, &key))?,
        };
        let delete = bytes.is_none();
        map.last_sent.insert(key.clone(), bytes);
        self.track(seq, index, key, delete);
        Ok(())
    }

    fn track(&mut self, seq: u64, map: usize, key: Vec<u8>, delete: bool) {
        self.counters[map].sent += 1;
        self.counters[map].pending += 1;
        self.in_flight[map].push_back(InFlight {
            seq,
            sent_at: Instant::now(),
            key,
            delete,
        });
    }

    /// Matches confirmations to the records sent, in order, and publishes the counters.
    fn settle(&mut self) {
        let now = Instant::now();
        let unix_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        for (index, map) in self.maps.iter_mut().enumerate() {
            let in_flight = &mut self.in_flight[index];
            let counters = &mut self.counters[index];
            while let Some(front) = in_flight.front() {
                match self.bridge.status(front.seq) {
                    UpdateStatus::Pending => break,
                    UpdateStatus::Applied => counters.confirmed += 1,
                    // Deleting what the kernel does not hold reaches the wanted state.
                    UpdateStatus::Failed { errno } if front.delete && errno == libc::ENOENT => {
                        counters.confirmed += 1
                    }
                    UpdateStatus::Failed { errno } => {
                        counters.failed += 1;
                        tracing::warn!(
                            object = %self.object,
                            map = %map.name,
                            key = ?front.key,
                            errno,
                            "kernel mirror update failed: {}",
                            std::io::Error::from_raw_os_error(errno)
                        );
                        // The kernel does not hold this value: forget it so a later change
                        // resends.
                        map.last_sent.remove(&front.key);
                    }
                }
                counters.pending -= 1;
                in_flight.pop_front();
            }
            counters.oldest_pending = in_flight
                .front()
                .map_or(Duration::ZERO, |f| now - f.sent_at);
            let c = *counters;
            let slots = map.handle.sync_counters();
            slots[sync_slot::CHANGES_SEEN].store(c.changes_seen, Ordering::Relaxed);
            slots[sync_slot::SENT].store(c.sent, Ordering::Relaxed);
            slots[sync_slot::CONFIRMED].store(c.confirmed, Ordering::Relaxed);
            slots[sync_slot::FAILED].store(c.failed, Ordering::Relaxed);
            slots[sync_slot::PENDING].store(c.pending, Ordering::Relaxed);
            slots[sync_slot::OLDEST_PENDING_NS]
                .store(c.oldest_pending.as_nanos() as u64, Ordering::Relaxed);
            slots[sync_slot::LAST_PASS_UNIX_NS].store(unix_ns, Ordering::Relaxed);
            slots[sync_slot::FORWARDER_PID].store(u64::from(std::process::id()), Ordering::Relaxed);
        }
    }

    pub fn counters(&self) -> Vec<(String, SyncCounters)> {
        self.maps
            .iter()
            .zip(&self.counters)
            .map(|(m, c)| (m.name.clone(), *c))
            .collect()
    }

    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// Nothing left to do: no marked entry, none under re-read, nothing unconfirmed.
    pub fn is_idle(&self) -> bool {
        self.in_flight.iter().all(VecDeque::is_empty)
            && self
                .maps
                .iter()
                .all(|m| m.cursor.pending_rechecks() == 0 && !m.handle.has_changes())
    }

    /// Runs passes until `stop` is set, sleeping `poll_interval` between idle passes.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), SyncError> {
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack; a 1 ns slack
        // keeps the short poll sleeps short (the default 50 us slack would dominate the lag).
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0);
        }
        while !stop.load(Ordering::Relaxed) {
            let sent = self.pass()?;
            if sent == 0 {
                std::thread::sleep(self.options.poll_interval);
            }
        }
        Ok(())
    }

    /// Runs passes until the forwarder is idle (or `timeout`), for tests and `unload`.
    pub fn run_until_idle(&mut self, timeout: Duration) -> Result<bool, SyncError> {
        let deadline = Instant::now() + timeout;
        let mut idle_passes = 0;
        while Instant::now() < deadline {
            self.pass()?;
            if self.is_idle() {
                idle_passes += 1;
                if idle_passes > self.grace_passes.min(1000) {
                    return Ok(true);
                }
            } else {
                idle_passes = 0;
            }
            std::thread::sleep(self.options.poll_interval);
        }
        Ok(false)
    }
}
