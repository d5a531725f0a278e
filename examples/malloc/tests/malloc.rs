//! malloc.bpf.o on the real victim: under the userspace runtime (agent preloaded, JIT and
//! interpreter) its counts match what the victim did, and under kernel uprobes (aya, scoped to
//! the victim's pid) the deterministic maps have the same contents as in userspace.
//!
//! Only the victim's allocations of 700..799 bytes (777 and the odd sizes) are compared exactly:
//! libc allocates during startup, and under the agent the agent allocates too while it installs
//! its hooks (one hook in place, the next one not yet), so total calls and bytes may only exceed
//! the victim's own. Other sizes in the marked range are reported, and must not occur under
//! the kernel.

use bpftime_example_malloc::{run_kernel, run_userspace, victim_model, Deterministic, MallocMaps};
use bpftime_runtime::loaded::{LoadOptions, VmChoice};
use bpftime_testutils::require_kernel;

const ROUNDS: u64 = 20_000;

fn options(no_jit: bool) -> LoadOptions {
    LoadOptions {
        verify: true,
        vm: VmChoice::Ours,
        no_jit,
        ..LoadOptions::default()
    }
}

/// What the model of the victim says the deterministic maps hold.
fn expected() -> Deterministic {
    let (_, _, marked) = victim_model(ROUNDS);
    Deterministic {
        // glibc's malloc returns 16-byte aligned, non-NULL pointers for these sizes.
        marked_ret: marked.clone(),
        marked,
    }
}

/// Checks one run against the victim model; returns its deterministic part.
fn check_run(what: &str, pid: u32, maps: &MallocMaps) -> Deterministic {
    let (calls, bytes, _) = victim_model(ROUNDS);
    let &(seen_calls, seen_bytes) = maps
        .stats
        .get(&pid)
        .unwrap_or_else(|| panic!("{what}: no stats for pid {pid}: {:?}", maps.stats));
    assert!(
        seen_calls >= calls && seen_bytes >= bytes,
        "{what}: saw {seen_calls} calls / {seen_bytes} bytes, the victim alone made {calls} / {bytes}"
    );
    // The startup allocations of libc (and of the agent) are few next to the victim's.
    assert!(
        seen_calls - calls < 1000,
        "{what}: {} calls more than the victim made",
        seen_calls - calls
    );
    let size_calls: u64 = maps
        .sizes
        .iter()
        .filter(|((t, _), _)| *t == pid)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        size_calls, seen_calls,
        "{what}: the size histogram sums to the calls"
    );
    let returns: u64 = maps.latency_ns.iter().sum();
    assert!(
        returns >= calls,
        "{what}: {returns} latency samples for at least {calls} returns"
    );
    let (_, _, model) = victim_model(ROUNDS);
    let (det, other) = maps.deterministic(pid, |s| model.contains_key(&s));
    assert_eq!(
        det,
        expected(),
        "{what}: the victim's marked sizes (700..799 bytes)"
    );
    if other != Deterministic::default() {
        println!("{what}: allocations in the marked range not made by the victim: {other:?}");
    }
    println!(
        "{what}: pid {pid}: {seen_calls} calls, {seen_bytes} bytes ({} startup calls beyond the \
         victim's), {} marked sizes exact, {returns} latency samples",
        seen_calls - calls,
        det.marked.len()
    );
    det
}

#[test]
fn userspace_counts_match_the_victim() {
    // The programs pass the kernel verifier first (verify: true).
    if !require_kernel("userspace_counts_match_the_victim") {
        return;
    }
    for (tag, no_jit) in [("jit", false), ("interpreter", true)] {
        let segment = format!("malloc-test-{tag}-{}", std::process::id());
        let (pid, maps, status) = run_userspace(ROUNDS, options(no_jit), &segment)
            .unwrap_or_else(|e| panic!("{tag}: {e:#}"));
        assert_eq!(
            status.lines().filter(|l| l.starts_with("ok ")).count(),
            2,
            "{status}"
        );
        check_run(&format!("userspace {tag}"), pid, &maps);
    }
}

#[test]
fn kernel_uprobes_give_the_same_deterministic_maps() {
    if !require_kernel("kernel_uprobes_give_the_same_deterministic_maps") {
        return;
    }
    let (kpid, kmaps) = run_kernel(ROUNDS).unwrap_or_else(|e| panic!("kernel: {e:#}"));
    let kernel = check_run("kernel", kpid, &kmaps);
    assert_eq!(
        kmaps.deterministic(kpid, |_| true).0,
        kernel,
        "kernel: no other marked sizes"
    );
    // Scoped to the victim's pid: nothing else was counted.
    assert_eq!(
        kmaps.stats.keys().collect::<Vec<_>>(),
        vec![&kpid],
        "kernel: only the victim"
    );
    let segment = format!("malloc-test-vs-kernel-{}", std::process::id());
    let (upid, umaps, _) =
        run_userspace(ROUNDS, options(false), &segment).unwrap_or_else(|e| panic!("{e:#}"));
    let user = check_run("userspace jit", upid, &umaps);
    assert_eq!(user, kernel, "userspace and kernel deterministic maps");
    println!(
        "kernel == userspace on {} marked sizes ({} calls)",
        kernel.marked.len(),
        kernel.marked.values().sum::<u64>()
    );
}

/// `malloc_stats` reads the shared maps while the victim runs: two prints a few hundred ms apart
/// show the victim's pid with growing counts, and never more than the maps hold after it exits.
#[test]
fn malloc_stats_prints_the_counts_live() {
    if !require_kernel("malloc_stats_prints_the_counts_live") {
        return;
    }
    use bpftime_example_malloc::{
        object_path, remove_agent_files, victim_path, with_agent, Waiting,
    };
    use bpftime_runtime::loaded::LoadedObject;
    use std::time::{Duration, Instant};

    let segment = "malloc-stats-live";
    bpftime_runtime::loaded::unload_object(segment);
    let loaded = LoadedObject::load(&object_path("malloc"), Some(segment), options(false)).unwrap();
    assert!(loaded.refused.is_empty(), "{:?}", loaded.refused);
    // 20,000 rounds with a 100 ms pause every 1,000: about 2 s of a running victim.
    let mut command = std::process::Command::new(victim_path());
    command.args([&ROUNDS.to_string(), "--sleep-ms", "100"]);
    let config = with_agent(&mut command, segment).unwrap();
    let victim = Waiting::spawn(&mut command).unwrap();
    let pid = victim.pid();
    let running = std::thread::spawn(move || victim.go());
    let calls_now = || {
        MallocMaps::from_shm(&loaded.shm)
            .unwrap()
            .stats
            .get(&pid)
            .map(|s| s.0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls_now().is_none() {
        assert!(
            Instant::now() < deadline,
            "the victim's calls never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_malloc_stats"))
        .args([segment, "--count", "2", "--interval-ms", "300"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<u64> = stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == pid.to_string()).then(|| f.next()?.parse().ok())?
        })
        .collect();
    assert_eq!(
        printed.len(),
        2,
        "one line for the victim per print: {stdout}"
    );
    assert!(
        printed[1] > printed[0],
        "counts grow while it runs: {stdout}"
    );
    let victim_out = running.join().unwrap().unwrap();
    assert!(victim_out.contains("done"), "{victim_out}");
    let final_calls = calls_now().unwrap();
    assert!(printed[1] <= final_calls, "{printed:?} then {final_calls}");
    let (victim_calls, _, _) = victim_model(ROUNDS);
    assert!(
        final_calls >= victim_calls,
        "{final_calls} < the victim's {victim_calls}"
    );
    remove_agent_files(&config);
    let _ = loaded.unload();
}
