//! A producer for `BPF_MAP_TYPE_USER_RINGBUF` maps: from a map fd ([`UserRingBuf::from_fd`]), or
//! from aya's [`MapData`] or [`Map`] for programs loaded with aya.
//!
//! aya 0.14 can create a user ringbuf map, but only when loading with
//! `EbpfLoader::allow_unsupported_maps()`, and then hands it out as [`Map::Unsupported`]; it has
//! no way to write to one. [`UserRingBuf`] fills that gap with the same protocol as libbpf's
//! `user_ring_buffer__{new,reserve,reserve_blocking,submit,discard}`:
//!
//! * page 0 of the map holds the kernel's `consumer_pos`; it is mapped read-only because the
//!   kernel refuses a writable mapping of it;
//! * page 1 holds our `producer_pos`, followed by the data area mapped twice in a row so that a
//!   sample that wraps past the end of the ring is still one contiguous slice;
//! * every sample is preceded by an 8-byte header whose first `u32` is the sample length with
//!   `BPF_RINGBUF_BUSY_BIT` set while user space is still writing it. The kernel's
//!   `bpf_user_ringbuf_drain` stops at the first busy sample and skips samples carrying
//!   `BPF_RINGBUF_DISCARD_BIT`.
//!
//! # Waiting for space, and the deadlock it can cause
//!
//! Space is only ever freed by a BPF program calling `bpf_user_ringbuf_drain`. A producer must
//! therefore **never block waiting for space that only its own drain would free**: if the thread
//! that calls [`UserRingBuf::reserve_blocking`] (or loops on [`UserRingBufError::Full`]) is also
//! the one that would trigger the drain program, it waits forever (or until its timeout). Such a
//! producer should use [`UserRingBuf::reserve`], and on [`UserRingBufError::Full`] (or when
//! [`UserRingBuf::available`] is below [`UserRingBuf::record_size`]) trigger the drain itself and
//! then retry. An unsubmitted sample also blocks the drain at its position, so hold samples
//! briefly and never [`std::mem::forget`] one.
//!
//! # Example
//!
//! ```no_run
//! use aya::EbpfLoader;
//! use bpftime_kernel_bridge::user_ringbuf::{UserRingBuf, UserRingBufError};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let object: &[u8] = &[];
//! let mut ebpf = EbpfLoader::new().allow_unsupported_maps().load(object)?;
//! let ring = UserRingBuf::from_map(ebpf.take_map("user_ringbuf").ok_or("no map")?)?;
//! let message = b"hello";
//! match ring.reserve(message.len()) {
//!     Ok(mut sample) => {
//!         sample.copy_from_slice(message);
//!         sample.submit();
//!     }
//!     // This thread also triggers the drain, so it must not wait: drain, then retry.
//!     Err(UserRingBufError::Full) => { /* run the drain program, retry */ }
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(())
//! # }
//! ```

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use std::{fmt, io};

use aya::maps::{Map, MapData};
use bpftime_abi::os::Access;
use bpftime_abi::sys::{self, SyscallError};
use bpftime_abi::{ringbuf, MapType, Mmap, UnknownMapType};
use parking_lot::Mutex;

/// Size of the header in front of every sample (`BPF_RINGBUF_HDR_SZ`).
pub const BPF_RINGBUF_HDR_SZ: usize = ringbuf::HDR_SZ;

/// The kernel hands each sample to the BPF callback as a `bpf_dynptr`, whose size field has 24
/// bits (`DYNPTR_MAX_SIZE`). A larger sample would make every later drain fail with `-E2BIG`
/// and wedge the ring for good, so it must be refused at reserve time.
const DYNPTR_MAX_SIZE: usize = (1 << 24) - 1;

/// Errors from [`UserRingBuf`].
#[derive(Debug, thiserror::Error)]
pub enum UserRingBufError {
    /// The ring has no room for the sample now; a drain by the BPF side will free space.
    #[error("user ringbuf is full")]
    Full,
    /// The sample can never fit, however much the ring is drained.
    #[error("sample of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Requested sample length.
        len: usize,
        /// [`UserRingBuf::max_sample_size`].
        max: usize,
    },
    /// [`UserRingBuf::reserve_blocking`] found no room before its timeout expired.
    #[error("timed out waiting for space in the user ringbuf")]
    Timeout,
    /// The map is not a `BPF_MAP_TYPE_USER_RINGBUF`.
    #[error("expected a BPF_MAP_TYPE_USER_RINGBUF map, found {found}")]
    WrongMapType {
        /// What the map is instead.
        found: String,
    },
    /// Querying the map's type and size (`BPF_OBJ_GET_INFO_BY_FD`) failed.
    #[error("user ringbuf map")]
    Info(#[source] SyscallError),
    /// A system call (`mmap`, `epoll_*`) failed.
    #[error("user ringbuf I/O: {0}")]
    Io(#[from] io::Error),
}

/// A `BPF_MAP_TYPE_USER_RINGBUF` producer.
///
/// `UserRingBuf` is `Send + Sync`: any number of threads may reserve through a shared reference.
/// Reservations are serialised by an internal lock (they must advance `producer_pos` in order);
/// [`UserRingBufSample::submit`] and [`UserRingBufSample::discard`] take no lock. The kernel
/// consumes samples in reservation order, so one slow writer delays the samples reserved after it.
///
/// See the [module documentation](self) for the rule about never waiting on one's own drain.
pub struct UserRingBuf {
    // Declared before `map` so the mappings are gone before the map fd is closed.
    consumer: Mmap,
    producer: Mmap,
    map: OwnedFd,
    /// Data area: `2 * capacity` bytes, the second half aliasing the first.
    data: NonNull<u8>,
    capacity: usize,
    mask: usize,
    max_sample_size: usize,
    reserve_lock: Mutex<()>,
}

// SAFETY: the raw pointers refer to the shared mappings owned by `self` and live as long as it.
// Shared state is only touched through atomics (`consumer_pos`, `producer_pos`, sample headers)
// or while holding `reserve_lock`; sample bytes are handed out to one `UserRingBufSample` at a
// time because reservations never overlap while unconsumed.
unsafe impl Send for UserRingBuf {}
// SAFETY: as for `Send`; every `&self` method synchronises through the lock or atomics.
unsafe impl Sync for UserRingBuf {}

impl fmt::Debug for UserRingBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRingBuf")
            .field("map", &self.map)
            .field("capacity", &self.capacity)
            .field("available", &self.available())
            .finish_non_exhaustive()
    }
}

impl UserRingBuf {
    /// Maps `map`, which must be a `BPF_MAP_TYPE_USER_RINGBUF`, for producing samples.
    ///
    /// Fails with [`UserRingBufError::WrongMapType`] for any other map type and with
    /// [`UserRingBufError::Io`] if the map cannot be mapped.
    pub fn new(map: MapData) -> Result<Self, UserRingBufError> {
        Self::from_fd(map.fd().as_fd().try_clone_to_owned()?)
    }

    /// Like [`UserRingBuf::new`], for a map fd (such as one of a libbpf-loaded object).
    pub fn from_fd(map: OwnedFd) -> Result<Self, UserRingBufError> {
        let info = sys::map_info(map.as_fd()).map_err(UserRingBufError::Info)?;
        if info.map_type != libbpf_rs::libbpf_sys::BPF_MAP_TYPE_USER_RINGBUF {
            return Err(UserRingBufError::WrongMapType {
                found: MapType::from_raw(info.map_type).map_or_else(
                    || UnknownMapType(info.map_type).to_string(),
                    |t| t.name().to_string(),
                ),
            });
        }
        let capacity = usize::try_from(info.max_entries).map_err(|_| invalid_size(0))?;
        let page_size = bpftime_abi::page_size();
        // The kernel enforces both at map creation; checking again keeps `mask` and the mapping
        // arithmetic below sound even for a map obtained from an unexpected source.
        if !capacity.is_power_of_two() || capacity % page_size != 0 {
            return Err(invalid_size(capacity).into());
        }
        let fd = map.as_fd();
        let consumer = Mmap::shared(fd, page_size, 0, Access::ReadOnly)?;
        let producer_len = capacity
            .checked_mul(2)
            .and_then(|n| n.checked_add(page_size))
            .ok_or_else(|| invalid_size(capacity))?;
        // The kernel maps the data pages twice itself (see `ringbuf_map_mmap_user`).
        let producer = Mmap::shared(fd, producer_len, page_size as u64, Access::ReadWrite)?;
        // SAFETY: the producer mapping is `page_size + 2 * capacity` bytes long, so the data
        // area starting one page in is inside it.
        let data = unsafe { producer.as_non_null().add(page_size) };
        Ok(Self {
            consumer,
            producer,
            map,
            data,
            capacity,
            mask: capacity - 1,
            max_sample_size: (capacity - BPF_RINGBUF_HDR_SZ).min(DYNPTR_MAX_SIZE),
            reserve_lock: Mutex::new(()),
        })
    }

    /// Like [`UserRingBuf::new`], taking the [`Map`] handed out by `Ebpf::take_map`
    /// (aya 0.14 reports a user ringbuf as [`Map::Unsupported`]).
    pub fn from_map(map: Map) -> Result<Self, UserRingBufError> {
        match map {
            Map::Unsupported(data) => Self::new(data),
            other => {
                // aya keeps the map type private; its Debug output starts with the variant name.
                let debug = format!("{other:?}");
                let variant = debug.split(['(', ' ', '{']).next().unwrap_or_default();
                Err(UserRingBufError::WrongMapType {
                    found: variant.to_owned(),
                })
            }
        }
    }

    /// The map's fd, e.g. to pin it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.map.as_fd()
    }

    /// Size of the data area in bytes (the map's `max_entries`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Largest `len` that [`UserRingBuf::reserve`] accepts.
    pub fn max_sample_size(&self) -> usize {
        self.max_sample_size
    }

    /// Ring bytes a sample of `len` bytes occupies: header plus payload, rounded up to 8.
    ///
    /// A reservation of `len` succeeds right now iff `record_size(len) <= available()`
    /// (barring concurrent producers and drains).
    pub const fn record_size(len: usize) -> usize {
        // `len` is at most `max_sample_size` in any reservation, so this cannot overflow there;
        // saturate so that absurd inputs give an absurd size rather than a wrapped small one.
        len.saturating_add(ringbuf::HDR_SZ + 7) & !7
    }

    /// Bytes free in the ring now, headers included: the drain program frees space, producers
    /// consume it. A snapshot, stale as soon as it is returned.
    pub fn available(&self) -> usize {
        let cons = self.consumer_pos().load(Ordering::Acquire);
        let prod = self.producer_pos().load(Ordering::Acquire);
        self.capacity.saturating_sub(prod.wrapping_sub(cons))
    }

    /// Reserves room for a sample of `len` bytes without waiting.
    ///
    /// The sample's bytes are not zeroed (they hold whatever an older sample left). Fill it
    /// through `DerefMut` and then [`submit`](UserRingBufSample::submit) it; dropping it
    /// unsubmitted discards it.
    ///
    /// # Errors
    /// [`UserRingBufError::TooLarge`] if `len > max_sample_size()`, [`UserRingBufError::Full`]
    /// if the ring lacks `record_size(len)` free bytes now.
    pub fn reserve(&self, len: usize) -> Result<UserRingBufSample<'_>, UserRingBufError> {
        if len > self.max_sample_size {
            return Err(UserRingBufError::TooLarge {
                len,
                max: self.max_sample_size,
            });
        }
        let total = Self::record_size(len);
        let _guard = self.reserve_lock.lock();
        // Acquire pairs with the kernel's smp_store_release(&rb->consumer_pos) in
        // __bpf_user_ringbuf_sample_release(): the samples before it were read, their space
        // may be reused.
        let cons = self.consumer_pos().load(Ordering::Acquire);
        // Only producers write `producer_pos`, and they all hold `reserve_lock`.
        let prod = self.producer_pos().load(Ordering::Relaxed);
        let used = prod.wrapping_sub(cons);
        if self.capacity.saturating_sub(used) < total {
            return Err(UserRingBufError::Full);
        }
        let header = self.header_at(prod);
        // `len <= DYNPTR_MAX_SIZE < 2^24`, so it fits and leaves the flag bits clear.
        let len32 = len as u32;
        header[0].store(len32 | ringbuf::BUSY_BIT, Ordering::Relaxed);
        header[1].store(0, Ordering::Relaxed);
        // Release publishes the busy header before the new producer_pos; pairs with
        // smp_load_acquire(&rb->producer_pos) in the kernel's __bpf_user_ringbuf_peek(), which
        // then reads the header.
        self.producer_pos()
            .store(prod.wrapping_add(total), Ordering::Release);
        let offset = prod.wrapping_add(BPF_RINGBUF_HDR_SZ) & self.mask;
        // SAFETY: offset < capacity and len <= capacity - HDR_SZ, so the slice lies within the
        // 2 * capacity double-mapped data area.
        let payload = unsafe { self.data.add(offset) };
        Ok(UserRingBufSample {
            header: &header[0],
            payload,
            len,
            len32,
            _ring: PhantomData,
        })
    }

    /// Reserves room for a sample of `len` bytes, waiting up to `timeout` for a drain to free
    /// enough space.
    ///
    /// Waits with `epoll` on the map fd: the kernel wakes producers after a drain that consumed
    /// at least one sample (unless the BPF program passed `BPF_RB_NO_WAKEUP`). Each waiting call
    /// uses its own edge-triggered epoll instance, so every blocked producer thread is woken by
    /// every drain and none can miss a wakeup between a failed attempt and its wait.
    ///
    /// A `timeout` too large to add to [`Instant::now`] waits without limit.
    ///
    /// Never call this from the thread that would run the drain: see the
    /// [module documentation](self).
    ///
    /// # Errors
    /// [`UserRingBufError::TooLarge`] at once if the sample can never fit,
    /// [`UserRingBufError::Timeout`] if no room appeared in time, [`UserRingBufError::Io`] if
    /// epoll fails.
    pub fn reserve_blocking(
        &self,
        len: usize,
        timeout: Duration,
    ) -> Result<UserRingBufSample<'_>, UserRingBufError> {
        match self.reserve(len) {
            Err(UserRingBufError::Full) => {}
            done => return done,
        }
        let deadline = Instant::now().checked_add(timeout);
        // Registering before the next attempt means a drain that completes between that attempt
        // and epoll_wait still leaves an event behind.
        let waiter = SpaceWaiter::new(self.map.as_fd())?;
        loop {
            match self.reserve(len) {
                Err(UserRingBufError::Full) => {}
                done => return done,
            }
            let remaining = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if remaining.is_zero() {
                return Err(UserRingBufError::Timeout);
            }
            waiter.wait(remaining)?;
        }
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the consumer page starts with the kernel's `unsigned long consumer_pos`,
        // page-aligned and therefore aligned for AtomicUsize; the mapping lives as long as self.
        // The kernel writes it concurrently, hence atomic access only.
        unsafe { &*self.consumer.as_ptr().cast::<AtomicUsize>() }
    }

    fn producer_pos(&self) -> &AtomicUsize {
        // SAFETY: as for `consumer_pos`, on the first page of the producer mapping, which holds
        // `unsigned long producer_pos`.
        unsafe { &*self.producer.as_ptr().cast::<AtomicUsize>() }
    }

    /// The two header words of the record starting at ring position `pos`.
    fn header_at(&self, pos: usize) -> &[AtomicU32; 2] {
        let offset = pos & self.mask;
        // SAFETY: positions advance in multiples of 8 from 0, so `offset` is 8-aligned and
        // `offset + 8 <= capacity` (capacity is a multiple of the page size): the header is in
        // bounds and aligned for AtomicU32. The kernel reads it concurrently, hence atomics.
        unsafe { self.data.add(offset).cast::<[AtomicU32; 2]>().as_ref() }
    }
}

/// A reserved, not yet submitted sample in a [`UserRingBuf`].
///
/// Derefs to the sample's bytes. Finish it with [`submit`](Self::submit) or
/// [`discard`](Self::discard); dropping it discards it. Until then the kernel's drain stops at
/// this sample, so do not hold it longer than needed.
pub struct UserRingBufSample<'a> {
    header: &'a AtomicU32,
    payload: NonNull<u8>,
    len: usize,
    len32: u32,
    _ring: PhantomData<&'a UserRingBuf>,
}

// SAFETY: the sample exclusively owns its byte range until it is committed, and committing is a
// single atomic store; nothing ties it to the reserving thread.
unsafe impl Send for UserRingBufSample<'_> {}
// SAFETY: `&UserRingBufSample` only allows reading the bytes it exclusively owns.
unsafe impl Sync for UserRingBufSample<'_> {}

impl UserRingBufSample<'_> {
    /// Hands the sample to the kernel; the next drain passes it to the BPF callback.
    pub fn submit(self) {
        let header = self.len32;
        self.commit(header);
    }

    /// Releases the sample's space without the kernel ever passing it to the BPF callback.
    pub fn discard(self) {
        let header = self.len32 | ringbuf::DISCARD_BIT;
        self.commit(header);
    }

    fn commit(self, header: u32) {
        // Release makes the payload written through DerefMut visible to the kernel; pairs with
        // smp_load_acquire(hdr) in __bpf_user_ringbuf_peek() before it reads the sample
        // (libbpf's user_ringbuf_commit() does the same).
        self.header.store(header, Ordering::Release);
        std::mem::forget(self);
    }
}

impl Drop for UserRingBufSample<'_> {
    fn drop(&mut self) {
        self.header
            .store(self.len32 | ringbuf::DISCARD_BIT, Ordering::Release);
    }
}

impl Deref for UserRingBufSample<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `payload..payload + len` lies in the data area (checked in `reserve`), belongs
        // to this sample alone until it is committed (the kernel does not read busy samples and
        // other reservations never overlap an unconsumed one), and lives as long as the ring.
        unsafe { std::slice::from_raw_parts(self.payload.as_ptr(), self.len) }
    }
}

impl DerefMut for UserRingBufSample<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only live view of the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.payload.as_ptr(), self.len) }
    }
}

impl fmt::Debug for UserRingBufSample<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRingBufSample")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// An edge-triggered epoll registration for "the drain freed space" on a user ringbuf fd.
struct SpaceWaiter {
    epoll: OwnedFd,
}

impl SpaceWaiter {
    fn new(map_fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        // Edge-triggered: the map polls writable whenever the ring is not completely full, so a
        // level-triggered wait would spin while the free space is too small for our sample.
        let mut event = libc::epoll_event {
            events: (libc::EPOLLOUT | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: both fds are valid for the call and `event` outlives it.
        let rc = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                map_fd.as_raw_fd(),
                &mut event,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { epoll })
    }

    /// Waits until a wakeup arrives or `timeout` passes; spurious returns are fine, the caller
    /// retries its reservation.
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        // Round up so a sub-millisecond remainder still sleeps instead of spinning.
        let millis = timeout.as_nanos().div_ceil(1_000_000);
        let millis = i32::try_from(millis).unwrap_or(i32::MAX);
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: `event` is valid for one entry, matching maxevents = 1.
        let rc = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut event, 1, millis) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(())
    }
}

fn invalid_size(capacity: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("user ringbuf size {capacity} is not a power-of-two multiple of the page size"),
    )
}

#[cfg(test)]
mod tests {
    //! The checks `from_fd` makes before mapping anything, with the map's info chosen through
    //! `sys`'s test override (no root).

    use bpftime_abi::sys::{fake, Call, MapInfo};

    use super::*;

    fn with_info(info: Result<MapInfo, i32>) -> fake::Override {
        fake::install(move |call: &mut Call<'_>| {
            if let Call::MapInfo { info: out, .. } = call {
                **out = info.clone()?;
            }
            Ok(fake::success(call))
        })
    }

    #[test]
    fn a_failing_info_query_keeps_its_errno() {
        let _fake = with_info(Err(libc::EBADF));
        match UserRingBuf::from_fd(fake::dummy_fd()).unwrap_err() {
            UserRingBufError::Info(e) => {
                assert_eq!((e.call, e.errno()), ("BPF_OBJ_GET_INFO_BY_FD", libc::EBADF));
            }
            other => panic!("expected Info, got {other:?}"),
        }
    }

    #[test]
    fn another_map_type_is_named() {
        let _fake = with_info(Ok(MapInfo {
            map_type: MapType::Array.as_raw(),
            max_entries: 4096,
            ..MapInfo::default()
        }));
        match UserRingBuf::from_fd(fake::dummy_fd()).unwrap_err() {
            UserRingBufError::WrongMapType { found } => assert_eq!(found, "array"),
            other => panic!("expected WrongMapType, got {other:?}"),
        }
    }

    #[test]
    fn a_size_that_is_no_power_of_two_pages_is_refused_before_mapping() {
        let _fake = with_info(Ok(MapInfo {
            map_type: libbpf_rs::libbpf_sys::BPF_MAP_TYPE_USER_RINGBUF,
            max_entries: 3 * bpftime_abi::page_size() as u32,
            ..MapInfo::default()
        }));
        match UserRingBuf::from_fd(fake::dummy_fd()).unwrap_err() {
            UserRingBufError::Io(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
            other => panic!("expected Io, got {other:?}"),
        }
    }
}
