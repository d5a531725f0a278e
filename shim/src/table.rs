//! What the shim knows about the application's descriptors: which kernel map, kernel program,
//! uprobe event or link each one stands for, and what became of the object.
//!
//! Descriptor numbers are the application's (real descriptors: kernel maps and programs, or
//! eventfds for what has no kernel counterpart); the records keep the shim's own private
//! duplicate of each kernel map, so the application closing or reusing a number never loses
//! what a record describes.

use std::collections::HashMap;
use std::path::PathBuf;

use parking_lot::Mutex;

use crate::perfbuf::PerfBufRec;
use crate::publish::Sealed;
use crate::raw;

/// The first number of the shim's private duplicates (kept away from the low numbers
/// applications expect `open` to return).
const PRIVATE_FD_MIN: i32 = 512;

/// What one application descriptor stands for (an index into the [`Shim`]'s records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handle {
    Map(usize),
    Prog(usize),
    Event(usize),
    Link(usize),
    /// A BPF_OUTPUT perf event (a perf buffer's CPU ring).
    PerfBuf(usize),
    /// BTF the application loaded (kept to describe its maps' keys and values).
    Btf(usize),
}

/// BTF the application loaded with BPF_BTF_LOAD.
pub(crate) struct BtfRec {
    /// The raw BTF, as the loader passed it (libbpf's, with data section offsets filled in).
    pub bytes: Vec<u8>,
    pub open: u32,
}

/// A map the application created (in the kernel).
pub(crate) struct MapRec {
    /// The shim's private duplicate of the kernel map.
    pub kernel_fd: i32,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    /// `map_extra` (a bloom filter's hash count).
    pub map_extra: u64,
    /// As MAP_CREATE named it (libbpf truncates to 15 bytes: `obj_name.rodata`).
    pub name: String,
    /// Application descriptors open on it.
    pub open: u32,
    /// Its index in the sealed object's segment (`None` before sealing, or if it was closed
    /// by then or user space cannot hold its type).
    pub segment_index: Option<usize>,
    /// For a PROG_ARRAY before sealing: the slots the application set (key, program record),
    /// set in the segment when it is sealed.
    pub prog_slots: Vec<(Vec<u8>, usize)>,
    /// For a CGROUP_ARRAY before sealing: the slots the application set (index, cgroup id
    /// of the descriptor it passed), set in the segment when it is sealed.
    pub cgroup_slots: Vec<(u32, u64)>,
    /// Its key and value types: (BTF record, key type id, value type id), from MAP_CREATE.
    pub btf: Option<(usize, u32, u32)>,
}

/// A program the kernel accepted from the application.
pub(crate) struct ProgRec {
    pub name: String,
    pub prog_type: u32,
    /// The instructions as loaded, with every map reference's immediate (`BPF_PSEUDO_MAP_FD`,
    /// `BPF_PSEUDO_MAP_VALUE`) replaced by the map's record index.
    pub insns: Vec<u8>,
    /// Why the runtime cannot run it, if it cannot.
    pub unrunnable: Option<String>,
    /// Its index in the published manifest.
    pub manifest_index: Option<u32>,
    /// Application descriptors open on it (the record stays: links and the manifest refer to
    /// programs by index).
    pub open: u32,
}

/// A uprobe the application opened on the uprobe PMU.
pub(crate) struct EventRec {
    pub path: PathBuf,
    pub file_offset: u64,
    pub retprobe: bool,
    /// The file offset of its reference counter (a USDT semaphore), which the agent counts.
    pub ref_ctr_offset: Option<u64>,
    /// `perf_event_open`'s pid (`None`: every process).
    pub pid: Option<u32>,
    /// PERF_EVENT_IOC_ENABLE'd (and not disabled since).
    pub enabled: bool,
    /// A program attached with PERF_EVENT_IOC_SET_BPF (rather than a link).
    pub ioctl_prog: Option<usize>,
    pub open: u32,
}

/// A link of a program to uprobes: one event (a perf-event link) or several (uprobe_multi).
pub(crate) struct LinkRec {
    pub prog: usize,
    /// (uprobe event, cookie) for each probe the link attaches.
    pub targets: Vec<(usize, u64)>,
    /// A `BPF_TRACE_UPROBE_MULTI` link (its events have no descriptors of their own).
    pub multi: bool,
    /// The kernel's id of the program (what `bpf_link_info.prog_id` reports).
    pub prog_id: u32,
    pub open: u32,
    /// Detached (LINK_DETACH) while still open.
    pub detached: bool,
}

/// All of the shim's state, behind one lock.
#[derive(Default)]
pub(crate) struct Shim {
    pub fds: HashMap<i32, Handle>,
    pub maps: Vec<MapRec>,
    pub progs: Vec<ProgRec>,
    pub events: Vec<EventRec>,
    pub links: Vec<LinkRec>,
    pub perfbufs: Vec<PerfBufRec>,
    pub btfs: Vec<BtfRec>,
    pub sealed: Option<Sealed>,
}

/// The shim's state.
pub(crate) static SHIM: Mutex<Option<Shim>> = Mutex::new(None);

/// Runs `f` on the shim's state (created on first use).
pub(crate) fn with<R>(f: impl FnOnce(&mut Shim) -> R) -> R {
    let mut guard = SHIM.lock();
    f(guard.get_or_insert_with(Shim::default))
}

impl Shim {
    /// Records a new kernel map created on `fd`.
    pub fn add_map(&mut self, fd: i32, mut rec: MapRec) -> Result<usize, i64> {
        let private = raw::dup_private(fd, PRIVATE_FD_MIN);
        if private < 0 {
            return Err(private);
        }
        rec.kernel_fd = private as i32;
        rec.open = 1;
        self.maps.push(rec);
        let id = self.maps.len() - 1;
        self.fds.insert(fd, Handle::Map(id));
        Ok(id)
    }

    /// The map record `fd` stands for.
    pub fn map_of(&self, fd: i32) -> Option<usize> {
        match self.fds.get(&fd) {
            Some(Handle::Map(id)) => Some(*id),
            _ => None,
        }
    }

    /// The program record `fd` stands for.
    pub fn prog_of(&self, fd: i32) -> Option<usize> {
        match self.fds.get(&fd) {
            Some(Handle::Prog(id)) => Some(*id),
            _ => None,
        }
    }

    /// The perf buffer event `fd` stands for.
    pub fn perfbuf_of(&self, fd: i32) -> Option<usize> {
        match self.fds.get(&fd) {
            Some(Handle::PerfBuf(id)) => Some(*id),
            _ => None,
        }
    }

    /// The uprobe event `fd` stands for.
    pub fn event_of(&self, fd: i32) -> Option<usize> {
        match self.fds.get(&fd) {
            Some(Handle::Event(id)) => Some(*id),
            _ => None,
        }
    }

    fn open_count(&mut self, h: Handle) -> &mut u32 {
        match h {
            Handle::Map(i) => &mut self.maps[i].open,
            Handle::Prog(i) => &mut self.progs[i].open,
            Handle::Event(i) => &mut self.events[i].open,
            Handle::Link(i) => &mut self.links[i].open,
            Handle::PerfBuf(i) => &mut self.perfbufs[i].open,
            Handle::Btf(i) => &mut self.btfs[i].open,
        }
    }
}

/// `fd` was closed (or is about to be replaced by `dup2`): forgets it; a link or uprobe event
/// whose last descriptor it was is detached.
pub(crate) fn closed(fd: i32) {
    let detach = with(|shim| {
        let Some(h) = shim.fds.remove(&fd) else {
            return false;
        };
        let open = shim.open_count(h);
        *open = open.saturating_sub(1);
        let last = *open == 0;
        match h {
            // The shim's eventfd is closed by the caller's close itself.
            Handle::Event(_) | Handle::Link(_) => last,
            Handle::PerfBuf(i) if last => {
                crate::publish::perfbuf_closed(shim, i);
                false
            }
            _ => false,
        }
    });
    if detach {
        crate::publish::links_changed();
    }
}

/// `new` is a duplicate of `old`: the same object.
pub(crate) fn duplicated(old: i32, new: i32) {
    with(|shim| {
        if let Some(h) = shim.fds.get(&old).copied() {
            shim.fds.insert(new, h);
            *shim.open_count(h) += 1;
        }
    });
}
