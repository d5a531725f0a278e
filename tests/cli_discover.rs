//! Objects loaded after a target started reach it: a target started with `bpftime-rs start --`
//! (no `--object`) attaches objects as they are loaded. Its own test binary: a discovering
//! target would also pick up the objects other tests load at the same time.

mod common;

use std::process::Stdio;

use bpftime_example_programs::{model, victim_path};
use bpftime_testutils::require_kernel;
use common::{bpftime, finish, map_entries, output, wait_for, Loader};

#[test]
fn object_loaded_after_the_target_started_reaches_it() {
    if !require_kernel("object_loaded_after_the_target_started_reaches_it") {
        return;
    }
    let _ = output(&["unload", "hash_counter"]);
    let target = bpftime()
        .args(["start", "--"])
        .arg(victim_path())
        .arg("2000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bpftime-rs start");
    let tag = format!("start-{}-", target.id());
    let status = || {
        std::fs::read_dir("/run/bpftime-rs/agents")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&tag))
            })
            .map(|dir| dir.join("agent.conf.status"))
    };
    wait_for("the target's agent", || {
        status().is_some_and(|p| p.exists())
    });
    // Loaded while the target waits for its go line.
    let loader = Loader::start("hash_counter", &["--no-sync"]);
    let status_file = status().expect("status file");
    wait_for("the agent to attach hash_counter", || {
        std::fs::read_to_string(&status_file).is_ok_and(|t| t.contains("ok hash_counter/"))
    });
    let stdout = finish(target);
    assert!(stdout.contains("done"), "{stdout}");
    let expected = &model::expected("hash_counter", 2000)["calls_by_arg"];
    assert_eq!(&map_entries("hash_counter", "calls_by_arg"), expected);
    loader.stop();
    let _ = output(&["unload", "hash_counter"]);
}
