//! BTF-driven formatting of map keys and values (bpftool's `"formatted"`), on the clang-built
//! objects in `tests/bpf/` (compiled by build.rs). No kernel needed.

use bpftime_runtime::object::btf::kind;
use bpftime_runtime::object::btf_format::{
    describe, format_value, map_types, MapBtfInfo, TypeDesc,
};
use bpftime_runtime::object::BpfObject;
use serde_json::{json, Value};

fn load(name: &str) -> BpfObject {
    let path = format!("{}/{name}.bpf.o", env!("BPFTIME_TEST_BPF_DIR"));
    BpfObject::from_file(&path).unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

fn field_offset(desc: &TypeDesc, name: &str) -> usize {
    match desc {
        TypeDesc::Struct { members, .. } => {
            let f = members.iter().find(|f| f.name == name).expect(name);
            assert_eq!(f.bit_offset % 8, 0);
            (f.bit_offset / 8) as usize
        }
        other => panic!("not a struct: {other:?}"),
    }
}

#[test]
fn int_keys_and_values() {
    let obj = load("uprobe_counter");
    let types = map_types(&obj);
    let (key, value) = &types["counts"];
    let (key, value) = (key.as_ref().unwrap(), value.as_ref().unwrap());
    assert_eq!(key.format(&7u64.to_le_bytes()), Some(json!(7)));
    assert_eq!(value.format(&u64::MAX.to_le_bytes()), Some(json!(u64::MAX)));

    let obj = load("globals");
    let info = MapBtfInfo::from_object(&obj);
    assert_eq!(
        info.format_entry("arr", &2u32.to_le_bytes(), &4096u64.to_le_bytes()),
        Some(json!({"key": 2, "value": 4096}))
    );
    // Key order in the output is "key", then "value".
    let e = info
        .format_entry("arr", &2u32.to_le_bytes(), &4096u64.to_le_bytes())
        .unwrap();
    let keys: Vec<_> = e.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["key", "value"]);
    assert_eq!(info.format_entry("no_such_map", &[0; 4], &[0; 8]), None);
}

#[test]
fn struct_with_anonymous_unions_and_bitfields() {
    let obj = load("uprobe_counter");
    let btf = obj.btf.as_ref().unwrap();
    let id = btf.find_by_name_kind("pt_regs", kind::STRUCT).unwrap();
    let mut regs = vec![0u8; 168];
    regs[..8].copy_from_slice(&15u64.to_le_bytes()); // r15
    regs[112..120].copy_from_slice(&0xabcdu64.to_le_bytes()); // di
                                                              // cs / csx / fred_cs { cs: 16, sl: 2, wfe: 1 } share offset 136.
    let csx: u64 = 0x33 | (2 << 16) | (1 << 18);
    regs[136..144].copy_from_slice(&csx.to_le_bytes());
    let v = format_value(btf, id, &regs).unwrap();
    assert_eq!(v["r15"], json!(15));
    assert_eq!(v["di"], json!(0xabcd));
    assert_eq!(v["cs"], json!(0x33));
    assert_eq!(v["csx"], json!(csx));
    assert_eq!(v["fred_cs"], json!({"cs": 0x33, "sl": 2, "wfe": 1}));
    assert_eq!(v["flags"], json!(0));
    let names: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(&names[..3], ["r15", "r14", "r13"]);
    assert_eq!(names.last().unwrap(), "fred_ss");
    // Wrong sizes.
    assert_eq!(format_value(btf, id, &regs[..167]), None);
    assert_eq!(
        format_value(btf, id, &[regs.as_slice(), &[0]].concat()),
        None
    );

    // A whole kernel struct: bools, enums, char arrays, pointers, nested structs.
    let id = btf.find_by_name_kind("task_struct", kind::STRUCT).unwrap();
    let desc = describe(btf, id).expect("task_struct describes");
    let size = desc.size().unwrap() as usize;
    assert_eq!(size as u64, btf.resolve_size(id).unwrap());
    let mut bytes = vec![0u8; size];
    let comm = field_offset(&desc, "comm");
    bytes[comm..comm + 6].copy_from_slice(b"victim");
    let v = desc.format(&bytes).unwrap();
    assert_eq!(v["comm"], json!("victim"));
    assert!(v["stack"].is_u64(), "pointers are numbers: {}", v["stack"]);
}

#[test]
fn enum_and_char_array() {
    let obj = load("uprobe_counter");
    let btf = obj.btf.as_ref().unwrap();
    let id = btf.find_by_name_kind("bpf_map_type", kind::ENUM).unwrap();
    assert_eq!(
        format_value(btf, id, &2u32.to_le_bytes()),
        Some(json!("BPF_MAP_TYPE_ARRAY"))
    );
    assert_eq!(
        format_value(btf, id, &27u32.to_le_bytes()),
        Some(json!("BPF_MAP_TYPE_RINGBUF"))
    );
    assert_eq!(format_value(btf, id, &2u16.to_le_bytes()), None);

    // `char LICENSE[4]` (a VAR: formatting resolves it to its type).
    let id = btf.find_by_name_kind("LICENSE", kind::VAR).unwrap();
    assert_eq!(format_value(btf, id, b"GPL\0"), Some(json!("GPL")));
    assert_eq!(format_value(btf, id, b"GPL"), None);
    assert_eq!(format_value(btf, id, b"GPL\0\0"), None);
}

#[test]
fn global_data_sections() {
    let obj = load("globals");
    let types = map_types(&obj);

    // .data with its initial contents: `data_counter = 7`, `data_array = {1, 2, 3, 4}`.
    let data = &obj.maps[obj.map_index(".data").unwrap()];
    let (key, value) = &types[".data"];
    assert_eq!(
        key.as_ref().unwrap().format(&0u32.to_le_bytes()),
        Some(json!(0))
    );
    let value = value.as_ref().unwrap();
    assert_eq!(
        value.format(data.initial_data.as_ref().unwrap()),
        Some(json!({"data_counter": 7, "data_array": [1, 2, 3, 4]}))
    );

    // .rodata: const volatile globals and bpf_printk's format string (a const char array).
    let rodata = &obj.maps[obj.map_index(".rodata").unwrap()];
    let v = types[".rodata"]
        .1
        .as_ref()
        .unwrap()
        .format(rodata.initial_data.as_ref().unwrap())
        .unwrap();
    assert_eq!(v["config_factor"], json!(3));
    assert_eq!(v["config_limit"], json!(1000));
    assert_eq!(v["use_globals.____fmt"], json!("total %llu"));

    // .bss is zero-filled; counters written at the variables' offsets.
    let bss = &obj.maps[obj.map_index(".bss").unwrap()];
    let desc = types[".bss"].1.as_ref().unwrap();
    let mut bytes = vec![0u8; bss.value_size as usize];
    assert_eq!(
        desc.format(&bytes),
        Some(json!({"bss_calls": 0, "bss_total": 0}))
    );
    let (calls, total) = (
        field_offset(desc, "bss_calls"),
        field_offset(desc, "bss_total"),
    );
    assert_ne!(calls, total);
    bytes[calls..calls + 8].copy_from_slice(&2000u64.to_le_bytes());
    bytes[total..total + 8].copy_from_slice(&6000u64.to_le_bytes());
    assert_eq!(
        desc.format(&bytes),
        Some(json!({"bss_calls": 2000, "bss_total": 6000}))
    );
    assert_eq!(desc.format(&bytes[1..]), None);

    // The raw .BTF DATASEC (sizes and offsets left 0 by clang) has no known layout.
    let btf = obj.btf.as_ref().unwrap();
    let id = btf.find_by_name_kind(".bss", kind::DATASEC).unwrap();
    assert_eq!(describe(btf, id), None);
}

#[test]
fn wrong_sizes_give_none() {
    let obj = load("globals");
    let info = MapBtfInfo::from_object(&obj);
    let t = info.get("arr").unwrap();
    let (k, v) = (t.key.as_ref().unwrap(), t.value.as_ref().unwrap());
    assert_eq!(k.format(&[0; 3]), None);
    assert_eq!(k.format(&[0; 8]), None);
    assert_eq!(v.format(&[0; 4]), None);
    assert_eq!(v.format(&[]), None);
    // Only the part whose size matches is formatted.
    assert_eq!(
        info.format_entry("arr", &[0; 3], &5u64.to_le_bytes()),
        Some(json!({"value": 5}))
    );
    assert_eq!(info.format_entry("arr", &[0; 3], &[0; 3]), None);
}

#[test]
fn legacy_maps_have_no_types() {
    let obj = load("legacy_maps");
    let types = map_types(&obj);
    assert!(!types.is_empty());
    for (name, (k, v)) in &types {
        if !name.starts_with('.') {
            assert!(k.is_none() && v.is_none(), "{name}");
        }
    }
}

#[test]
fn persisted_info_round_trips_across_processes() {
    let obj = load("globals");
    let info = MapBtfInfo::from_object(&obj);
    let dir = std::env::temp_dir().join(format!("bpftime-btf-format-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("globals.maps-btf.json");
    bpftime_runtime::state::fs::write_atomic(&path, info.to_json().as_bytes(), 0o644).unwrap();
    let back = MapBtfInfo::load(&path, bpftime_runtime::maps::euid()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(back, info);
    assert_eq!(
        back.format_entry(".data", &0u32.to_le_bytes(), &{
            let d = &obj.maps[obj.map_index(".data").unwrap()];
            d.initial_data.clone().unwrap()
        }),
        Some(json!({"key": 0, "value": {"data_counter": 7, "data_array": [1, 2, 3, 4]}}))
    );
    // Garbage and hostile input are errors or `None`, not panics.
    assert!(MapBtfInfo::from_json("{").is_err());
    assert!(MapBtfInfo::from_json(r#"{"maps": {"m": {"key": {"kind": "nope"}}}}"#).is_err());
    let deep_desc = |n: usize| {
        format!(
            r#"{{"maps": {{"m": {{"key": {}{{"kind": "ptr"}}{}}}}}}}"#,
            r#"{"kind": "array", "len": 1, "elem": "#.repeat(n),
            "}".repeat(n)
        )
    };
    let n = 20;
    let ok = deep_desc(n);
    assert!(MapBtfInfo::from_json(&ok).is_ok(), "{ok}");
    // Past serde_json's recursion limit: an error, not a stack overflow.
    assert!(MapBtfInfo::from_json(&deep_desc(500)).is_err());
    let _: Value = serde_json::from_str(&info.to_json()).unwrap();
}
