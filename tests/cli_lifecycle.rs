//! CLI claims about mirrors, JSON and clean-up that the other CLI tests do not reach: global
//! data (`.data`, `.bss`, `.rodata`) synced to `_data`/`_bss`/`_rodata` pins, `maps --json`'s
//! `sync` and `formatted` fields against bpftool's dump of the same pin, `maps --diff` exit 2
//! on a difference, `unload` removing the pins, and the argument-less `unload` (after a loader
//! killed with -9) and `detach` (every process with the agent).
//!
//! One test at a time: the argument-less `detach` reaches every process with the agent.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

use bpftime_example_programs::model;
use bpftime_testutils::require_kernel;
use serde_json::Value;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn maps_json() -> Value {
    let out = output(&["maps", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn json_row(json: &Value, object: &str, map: &str) -> Value {
    json["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["object"] == object && m["name"] == map)
        .unwrap_or_else(|| panic!("{object}/{map} not in maps --json"))
        .clone()
}

/// `bpftool map dump pinned PIN` as (key, value) byte pairs, sorted.
fn bpftool_dump(pin: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let out = Command::new("bpftool")
        .args(["--json", "map", "dump", "pinned", pin])
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump pinned {pin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut entries: Vec<_> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect();
    entries.sort();
    entries
}

fn wait_synced() {
    let out = output(&["maps", "--wait-synced", "60"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn global_data_syncs_to_underscore_pins_with_sync_and_formatted_json() {
    if !require_kernel("global_data_syncs_to_underscore_pins_with_sync_and_formatted_json") {
        return;
    }
    let _one = serial();
    let loader = Loader::start("bss_atomics", &[]);
    let out = start_victim("bss_atomics", 2000);
    assert!(out.status.success());
    wait_synced();
    let expected = model::expected("bss_atomics", 2000);
    let json = maps_json();
    for (section, pin_name) in [(".bss", "_bss"), (".data", "_data")] {
        let row = json_row(&json, "bss_atomics", section);
        let pin = format!("/sys/fs/bpf/bpftime-rs/bss_atomics/{pin_name}");
        assert_eq!(row["pinned"], pin.as_str(), "{section}");
        let entries: Vec<(Vec<u8>, Vec<u8>)> = row["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
            .collect();
        assert_eq!(&entries, &expected[section], "{section} in userspace");
        // The kernel mirror holds the same bytes, as bpftool reads them.
        assert_eq!(bpftool_dump(&pin), entries, "{section} in the kernel");
        let sync = &row["sync"];
        assert_eq!(sync["in_sync"], true, "{section}: {sync}");
        assert_eq!(sync["forwarder_alive"], true, "{section}: {sync}");
        assert_eq!(sync["failed"], 0, "{section}: {sync}");
        assert_eq!(sync["pending"], 0, "{section}: {sync}");
        assert_eq!(sync["sent"], sync["confirmed"], "{section}: {sync}");
        assert!(sync["sent"].as_u64().unwrap() > 0, "{section}: {sync}");
        assert_eq!(
            sync["forwarder_pid"].as_u64(),
            Some(u64::from(loader.child.id()))
        );
    }
    // `formatted`: the sections' variables by name, from the object's BTF.
    let bss = json_row(&json, "bss_atomics", ".bss");
    let formatted = &bss["entries"][0]["formatted"]["value"];
    let calls = formatted
        .as_array()
        .and_then(|sections| sections.iter().find_map(|s| s.get(".bss")))
        .unwrap_or(formatted);
    let text = calls.to_string();
    for (var, value) in [("calls", 2000u64), ("largest", 1999)] {
        assert!(
            text.contains(&format!("\"{var}\":{value}")),
            "formatted .bss lacks {var} = {value}: {formatted}"
        );
    }
    let data = json_row(&json, "bss_atomics", ".data");
    assert!(
        data["entries"][0]["formatted"]["value"]
            .to_string()
            .contains("\"base\":100"),
        "{}",
        data["entries"][0]
    );
    assert!(loader.stop().success());
    assert!(
        !Path::new("/sys/fs/bpf/bpftime-rs/bss_atomics").exists(),
        "unload removes the object's pins"
    );

    // .rodata is synced too (written once by the loader).
    let loader = Loader::start("rodata_config", &[]);
    wait_synced();
    let row = json_row(&maps_json(), "rodata_config", ".rodata");
    let pin = "/sys/fs/bpf/bpftime-rs/rodata_config/_rodata";
    assert_eq!(row["pinned"], pin);
    let entries: Vec<_> = row["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect();
    assert_eq!(&entries[0].1[..8], &3u64.to_le_bytes(), "scale = 3");
    assert_eq!(bpftool_dump(pin), entries);
    assert!(loader.stop().success());
}

#[test]
fn maps_diff_exits_2_when_the_kernel_mirror_differs() {
    if !require_kernel("maps_diff_exits_2_when_the_kernel_mirror_differs") {
        return;
    }
    let _one = serial();
    let loader = Loader::start("hash_counter", &[]);
    let out = start_victim("hash_counter", 2000);
    assert!(out.status.success());
    wait_synced();
    let pin = "/sys/fs/bpf/bpftime-rs/hash_counter/calls_by_arg";
    let userspace = map_entries("hash_counter", "calls_by_arg");
    assert_eq!(bpftool_dump(pin), userspace, "bpftool sees what maps shows");
    let diff = output(&["maps", "--diff", "hash_counter/calls_by_arg"]);
    assert_eq!(diff.status.code(), Some(0));
    // Change the kernel copy of one entry behind the forwarder's back.
    let (key, _) = &userspace[0];
    let hex = |b: &[u8]| b.iter().map(|x| format!("0x{x:02x}")).collect::<Vec<_>>();
    let status = Command::new("bpftool")
        .args(["map", "update", "pinned", pin, "key"])
        .args(hex(key))
        .arg("value")
        .args(hex(&0xdead_u64.to_le_bytes()))
        .status()
        .unwrap();
    assert!(status.success());
    let diff = output(&["maps", "--diff", "hash_counter/calls_by_arg"]);
    let stdout = String::from_utf8_lossy(&diff.stdout);
    assert_eq!(diff.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains(&format!("{} equal, 1 different", userspace.len() - 1)),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("differs") && l.contains(&format!("{key:02x?}"))),
        "{stdout}"
    );
    assert!(loader.stop().success());
}

#[test]
fn unload_and_detach_without_arguments() {
    if !require_kernel("unload_and_detach_without_arguments") {
        return;
    }
    let _one = serial();
    // A loader killed with -9 leaves its segment, manifest and pins; `unload` cleans them up
    // once no process maps the segment.
    let loader = Loader::start("array_counters", &[]);
    wait_synced();
    let segment = Path::new("/dev/shm/bpftime-rs.array_counters.shm");
    let pins = Path::new("/sys/fs/bpf/bpftime-rs/array_counters");
    assert!(segment.exists() && pins.exists());
    loader.kill();
    let out = output(&["unload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!segment.exists(), "the dead loader's segment is removed");
    assert!(!pins.exists(), "the dead loader's pins are removed");
    assert!(
        !Path::new("/run/bpftime-rs/objects/array_counters/manifest.json").exists(),
        "its manifest is removed"
    );

    // `detach` without a pid: every process with the agent, here two victims blocked in read.
    let loader = Loader::start("array_counters", &["--no-sync"]);
    let victims: Vec<_> = (0..2).map(|_| victim(2000)).collect();
    for v in &victims {
        wait_blocked_in_read(v.id());
        let out = output(&["attach", &v.id().to_string(), "--object", "array_counters"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = output(&["detach"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for v in &victims {
        assert!(
            stdout.contains(&format!("detached from pid {}", v.id())),
            "{stdout}"
        );
    }
    for v in victims {
        assert!(finish(v).contains("done"));
    }
    // No probe ran: the counters are all zero.
    let sums = map_entries("array_counters", "sums");
    assert!(
        sums.iter().all(|(_, v)| v.iter().all(|b| *b == 0)),
        "{sums:?}"
    );
    let out = output(&["detach"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no process has the agent loaded"));
    assert!(loader.stop().success());
}

/// `load --set NAME=VALUE` configures `.rodata` before verification, as a skeleton does
/// between open and load: the program computes with the values given (buckets = 2, scale =
/// 10) and the `.rodata` mirror holds them; bad names, sizes and values are one clear error.
#[test]
fn load_set_configures_rodata_before_verification() {
    if !require_kernel("load_set_configures_rodata_before_verification") {
        return;
    }
    let _one = serial();
    let loader = Loader::start(
        "rodata_config",
        &["--set", "buckets=2", "--set", "scale=0xa"],
    );
    let out = start_victim("rodata_config", 70);
    assert!(out.status.success());
    wait_synced();
    // vt_add(i % 7, i): key (i % 7) % 2, sum 10 * i.
    let mut want = [0u64; 2];
    for i in 0..70u64 {
        want[((i % 7) % 2) as usize] += 10 * i;
    }
    let got = map_entries("rodata_config", "scaled");
    let want: Vec<(Vec<u8>, Vec<u8>)> = (0..2u32)
        .map(|k| {
            (
                k.to_le_bytes().to_vec(),
                want[k as usize].to_le_bytes().to_vec(),
            )
        })
        .collect();
    assert_eq!(got, want);
    let rodata = bpftool_dump("/sys/fs/bpf/bpftime-rs/rodata_config/_rodata");
    assert_eq!(
        &rodata[0].1[..8],
        &10u64.to_le_bytes(),
        "scale = 10 in the mirror"
    );
    assert!(loader.stop().success());

    for (set, says) in [
        ("nosuch=1", "global variable nosuch: not a global of .rodata, .data or .bss (globals: buckets, scale)"),
        ("buckets=4294967296", "--set buckets=4294967296: not a 4-byte integer"),
        ("scale", "--set scale: expected NAME=VALUE"),
    ] {
        let out = bpftime()
            .arg("load")
            .arg(bpftime_example_programs::object_path("rodata_config"))
            .args(["--duration", "1", "--set", set])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} is refused");
        assert!(stderr.contains(says), "--set {set}: {stderr}");
    }
}
