//! Object loader: maps, programs, attach targets and relocations of the clang-built objects in
//! `tests/bpf/` (compiled by build.rs).

use bpftime_runtime::object::{
    AttachTarget, BpfObject, CoreReloKind, MapOrigin, MapRelocKind, ObjectError, Pinning,
    ProgramKind, ProgramSpec, RawInsn, BPF_F_RDONLY_PROG, BPF_PSEUDO_CALL, BPF_PSEUDO_FUNC,
    BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE, POISON_HELPER,
};

const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_SYSCALL: u32 = 31;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

fn load(name: &str) -> BpfObject {
    let path = format!("{}/{name}.bpf.o", env!("BPFTIME_TEST_BPF_DIR"));
    BpfObject::from_file(&path).unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

fn opc(i: &RawInsn) -> u8 {
    i[0]
}
fn src(i: &RawInsn) -> u8 {
    i[1] >> 4
}
fn off(i: &RawInsn) -> i16 {
    i16::from_le_bytes([i[2], i[3]])
}
fn imm(i: &RawInsn) -> i32 {
    i32::from_le_bytes([i[4], i[5], i[6], i[7]])
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
}

/// Every map reference is encoded in its instruction the way the VM and the kernel read it.
fn check_map_encoding(p: &ProgramSpec) {
    for r in &p.map_relocs {
        let i = &p.insns[r.insn_index];
        assert_eq!(opc(i), 0x18, "{}: map reloc on a non-lddw", p.name);
        assert_eq!(imm(i), r.map_index as i32);
        match r.kind {
            MapRelocKind::Map => {
                assert_eq!(src(i), BPF_PSEUDO_MAP_IDX);
                assert_eq!(imm(&p.insns[r.insn_index + 1]), 0);
            }
            MapRelocKind::Value { offset } => {
                assert_eq!(src(i), BPF_PSEUDO_MAP_IDX_VALUE);
                assert_eq!(imm(&p.insns[r.insn_index + 1]) as u32, offset);
            }
        }
    }
    // No unresolved lddw of a map left behind.
    for (k, i) in p.insns.iter().enumerate() {
        if opc(i) == 0x18 && src(i) != 0 {
            assert!(
                p.map_relocs.iter().any(|r| r.insn_index == k)
                    || p.call_relocs.iter().any(|c| c.insn_index == k),
                "{}: lddw at {k} with src {} has no relocation record",
                p.name,
                src(i)
            );
        }
    }
}

#[test]
fn uprobe_counter_maps_attach_and_core() {
    let obj = load("uprobe_counter");
    assert_eq!(obj.name, "uprobe_counter");
    assert_eq!(obj.license, "GPL");
    assert!(obj.btf.is_some() && obj.kernel_btf.is_some());
    assert_eq!(obj.maps.len(), 1);
    let m = &obj.maps[0];
    assert_eq!(m.name, "counts");
    assert_eq!(m.origin, MapOrigin::BtfMaps);
    assert_eq!(
        (m.map_type, m.key_size, m.value_size, m.max_entries, m.flags),
        (BPF_MAP_TYPE_HASH, 8, 8, 1024, 0)
    );
    assert!(m.btf_key_type_id.is_some() && m.btf_value_type_id.is_some());
    assert_eq!(m.pinning, Pinning::None);

    let p = obj.program("count_arg").unwrap();
    assert_eq!(p.section, "uprobe//usr/bin/victim:target_fn");
    assert_eq!(p.kind, ProgramKind::Uprobe);
    assert_eq!(p.kernel_prog_type, Some(BPF_PROG_TYPE_KPROBE));
    assert_eq!(
        p.attach,
        AttachTarget::Uprobe {
            path: Some("/usr/bin/victim".into()),
            symbol: Some("target_fn".into()),
            offset: 0,
            retprobe: false,
            sleepable: false,
        }
    );
    assert_eq!(p.map_relocs.len(), 2);
    assert!(p.map_relocs.iter().all(|r| r.map_index == 0));
    check_map_encoding(p);
    // __sync_fetch_and_add -> atomic add (BPF_STX | BPF_ATOMIC | BPF_DW).
    assert!(p.insns.iter().any(|i| opc(i) == 0xdb));
    // PT_REGS_PARM1_CORE(ctx) = BPF_CORE_READ(ctx, di): `di` sits at byte 112 of x86-64
    // struct pt_regs in the running kernel's BTF.
    let c = &p.core_relocations[0];
    assert_eq!(
        (c.kind, c.type_name.as_str(), c.access.as_str()),
        (CoreReloKind::FieldByteOffset, "pt_regs", "0:14")
    );
    assert_eq!(c.value, Some(112));
    let i = &p.insns[c.insn_index];
    assert!(
        (opc(i) & 7 == 0x07 && imm(i) == 112) || (opc(i) & 7 == 0x01 && off(i) == 112),
        "relocated instruction {:02x?}",
        i
    );

    let r = obj.program("ret_probe").unwrap();
    assert_eq!(r.kind, ProgramKind::Uretprobe);
    assert_eq!(
        r.attach,
        AttachTarget::Uprobe {
            path: Some("/usr/lib/libc.so.6".into()),
            symbol: Some("malloc".into()),
            offset: 16,
            retprobe: true,
            sleepable: false,
        }
    );
    // PT_REGS_RC = ax at byte 80.
    assert_eq!(r.core_relocations[0].value, Some(80));

    let core = obj.program("core_probe").unwrap();
    assert_eq!(core.attach, AttachTarget::None);
    let kinds: Vec<(CoreReloKind, Option<u64>)> = core
        .core_relocations
        .iter()
        .map(|c| (c.kind, c.value))
        .collect();
    assert!(kinds.contains(&(CoreReloKind::FieldExists, Some(1))));
    assert!(kinds.contains(&(CoreReloKind::FieldByteSize, Some(8))));
    assert!(kinds.contains(&(CoreReloKind::FieldByteOffset, Some(96)))); // dx

    // A field the kernel lacks: exists = 0, the guarded load is poisoned like libbpf does.
    // Type and enum relocations.
    let t = obj.program("core_types").unwrap();
    let get = |k: CoreReloKind| {
        t.core_relocations
            .iter()
            .find(|c| c.kind == k)
            .unwrap_or_else(|| panic!("no {k:?} in {:?}", t.core_relocations))
            .value
    };
    assert_eq!(get(CoreReloKind::TypeExists), Some(1));
    assert_eq!(get(CoreReloKind::TypeSize), Some(168)); // x86-64 struct pt_regs
    assert_eq!(
        get(CoreReloKind::EnumvalValue),
        Some(BPF_MAP_TYPE_RINGBUF as u64)
    );
    assert_eq!(get(CoreReloKind::EnumvalExists), Some(1));
    let vmlinux = bpftime_runtime::object::Btf::vmlinux().unwrap();
    let task = get(CoreReloKind::TypeIdTarget).unwrap() as u32;
    assert_eq!(vmlinux.name(task).unwrap(), "task_struct");

    let miss = obj.program("core_missing").unwrap();
    let exists = miss
        .core_relocations
        .iter()
        .find(|c| c.kind == CoreReloKind::FieldExists)
        .unwrap();
    assert_eq!(exists.value, Some(0));
    let read = miss
        .core_relocations
        .iter()
        .find(|c| c.kind == CoreReloKind::FieldByteOffset)
        .unwrap();
    assert_eq!(read.value, None);
    let poisoned = &miss.insns[read.insn_index];
    assert_eq!((opc(poisoned), imm(poisoned)), (0x85, POISON_HELPER));
}

#[test]
fn globals_become_array_maps_with_initial_bytes() {
    let obj = load("globals");
    let names: Vec<&str> = obj.maps.iter().map(|m| m.name.as_str()).collect();
    // libbpf's order: BTF maps first, then global data in section order.
    assert_eq!(names[0], "arr");
    for s in [".rodata", ".data", ".bss"] {
        assert!(names.contains(&s), "{names:?} lacks {s}");
    }
    let ro = &obj.maps[obj.map_index(".rodata").unwrap()];
    assert_eq!(
        ro.origin,
        MapOrigin::GlobalData {
            section: ".rodata".into()
        }
    );
    assert_eq!(
        (ro.map_type, ro.key_size, ro.max_entries),
        (BPF_MAP_TYPE_ARRAY, 4, 1)
    );
    assert_eq!(ro.flags & BPF_F_RDONLY_PROG, BPF_F_RDONLY_PROG);
    assert!(ro.is_readonly());
    let ro_data = ro.initial_data.as_ref().unwrap();
    assert_eq!(ro_data.len(), ro.value_size as usize);
    // config_limit (u64) + config_factor (u32) + padding, then bpf_printk's format string.
    assert!(ro.value_size >= 16);
    assert!(ro_data.windows(11).any(|w| w == b"total %llu\0"));
    let words: Vec<u64> = (0..2).map(|k| u64_at(ro_data, k * 8)).collect();
    assert!(words.contains(&1000), "{ro_data:?}");
    assert!(ro_data.windows(4).any(|w| w == 3u32.to_le_bytes()));
    assert!(ro.btf_value_type_id.is_some(), ".rodata DATASEC type");

    let data = &obj.maps[obj.map_index(".data").unwrap()];
    assert!(!data.is_readonly());
    let d = data.initial_data.as_ref().unwrap();
    assert!(d.windows(8).any(|w| w == 7u64.to_le_bytes()));
    let arr: Vec<u8> = [1u32, 2, 3, 4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert!(d.windows(16).any(|w| w == arr.as_slice()));

    let bss = &obj.maps[obj.map_index(".bss").unwrap()];
    assert_eq!(bss.initial_data, None, ".bss is zero-filled");
    assert_eq!(bss.value_size, 16);

    let p = obj.program("use_globals").unwrap();
    assert_eq!(p.kernel_prog_type, Some(BPF_PROG_TYPE_TRACEPOINT));
    assert_eq!(
        p.attach,
        AttachTarget::Tracepoint {
            category: "syscalls".into(),
            name: "sys_enter_write".into()
        }
    );
    check_map_encoding(p);
    let mut touched = std::collections::BTreeSet::new();
    for r in &p.map_relocs {
        if let MapRelocKind::Value { offset } = r.kind {
            assert!(offset < obj.maps[r.map_index].value_size);
            touched.insert(obj.maps[r.map_index].name.as_str());
        }
    }
    assert_eq!(
        touched.into_iter().collect::<Vec<_>>(),
        vec![".bss", ".data", ".rodata"]
    );
}

#[test]
fn bpf_to_bpf_calls_and_callbacks_are_linked() {
    let obj = load("calls");
    let x = obj.program("xdp_calls").unwrap();
    assert_eq!(x.kernel_prog_type, Some(BPF_PROG_TYPE_XDP));
    let names: Vec<&str> = x.functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names[0], "xdp_calls");
    for f in ["sum_squares", "square", "global_helper"] {
        assert!(names.contains(&f), "{names:?}");
    }
    assert!(
        !names.contains(&"loop_cb"),
        "only reachable functions are appended"
    );
    let starts: Vec<usize> = x.functions.iter().map(|f| f.start).collect();
    let total: usize = x.functions.iter().map(|f| f.len).sum();
    assert_eq!(total, x.insns.len());
    assert!(x.functions.iter().all(|f| f.btf_type_id.is_some()));
    // Every call, including sum_squares -> square inside .text, lands on a function start.
    assert!(x.call_relocs.len() >= 8);
    for c in &x.call_relocs {
        let i = &x.insns[c.insn_index];
        assert_eq!((opc(i), src(i)), (0x85, BPF_PSEUDO_CALL));
        assert_eq!(c.insn_index as i64 + imm(i) as i64 + 1, c.target as i64);
        assert!(starts.contains(&c.target));
    }
    check_map_encoding(x);

    let l = obj.program("loop_prog").unwrap();
    assert_eq!(l.kernel_prog_type, Some(BPF_PROG_TYPE_SOCKET_FILTER));
    let cb = l.call_relocs.iter().find(|c| c.is_callback).unwrap();
    let i = &l.insns[cb.insn_index];
    assert_eq!((opc(i), src(i)), (0x18, BPF_PSEUDO_FUNC));
    assert_eq!(cb.insn_index as i64 + imm(i) as i64 + 1, cb.target as i64);
    let f = l.functions.iter().find(|f| f.name == "loop_cb").unwrap();
    assert_eq!(f.start, cb.target);
    // bpf_loop is helper 181.
    assert!(l
        .insns
        .iter()
        .any(|i| opc(i) == 0x85 && src(i) == 0 && imm(i) == 181));
}

#[test]
fn legacy_maps_section() {
    let obj = load("legacy_maps");
    assert_eq!(obj.maps.len(), 2);
    let h = &obj.maps[obj.map_index("legacy_hash").unwrap()];
    assert_eq!(h.origin, MapOrigin::LegacyMaps);
    assert_eq!(
        (h.map_type, h.key_size, h.value_size, h.max_entries),
        (BPF_MAP_TYPE_HASH, 4, 8, 64)
    );
    let a = &obj.maps[obj.map_index("legacy_array").unwrap()];
    assert_eq!(
        (a.map_type, a.key_size, a.value_size, a.max_entries),
        (BPF_MAP_TYPE_ARRAY, 4, 4, 8)
    );
    let p = obj.program("legacy_prog").unwrap();
    assert_eq!(
        p.attach,
        AttachTarget::Kprobe {
            symbol: Some("do_sys_openat2".into()),
            offset: 0,
            retprobe: false
        }
    );
    let used: Vec<&str> = p
        .map_relocs
        .iter()
        .map(|r| obj.maps[r.map_index].name.as_str())
        .collect();
    assert_eq!(used, vec!["legacy_array", "legacy_hash"]);
    check_map_encoding(p);
}

#[test]
fn unknown_sections_do_not_stop_the_object() {
    let obj = load("mixed_sections");
    let names: Vec<&str> = obj.programs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["on_work", "on_work_too", "override", "sys_prog", "weird"]
    );
    // Two programs in one section, told apart by symbol.
    let a = obj.program("on_work").unwrap();
    let b = obj.program("on_work_too").unwrap();
    assert_eq!(a.section, b.section);
    assert_ne!(a.insns, b.insns);
    assert_eq!(
        a.attach,
        AttachTarget::Uprobe {
            path: Some("victim".into()),
            symbol: Some("work".into()),
            offset: 0,
            retprobe: false,
            sleepable: false
        }
    );
    let s = obj.program("sys_prog").unwrap();
    assert_eq!(s.kind, ProgramKind::Syscall);
    assert_eq!(s.kernel_prog_type, Some(BPF_PROG_TYPE_SYSCALL));
    let w = obj.program("weird").unwrap();
    assert_eq!(w.kind, ProgramKind::Unknown);
    assert_eq!(w.kernel_prog_type, None);
    assert!(obj.skipped.is_empty(), "{:?}", obj.skipped);

    let hits = &obj.maps[obj.map_index("hits").unwrap()];
    assert_eq!(hits.pinning, Pinning::ByName);
    let events = &obj.maps[obj.map_index("events").unwrap()];
    assert_eq!(
        (
            events.map_type,
            events.key_size,
            events.value_size,
            events.max_entries
        ),
        (BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    );
    // Non-code unknown sections (".note.weird") are ignored, not turned into maps.
    assert!(obj.map_index(".note.weird").is_none());
}

#[test]
fn unsupported_extern_skips_only_that_program() {
    let obj = load("extern_ksym");
    assert!(obj.program("plain").is_ok());
    let err = obj.program("uses_ksym").unwrap_err();
    match &err {
        ObjectError::Insn {
            file,
            section,
            insn,
            reason,
        } => {
            assert!(file.ends_with("extern_ksym.bpf.o"));
            assert_eq!(section, "raw_tp/sys_enter");
            assert_eq!(*insn, 0);
            assert!(reason.contains("bpf_prog_active"), "{reason}");
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("raw_tp/sys_enter") && msg.contains("instruction 0"),
        "{msg}"
    );
}

#[test]
fn malformed_inputs_are_typed_errors() {
    let good = std::fs::read(format!("{}/calls.bpf.o", env!("BPFTIME_TEST_BPF_DIR"))).unwrap();
    // Truncated.
    let e = BpfObject::parse("trunc.o", &good[..100]).unwrap_err();
    assert!(
        matches!(e, ObjectError::Elf { .. } | ObjectError::Section { .. }),
        "{e}"
    );
    assert!(e.to_string().starts_with("trunc.o: "));
    // Not an ELF at all.
    let e = BpfObject::parse("junk.o", b"definitely not an object").unwrap_err();
    assert!(matches!(e, ObjectError::Elf { .. }), "{e}");
    // An ELF for another machine.
    let mut other = good.clone();
    other[18] = 62; // e_machine = EM_X86_64
    other[19] = 0;
    let e = BpfObject::parse("x86.o", &other).unwrap_err();
    assert!(e.to_string().contains("e_machine"), "{e}");
    // Missing file.
    let e = BpfObject::from_file("/nonexistent/prog.o").unwrap_err();
    assert!(matches!(e, ObjectError::Io { .. }));
    // Unknown program name.
    let obj = BpfObject::parse("calls.bpf.o", &good).unwrap();
    assert!(matches!(
        obj.program("nope"),
        Err(ObjectError::NoSuchProgram { .. })
    ));
}

#[test]
fn bytecode_matches_insns() {
    let obj = load("calls");
    let p = obj.program("xdp_calls").unwrap();
    let bytes = p.bytecode();
    assert!(p.insns.len() > 1);
    assert_eq!(bytes, p.insns.concat(), "every instruction, in order");
}

#[test]
fn btf_attached_tracing_sections() {
    let obj = load("tracing");
    let f = obj.program("on_unlink").unwrap();
    assert_eq!(f.kind, ProgramKind::Fentry);
    assert_eq!(
        f.attach,
        AttachTarget::BtfTarget {
            name: "do_unlinkat".into()
        }
    );
    let t = obj.program("on_switch").unwrap();
    assert_eq!(t.kind, ProgramKind::TpBtf);
    assert_eq!(
        t.attach,
        AttachTarget::RawTracepoint {
            name: "sched_switch".into()
        }
    );
    // `prev->pid` through BTF pointers: a CO-RE relocation on task_struct.
    assert!(t
        .core_relocations
        .iter()
        .any(|c| c.type_name == "task_struct" && c.value.is_some()));
}
