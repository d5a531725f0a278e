//! Links of the application's programs to uprobes: `BPF_LINK_CREATE` of a perf-event link on a
//! uprobe event the shim opened (`perf.rs`) or of an uprobe_multi link, published in the
//! manifest for the targets' agents, and `BPF_OBJ_GET_INFO_BY_FD` on them.

use libbpf_sys as sys;

use crate::bpf::{errno, kernel};
use crate::table::{self, Handle, LinkRec};
use crate::{publish, raw, user};

/// `BPF_LINK_CREATE`: a perf-event link on one of the shim's uprobe events, or an
/// uprobe_multi link of one of the application's programs; anything else goes to the kernel.
pub(crate) fn create(cmd: u32, attr: usize, size: u32, a: &sys::bpf_attr) -> i64 {
    // SAFETY: reading the LINK_CREATE member of the attr copy.
    let l = unsafe { a.link_create };
    // SAFETY: both union members are u32 descriptors.
    let (prog_fd, target_fd) =
        unsafe { (l.__bindgen_anon_1.prog_fd, l.__bindgen_anon_2.target_fd) };
    if l.attach_type == sys::BPF_TRACE_UPROBE_MULTI
        && table::with(|s| s.prog_of(prog_fd as i32)).is_some()
    {
        // SAFETY: the uprobe_multi member of the union (its attach type).
        return uprobe_multi_link(prog_fd as i32, unsafe { &l.__bindgen_anon_3.uprobe_multi });
    }
    let Some(event) = table::with(|s| s.event_of(target_fd as i32)) else {
        return kernel(cmd, attr, size);
    };
    if l.attach_type != sys::BPF_PERF_EVENT {
        eprintln!(
            "bpftime-shim: bpf(BPF_LINK_CREATE) of attach type {} on a uprobe event: only \
             BPF_PERF_EVENT links are served; failing with EINVAL",
            l.attach_type
        );
        return errno(libc::EINVAL);
    }
    // SAFETY: the perf_event member of the union (attach type BPF_PERF_EVENT).
    let cookie = unsafe { l.__bindgen_anon_3.perf_event.bpf_cookie };
    new_link(prog_fd as i32, false, |_| Ok(vec![(event, cookie)]))
}

/// `LINK_CREATE(BPF_TRACE_UPROBE_MULTI)` of one of the application's programs (libbpf's
/// `bpf_program__attach_uprobe_multi`): one uprobe per offset of the file, each with its cookie,
/// all entry or all return probes, for one pid or every process, as the kernel's
/// `bpf_uprobe_multi_link_attach` reads them.
fn uprobe_multi_link(
    prog_fd: i32,
    m: &sys::bpf_attr__bindgen_ty_14__bindgen_ty_3__bindgen_ty_7,
) -> i64 {
    const MAX_PROBES: u32 = 1 << 20;
    if m.cnt == 0 || m.cnt > MAX_PROBES {
        return errno(libc::EINVAL);
    }
    let path = match user::read_cstr(m.path as usize, libc::PATH_MAX as usize) {
        Ok(p) => std::path::PathBuf::from(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&p),
        ),
        Err(e) => return e,
    };
    let path = match std::fs::canonicalize(&path) {
        Ok(p) => p,
        Err(e) => return -i64::from(e.raw_os_error().unwrap_or(libc::ENOENT)),
    };
    let read_u64s = |ptr: u64| -> Result<Vec<u64>, i64> {
        let bytes = user::read(ptr as usize, m.cnt as usize * 8)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    };
    let offsets = match read_u64s(m.offsets) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let cookies = if m.cookies == 0 {
        vec![0; offsets.len()]
    } else {
        match read_u64s(m.cookies) {
            Ok(v) => v,
            Err(e) => return e,
        }
    };
    // Reference counters (USDT semaphores), one per offset, 0 for none.
    let ref_ctrs = if m.ref_ctr_offsets == 0 {
        vec![0; offsets.len()]
    } else {
        match read_u64s(m.ref_ctr_offsets) {
            Ok(v) => v,
            Err(e) => return e,
        }
    };
    let retprobe = m.flags & sys::BPF_F_UPROBE_MULTI_RETURN != 0;
    // pid 0: every process (the kernel's uprobe_multi has no "calling process" sentinel).
    let pid = (m.pid != 0).then_some(m.pid);
    new_link(prog_fd, true, |s| {
        Ok(offsets
            .iter()
            .zip(&cookies)
            .zip(&ref_ctrs)
            .map(|((&file_offset, &cookie), &ref_ctr)| {
                s.events.push(table::EventRec {
                    path: path.clone(),
                    file_offset,
                    retprobe,
                    ref_ctr_offset: Some(ref_ctr).filter(|&o| o != 0),
                    pid,
                    enabled: true,
                    ioctl_prog: None,
                    open: 0,
                });
                (s.events.len() - 1, cookie)
            })
            .collect())
    })
}

/// A link of program `prog_fd` to the uprobes `targets` makes (a perf-event link's one event,
/// or an uprobe_multi link's), published in the manifest; its descriptor (an eventfd), or
/// `-errno`.
fn new_link(
    prog_fd: i32,
    multi: bool,
    targets: impl FnOnce(&mut table::Shim) -> Result<Vec<(usize, u64)>, i64>,
) -> i64 {
    let link_fd = raw::eventfd(true);
    if link_fd < 0 {
        return link_fd;
    }
    let r = table::with(|s| {
        crate::publish::ensure_sealed(s);
        let Some(prog) = s.prog_of(prog_fd) else {
            // The kernel's bpf_prog_get: EBADF for no descriptor, EINVAL for one that is not
            // a program.
            // SAFETY: F_GETFD takes no pointer.
            let open = unsafe {
                raw::syscall3(libc::SYS_fcntl, i64::from(prog_fd), libc::F_GETFD.into(), 0)
            } >= 0;
            return Err(errno(if open { libc::EINVAL } else { libc::EBADF }));
        };
        publish::publish_program(s, prog);
        if let Some(why) = &s.progs[prog].unrunnable {
            eprintln!(
                "bpftime-shim: program {} cannot run in user space: {why}; failing \
                 bpf(BPF_LINK_CREATE) with EOPNOTSUPP",
                s.progs[prog].name
            );
            return Err(errno(libc::EOPNOTSUPP));
        }
        let targets = targets(s)?;
        s.links.push(LinkRec {
            prog,
            targets,
            multi,
            prog_id: kernel_prog_id(prog_fd),
            open: 1,
            detached: false,
        });
        s.fds
            .insert(link_fd as i32, Handle::Link(s.links.len() - 1));
        Ok(())
    });
    match r {
        Ok(()) => {
            publish::links_changed();
            link_fd
        }
        Err(e) => {
            raw::close(link_fd as i32);
            e
        }
    }
}

/// The kernel's id of the program on `fd` (0 if it cannot say).
fn kernel_prog_id(fd: i32) -> u32 {
    let mut info: sys::bpf_prog_info = zeroed_uapi();
    let mut attr: sys::bpf_attr = zeroed_uapi();
    attr.info.bpf_fd = fd as u32;
    attr.info.info_len = std::mem::size_of::<sys::bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut sys::bpf_prog_info as u64;
    let r = kernel(
        sys::BPF_OBJ_GET_INFO_BY_FD,
        &attr as *const sys::bpf_attr as usize,
        std::mem::size_of::<sys::bpf_attr>() as u32,
    );
    if r < 0 {
        0
    } else {
        info.id
    }
}

/// An all-zero UAPI struct.
fn zeroed_uapi<T: Copy>() -> T {
    // SAFETY: only used for the bindgen UAPI structs, plain integers for which zero is valid.
    unsafe { std::mem::zeroed() }
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a uprobe link, as the kernel fills `bpf_link_info` for a perf
/// link (`bpf_perf_link_fill_uprobe`): type, ids, the probe's kind, file (into the caller's
/// buffer when it gives one), offset and cookie. The link id is the shim's own (the kernel has
/// no such link), from a range kernel ids do not reach in practice.
pub(crate) fn info(attr: usize, info: &sys::bpf_attr__bindgen_ty_9, link: usize) -> i64 {
    const SHIM_LINK_IDS: u32 = 0x7f00_0000;
    let len = (info.info_len as usize).min(std::mem::size_of::<sys::bpf_link_info>());
    let mut out: sys::bpf_link_info = match user::read_struct(info.info as usize, len) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let (retprobe, path, offset, cookie, prog_id, multi, ref_ctr) = match table::with(|s| {
        let l = s.links.get(link)?;
        let &(event, cookie) = l.targets.first()?;
        let e = s.events.get(event)?;
        Some((
            e.retprobe,
            e.path.clone(),
            e.file_offset,
            cookie,
            l.prog_id,
            l.multi,
            e.ref_ctr_offset.unwrap_or(0),
        ))
    }) {
        Some(v) => v,
        None => return errno(libc::EBADF),
    };
    if multi {
        // An uprobe_multi link: its type, ids and probe count (the per-probe arrays of
        // `bpf_link_info.uprobe_multi` are not filled).
        out.type_ = sys::BPF_LINK_TYPE_UPROBE_MULTI;
        out.id = SHIM_LINK_IDS + link as u32;
        out.prog_id = prog_id;
        return write_info(attr, info, &out, len);
    }
    // SAFETY: the perf_event member of the union, which a perf link's info uses.
    let requested = unsafe { out.__bindgen_anon_1.perf_event.__bindgen_anon_1.uprobe };
    let name = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    if requested.file_name != 0 && requested.name_len > 0 {
        let n = (requested.name_len as usize - 1).min(name.len());
        let mut buf = name[..n].to_vec();
        buf.push(0);
        if let Err(e) = user::write(requested.file_name as usize, &buf) {
            return e;
        }
    }
    out.type_ = sys::BPF_LINK_TYPE_PERF_EVENT;
    out.id = SHIM_LINK_IDS + link as u32;
    out.prog_id = prog_id;
    // SAFETY: writing the perf_event member of our own copy.
    unsafe {
        out.__bindgen_anon_1.perf_event.type_ = if retprobe {
            sys::BPF_PERF_EVENT_URETPROBE
        } else {
            sys::BPF_PERF_EVENT_UPROBE
        };
        let u = &mut out.__bindgen_anon_1.perf_event.__bindgen_anon_1.uprobe;
        u.name_len = name.len() as u32 + 1;
        u.offset = offset as u32;
        u.cookie = cookie;
        u.ref_ctr_offset = ref_ctr;
    }
    write_info(attr, info, &out, len)
}

/// Writes the first `len` bytes of `out` to the caller's info buffer and `len` to its
/// `info_len`, as the kernel's `bpf_obj_get_info_by_fd` does.
fn write_info(
    attr: usize,
    info: &sys::bpf_attr__bindgen_ty_9,
    out: &sys::bpf_link_info,
    len: usize,
) -> i64 {
    // SAFETY: the first `len` (at most its size) bytes of a plain C struct.
    let bytes =
        unsafe { std::slice::from_raw_parts((out as *const sys::bpf_link_info).cast::<u8>(), len) };
    if let Err(e) = user::write(info.info as usize, bytes) {
        return e;
    }
    let at = attr + std::mem::offset_of!(sys::bpf_attr__bindgen_ty_9, info_len);
    match user::write(at, &(len as u32).to_le_bytes()) {
        Ok(()) => 0,
        Err(e) => e,
    }
}
