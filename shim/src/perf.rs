//! `perf_event_open` on the uprobe PMU and the perf-event `ioctl`s on what it returned: a
//! uprobe the targets' agents install instead of the kernel.

use std::path::PathBuf;

use bpftime_abi::flags::{PERF_EVENT_IOC_DISABLE, PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF};
use libbpf_sys as sys;

use crate::table::{self, EventRec};
use crate::{perfbuf, publish, raw, user};

/// Where the kernel publishes the uprobe PMU (its type, and which config bit asks for a
/// return probe).
const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe";

/// The uprobe PMU's perf type and the config bit of `retprobe` (`format/retprobe` reads
/// `config:N`), as libbpf reads them.
fn uprobe_pmu() -> Option<(u32, u32)> {
    let ty = std::fs::read_to_string(format!("{UPROBE_PMU}/type")).ok()?;
    let bit = std::fs::read_to_string(format!("{UPROBE_PMU}/format/retprobe")).ok()?;
    let bit = bit.trim().strip_prefix("config:")?.parse().ok()?;
    Some((ty.trim().parse().ok()?, bit))
}

/// `perf_event_open(attr, pid, cpu, group_fd, flags)` of the application.
pub(crate) fn open(attr: usize, pid: i32, cpu: i32, group_fd: i32, flags: u64) -> i64 {
    let kernel = || {
        // SAFETY: the application's own arguments, passed on unchanged.
        unsafe {
            raw::syscall6(
                libc::SYS_perf_event_open,
                attr as i64,
                pid.into(),
                cpu.into(),
                group_fd.into(),
                flags as i64,
                0,
            )
        }
    };
    let Ok(head) = user::read_struct::<[u32; 2]>(attr, 8) else {
        return kernel();
    };
    let a = match user::read_struct::<sys::perf_event_attr>(attr, head[1] as usize) {
        Ok(a) => a,
        Err(e) => return e,
    };
    if perfbuf::is_bpf_output(a.type_, a.config) && publish::serves_perf_buffers() {
        return open_perf_buffer(flags);
    }
    if a.type_ == sys::PERF_TYPE_TRACEPOINT && publish::object_sealed() {
        // A tracepoint program would run in the kernel, on kernel maps, while the application
        // reads the user-space ones: wrong answers, silently. Refused until user-space
        // syscall tracepoints exist.
        eprintln!(
            "bpftime-shim: perf_event_open(PERF_TYPE_TRACEPOINT, config {}): tracepoints are \
             not served in user space yet; failing with EOPNOTSUPP",
            a.config
        );
        return -i64::from(libc::EOPNOTSUPP);
    }
    let Some((uprobe_type, retprobe_bit)) = uprobe_pmu() else {
        return kernel();
    };
    if head[0] != uprobe_type {
        return kernel();
    }
    // SAFETY: config1/config2 are plain u64 union members.
    let (path_ptr, offset) = unsafe { (a.__bindgen_anon_3.config1, a.__bindgen_anon_4.config2) };
    let path = match user::read_cstr(path_ptr as usize, libc::PATH_MAX as usize) {
        Ok(p) => PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&p)),
        Err(e) => return e,
    };
    // The kernel resolves the path at open (`kern_path`): a missing file is ENOENT now.
    let path = match std::fs::canonicalize(&path) {
        Ok(p) => p,
        Err(e) => return -i64::from(e.raw_os_error().unwrap_or(libc::ENOENT)),
    };
    let retprobe = a.config & (1 << retprobe_bit) != 0;
    // PERF_UPROBE_REF_CTR_OFFSET_SHIFT: a reference counter (USDT semaphore) in the high bits.
    let ref_ctr_offset = Some(a.config >> 32).filter(|&o| o != 0);
    let fd = raw::eventfd(flags & u64::from(sys::PERF_FLAG_FD_CLOEXEC) != 0);
    if fd < 0 {
        return fd;
    }
    table::with(|s| {
        s.events.push(EventRec {
            path,
            file_offset: offset,
            retprobe,
            ref_ctr_offset,
            // pid 0 is the calling process (aya's `UProbeScope::CallingProcess`).
            pid: match pid {
                0 => Some(std::process::id()),
                p => u32::try_from(p).ok(),
            },
            // A perf event opened without `disabled` counts from the start (aya never sends
            // PERF_EVENT_IOC_ENABLE; libbpf does, to no effect).
            enabled: a.disabled() == 0,
            ioctl_prog: None,
            open: 1,
        });
        s.fds
            .insert(fd as i32, table::Handle::Event(s.events.len() - 1));
    });
    fd
}

/// A BPF_OUTPUT event for a perf buffer's CPU ring, served by the shim.
fn open_perf_buffer(flags: u64) -> i64 {
    match perfbuf::create(flags & u64::from(sys::PERF_FLAG_FD_CLOEXEC) != 0) {
        Ok(rec) => {
            let fd = rec.memfd;
            table::with(|s| {
                s.perfbufs.push(rec);
                s.fds
                    .insert(fd, table::Handle::PerfBuf(s.perfbufs.len() - 1));
            });
            i64::from(fd)
        }
        Err(e) => e,
    }
}

/// A perf-event `ioctl` on one of the shim's uprobe events (`None`: not one of them).
pub(crate) fn ioctl(fd: i32, request: u64, arg: u64) -> Option<i64> {
    if table::with(|s| s.perfbuf_of(fd)).is_some() {
        return Some(match request {
            PERF_EVENT_IOC_ENABLE | PERF_EVENT_IOC_DISABLE => 0,
            other => {
                eprintln!(
                    "bpftime-shim: ioctl {other:#x} on a perf buffer event is not served; \
                     failing with ENOTTY"
                );
                -i64::from(libc::ENOTTY)
            }
        });
    }
    let event = table::with(|s| s.event_of(fd))?;
    let r = match request {
        PERF_EVENT_IOC_ENABLE | PERF_EVENT_IOC_DISABLE => {
            table::with(|s| s.events[event].enabled = request == PERF_EVENT_IOC_ENABLE);
            0
        }
        PERF_EVENT_IOC_SET_BPF => {
            let r = table::with(|s| {
                publish::ensure_sealed(s);
                let prog = s.prog_of(arg as i32).ok_or(-i64::from(libc::EBADF))?;
                publish::publish_program(s, prog);
                if let Some(why) = &s.progs[prog].unrunnable {
                    eprintln!(
                        "bpftime-shim: program {} cannot run in user space: {why}; failing \
                         PERF_EVENT_IOC_SET_BPF with EOPNOTSUPP",
                        s.progs[prog].name
                    );
                    return Err(-i64::from(libc::EOPNOTSUPP));
                }
                s.events[event].ioctl_prog = Some(prog);
                Ok(0)
            });
            match r {
                Ok(v) => v,
                Err(e) => return Some(e),
            }
        }
        other => {
            eprintln!(
                "bpftime-shim: ioctl {other:#x} on a uprobe event is not served; failing with \
                 ENOTTY"
            );
            return Some(-i64::from(libc::ENOTTY));
        }
    };
    publish::links_changed();
    Some(r)
}
