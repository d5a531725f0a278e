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
    /// The mirror to apply it to, as [`Bridge::create_map`] returned it.
    pub mirror: MirrorId,
    /// Update, delete or push; must suit the mirror's type (push only for QUEUE and STACK).
    pub op: Op,
    /// Exactly [`MirrorDesc::key_bytes`] bytes (none for QUEUE and STACK).
    pub key: &'a [u8],
    /// Exactly [`MirrorDesc::value_bytes`] bytes (per-CPU maps: every CPU's 8-byte-aligned
    /// slot); empty for a delete.
    pub value: &'a [u8],
    /// `BPF_ANY`, `BPF_NOEXIST` or `BPF_EXIST` (plus any flag the kernel accepts).
    pub flags: u64,
}

impl<'a> Update<'a> {
    /// `BPF_MAP_UPDATE_ELEM` of `key` to `value` with `flags`.
    pub fn put(mirror: MirrorId, key: &'a [u8], value: &'a [u8], flags: u64) -> Self {
        Self {
            mirror,
            op: Op::Update,
            key,
            value,
            flags,
        }
    }

    /// `BPF_MAP_DELETE_ELEM` of `key`; fails with `ENOENT` in the kernel if it is absent.
    pub fn delete(mirror: MirrorId, key: &'a [u8]) -> Self {
        Self {
            mirror,
            op: Op::Delete,
            key,
            value: &[],
            flags: 0,
        }
    }

    /// A push of `value` onto a QUEUE or STACK mirror (`BPF_MAP_UPDATE_ELEM` without a key;
    /// `BPF_EXIST` in `flags` makes a full one drop its oldest value instead of failing).
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
    Applied {
        /// The first sequence number covered: a drain run's first record.
        first: u64,
        /// The last one, inclusive.
        last: u64,
    },
    /// Update `seq` failed with `errno` (as the kernel's BPF_MAP_*_ELEM would return it);
    /// `rejected` marks a record whose sizes did not match its mirror.
    Failed {
        /// The update's sequence number, as [`Bridge::send`] returned it.
        seq: u64,
        /// The positive errno (`EEXIST`, `ENOENT`, `E2BIG`, ...).
        errno: i32,
        /// The drain refused the record (`EINVAL`) without applying it: an unregistered mirror
        /// index, or sizes that do not match the mirror's.
        rejected: bool,
    },
}

/// The state of one update, by sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStatus {
    /// Queued (or not sent at all): no confirmation covers it yet.
    Pending,
    /// The kernel map command succeeded.
    Applied,
    /// The kernel map command failed, or the drain rejected the record.
    Failed {
        /// The positive errno, as in [`Confirmation::Failed`].
        errno: i32,
    },
}

/// [`BridgeConfig::on_confirm`]: runs on the drain thread, so it must be quick and must not
/// call back into the bridge in a way that waits for confirmations (`flush`, a blocked `send`).
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

/// How a [`Bridge`] confirms updates; [`Default`] is per-batch confirmations with the fast paths.
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
    /// Updates queued in the ring.
    pub sent: u64,
    /// Updates a confirmation reported applied.
    pub applied: u64,
    /// Updates a confirmation reported failed or rejected.
    pub failed: u64,
    /// `sent - applied - failed`: queued but not yet confirmed.
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

    /// Loads the drain program (libbpf: needs CAP_BPF, or root) and starts the drain thread,
    /// confirming as `config` says.
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
        Self::start(drain, ring, confirmations, config)
    }

    /// Starts the drain thread over a loaded drain, its update ring and its confirmations.
    /// The unit tests pass stand-ins for all three.
    fn start(
        drain: DrainProgram,
        ring: UserRingBuf,
        confirmations: impl ConfirmationSource,
        config: BridgeConfig,
    ) -> Result<Self, BridgeError> {
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

    /// The mirror registered as `id`, to read back or pin; `UnknownMirror` for an id this bridge
    /// never handed out.
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

    /// A snapshot of the counters. `pending` is computed from counters read one after the other,
    /// so while updates are in flight it may lag by the few that settled in between.
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

/// Where the drain thread reads the confirmations the drain program wrote.
trait ConfirmationSource: Send + 'static {
    /// Hands every record available now to `each`, oldest first.
    fn take_available(&mut self, each: &mut dyn FnMut(&[u8]));
}

/// The drain's `BPF_MAP_TYPE_RINGBUF`, through aya.
impl ConfirmationSource for RingBuf<MapData> {
    fn take_available(&mut self, each: &mut dyn FnMut(&[u8])) {
        while let Some(item) = self.next() {
            each(&item);
        }
    }
}

fn drain_loop(shared: &Shared, mut confirmations: impl ConfirmationSource) {
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
        confirmations.take_available(&mut |item| match ConfirmRecord::decode(item) {
            Some(record) => settle(shared, &record),
            None => tracing::error!(len = item.len(), "malformed confirmation record"),
        });
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

#[cfg(test)]
mod tests {
    //! The drain thread's failure path, without root: `sys`'s test override answers the drain
    //! thread's BPF_PROG_TEST_RUN (reached by the thread's name), the drain is a stand-in fd, the
    //! update ring is a memfd laid out like a user ringbuf, and no confirmation ever arrives.

    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    use bpftime_abi::flags::BPF_ANY;
    use bpftime_abi::sys::{fake, Call, MapInfo};
    use bpftime_abi::MapType;

    use super::*;

    /// The name `Bridge::start` gives its drain thread.
    const DRAIN_THREAD: &str = "bpftime-bridge-drain";

    /// Confirmations that never come; counts how often the drain thread looked for some.
    struct NoConfirmations(Arc<AtomicUsize>);

    impl ConfirmationSource for NoConfirmations {
        fn take_available(&mut self, _each: &mut dyn FnMut(&[u8])) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A memfd sized and typed (through the override) like a one-page user ringbuf: the consumer
    /// page, the producer page and the data page twice. Nothing consumes it, and it does not
    /// wrap, which a handful of small records never needs.
    fn ring_stand_in() -> UserRingBuf {
        let page = bpftime_abi::page_size();
        // SAFETY: a plain syscall with a NUL-terminated name; the fd is checked and then owned.
        let raw = unsafe { libc::memfd_create(c"bpftime-test-ring".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a new fd that nothing else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on an fd we own.
        let rc = unsafe { libc::ftruncate(memfd.as_raw_fd(), 4 * page as libc::off_t) };
        assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
        let _fake = fake::install(move |call: &mut Call<'_>| {
            if let Call::MapInfo { info, .. } = call {
                **info = MapInfo {
                    map_type: libbpf_rs::libbpf_sys::BPF_MAP_TYPE_USER_RINGBUF,
                    max_entries: page as u32,
                    ..MapInfo::default()
                };
            }
            Ok(fake::success(call))
        });
        UserRingBuf::from_fd(memfd).expect("a user ringbuf over the memfd")
    }

    /// A u32 -> u64 hash mirror as `Mirror::open_pinned` reads it back, over a dummy fd.
    fn mirror_stand_in() -> Mirror {
        let _fake = fake::install(|call: &mut Call<'_>| {
            if let Call::MapInfo { info, .. } = call {
                **info = MapInfo {
                    map_type: MapType::Hash.as_raw(),
                    key_size: 4,
                    value_size: 8,
                    max_entries: 16,
                    ..MapInfo::default()
                };
            }
            Ok(fake::success(call))
        });
        Mirror::open_pinned(Path::new("/nonexistent/bpftime-test/counts"), "test")
            .expect("the override opens the mirror")
    }

    /// Runs `f` on its own thread and fails the test if it has not returned within `limit`, so a
    /// drain thread that never stops (and a `Drop` that joins it) fails instead of hanging.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            let _ = done.send(f());
        });
        match result.recv_timeout(limit) {
            Ok(value) => {
                worker.join().expect("the worker returned");
                value
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no result within {limit:?}: hung"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(worker.join().expect_err("the worker panicked"))
            }
        }
    }

    /// The messages of `error` and its sources, outermost first.
    fn chain(error: &dyn std::error::Error) -> Vec<String> {
        std::iter::successors(Some(error), |e| e.source())
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_failing_drain_run_stops_the_drain_and_surfaces_its_errno() {
        // All of it on a worker, the bridge's drop (which joins the drain thread) included: a
        // drain thread that never stopped would otherwise hang the test, even while a failed
        // assertion unwinds.
        within(Duration::from_secs(30), failing_drain_run);
    }

    fn failing_drain_run() {
        // What the drain thread asked the "kernel": command name and fd.
        let calls: Arc<std::sync::Mutex<Vec<(&'static str, RawFd)>>> = Arc::default();
        let seen = Arc::clone(&calls);
        let _drain_fake = fake::install_for_thread(DRAIN_THREAD, move |call: &mut Call<'_>| {
            let fd = match call {
                Call::ProgTestRun { fd, .. } => *fd,
                _ => -1,
            };
            seen.lock().unwrap().push((call.name(), fd));
            match call {
                // EFAULT: what the kernel says when it cannot copy the context in; not an errno
                // the real kernel would give for this stand-in fd (EBADF, EINVAL, EPERM).
                Call::ProgTestRun { .. } => Err(libc::EFAULT),
                other => Ok(fake::success(other)),
            }
        });

        let drain_fd = fake::dummy_fd();
        let drain_raw = drain_fd.as_raw_fd();
        let confirm_reads = Arc::new(AtomicUsize::new(0));
        let callbacks = Arc::new(AtomicUsize::new(0));
        let (ring, mirror) = (ring_stand_in(), mirror_stand_in());
        let config = BridgeConfig {
            on_confirm: Some(Box::new({
                let callbacks = Arc::clone(&callbacks);
                move |_: &Confirmation| {
                    callbacks.fetch_add(1, Ordering::SeqCst);
                }
            })),
            ..BridgeConfig::default()
        };
        let bridge = Bridge::start(
            DrainProgram::stand_in(drain_fd),
            ring,
            NoConfirmations(Arc::clone(&confirm_reads)),
            config,
        )
        .expect("the bridge starts over the stand-ins");
        // What `create_map` does after registering with the drain, which the stand-in cannot.
        bridge.shared.mirrors.write().push(Arc::new(mirror));

        let seq = bridge
            .send(&Update::put(
                MirrorId(0),
                &1u32.to_ne_bytes(),
                &7u64.to_ne_bytes(),
                BPF_ANY,
            ))
            .expect("queued: the ring has room");
        let timeout = Duration::from_secs(5);
        let started = Instant::now();
        let first = bridge.flush(timeout);
        let elapsed = started.elapsed();
        let second = bridge.flush(timeout);

        // Both flushes returned the drain's error (not a timeout), naming the command and errno.
        assert!(elapsed < timeout, "the flush waited out its timeout");
        for result in [&first, &second] {
            match result {
                Err(BridgeError::DrainStopped(inner)) => match &**inner {
                    BridgeError::Drain(e) => {
                        assert_eq!((e.call, e.errno()), ("BPF_PROG_TEST_RUN", libc::EFAULT));
                    }
                    other => panic!("expected a Drain error inside, got {other:?}"),
                },
                other => panic!("expected DrainStopped, got {other:?}"),
            }
        }
        let messages = chain(first.as_ref().unwrap_err());
        let errno_text = std::io::Error::from_raw_os_error(libc::EFAULT).to_string();
        assert!(
            messages.iter().any(|m| m.contains("BPF_PROG_TEST_RUN"))
                && messages.iter().any(|m| m.contains(&errno_text)),
            "{messages:?}"
        );

        // Nothing was confirmed: the update stays pending, no counter or callback says otherwise.
        assert_eq!(bridge.status(seq), UpdateStatus::Pending);
        assert_eq!(bridge.settled_below(), seq);
        assert!(bridge.failures().is_empty());
        assert_eq!(
            bridge.counters(),
            BridgeCounters {
                sent: 1,
                applied: 0,
                failed: 0,
                pending: 1,
                full_waits: 0,
                drain_runs: 1,
                confirmations: 0,
            }
        );
        assert_eq!(callbacks.load(Ordering::SeqCst), 0);
        assert_eq!(confirm_reads.load(Ordering::SeqCst), 0);

        // The drain thread ran the drain program once and ended, instead of retrying.
        let drainer = bridge.drainer.as_ref().expect("a drain thread");
        let deadline = Instant::now() + timeout;
        while !drainer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(drainer.is_finished(), "the drain thread still runs");
        assert_eq!(*calls.lock().unwrap(), [("BPF_PROG_TEST_RUN", drain_raw)]);
        drop(bridge);
    }
}
