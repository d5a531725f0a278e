//! The bridge: map updates go into a user ringbuf, a drain thread runs the kernel drain program
//! with BPF_PROG_RUN, and the confirmations it echoes through a kernel ringbuf settle each update.
//!
//! Nothing is dropped: a full ring makes `send` wait for the drain thread (which it kicks), and an
//! update counts as pending until its confirmation arrives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, RingBuf};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::drain::DrainProgram;
use crate::error::BridgeError;
use crate::mirror::{Mirror, MirrorDesc};
use crate::user_ringbuf::{UserRingBuf, UserRingBufError};
use bpftime_abi::bridge::{record_size, ConfirmKind, ConfirmRecord, Op, UpdateHeader, MAX_MIRRORS};

/// Index of a mirror within one [`Bridge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MirrorId(pub u32);

/// One map operation to forward.
#[derive(Debug, Clone, Copy)]
pub struct Update<'a> {
    pub mirror: MirrorId,
    pub op: Op,
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// `BPF_ANY`, `BPF_NOEXIST` or `BPF_EXIST` (plus any flag the kernel accepts).
    pub flags: u64,
}

impl<'a> Update<'a> {
    pub fn put(mirror: MirrorId, key: &'a [u8], value: &'a [u8], flags: u64) -> Self {
        Self {
            mirror,
            op: Op::Update,
            key,
            value,
            flags,
        }
    }

    pub fn delete(mirror: MirrorId, key: &'a [u8]) -> Self {
        Self {
            mirror,
            op: Op::Delete,
            key,
            value: &[],
            flags: 0,
        }
    }

    pub fn push(mirror: MirrorId, value: &'a [u8], flags: u64) -> Self {
        Self {
            mirror,
            op: Op::Push,
            key: &[],
            value,
            flags,
        }
    }
}

/// What the kernel said about updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// Every update with a sequence number in `first..=last` that is not reported as
    /// [`Confirmation::Failed`] was applied. In confirm-each mode `first == last`.
    Applied { first: u64, last: u64 },
    /// Update `seq` failed with `errno` (as the kernel's BPF_MAP_*_ELEM would return it);
    /// `rejected` marks a record whose sizes did not match its mirror.
    Failed {
        seq: u64,
        errno: i32,
        rejected: bool,
    },
}

/// The state of one update, by sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStatus {
    Pending,
    Applied,
    Failed { errno: i32 },
}

pub type ConfirmCallback = Box<dyn Fn(&Confirmation) + Send + Sync>;

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            confirm_each: false,
            fast_path: true,
            on_confirm: None,
        }
    }
}

pub struct BridgeConfig {
    /// One confirmation per update instead of one per drained batch plus one per failure.
    pub confirm_each: bool,
    /// Use the drain's per-shape fast paths where a mirror qualifies (default). Off, every
    /// record goes through `bpf_sys_bpf`; the benchmark compares both.
    pub fast_path: bool,
    /// Called on the drain thread for every confirmation, in order.
    pub on_confirm: Option<ConfirmCallback>,
}

/// Counters over the bridge's lifetime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BridgeCounters {
    pub sent: u64,
    pub applied: u64,
    pub failed: u64,
    pub pending: u64,
    /// How often a sender found the ring full and waited for the drain (backpressure).
    pub full_waits: u64,
    /// BPF_PROG_RUN calls of the drain program; `sent / drain_runs` is the mean batch.
    pub drain_runs: u64,
    /// Confirmation records received: one per update with `confirm_each`, else one per drained
    /// batch plus one per failure.
    pub confirmations: u64,
}

struct Producer {
    ring: UserRingBuf,
    next_seq: u64,
}

#[derive(Default)]
struct DrainerState {
    stop: bool,
    kicked: bool,
    /// Set by [`Bridge::pause_drain`]: records queue up (and senders wait once the ring is
    /// full) until [`Bridge::resume_drain`].
    paused: bool,
    error: Option<Arc<BridgeError>>,
}

struct Shared {
    drain: Mutex<DrainProgram>,
    producer: Mutex<Producer>,
    mirrors: RwLock<Vec<Arc<Mirror>>>,
    confirm_each: bool,
    fast_path: bool,
    on_confirm: Option<ConfirmCallback>,
    sent: AtomicU64,
    applied: AtomicU64,
    failed: AtomicU64,
    full_waits: AtomicU64,
    drain_runs: AtomicU64,
    confirmations: AtomicU64,
    /// Every sequence number below this one is settled (applied or failed).
    settled_below: AtomicU64,
    failures: Mutex<BTreeMap<u64, i32>>,
    drainer_idle: AtomicBool,
    state: Mutex<DrainerState>,
    work: Condvar,
    progress: Condvar,
}

/// Forwards map updates to kernel mirror maps. See the module docs.
pub struct Bridge {
    shared: Arc<Shared>,
    drainer: Option<JoinHandle<()>>,
}

impl Bridge {
    /// Loads the drain program and starts the drain thread, confirming per batch.
    pub fn new() -> Result<Self, BridgeError> {
        Self::with_config(BridgeConfig::default())
    }

    pub fn with_config(config: BridgeConfig) -> Result<Self, BridgeError> {
        let drain = DrainProgram::load()?;
        let ring = UserRingBuf::from_fd(drain.map_fd("updates")?)?;
        // aya's RingBuf is the consumer of the kernel ringbuf (it only mmaps the map; its one
        // `bpf()` command is the info query in `MapData::from_fd`).
        let confirmations = MapData::from_fd(drain.map_fd("confirmations")?)
            .and_then(|map| RingBuf::try_from(Map::RingBuf(map)))
            .map_err(|source| BridgeError::AyaMap {
                what: "opening the confirmation ringbuf",
                source,
            })?;
        let shared = Arc::new(Shared {
            drain: Mutex::new(drain),
            producer: Mutex::new(Producer { ring, next_seq: 1 }),
            mirrors: RwLock::new(Vec::new()),
            confirm_each: config.confirm_each,
            fast_path: config.fast_path,
            on_confirm: config.on_confirm,
            sent: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            full_waits: AtomicU64::new(0),
            drain_runs: AtomicU64::new(0),
            confirmations: AtomicU64::new(0),
            settled_below: AtomicU64::new(1),
            failures: Mutex::new(BTreeMap::new()),
            drainer_idle: AtomicBool::new(false),
            state: Mutex::new(DrainerState::default()),
            work: Condvar::new(),
            progress: Condvar::new(),
        });
        let drainer_shared = Arc::clone(&shared);
        let drainer = std::thread::Builder::new()
            .name("bpftime-bridge-drain".into())
            .spawn(move || drain_loop(&drainer_shared, confirmations))
            .map_err(|source| BridgeError::System {
                what: "starting the drain thread",
                source,
            })?;
        Ok(Self {
            shared,
            drainer: Some(drainer),
        })
    }

    /// Creates (or reopens, if pinned with the same shape) a kernel mirror and registers it with
    /// the drain. `replace` unpins a mirror of another shape first.
    pub fn create_map(&self, desc: MirrorDesc) -> Result<MirrorId, BridgeError> {
        self.add_mirror(Mirror::create(desc, false)?)
    }

    /// Like [`Bridge::create_map`], but always starts from a fresh, empty kernel map.
    pub fn create_fresh_map(&self, desc: MirrorDesc) -> Result<MirrorId, BridgeError> {
        self.add_mirror(Mirror::create(desc, true)?)
    }

    fn add_mirror(&self, mirror: Mirror) -> Result<MirrorId, BridgeError> {
        let mut mirrors = self.shared.mirrors.write();
        let index = mirrors.len() as u32;
        if index >= MAX_MIRRORS {
            return Err(BridgeError::TooManyMirrors(MAX_MIRRORS));
        }
        let fast = self.shared.drain.lock().register(
            index,
            mirror.raw_fd(),
            mirror.desc(),
            self.shared.fast_path,
        )?;
        tracing::debug!(map = %mirror.desc().name, index, fast, "mirror registered");
        mirrors.push(Arc::new(mirror));
        Ok(MirrorId(index))
    }

    pub fn mirror(&self, id: MirrorId) -> Result<Arc<Mirror>, BridgeError> {
        self.shared
            .mirrors
            .read()
            .get(id.0 as usize)
            .cloned()
            .ok_or(BridgeError::UnknownMirror(id.0))
    }

    /// Queues one update and returns its sequence number. Waits (never drops) while the ring is
    /// full; the drain thread is kicked so it frees space.
    pub fn send(&self, update: &Update<'_>) -> Result<u64, BridgeError> {
        self.send_batch(std::slice::from_ref(update))
    }

    /// Queues `updates` in order, under one hold of the producer, and returns the sequence
    /// number of the first; the others follow consecutively. Each is checked as
    /// [`send`](Self::send) checks it; on an error, those before it are queued.
    pub fn send_batch(&self, updates: &[Update<'_>]) -> Result<u64, BridgeError> {
        let mut producer = self.shared.producer.lock();
        let first = producer.next_seq;
        let mut checked: Option<(MirrorId, Arc<Mirror>)> = None;
        for update in updates {
            let mirror = match &checked {
                Some((id, m)) if *id == update.mirror => Arc::clone(m),
                _ => {
                    let m = self.mirror(update.mirror)?;
                    checked = Some((update.mirror, Arc::clone(&m)));
                    m
                }
            };
            let (key_size, value_size) = Self::check(&mirror, update)?;
            self.queue_one(&mut producer, update, key_size, value_size)?;
        }
        drop(producer);
        if self.shared.drainer_idle.load(Ordering::SeqCst) {
            let _state = self.shared.state.lock();
            self.shared.work.notify_one();
        }
        Ok(first)
    }

    /// Test hook: queues `update` with the header sizes given, skipping the checks `send`
    /// makes, so the drain program's own check of every record is exercised (a malformed
    /// record from a buggy or hostile producer must be rejected in the kernel too).
    #[doc(hidden)]
    pub fn debug_send_unchecked(
        &self,
        update: &Update<'_>,
        key_size: u32,
        value_size: u32,
    ) -> Result<u64, BridgeError> {
        let mut producer = self.shared.producer.lock();
        let seq = producer.next_seq;
        self.queue_one(&mut producer, update, key_size, value_size)?;
        drop(producer);
        self.kick();
        Ok(seq)
    }

    fn queue_one(
        &self,
        producer: &mut Producer,
        update: &Update<'_>,
        key_size: u32,
        value_size: u32,
    ) -> Result<(), BridgeError> {
        let len = record_size(update.key.len() + update.value.len());
        let seq = producer.next_seq;
        let header = UpdateHeader {
            seq,
            mirror: update.mirror.0,
            op: update.op as u32,
            key_size,
            value_size,
            flags: update.flags,
        };
        let ring = &producer.ring;
        let mut sample = loop {
            match ring.reserve(len) {
                Ok(sample) => break sample,
                Err(UserRingBufError::Full) => {
                    self.shared.full_waits.fetch_add(1, Ordering::Relaxed);
                    self.kick();
                    match ring.reserve_blocking(len, Duration::from_millis(50)) {
                        Ok(sample) => break sample,
                        Err(UserRingBufError::Timeout) | Err(UserRingBufError::Full) => {
                            if let Some(error) = self.shared.state.lock().error.clone() {
                                return Err(BridgeError::DrainStopped(error));
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        header.encode(update.key, update.value, &mut sample);
        sample.submit();
        producer.next_seq += 1;
        self.shared.sent.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Checks sizes and op against the mirror, so a malformed update fails here with the map's
    /// name rather than as a rejected record later.
    fn check(mirror: &Mirror, update: &Update<'_>) -> Result<(u32, u32), BridgeError> {
        let desc = mirror.desc();
        let keyless = desc.kind.is_keyless();
        let op_fits = match update.op {
            Op::Update | Op::Delete => !keyless,
            Op::Push => keyless,
        };
        if !op_fits {
            return Err(BridgeError::WrongOp {
                map: desc.name.clone(),
                op: update.op,
                kind: desc.kind.name(),
            });
        }
        let expect = |what, got: usize, expected: usize| {
            if got == expected {
                Ok(())
            } else {
                Err(BridgeError::SizeMismatch {
                    map: desc.name.clone(),
                    what,
                    got,
                    expected,
                })
            }
        };
        expect("key", update.key.len(), desc.key_bytes() as usize)?;
        let value_bytes = match update.op {
            Op::Delete => 0,
            Op::Update | Op::Push => desc.value_bytes() as usize,
        };
        expect("value", update.value.len(), value_bytes)?;
        Ok((update.key.len() as u32, update.value.len() as u32))
    }

    fn kick(&self) {
        let mut state = self.shared.state.lock();
        state.kicked = true;
        self.shared.work.notify_one();
    }

    /// Stops draining: records stay in the ring and, once it is full, `send` waits. For
    /// maintenance windows and for tests of backpressure.
    pub fn pause_drain(&self) {
        self.shared.state.lock().paused = true;
    }

    /// Drains again after [`Bridge::pause_drain`].
    pub fn resume_drain(&self) {
        let mut state = self.shared.state.lock();
        state.paused = false;
        self.shared.work.notify_one();
    }

    /// Waits until every update sent before this call is confirmed (applied or failed).
    pub fn flush(&self, timeout: Duration) -> Result<BridgeCounters, BridgeError> {
        let target = self.shared.sent.load(Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        self.kick();
        let mut state = self.shared.state.lock();
        loop {
            let settled = self.shared.applied.load(Ordering::SeqCst)
                + self.shared.failed.load(Ordering::SeqCst);
            if settled >= target {
                return Ok(self.counters());
            }
            if let Some(error) = &state.error {
                return Err(BridgeError::DrainStopped(error.clone()));
            }
            if self
                .shared
                .progress
                .wait_until(&mut state, deadline)
                .timed_out()
            {
                return Err(BridgeError::FlushTimeout {
                    pending: target - settled,
                    waited: timeout,
                });
            }
        }
    }

    pub fn counters(&self) -> BridgeCounters {
        let sent = self.shared.sent.load(Ordering::SeqCst);
        let applied = self.shared.applied.load(Ordering::SeqCst);
        let failed = self.shared.failed.load(Ordering::SeqCst);
        BridgeCounters {
            sent,
            applied,
            failed,
            pending: sent.saturating_sub(applied + failed),
            full_waits: self.shared.full_waits.load(Ordering::Relaxed),
            drain_runs: self.shared.drain_runs.load(Ordering::Relaxed),
            confirmations: self.shared.confirmations.load(Ordering::Relaxed),
        }
    }

    /// The state of update `seq` as far as confirmations have arrived.
    pub fn status(&self, seq: u64) -> UpdateStatus {
        if let Some(errno) = self.shared.failures.lock().get(&seq) {
            return UpdateStatus::Failed { errno: *errno };
        }
        if seq < self.shared.settled_below.load(Ordering::SeqCst) {
            UpdateStatus::Applied
        } else {
            UpdateStatus::Pending
        }
    }

    /// Every update with a lower sequence number than this is settled (applied or failed).
    pub fn settled_below(&self) -> u64 {
        self.shared.settled_below.load(Ordering::SeqCst)
    }

    /// The failed updates with sequence numbers in `range`, in order, with their errno.
    pub fn failures_in(&self, range: std::ops::Range<u64>) -> Vec<(u64, i32)> {
        self.shared
            .failures
            .lock()
            .range(range)
            .map(|(seq, errno)| (*seq, *errno))
            .collect()
    }

    /// Every failed update so far: sequence number and errno.
    pub fn failures(&self) -> Vec<(u64, i32)> {
        self.shared
            .failures
            .lock()
            .iter()
            .map(|(seq, errno)| (*seq, *errno))
            .collect()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        {
            let mut state = self.shared.state.lock();
            state.stop = true;
            self.shared.work.notify_one();
        }
        if let Some(drainer) = self.drainer.take() {
            let _ = drainer.join();
        }
    }
}

fn drain_loop(shared: &Shared, mut confirmations: RingBuf<MapData>) {
    let mut consumed: u64 = 0;
    loop {
        {
            let mut state = shared.state.lock();
            loop {
                let pending = shared.sent.load(Ordering::SeqCst) > consumed;
                if state.paused && !state.stop {
                    shared.work.wait_for(&mut state, Duration::from_millis(100));
                    continue;
                }
                if pending || state.kicked {
                    state.kicked = false;
                    break;
                }
                if state.stop {
                    return;
                }
                // Announce idleness, then look again: a producer that submitted before seeing the
                // flag is caught by this second look; one after it notifies under this lock.
                shared.drainer_idle.store(true, Ordering::SeqCst);
                if shared.sent.load(Ordering::SeqCst) > consumed {
                    shared.drainer_idle.store(false, Ordering::SeqCst);
                    break;
                }
                shared.work.wait_for(&mut state, Duration::from_millis(100));
                shared.drainer_idle.store(false, Ordering::SeqCst);
            }
        }
        let drained = shared.drain.lock().run(shared.confirm_each);
        shared.drain_runs.fetch_add(1, Ordering::Relaxed);
        let drained = match drained {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = ?e, "bridge drain failed: {e}");
                let mut state = shared.state.lock();
                state.error = Some(Arc::new(e));
                shared.progress.notify_all();
                return;
            }
        };
        consumed += u64::from(drained);
        while let Some(item) = confirmations.next() {
            match ConfirmRecord::decode(&item) {
                Some(record) => settle(shared, &record),
                None => tracing::error!(len = item.len(), "malformed confirmation record"),
            }
        }
        {
            let _state = shared.state.lock();
            shared.progress.notify_all();
        }
        if drained == 0 && shared.sent.load(Ordering::SeqCst) > consumed {
            // The head sample is reserved but not yet submitted: give its producer the CPU.
            std::thread::yield_now();
        }
    }
}

fn settle(shared: &Shared, record: &ConfirmRecord) {
    shared.confirmations.fetch_add(1, Ordering::Relaxed);
    let confirmation = match record.kind {
        ConfirmKind::Batch => {
            let failed = record.result.max(0) as u64;
            shared.applied.fetch_add(
                u64::from(record.count).saturating_sub(failed),
                Ordering::SeqCst,
            );
            shared.settled_below.store(record.seq + 1, Ordering::SeqCst);
            Confirmation::Applied {
                first: record.first_seq,
                last: record.seq,
            }
        }
        ConfirmKind::Applied => {
            shared.applied.fetch_add(1, Ordering::SeqCst);
            shared.settled_below.store(record.seq + 1, Ordering::SeqCst);
            Confirmation::Applied {
                first: record.seq,
                last: record.seq,
            }
        }
        ConfirmKind::Failed | ConfirmKind::Rejected => {
            let errno = (-record.result) as i32;
            shared.failures.lock().insert(record.seq, errno);
            shared.failed.fetch_add(1, Ordering::SeqCst);
            if shared.confirm_each {
                shared.settled_below.store(record.seq + 1, Ordering::SeqCst);
            }
            Confirmation::Failed {
                seq: record.seq,
                errno,
                rejected: record.kind == ConfirmKind::Rejected,
            }
        }
    };
    if let Some(callback) = &shared.on_confirm {
        callback(&confirmation);
    }
}
