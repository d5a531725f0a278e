//! Objects loaded after a target started reach it: a target started with `bpftime-rs start --`
//! (no `--object`) attaches objects as they are loaded. Its own test binary: a discovering
//! target would also pick up the objects other tests load at the same time.

mod common;

use bpftime_example_programs::model;
use bpftime_testutils::require_kernel;
use common::{agent_status_file, finish, map_entries, output, spawn_target, wait_for, Loader};

#[test]
fn object_loaded_after_the_target_started_reaches_it() {
    if !require_kernel("object_loaded_after_the_target_started_reaches_it") {
        return;
    }
    let _ = output(&["unload", "hash_counter"]);
    let target = spawn_target(None, 2000);
    let status_file = agent_status_file(target.id());
    // Loaded while the target waits for its go line.
    let loader = Loader::start("hash_counter", &["--no-sync"]);
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
