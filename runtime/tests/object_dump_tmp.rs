use bpftime_runtime::object::BpfObject;
#[test]
fn dump() {
    let dir = env!("BPFTIME_TEST_BPF_DIR");
    for f in ["uprobe_counter", "globals", "calls", "legacy_maps", "mixed_sections", "bad_verifier"] {
        let o = BpfObject::from_file(format!("{dir}/{f}.bpf.o"));
        match o {
            Ok(o) => {
                println!("== {f}: license {:?} maps {:#?}", o.license, o.maps.iter().map(|m| (&m.name, m.map_type, m.key_size, m.value_size, m.max_entries, m.flags, m.pinning, m.initial_data.as_ref().map(|d| d.len()), m.btf_key_type_id, m.btf_value_type_id)).collect::<Vec<_>>());
                for p in &o.programs {
                    println!("  prog {} sec {} kind {:?} type {:?} attach {:?} n={} maps {:?} calls {:?} funcs {:?} core {:?}", p.name, p.section, p.kind, p.kernel_prog_type, p.attach, p.insns.len(), p.map_relocs, p.call_relocs, p.functions, p.core_relocations);
                }
                for s in &o.skipped { println!("  skipped {} {}: {}", s.name, s.section, s.error); }
            }
            Err(e) => println!("== {f}: ERR {e}"),
        }
    }
}
