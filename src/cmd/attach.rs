//! `bpftime-rs start -- CMD`, `attach PID`, `detach [PID]`: getting the agent
//! (`libbpftime_agent.so`) into target processes, where it hooks the uprobe programs that
//! `bpftime-rs load` published.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bpftime_attach::inject::{detach_agent, inject_agent, InjectOptions};
use bpftime_runtime::maps::{euid, ShmObject};
use bpftime_runtime::state::{self, fs::random_u64, StateDir};

use super::objects::{trusted_objects, warn_skipped};

const AGENT_FILE: &str = "libbpftime_agent.so";

#[derive(clap::Args)]
pub struct StartArgs {
    /// Attach only the programs of these loaded objects (default: every loaded object).
    #[arg(long = "object", value_name = "OBJECT")]
    objects: Vec<String>,
    /// The command to run with the agent preloaded.
    #[arg(trailing_var_arg = true, required = true, value_name = "CMD [ARGS..]")]
    command: Vec<String>,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    /// The running process to attach to.
    pid: i32,
    /// Attach only the programs of these loaded objects (default: every loaded object).
    #[arg(long = "object", value_name = "OBJECT")]
    objects: Vec<String>,
}

#[derive(clap::Args)]
pub struct DetachArgs {
    /// The process to detach from (default: every process with the agent loaded).
    pid: Option<i32>,
}

/// The agent library: `BPFTIME_AGENT`, or next to this executable (cargo builds both into the
/// same target directory).
fn agent_path() -> Result<PathBuf> {
    library_path(AGENT_FILE, "BPFTIME_AGENT", "bpftime-agent")
}

/// A library of ours (`file`, built by cargo package `package`): the path in the environment
/// variable `env`, or next to this executable.
pub(super) fn library_path(file: &str, env: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating bpftime-rs")?;
    let dir = exe.parent().context("bpftime-rs has no directory")?;
    // `cargo build` puts it beside the binary; as a test dependency it stays in `deps/`. Take
    // the newer, so a stale copy from an older build is never preloaded.
    let newest = [dir.join(file), dir.join("deps").join(file)]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max_by_key(|(modified, _)| *modified);
    if let Some((_, path)) = newest {
        return Ok(path.canonicalize()?);
    }
    bail!(
        "{file} not found next to {} (build it with `cargo build -p {package}`, or set {env})",
        exe.display()
    )
}

/// The objects to attach: those named, or every object with a trusted manifest whose loader
/// runs (each skipped one is reported; the agent then also attaches objects loaded later).
fn chosen_objects(objects: &[String]) -> Result<Vec<String>> {
    if !objects.is_empty() {
        return Ok(objects.to_vec());
    }
    let (found, skipped) = trusted_objects();
    warn_skipped(&skipped);
    let objects: Vec<String> = found
        .into_iter()
        .filter(|f| f.manifest.attachable())
        .map(|f| f.manifest.object)
        .collect();
    if objects.is_empty() {
        eprintln!(
            "bpftime-rs: no object is loaded yet: the agent attaches objects as they are loaded \
             (`bpftime-rs load OBJ` or `load -- APP`)"
        );
    }
    Ok(objects)
}

/// Writes the agent's config (one `object NAME` line per object, and `discover` when the agent
/// also attaches objects loaded later) in a new directory of our
/// state directory's `agents/`, named unguessably, created exclusively, never through a link.
/// The directory is then given to the target's user, so the agent there can write its status
/// and counters next to the config; nobody else can write in it.
fn write_config(objects: &[String], discover: bool, tag: &str, target_uid: u32) -> Result<PathBuf> {
    let state = StateDir::ours().context("preparing the state directory")?;
    prune_agent_dirs(&state);
    let dir = state
        .agents_dir()
        .join(format!("{tag}-{:016x}", random_u64()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let config = dir.join("agent.conf");
    let mut text: String = objects.iter().map(|o| format!("object {o}\n")).collect();
    if discover {
        text.push_str("discover\n");
    }
    {
        use std::io::Write;
        let mut file = state::fs::create_new(&config, 0o644)?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", config.display()))?;
    }
    if target_uid != euid() {
        let gid = primary_gid(target_uid);
        std::os::unix::fs::lchown(&dir, Some(target_uid), gid)
            .with_context(|| format!("giving {} to uid {target_uid}", dir.display()))?;
    }
    Ok(config)
}

/// Removes agent directories of processes that are gone (their tag starts with the pid).
fn prune_agent_dirs(state: &StateDir) {
    let Ok(entries) = std::fs::read_dir(state.agents_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The primary group of `uid`, if the user database knows it.
fn primary_gid(uid: u32) -> Option<u32> {
    let mut buf = vec![0u8; 16384];
    // SAFETY: passwd is a plain C struct; getpwuid_r writes into it and into buf (its length
    // given), and result points at pwd or is null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (r == 0 && !result.is_null()).then_some(pwd.pw_gid)
    }
}

/// The effective uid of a running process, from /proc/PID/status.
fn process_euid(pid: i32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("no Uid line in /proc/{pid}/status"))
}

/// Gives a target of another user access to the maps of `objects` (POSIX ACL entries on their
/// segments): what `attach` to that target asks for. Only the segments' owner (the loader's
/// user, or root) can do it; otherwise the agent reports each object it cannot open.
fn grant_target(objects: &[String], uid: u32) {
    if uid == 0 || uid == euid() {
        return;
    }
    for object in objects {
        let granted = state::find_object(object)
            .map_err(anyhow::Error::from)
            .and_then(|found| {
                let shm = ShmObject::open_expect(
                    object,
                    &found.manifest.segment,
                    &found.manifest.map_defs(),
                )?;
                shm.grant(&[uid], &[])?;
                Ok(())
            });
        match granted {
            Ok(()) => {
                eprintln!("bpftime-rs: granted uid {uid} read-write access to the maps of {object}")
            }
            Err(e) => {
                eprintln!("bpftime-rs: cannot give uid {uid} access to the maps of {object}: {e:#}")
            }
        }
    }
}

fn status_path(config: &Path) -> PathBuf {
    let mut s = config.as_os_str().to_owned();
    s.push(".status");
    PathBuf::from(s)
}

/// Prints the agent's per-program status; returns how many programs failed to attach.
fn report_status(config: &Path) -> usize {
    let text = std::fs::read_to_string(status_path(config)).unwrap_or_default();
    print_status(&text)
}

/// Prints a status file's lines; returns how many are errors.
fn print_status(text: &str) -> usize {
    let mut failed = 0;
    for line in text.lines() {
        if line.starts_with("error") {
            failed += 1;
        }
        eprintln!("bpftime-rs: agent: {line}");
    }
    failed
}

pub fn start(args: &StartArgs) -> Result<()> {
    let agent = agent_path()?;
    let objects = chosen_objects(&args.objects)?;
    let config = write_config(
        &objects,
        args.objects.is_empty(),
        &format!("start-{}", std::process::id()),
        euid(),
    )?;
    let (program, rest) = args.command.split_first().context("no command")?;
    let mut preload = agent.as_os_str().to_owned();
    if let Some(existing) = std::env::var_os("LD_PRELOAD") {
        preload.push(":");
        preload.push(existing);
    }
    // Catch the signals before the command exists, so none of them ends `start` and leaves
    // the command running without the supervisor that reports its status.
    let mut signals = signal_hook::iterator::Signals::new(FORWARDED_SIGNALS)
        .context("installing the signal forwarder")?;
    let mut command = std::process::Command::new(program);
    command
        .args(rest)
        .env("LD_PRELOAD", preload)
        .env("BPFTIME_AGENT_CONFIG", &config);
    die_with_parent(&mut command);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let child_pid = child.id() as libc::pid_t;
    // `start -- CMD` stands in for CMD: a signal sent to `start` goes on to the command, and
    // `start` leaves when the command does. SIGINT and SIGQUIT from a terminal already reach the
    // command (same process group); they are forwarded only when sent to `start` alone.
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if matches!(signal, libc::SIGINT | libc::SIGQUIT) && same_foreground_group(child_pid) {
                continue;
            }
            // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet (the
            // main thread reaps it only after it exits, and then this process exits too).
            unsafe { libc::kill(child_pid, signal) };
        }
    });
    // The agent installs its hooks before `main`; its status file says how it went.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !status_path(&config).exists() && Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut follower = None;
    if std::env::var_os("BPFTIME_QUIET").is_none() {
        // What was printed is what the follower compares against: a rewrite in between is
        // printed too.
        let first = std::fs::read_to_string(status_path(&config)).unwrap_or_default();
        print_status(&first);
        let seen = Arc::new(Mutex::new(StatusSeen::new(&config, first)));
        follower = Some(Arc::clone(&seen));
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(50));
            seen.lock().unwrap_or_else(|e| e.into_inner()).print_new();
        });
    }
    let status = child.wait()?;
    // What the tree's last processes reported since the follower's last look.
    if let Some(seen) = follower {
        seen.lock().unwrap_or_else(|e| e.into_inner()).print_new();
    }
    std::process::exit(exit_code(status));
}

/// What the agents of the started tree reported so far: the command's own agent again when
/// it execs another program (it rewrites `<config>.status`), and the agents of its
/// descendants (`<config>.status.<pid>`); [`StatusSeen::print_new`] prints each line once.
struct StatusSeen {
    dir: PathBuf,
    prefix: String,
    seen: std::collections::HashMap<PathBuf, String>,
}

impl StatusSeen {
    fn new(config: &Path, first: String) -> Self {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = config
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut seen = std::collections::HashMap::new();
        seen.insert(status_path(config), first);
        Self {
            dir,
            prefix: format!("{name}.status"),
            seen,
        }
    }

    fn print_new(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = file.strip_prefix(&self.prefix) else {
                continue;
            };
            let path = entry.path();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if self.seen.get(&path) == Some(&text) {
                continue;
            }
            let who = match rest.strip_prefix('.') {
                Some(pid) => format!("process {pid}: "),
                None => String::new(),
            };
            // Lines appended (the follower's) print alone; a rewritten file prints whole.
            let old = self.seen.get(&path).map(String::as_str).unwrap_or("");
            let new = text.strip_prefix(old).unwrap_or(&text);
            for line in new.lines() {
                eprintln!("bpftime-rs: agent: {who}{line}");
            }
            self.seen.insert(path, text);
        }
    }
}

/// The signals `start` passes on to its command (SIGKILL cannot be caught: the command's
/// parent-death signal covers it).
const FORWARDED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Makes the command get SIGKILL when `start` dies (killed with SIGKILL, say), so a target is
/// never left running unsupervised, the way `unshare --kill-child` and `bwrap --die-with-parent`
/// tie a child to its launcher.
fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid is async-signal-safe; read here, before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and calls only prctl and getppid,
    // both async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nothing would signal us.
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "bpftime-rs start exited before the command ran",
                ));
            }
            Ok(())
        });
    }
}

/// Whether the command shares the terminal's foreground process group with `start`, so a
/// terminal's SIGINT/SIGQUIT has reached it already.
fn same_foreground_group(child: libc::pid_t) -> bool {
    // SAFETY: getpgid and tcgetpgrp only read process state; a failure returns -1.
    unsafe {
        let foreground = libc::tcgetpgrp(libc::STDIN_FILENO);
        foreground > 0 && libc::getpgid(child) == foreground && libc::getpgid(0) == foreground
    }
}

/// The shell's convention: the command's exit code, or 128 + the signal that ended it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(128)
}

pub fn attach(args: &AttachArgs) -> Result<()> {
    let agent = agent_path()?;
    let objects = chosen_objects(&args.objects)?;
    let target_uid = process_euid(args.pid)?;
    grant_target(&objects, target_uid);
    let config = write_config(
        &objects,
        args.objects.is_empty(),
        &format!("pid-{}", args.pid),
        target_uid,
    )?;
    let report = inject_agent(args.pid, &agent, Some(&config), &InjectOptions::default())
        .with_context(|| format!("injecting the agent into pid {}", args.pid))?;
    if report.start_result != Some(0) {
        bail!(
            "the agent in pid {} did not start (bpftime_agent_start returned {:?})",
            args.pid,
            report.start_result
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status_path(&config).exists() {
        if Instant::now() > deadline {
            bail!("the agent in pid {} did not report within 10 s", args.pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let failed = report_status(&config);
    println!(
        "attached to pid {} in {:.1?}{}",
        args.pid,
        report.elapsed,
        if failed > 0 {
            format!(" ({failed} program(s) not attached, see above)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Pids whose memory maps show the agent library.
fn pids_with_agent() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .is_ok_and(|maps| maps.contains(AGENT_FILE))
        })
        .collect()
}

/// `pid` and its descendants that have the agent mapped (a started shell's children, what
/// they exec'd, their children; through processes without the agent too), parents first.
fn tree_with_agent(pid: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|p| {
                    let parent = bpftime_runtime::maps::parent_pid(u32::try_from(p).ok()?)?;
                    Some((p, i32::try_from(parent).ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut tree = vec![pid];
    let mut at = 0;
    while at < tree.len() {
        let parent = tree[at];
        tree.extend(
            parents
                .iter()
                .filter(|&&(_, pp)| pp == parent)
                .map(|&(p, _)| p),
        );
        at += 1;
    }
    let with_agent = pids_with_agent();
    let mut out = vec![pid];
    out.extend(tree.into_iter().skip(1).filter(|p| with_agent.contains(p)));
    out
}

pub fn detach(args: &DetachArgs) -> Result<()> {
    let pids = match args.pid {
        // Kernel uprobes are the file's: what PID started is detached with it.
        Some(pid) => tree_with_agent(pid),
        None => pids_with_agent(),
    };
    if pids.is_empty() {
        println!("no process has the agent loaded");
    }
    for pid in pids {
        match detach_agent(pid, &InjectOptions::default()) {
            Ok(0) => println!("detached from pid {pid}"),
            Ok(r) => bail!("the agent in pid {pid} could not remove every hook (returned {r})"),
            Err(e) => return Err(e).with_context(|| format!("detaching from pid {pid}")),
        }
    }
    Ok(())
}
