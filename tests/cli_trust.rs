//! The trust boundaries of the README's threat model, tried the way a local attacker would:
//! an unprivileged user (uid 65534, `nobody`) against root's `bpftime-rs`, and a target that
//! rewrites its object's shared memory at random. Each test first shows the attack surface is
//! what the README says (modes, owners), then mounts the attack and checks it fails while root's
//! targets run exactly the programs root loaded.

mod common;

use common::*;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bpftime_example_programs::{agent_library, model, victim_path};
use bpftime_testutils::require_kernel;
use rand::{Rng, SeedableRng};

const NOBODY: u32 = 65534;

/// The tests load the same example objects: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Copies of the CLI, the agent and the victim in a directory every user can read and run
/// (the build tree may not be: a CI checkout can live under a private home directory).
struct Tools {
    bpftime: PathBuf,
    victim: PathBuf,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bpftime-trust-tools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = |from: &Path, name: &str| {
            let to = dir.join(name);
            std::fs::copy(from, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
            to
        };
        copy(&agent_library(), "libbpftime_agent.so");
        Tools {
            bpftime: copy(Path::new(env!("CARGO_BIN_EXE_bpftime-rs")), "bpftime-rs"),
            victim: copy(&victim_path(), "victim"),
        }
    })
}

/// `sh -c SCRIPT` as uid/gid 65534 with no supplementary groups.
fn as_nobody(script: &str) -> std::process::Output {
    Command::new("sh")
        .args(["-c", script])
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .output()
        .expect("running sh as nobody")
}

fn fails_as_nobody(what: &str, script: &str) {
    let out = as_nobody(script);
    assert!(
        !out.status.success(),
        "nobody could {what}: `{script}` succeeded"
    );
}

fn segment(object: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/bpftime-rs.{object}.shm"))
}

fn manifest(object: &str) -> PathBuf {
    PathBuf::from(format!("/run/bpftime-rs/objects/{object}/manifest.json"))
}

/// Root runs the victim under `bpftime-rs start` and checks the example's map against the
/// model of its calls: the program root loaded ran, unchanged, on every call.
fn root_target_runs_the_loaded_program(object: &str, rounds: u32) {
    let out = start_victim(object, rounds);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("ok {object}/")), "{stderr}");
    let (map, expected) = match object {
        "hash_counter" => ("calls_by_arg", "calls_by_arg"),
        "array_counters" => ("sums", "sums"),
        other => panic!("no model for {other}"),
    };
    assert_eq!(
        &map_entries(object, map),
        &model::expected(object, rounds)[expected]
    );
}

#[test]
fn an_unprivileged_user_cannot_change_what_roots_targets_run() {
    if !require_kernel("an_unprivileged_user_cannot_change_what_roots_targets_run") {
        return;
    }
    let _one = serial();
    let loader = Loader::start("hash_counter", &["--no-sync"]);
    // The surface: the segment is root's alone; the manifest (the only place programs come
    // from) and every directory on its way are root's and writable by nobody else.
    let seg = std::fs::metadata(segment("hash_counter")).unwrap();
    assert_eq!((seg.uid(), seg.mode() & 0o777), (0, 0o600));
    let man = std::fs::metadata(manifest("hash_counter")).unwrap();
    assert_eq!((man.uid(), man.mode() & 0o777), (0, 0o644));
    for dir in [
        "/run/bpftime-rs",
        "/run/bpftime-rs/objects",
        "/run/bpftime-rs/objects/hash_counter",
        "/run/bpftime-rs/agents",
    ] {
        let m = std::fs::metadata(dir).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o755), "{dir}");
    }
    let seg = segment("hash_counter");
    let seg = seg.display();
    let man = manifest("hash_counter");
    let man = man.display();
    // The attack that used to work: rewrite the published program's bytes. They are not in the
    // segment any more, and neither the segment nor the manifest can be opened for writing.
    fails_as_nobody("read root's segment", &format!("cat {seg} > /dev/null"));
    fails_as_nobody("write root's segment", &format!("printf x >> {seg}"));
    fails_as_nobody("write the manifest", &format!("printf x >> {man}"));
    fails_as_nobody(
        "replace the manifest",
        &format!("cp /dev/null /tmp/nb.$$ && mv -f /tmp/nb.$$ {man}"),
    );
    fails_as_nobody(
        "plant a file beside the manifest",
        "touch /run/bpftime-rs/objects/hash_counter/evil",
    );
    fails_as_nobody(
        "plant an agent config",
        "ln -s /etc/passwd /run/bpftime-rs/agents/planted",
    );
    fails_as_nobody(
        "remove the segment",
        &format!("rm -f {seg} && test ! -e {seg}"),
    );
    root_target_runs_the_loaded_program("hash_counter", 2000);
    loader.stop();
}

/// A manifest nobody writes in their own state directory: a program that stores to address 0.
fn plant_object(object: &str) -> (PathBuf, PathBuf) {
    let seg = segment(object);
    let out = as_nobody(&format!(
        "head -c 1048576 /dev/zero > {} && chmod 600 {}",
        seg.display(),
        seg.display()
    ));
    assert!(out.status.success(), "{out:?}");
    let meta = std::fs::metadata(&seg).unwrap();
    assert_eq!(meta.uid(), NOBODY);
    let state = bpftime_runtime::state::state_dir_path(NOBODY);
    let dir = state.join("objects").join(object);
    std::fs::create_dir_all(&dir).unwrap();
    // r1 = 0; *(u64 *)(r1 + 0) = r1; r0 = 0; exit
    let insns = "b701000000000000\
                 7b11000000000000\
                 b700000000000000\
                 9500000000000000";
    let manifest = serde_json::json!({
        "format": 1, "object": object, "source": "planted", "owner_uid": NOBODY,
        "loader_pid": std::process::id(), "loader_start": 0, "generation": 1,
        "segment": {"dev": meta.dev(), "ino": meta.ino(), "uid": NOBODY},
        "maps": [],
        "programs": [{"index": 0, "name": "evil", "section": "uprobe/victim:vt_add",
            "attach_target": "victim:vt_add", "prog_type": 2, "vm": "jit", "verified": true,
            "insns": insns}],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let chown = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(&state)
        .status()
        .unwrap();
    assert!(chown.success());
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    (seg, dir)
}

#[test]
fn a_planted_object_is_never_attached_to_roots_targets() {
    if !require_kernel("a_planted_object_is_never_attached_to_roots_targets") {
        return;
    }
    let _one = serial();
    let planted = format!("planted-{}", std::process::id());
    let (seg, dir) = plant_object(&planted);
    let loader = Loader::start("hash_counter", &["--no-sync"]);
    // `start` without --object attaches "every loaded object": only trusted ones, and it says
    // which it skipped and why.
    let mut child = spawn_target(None, 2000);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "skipping {}: owned by uid {NOBODY}, which is neither root nor you",
            seg.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("evil"), "{stderr}");
    assert_eq!(
        &map_entries("hash_counter", "calls_by_arg"),
        &model::expected("hash_counter", 2000)["calls_by_arg"]
    );
    // Naming it explicitly does not help: root's agent does not read nobody's manifests.
    let out = start_victim(&planted, 100);
    assert!(out.status.success(), "the target runs on: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("error object {planted}")) && stderr.contains("not loaded"),
        "{stderr}"
    );
    loader.stop();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&seg).unwrap();
}

#[test]
fn root_never_writes_through_a_planted_link() {
    if !require_kernel("root_never_writes_through_a_planted_link") {
        return;
    }
    let _one = serial();
    let precious = std::env::temp_dir().join(format!("bpftime-precious-{}", std::process::id()));
    std::fs::write(&precious, b"precious").unwrap();
    std::fs::set_permissions(&precious, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loader = Loader::start("hash_counter", &["--no-sync"]);
    let target = victim(2000);
    let pid = target.id();
    // What used to redirect root's write: a directory and a predictable config name in /tmp.
    let tmp = Path::new("/tmp/bpftime-rs");
    let _ = std::fs::remove_dir_all(tmp);
    let out = as_nobody(&format!(
        "mkdir -p /tmp/bpftime-rs && ln -s {} /tmp/bpftime-rs/agent-pid-{pid}.conf && \
         ln -s {} /tmp/bpftime-rs/agent-pid-{pid}.conf.status",
        precious.display(),
        precious.display()
    ));
    assert!(out.status.success(), "{out:?}");
    let out = output(&["attach", &pid.to_string(), "--object", "hash_counter"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    finish(target);
    assert_eq!(std::fs::read(&precious).unwrap(), b"precious");
    assert_eq!(
        &map_entries("hash_counter", "calls_by_arg"),
        &model::expected("hash_counter", 2000)["calls_by_arg"]
    );
    // Its config went to root's state directory, in a directory named unguessably.
    let agents: Vec<String> = std::fs::read_dir("/run/bpftime-rs/agents")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("pid-{pid}-")))
        .collect();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert!(agents[0].len() > format!("pid-{pid}-").len() + 8);
    loader.stop();
    let _ = std::fs::remove_dir_all(tmp);
    let _ = std::fs::remove_file(&precious);
}

/// `bpftime-rs start --object OBJECT -- victim ROUNDS` run by nobody (the tool copies).
fn nobody_starts_victim(object: &str, rounds: u32) -> std::process::Output {
    let tools = tools();
    let mut child = Command::new(&tools.bpftime)
        .args(["start", "--object", object, "--"])
        .arg(&tools.victim)
        .arg(rounds.to_string())
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn non_root_targets_get_one_objects_maps_when_granted() {
    if !require_kernel("non_root_targets_get_one_objects_maps_when_granted") {
        return;
    }
    let _one = serial();
    // Granted at load time: nobody's own `start` works and its calls are counted.
    let granted = Loader::start("hash_counter", &["--no-sync", "--grant", "nobody"]);
    assert!(
        granted
            .lines
            .iter()
            .any(|l| l.contains(&format!("shared read-write with uid {NOBODY}"))),
        "{:?}",
        granted.lines
    );
    let other = Loader::start("array_counters", &["--no-sync"]);
    // The grant is for one object's maps: not the other's, not the manifest.
    assert!(as_nobody(&format!(
        "cat {} > /dev/null",
        segment("hash_counter").display()
    ))
    .status
    .success());
    fails_as_nobody(
        "read an object it was not granted",
        &format!("cat {} > /dev/null", segment("array_counters").display()),
    );
    fails_as_nobody(
        "write the manifest of the granted object",
        &format!("printf x >> {}", manifest("hash_counter").display()),
    );
    let out = nobody_starts_victim("hash_counter", 2000);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ok hash_counter/"), "{stderr}");
    assert_eq!(
        &map_entries("hash_counter", "calls_by_arg"),
        &model::expected("hash_counter", 2000)["calls_by_arg"]
    );
    // Not granted: the agent says why and how to grant; the target runs on, unprobed.
    let out = nobody_starts_victim("array_counters", 100);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Permission denied") && stderr.contains("bpftime-rs load --grant"),
        "{stderr}"
    );
    // Root attaching to nobody's process grants that user explicitly, and says so.
    let mut target = Command::new(&tools().victim)
        .arg("2000")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_blocked_in_read(target.id());
    let out = output(&[
        "attach",
        &target.id().to_string(),
        "--object",
        "array_counters",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "granted uid {NOBODY} read-write access to the maps of array_counters"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("ok array_counters/"), "{stderr}");
    target.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(target.wait().unwrap().success());
    assert_eq!(
        &map_entries("array_counters", "sums"),
        &model::expected("array_counters", 2000)["sums"]
    );
    other.stop();
    granted.stop();
}

/// Whether a child exited by itself (not killed by a signal, no panic message).
fn assert_clean_exit(what: &str, out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.signal().is_none(),
        "{what} was killed by signal {:?}: {stderr}",
        out.status.signal()
    );
    assert!(!stderr.contains("panicked"), "{what} panicked: {stderr}");
}

#[test]
fn a_segment_corrupted_at_random_never_crashes_the_forwarder_the_cli_or_a_target() {
    if !require_kernel(
        "a_segment_corrupted_at_random_never_crashes_the_forwarder_the_cli_or_a_target",
    ) {
        return;
    }
    let _one = serial();
    let mut loader = Loader::start("all_maps", &[]);
    let path = segment("all_maps");
    let len = std::fs::metadata(&path).unwrap().len();
    let mut target: Child = bpftime()
        .args(["start", "--object", "all_maps", "--"])
        .arg(victim_path())
        .arg("200000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    target.stdin.take().unwrap().write_all(b"go\n").unwrap();
    // Where the structure is: each map's region (from the map table: 136-byte records at page
    // 1, region offset at byte 88), starting with its control block.
    let bytes = std::fs::read(&path).unwrap();
    let maps = u32::from_le_bytes(bytes[28..32].try_into().unwrap()) as usize;
    let regions: Vec<u64> = (0..maps)
        .map(|i| {
            let r = 4096 + i * 136 + 88;
            u64::from_le_bytes(bytes[r..r + 8].try_into().unwrap())
        })
        .collect();
    assert!(regions.len() >= 7 && regions.iter().all(|&r| r % 4096 == 0 && r < len));
    let pages = len / 4096;
    // What a target with the segment mapped could do to it: any bytes anywhere, at any time,
    // most of them where a reader follows them (control blocks, the start of each page, where
    // ring positions and record headers lie).
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0fc0_ffee);
    let started = Instant::now();
    let mut listings = 0;
    let mut noticed = 0;
    let mutations = 5000;
    for i in 0..mutations {
        let off = match rng.random_range(0..10) {
            0 => rng.random_range(0..4096),
            1 => rng.random_range(4096..8192),
            2..=4 => regions[rng.random_range(0..regions.len())] + rng.random_range(0..512),
            5 | 6 => rng.random_range(0..pages) * 4096 + rng.random_range(0..64),
            _ => rng.random_range(0..len - 8),
        };
        let n = rng.random_range(1..=8);
        let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, off).unwrap();
        if i % 500 == 0 {
            let out = output(&["maps", "--json"]);
            assert_clean_exit("maps --json", &out);
            assert!(
                out.status.success() || out.status.code() == Some(1),
                "{out:?}"
            );
            if String::from_utf8_lossy(&out.stderr).contains("skipping the maps of all_maps") {
                noticed += 1;
            }
            listings += 1;
        }
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(listings, mutations / 500);
    // The header and map table were hit too: `maps` noticed and said so (and went on).
    assert!(noticed > 0, "no listing noticed the corruption");
    let out = target.wait_with_output().unwrap();
    assert_clean_exit("the target", &out);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("done"),
        "the target finished its calls: {out:?}"
    );
    assert!(
        loader.child.try_wait().unwrap().is_none(),
        "the loader and its forwarder are still running after {:?} of corruption",
        started.elapsed()
    );
    // Each process reports the corruption it notices as a clear error, never a crash.
    let out = output(&["maps"]);
    assert_clean_exit("maps", &out);
    let out = output(&["maps", "--diff", "all_maps/sums"]);
    assert_clean_exit("maps --diff", &out);
    assert!(matches!(out.status.code(), Some(0..=2)), "{out:?}");
    let status = loader.stop();
    assert!(status.signal().is_none(), "load was killed: {status:?}");
}

/// `load --grant nobody -- APP` shares the application's maps as `load --grant nobody OBJ`
/// does: nobody's own target is hooked and its calls reach the root application's programs.
#[test]
fn an_apps_maps_are_granted_to_non_root_targets() {
    if !require_kernel("an_apps_maps_are_granted_to_non_root_targets") {
        return;
    }
    let _one = serial();
    let _ = output(&["unload", "uprobe_tool"]);
    const ROUNDS: u32 = 300;
    // examples/programs' victim calls vt_add(i % 7, i) once a round: an entry and a return
    // event each.
    let mut app = bpftime()
        .args([
            "load",
            "--no-sync",
            "--grant",
            "nobody",
            "--duration",
            "60",
            "--",
        ])
        .arg(bpftime_example_libbpf_apps::tool_path())
        .arg("-b")
        .arg(&tools().victim)
        .args(["-f", "vt_add", "-n", &(2 * ROUNDS).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bpftime-rs load -- uprobe_tool");
    // Killed if the test fails before the application exits (it would run on for a minute).
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill takes no pointer.
            unsafe { libc::kill(self.0 as i32, libc::SIGINT) };
        }
    }
    let kill = KillOnDrop(app.id());
    let mut stdout = std::io::BufReader::new(app.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert_eq!(first, "attached\n");
    let out = nobody_starts_victim("uprobe_tool", ROUNDS);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ok uprobe_tool/on_entry"), "{stderr}");
    let status = app.wait().unwrap();
    // Reaped: its pid is no longer ours to signal.
    std::mem::forget(kill);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let mut app_err = String::new();
    std::io::Read::read_to_string(&mut app.stderr.take().unwrap(), &mut app_err).unwrap();
    let _ = output(&["unload", "uprobe_tool"]);
    assert!(status.success(), "{status}: {app_err}");
    assert!(
        app_err.contains(&format!("shared read-write with uid {NOBODY}")),
        "{app_err}"
    );
    assert!(
        rest.ends_with(&format!("bss entries={ROUNDS} returns={ROUNDS}\n")),
        "{rest}"
    );
}
