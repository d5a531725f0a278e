//! `bpftime-rs load [OPTIONS] -- APP [ARGS]`: runs an unmodified libbpf application with the
//! syscall shim (`libbpftime_shim.so`) preloaded. The shim turns the application's BPF objects
//! into a loaded object named after it (see the `bpftime-shim` crate); this command waits for
//! that object, syncs its maps to kernel mirrors as `load OBJ` does, prints its `bpf_printk`
//! lines (on stderr: the application's stdout stays its own), and when the application exits
//! (however it exits) removes its links from the object's manifest, so targets stop running its
//! programs. It exits with the application's status. `--duration S` stops the application
//! with SIGINT after S seconds.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use bpftime_runtime::helpers::TRACE_MAP_NAME;
use bpftime_runtime::maps::{RingBufConsumer, ShmObject};
use bpftime_runtime::state::manifest::vm_name;
use bpftime_runtime::state::{Manifest, StateDir};

use super::attach::library_path;
use super::load::{finish_sync, shared_with, start_sync, LoadArgs, SyncThread};

/// The shim library's file name.
const SHIM_FILE: &str = "libbpftime_shim.so";

/// A pipe: (read end, close-on-exec; write end, inherited by the application).
fn notify_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the shim's pipe");
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETFD on a descriptor we own.
    unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((read, write))
}

/// The object name the shim starts from: APP's file name (the shim keeps the characters object
/// names allow and adds `.2`, `.3` ... if a running loader holds it).
fn object_base(app: &str) -> String {
    Path::new(app)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app".into())
}

/// Numbers as the shim reads them: comma-separated.
fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Detects a loader the shim cannot serve: a statically linked executable makes its system
/// calls without the dynamic libc the shim interposes (Go programs such as cilium/ebpf tools
/// do so too).
fn check_dynamic(app: &Path) -> Result<()> {
    let Ok(bytes) = std::fs::read(app) else {
        return Ok(()); // resolved through PATH: the exec reports it
    };
    let Ok(elf) = goblin::elf::Elf::parse(&bytes) else {
        return Ok(()); // a script: its interpreter is what runs
    };
    if elf.interpreter.is_none() {
        bail!(
            "{}: statically linked (no ELF interpreter): its bpf() calls bypass the dynamic \
             libc that bpftime-rs's shim interposes, so it cannot run under `load --`",
            app.display()
        );
    }
    if elf.section_headers.iter().any(|s| {
        elf.shdr_strtab
            .get_at(s.sh_name)
            .is_some_and(|n| n == ".go.buildinfo")
    }) {
        bail!(
            "{}: a Go program: Go issues raw system calls (cilium/ebpf), which the shim cannot \
             see; it cannot run under `load --`",
            app.display()
        );
    }
    Ok(())
}

pub fn run(args: &LoadArgs) -> Result<()> {
    let (app, app_args) = args.app.split_first().context("no APP after `--`")?;
    let options = args.vm.options();
    if !options.verify {
        bail!(
            "--no-verify does not apply to `load -- APP`: the application's programs go through \
             the kernel's own BPF_PROG_LOAD"
        );
    }
    let (uids, gids) = args.grants()?;
    check_dynamic(Path::new(app))?;
    let shim = library_path(SHIM_FILE, "BPFTIME_SHIM", "bpftime-shim")?;
    let (notify_read, notify_write) = notify_pipe()?;
    let mut preload = shim.display().to_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        preload = format!("{preload}:{}", old.to_string_lossy());
    }
    let mut command = Command::new(app);
    command
        .args(app_args)
        .env("LD_PRELOAD", &preload)
        .env("BPFTIME_SHIM_OBJECT", object_base(app))
        .env("BPFTIME_SHIM_VM", vm_name(options.vm_kind()))
        .env("BPFTIME_SHIM_GRANT_UIDS", join(&uids))
        .env("BPFTIME_SHIM_GRANT_GIDS", join(&gids))
        .env(
            "BPFTIME_SHIM_NOTIFY_FD",
            notify_write.as_raw_fd().to_string(),
        );
    // SAFETY: prctl is async-signal-safe; the application dies with us rather than keep
    // running programs nobody syncs.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = command.spawn().with_context(|| format!("starting {app}"))?;
    drop(notify_write);
    let pid = child.id();

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::Builder::new()
        .name("bpftime-shim-notify".into())
        .spawn(move || {
            for line in BufReader::new(std::fs::File::from(notify_read))
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
        .context("starting the shim reader")?;

    let stop = Arc::new(AtomicBool::new(false));
    // Ctrl-C and SIGTERM are passed on to the application as they came (tools print their
    // results on SIGINT), which then exits, and so does this command.
    let forwarded = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];
    let pending: Vec<Arc<AtomicBool>> = forwarded
        .iter()
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    for (signal, flag) in forwarded.iter().zip(&pending) {
        signal_hook::flag::register(*signal, Arc::clone(flag))
            .context("installing signal handlers")?;
    }
    let mut err = std::io::stderr();
    let mut object: Option<(String, ShmObject, SyncThread, RingBufConsumer)> = None;
    // `--duration`: the application is then stopped as Ctrl-C stops it (once).
    let mut deadline = args.duration().map(|d| std::time::Instant::now() + d);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the application")? {
            break status;
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            deadline = None;
            // SAFETY: kill takes no pointer; the pid is our live (unreaped) child.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
        for (signal, flag) in forwarded.iter().zip(&pending) {
            if flag.swap(false, Ordering::Relaxed) {
                // SAFETY: kill takes no pointer; the pid is our live (unreaped) child.
                unsafe { libc::kill(pid as i32, *signal) };
            }
        }
        while let Ok(line) = rx.try_recv() {
            let Some(name) = line.strip_prefix("sealed ") else {
                continue;
            };
            if object.is_some() {
                writeln!(
                    err,
                    "bpftime-rs: {app} made a second object {name}: only the first is synced"
                )?;
                continue;
            }
            let shm = ShmObject::open(name).with_context(|| format!("opening object {name}"))?;
            writeln!(
                err,
                "bpftime-rs: {app} (pid {pid}) loaded object {name}: attach targets with \
                 `bpftime-rs start -- CMD` or `bpftime-rs attach PID`"
            )?;
            if !uids.is_empty() || !gids.is_empty() {
                writeln!(err, "bpftime-rs: {}", shared_with(name, &uids, &gids))?;
            }
            let sync = start_sync(args, &shm, &stop, &mut err)?;
            let trace = RingBufConsumer::new(&shm.map(TRACE_MAP_NAME)?)?;
            object = Some((name.to_string(), shm, sync, trace));
        }
        let mut printed = 0;
        if let Some((_, _, _, trace)) = object.as_mut() {
            printed = trace.poll(|record| {
                let _ = writeln!(err, "trace: {}", String::from_utf8_lossy(record.data));
            });
        }
        if printed == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    stop.store(true, Ordering::Relaxed);
    if let Some((name, _shm, sync, _)) = object {
        detach_links(&name);
        finish_sync(sync, &mut err)?;
        writeln!(
            err,
            "bpftime-rs: {app} exited; its links are removed, the maps of {name} stay for \
             `bpftime-rs maps` until `bpftime-rs unload {name}`"
        )?;
    }
    std::process::exit(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        _ => 1,
    });
}

/// Removes every link from `object`'s manifest (the application is gone, so are its links:
/// agents following the manifest detach its programs).
fn detach_links(object: &str) {
    let Ok(dir) = StateDir::ours() else { return };
    match Manifest::read(&dir, object) {
        Ok(mut manifest) => {
            if manifest.links.as_ref().is_some_and(|l| !l.is_empty()) {
                manifest.links = Some(Vec::new());
                if let Err(e) = manifest.publish(&dir) {
                    eprintln!(
                        "bpftime-rs: cannot remove the links of {object}: {}",
                        bpftime_abi::ErrorChain(&e)
                    );
                }
            }
        }
        Err(e) => eprintln!(
            "bpftime-rs: cannot read the manifest of {object}: {}",
            bpftime_abi::ErrorChain(&e)
        ),
    }
}
