//! `UserRingBuf` against the real kernel: `ebpf/user_ringbuf_test.bpf.c` drains the user ringbuf
//! on demand (an XDP program run with BPF_PROG_TEST_RUN) and echoes every sample through a
//! kernel ringbuf that the tests read back with aya's `RingBuf`.
//!
//! Every sample starts with its own length (u32) and a sequence number (u32); the BPF side checks
//! the length against the kernel's sample size and echoes up to `ECHO_MAX` bytes.
//!
//! These tests need CAP_BPF. Without it they fail, unless `BPFTIME_SKIP_KERNEL_TESTS=1` is set,
//! in which case they print that they were skipped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
use bpftime_kernel_bridge::user_ringbuf::{UserRingBuf, UserRingBufError, BPF_RINGBUF_HDR_SZ};

/// Must match `ebpf/user_ringbuf_test.bpf.c`.
const ECHO_MAX: usize = 256;
const LEN_SHORT: u32 = u32::MAX;
const RING_CAPACITY: usize = 16 * 1024;
const PREFIX: usize = 8;

/// Each test loads its own object, so no kernel object is shared; they still run one at a time
/// because the blocking and multi-threaded tests time drains and wakeups, which a concurrently
/// running test on a two-core machine would distort.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Fixture {
    ebpf: Ebpf,
    ring: UserRingBuf,
    echo: RingBuf<MapData>,
}

/// One echoed sample, as `struct echo_rec` in the BPF program.
#[derive(Debug)]
struct Echo {
    len: u32,
    len_exact: bool,
    data: Vec<u8>,
}

impl Echo {
    fn seq(&self) -> u32 {
        u32::from_ne_bytes(self.data[4..8].try_into().expect("4 bytes"))
    }
}

fn fixture(test: &str) -> Option<Fixture> {
    if bpftime_testutils::skip_requested() {
        bpftime_testutils::record_skip(test, "BPFTIME_SKIP_KERNEL_TESTS=1");
        return None;
    }
    // aya's errors keep the errno in their source, which plain Display leaves out.
    match try_fixture().map_err(|e| bpftime_testutils::error_chain(&*e)) {
        Ok(fixture) => Some(fixture),
        Err(err) => panic!(
            "cannot load the test BPF object: {err}. These tests need root or CAP_BPF on \
             Linux >= 6.1; set BPFTIME_SKIP_KERNEL_TESTS=1 to skip them explicitly."
        ),
    }
}

fn try_fixture() -> Result<Fixture, Box<dyn std::error::Error>> {
    // aya 0.14 creates user ringbuf maps only when told that it cannot wrap them itself.
    let mut ebpf = EbpfLoader::new()
        .allow_unsupported_maps()
        .load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/user_ringbuf_test.bpf.o"
        )))?;
    let program: &mut Xdp = ebpf
        .program_mut("drain")
        .ok_or("program `drain` missing")?
        .try_into()?;
    program.load()?;
    let ring = UserRingBuf::from_map(ebpf.take_map("user_ringbuf").ok_or("no user_ringbuf")?)?;
    let echo = RingBuf::try_from(ebpf.take_map("echo").ok_or("no echo map")?)?;
    Ok(Fixture { ebpf, ring, echo })
}

/// Runs the drain program once; returns what `bpf_user_ringbuf_drain` returned.
fn drain(ebpf: &Ebpf) -> i64 {
    let program: &Xdp = ebpf
        .program("drain")
        .expect("drain program")
        .try_into()
        .expect("an XDP program");
    let packet = [0u8; 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN of the drain program");
    i64::from(result.return_value as i32)
}

fn read_echoes(echo: &mut RingBuf<MapData>) -> Vec<Echo> {
    let mut out = Vec::new();
    while let Some(item) = echo.next() {
        let word = |i: usize| u32::from_ne_bytes(item[i * 4..i * 4 + 4].try_into().expect("u32"));
        let copied = word(2) as usize;
        out.push(Echo {
            len: word(0),
            len_exact: word(1) == 1,
            data: item[16..16 + copied].to_vec(),
        });
    }
    out
}

fn echo_drops(ebpf: &Ebpf) -> u64 {
    let drops: aya::maps::Array<_, u64> = ebpf
        .map("echo_drops")
        .expect("echo_drops map")
        .try_into()
        .expect("array");
    drops.get(&0, 0).expect("echo_drops[0]")
}

/// Byte `i` of sample `seq` past its prefix, so that any misplaced byte is detected.
fn pattern(seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(31) as usize + i * 7) as u8
}

/// Fills a sample with its length, `seq` and the pattern.
fn fill(sample: &mut [u8], seq: u32) {
    let len = sample.len() as u32;
    sample[..4].copy_from_slice(&len.to_ne_bytes());
    sample[4..8].copy_from_slice(&seq.to_ne_bytes());
    for (i, byte) in sample.iter_mut().enumerate().skip(PREFIX) {
        *byte = pattern(seq, i);
    }
}

fn send(ring: &UserRingBuf, len: usize, seq: u32) -> Result<(), UserRingBufError> {
    let mut sample = ring.reserve(len)?;
    fill(&mut sample, seq);
    sample.submit();
    Ok(())
}

/// Checks an echo against the sample `send(_, len, seq)` wrote.
fn check_echo(echo: &Echo, len: usize, seq: u32) {
    assert_eq!(echo.len as usize, len, "length prefix of sample {seq}");
    assert!(
        echo.len_exact,
        "kernel sample size != {len} for sample {seq}"
    );
    assert_eq!(
        echo.data.len(),
        len.min(ECHO_MAX),
        "echoed bytes of sample {seq}"
    );
    assert_eq!(echo.seq(), seq);
    for (i, &byte) in echo.data.iter().enumerate().skip(PREFIX) {
        assert_eq!(
            byte,
            pattern(seq, i),
            "byte {i} of sample {seq} (len {len})"
        );
    }
}

#[test]
fn submitted_samples_reach_the_kernel_in_order() {
    let _serial = serial();
    let Some(mut fx) = fixture("submitted_samples_reach_the_kernel_in_order") else {
        return;
    };
    assert_eq!(fx.ring.capacity(), RING_CAPACITY);
    assert_eq!(fx.ring.available(), RING_CAPACITY);

    send(&fx.ring, 40, 1).expect("reserve 40");
    send(&fx.ring, 8, 2).expect("reserve 8");
    send(&fx.ring, 301, 3).expect("reserve 301");
    assert_eq!(
        fx.ring.available(),
        RING_CAPACITY
            - [40, 8, 301]
                .map(UserRingBuf::record_size)
                .iter()
                .sum::<usize>()
    );
    // Shorter than the 4-byte length prefix: the BPF side reports it as LEN_SHORT.
    fx.ring.reserve(0).expect("reserve 0").submit();

    assert_eq!(drain(&fx.ebpf), 4);
    let echoes = read_echoes(&mut fx.echo);
    assert_eq!(echoes.len(), 4);
    check_echo(&echoes[0], 40, 1);
    check_echo(&echoes[1], 8, 2);
    check_echo(&echoes[2], 301, 3);
    assert_eq!(echoes[3].len, LEN_SHORT);
    assert_eq!(fx.ring.available(), RING_CAPACITY);

    // Nothing left: a second drain finds no sample.
    assert_eq!(drain(&fx.ebpf), 0);
    assert!(read_echoes(&mut fx.echo).is_empty());
    assert_eq!(echo_drops(&fx.ebpf), 0);
}

#[test]
fn other_map_types_are_refused() {
    let _serial = serial();
    let Some(mut fx) = fixture("other_map_types_are_refused") else {
        return;
    };
    let array = fx.ebpf.take_map("echo_drops").expect("echo_drops map");
    match UserRingBuf::from_map(array) {
        Err(UserRingBufError::WrongMapType { found }) => assert_eq!(found, "Array"),
        other => panic!("an array map was accepted: {other:?}"),
    }
}

#[test]
fn discarded_and_dropped_samples_are_skipped_by_the_drain() {
    let _serial = serial();
    let Some(mut fx) = fixture("discarded_and_dropped_samples_are_skipped_by_the_drain") else {
        return;
    };

    send(&fx.ring, 16, 1).expect("reserve");
    let mut discarded = fx.ring.reserve(64).expect("reserve");
    fill(&mut discarded, 2);
    discarded.discard();
    let mut dropped = fx.ring.reserve(24).expect("reserve");
    fill(&mut dropped, 3);
    drop(dropped);
    send(&fx.ring, 32, 4).expect("reserve");

    // The drain counts only the samples it passed to the callback.
    assert_eq!(drain(&fx.ebpf), 2);
    let echoes = read_echoes(&mut fx.echo);
    assert_eq!(echoes.len(), 2, "{echoes:?}");
    check_echo(&echoes[0], 16, 1);
    check_echo(&echoes[1], 32, 4);
    // Discarded samples' space is reclaimed too.
    assert_eq!(fx.ring.available(), RING_CAPACITY);
}

#[test]
fn unsubmitted_sample_holds_back_later_ones() {
    let _serial = serial();
    let Some(mut fx) = fixture("unsubmitted_sample_holds_back_later_ones") else {
        return;
    };

    send(&fx.ring, 16, 1).expect("reserve");
    let mut pending = fx.ring.reserve(16).expect("reserve");
    fill(&mut pending, 2);
    send(&fx.ring, 16, 3).expect("reserve");

    // The drain stops at the busy sample.
    assert_eq!(drain(&fx.ebpf), 1);
    pending.submit();
    assert_eq!(drain(&fx.ebpf), 2);
    let echoes = read_echoes(&mut fx.echo);
    let seqs: Vec<u32> = echoes.iter().map(Echo::seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[test]
fn full_ring_reports_full_until_drained() {
    let _serial = serial();
    let Some(mut fx) = fixture("full_ring_reports_full_until_drained") else {
        return;
    };

    let record = UserRingBuf::record_size(1000);
    assert_eq!(record, 1008);
    let fitting = RING_CAPACITY / record;
    for seq in 0..fitting {
        send(&fx.ring, 1000, seq as u32).expect("ring has room");
    }
    assert!(matches!(fx.ring.reserve(1000), Err(UserRingBufError::Full)));
    // The remainder still takes a sample that fits it exactly...
    let rest = RING_CAPACITY - fitting * record;
    assert_eq!(fx.ring.available(), rest);
    send(&fx.ring, rest - BPF_RINGBUF_HDR_SZ, 99).expect("exact fit");
    assert_eq!(fx.ring.available(), 0);
    // ...after which even an empty sample (a bare header) is refused.
    assert!(matches!(fx.ring.reserve(0), Err(UserRingBufError::Full)));

    assert_eq!(drain(&fx.ebpf), fitting as i64 + 1);
    assert_eq!(read_echoes(&mut fx.echo).len(), fitting + 1);
    assert_eq!(fx.ring.available(), RING_CAPACITY);
    send(&fx.ring, 1000, 100).expect("room after the drain");
}

#[test]
fn oversize_sample_reports_too_large() {
    let _serial = serial();
    let Some(mut fx) = fixture("oversize_sample_reports_too_large") else {
        return;
    };

    let max = fx.ring.max_sample_size();
    assert_eq!(max, RING_CAPACITY - BPF_RINGBUF_HDR_SZ);
    for len in [max + 1, RING_CAPACITY, usize::MAX] {
        match fx.ring.reserve(len) {
            Err(UserRingBufError::TooLarge { len: l, max: m }) => assert_eq!((l, m), (len, max)),
            other => panic!("reserve({len}) gave {other:?}"),
        }
        // Waiting cannot help, so the blocking variant must not wait either.
        let started = Instant::now();
        assert!(matches!(
            fx.ring.reserve_blocking(len, Duration::from_secs(5)),
            Err(UserRingBufError::TooLarge { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    // The largest sample fills the whole ring.
    send(&fx.ring, max, 7).expect("max-size sample");
    assert_eq!(fx.ring.available(), 0);
    assert_eq!(drain(&fx.ebpf), 1);
    let echoes = read_echoes(&mut fx.echo);
    assert_eq!(echoes.len(), 1);
    check_echo(&echoes[0], max, 7);
}

/// Deterministic sample sizes (no dependency on a seeded RNG's algorithm).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % bound
    }
}

#[test]
fn wraparound_over_many_rounds_keeps_contents_intact() {
    let _serial = serial();
    let Some(mut fx) = fixture("wraparound_over_many_rounds_keeps_contents_intact") else {
        return;
    };

    let mut sizes = Lcg(0x5eed);
    let mut pos = 0usize; // our model of producer_pos
    let mut seq = 0u32;
    let mut straddled_echoed_bytes = 0;
    for round in 0..300 {
        let mut sent = Vec::new();
        loop {
            // Mostly small samples, sometimes large ones, at every alignment.
            let len = if sizes.next(8) == 0 {
                PREFIX + sizes.next(3000)
            } else {
                PREFIX + sizes.next(300)
            };
            match send(&fx.ring, len, seq) {
                Ok(()) => {}
                Err(UserRingBufError::Full) => break,
                Err(err) => panic!("round {round}: {err}"),
            }
            let start = (pos + BPF_RINGBUF_HDR_SZ) % RING_CAPACITY;
            if start + len.min(ECHO_MAX) > RING_CAPACITY {
                straddled_echoed_bytes += 1;
            }
            pos += UserRingBuf::record_size(len);
            sent.push((len, seq));
            seq += 1;
        }
        assert!(!sent.is_empty(), "round {round} sent nothing");
        assert_eq!(drain(&fx.ebpf), sent.len() as i64, "round {round}");
        let echoes = read_echoes(&mut fx.echo);
        assert_eq!(echoes.len(), sent.len(), "round {round}");
        for (echo, &(len, seq)) in echoes.iter().zip(&sent) {
            check_echo(echo, len, seq);
        }
        assert_eq!(fx.ring.available(), RING_CAPACITY);
    }
    assert!(
        pos > 50 * RING_CAPACITY,
        "only wrapped {} times",
        pos / RING_CAPACITY
    );
    assert!(
        straddled_echoed_bytes > 10,
        "only {straddled_echoed_bytes} samples had verified bytes on both sides of the wrap"
    );
    assert_eq!(echo_drops(&fx.ebpf), 0);
}

/// Fills the ring with 1000-byte samples; returns how many were sent.
fn fill_ring(ring: &UserRingBuf) -> usize {
    let mut sent = 0;
    while send(ring, 1000, sent as u32).is_ok() {
        sent += 1;
    }
    sent
}

#[test]
fn reserve_blocking_times_out_on_a_full_ring() {
    let _serial = serial();
    let Some(fx) = fixture("reserve_blocking_times_out_on_a_full_ring") else {
        return;
    };
    fill_ring(&fx.ring);

    let started = Instant::now();
    let result = fx.ring.reserve_blocking(1000, Duration::from_millis(200));
    let waited = started.elapsed();
    assert!(
        matches!(result, Err(UserRingBufError::Timeout)),
        "{result:?}"
    );
    assert!(
        waited >= Duration::from_millis(200),
        "gave up after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "overslept: {waited:?}");
}

#[test]
fn reserve_blocking_is_woken_by_a_drain_on_another_thread() {
    let _serial = serial();
    let Some(mut fx) = fixture("reserve_blocking_is_woken_by_a_drain_on_another_thread") else {
        return;
    };
    let filled = fill_ring(&fx.ring);
    let delay = Duration::from_millis(300);

    let started = Instant::now();
    let (ebpf, ring) = (&fx.ebpf, &fx.ring);
    let drained = std::thread::scope(|scope| {
        let drainer = scope.spawn(move || {
            std::thread::sleep(delay);
            drain(ebpf)
        });
        let mut sample = ring
            .reserve_blocking(1000, Duration::from_secs(20))
            .expect("woken by the drain");
        let waited = started.elapsed();
        fill(&mut sample, 1000);
        sample.submit();
        assert!(waited >= delay, "reserved before the drain: {waited:?}");
        assert!(waited < Duration::from_secs(10), "woken late: {waited:?}");
        drainer.join().expect("drain thread")
    });
    assert_eq!(drained, filled as i64);
    assert_eq!(drain(&fx.ebpf), 1);
    let echoes = read_echoes(&mut fx.echo);
    assert_eq!(echoes.len(), filled + 1);
    check_echo(&echoes[filled], 1000, 1000);
}

#[test]
fn many_producer_threads_deliver_every_sample_exactly_once() {
    let _serial = serial();
    let Some(mut fx) = fixture("many_producer_threads_deliver_every_sample_exactly_once") else {
        return;
    };
    const THREADS: u32 = 8;
    const PER_THREAD: u32 = 20_000;
    // Every DISCARD_EVERY-th sample of a thread is discarded or dropped and must never arrive.
    const DISCARD_EVERY: u32 = 7;

    let (ebpf, ring, echo) = (&fx.ebpf, &fx.ring, &mut fx.echo);
    let mut seen: HashMap<u32, Vec<u32>> = HashMap::new();
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            scope.spawn(move || {
                let mut sizes = Lcg(u64::from(thread) + 1);
                for i in 0..PER_THREAD {
                    let len = 12 + sizes.next(100);
                    let mut sample = ring
                        .reserve_blocking(len, Duration::from_secs(30))
                        .unwrap_or_else(|e| panic!("thread {thread} sample {i}: {e}"));
                    // seq = thread << 24 | i identifies the producer and its order.
                    fill(&mut sample, thread << 24 | i);
                    match i % DISCARD_EVERY {
                        0 if i % 2 == 0 => sample.discard(),
                        0 => drop(sample),
                        _ => sample.submit(),
                    }
                }
            });
        }
        // The main thread is the only drainer, so producers may block waiting for it.
        let expected = THREADS * (PER_THREAD - PER_THREAD.div_ceil(DISCARD_EVERY));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut received = 0;
        while received < expected {
            assert!(
                Instant::now() < deadline,
                "only {received}/{expected} arrived"
            );
            let drained = drain(ebpf);
            assert!(drained >= 0, "drain failed: {drained}");
            for echo in read_echoes(echo) {
                assert!(echo.len_exact, "{echo:?}");
                check_echo(&echo, echo.len as usize, echo.seq());
                seen.entry(echo.seq() >> 24)
                    .or_default()
                    .push(echo.seq() & 0xff_ffff);
                received += 1;
            }
            if drained == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });

    assert_eq!(drain(&fx.ebpf), 0, "extra samples after all arrived");
    for thread in 0..THREADS {
        let want: Vec<u32> = (0..PER_THREAD).filter(|i| i % DISCARD_EVERY != 0).collect();
        assert_eq!(
            seen.get(&thread),
            Some(&want),
            "thread {thread}: samples missing, duplicated or out of order"
        );
    }
    assert_eq!(echo_drops(&fx.ebpf), 0);
}
