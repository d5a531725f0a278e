//! probe_read*/probe_write_user, process and time helpers, trace_printk, ringbuf and perf
//! output, bpf_loop, attach context and override_return, on the interpreter and the JIT.

mod helpers_common;

use std::time::Duration;

use bpftime_runtime::helpers::{
    AttachContext, MemoryTraceSink, RingbufTraceSink, RuntimeHelpers, TRACE_MAP_NAME,
};
use bpftime_runtime::maps::{possible_cpus, MapType, RingBufConsumer, BPF_F_CURRENT_CPU};
use helpers_common::*;

/// Context: results at 0..128, inputs (addresses) at 128..192, strings at 192..
const IN: usize = 128;
const STR: usize = 192;

#[test]
fn probe_read_variants_and_faults() {
    let host = *b"hello world\0tail";
    for jit in VMS {
        let mut e = Env::new("probe", jit, &[]);
        // r7 = address of `host` (ctx[IN]); stack buffer at r10-16 pre-filled with 0xff.
        let read = |id: u32, size: u32, src: &str, out: usize| {
            format!(
                "stdw [%r10-16], -1\nstdw [%r10-8], -1\n{}mov %r2, {size}\n{src}\ncall {id}\n{}\
                 ldxdw %r0, [%r10-16]\n{}ldxdw %r0, [%r10-8]\n{}",
                stack_ptr(1, -16),
                save(out),
                save(out + 8),
                save(out + 16)
            )
        };
        let src = format!(
            "mov %r6, %r1\nldxdw %r7, [%r6+{IN}]\n{}{}{}{}{}{}{}mov %r0, 0\nexit",
            read(4, 8, "mov %r3, %r7", 0),
            read(113, 8, "mov %r3, 8", 24),
            read(114, 16, "mov %r3, %r7", 48),
            read(45, 4, "mov %r3, %r7", 72),
            read(115, 16, "mov %r3, 16", 96),
            // A read that runs into a page that is not mapped (address just below 4096).
            read(112, 16, "mov %r3, 4090", 120 + 16),
            read(114, 0, "mov %r3, %r7", 160 + 16),
        );
        let p = e.load(&src);
        let mut ctx = [0u8; 256];
        put(&mut ctx, IN, host.as_ptr() as u64);
        assert_eq!(e.run(&p, &mut ctx), Ok(0), "jit={jit}");
        let bytes = |off: usize| {
            let mut v = at(&ctx, off + 8).to_le_bytes().to_vec();
            v.extend_from_slice(&at(&ctx, off + 16).to_le_bytes());
            v
        };
        assert_eq!(at(&ctx, 0), 0);
        assert_eq!(&bytes(0)[..8], b"hello wo");
        assert_eq!(at(&ctx, 24), err(libc::EFAULT), "bad address");
        assert_eq!(&bytes(24)[..8], &[0u8; 8], "dst zeroed on fault");
        assert_eq!(at(&ctx, 48), 12, "str: length with the NUL");
        assert_eq!(&bytes(48)[..12], b"hello world\0");
        assert_eq!(at(&ctx, 72), 4, "str truncated to size");
        assert_eq!(&bytes(72)[..4], b"hel\0");
        assert_eq!(at(&ctx, 96), err(libc::EFAULT));
        assert_eq!(bytes(96), vec![0u8; 16], "str dst zeroed on fault");
        assert_eq!(at(&ctx, 136), err(libc::EFAULT));
        assert_eq!(at(&ctx, 176), 0, "size 0");
    }
}

#[test]
fn probe_write_user() {
    for jit in VMS {
        let mut target = [0u8; 8];
        let mut e = Env::new("pwrite", jit, &[]);
        let p = e.load(&format!(
            "mov %r6, %r1\nstdw [%r10-8], 0x11223344\nldxdw %r1, [%r6+{IN}]\n{}mov %r3, 4\n\
             call 36\n{}mov %r1, 64\n{}mov %r3, 4\ncall 36\n{}mov %r0, 0\nexit",
            stack_ptr(2, -8),
            save(0),
            stack_ptr(2, -8),
            save(8)
        ));
        let mut ctx = [0u8; 256];
        put(&mut ctx, IN, target.as_mut_ptr() as u64);
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 0), 0);
        assert_eq!(
            u32::from_le_bytes(std::hint::black_box(target)[..4].try_into().unwrap()),
            0x11223344
        );
        assert_eq!(at(&ctx, 8), err(libc::EFAULT));
    }
}

#[test]
fn process_and_time_helpers() {
    for jit in VMS {
        let mut e = Env::new("proc", jit, &[]);
        let p = e.load(&format!(
            "mov %r6, %r1\ncall 14\n{}call 15\n{}call 5\n{}call 5\n{}call 125\n{}call 8\n{}\
             call 7\n{}call 7\n{}{}mov %r2, 16\ncall 16\n{}mov %r0, 0\nexit",
            save(0),
            save(8),
            save(16),
            save(24),
            save(32),
            save(40),
            save(48),
            save(56),
            "mov %r1, %r6\nadd %r1, 64\n",
            save(80)
        ));
        std::thread::Builder::new()
            .name("helper-comm".into())
            .spawn(move || {
                let mut ctx = [0u8; 256];
                let clock = |id| {
                    let mut ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    };
                    // SAFETY: clock_gettime writes the timespec we own.
                    assert_eq!(unsafe { libc::clock_gettime(id, &mut ts) }, 0);
                    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
                };
                let (mono_before, boot_before) =
                    (clock(libc::CLOCK_MONOTONIC), clock(libc::CLOCK_BOOTTIME));
                assert_eq!(e.run(&p, &mut ctx), Ok(0));
                let (mono_after, boot_after) =
                    (clock(libc::CLOCK_MONOTONIC), clock(libc::CLOCK_BOOTTIME));
                // SAFETY: plain libc queries.
                let (pid, tid, uid, gid) = unsafe {
                    (
                        libc::getpid(),
                        libc::gettid(),
                        libc::getuid(),
                        libc::getgid(),
                    )
                };
                assert_eq!(at(&ctx, 0), ((pid as u64) << 32) | tid as u64);
                assert_eq!(at(&ctx, 8), ((gid as u64) << 32) | uid as u64);
                // bpf_ktime_get_ns is CLOCK_MONOTONIC, bpf_ktime_get_boot_ns CLOCK_BOOTTIME, as
                // in the kernel: each read lies between the same clock read around the run.
                let (k1, k2, boot) = (at(&ctx, 16), at(&ctx, 24), at(&ctx, 32));
                assert!(
                    mono_before <= k1 && k1 <= k2 && k2 <= mono_after,
                    "ktime {k1}, {k2} outside CLOCK_MONOTONIC [{mono_before}, {mono_after}]"
                );
                assert!(
                    boot_before <= boot && boot <= boot_after,
                    "boot ns {boot} outside CLOCK_BOOTTIME [{boot_before}, {boot_after}]"
                );
                assert!(at(&ctx, 40) < possible_cpus() as u64);
                assert!(at(&ctx, 48) <= u32::MAX as u64 && at(&ctx, 56) <= u32::MAX as u64);
                assert_ne!(at(&ctx, 48), at(&ctx, 56), "random");
                assert_eq!(&ctx[64..80], b"helper-comm\0\0\0\0\0");
                assert_eq!(at(&ctx, 80), 0);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}

/// Puts NUL-terminated `s` at `ctx[off..]`.
fn put_str(ctx: &mut [u8], off: usize, s: &[u8]) {
    ctx[off..off + s.len()].copy_from_slice(s);
    ctx[off + s.len()] = 0;
}

#[test]
fn trace_printk_formats_into_the_sink() {
    for jit in VMS {
        let mut e = Env::new("printk", jit, &[]);
        let sink = MemoryTraceSink::new();
        e.h = RuntimeHelpers::from_object(&e.obj).with_trace_sink(sink.clone());
        let fmt = b"x=%d u=%u y=%llx s=%s c=%c%% %5d|%-3x|\n";
        let p = e.load(&format!(
            "mov %r6, %r1\n\
             mov %r1, %r6\nadd %r1, {STR}\nmov %r2, {}\nmov %r3, -3\nmov %r4, -1\n\
             lddw %r5, 0xabc0000def\ncall 6\n{}\
             mov %r1, %r6\nadd %r1, {}\nmov %r2, 9\nldxdw %r3, [%r6+{IN}]\nmov %r4, 65\n\
             call 6\n{}\
             mov %r1, %r6\nadd %r1, {}\nmov %r2, 4\ncall 6\n{}\
             mov %r1, %r6\nadd %r1, {}\nmov %r2, 3\ncall 6\n{}\
             mov %r0, 0\nexit",
            fmt.len() + 1,
            save(0),
            STR + 48,
            save(8),
            STR + 64,
            save(16),
            STR + 48,
            save(24),
        ));
        let mut ctx = [0u8; 512];
        put_str(&mut ctx, STR, fmt);
        put_str(&mut ctx, STR + 48, b"%s %c\n");
        put_str(&mut ctx, STR + 64, b"%q");
        let name = b"bpf\0";
        put(&mut ctx, IN, name.as_ptr() as u64);
        assert_eq!(e.run(&p, &mut ctx), Ok(0), "jit={jit}");
        let lines = sink.lines();
        assert_eq!(lines, vec!["bpf A".to_string()]);
        assert_eq!(at(&ctx, 8), 6, "length including the newline");
        assert_eq!(at(&ctx, 0), err(libc::EINVAL), "more than three arguments");
        assert_eq!(at(&ctx, 16), err(libc::EINVAL), "unsupported conversion");
        assert_eq!(
            at(&ctx, 24),
            err(libc::EINVAL),
            "format not NUL-terminated in size"
        );
    }
}

#[test]
fn trace_printk_three_args_and_ringbuf_sink() {
    for jit in VMS {
        let mut e = Env::new(
            "printk-rb",
            jit,
            &[bpftime_runtime::helpers::trace_map_def()],
        );
        e.h = RuntimeHelpers::from_object(&e.obj)
            .with_trace_sink(RingbufTraceSink::from_object(&e.obj).unwrap());
        let fmt = b"x=%5d|%-12llx|%s%%\n";
        let p = e.load(&format!(
            "mov %r6, %r1\nmov %r1, %r6\nadd %r1, {STR}\nmov %r2, {}\nmov %r3, -3\n\
             lddw %r4, 0xabc0000def\nldxdw %r5, [%r6+{IN}]\ncall 6\n{}mov %r0, 0\nexit",
            fmt.len() + 1,
            save(0)
        ));
        let mut ctx = [0u8; 256];
        put_str(&mut ctx, STR, fmt);
        let name = b"bpf\0";
        put(&mut ctx, IN, name.as_ptr() as u64);
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 0), 26, "length with the newline");
        let ring = e.obj.map(TRACE_MAP_NAME).unwrap();
        let mut c = RingBufConsumer::new(&ring).unwrap();
        let mut got = Vec::new();
        c.poll_timeout(Duration::from_secs(1), |r| got.push(r.data.to_vec()));
        assert_eq!(got.len(), 1);
        let line = String::from_utf8(got[0].clone()).unwrap();
        assert_eq!(line, "x=   -3|abc0000def  |bpf%");
    }
}

#[test]
fn ringbuf_output_reserve_submit_discard() {
    for jit in VMS {
        let mut e = Env::new("ringbuf", jit, &[def("rb", MapType::Ringbuf, 0, 0, 16384)]);
        let p = e.load(&format!(
            "mov %r6, %r1\n\
             ldmap %r1, 0\nmov %r2, %r6\nadd %r2, {STR}\nmov %r3, 5\nmov %r4, 0\ncall 130\n{}\
             ldmap %r1, 0\nmov %r2, 16\nmov %r3, 0\ncall 131\njeq %r0, 0, fail\n\
             stdw [%r0], 0x1111\nstdw [%r0+8], 0x2222\nmov %r1, %r0\nmov %r2, 0\ncall 132\n\
             ldmap %r1, 0\nmov %r2, 8\nmov %r3, 0\ncall 131\njeq %r0, 0, fail\n\
             stdw [%r0], 0x3333\nmov %r1, %r0\nmov %r2, 0\ncall 133\n\
             ldmap %r1, 0\nmov %r2, 8\nmov %r3, 1\ncall 131\n{}\
             ldmap %r1, 0\nmov %r2, 1\ncall 134\n{}\
             ldmap %r1, 0\nmov %r2, 0\ncall 134\n{}\
             ldmap %r1, 0\nmov %r2, %r6\nmov %r3, 5\nmov %r4, 8\ncall 130\n{}\
             mov %r0, 0\nexit\nfail:\nmov %r0, 1\nexit",
            save(0),
            save(8),
            save(16),
            save(24),
            save(32),
        ));
        let mut ctx = [0u8; 256];
        put_str(&mut ctx, STR, b"event");
        assert_eq!(e.run(&p, &mut ctx), Ok(0), "jit={jit}");
        assert_eq!(at(&ctx, 0), 0);
        assert_eq!(at(&ctx, 8), 0, "reserve with flags != 0 gives NULL");
        assert_eq!(at(&ctx, 16), 16384, "BPF_RB_RING_SIZE");
        assert!(at(&ctx, 24) > 0, "BPF_RB_AVAIL_DATA");
        assert_eq!(at(&ctx, 32), err(libc::EINVAL), "unknown output flags");
        let mut c = RingBufConsumer::new(&e.obj.map("rb").unwrap()).unwrap();
        let mut got = Vec::new();
        c.poll_timeout(Duration::from_secs(1), |r| got.push(r.data.to_vec()));
        let mut rec = 0x1111u64.to_le_bytes().to_vec();
        rec.extend_from_slice(&0x2222u64.to_le_bytes());
        assert_eq!(
            got,
            vec![b"event".to_vec(), rec],
            "discarded record is skipped"
        );
    }
}

#[test]
fn ringbuf_record_region_ends_with_submit() {
    let mut e = Env::new(
        "ringbuf-r",
        false,
        &[def("rb", MapType::Ringbuf, 0, 0, 16384)],
    );
    // Writing past the reserved size, or after submit, faults on the interpreter.
    let p = e.load(
        "ldmap %r1, 0\nmov %r2, 8\nmov %r3, 0\ncall 131\njeq %r0, 0, out\nmov %r6, %r0\n\
         stdw [%r6], 1\nmov %r1, %r6\nmov %r2, 0\ncall 132\nstdw [%r6], 2\nout:\nmov %r0, 0\n\
         exit",
    );
    assert!(matches!(
        e.run(&p, &mut [0u8; 8]),
        Err(bpftime_runtime::vm::VmError::MemoryFault { pc: 11, .. })
    ));
    // An aborted run's reservation is discarded, so the consumer is not stuck behind it.
    let p = e.load("ldmap %r1, 0\nmov %r2, 8\nmov %r3, 0\ncall 131\nstdw [%r0+8], 1\nexit");
    assert!(e.run(&p, &mut [0u8; 8]).is_err());
    let p = e.load(
        "ldmap %r1, 0\nmov %r2, %r10\nadd %r2, -8\nstdw [%r10-8], 9\nmov %r3, 8\nmov %r4, 0\n\
         call 130\nexit",
    );
    assert_eq!(e.run(&p, &mut [0u8; 8]), Ok(0));
    let mut c = RingBufConsumer::new(&e.obj.map("rb").unwrap()).unwrap();
    let mut got = Vec::new();
    c.poll_timeout(Duration::from_secs(1), |r| got.push(r.data.to_vec()));
    // The first program's record was submitted before its fault; the aborted one is gone.
    assert_eq!(
        got,
        vec![1u64.to_le_bytes().to_vec(), 9u64.to_le_bytes().to_vec()]
    );
}

#[test]
fn perf_event_output_current_cpu() {
    for jit in VMS {
        let ncpu = possible_cpus();
        let mut e = Env::new(
            "perf",
            jit,
            &[def("events", MapType::PerfEventArray, 4, 4, ncpu)],
        );
        let p = e.load(&format!(
            "mov %r6, %r1\nldmap %r2, 0\nlddw %r3, {BPF_F_CURRENT_CPU}\nmov %r4, %r6\n\
             add %r4, {STR}\nmov %r5, 6\ncall 25\n{}\
             mov %r1, %r6\nldmap %r2, 0\nmov %r3, {ncpu}\nmov %r4, %r6\nadd %r4, {STR}\n\
             mov %r5, 6\ncall 25\n{}mov %r0, 0\nexit",
            save(0),
            save(8)
        ));
        let mut ctx = [0u8; 256];
        put_str(&mut ctx, STR, b"perf!");
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 0), 0);
        assert_eq!(at(&ctx, 8), err(libc::E2BIG), "index beyond the array");
        let mut c = RingBufConsumer::new(&e.obj.map("events").unwrap()).unwrap();
        let mut got = Vec::new();
        c.poll_timeout(Duration::from_secs(1), |r| got.push(r.data.to_vec()));
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0][..6], b"perf!\0");
    }
}

#[test]
fn bpf_loop_counts_and_errors() {
    for jit in VMS {
        let mut e = Env::new("loop", jit, &[]);
        let call = |n: u64, flags: u64, out: usize| {
            format!(
                "lddw %r1, {n}\nlddw %r2, cb\nmov %r3, %r6\nmov %r4, {flags}\ncall 181\n{}",
                save(out)
            )
        };
        let p = e.load(&format!(
            "mov %r6, %r1\n{}{}{}{}mov %r0, 0\nexit\n\
             cb:\nldxdw %r3, [%r2+64]\nadd %r3, %r1\nstxdw [%r2+64], %r3\n\
             ldxdw %r3, [%r2+72]\nadd %r3, 1\nstxdw [%r2+72], %r3\n\
             mov %r0, 0\njne %r1, 20, out\nmov %r0, 1\nout:\nexit",
            call(10, 0, 0),
            call(100, 0, 8),
            call(5, 1, 16),
            call((1 << 23) + 1, 0, 24),
        ));
        let mut ctx = [0u8; 256];
        assert_eq!(e.run(&p, &mut ctx), Ok(0), "jit={jit}");
        assert_eq!(at(&ctx, 0), 10, "iterations");
        assert_eq!(
            at(&ctx, 8),
            21,
            "stopped by the callback at index 20, counted"
        );
        assert_eq!(at(&ctx, 16), err(libc::EINVAL), "flags");
        assert_eq!(at(&ctx, 24), err(libc::E2BIG), "too many loops");
        assert_eq!(at(&ctx, 72), 31, "callback calls");
        assert_eq!(at(&ctx, 64), 45 + 210, "sum of the indices");
    }
}

#[test]
fn attach_context_and_override_return() {
    for jit in VMS {
        let mut e = Env::new("attach", jit, &[]);
        e.h.set_attach(AttachContext {
            func_ip: 0x401000,
            cookie: 77,
            override_return: None,
            frame_at_entry: false,
        });
        let p = e.load(&format!(
            "mov %r6, %r1\ncall 173\n{}mov %r1, %r6\ncall 174\n{}mov %r1, %r6\n\
             mov %r2, -5\ncall 58\n{}call 35\n{}mov %r0, 0\nexit",
            save(0),
            save(8),
            save(16),
            save(24)
        ));
        let mut ctx = [0u8; 64];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!((at(&ctx, 0), at(&ctx, 8), at(&ctx, 16)), (0x401000, 77, 0));
        assert_eq!(at(&ctx, 24), 0, "get_current_task is NULL in user space");
        assert_eq!(e.h.attach().override_return, Some(-5i64 as u64));
        // A run that does not call it clears the request.
        let p2 = e.load("mov %r0, 0\nexit");
        e.run(&p2, &mut ctx).unwrap();
        assert_eq!(e.h.attach().override_return, None);
    }
}

#[test]
fn trace_vprintk_and_snprintf() {
    for jit in VMS {
        let mut e = Env::new("vprintk", jit, &[]);
        let sink = MemoryTraceSink::new();
        e.h = RuntimeHelpers::from_object(&e.obj).with_trace_sink(sink.clone());
        let fmt4 = b"%d %d %d %lld\n";
        let p = e.load(&format!(
            "mov %r6, %r1\nstdw [%r10-32], 1\nstdw [%r10-24], 2\nstdw [%r10-16], 3\n\
             stdw [%r10-8], -4\n\
             mov %r1, %r6\nadd %r1, {STR}\nmov %r2, {}\n{}mov %r4, 32\ncall 177\n{}\
             mov %r1, %r6\nadd %r1, {STR}\nmov %r2, {}\n{}mov %r4, 12\ncall 177\n{}\
             mov %r1, %r6\nadd %r1, 96\nmov %r2, 16\nmov %r3, %r6\nadd %r3, {}\n{}\
             mov %r5, 8\ncall 165\n{}\
             mov %r1, %r6\nadd %r1, 112\nmov %r2, 3\nmov %r3, %r6\nadd %r3, {}\n{}\
             mov %r5, 8\ncall 165\n{}\
             mov %r0, 0\nexit",
            fmt4.len() + 1,
            stack_ptr(3, -32),
            save(0),
            fmt4.len() + 1,
            stack_ptr(3, -32),
            save(8),
            STR + 32,
            stack_ptr(4, -16),
            save(16),
            STR + 32,
            stack_ptr(4, -16),
            save(24),
        ));
        let mut ctx = [0u8; 256];
        put_str(&mut ctx, STR, fmt4);
        put_str(&mut ctx, STR + 32, b"v=%llu");
        assert_eq!(e.run(&p, &mut ctx), Ok(0), "jit={jit}");
        assert_eq!(sink.lines(), vec!["1 2 3 -4".to_string()]);
        assert_eq!(at(&ctx, 0), 9);
        assert_eq!(
            at(&ctx, 8),
            err(libc::EINVAL),
            "data_len not a multiple of 8"
        );
        assert_eq!(at(&ctx, 16), 4, "snprintf: length with the NUL");
        assert_eq!(&ctx[96..100], b"v=3\0");
        assert_eq!(
            at(&ctx, 24),
            4,
            "truncated output still reports the full length"
        );
        assert_eq!(&ctx[112..115], b"v=\0");
    }
}

#[test]
fn bad_pointer_arguments_abort_with_the_argument_named() {
    let mut e = Env::new("badptr", false, &[def("h", MapType::Hash, 4, 8, 4)]);
    let p = e.load(&format!(
        "ldmap %r1, 0\n{}mov %r3, 64\nmov %r4, 0\ncall 2\nexit",
        stack_ptr(2, -8)
    ));
    let msg = e.run(&p, &mut [0u8; 8]).unwrap_err().to_string();
    assert!(
        msg.contains("bpf_map_update_elem: argument r3 = 0x40 (8 bytes)"),
        "{msg}"
    );
}

/// `bpf_spin_lock`/`bpf_spin_unlock` around two non-atomic read-modify-writes of a map value,
/// from 4 threads at once (each with its own helpers over the same segment): no update is
/// lost, and a run that ends holding the lock (no unlock) releases it. The kernel refuses the
/// helper in tracing programs ("tracing progs cannot use bpf_spin_lock yet"), so this is not
/// compared with it; programs of other types may still carry it.
#[test]
fn spin_lock_serialises_read_modify_writes_across_threads() {
    const THREADS: u64 = 4;
    const RUNS: u64 = 20_000;
    for jit in VMS {
        let e = Env::new("spin", jit, &[def("v", MapType::Array, 4, 24, 1)]);
        // value: lock u32 + pad, calls u64 at 8, sum u64 at 16.
        let body = |unlock: bool| {
            format!(
                "stw [%r10-4], 0\n{}ldmap %r1, 0\ncall 1\njeq %r0, 0, +11\nmov %r6, %r0\n\
                 mov %r1, %r6\ncall 93\nldxdw %r2, [%r6+8]\nadd %r2, 1\nstxdw [%r6+8], %r2\n\
                 ldxdw %r2, [%r6+16]\nadd %r2, 3\nstxdw [%r6+16], %r2\nmov %r1, %r6\n{}\
                 mov %r0, 0\nexit",
                stack_ptr(2, -4),
                if unlock { "call 94\n" } else { "mov %r0, 0\n" }
            )
        };
        let locked = e.load(&body(true));
        let segment = e.obj.object_name().to_string();
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let (segment, locked) = (segment.clone(), locked.clone());
                s.spawn(move || {
                    let obj = bpftime_runtime::maps::ShmObject::open(&segment).unwrap();
                    let mut mine = Env {
                        h: RuntimeHelpers::from_object(&obj),
                        obj,
                        jit,
                    };
                    for _ in 0..RUNS {
                        assert_eq!(mine.run(&locked, &mut [0u8; 8]), Ok(0));
                    }
                    // Not this Env's segment to remove.
                    std::mem::forget(mine);
                });
            }
        });
        let value = |e: &Env| match e.obj.map("v").unwrap().get(&0u32.to_le_bytes()).unwrap() {
            Some(bpftime_runtime::maps::EntryValue::Single(v)) => v,
            other => panic!("{other:?}"),
        };
        let v = value(&e);
        assert_eq!(at(&v, 8), THREADS * RUNS, "jit={jit}: calls");
        assert_eq!(at(&v, 16), 3 * THREADS * RUNS, "jit={jit}: sum");
        assert_eq!(&v[..4], &[0; 4], "unlocked at the end");
        // A run that ends holding the lock gives it back.
        let mut e = e;
        let forgetful = e.load(&body(false));
        assert_eq!(e.run(&forgetful, &mut [0u8; 8]), Ok(0));
        assert_eq!(
            &value(&e)[..4],
            &[0; 4],
            "jit={jit}: released at the end of the run"
        );
    }
}
