//! Every `load` and `bridge selftest` flag the README lists, by its observable effect:
//! `--duration`, `--sync MAP,..` (and its errors), `--confirm-each`, `selftest --json/--seed`,
//! and the maps `load` reports it cannot mirror.

mod common;

use common::*;
use std::time::Instant;

use bpftime_example_programs::{model, object_path};
use bpftime_testutils::require_kernel;
use serde_json::Value;

/// The tests load the same objects: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `maps --json` row of `object/map`.
fn json_row(object: &str, map: &str) -> Value {
    let out = output(&["maps", "--json"]);
    assert!(out.status.success());
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["object"] == object && m["name"] == map)
        .unwrap_or_else(|| panic!("{object}/{map} not listed"))
        .clone()
}

#[test]
fn load_with_a_duration_exits_by_itself_and_names_the_maps_it_cannot_mirror() {
    if !require_kernel("load_with_a_duration_exits_by_itself_and_names_the_maps_it_cannot_mirror") {
        return;
    }
    let _one = serial();
    let _ = output(&["unload", "printk"]);
    let started = Instant::now();
    let out = output(&[
        "load",
        object_path("printk").to_str().unwrap(),
        "--duration",
        "1.5",
    ]);
    let took = started.elapsed();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took.as_secs_f64() >= 1.5, "exited after {took:?}");
    for line in [
        "map calls (ringbuf) has no kernel mirror: not synced",
        "map perf_calls (perf_event_array) has no kernel mirror: not synced",
        "stopped; the maps of printk stay for running targets",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    // Naming such a map, or one the object does not have, is a one-line error naming it.
    for (map, why) in [
        ("calls", "has no kernel mirror"),
        ("nope", "is not a map of printk"),
    ] {
        let out = output(&[
            "load",
            object_path("printk").to_str().unwrap(),
            "--sync",
            map,
        ]);
        assert!(!out.status.success(), "--sync {map} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(map) && stderr.contains(why), "{stderr}");
    }
    assert!(output(&["unload", "printk"]).status.success());
}

#[test]
fn load_prints_perf_event_array_records() {
    if !require_kernel("load_prints_perf_event_array_records") {
        return;
    }
    let _one = serial();
    let loader = Loader::start("printk", &["--no-sync"]);
    assert!(start_victim("printk", 20).status.success());
    // vt_add(i % 7, i): a == 3 for i = 3, 10, 17; the perf record carries a (8 bytes).
    wait_for("three perf records", || {
        loader
            .later
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == "perf_calls: 03 00 00 00 00 00 00 00")
            .count()
            == 3
    });
    assert!(loader.stop().success());
}

#[test]
fn sync_selects_maps_and_confirm_each_keeps_them_exact() {
    if !require_kernel("sync_selects_maps_and_confirm_each_keeps_them_exact") {
        return;
    }
    let _one = serial();
    // --sync NAME: only that map gets a mirror.
    let loader = Loader::start("bss_atomics", &["--sync", ".bss"]);
    assert!(
        loader
            .lines
            .iter()
            .any(|l| l.starts_with("map .bss synced to ")),
        "{:?}",
        loader.lines
    );
    let synced: Vec<&String> = loader
        .lines
        .iter()
        .filter(|l| l.contains(" synced to "))
        .collect();
    assert_eq!(synced.len(), 1, "{synced:?}");
    assert!(loader.stop().success());

    // --confirm-each: one confirmation per update, and the mirror is exact all the same.
    let loader = Loader::start("hash_counter", &["--confirm-each"]);
    assert!(start_victim("hash_counter", 2000).status.success());
    let out = output(&["maps", "--wait-synced", "30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = &model::expected("hash_counter", 2000)["calls_by_arg"];
    assert_eq!(&map_entries("hash_counter", "calls_by_arg"), expected);
    let diff = output(&["maps", "--diff", "hash_counter/calls_by_arg"]);
    assert!(diff.status.success(), "{}", stdout(&diff));
    let row = json_row("hash_counter", "calls_by_arg");
    let sync = &row["sync"];
    assert_eq!(sync["sent"], sync["confirmed"], "{sync}");
    assert_eq!(sync["failed"], 0, "{sync}");
    let (sent, confirmations) = stop_and_read_bridge_line(loader);
    assert!(sent > 0);
    assert_eq!(
        confirmations, sent,
        "--confirm-each: one confirmation record per update"
    );
    // Without the flag: one per drained batch, fewer than the updates.
    let loader = Loader::start("hash_counter", &[]);
    assert!(start_victim("hash_counter", 2000).status.success());
    assert!(output(&["maps", "--wait-synced", "30"]).status.success());
    let (sent, confirmations) = stop_and_read_bridge_line(loader);
    assert!(
        confirmations < sent,
        "batched confirmations: {confirmations} for {sent} updates"
    );
}

#[test]
fn selftest_seed_replays_and_confirm_each_confirms_every_update() {
    if !require_kernel("selftest_seed_replays_and_confirm_each_confirms_every_update") {
        return;
    }
    let _one = serial();
    let run = |extra: &[&str]| -> Value {
        let mut args = vec!["bridge", "selftest", "--updates", "3000", "--json"];
        args.extend_from_slice(extra);
        let out = output(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("selftest --json prints JSON")
    };
    let a = run(&["--seed", "7"]);
    let b = run(&["--seed", "7"]);
    let each = run(&["--seed", "7", "--confirm-each"]);
    for r in [&a, &b, &each] {
        let c = &r["counters"];
        assert_eq!(c["sent"], 3000, "{c}");
        assert_eq!(r["lost"], 0);
        assert_eq!(c["pending"], 0);
        assert_eq!(r["mismatches"].as_array().unwrap().len(), 0, "{r}");
    }
    // The same seed is the same update stream: the same failures the model predicts, the same
    // final kernel contents.
    assert_eq!(a["expected_failures"], b["expected_failures"]);
    assert_eq!(a["counters"]["failed"], b["counters"]["failed"]);
    assert_eq!(a["expected_failures"], each["expected_failures"]);
    let entries = |r: &Value| -> Vec<(Value, Value)> {
        r["maps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].clone(), m["kernel_entries"].clone()))
            .collect()
    };
    assert_eq!(entries(&a), entries(&b));
    // Batched mode confirms far fewer times than it sends; --confirm-each once per update.
    let confirmations = |r: &Value| r["counters"]["confirmations"].as_u64().unwrap();
    assert_eq!(confirmations(&each), 3000, "{}", each["counters"]);
    assert!(confirmations(&a) < 3000, "{}", a["counters"]);
}

/// Stops `loader` and reads its last `bridge: N updates sent, M confirmation records ...`
/// line: (N, M).
fn stop_and_read_bridge_line(loader: Loader) -> (u64, u64) {
    let later = std::sync::Arc::clone(&loader.later);
    assert!(loader.stop().success());
    // The reader thread may still be taking the last lines off the pipe.
    let mut line = None;
    wait_for("the loader's bridge line", || {
        line = later
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|l| l.starts_with("bridge: "))
            .cloned();
        line.is_some()
    });
    let line = line.expect("found");
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[1].parse().unwrap(), words[4].parse().unwrap())
}
