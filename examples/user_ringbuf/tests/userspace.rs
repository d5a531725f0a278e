//! The tutorial's drain program (`kill_exit`, `tp/syscalls/sys_exit_kill`) run in user space
//! on bpftime-rs's VM, against the same object on the kernel tracepoint: the same samples
//! written into the USER_RINGBUF (one too short for `bpf_dynptr_read`, counted as lost), the
//! same drains, the same echoed events (pid, seq, comm, message) in the RINGBUF.
//!
//! In user space the program is run on this thread as the tracepoint would run it after its
//! `kill()` (the tracepoint context is not read by the program); running it from a target's
//! own syscalls is the syscall-tracepoint attach of issue 18.

use aya::maps::{Array, MapData, RingBuf};
use aya::programs::TracePoint;
use aya::EbpfLoader;
use bpftime_kernel_bridge::user_ringbuf::UserRingBuf;
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_runtime::maps::{EntryValue, RingBufConsumer};
use bpftime_runtime::object::BpfObject;

const OBJECT: &str = concat!(env!("OUT_DIR"), "/user_ringbuf.bpf.o");
/// `struct user_sample`: seq, pad, msg[48].
const SAMPLE: usize = 56;

/// The rounds: how many records to write before each drain, and their sizes.
fn rounds() -> Vec<Vec<Vec<u8>>> {
    (0..6u32)
        .map(|round| {
            (0..=round)
                .map(|i| {
                    let seq = round * 10 + i;
                    let mut r = vec![0u8; SAMPLE];
                    r[..4].copy_from_slice(&seq.to_le_bytes());
                    let text = format!("sample {seq} of round {round}");
                    r[8..8 + text.len()].copy_from_slice(text.as_bytes());
                    // One record per run too short for the program's dynptr_read: lost.
                    if round == 3 && i == 1 {
                        r.truncate(20);
                    }
                    r
                })
                .collect()
        })
        .collect()
}

/// Echoed events and the `lost` count, from the kernel.
fn on_kernel() -> (Vec<Vec<u8>>, u64) {
    let tgid = std::process::id();
    let mut ebpf = EbpfLoader::new()
        .allow_unsupported_maps()
        .override_global("target_tgid", &tgid, true)
        .load_file(OBJECT)
        .expect("loading user_ringbuf.bpf.o into the kernel");
    let program: &mut TracePoint = ebpf.program_mut("kill_exit").unwrap().try_into().unwrap();
    program.load().unwrap();
    program.attach("syscalls", "sys_exit_kill").unwrap();
    let ring = UserRingBuf::from_map(ebpf.take_map("user_ringbuf").unwrap()).unwrap();
    let mut events = RingBuf::try_from(ebpf.take_map("kernel_ringbuf").unwrap()).unwrap();
    let mut echoed = Vec::new();
    for records in rounds() {
        for r in &records {
            let mut slot = ring.reserve(r.len()).expect("room in the user ringbuf");
            slot.copy_from_slice(r);
            slot.submit();
        }
        // SAFETY: signal 0 only checks permissions; its syscall exit runs the program.
        assert_eq!(unsafe { libc::kill(libc::getpid(), 0) }, 0);
        while let Some(e) = events.next() {
            echoed.push(e.to_vec());
        }
    }
    let lost: Array<MapData, u64> = Array::try_from(ebpf.take_map("lost").unwrap()).unwrap();
    (echoed, lost.get(&0, 0).unwrap())
}

/// The same, with the program on bpftime-rs's VM (`no_jit`: the checked interpreter).
fn in_user_space(no_jit: bool) -> (Vec<Vec<u8>>, u64) {
    let mut object = BpfObject::from_file(OBJECT).unwrap();
    object
        .set_global("target_tgid", &std::process::id().to_le_bytes())
        .unwrap();
    let segment = format!("test-tutorial-drain-{no_jit}");
    bpftime_runtime::loaded::unload_object(&segment);
    let loaded = LoadedObject::load_object(
        object,
        std::path::Path::new(OBJECT),
        Some(&segment),
        LoadOptions {
            verify: true,
            publish: false,
            no_jit,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}", bpftime_testutils::error_chain(&e)));
    let program = loaded
        .programs
        .iter()
        .find(|p| p.name == "kill_exit")
        .unwrap_or_else(|| panic!("kill_exit is refused: {:?}", loaded.refused));
    let ring = loaded.shm.map("user_ringbuf").unwrap();
    let producer = ring.as_ringbuf().unwrap();
    let events = loaded.shm.map("kernel_ringbuf").unwrap();
    let mut consumer = RingBufConsumer::new(&events).unwrap();
    let mut helpers = loaded.helpers().unwrap();
    let mut echoed = Vec::new();
    for records in rounds() {
        for r in &records {
            let p = producer.reserve(r.len() as u64, 0).expect("room");
            // SAFETY: r.len() writable bytes were reserved above.
            unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), p, r.len()) };
            producer.submit(p, 0).unwrap();
        }
        let mut ctx = vec![0u8; program.context_size()];
        program.run(&mut helpers, &mut ctx).unwrap();
        consumer.poll(|e| echoed.push(e.data.to_vec()));
    }
    let lost = match loaded.shm.map("lost").unwrap().get(&0u32.to_le_bytes()) {
        Ok(Some(EntryValue::Single(v))) => u64::from_le_bytes(v[..8].try_into().unwrap()),
        other => panic!("lost: {other:?}"),
    };
    drop(helpers);
    let _ = loaded.unload();
    (echoed, lost)
}

#[test]
fn the_tutorials_drain_program_runs_in_user_space_as_on_the_kernel() {
    if !bpftime_testutils::require_kernel(
        "the_tutorials_drain_program_runs_in_user_space_as_on_the_kernel",
    ) {
        return;
    }
    let (kernel, kernel_lost) = on_kernel();
    let sent: usize = rounds().iter().map(Vec::len).sum();
    assert_eq!(
        kernel.len(),
        sent - 1,
        "the kernel echoed all but the short one"
    );
    assert_eq!(kernel_lost, 1);
    // pid and sequence of the first event, as the kernel wrote them.
    assert_eq!(kernel[0][..4], std::process::id().to_le_bytes());
    for no_jit in [false, true] {
        let (user, user_lost) = in_user_space(no_jit);
        assert_eq!(user_lost, kernel_lost, "lost (no_jit {no_jit})");
        assert_eq!(user, kernel, "echoed events (no_jit {no_jit})");
    }
}
