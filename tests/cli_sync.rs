//! Sync at scale through the real CLI: `bpftime-rs load` (and the forwarder it starts) with
//! targets started by `bpftime-rs start`, writing a million distinct keys through the update
//! helper, through looked-up pointers, and deleting some (`examples/programs/sync_keys.bpf.c`,
//! `victim_keys.c`). Userspace must hold exactly what the victims' calls imply, and once the
//! forwarder is idle the kernel mirrors must equal userspace entry by entry, with the counters
//! agreeing: nothing lost, nothing silent.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Child, Stdio};

use bpftime_example_programs::victim_keys_path;
use bpftime_runtime::maps::{EntryValue, ShmObject};
use bpftime_testutils::require_kernel;

const OBJECT: &str = "sync_keys";

/// `bpftime-rs start --object sync_keys -- victim_keys THREADS KEYS BASE`, waiting for "go".
fn start_keys(threads: u32, keys: u32, base: u32) -> Child {
    start_keys_passes(threads, keys, base, 1)
}

/// The same, writing its keys PASSES times (0: until killed).
fn start_keys_passes(threads: u32, keys: u32, base: u32, passes: u32) -> Child {
    bpftime()
        .args(["start", "--object", OBJECT, "--"])
        .arg(victim_keys_path())
        .args([threads, keys, base, passes].map(|n| n.to_string()))
        .env("BPFTIME_QUIET", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the victim")
}

/// Starts every victim, then lets them all go at once and waits for each.
fn run_victims(victims: &[(u32, u32, u32)]) {
    let mut children: Vec<Child> = victims
        .iter()
        .map(|&(t, k, b)| start_keys(t, k, b))
        .collect();
    for child in &mut children {
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("done"),
            "victim: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What the victims' calls leave in `keys`: per thread, vk_put(k, 3k + 1) for every key, then
/// vk_bump(k, 100) for every 4th, then vk_del(k) for every 7th.
fn model(victims: &[(u32, u32, u32)]) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for &(threads, keys, base) in victims {
        for t in 0..threads {
            let first = base + t * keys;
            for i in 0..keys {
                if i % 7 == 0 {
                    continue;
                }
                let k = first + i;
                let bump = if i % 4 == 0 { 100 } else { 0 };
                out.insert(k, u64::from(k) * 3 + 1 + bump);
            }
        }
    }
    out
}

fn user_map(shm: &ShmObject, map: &str) -> BTreeMap<u32, u64> {
    shm.map(map)
        .unwrap()
        .iter()
        .into_iter()
        .map(|e| {
            let key = u32::from_le_bytes(e.key[..4].try_into().unwrap());
            let EntryValue::Single(v) = e.value else {
                panic!("no per-CPU maps here")
            };
            (key, u64::from_le_bytes(v[..8].try_into().unwrap()))
        })
        .collect()
}

/// The `maps` table row of `object/map`, split into its columns.
fn table_row(map: &str) -> Vec<String> {
    let out = output(&["maps"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    table
        .lines()
        .find(|l| l.starts_with(&format!("{OBJECT}/{map} ")))
        .unwrap_or_else(|| panic!("{map} not in the table:\n{table}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Waits for the forwarder, then checks the kernel mirror of `map` against userspace with
/// `maps --diff` and the sync counters in the `maps` table.
fn assert_mirror_equal(map: &str, entries: usize) {
    let out = output(&["maps", "--diff", &format!("{OBJECT}/{map}")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "maps --diff {map} (exit {:?}): {}",
        out.status.code(),
        stdout.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(
        stdout.contains(&format!("{entries} equal, 0 different")),
        "{stdout}"
    );
    // NAME TYPE KEY VALUE MAX USER KERNEL SENT CONFIRMED FAILED PENDING OLDEST STATE PIN
    let row = table_row(map);
    assert_eq!(row[5], entries.to_string(), "USER: {row:?}");
    assert_eq!(row[6], entries.to_string(), "KERNEL: {row:?}");
    assert_eq!(row[7], row[8], "SENT == CONFIRMED: {row:?}");
    assert_eq!(row[9], "0", "FAILED: {row:?}");
    assert_eq!(row[10], "0", "PENDING: {row:?}");
    assert_eq!(row[12], "in-sync", "STATE: {row:?}");
}

/// The tests share one object name: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check(victims: &[(u32, u32, u32)]) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let loader = Loader::start(OBJECT, &[]);
    run_victims(victims);
    let out = output(&["maps", "--wait-synced", "120"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let shm = ShmObject::open(OBJECT).unwrap();
    let want = model(victims);
    let keys = user_map(&shm, "keys");
    assert_eq!(keys.len(), want.len(), "userspace holds every key");
    assert!(
        keys == want,
        "userspace values differ from the victims' calls"
    );
    assert_mirror_equal("keys", want.len());
    // The LRU evicted most keys (64 Ki entries for a million): whatever it holds was never
    // evicted, so it holds the key's latest value.
    let recent = user_map(&shm, "recent");
    assert!(recent.len() <= 1 << 16 && !recent.is_empty());
    for (k, v) in &recent {
        assert_eq!(want.get(k), Some(v), "LRU entry {k}");
    }
    assert_mirror_equal("recent", recent.len());
    // What the forwarder published for each map: everything sent was confirmed, nothing
    // failed, nothing is left unsynced or pending.
    for map in ["keys", "recent"] {
        let handle = shm.map(map).unwrap();
        let r = handle.sync_report().expect("the forwarder reported");
        assert!(
            r.sent == r.confirmed && r.failed == 0 && r.pending == 0 && r.unsynced == 0,
            "{map}: {r:?}"
        );
        eprintln!(
            "{map}: {} sent, {} resyncs, {} tombstones dropped",
            r.sent,
            r.resyncs,
            handle.counters().tombstones_dropped
        );
    }
    drop(shm);
    assert!(loader.stop().success());
}

#[test]
fn a_million_distinct_keys_from_one_thread_reach_the_kernel() {
    if !require_kernel("a_million_distinct_keys_from_one_thread_reach_the_kernel") {
        return;
    }
    check(&[(1, 1_000_000, 0)]);
}

#[test]
fn a_million_distinct_keys_from_four_processes_of_eight_threads_reach_the_kernel() {
    if !require_kernel(
        "a_million_distinct_keys_from_four_processes_of_eight_threads_reach_the_kernel",
    ) {
        return;
    }
    let victims: Vec<(u32, u32, u32)> = (0..4).map(|p| (8, 31_250, p * 250_000)).collect();
    check(&victims);
}

/// Kill -9 at random moments (fixed seed), of targets and of `bpftime-rs load` itself: each
/// round starts two survivor targets (4 threads, their own 5,000 keys each) and a doomed one
/// (4 threads writing 400,000 keys, shared by the doomed of every round, over and over until
/// killed), kills the doomed one
/// mid-run (checked to be still running), and in every other round SIGKILLs the loader at
/// another random moment and starts a new `load` process over what it left. The last round
/// keeps its loader, so the incremental path, not only a restart's full resend, carries its
/// keys. At the end userspace holds every survivor key with exactly its value (and none of
/// the deleted ones), every doomed key left has a value one of its calls wrote, and the kernel
/// mirrors equal userspace entry by entry.
#[test]
fn targets_and_the_loader_killed_at_random_moments_lose_nothing() {
    if !require_kernel("targets_and_the_loader_killed_at_random_moments_lose_nothing") {
        return;
    }
    use rand::{Rng, SeedableRng};
    use std::time::Duration;
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0c0f_fee5);
    const ROUNDS: u32 = 8;
    const DOOMED_BASE: u32 = 600_000;
    let mut loader = Loader::start(OBJECT, &[]);
    let mut survivors = Vec::new();
    let mut loader_kills = 0;
    // How many loader kills found records sent and not yet confirmed (what the forwarder last
    // published in the segment): a kill with nothing in flight tests less.
    let mut killed_in_flight = 0;
    let segment = ShmObject::open(OBJECT).unwrap();
    for round in 0..ROUNDS {
        let mine: Vec<(u32, u32, u32)> = (0..2)
            .map(|p| (4, 5_000, round * 40_000 + p * 20_000))
            .collect();
        let mut children: Vec<Child> = mine.iter().map(|&(t, k, b)| start_keys(t, k, b)).collect();
        let mut doomed = start_keys_passes(4, 100_000, DOOMED_BASE, 0);
        for child in children.iter_mut().chain(std::iter::once(&mut doomed)) {
            child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        }
        let doomed_at = Duration::from_millis(rng.random_range(5..120));
        let loader_at = (round % 2 == 0 && round + 1 < ROUNDS)
            .then(|| Duration::from_millis(rng.random_range(0..150)));
        let started = std::time::Instant::now();
        let mut events: Vec<(Duration, bool)> = vec![(doomed_at, true)];
        if let Some(at) = loader_at {
            events.push((at, false));
        }
        events.sort();
        for (at, is_doomed) in events {
            std::thread::sleep(at.saturating_sub(started.elapsed()));
            if is_doomed {
                assert!(
                    doomed.try_wait().unwrap().is_none(),
                    "round {round}: the doomed target finished before its kill at {at:?}"
                );
                doomed.kill().unwrap();
            } else {
                let pending = ["keys", "recent"]
                    .iter()
                    .filter_map(|m| segment.map(*m).ok()?.sync_report())
                    .map(|r| r.pending + r.unsynced)
                    .sum::<u64>();
                killed_in_flight += usize::from(pending > 0);
                loader.kill();
                loader_kills += 1;
                loader = Loader::restart(OBJECT, &[]);
            }
        }
        let status = doomed.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "round {round}"
        );
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: a survivor failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        survivors.extend(mine);
    }
    assert_eq!(loader_kills, ROUNDS / 2);
    drop(segment);
    assert!(
        killed_in_flight > 0,
        "no loader kill found records in flight ({loader_kills} kills): the test did not kill \
         the forwarder mid-stream"
    );
    let out = output(&["maps", "--wait-synced", "120"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let shm = ShmObject::open(OBJECT).unwrap();
    let keys = user_map(&shm, "keys");
    let want = model(&survivors);
    let survivor_keys = ROUNDS * 40_000;
    let mine: BTreeMap<u32, u64> = keys.range(..survivor_keys).map(|(k, v)| (*k, *v)).collect();
    assert_eq!(mine.len(), want.len(), "survivor keys in userspace");
    assert!(mine == want, "survivor values differ from their calls");
    for (k, v) in keys.range(survivor_keys..) {
        assert!(
            (DOOMED_BASE..DOOMED_BASE + 400_000).contains(k),
            "key {k} was never written"
        );
        assert!(
            *v == u64::from(*k) * 3 + 1 || *v == u64::from(*k) * 3 + 101,
            "doomed key {k} holds {v}, which no call wrote"
        );
    }
    assert_mirror_equal("keys", keys.len());
    assert_mirror_equal("recent", user_map(&shm, "recent").len());
    for map in ["keys", "recent"] {
        let c = shm.map(map).unwrap().counters();
        eprintln!(
            "{map}: {} locks taken over from killed writers, {} recounts",
            c.recoveries, c.repairs
        );
    }
    drop(shm);
    assert!(loader.stop().success());
}
