//! The sync forwarder: userspace map state -> kernel mirror maps.
//!
//! Programs mostly change maps by writing through a looked-up pointer, not through an update
//! helper, so the forwarder does not replay helper calls: it reads the *current* value of every
//! entry the maps marked (updates, deletes, and lookups that handed out a pointer; see
//! `bpftime_runtime::maps::track`), compares it with what the kernel was last sent for that
//! element, and sends what differs. The latest value of a key wins; per-key order is the ring's
//! order. Targets never wait for the forwarder: marks are single atomics in shared memory.
//!
//! What keeps it lossless:
//! * every marked entry is read after its mark is cleared, so a write that lands later marks it
//!   again (the marks protocol in `track.rs`);
//! * a pointer handed out by a lookup may be written through later: such entries are read again
//!   100 µs, 2 ms, 50 ms and 1 s after the lookup was seen, and a **sweep** (a whole-map compare
//!   with what the kernel was sent) runs once the map has been quiet for a moment after pointer
//!   lookups; a map that has ever handed out a pointer is swept every 5 s, since a write through
//!   a pointer kept past the last recheck sets no mark, and every map that changes every 30 s
//!   (each less often if needed to stay under 2% of a core): what a sweep finds is sent and
//!   counted (`sweep_fixes`);
//! * deletes leave tombstones that are freed only after the delete was queued; if a map had to
//!   drop unacknowledged tombstones (its spare half full), the forwarder deletes every kernel key
//!   userspace no longer has (a **resync**, counted);
//! * a record the kernel refuses is logged with its errno and its key, counted as `failed`, and
//!   the key stays `unsynced` until a later change of it is applied;
//! * global data (`.data`, `.bss`, written by plain stores, no marks) is compared on every pass.
//!
//! Per map the forwarder keeps, per element slot, what the kernel was last sent (key, value,
//! element generation): a re-read that finds the same value sends nothing, without hashing.
//! Changes are read into one reused buffer and sent in batches ([`Bridge::send_batch`]).

#![warn(missing_docs)]

mod batch;
mod mirror_desc;
mod sent;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bpftime_abi::flags::BPF_EXIST;
use bpftime_kernel_bridge::{Bridge, BridgeConfig, BridgeError, MirrorId, Update, UpdateStatus};
use bpftime_runtime::maps::{MapHandle, MapType, RawChange, ShmObject, SyncReport};

use batch::Batch;
use mirror_desc::is_global_data;
pub use mirror_desc::{mirror_desc, Unmirrorable};
use sent::SentTable;

/// Why the forwarder could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The kernel side (mirror creation, sending, confirmations) failed.
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    /// A userspace map could not be read.
    #[error("map {map}")]
    Map {
        /// The map's name.
        map: String,
        /// What reading it gave.
        #[source]
        source: bpftime_runtime::maps::MapError,
    },
    /// `--sync` named a map that does not exist or cannot be mirrored.
    #[error("--sync names {map}, which {why}")]
    Selection {
        /// The name as given.
        map: String,
        /// Why it cannot be synced.
        why: String,
    },
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

/// How the forwarder works; the defaults are what `bpftime-rs load` uses.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Which maps get kernel mirrors.
    pub selection: SyncSelection,
    /// One kernel confirmation per record instead of per drained batch (`--confirm-each`).
    pub confirm_each: bool,
    /// After a lookup handed out a value pointer, when to read the entry again (the write
    /// lands after the lookup's mark).
    pub recheck_after: [Duration; 4],
    /// A map that saw pointer lookups is swept once it has been quiet this long.
    pub sweep_when_quiet: Duration,
    /// And at least this often while it stays busy (or less often, to keep sweeps under
    /// `sweep_budget` of a core).
    pub sweep_every: Duration,
    /// A map that has ever handed out a value pointer is swept at least this often (within
    /// the budget) even when nothing marked it: a pointer stays valid while its entry lives,
    /// and a write through it after the last recheck sets no mark.
    pub pointer_sweep_every: Duration,
    /// The share of one core sweeps may take (0.02: 2%).
    pub sweep_budget: f64,
    /// Sleep between passes when nothing changed.
    pub poll_interval: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            selection: SyncSelection::All,
            confirm_each: false,
            recheck_after: [
                Duration::from_micros(100),
                Duration::from_millis(2),
                Duration::from_millis(50),
                Duration::from_secs(1),
            ],
            sweep_when_quiet: Duration::from_millis(200),
            sweep_every: Duration::from_secs(30),
            pointer_sweep_every: Duration::from_secs(5),
            sweep_budget: 0.02,
            poll_interval: Duration::from_micros(20),
        }
    }
}

/// Failures logged one by one per map; the rest are counted (`maps` shows them).
const FAILURES_LOGGED: u64 = 10;

/// Frees the tombstone of a delete the kernel has been sent (deletes come from hash maps only).
fn ack_tombstone(handle: &MapHandle, slot: u32, generation: u32) {
    if let Some(hash) = handle.as_hash() {
        hash.ack_deleted(slot, generation);
    }
}

/// A pointer-handed entry to read again.
struct Recheck {
    slot: u32,
    generation: u32,
    due: Instant,
}

struct InFlight {
    seq: u64,
    /// The element slot (`u32::MAX` for queue pushes).
    slot: u32,
    delete: bool,
    sent_at: Instant,
}

/// The latest update of a map the kernel refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncFailure {
    /// The key, when the update was one key's (None for global data and queue pushes).
    pub key: Option<Vec<u8>>,
    /// The kernel's errno (positive).
    pub errno: i32,
}

/// Per-map counters, also published in the map's shared memory for `bpftime-rs maps`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounters {
    /// Marked entries (and pushes) looked at.
    pub changes_seen: u64,
    /// Records sent to the kernel.
    pub sent: u64,
    /// Records the kernel confirmed.
    pub confirmed: u64,
    /// Records the kernel refused.
    pub failed: u64,
    /// Records sent and not yet confirmed.
    pub pending: u64,
    /// Age of the oldest unconfirmed record.
    pub oldest_pending: Duration,
    /// Deletes of kernel keys userspace no longer has, after the map dropped tombstones.
    pub resyncs: u64,
    /// Whole-map comparisons with what the kernel was sent.
    pub sweeps: u64,
    /// Differences a sweep found that change tracking had not reported.
    pub sweep_fixes: u64,
    /// Keys whose latest send the kernel refused, not yet sent again successfully.
    pub unsynced: u64,
}

struct SyncedMap {
    handle: MapHandle,
    mirror: MirrorId,
    name: String,
    kind: MapType,
    global_data: bool,
    sent: SentTable,
    rechecks: [VecDeque<Recheck>; 4],
    /// Per slot, a bit for each recheck stage it is queued in (one entry per slot and stage:
    /// a key looked up on every call must not fill the queues).
    queued: Vec<u8>,
    in_flight: VecDeque<InFlight>,
    counters: SyncCounters,
    /// Queues/stacks: the next push sequence number to forward.
    next_push: u64,
    /// Pointer lookups seen since the last sweep.
    pointers_since_sweep: bool,
    /// Any pointer lookup seen since the forwarder started.
    ever_handed_pointers: bool,
    /// Any change seen since the last sweep.
    changed_since_sweep: bool,
    last_change: Instant,
    last_sweep: Instant,
    last_sweep_cost: Duration,
    /// Slots whose latest send failed.
    unsynced: HashSet<u32>,
    last_failure: Option<SyncFailure>,
}

/// Keeps the kernel mirrors of one object's maps equal to the userspace maps: reads change
/// marks, sends updates through the [`Bridge`], tracks confirmations (see the crate docs).
pub struct Forwarder {
    bridge: Bridge,
    object: String,
    maps: Vec<SyncedMap>,
    options: SyncOptions,
    buf: Vec<u8>,
    batch: Batch,
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
        let now = Instant::now();
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
            if let Some(hash) = handle.as_hash() {
                hash.set_track_deletes(true);
            }
            let sent = SentTable::new(def.key_size as usize, handle.raw_value_len());
            maps.push(SyncedMap {
                handle,
                mirror,
                name: def.name.clone(),
                kind: desc.kind,
                global_data: is_global_data(&def),
                sent,
                rechecks: Default::default(),
                queued: Vec::new(),
                in_flight: VecDeque::new(),
                counters: SyncCounters::default(),
                next_push: 0,
                pointers_since_sweep: false,
                ever_handed_pointers: false,
                changed_since_sweep: false,
                last_change: now,
                last_sweep: now,
                last_sweep_cost: Duration::ZERO,
                unsynced: HashSet::new(),
                last_failure: None,
            });
        }
        let mut forwarder = Self {
            bridge,
            object,
            maps,
            options,
            buf: Vec::new(),
            batch: Batch::default(),
        };
        forwarder.resync_all()?;
        Ok((forwarder, unmirrorable))
    }

    /// The object whose maps this forwarder syncs.
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
            sent += self.resync_map(index, true)?;
        }
        self.settle();
        Ok(sent)
    }

    /// Deletes every kernel key of map `index` that userspace does not hold; with `values`,
    /// also sends every userspace entry (the kernel's state being unknown).
    fn resync_map(&mut self, index: usize, values: bool) -> Result<usize, SyncError> {
        if self.maps[index].kind.is_keyless() {
            return Ok(0);
        }
        let mirror = self.bridge.mirror(self.maps[index].mirror)?;
        let keyed_by_index = self.maps[index].kind.is_array();
        let mut sent = 0;
        if values {
            self.maps[index].sent.clear();
            sent += self.scan(index, false)?;
        }
        if !keyed_by_index {
            let mut stale = Vec::new();
            let map = &self.maps[index];
            for key in mirror.keys()? {
                if matches!(map.handle.lookup_unmarked(&key, 0), Ok(None)) {
                    stale.push(key);
                }
            }
            for key in stale {
                // The kernel holds it and userspace does not: delete it unconditionally.
                let map = &mut self.maps[index];
                let seq = self.bridge.send(&Update::delete(map.mirror, &key))?;
                map.track(seq, u32::MAX, true, Instant::now());
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Reads every slot of map `index` and sends what differs from what the kernel was sent
    /// (a full resync, or a sweep with `counting_fixes`).
    fn scan(&mut self, index: usize, counting_fixes: bool) -> Result<usize, SyncError> {
        let bound = self.maps[index].handle.scan_bound();
        let mut sent = 0;
        for slot in 0..bound {
            let map = &mut self.maps[index];
            if counting_fixes && map.handle.is_marked(slot) {
                // The next drain reports it.
                continue;
            }
            let Some(c) = map.handle.read_slot_raw(slot, &mut self.buf) else {
                continue;
            };
            if !map.sent.needs(&c) {
                if c.value.is_none() {
                    ack_tombstone(&map.handle, c.slot, c.generation);
                }
                continue;
            }
            if counting_fixes {
                map.counters.sweep_fixes += 1;
                tracing::warn!(
                    object = %self.object,
                    map = %map.name,
                    key = ?c.key,
                    "a sweep found a change that change tracking did not report; sending it"
                );
            }
            self.batch.push(&c, c.value.is_none());
            if self.batch.is_full() {
                sent += self.flush(index)?;
            }
        }
        sent += self.flush(index)?;
        Ok(sent)
    }

    /// Sends the gathered batch for map `index` (see [`send_gathered`]).
    fn flush(&mut self, index: usize) -> Result<usize, SyncError> {
        let map = &mut self.maps[index];
        send_gathered(
            &self.bridge,
            &mut self.batch,
            map.mirror,
            &map.handle,
            &mut map.sent,
            &mut map.in_flight,
            &mut map.counters,
        )
    }

    /// One pass over every synced map: forwards what changed. Returns records sent.
    pub fn pass(&mut self) -> Result<usize, SyncError> {
        let mut sent = 0;
        let now = Instant::now();
        for index in 0..self.maps.len() {
            if self.maps[index].handle.take_resync_needed() {
                tracing::warn!(
                    map = %self.maps[index].name,
                    "tombstones were dropped before they were forwarded: deleting the kernel \
                     keys userspace no longer has"
                );
                self.maps[index].counters.resyncs += 1;
                sent += self.resync_map(index, false)?;
            }
            if self.maps[index].kind.is_keyless() {
                sent += self.forward_pushes(index)?;
                continue;
            }
            sent += self.drain(index, now)?;
            if self.maps[index].global_data {
                // Plain stores leave no mark: compare the section with what was sent. That
                // compare is a sweep of the whole map on every pass, so a pointer lookup seen
                // by the drain leaves no sweep owing (else the map never counts as idle).
                let map = &mut self.maps[index];
                map.pointers_since_sweep = false;
                if let Some(c) = map.handle.read_slot_raw(0, &mut self.buf) {
                    if map.sent.needs(&c) {
                        self.batch.push(&c, false);
                        map.last_change = now;
                    }
                }
                sent += self.flush(index)?;
            }
            sent += self.recheck(index, now)?;
            if self.sweep_due(index, now) {
                let started = Instant::now();
                sent += self.scan(index, true)?;
                let map = &mut self.maps[index];
                map.counters.sweeps += 1;
                map.pointers_since_sweep = false;
                map.changed_since_sweep = false;
                map.last_sweep = Instant::now();
                map.last_sweep_cost = started.elapsed();
            }
        }
        self.settle();
        Ok(sent)
    }

    /// Forwards the marked entries of map `index`.
    fn drain(&mut self, index: usize, now: Instant) -> Result<usize, SyncError> {
        let first_recheck = self.options.recheck_after[0];
        let mut sent = 0;
        let mut error = None;
        let Self {
            bridge,
            batch,
            buf,
            maps,
            ..
        } = self;
        let SyncedMap {
            handle,
            mirror,
            sent: table,
            rechecks,
            queued,
            in_flight,
            counters,
            pointers_since_sweep,
            ever_handed_pointers,
            changed_since_sweep,
            last_change,
            ..
        } = &mut maps[index];
        let seen = handle.drain_changes_raw(buf, |c| {
            if error.is_some() {
                // The bridge failed: nothing more can be sent; a restarted loader resyncs.
                return;
            }
            counters.changes_seen += 1;
            if c.kind.pointer_handed_out() {
                if enqueue(queued, c.slot, 0) {
                    rechecks[0].push_back(Recheck {
                        slot: c.slot,
                        generation: c.generation,
                        due: now + first_recheck,
                    });
                }
                *pointers_since_sweep = true;
                *ever_handed_pointers = true;
            }
            if table.needs(&c) {
                batch.push(&c, c.value.is_none());
                if batch.is_full() {
                    match send_gathered(bridge, batch, *mirror, handle, table, in_flight, counters)
                    {
                        Ok(n) => sent += n,
                        Err(e) => error = Some(e),
                    }
                }
            } else if c.value.is_none() {
                ack_tombstone(handle, c.slot, c.generation);
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        if seen > 0 {
            *last_change = now;
            *changed_since_sweep = true;
        }
        sent += send_gathered(bridge, batch, *mirror, handle, table, in_flight, counters)?;
        Ok(sent)
    }

    /// Reads again the pointer-handed entries that are due, and moves each to its next stage.
    fn recheck(&mut self, index: usize, now: Instant) -> Result<usize, SyncError> {
        let delays = self.options.recheck_after;
        let mut sent = 0;
        for stage in 0..delays.len() {
            loop {
                let map = &mut self.maps[index];
                let Some(front) = map.rechecks[stage].front() else {
                    break;
                };
                if front.due > now {
                    break;
                }
                let r = map.rechecks[stage].pop_front().expect("front exists");
                map.queued[r.slot as usize] &= !(1 << stage);
                if let Some(c) = map.handle.read_slot_raw(r.slot, &mut self.buf) {
                    if c.generation == r.generation && c.value.is_some() {
                        if map.sent.needs(&c) {
                            self.batch.push(&c, false);
                            map.last_change = now;
                        }
                        if let Some(next) = delays.get(stage + 1) {
                            if enqueue(&mut map.queued, r.slot, stage + 1) {
                                let due = now + (*next - delays[stage]);
                                map.rechecks[stage + 1].push_back(Recheck { due, ..r });
                            }
                        }
                    }
                }
                if self.batch.is_full() {
                    sent += self.flush(index)?;
                }
            }
        }
        sent += self.flush(index)?;
        Ok(sent)
    }

    fn sweep_due(&self, index: usize, now: Instant) -> bool {
        let map = &self.maps[index];
        if map.kind.is_keyless() || map.global_data {
            return false;
        }
        let quiet = map.rechecks.iter().all(VecDeque::is_empty)
            && now.duration_since(map.last_change) >= self.options.sweep_when_quiet;
        if map.pointers_since_sweep && quiet {
            return true;
        }
        // And now and then for any map that changed, within the budget: a safety net that
        // makes any change tracking missed (there is no known way) visible in `sweep_fixes`.
        let within_budget = map
            .last_sweep_cost
            .div_f64(self.options.sweep_budget.max(1e-6));
        let since = now.duration_since(map.last_sweep);
        // A pointer handed out long ago can still be written through, unmarked: such maps are
        // swept on a shorter clock whether or not anything marked them.
        if map.ever_handed_pointers && since >= self.options.pointer_sweep_every.max(within_budget)
        {
            return true;
        }
        map.changed_since_sweep && since >= self.options.sweep_every.max(within_budget)
    }

    fn forward_pushes(&mut self, index: usize) -> Result<usize, SyncError> {
        let map = &mut self.maps[index];
        let Some(queue) = map.handle.as_queue() else {
            return Ok(0);
        };
        let (pushes, next) = match queue.pushes_since(map.next_push) {
            Ok(p) => p,
            // Its lock held past the timeout (a stopped or corrupted holder): next pass.
            Err(e) => {
                tracing::warn!(map = %map.name, "cannot read the pushes: {e}");
                return Ok(0);
            }
        };
        map.next_push = next;
        let now = Instant::now();
        for push in &pushes {
            map.counters.changes_seen += 1;
            // BPF_EXIST: a full kernel queue drops its oldest value, as userspace's did to
            // hold this push (a push userspace refused was never queued, so never forwarded).
            let seq = self
                .bridge
                .send(&Update::push(map.mirror, &push.value, BPF_EXIST))?;
            map.track(seq, u32::MAX, false, now);
        }
        Ok(pushes.len())
    }

    /// Matches confirmations to the records sent, in order, and publishes the counters.
    fn settle(&mut self) {
        let now = Instant::now();
        let unix_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let below = self.bridge.settled_below();
        for map in &mut self.maps {
            if let Some(front) = map.in_flight.front() {
                let failures: HashMap<u64, i32> = if front.seq < below {
                    self.bridge
                        .failures_in(front.seq..below)
                        .into_iter()
                        .collect()
                } else {
                    HashMap::new()
                };
                while let Some(front) = map.in_flight.front() {
                    let errno = if front.seq < below {
                        failures.get(&front.seq).copied()
                    } else {
                        // Not covered by a confirmation yet; a failure is reported on its own
                        // (before the batch's confirmation, or alone with --confirm-each).
                        match self.bridge.status(front.seq) {
                            UpdateStatus::Failed { errno } => Some(errno),
                            _ => break,
                        }
                    };
                    let f = map.in_flight.pop_front().expect("front exists");
                    map.counters.pending -= 1;
                    match errno {
                        None => {
                            map.counters.confirmed += 1;
                            if f.slot != u32::MAX {
                                map.unsynced.remove(&f.slot);
                            }
                        }
                        // Deleting what the kernel does not hold reaches the wanted state.
                        Some(libc::ENOENT) if f.delete => map.counters.confirmed += 1,
                        Some(errno) => {
                            map.counters.failed += 1;
                            let key = (f.slot != u32::MAX)
                                .then(|| map.sent.key(f.slot as usize).to_vec());
                            map.last_failure = Some(SyncFailure {
                                key: key.clone(),
                                errno,
                            });
                            if map.counters.failed <= FAILURES_LOGGED {
                                tracing::warn!(
                                    object = %self.object,
                                    map = %map.name,
                                    key = ?key,
                                    errno,
                                    "kernel mirror update failed: {}{}",
                                    std::io::Error::from_raw_os_error(errno),
                                    if map.counters.failed == FAILURES_LOGGED {
                                        " (further failures of this map are only counted)"
                                    } else {
                                        ""
                                    }
                                );
                            }
                            if f.slot != u32::MAX {
                                // The kernel does not hold this state: the slot's next change
                                // is sent again.
                                map.sent.forget(f.slot as usize);
                                map.unsynced.insert(f.slot);
                            }
                        }
                    }
                }
            }
            map.counters.oldest_pending = map
                .in_flight
                .front()
                .map_or(Duration::ZERO, |f| now - f.sent_at);
            map.counters.unsynced = map.unsynced.len() as u64;
            let idle = map.is_idle();
            let c = map.counters;
            map.handle.publish_sync(&SyncReport {
                changes_seen: c.changes_seen,
                sent: c.sent,
                confirmed: c.confirmed,
                failed: c.failed,
                pending: c.pending,
                oldest_pending_ns: c.oldest_pending.as_nanos() as u64,
                last_pass_unix_ns: unix_ns,
                forwarder_pid: u64::from(std::process::id()),
                resyncs: c.resyncs,
                sweeps: c.sweeps,
                sweep_fixes: c.sweep_fixes,
                unsynced: c.unsynced,
                idle,
            });
        }
    }

    /// Each synced map's counters, by name.
    pub fn counters(&self) -> Vec<(String, SyncCounters)> {
        self.maps
            .iter()
            .map(|m| (m.name.clone(), m.counters))
            .collect()
    }

    /// The latest update of `map` the kernel refused, with its key and errno.
    pub fn last_failure(&self, map: &str) -> Option<&SyncFailure> {
        self.maps
            .iter()
            .find(|m| m.name == map)
            .and_then(|m| m.last_failure.as_ref())
    }

    /// The bridge the updates go through.
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// Nothing left to do: no marked entry, none to read again, no sweep waiting, nothing
    /// unconfirmed.
    pub fn is_idle(&self) -> bool {
        self.maps.iter().all(SyncedMap::is_idle)
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
                if idle_passes > 3 {
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

impl SyncedMap {
    fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
            && self.rechecks.iter().all(VecDeque::is_empty)
            && !self.pointers_since_sweep
            && !self.handle.has_changes()
    }

    fn track(&mut self, seq: u64, slot: u32, delete: bool, sent_at: Instant) {
        self.counters.sent += 1;
        self.counters.pending += 1;
        self.in_flight.push_back(InFlight {
            seq,
            slot,
            delete,
            sent_at,
        });
    }
}

/// Marks `slot` as queued in recheck `stage`; false if it already was.
fn enqueue(queued: &mut Vec<u8>, slot: u32, stage: usize) -> bool {
    let slot = slot as usize;
    if slot >= queued.len() {
        queued.resize((slot + 1).next_power_of_two().max(1024), 0);
    }
    let bit = 1 << stage;
    let fresh = queued[slot] & bit == 0;
    queued[slot] |= bit;
    fresh
}

/// Sends a gathered batch, records it as the kernel's state and frees the tombstones whose
/// deletes it queued. ([`Forwarder::flush`], and from inside a drain (where `self` is borrowed in parts).
fn send_gathered(
    bridge: &Bridge,
    batch: &mut Batch,
    mirror: MirrorId,
    handle: &MapHandle,
    table: &mut SentTable,
    in_flight: &mut VecDeque<InFlight>,
    counters: &mut SyncCounters,
) -> Result<usize, SyncError> {
    let n = batch.items.len();
    if n == 0 {
        return Ok(0);
    }
    let bytes = &batch.bytes;
    let updates: Vec<Update<'_>> = batch
        .items
        .iter()
        .map(|item| match &item.value {
            Some(v) => Update::put(mirror, &bytes[item.key.clone()], &bytes[v.clone()], 0),
            None => Update::delete(mirror, &bytes[item.key.clone()]),
        })
        .collect();
    let first = bridge.send_batch(&updates)?;
    drop(updates);
    let now = Instant::now();
    for (i, item) in batch.items.iter().enumerate() {
        let change = RawChange {
            slot: item.slot,
            generation: item.generation,
            kind: bpftime_runtime::maps::ChangeKind(0),
            key: &bytes[item.key.clone()],
            value: item.value.clone().map(|v| &bytes[v]),
        };
        table.record(&change);
        counters.sent += 1;
        counters.pending += 1;
        in_flight.push_back(InFlight {
            seq: first + i as u64,
            slot: item.slot,
            delete: item.value.is_none(),
            sent_at: now,
        });
        if item.ack {
            // The delete is in the ring (which never drops): the tombstone can go.
            ack_tombstone(handle, item.slot, item.generation);
        }
    }
    batch.bytes.clear();
    batch.items.clear();
    Ok(n)
}
