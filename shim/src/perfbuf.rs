//! Perf buffers (libbpf's `perf_buffer`, aya's `PerfEventArray`): per CPU a
//! `PERF_COUNT_SW_BPF_OUTPUT` event, a `(1 + 2^n)`-page mapping of it read as a
//! `perf_event_mmap_page` and a ring of perf records, its descriptor stored in the
//! PERF_EVENT_ARRAY under the CPU's index and waited on with epoll.
//!
//! Programs running in targets write `bpf_perf_event_output` records into the object's shared
//! PERF_EVENT_ARRAY rings (one per CPU); the shim's watcher moves each record into the
//! application's ring of that CPU as the kernel writes it (`perf_output_sample`: a
//! `PERF_RECORD_SAMPLE` header, the raw size, the data padded to 8 bytes; a `PERF_RECORD_LOST`
//! when the application's ring was full), publishes the head with release order
//! (`perf_output_put_handle`'s `smp_store_release` of `data_head`, which libbpf's
//! `ring_buffer_read_head` pairs with) and keeps the event's readiness eventfd readable while
//! records wait. The event's descriptor is a memfd holding that mapping.

use std::mem::offset_of;
use std::sync::atomic::{AtomicU64, Ordering};

use bpftime_runtime::maps::{MapHandle, RingBufConsumer};
use libbpf_sys as sys;

use crate::raw;

/// Offsets of the positions in `perf_event_mmap_page`.
const DATA_HEAD: usize = offset_of!(sys::perf_event_mmap_page, data_head);
const DATA_TAIL: usize = offset_of!(sys::perf_event_mmap_page, data_tail);
const DATA_OFFSET: usize = offset_of!(sys::perf_event_mmap_page, data_offset);
const DATA_SIZE: usize = offset_of!(sys::perf_event_mmap_page, data_size);

/// One BPF_OUTPUT event the application opened.
pub(crate) struct PerfBufRec {
    /// The memfd the application holds and maps.
    pub memfd: i32,
    /// The shim's own mapping of it (address, length), once the application mapped it.
    pub mapping: Option<(usize, usize)>,
    /// Readable while records wait (what `epoll_ctl` registers instead of the memfd).
    pub eventfd: i32,
    pub open: u32,
}

/// Whether `perf_event_open` asks for a BPF_OUTPUT software event.
pub(crate) fn is_bpf_output(ty: u32, config: u64) -> bool {
    ty == sys::PERF_TYPE_SOFTWARE && config == u64::from(sys::PERF_COUNT_SW_BPF_OUTPUT)
}

/// A new event: its memfd and readiness eventfd (or `-errno`). Which CPU's records it gets is
/// decided by the PERF_EVENT_ARRAY slot it is stored in, as `bpf_perf_event_output` with
/// BPF_F_CURRENT_CPU picks the slot of the CPU it runs on.
pub(crate) fn create(cloexec: bool) -> Result<PerfBufRec, i64> {
    let name = c"bpftime-perf-buffer";
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: a NUL-terminated name.
    let memfd = unsafe {
        raw::syscall3(
            libc::SYS_memfd_create,
            name.as_ptr() as i64,
            i64::from(flags),
            0,
        )
    };
    if memfd < 0 {
        return Err(memfd);
    }
    let eventfd = raw::eventfd(true);
    if eventfd < 0 {
        raw::close(memfd as i32);
        return Err(eventfd);
    }
    Ok(PerfBufRec {
        memfd: memfd as i32,
        mapping: None,
        eventfd: eventfd as i32,
        open: 1,
    })
}

/// The application maps `rec`: one header page and a power-of-two data area. Sizes the
/// memfd, maps it for the shim too, and fills the header.
pub(crate) fn mmap(
    rec: &mut PerfBufRec,
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    offset: i64,
) -> i64 {
    let pg = bpftime_abi::page_size();
    let data = len.saturating_sub(pg);
    if offset != 0 || data == 0 || !data.is_power_of_two() || !data.is_multiple_of(pg) {
        return -i64::from(libc::EINVAL);
    }
    if rec.mapping.is_none() {
        // SAFETY: ftruncate of our own memfd.
        let r = unsafe { raw::syscall3(libc::SYS_ftruncate, rec.memfd.into(), len as i64, 0) };
        if r < 0 {
            return r;
        }
        // SAFETY: a new shared mapping of our memfd, of its size.
        let base = unsafe {
            raw::mmap(
                0,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                rec.memfd,
                0,
            )
        };
        if base < 0 {
            return base;
        }
        // SAFETY: the header page of the mapping just made; u64 fields at their UAPI offsets.
        unsafe {
            let h = base as *mut u8;
            *(h.add(DATA_OFFSET) as *mut u64) = pg as u64;
            *(h.add(DATA_SIZE) as *mut u64) = data as u64;
        }
        rec.mapping = Some((base as usize, len));
    }
    // SAFETY: the application's own mapping request, of the memfd.
    unsafe { raw::mmap(addr, len, prot, flags, rec.memfd, 0) }
}

/// One application ring a PERF_EVENT_ARRAY slot names.
pub(crate) struct PerfOut {
    /// The array index (the CPU whose records it receives).
    pub key: u32,
    /// The event's memfd (to unbind it when it is closed or the slot deleted).
    pub memfd: i32,
    base: usize,
    len: usize,
    eventfd: i32,
    signalled: bool,
    lost: u64,
}

impl PerfOut {
    /// A slot's ring: `rec` must be mapped.
    pub fn new(key: u32, rec: &PerfBufRec) -> Option<Self> {
        let (base, len) = rec.mapping?;
        Some(Self {
            key,
            memfd: rec.memfd,
            base,
            len,
            eventfd: rec.eventfd,
            signalled: false,
            lost: 0,
        })
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: inside the live header page; 8-aligned.
        unsafe { &*((self.base + DATA_HEAD) as *const AtomicU64) }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as above.
        unsafe { &*((self.base + DATA_TAIL) as *const AtomicU64) }
    }

    /// Appends one record of `parts` (their total a multiple of 8), if it fits.
    fn put(&mut self, parts: &[&[u8]]) -> bool {
        let pg = bpftime_abi::page_size();
        let size = (self.len - pg) as u64;
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let head = self.head().load(Ordering::Relaxed);
        // Acquire: the reader's records are consumed before we overwrite them (libbpf's
        // `ring_buffer_write_tail` stores the tail with release order).
        let tail = self.tail().load(Ordering::Acquire);
        if head.wrapping_sub(tail) > size || size - head.wrapping_sub(tail) < total {
            return false;
        }
        let data = (self.base + pg) as *mut u8;
        let mut at = head;
        for part in parts {
            for &b in *part {
                // SAFETY: the offset is reduced modulo the data size, inside the mapping.
                unsafe { *data.add((at % size) as usize) = b };
                at += 1;
            }
        }
        // Release: the record's bytes before the head that publishes them.
        self.head().store(head + total, Ordering::Release);
        true
    }

    /// Writes one sample as the kernel's `perf_output_sample` does for PERF_SAMPLE_RAW.
    pub fn sample(&mut self, data: &[u8]) {
        if self.lost > 0 {
            let mut lost = Vec::with_capacity(24);
            lost.extend_from_slice(&sys::PERF_RECORD_LOST.to_le_bytes());
            lost.extend_from_slice(&0u16.to_le_bytes());
            lost.extend_from_slice(&24u16.to_le_bytes());
            lost.extend_from_slice(&0u64.to_le_bytes());
            lost.extend_from_slice(&self.lost.to_le_bytes());
            if !self.put(&[&lost]) {
                self.lost += 1;
                return;
            }
            self.lost = 0;
        }
        let raw = (data.len() + 4).next_multiple_of(8) - 4;
        let size = 8 + 4 + raw;
        let Ok(size16) = u16::try_from(size) else {
            self.lost += 1;
            return;
        };
        let mut head = Vec::with_capacity(12);
        head.extend_from_slice(&sys::PERF_RECORD_SAMPLE.to_le_bytes());
        head.extend_from_slice(&0u16.to_le_bytes());
        head.extend_from_slice(&size16.to_le_bytes());
        head.extend_from_slice(&(raw as u32).to_le_bytes());
        let pad = vec![0u8; raw - data.len()];
        if !self.put(&[&head, data, &pad]) {
            self.lost += 1;
        }
    }

    /// Keeps the readiness eventfd readable exactly while records wait.
    pub fn update_readiness(&mut self) {
        let waiting = self.head().load(Ordering::Relaxed) != self.tail().load(Ordering::Acquire);
        if waiting && !self.signalled {
            raw::eventfd_signal(self.eventfd);
            self.signalled = true;
        } else if !waiting && self.signalled {
            raw::eventfd_clear(self.eventfd);
            self.signalled = false;
        }
    }
}

/// One PERF_EVENT_ARRAY whose slots the application filled: the shared rings it drains and
/// the application rings it fills.
pub(crate) struct PerfPump {
    pub map: MapHandle,
    consumer: RingBufConsumer,
    pub outs: Vec<PerfOut>,
}

impl PerfPump {
    pub fn new(map: MapHandle) -> Option<Self> {
        let consumer = RingBufConsumer::new(&map).ok()?;
        Some(Self {
            map,
            consumer,
            outs: Vec::new(),
        })
    }

    /// Moves every waiting record to its CPU's application ring (records for a CPU without
    /// one are dropped, as the kernel fails such an output with ENOENT); returns how many were
    /// moved, or 1 if none was but the application has records left to read (its readiness
    /// must be cleared once it has).
    pub fn pump(&mut self) -> usize {
        let outs = &mut self.outs;
        let n = self.consumer.poll(|record| {
            if let Some(out) = outs.iter_mut().find(|o| o.key == record.ring) {
                out.sample(record.data);
            }
        });
        for out in outs.iter_mut() {
            out.update_readiness();
        }
        if n == 0 && outs.iter().any(|o| o.signalled) {
            return 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header page and a 1-page ring in plain memory, as a reader would see them.
    fn ring() -> (Vec<u64>, PerfOut) {
        let pg = bpftime_abi::page_size();
        let mut mem = vec![0u64; 2 * pg / 8];
        let out = PerfOut {
            key: 0,
            memfd: -1,
            base: mem.as_mut_ptr() as usize,
            len: 2 * pg,
            eventfd: -1,
            signalled: false,
            lost: 0,
        };
        (mem, out)
    }

    fn bytes_at(out: &PerfOut, pos: u64, n: usize) -> Vec<u8> {
        let pg = bpftime_abi::page_size();
        let size = (out.len - pg) as u64;
        (0..n as u64)
            // SAFETY: inside the test ring, reduced modulo its size.
            .map(|i| unsafe { *((out.base + pg) as *const u8).add(((pos + i) % size) as usize) })
            .collect()
    }

    #[test]
    fn samples_are_written_as_the_kernel_writes_raw_samples() {
        let (_mem, mut out) = ring();
        out.sample(&[1, 2, 3, 4, 5]);
        // header {type 9, misc 0, size 8+4+12}, raw size 12 (5 padded so that 4 + 12 is 16).
        assert_eq!(out.head().load(Ordering::Relaxed), 24);
        let rec = bytes_at(&out, 0, 24);
        assert_eq!(&rec[..4], &sys::PERF_RECORD_SAMPLE.to_le_bytes());
        assert_eq!(&rec[6..8], &24u16.to_le_bytes());
        assert_eq!(&rec[8..12], &12u32.to_le_bytes());
        assert_eq!(&rec[12..17], &[1, 2, 3, 4, 5]);
        assert!(rec[17..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_full_ring_counts_lost_records_and_reports_them_once_there_is_room() {
        let (_mem, mut out) = ring();
        let pg = bpftime_abi::page_size() as u64;
        // 8 + 4 + 116 = 128 bytes a record: the ring fills exactly, no room even for a LOST.
        let sample = vec![7u8; 116];
        let fits = pg / 128;
        for _ in 0..fits + 3 {
            out.sample(&sample);
        }
        assert_eq!(out.head().load(Ordering::Relaxed), fits * 128);
        assert_eq!(out.lost, 3);
        // The reader consumes everything; the next sample is preceded by a LOST record.
        out.tail().store(fits * 128, Ordering::Release);
        out.sample(&sample);
        let lost = bytes_at(&out, fits * 128, 24);
        assert_eq!(&lost[..4], &sys::PERF_RECORD_LOST.to_le_bytes());
        assert_eq!(&lost[16..24], &3u64.to_le_bytes());
        assert_eq!(out.lost, 0);
        // ... and the sample itself follows it (wrapping past the ring's end, as positions
        // are reduced modulo the size).
        let rec = bytes_at(&out, fits * 128 + 24, 128);
        assert_eq!(&rec[..4], &sys::PERF_RECORD_SAMPLE.to_le_bytes());
        assert_eq!(&rec[12..128], &sample[..]);
        assert_eq!(out.head().load(Ordering::Relaxed), fits * 128 + 24 + 128);
    }
}
