//! `bpftime-rs load -- APP`: an unmodified libbpf application (`uprobe_tool`, a skeleton C tool
//! on the system's libbpf 1.1) runs with the syscall shim; its programs run in user space in a
//! victim started with `bpftime-rs start`. Each test runs the same binary on kernel uprobes in
//! the same test and compares the normalised outputs line for line.

/// The CLI tests' helpers (the target's agent status file, bounded waits).
#[path = "common/mod.rs"]
mod cli;
#[path = "../examples/libbpf-apps/tests/common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;

use bpftime_example_libbpf_apps::{victim_path, VICTIM_FUNCTION};
use bpftime_testutils::require_kernel;
use common::{
    event_pids, expected_events, expected_output, expected_victim_output, normalise,
    symbol_file_offset, tool_args as args, Bystander, Run, CALLS, MIN_ARG,
};

const BPFTIME: &str = env!("CARGO_BIN_EXE_bpftime-rs");

/// Removes what a bpftime-mode run left (the maps stay after the application exits): the
/// object named after the application.
struct Unload(&'static str);

impl Drop for Unload {
    fn drop(&mut self) {
        let _ = Command::new(BPFTIME).args(["unload", self.0]).output();
    }
}

/// The object `load -- TOOL` makes: named after the tool's file.
fn object_of(tool: &std::path::Path) -> &'static str {
    let name = tool
        .file_name()
        .expect("tool file name")
        .to_string_lossy()
        .into_owned();
    Box::leak(name.into_boxed_str())
}

fn checked(run: Run, mode: &str) -> Run {
    assert!(
        run.status.success(),
        "{mode}: uprobe_tool failed ({}); stdout:\n{}stderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert!(
        run.victim_status.success(),
        "{mode}: victim: {}",
        run.victim_status
    );
    assert!(
        run.victim_stdout.ends_with(&expected_victim_output(CALLS)),
        "{mode}: victim printed {:?}",
        run.victim_stdout
    );
    run
}

/// The same tool arguments on kernel uprobes, then under bpftime-rs (`load --no-sync --` for
/// the tool, `start --` for the victim); returns both runs.
fn both(extra: &[&str], load_options: &[&str]) -> (Run, Run) {
    both_with(
        &bpftime_example_libbpf_apps::tool_path(),
        extra,
        load_options,
    )
}

/// [`both`] with another tool binary (the Rust tools on aya and libbpf-rs).
fn both_with(tool: &std::path::Path, extra: &[&str], load_options: &[&str]) -> (Run, Run) {
    let victim_args = [CALLS.to_string()];
    let kernel = common::run_tool(tool, &[], &args(extra), &[], &victim_args)
        .unwrap_or_else(|e| panic!("{e}"));
    let kernel = checked(kernel, "kernel");
    let _unload = Unload(object_of(tool));
    let mut prefix = vec![BPFTIME, "load"];
    prefix.extend_from_slice(load_options);
    prefix.push("--");
    let user = common::run_tool(
        tool,
        &prefix,
        &args(extra),
        &[BPFTIME, "start", "--"],
        &victim_args,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (kernel, checked(user, "bpftime-rs"))
}

/// Every event came from one process (the victim), in both runs, and the outputs agree.
fn assert_same(kernel: &Run, user: &Run) {
    for (mode, run) in [("kernel", kernel), ("bpftime-rs", user)] {
        let pids = event_pids(&run.stdout);
        assert_eq!(
            pids.len() as u64,
            expected_events(CALLS, MIN_ARG),
            "{mode}:\n{}\nstderr:\n{}",
            run.stdout,
            run.stderr
        );
        assert!(
            pids.windows(2).all(|w| w[0] == w[1]),
            "{mode}: events from several processes:\n{}",
            run.stdout
        );
    }
    assert_eq!(
        normalise(&user.stdout),
        normalise(&kernel.stdout),
        "bpftime-rs and kernel outputs differ; bpftime-rs stderr:\n{}",
        user.stderr
    );
    // Stack lines (-S) and command totals (-U) are checked against the kernel only.
    let without_stacks: String = normalise(&kernel.stdout)
        .lines()
        .filter(|l| !l.starts_with("stack ") && !l.starts_with("commands "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(without_stacks, expected_output(CALLS, MIN_ARG));
}

#[test]
fn libbpf_tool_by_function_name_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_tool_by_function_name_matches_kernel_uprobes") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let (kernel, user) = both(&["-f", VICTIM_FUNCTION, "-n", &events], &["--no-sync"]);
    assert_same(&kernel, &user);
    // The shim said which object it made, and the agent hooked both links.
    assert!(
        user.stderr.contains("loaded object uprobe_tool"),
        "{}",
        user.stderr
    );
}

#[test]
fn libbpf_tool_by_file_offset_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_tool_by_file_offset_matches_kernel_uprobes") {
        return;
    }
    let offset =
        symbol_file_offset(&victim_path(), VICTIM_FUNCTION).unwrap_or_else(|e| panic!("{e}"));
    let offset = format!("{offset:#x}");
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let (kernel, user) = both(&["-o", &offset, "-n", &events], &["--no-sync"]);
    assert_same(&kernel, &user);
}

#[test]
fn libbpf_tool_pid_filter_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_tool_pid_filter_matches_kernel_uprobes") {
        return;
    }
    let bystander = Bystander::start();
    let pid = bystander.pid();
    let (kernel, user) = both(
        &["-f", VICTIM_FUNCTION, "-p", &pid, "-n", "0", "-d", "1"],
        &["--no-sync"],
    );
    for (mode, run) in [("kernel", &kernel), ("bpftime-rs", &user)] {
        assert!(
            run.tool_outlived_victim,
            "{mode}: the tool exited before the victim finished"
        );
    }
    assert_eq!(normalise(&user.stdout), normalise(&kernel.stdout));
    assert_eq!(normalise(&user.stdout), expected_output(0, MIN_ARG));
}

/// Reads `child`'s stream line by line on a thread; lines arrive on the returned channel.
fn lines_of(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line containing `needle`; returns the lines seen.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str, what: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + common::ATTACH_TIMEOUT;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("{what}: no line with {needle:?}; saw:\n{}", seen.join("\n"));
}

/// Kills and reaps a child when the test ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A background command with its stdout and stderr read line by line (killed and reaped when
/// dropped).
struct Background {
    child: Reap,
    out: Receiver<String>,
    err: Receiver<String>,
}

impl Background {
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = Reap(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        );
        let out = lines_of(child.0.stdout.take().expect("stdout"));
        let err = lines_of(child.0.stderr.take().expect("stderr"));
        Self { child, out, err }
    }

    /// `bpftime-rs load --no-sync -- uprobe_tool ARGS`.
    fn app(extra: &[&str]) -> Self {
        Self::spawn(
            Command::new(BPFTIME)
                .args(["load", "--no-sync", "--"])
                .arg(bpftime_example_libbpf_apps::tool_path())
                .args(args(extra)),
        )
    }

    /// `bpftime-rs start -- victim CALLS`: waits on its stdin until [`Background::go`].
    fn target() -> Self {
        Self::spawn(
            Command::new(BPFTIME)
                .args(["start", "--"])
                .arg(victim_path())
                .arg(CALLS.to_string()),
        )
    }

    /// Starts a target's calls and waits for it to finish them.
    fn go(&mut self) {
        use std::io::Write;
        writeln!(self.child.0.stdin.take().expect("stdin"), "go").expect("starting the victim");
        let seen = wait_line(&self.out, "done", "the victim");
        assert_eq!(
            seen.last().map(|l| format!("{l}\n")),
            Some(expected_victim_output(CALLS))
        );
        assert!(self.child.0.wait().expect("start").success());
    }

    /// The status file of this target's agent (`start` names its directory after its pid),
    /// once the agent wrote it.
    fn agent_status(&self) -> std::path::PathBuf {
        cli::agent_status_file(self.child.0.id())
    }
}

/// Waits until the agent's status file says `what` `count` times.
fn wait_status(file: &std::path::Path, what: &str, count: usize) {
    cli::wait_for(&format!("{count} x {what:?} in {}", file.display()), || {
        std::fs::read_to_string(file).is_ok_and(|t| t.matches(what).count() >= count)
    });
}

/// Held by every test of this file for its whole run: they share the object `uprobe_tool`,
/// and one test's cleanup (`unload`) must not remove it while another still reads its maps
/// (`common::SERIAL` serialises the tool runs only).
fn object_lock() -> std::sync::MutexGuard<'static, ()> {
    static OBJECT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    OBJECT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The serial lock of the tests that run tools and victims: a tool with `-p -1` sees every
/// victim, and one test's cleanup would unload another's object.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    common::SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn killed_app_detaches_its_links_and_targets_keep_running() {
    let _object = object_lock();
    if !require_kernel("killed_app_detaches_its_links_and_targets_keep_running") {
        return;
    }
    let _serial = serial();
    let _unload = Unload("uprobe_tool");
    let mut load = Background::app(&["-f", VICTIM_FUNCTION, "-n", "0", "-d", "60"]);
    wait_line(&load.out, "attached", "the tool");
    // A target hooked while the application runs; it waits on stdin before calling.
    let mut target = Background::target();
    wait_line(
        &target.err,
        "ok uprobe_tool/on_return",
        "the target's agent",
    );

    // The application (the load command's child) dies without closing anything.
    let pid = load.child.0.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("children of bpftime-rs load");
    let app: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the application's pid");
    // SAFETY: kill takes no pointer.
    assert_eq!(unsafe { libc::kill(app, libc::SIGKILL) }, 0);
    let status = load.child.0.wait().expect("waiting for load");
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "load: {status}");

    // The target's agent follows the object's manifest: both hooks go.
    wait_status(&target.agent_status(), "removed uprobe_tool", 2);
    // The target runs on, unprobed: its calls reach no program.
    target.go();
    let maps = Command::new(BPFTIME)
        .args(["maps", "--json"])
        .output()
        .expect("bpftime-rs maps");
    let json: serde_json::Value = serde_json::from_slice(&maps.stdout).expect("maps JSON");
    let bss = json["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["object"] == "uprobe_tool" && m["name"] == "uprobe_t.bss")
        .unwrap_or_else(|| panic!("`bpftime-rs maps` shows no uprobe_tool/uprobe_t.bss"));
    let value = bss["entries"][0]["value"].as_array().expect("value bytes");
    assert!(
        value.iter().all(|b| b == "0x00"),
        "calls after the application died reached its programs: {bss}"
    );
    // `unload` removes what the dead application left: segment, manifest.
    let unload = Command::new(BPFTIME)
        .args(["unload", "uprobe_tool"])
        .output()
        .expect("unload");
    assert!(
        unload.status.success(),
        "{}",
        String::from_utf8_lossy(&unload.stderr)
    );
    assert!(!std::path::Path::new("/dev/shm/bpftime-rs.uprobe_tool.shm").exists());
    assert!(!std::path::Path::new("/run/bpftime-rs/objects/uprobe_tool").exists());
}

#[test]
fn statically_linked_app_is_refused_with_the_reason() {
    let _object = object_lock();
    let dir = std::env::temp_dir().join(format!("bpftime-static-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = dir.join("static_app.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").expect("writing the source");
    let bin = dir.join("static_app");
    let cc = Command::new("cc")
        .args(["-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("running cc");
    assert!(
        cc.success(),
        "cc -static failed (libc6-dev provides libc.a)"
    );
    let out = Command::new(BPFTIME)
        .args(["load", "--no-sync", "--"])
        .arg(&bin)
        .output()
        .expect("bpftime-rs load");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a static loader ran: {stderr}");
    assert!(
        stderr.contains("statically linked") && stderr.contains("static_app"),
        "{stderr}"
    );
}

#[test]
fn target_started_before_the_app_is_hooked_when_the_app_attaches() {
    let _object = object_lock();
    if !require_kernel("target_started_before_the_app_is_hooked_when_the_app_attaches") {
        return;
    }
    let _serial = serial();
    let _unload = Unload("uprobe_tool");
    // The target first: no object is loaded yet (or only others); it waits on stdin.
    let mut target = Background::target();
    let status_file = target.agent_status();
    // Then the application, which attaches while the target runs.
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let mut load = Background::app(&["-f", VICTIM_FUNCTION, "-n", &events]);
    let mut stdout = wait_line(&load.out, "attached", "the tool");
    // The target's agent discovers the object and installs both links.
    wait_status(&status_file, "ok uprobe_tool/on_entry", 1);
    wait_status(&status_file, "ok uprobe_tool/on_return", 1);
    target.go();
    let status = load.child.0.wait().expect("load");
    stdout.extend(load.out.iter());
    let stdout: String = stdout.iter().map(|l| format!("{l}\n")).collect();
    let stderr: Vec<String> = load.err.try_iter().collect();
    assert!(status.success(), "load: {status}\n{}", stderr.join("\n"));
    assert_eq!(normalise(&stdout), expected_output(CALLS, MIN_ARG));
}

/// The lines of `stdout`, normalised and sorted: records from different CPUs' perf buffers
/// arrive in the order the buffers are polled, if the victim moved between CPUs.
fn sorted_lines(stdout: &str) -> Vec<String> {
    let mut lines: Vec<String> = normalise(stdout).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[test]
fn libbpf_tool_perf_buffer_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_tool_perf_buffer_matches_kernel_uprobes") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let (kernel, user) = both(
        &["-P", "-f", VICTIM_FUNCTION, "-n", &events],
        &["--no-sync"],
    );
    assert_eq!(
        sorted_lines(&user.stdout),
        sorted_lines(&kernel.stdout),
        "bpftime-rs stderr:\n{}",
        user.stderr
    );
    assert_eq!(
        sorted_lines(&kernel.stdout),
        sorted_lines(&expected_output(CALLS, MIN_ARG))
    );
    assert!(
        !user.stderr.contains("lost"),
        "perf records were lost: {}",
        user.stderr
    );
}

#[test]
fn libbpf_tool_batch_lookup_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_tool_batch_lookup_matches_kernel_uprobes") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let (kernel, user) = both(
        &["-B", "-f", VICTIM_FUNCTION, "-n", &events],
        &["--no-sync"],
    );
    assert_same(&kernel, &user);
}

#[test]
fn aya_tool_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("aya_tool_matches_kernel_uprobes") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let tool = bpftime_example_libbpf_apps::aya_tool_path();
    let (kernel, user) = both_with(
        &tool,
        &["-f", VICTIM_FUNCTION, "-n", &events],
        &["--no-sync"],
    );
    assert_same(&kernel, &user);
    // aya attaches by file offset too (it resolves the symbol itself otherwise).
    let offset =
        symbol_file_offset(&victim_path(), VICTIM_FUNCTION).unwrap_or_else(|e| panic!("{e}"));
    let offset = format!("{offset:#x}");
    let (kernel, user) = both_with(&tool, &["-o", &offset, "-n", &events], &["--no-sync"]);
    assert_same(&kernel, &user);
}

#[test]
fn libbpf_rs_tool_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_rs_tool_matches_kernel_uprobes") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let tool = bpftime_example_libbpf_apps::libbpf_rs_tool_path();
    let (kernel, user) = both_with(
        &tool,
        &["-f", VICTIM_FUNCTION, "-n", &events],
        &["--no-sync"],
    );
    assert_same(&kernel, &user);
}

#[test]
fn libbpf_rs_tool_on_uprobe_multi_links_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_rs_tool_on_uprobe_multi_links_matches_kernel_uprobes") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let tool = bpftime_example_libbpf_apps::libbpf_rs_tool_path();
    let (kernel, user) = both_with(
        &tool,
        &["-M", "-f", VICTIM_FUNCTION, "-n", &events],
        &["--no-sync"],
    );
    assert_same(&kernel, &user);
}

#[test]
fn bad_calls_fail_as_on_the_kernel_without_crashing() {
    let _object = object_lock();
    if !require_kernel("bad_calls_fail_as_on_the_kernel_without_crashing") {
        return;
    }
    let _serial = common::SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let tool = bpftime_example_libbpf_apps::bad_calls_path();
    let _unload = Unload(object_of(&tool));
    let offset =
        symbol_file_offset(&victim_path(), VICTIM_FUNCTION).unwrap_or_else(|e| panic!("{e}"));
    let args = [victim_path().display().to_string(), format!("{offset:#x}")];
    let kernel = Command::new(&tool).args(&args).output().expect("bad_calls");
    let user = Command::new(BPFTIME)
        .args(["load", "--no-sync", "--"])
        .arg(&tool)
        .args(&args)
        .output()
        .expect("bpftime-rs load -- bad_calls");
    let stderr = String::from_utf8_lossy(&user.stderr);
    for (mode, out) in [("kernel", &kernel), ("bpftime-rs", &user)] {
        assert!(
            out.status.success(),
            "{mode}: bad_calls failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lines = |out: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("shim-differs:"))
            .map(str::to_string)
            .collect()
    };
    let (kernel_lines, user_lines) = (lines(&kernel), lines(&user));
    assert!(kernel_lines.len() > 20 && kernel_lines.last().map(String::as_str) == Some("done"));
    assert_eq!(user_lines, kernel_lines, "bpftime-rs stderr:\n{stderr}");
    // The link's info is the kernel's, field for field (ids aside).
    assert!(
        user_lines
            .iter()
            .any(|l| l.starts_with("link_info type=7 prog_id_set=1 perf_type=1")),
        "{user_lines:?}"
    );
    assert!(stderr.contains("ioctl 0x247f"), "{stderr}");
    // BPF_F_LOCK on a map whose BTF value has a spin lock: served from user space (the map is
    // the object's) exactly as the kernel: in place, the lock reading 0, EINVAL without a lock.
    for line in [
        "pair_update_f_lock ok",
        "pair_update_f_lock_noexist errno 17 EEXIST",
        "pair a=9 lock=0 b=10",
        "pair_lookup_bad_flags errno 22 EINVAL",
        "hash_update_f_lock errno 22 EINVAL",
        "hash_lookup_f_lock errno 22 EINVAL",
    ] {
        assert!(
            user_lines.iter().any(|l| l == line),
            "{line}: {user_lines:?}"
        );
    }
    // Tracepoints work on the kernel and are refused, with the reason, under the shim.
    assert!(
        String::from_utf8_lossy(&kernel.stdout).contains("shim-differs: tracepoint_open ok"),
        "{}",
        String::from_utf8_lossy(&kernel.stdout)
    );
    assert!(
        String::from_utf8_lossy(&user.stdout)
            .contains("shim-differs: tracepoint_open errno 95 EOPNOTSUPP"),
        "{}",
        String::from_utf8_lossy(&user.stdout)
    );
    assert!(stderr.contains("PERF_TYPE_TRACEPOINT"), "{stderr}");
}

#[test]
fn app_maps_are_synced_to_kernel_mirrors_bpftool_reads() {
    let _object = object_lock();
    if !require_kernel("app_maps_are_synced_to_kernel_mirrors_bpftool_reads") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let _unload = Unload("uprobe_tool");
    let _ = std::fs::remove_file(APP_PIN);
    // Synced (the default): `load -- APP` syncs the object's maps as `load OBJ` does; the
    // mirrors stay pinned after the application exits, until `unload`.
    let run = common::run_tool(
        &bpftime_example_libbpf_apps::tool_path(),
        &[BPFTIME, "load", "--"],
        &args(&["-f", VICTIM_FUNCTION, "-n", &events, "-K", APP_PIN]),
        &[BPFTIME, "start", "--"],
        &[CALLS.to_string()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let run = checked(run, "bpftime-rs");
    // The application's own pin of hist (BPF_OBJ_PIN) is the kernel mirror, not the stale
    // kernel map: the same map as the loader's pin.
    let map_id = |pin: &str| -> serde_json::Value {
        let show = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned", pin])
            .output()
            .expect("bpftool");
        let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("bpftool JSON");
        json["id"].clone()
    };
    let app_pin = map_id(APP_PIN);
    let _ = std::fs::remove_file(APP_PIN);
    assert!(app_pin.is_u64(), "the application pinned hist");
    assert_eq!(
        app_pin,
        map_id("/sys/fs/bpf/bpftime-rs/uprobe_tool/hist"),
        "the application's pin is the mirror"
    );
    assert_eq!(normalise(&run.stdout), expected_output(CALLS, MIN_ARG));
    assert!(
        run.stderr
            .contains("map hist synced to /sys/fs/bpf/bpftime-rs/uprobe_tool/hist"),
        "{}",
        run.stderr
    );
    let mirrored = mirrored_hist();
    let mut printed: Vec<String> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("hist "))
        .map(str::to_string)
        .collect();
    printed.sort();
    assert!(!printed.is_empty(), "{}", run.stdout);
    assert_eq!(
        mirrored, printed,
        "the kernel mirror of hist differs from what the tool printed"
    );
    // `maps --json` formats entries with the application's BTF, as bpftool does.
    let maps = Command::new(BPFTIME)
        .args(["maps", "--json"])
        .output()
        .expect("maps --json");
    let json: serde_json::Value = serde_json::from_slice(&maps.stdout).expect("maps JSON");
    let formatted = |name: &str| -> serde_json::Value {
        json["maps"]
            .as_array()
            .expect("maps")
            .iter()
            .find(|m| m["object"] == "uprobe_tool" && m["name"] == name)
            .unwrap_or_else(|| panic!("no uprobe_tool/{name}"))["entries"][0]["formatted"]
            .clone()
    };
    let events = expected_events(CALLS, MIN_ARG);
    assert_eq!(
        formatted("uprobe_t.bss"),
        serde_json::json!({"key": 0, "value": {"entries": events - CALLS, "returns": CALLS}})
    );
    assert_eq!(
        formatted("uprobe_t.rodata")["value"]["min_arg"],
        serde_json::json!(MIN_ARG)
    );
    assert!(formatted("hist")["key"].is_u64(), "{}", formatted("hist"));
    let diff = Command::new(BPFTIME)
        .args(["maps", "--diff", "uprobe_tool/hist"])
        .output()
        .expect("maps --diff");
    assert!(
        diff.status.success(),
        "{}{}",
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
}

/// The kernel mirror of uprobe_tool's hist as bpftool dumps it, as sorted `hist KEY COUNT`
/// lines (the tool's own format).
fn mirrored_hist() -> Vec<String> {
    let dump = Command::new("bpftool")
        .args([
            "-j",
            "map",
            "dump",
            "pinned",
            "/sys/fs/bpf/bpftime-rs/uprobe_tool/hist",
        ])
        .output()
        .expect("bpftool");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("bpftool JSON");
    let number = |v: &serde_json::Value| -> u64 {
        v.as_array().expect("bytes").iter().rev().fold(0, |acc, b| {
            acc * 256
                + u64::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
        })
    };
    let mut mirrored: Vec<String> = json
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| format!("hist {} {}", number(&e["key"]), number(&e["value"])))
        .collect();
    mirrored.sort();
    mirrored
}

/// Where `app_maps_are_synced_to_kernel_mirrors_bpftool_reads` has the tool pin its hist.
const APP_PIN: &str = "/sys/fs/bpf/bpftime-test-app-hist";

#[test]
fn ctrl_c_reaches_the_app_which_prints_its_results() {
    let _object = object_lock();
    if !require_kernel("ctrl_c_reaches_the_app_which_prints_its_results") {
        return;
    }
    let _serial = serial();
    let _unload = Unload("uprobe_tool");
    let mut load = Background::app(&["-f", VICTIM_FUNCTION, "-n", "0", "-d", "60"]);
    wait_line(&load.out, "attached", "the tool");
    let pid = load.child.0.id() as i32;
    // SAFETY: kill takes no pointer; the pid is our live child.
    let killed = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(killed, 0);
    let status = load.child.0.wait().expect("load");
    let rest: Vec<String> = load.out.iter().collect();
    let stderr: Vec<String> = load.err.iter().collect();
    assert!(status.success(), "load: {status}\n{}", stderr.join("\n"));
    assert!(
        stderr.iter().any(|l| l.contains("stopped by signal 2")),
        "the application did not get SIGINT: {stderr:?}"
    );
    assert_eq!(
        rest.last().map(String::as_str),
        Some("bss entries=0 returns=0")
    );
}

#[test]
fn duration_stops_the_app_as_ctrl_c_does() {
    let _object = object_lock();
    if !require_kernel("duration_stops_the_app_as_ctrl_c_does") {
        return;
    }
    let _serial = serial();
    let _unload = Unload("uprobe_tool");
    let out = Command::new(BPFTIME)
        .args(["load", "--no-sync", "--duration", "1", "--"])
        .arg(bpftime_example_libbpf_apps::tool_path())
        .args(args(&["-f", VICTIM_FUNCTION, "-n", "0", "-d", "60"]))
        .output()
        .expect("bpftime-rs load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    assert!(stderr.contains("stopped by signal 2"), "{stderr}");
    assert!(stdout.ends_with("bss entries=0 returns=0\n"), "{stdout}");
}

/// `-S`: entries counted per user stack (bpf_get_stackid into a STACK_TRACE map), the stacks
/// read back by the application with GET_NEXT_KEY and LOOKUP on the two maps, as memleak-style
/// tools do: the same depths and counts as on kernel uprobes.
#[test]
fn libbpf_tool_stack_traces_match_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_tool_stack_traces_match_kernel_uprobes") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let (kernel, user) = both(
        &["-S", "-f", VICTIM_FUNCTION, "-n", &events],
        &["--no-sync"],
    );
    assert!(
        kernel.stdout.contains("stack depth="),
        "the kernel run printed stacks: {}",
        kernel.stdout
    );
    assert_same(&kernel, &user);
}

/// A cgroup2 directory made for a test, removed when dropped (its processes have exited).
struct TestCgroup(std::path::PathBuf);

impl TestCgroup {
    fn new(name: &str) -> Self {
        let root = bpftime_runtime::helpers::cgroup::cgroup2_mount()
            .expect("a cgroup2 hierarchy (scripts/setup.sh mounts one if missing)");
        let dir = root.join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `-c CGROUP`: a live CGROUP_ARRAY filter (`bpf_current_task_under_cgroup`), as libbpf-tools'
/// `-c` options set it: with the victim inside the cgroup every call is reported, with the
/// victim in another cgroup none is; both as on kernel uprobes.
#[test]
fn libbpf_tool_cgroup_filter_matches_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_tool_cgroup_filter_matches_kernel_uprobes") {
        return;
    }
    let inside = TestCgroup::new("bpftime-test-cg-in");
    let outside = TestCgroup::new("bpftime-test-cg-out");
    let victim_env = format!("VICTIM_CGROUP={}", inside.0.display());
    let victim_args = [CALLS.to_string()];
    let run = |filter: &TestCgroup, extra: &[&str]| -> (Run, Run) {
        let mut tool_args = vec!["-c", filter.0.to_str().unwrap(), "-f", VICTIM_FUNCTION];
        tool_args.extend_from_slice(extra);
        let kernel = common::run_tool(
            &bpftime_example_libbpf_apps::tool_path(),
            &[],
            &args(&tool_args),
            &["env", &victim_env],
            &victim_args,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let _unload = Unload("uprobe_tool");
        let user = common::run_tool(
            &bpftime_example_libbpf_apps::tool_path(),
            &[BPFTIME, "load", "--no-sync", "--"],
            &args(&tool_args),
            &["env", &victim_env, BPFTIME, "start", "--"],
            &victim_args,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (kernel, user)
    };
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let (kernel, user) = run(&inside, &["-n", &events]);
    assert_same(&kernel, &user);
    let (kernel, user) = run(&outside, &["-d", "2"]);
    assert!(
        kernel.stdout.contains("bss entries=0 returns=0"),
        "kernel: the filter keeps every call out: {}",
        kernel.stdout
    );
    assert_eq!(
        normalise(&user.stdout),
        normalise(&kernel.stdout),
        "bpftime-rs stderr: {}",
        user.stderr
    );
}

/// `-U N`: the application sends commands through a USER_RINGBUF with libbpf's
/// `user_ring_buffer__reserve/submit` (the shim maps the shared ring for it, the producer
/// side writable, the consumer page read-only) and each entry's program drains one with
/// `bpf_user_ringbuf_drain`: the same total as on kernel uprobes.
#[test]
fn libbpf_tool_user_ring_buffer_commands_match_kernel_uprobes() {
    let _object = object_lock();
    if !require_kernel("libbpf_tool_user_ring_buffer_commands_match_kernel_uprobes") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let (kernel, user) = both(
        &["-U", "10", "-f", VICTIM_FUNCTION, "-n", &events],
        &["--no-sync"],
    );
    // One command per reported entry: 1 + 2 + ... + entries.
    let entries = CALLS - MIN_ARG;
    let applied: u64 = (1..=entries.min(10)).sum();
    assert!(
        kernel
            .stdout
            .contains(&format!("commands sent=10 applied={applied}")),
        "kernel: {}",
        kernel.stdout
    );
    assert_same(&kernel, &user);
}

/// At scale in app mode: the tool resizes its histogram to 10,000 buckets before load (as
/// tools size maps from options), 20,000 calls fill every bucket, the tool walks them with
/// GET_NEXT_KEY, and the kernel mirror the forwarder keeps (bpftool) holds exactly what the
/// tool printed; both equal the kernel run's and the victim's own arithmetic.
#[test]
fn many_distinct_keys_reach_the_app_and_the_kernel_mirror_exactly() {
    let _object = object_lock();
    if !require_kernel("many_distinct_keys_reach_the_app_and_the_kernel_mirror_exactly") {
        return;
    }
    const BUCKETS: u64 = 10_000;
    const MANY_CALLS: u64 = 20_000;
    let tool = bpftime_example_libbpf_apps::tool_path();
    let tool_args: Vec<String> = [
        "-b",
        &victim_path().display().to_string(),
        "-m",
        &MIN_ARG.to_string(),
        "-f",
        VICTIM_FUNCTION,
        "-q",
        "-H",
        &BUCKETS.to_string(),
        "-d",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let victim_args = [MANY_CALLS.to_string()];
    let hist_lines = |stdout: &str| -> Vec<String> {
        let mut v: Vec<String> = stdout
            .lines()
            .filter(|l| l.starts_with("hist "))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    let mut expected: Vec<String> = (0..BUCKETS)
        .map(|k| {
            let n = (MIN_ARG..MANY_CALLS).filter(|v| v % BUCKETS == k).count();
            format!("hist {k} {n}")
        })
        .collect();
    expected.sort();
    let kernel = common::run_tool(&tool, &[], &tool_args, &[], &victim_args)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hist_lines(&kernel.stdout), expected, "kernel run");
    let _unload = Unload("uprobe_tool");
    let user = common::run_tool(
        &tool,
        &[BPFTIME, "load", "--"],
        &tool_args,
        &[BPFTIME, "start", "--"],
        &victim_args,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        hist_lines(&user.stdout),
        expected,
        "bpftime-rs run; stderr: {}",
        user.stderr
    );
    let mirrored = mirrored_hist();
    assert_eq!(mirrored, expected, "the kernel mirror of hist");
}

/// A libbpf application attaching USDT probes itself (`usdt_tool`, the system's libbpf 1.1 and
/// an object built against its headers): libbpf writes the argument specs into the object's
/// spec map and passes each semaphore as the uprobe's reference counter (`ref_ctr_offset`);
/// under bpftime-rs the agent counts the semaphores up in the target, so the probe behind one
/// fires (the victim reports it), and every total equals the kernel run's. libbpf 1.1 refuses
/// the Scale-Index-Base site in both runs.
#[test]
fn libbpf_usdt_tool_matches_kernel_usdt_semaphores_included() {
    let _object = object_lock();
    if !require_kernel("libbpf_usdt_tool_matches_kernel_usdt_semaphores_included") {
        return;
    }
    let _serial = serial();
    let object = bpftime_example_programs::object_path("usdt_counts");
    let run = |tool_prefix: &[&str], victim_prefix: &[&str]| -> (Vec<String>, String) {
        let object = object.display().to_string();
        let mut tool = common::command(
            tool_prefix,
            &bpftime_example_libbpf_apps::usdt_tool_path(),
            &[object, "-d".into(), "60".into()],
        );
        let mut app = Background::spawn(&mut tool);
        let mut lines = wait_line(&app.out, "attached", "usdt_tool");
        let mut victim = common::command(
            victim_prefix,
            &bpftime_example_programs::victim_usdt_path(),
            &["300".into()],
        );
        let mut victim = Background::spawn(&mut victim);
        {
            use std::io::Write;
            writeln!(victim.child.0.stdin.take().expect("stdin"), "go").unwrap();
        }
        let victim_out = wait_line(&victim.out, "done", "victim_usdt").join("\n");
        assert!(victim.child.0.wait().unwrap().success());
        // SAFETY: kill takes no pointer; the pid is our live child.
        let interrupted = unsafe { libc::kill(app.child.0.id() as i32, libc::SIGINT) };
        assert_eq!(interrupted, 0);
        assert!(app.child.0.wait().unwrap().success());
        lines.extend(app.out.iter());
        lines.retain(|l| {
            l.starts_with("totals ")
                || l.starts_with("sem_args ")
                || l.starts_with("attach-failed ")
        });
        (lines, victim_out)
    };
    let (kernel, kernel_victim) = run(&[], &[]);
    assert!(kernel_victim.ends_with("done 300 300"), "{kernel_victim}");
    assert!(kernel.contains(&"totals 8 300".to_string()), "{kernel:?}");
    assert!(
        kernel.contains(&"attach-failed on_sib".to_string()),
        "{kernel:?}"
    );
    let _unload = Unload("usdt_tool");
    let (user, user_victim) = run(
        &[BPFTIME, "load", "--no-sync", "--"],
        &[BPFTIME, "start", "--"],
    );
    assert!(
        user_victim.ends_with("done 300 300"),
        "the agent raised vt:sem's semaphore from the link's reference counter: {user_victim}"
    );
    assert_eq!(user, kernel, "bpftime-rs and kernel USDT totals");
}
