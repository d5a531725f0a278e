//! `user_ringbuf.bpf.c`: commands written by user space into a USER_RINGBUF and drained by a
//! uprobe program (`bpf_user_ringbuf_drain` with a dynptr callback), on kernel uprobes
//! (libbpf's producer, `user_ring_buffer__reserve/submit/discard`) and in user space (the
//! runtime's producer on the shared ring, the agent in the real victim): the totals and how
//! many records each drain took must be the kernel's.

mod common;

use bpftime_example_programs::{object_path, victim_path, Entries};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_runtime::maps::MapType;
use bpftime_testutils::{error_chain, require_kernel};

const ROUNDS: u32 = 50;
const COMMANDS: u64 = 100;
const STOP_AT: u64 = 40;
const DISCARD_AT: u64 = 20;

/// The commands in order: `(record, discard)`.
fn commands() -> Vec<([u8; 16], bool)> {
    (0..COMMANDS)
        .map(|i| {
            let key = if i == STOP_AT { 999 } else { i % 10 };
            let mut r = [0u8; 16];
            r[..8].copy_from_slice(&key.to_le_bytes());
            r[8..].copy_from_slice(&(i + 1).to_le_bytes());
            (r, i == DISCARD_AT)
        })
        .collect()
}

use libbpf_rs::MapCore;
use std::os::fd::{AsFd, AsRawFd};

fn dump(map: &libbpf_rs::Map) -> Entries {
    let mut out: Entries = map
        .keys()
        .filter_map(|k| {
            let v = map.lookup(&k, libbpf_rs::MapFlags::ANY).ok()??;
            Some((k, v))
        })
        .collect();
    out.sort();
    out
}

fn run_kernel() -> (Entries, Entries) {
    let open = libbpf_rs::ObjectBuilder::default()
        .open_file(object_path("user_ringbuf"))
        .expect("open");
    let obj = open.load().expect("load into the kernel");
    let commands_map = obj
        .maps()
        .find(|m| m.name() == "commands")
        .expect("commands map");
    // SAFETY: libbpf's user ring buffer over a live map descriptor; freed below.
    let rb = unsafe {
        libbpf_sys::user_ring_buffer__new(commands_map.as_fd().as_raw_fd(), std::ptr::null())
    };
    assert!(!rb.is_null(), "user_ring_buffer__new");
    for (record, discard) in commands() {
        // SAFETY: a reservation of 16 bytes is written in full and then submitted or
        // discarded exactly once.
        unsafe {
            let p = libbpf_sys::user_ring_buffer__reserve(rb, 16) as *mut u8;
            assert!(!p.is_null(), "reserve");
            std::ptr::copy_nonoverlapping(record.as_ptr(), p, 16);
            if discard {
                libbpf_sys::user_ring_buffer__discard(rb, p.cast());
            } else {
                libbpf_sys::user_ring_buffer__submit(rb, p.cast());
            }
        }
    }
    let prog = obj
        .progs_mut()
        .find(|p| p.name() == "drain_commands")
        .expect("program");
    let _link = prog
        .attach_uprobe_with_opts(
            -1,
            victim_path(),
            0,
            libbpf_rs::UprobeOpts {
                func_name: Some("vt_add".into()),
                ..Default::default()
            },
        )
        .expect("attach");
    bpftime_example_programs::run_victim(ROUNDS).expect("victim");
    // SAFETY: created above, not used after this.
    unsafe { libbpf_sys::user_ring_buffer__free(rb) };
    let map = |name: &str| obj.maps().find(|m| m.name() == name).expect(name);
    (dump(&map("totals")), dump(&map("drained")))
}

#[test]
fn user_ringbuf_drains_match_kernel_uprobes() {
    if !require_kernel("user_ringbuf_drains_match_kernel_uprobes") {
        return;
    }
    let (totals, drained) = run_kernel();
    let count_of = |n: i64| {
        drained
            .iter()
            .find(|(k, _)| *k == n.to_le_bytes())
            .map(|(_, v)| u64::from_le_bytes(v[..8].try_into().unwrap()))
    };
    // Records 0..=40 in the first drain (the discarded one not counted), the rest in the
    // second, nothing afterwards.
    assert_eq!(
        count_of(STOP_AT as i64),
        Some(1),
        "kernel drains: {drained:?}"
    );
    assert_eq!(count_of((COMMANDS - STOP_AT - 1) as i64), Some(1));
    assert_eq!(count_of(0), Some(u64::from(ROUNDS) - 2));

    for (tag, no_jit) in [("jit", false), ("interpreter", true)] {
        let segment = format!("test-user-ringbuf-{tag}");
        bpftime_runtime::loaded::unload_object(&segment);
        let options = LoadOptions {
            verify: true,
            no_jit,
            ..LoadOptions::default()
        };
        let loaded = LoadedObject::load(&object_path("user_ringbuf"), Some(&segment), options)
            .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        assert!(loaded.refused.is_empty(), "{tag}: {:?}", loaded.refused);
        let ring = loaded.shm.map("commands").unwrap();
        assert_eq!(ring.map_type(), MapType::UserRingbuf);
        let producer = ring.as_ringbuf().unwrap();
        for (record, discard) in commands() {
            let p = producer.reserve(16, 0).expect("room in the ring");
            // SAFETY: 16 writable bytes reserved above.
            unsafe { std::ptr::copy_nonoverlapping(record.as_ptr(), p, 16) };
            if discard {
                producer.discard(p, 0).unwrap();
            } else {
                producer.submit(p, 0).unwrap();
            }
        }
        let run = common::run_agent_victim(&victim_path(), ROUNDS, &segment)
            .and_then(|_| common::snapshot_of(&loaded.shm));
        let _ = loaded.unload();
        let user = run.unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert_eq!(user.maps["totals"], totals, "{tag}: totals");
        assert_eq!(user.maps["drained"], drained, "{tag}: records per drain");
        println!("user_ringbuf: userspace ({tag}) == kernel");
    }
}
