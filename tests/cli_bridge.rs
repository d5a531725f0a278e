//! The CLI over the kernel bridge: `bridge selftest`, `maps`, and bpftool agreeing with both.

mod common;

use common::bytes;
use std::process::Command;

use bpftime_testutils::require_kernel;
use serde_json::Value;

fn bpftime(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bpftime-rs"))
        .args(args)
        .output()
        .expect("running bpftime-rs")
}

fn bpftool() -> Command {
    let path = ["/usr/sbin/bpftool", "/usr/local/sbin/bpftool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("bpftool");
    Command::new(path)
}

fn entries(json: &Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<_> = json
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect();
    out.sort();
    out
}

#[test]
fn selftest_then_maps_and_bpftool_agree() {
    if !require_kernel("selftest_then_maps_and_bpftool_agree") {
        return;
    }
    let out = bpftime(&["bridge", "selftest", "--updates", "20000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("sent 20000"), "{stdout}");
    assert!(stdout.contains("lost 0  pending 0"), "{stdout}");
    assert!(!stdout.contains("MISMATCH"), "{stdout}");

    let out = bpftime(&["maps", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing: Value = serde_json::from_slice(&out.stdout).expect("maps --json is JSON");
    let maps = listing["maps"].as_array().expect("maps array");
    let small = maps
        .iter()
        .find(|m| m["object"] == "selftest" && m["name"] == "small_u32_u64")
        .expect("selftest/small_u32_u64 listed");
    assert_eq!(small["type"], "hash");
    assert_eq!(small["key_size"], 4);
    assert_eq!(small["value_size"], 8);
    assert_eq!(small["max_entries"], 64);
    assert_eq!(
        small["pinned"],
        "/sys/fs/bpf/bpftime-rs/selftest/small_u32_u64"
    );
    let ours = entries(&small["entries"]);
    assert_eq!(ours.len(), 64, "the small hash is full after the selftest");

    let dump = bpftool()
        .args([
            "-j",
            "map",
            "dump",
            "pinned",
            "/sys/fs/bpf/bpftime-rs/selftest/small_u32_u64",
        ])
        .output()
        .expect("running bpftool");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let theirs: Value = serde_json::from_slice(&dump.stdout).expect("bpftool JSON");
    assert_eq!(entries(&theirs), ours, "bpftool and bpftime-rs maps agree");

    let percpu = maps
        .iter()
        .find(|m| m["object"] == "selftest" && m["name"] == "percpu_u32_u64")
        .expect("per-CPU mirror listed");
    let first = &percpu["entries"][0];
    assert!(
        first["values"].as_array().is_some_and(|v| !v.is_empty()),
        "{first}"
    );
    assert!(first["values"][0]["cpu"].is_u64());

    let out = bpftime(&["maps"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert!(table.contains("selftest/small_u32_u64"), "{table}");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = bpftime(&["bridge", "selftest", "--updates", "lots"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--updates"), "{stderr}");
    let out = bpftime(&["no-such-command"]);
    assert!(!out.status.success());
}
