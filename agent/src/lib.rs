//! `bpftime-agent`: the in-process half of bpftime-rs.
//!
//! Loaded with `LD_PRELOAD` (by `bpftime-rs start`) or with `dlopen` through ptrace (by
//! `bpftime-rs attach PID`). It reads hook requests, resolves them in its own process and
//! installs the hooks through [`bpftime_attach::HookSet`].
//!
//! Finding the configuration:
//! * `LD_PRELOAD` mode: the constructor (an `.init_array` entry, run before the executable's own
//!   constructors and `main`) reads the file named by `BPFTIME_AGENT_CONFIG` and installs every
//!   hook synchronously, so no early call is missed. The variable is then removed from the
//!   environment so child processes do not install the same hooks.
//! * Injected mode: the injector calls the exported `bpftime_agent_start(config_path)` after
//!   `dlopen` returns (see `bpftime_attach::inject::inject_agent`).
//!
//! Trust: the config decides which objects this process opens, so it is read only if it is a
//! regular file of root or of this process's user, writable by nobody else, in a directory chain
//! nobody else can write (checked on the opened descriptor; never through a symbolic link).
//! `bpftime-rs start`/`attach` write it in the state directory (`bpftime_runtime::state`).
//! Programs come only from the objects' manifests, never from shared memory.
//!
//! Config file: one request per line, `uprobe TARGET` or `uretprobe TARGET` (also the libbpf
//! section form `uprobe/TARGET`), `#` comments. TARGET as in `bpftime_attach::symbols`.
//! Results: `<config>.status` (one line per request: `ok ...` or `error ...`, then `detached`
//! after detach) and `<config>.counts`, a shared-mapped file of little-endian u64: a header
//! `[magic, n]` then per request `[entries, returns, sum of PARM1, sum of RC]` (the built-in
//! counting handler; the BPF runtime plugs in at `make_handler`).

mod bpf;
mod exec;

use bpftime_attach::symbols::{ResolvedTarget, Resolver};
use bpftime_attach::{EntryAction, HookSet, ProbeHandler, ProbeKind, PtRegs};
use std::ffi::{c_char, CStr};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Magic of the counts file header ("BPFTAGNT").
pub const COUNTS_MAGIC: u64 = u64::from_le_bytes(*b"BPFTAGNT");

/// One hook request of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    kind: ProbeKind,
    target: String,
}

fn parse_config(text: &str) -> Vec<Result<Request, String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (kind, target) = l
                .split_once(|c: char| c.is_whitespace() || c == '/')
                .ok_or_else(|| format!("`{l}`: expected `uprobe TARGET` or `uretprobe TARGET`"))?;
            let kind = match kind {
                "uprobe" => ProbeKind::Uprobe,
                "uretprobe" => ProbeKind::Uretprobe,
                k => return Err(format!("`{l}`: unknown probe kind `{k}`")),
            };
            Ok(Request {
                kind,
                target: target.trim().to_string(),
            })
        })
        .collect()
}

/// The built-in counting handler: counts calls and returns, sums PARM1 and RC.
struct CountingHandler {
    slot: &'static [AtomicU64; 4],
}

impl ProbeHandler for CountingHandler {
    fn on_entry(&self, regs: &mut PtRegs) -> EntryAction {
        self.slot[0].fetch_add(1, Ordering::Relaxed);
        self.slot[2].fetch_add(regs.rdi, Ordering::Relaxed);
        EntryAction::Continue
    }
    fn on_return(&self, regs: &mut PtRegs) {
        self.slot[1].fetch_add(1, Ordering::Relaxed);
        self.slot[3].fetch_add(regs.rax, Ordering::Relaxed);
    }
}

/// Where the BPF runtime plugs in: the handler for request `index`.
fn make_handler(counts: &'static [[AtomicU64; 4]], index: usize) -> Arc<dyn ProbeHandler> {
    Arc::new(CountingHandler {
        slot: &counts[index],
    })
}

/// Maps `<config>.counts` shared; never unmapped (handlers may run at any time).
fn map_counts(path: &Path, n: usize) -> std::io::Result<&'static [[AtomicU64; 4]]> {
    let len = 16 + n.max(1) * 32;
    // Never truncated or shrunk: a handler of an earlier session may still be finishing a write
    // through an older mapping of the same file, and a mapped page past the end would SIGBUS.
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if f.metadata()?.len() < len as u64 {
        f.set_len(len as u64)?;
    }
    use std::os::fd::AsFd;
    // Never unmapped: handlers may count into it until the process exits.
    let p = bpftime_abi::Mmap::shared(f.as_fd(), len, 0, bpftime_abi::os::Access::ReadWrite)?
        .leak()
        .as_ptr();
    // SAFETY: the mapping is page aligned, `len` bytes, zero filled, lives forever; AtomicU64
    // has the layout of u64.
    unsafe {
        let hdr = p.cast::<AtomicU64>();
        for i in 0..len / 8 {
            (*hdr.add(i)).store(0, Ordering::Relaxed);
        }
        (*hdr).store(COUNTS_MAGIC, Ordering::Relaxed);
        (*hdr.add(1)).store(n as u64, Ordering::Relaxed);
        Ok(std::slice::from_raw_parts(
            p.cast::<u8>().add(16).cast::<[AtomicU64; 4]>(),
            n,
        ))
    }
}

struct Agent {
    hooks: HookSet,
    status: PathBuf,
    /// Objects whose links change while this process runs (`load -- APP`), followed by the
    /// `bpftime-agent-follow` thread until detach.
    followed: Vec<bpf::FollowedObject>,
    /// Objects loaded later are attached too (the config's `discover` line).
    discover: bool,
    /// The objects attached (or tried) so far.
    known: Vec<String>,
    detached: bool,
    /// USDT semaphores counted up for the hooks, lowered on detach.
    semaphores: Vec<bpf::RaisedSemaphore>,
    /// The config file: its `.detached` list is where detach records this process.
    config: PathBuf,
}

/// How often the follower thread looks at the followed objects' manifests.
const FOLLOW_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// The follower thread: applies manifest changes of followed objects (see
/// [`bpf::follow`]) until the agent detaches; status lines are appended to the status file.
fn follow_objects() {
    // The agent's allocations and reads are not the target's.
    bpftime_attach::hook::exclude_current_thread();
    loop {
        std::thread::sleep(FOLLOW_INTERVAL);
        let mut guard = AGENT.lock().unwrap_or_else(|e| e.into_inner());
        let Some(agent) = guard.as_mut() else {
            return;
        };
        if agent.detached || (agent.followed.is_empty() && !agent.discover) {
            return;
        }
        let mut lines = Vec::new();
        for object in &mut agent.followed {
            bpf::follow(object, &mut agent.hooks, &mut lines);
        }
        if agent.discover {
            for object in bpf::new_objects(&agent.known) {
                match Resolver::new(None) {
                    Ok(mut resolver) => {
                        let (_, follow) = bpf::attach_object(
                            &object,
                            &mut resolver,
                            &mut agent.hooks,
                            &mut lines,
                            &mut agent.semaphores,
                        );
                        agent.followed.extend(follow);
                    }
                    Err(e) => lines.push(format!("error object {object}: {e}")),
                }
                agent.known.push(object);
            }
        }
        if lines.is_empty() {
            continue;
        }
        let _ = append(&agent.status, &(lines.join("\n") + "\n"), false);
    }
}

static AGENT: Mutex<Option<Agent>> = Mutex::new(None);

/// The environment variable with the pid of the first process of a started tree.
const ROOT_ENV: &str = "BPFTIME_AGENT_ROOT";

/// Where this process reports: `<config>.status` for the process `start` ran (also after it
/// execs another program: same pid), `<config>.status.<pid>` for its descendants.
fn status_path(config: &Path) -> PathBuf {
    let me = std::process::id().to_string();
    match std::env::var(ROOT_ENV) {
        Ok(root) if root != me => with_suffix(config, &format!(".status.{me}")),
        _ => with_suffix(config, ".status"),
    }
}

/// The processes detached from a config's tree (`<config>.detached`, lines `PID START_TIME`):
/// a program one of them (or one of their descendants) execs later inherits the agent through
/// the environment, and must not hook again.
fn detached_list(config: &Path) -> PathBuf {
    with_suffix(config, ".detached")
}

/// Appends `text` to the file at `path` (one of ours: a symlink there is refused), created
/// with mode 0644 if `create`.
fn append(path: &Path, text: &str, create: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(create)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .write_all(text.as_bytes())
}

/// Appends this process to its config's detached list.
fn record_detached(config: &Path) {
    let me = std::process::id();
    let Some(start) = bpftime_runtime::maps::process_start_time(me) else {
        return;
    };
    if let Err(e) = append(&detached_list(config), &format!("{me} {start}\n"), true) {
        eprintln!(
            "bpftime-agent: cannot record the detach in {}: {e}; programs this process execs \
             will hook again",
            detached_list(config).display()
        );
    }
}

/// The detached process (pid) among this process and its ancestors (this process itself: it
/// was detached, then exec'd another program, keeping its pid), if one is in `config`'s list
/// (read only if its owner is trusted, as the config is).
fn detached_ancestor(config: &Path) -> Option<u32> {
    let text = bpftime_runtime::state::fs::read_trusted(
        &detached_list(config),
        &bpftime_runtime::state::trusted_owners(),
        1 << 20,
    )
    .ok()?;
    let listed: Vec<(u32, u64)> = String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| {
            let (pid, start) = l.split_once(' ')?;
            Some((pid.parse().ok()?, start.trim().parse().ok()?))
        })
        .collect();
    let mut pid = std::process::id();
    for _ in 0..4096 {
        let start = bpftime_runtime::maps::process_start_time(pid)?;
        if listed.contains(&(pid, start)) {
            return Some(pid);
        }
        pid = bpftime_runtime::maps::parent_pid(pid).filter(|&p| p > 1)?;
    }
    None
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Hooks libc's `execve` and `execveat` so that what this process execs gets the agent
/// ([`exec::ExecFollower`]); one `follow` status line each (not an error if libc is absent).
fn follow_execs(
    config: &Path,
    resolver: &mut Resolver,
    hooks: &mut HookSet,
    lines: &mut Vec<String>,
) {
    let Some(library) = exec::agent_library_path() else {
        lines.push(
            "follow: this library's path is unknown: exec'd programs are not followed".into(),
        );
        return;
    };
    let root = std::env::var(ROOT_ENV)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(std::process::id);
    for (symbol, envp_arg) in [("execve", 3), ("execveat", 4)] {
        let target = format!("libc.so.6:{symbol}");
        let installed = resolver.resolve(&target).and_then(|t| {
            let follower = Arc::new(exec::ExecFollower::new(&library, config, root, envp_arg));
            hooks.install(&t, ProbeKind::Uprobe, follower).map(|_| t)
        });
        lines.push(match installed {
            Ok(t) => format!(
                "follow {target} at {:#x}: the programs this process execs get the agent",
                t.address
            ),
            Err(e) => {
                format!("follow {target}: not hooked ({e}): exec'd programs are not followed")
            }
        });
    }
    // A child that shares this process's memory and runs as the calling thread until it
    // execs: bpf_get_current_pid_tgid must ask the kernel while it may run.
    let mut all_watched = true;
    for symbol in ["vfork", "posix_spawn", "posix_spawnp", "clone"] {
        let target = format!("libc.so.6:{symbol}");
        let watched = resolver
            .resolve(&target)
            .and_then(|t| hooks.install(&t, ProbeKind::Uprobe, Arc::new(exec::CloneWatcher)));
        if let Err(e) = watched {
            lines.push(format!(
                "follow {target}: not hooked ({e}): bpf_get_current_pid_tgid asks the kernel \
                 on every call"
            ));
            all_watched = false;
        }
    }
    CLONES_WATCHED.store(all_watched, std::sync::atomic::Ordering::Relaxed);
}

/// Set once every clone-family function is watched: only then are thread identities cached.
pub(crate) static CLONES_WATCHED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Installs the hooks of `config`. Returns the number of failed requests.
fn start(config: &Path) -> Result<usize, String> {
    // User stacks walked by bpf_get_stackid see our return stub where a return hook is
    // pending; the hook engine knows the real address.
    bpftime_runtime::helpers::stack::set_return_address_resolver(
        bpftime_attach::hook::real_return_address,
    );
    let mut agent = AGENT.lock().unwrap_or_else(|e| e.into_inner());
    if agent.as_ref().is_some_and(|a| !a.hooks.is_empty()) {
        return Err("agent already started; detach first".into());
    }
    let text = bpftime_runtime::state::fs::read_trusted(
        config,
        &bpftime_runtime::state::trusted_owners(),
        1 << 20,
    )
    .map_err(|e| format!("cannot read config: {e}"))?;
    let text = String::from_utf8_lossy(&text).into_owned();
    // `object NAME` lines: the BPF programs `bpftime-rs load` published (see bpf.rs).
    let (object_lines, text) = bpf::split_object_lines(&text);
    let objects = object_lines.objects;
    let reqs = parse_config(&text);
    let counts = map_counts(&with_suffix(config, ".counts"), reqs.len())
        .map_err(|e| format!("cannot map counts file: {e}"))?;
    let mut hooks = HookSet::new();
    let mut lines = Vec::new();
    let mut failed = 0;
    let mut resolver = Resolver::new(None).map_err(|e| e.to_string())?;
    let mut followed = Vec::new();
    let mut semaphores = Vec::new();
    // What the BPF objects probe is probed in the programs this process execs too (the raw
    // `uprobe`/`uretprobe` request lines are the hook engine's test harness: not followed).
    // First, so that the runners the objects' hooks make find the clone watchers in place
    // (`CLONES_WATCHED`).
    if !objects.is_empty() || object_lines.discover {
        follow_execs(config, &mut resolver, &mut hooks, &mut lines);
    }
    let known = objects.clone();
    for object in &objects {
        let (f, follow) = bpf::attach_object(
            object,
            &mut resolver,
            &mut hooks,
            &mut lines,
            &mut semaphores,
        );
        failed += f;
        followed.extend(follow);
    }
    // resolve every request, then patch all resolved sites in one transaction
    let resolved: Vec<Result<(&Request, ResolvedTarget), String>> = reqs
        .iter()
        .map(|req| {
            let r = req.as_ref().map_err(Clone::clone)?;
            let t = resolver.resolve(&r.target).map_err(|e| e.to_string())?;
            Ok((r, t))
        })
        .collect();
    let batch: Vec<_> = resolved
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let (req, t) = r.as_ref().ok()?;
            Some((t.clone(), req.kind, make_handler(counts, i)))
        })
        .collect();
    let mut installed = hooks.install_many(batch).into_iter();
    for res in resolved {
        let res = res.and_then(|(r, t)| {
            installed
                .next()
                .expect("one result per resolved request")
                .map_err(|e| e.to_string())?;
            Ok((r, t))
        });
        match res {
            Ok((r, t)) => lines.push(format!(
                "ok {} {} at {:#x} ({} bytes){}",
                if r.kind == ProbeKind::Uprobe {
                    "uprobe"
                } else {
                    "uretprobe"
                },
                r.target,
                t.address,
                t.size,
                match bpftime_attach::site_mechanism(t.address) {
                    Some("int3") => " via int3",
                    _ => "",
                }
            )),
            Err(e) => {
                failed += 1;
                eprintln!("bpftime-agent: {e}");
                lines.push(format!("error {e}"));
            }
        }
    }
    let status = status_path(config);
    // Written whole then renamed, so a reader polling for it never sees half of it.
    if let Err(e) = bpftime_runtime::state::fs::write_atomic(
        &status,
        (lines.join("\n") + "\n").as_bytes(),
        0o644,
    ) {
        eprintln!("bpftime-agent: cannot write the status: {e}");
    }
    let follow = !followed.is_empty() || object_lines.discover;
    *agent = Some(Agent {
        hooks,
        status,
        followed,
        discover: object_lines.discover,
        known,
        detached: false,
        semaphores,
        config: config.to_path_buf(),
    });
    if follow {
        let spawned = std::thread::Builder::new()
            .name("bpftime-agent-follow".into())
            .spawn(follow_objects);
        if spawned.is_err() {
            eprintln!("bpftime-agent: cannot start following links: they stay as installed");
        }
    }
    Ok(failed)
}

/// Starts the agent with the config file at `config` (a NUL-terminated path), for the injector.
///
/// The hooks are installed by a new thread, and this returns at once (0; -1 if the thread could
/// not be started): the caller is a thread hijacked by ptrace, whose own saved instruction
/// pointer could lie in bytes about to be patched, which only a thread suspended by the hook
/// engine's transaction gets moved out of. Completion: `<config>.status` appears.
///
/// # Safety
/// `config` must be a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn bpftime_agent_start(config: *const c_char) -> i32 {
    if config.is_null() {
        return -1;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(config) };
    let path = PathBuf::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path.to_bytes()),
    );
    let spawned = std::thread::Builder::new()
        .name("bpftime-agent".into())
        .spawn(move || {
            bpftime_attach::hook::exclude_current_thread();
            if let Err(e) = start(&path) {
                eprintln!("bpftime-agent: {e}");
                let _ = bpftime_runtime::state::fs::write_atomic(
                    &with_suffix(&path, ".status"),
                    format!("error {e}\n").as_bytes(),
                    0o644,
                );
            }
        });
    match spawned {
        Ok(_) => 0,
        Err(_) => -1,
    }
}

/// Removes every hook (pending return hooks return normally without calling handlers).
/// Returns 0, or -1 if some hook could not be removed. Safe to call more than once.
///
/// Returns -2 without doing anything when the agent is busy (installing): the caller may be a
/// ptrace-hijacked thread that itself holds the agent's lock; retry from another stop.
#[no_mangle]
pub extern "C" fn bpftime_agent_detach() -> i32 {
    let mut agent = match AGENT.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return -2,
    };
    let Some(a) = agent.as_mut() else {
        return 0;
    };
    a.detached = true;
    let r = a.hooks.detach();
    record_detached(&a.config);
    // As the kernel's uprobe_unregister takes its reference-counter increment off.
    let mut semaphores = std::mem::take(&mut a.semaphores);
    for f in &mut a.followed {
        semaphores.extend(f.take_semaphores());
    }
    bpf::lower_semaphores(semaphores);
    let _ = append(
        &a.status,
        &match &r {
            Ok(()) => "detached\n".to_string(),
            Err(e) => format!("detach error {e}\n"),
        },
        false,
    );
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bpftime-agent: detach: {e}");
            -1
        }
    }
}

extern "C" fn agent_init() {
    let Some(config) = std::env::var_os("BPFTIME_AGENT_CONFIG") else {
        return; // injected mode: the injector calls bpftime_agent_start
    };
    // The config stays in the environment: what the started command execs, and the
    // children it starts, load the agent with it too and hook what they run (kernel
    // uprobes belong to the file, not to one process). The first process of the tree
    // records its pid for them; the others report apart (see `status_path`).
    if std::env::var_os(ROOT_ENV).is_none() {
        std::env::set_var(ROOT_ENV, std::process::id().to_string());
    }
    let config = PathBuf::from(config);
    if let Some(ancestor) = detached_ancestor(&config) {
        // `bpftime-rs detach` reached the tree this process was started in: it runs unprobed.
        let _ = bpftime_runtime::state::fs::write_atomic(
            &status_path(&config),
            format!("detached: ancestor pid {ancestor} was detached; nothing hooked\n").as_bytes(),
            0o644,
        );
        return;
    }
    // A panic must not unwind out of a constructor (that aborts the target): the target runs
    // on unprobed instead.
    // The start-up's allocations after the first hook is in place run on the target's main
    // thread: they are the agent's, not the target's.
    let started =
        bpftime_attach::hook::without_probes(|| std::panic::catch_unwind(|| start(&config)));
    match started {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("bpftime-agent: {e}"),
        Err(_) => eprintln!("bpftime-agent: internal error while installing hooks; none installed"),
    }
}

#[used]
#[link_section = ".init_array"]
static AGENT_INIT: extern "C" fn() = agent_init;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_config_lines() {
        let r = parse_config("# c\nuprobe libc.so.6:malloc\n\nuretprobe/main:f+4\nkprobe x\nbad\n");
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[0],
            Ok(Request {
                kind: ProbeKind::Uprobe,
                target: "libc.so.6:malloc".into()
            })
        );
        assert_eq!(r[1].as_ref().unwrap().target, "main:f+4");
        assert!(r[2].is_err() && r[3].is_err());
    }
}
