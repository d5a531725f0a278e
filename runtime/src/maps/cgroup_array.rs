//! CGROUP_ARRAY: slots of cgroups, for `bpf_current_task_under_cgroup` (libbpf-tools'
//! `-c CGROUP` filters).
//!
//! User space stores a cgroup2 directory's descriptor in a slot (`BPF_ANY` only, as the
//! kernel's `bpf_fd_array_map_update_elem`); the slot keeps the cgroup's id (the directory's
//! inode number, the kernel's kernfs id), which needs no descriptor in any other process.
//! Lookups from user space fail with `ENOTSUPP` as in the kernel (the slot holds a kernel
//! object, not a value); listings show each set slot's cgroup id.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};

use bpftime_abi::flags::{BPF_F_MMAPABLE, BPF_F_RDONLY_PROG, BPF_F_WRONLY_PROG};

use super::layout::*;
use super::typed::typed_map;
use super::{Entry, EntryValue, MapError, MapHandle, BPF_ANY};

typed_map!(
    /// A CGROUP_ARRAY: cgroup ids by index.
    CgroupArray,
    CgroupArray,
    "cgroup_array"
);

/// The kernel's `ENOTSUPP` (524): an operation the map type does not have, from a syscall.
pub const ENOTSUPP: i32 = 524;

/// `CGROUP2_SUPER_MAGIC`: a descriptor must be a directory of the cgroup2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// CGROUP_ARRAY definitions, checked as `fd_array_map_alloc_check` does (EINVAL).
pub(super) fn validate(def: &super::MapDef) -> Result<(), String> {
    if def.key_size != 4 || def.value_size != 4 || def.max_entries == 0 {
        return Err("cgroup_array needs key_size 4, value_size 4, max_entries > 0".into());
    }
    if def.flags & (BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG | BPF_F_MMAPABLE) != 0 {
        return Err(format!("cgroup_array flags {:#x} not allowed", def.flags));
    }
    Ok(())
}

/// Region layout: one u64 cgroup id per slot (0 = empty).
pub(super) fn plan(g: &mut Geometry, def: &super::MapDef, cur: u64) {
    g.data_off = round_up(cur, 64);
    g.data_size = u64::from(def.max_entries) * 8;
}

/// The cgroup id of descriptor `fd` of this process: the inode of a cgroup2 directory;
/// `EBADF` for anything else (a closed descriptor, a file, a cgroup v1 directory), as
/// `cgroup_get_from_fd` answers.
pub fn cgroup_id_of_fd(fd: i32) -> Result<u64, i32> {
    let path = format!("/proc/self/fd/{fd}");
    let meta = std::fs::metadata(&path).map_err(|_| libc::EBADF)?;
    let mut fs: libc::statfs = unsafe_zeroed_statfs();
    let c_path = std::ffi::CString::new(path).map_err(|_| libc::EBADF)?;
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0
        || fs.f_type != CGROUP2_SUPER_MAGIC
        || !meta.is_dir()
    {
        return Err(libc::EBADF);
    }
    Ok(meta.ino())
}

fn unsafe_zeroed_statfs() -> libc::statfs {
    // SAFETY: `statfs` is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

impl CgroupArray {
    fn slot(&self, index: u32) -> &AtomicU64 {
        // SAFETY: index < max_entries (callers check): inside the slots, 8-byte aligned.
        unsafe { &*(self.at(self.geo.data_off + u64::from(index) * 8) as *const AtomicU64) }
    }

    /// The cgroup id in slot `index`: `Err(E2BIG)` beyond the slots, `Ok(None)` when empty.
    pub fn cgroup(&self, index: u32) -> Result<Option<u64>, i32> {
        if index >= self.def.max_entries {
            return Err(libc::E2BIG);
        }
        Ok(match self.slot(index).load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        })
    }

    /// Sets slot `index` to the cgroup with id `id` (the descriptor already resolved).
    pub fn set(&self, index: u32, id: u64) -> Result<(), MapError> {
        if index >= self.def.max_entries {
            return Err(self.err("update", libc::E2BIG));
        }
        self.slot(index).store(id, Ordering::Release);
        Ok(())
    }

    /// Kernel `bpf_fd_array_map_update_elem` with a descriptor of this process as the value.
    pub fn update_fd(&self, index: u32, fd: i32, flags: u64) -> Result<(), MapError> {
        if flags != BPF_ANY {
            return Err(self.err("update", libc::EINVAL));
        }
        if index >= self.def.max_entries {
            return Err(self.err("update", libc::E2BIG));
        }
        let id = cgroup_id_of_fd(fd).map_err(|e| self.err("update", e))?;
        self.set(index, id)
    }

    /// Kernel `fd_array_map_delete_elem`: `E2BIG` beyond the slots, `ENOENT` when empty.
    pub fn delete(&self, index: u32) -> Result<(), MapError> {
        if index >= self.def.max_entries {
            return Err(self.err("delete", libc::E2BIG));
        }
        if self.slot(index).swap(0, Ordering::AcqRel) == 0 {
            return Err(self.err("delete", libc::ENOENT));
        }
        Ok(())
    }
}

impl MapHandle {
    pub(super) fn cgroup_array_entries(&self, m: &CgroupArray) -> Vec<Entry> {
        (0..self.def.max_entries)
            .filter_map(|i| {
                let id = m.cgroup(i).ok()??;
                Some(Entry {
                    key: i.to_le_bytes().to_vec(),
                    value: EntryValue::Single(id.to_le_bytes().to_vec()),
                })
            })
            .collect()
    }
}
