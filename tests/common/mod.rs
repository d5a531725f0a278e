//! Shared by the CLI test binaries (each uses a part of it).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bpftime_example_programs::{object_path, victim_path};
use serde_json::Value;

/// bpftool and `bpftime-rs maps --json` write bytes as `"0x.."` strings.
pub fn bytes(value: &Value) -> Vec<u8> {
    value
        .as_array()
        .expect("byte array")
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect()
}

pub fn bpftime() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bpftime-rs"))
}

pub fn output(args: &[&str]) -> std::process::Output {
    bpftime().args(args).output().expect("running bpftime-rs")
}

/// `bpftime-rs load` in the background, returned once it printed that it is ready.
pub struct Loader {
    pub child: Child,
    pub object: String,
    pub lines: Vec<String>,
    /// What it prints after it is ready (trace lines, events).
    pub later: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// This test's hold on the object's name (see [`ObjectLease`]); dropped after the loader.
    _lease: Option<ObjectLease>,
}

/// One test at a time per object name within a test binary: `Loader::start` unloads what an
/// earlier run left, which would pull the object from under another test loading it at the
/// same time (tests run on two threads).
pub struct ObjectLease(String);

static LEASED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static RETURNED: std::sync::Condvar = std::sync::Condvar::new();

impl ObjectLease {
    /// Waits until no other test of this binary holds `object`.
    pub fn take(object: &str) -> Self {
        let mut leased = LEASED.lock().unwrap_or_else(|e| e.into_inner());
        while leased.iter().any(|o| o == object) {
            leased = RETURNED.wait(leased).unwrap_or_else(|e| e.into_inner());
        }
        leased.push(object.to_string());
        ObjectLease(object.to_string())
    }
}

impl Drop for ObjectLease {
    fn drop(&mut self) {
        let mut leased = LEASED.lock().unwrap_or_else(|e| e.into_inner());
        leased.retain(|o| *o != self.0);
        RETURNED.notify_all();
    }
}

impl Loader {
    /// Unloads what an earlier run left of `example`, then loads it (once no other test of
    /// this binary holds the name).
    pub fn start(example: &str, extra: &[&str]) -> Loader {
        let lease = ObjectLease::take(example);
        let _ = output(&["unload", example]);
        let mut loader = Self::restart(example, extra);
        loader._lease = Some(lease);
        loader
    }

    /// Loads `example` over what a dead loader left (its segment, manifest and mirrors), as a
    /// restarted `load` does after a crash (the caller's earlier loader holds the lease).
    pub fn restart(example: &str, extra: &[&str]) -> Loader {
        let path = object_path(example);
        let mut child = bpftime()
            .arg("load")
            .arg(&path)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bpftime-rs load");
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                panic!("load exited early: {lines:?}");
            }
            lines.push(line.trim_end().to_string());
            if line.starts_with("loaded ") {
                break;
            }
        }
        // Keep draining its output so it never blocks on a full pipe.
        let later = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&later);
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Loader {
            child,
            object: example.to_string(),
            lines,
            later,
            _lease: None,
        }
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        let out = output(&["unload", &self.object]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        status
    }
}

impl Loader {
    /// SIGKILL, as a crash would: nothing is cleaned up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Loader {
    /// A failing test must not leave its loader running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = output(&["unload", &self.object]);
        }
    }
}

pub fn victim(rounds: u32) -> Child {
    Command::new(victim_path())
        .arg(rounds.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn finish(mut child: Child) -> String {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the victim exits normally");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bpftime-rs start [--object OBJECT] -- victim ROUNDS` (no `--object`: every loaded object,
/// and those loaded later), waiting on its stdin for its go line ([`finish`]).
pub fn spawn_target(object: Option<&str>, rounds: u32) -> Child {
    let mut start = bpftime();
    start.arg("start");
    if let Some(object) = object {
        start.args(["--object", object]);
    }
    start
        .arg("--")
        .arg(victim_path())
        .arg(rounds.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bpftime-rs start")
}

/// `bpftime-rs start --object OBJECT -- victim ROUNDS`, run to completion.
pub fn start_victim(object: &str, rounds: u32) -> std::process::Output {
    let mut child = spawn_target(Some(object), rounds);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    child.wait_with_output().unwrap()
}

/// The status file of the agent in the target `bpftime-rs start` (pid `start_pid`) runs,
/// once the agent wrote it (`start` names the agent's directory after its pid).
pub fn agent_status_file(start_pid: u32) -> std::path::PathBuf {
    let tag = format!("start-{start_pid}-");
    let find = || {
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
            .filter(|status| status.exists())
    };
    wait_for("the target's agent", || find().is_some());
    find().expect("just found")
}

/// `maps --json` entries of `object/map`, sorted.
pub fn map_entries(object: &str, map: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let out = output(&["maps", "--json"]);
    assert!(out.status.success());
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = json["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["object"] == object && m["name"] == map)
        .unwrap_or_else(|| panic!("{object}/{map} not listed"))
        .clone();
    let mut entries: Vec<_> = row["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect();
    entries.sort();
    entries
}

pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `pid` is blocked in read(2) (syscall 0 in /proc/PID/syscall), e.g. a victim
/// waiting for its go line, instead of sleeping and hoping it got there.
pub fn wait_blocked_in_read(pid: u32) {
    wait_for("the target blocked in read(2)", || {
        std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .is_ok_and(|s| s.split_whitespace().next() == Some("0"))
    });
}
