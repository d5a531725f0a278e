//! End to end: clang-built objects (`tests/bpf/`) loaded by the object loader, their maps
//! created in shared memory, their programs relocated and run through `RuntimeHelpers` on the
//! interpreter and the JIT (bpf_loop callback, bpf-to-bpf calls, global data, bpf_printk).

use std::sync::Arc;
use std::time::Duration;

use bpftime_runtime::helpers::{wire, RingbufTraceSink, RuntimeHelpers, TRACE_MAP_NAME};
use bpftime_runtime::maps::{RingBufConsumer, ShmObject};
use bpftime_runtime::object::BpfObject;
use bpftime_runtime::vm::insn::decode_bytes;
use bpftime_runtime::vm::{InterpOptions, Program};

struct Loaded {
    obj: BpfObject,
    shm: ShmObject,
    h: RuntimeHelpers,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = self.shm.remove();
    }
}

fn load(name: &str, jit: bool) -> Loaded {
    let path = format!("{}/{name}.bpf.o", env!("BPFTIME_TEST_BPF_DIR"));
    let obj = BpfObject::from_file(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let shm_name = format!("t-helpers-obj-{name}-{}-{}", std::process::id(), jit as u8);
    let _ = bpftime_runtime::maps::remove_object(&shm_name);
    let defs = wire::map_defs(&obj, true).unwrap();
    let shm = ShmObject::create(&shm_name, &defs).unwrap();
    wire::init_global_data(&obj, &shm).unwrap();
    let h = RuntimeHelpers::from_object(&shm)
        .with_trace_sink(RingbufTraceSink::from_object(&shm).unwrap());
    Loaded { obj, shm, h }
}

impl Loaded {
    fn program(&self, name: &str) -> Arc<Program> {
        let spec = self.obj.program(name).unwrap();
        let insns = decode_bytes(&spec.bytecode()).unwrap();
        Arc::new(self.h.load_program(insns).unwrap())
    }

    fn run(&mut self, p: &Program, jit: bool) -> u64 {
        let mut ctx = [0u8; 256];
        if jit {
            // SAFETY: these programs pass the kernel verifier (object_verifier tests) and read
            // at most their 256-byte context.
            unsafe { self.h.run_jit(p, &mut ctx) }.unwrap()
        } else {
            self.h
                .run_interpreter(p, &mut ctx, InterpOptions::default())
                .unwrap()
        }
    }

    fn u64_at(&self, map: &str, key: u32, off: usize) -> u64 {
        let v = self
            .shm
            .map(map)
            .unwrap()
            .lookup_unmarked(&key.to_le_bytes(), 0)
            .unwrap()
            .unwrap()
            .read();
        u64::from_le_bytes(v[off..off + 8].try_into().unwrap())
    }
}

#[test]
fn calls_and_bpf_loop_object() {
    for jit in [false, true] {
        let mut l = load("calls", jit);
        let p = l.program("xdp_calls");
        assert_eq!(l.run(&p, jit), 2, "XDP_PASS");
        assert_eq!(l.u64_at("acc", 0, 0), (1 + 4 + 9 + 16) + 9);
        let p = l.program("loop_prog");
        assert_eq!(l.run(&p, jit), 0);
        assert_eq!(l.u64_at("acc", 0, 0), 45 + 4, "bpf_loop sum + square(2)");
    }
}

#[test]
fn globals_object_and_bpf_printk() {
    for jit in [false, true] {
        let mut l = load("globals", jit);
        let p = l.program("use_globals");
        for _ in 0..2 {
            assert_eq!(l.run(&p, jit), 0);
        }
        // bss_total += config_factor (3) * data_array[2] (3), twice.
        assert_eq!(l.u64_at("arr", 2, 0), 18);
        let mut c = RingBufConsumer::new(&l.shm.map(TRACE_MAP_NAME).unwrap()).unwrap();
        let mut lines = Vec::new();
        while lines.len() < 2 {
            if c.poll_timeout(Duration::from_secs(1), |r| {
                lines.push(String::from_utf8_lossy(r.data).into_owned())
            }) == 0
            {
                break;
            }
        }
        assert_eq!(lines, vec!["total 9", "total 18"]);
        let bss = l.obj.map_index(".bss").unwrap();
        let bss_name = l.obj.maps[bss].name.clone();
        let words: Vec<u64> = (0..2).map(|i| l.u64_at(&bss_name, 0, i * 8)).collect();
        assert!(words.contains(&2), "bss_calls: {words:?}");
        assert!(words.contains(&18), "bss_total: {words:?}");
    }
}
