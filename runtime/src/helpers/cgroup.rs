//! Cgroup helpers: `bpf_get_current_cgroup_id`, `bpf_get_current_ancestor_cgroup_id`,
//! `bpf_current_task_under_cgroup` (with a CGROUP_ARRAY).
//!
//! A cgroup's id in the kernel is its kernfs node id, which on 64-bit kernels is the inode
//! number of its directory in the cgroup2 file system: the calling thread's cgroup is read
//! from /proc/thread-self/cgroup (the `0::PATH` line of the unified hierarchy) and its id is
//! the inode of that directory under the cgroup2 mount (found in /proc/self/mountinfo). Each
//! call reads both afresh (a thread may be moved between cgroups at any time): a few
//! microseconds, where the kernel reads a pointer.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use super::RuntimeHelpers;
use crate::vm::{CallContext, HelperError};

type Ret = Result<u64, HelperError>;

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid systems); `None` without cgroup2.
pub fn cgroup2_mount() -> Option<&'static PathBuf> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            info.lines().find_map(|l| {
                // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPER_OPTS
                let (pre, post) = l.split_once(" - ")?;
                (post.split(' ').next()? == "cgroup2")
                    .then(|| pre.split(' ').nth(4).map(PathBuf::from))
                    .flatten()
            })
        })
        .as_ref()
}

/// The calling thread's cgroup2 path relative to the hierarchy's root (`/` for the root).
pub fn current_cgroup_path() -> Option<String> {
    let text = std::fs::read_to_string("/proc/thread-self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The kernel id of the cgroup2 directory `path` (relative to the hierarchy's root).
pub fn cgroup_id(path: &str) -> Option<u64> {
    let dir = cgroup2_mount()?.join(path.trim_start_matches('/'));
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// Ids of the calling thread's cgroup and its ancestors, root (level 0) first.
pub fn current_cgroup_ancestry() -> Option<Vec<u64>> {
    let path = current_cgroup_path()?;
    let mut ids = vec![cgroup_id("/")?];
    let mut prefix = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        ids.push(cgroup_id(&prefix)?);
    }
    Some(ids)
}

/// `bpf_get_current_cgroup_id()`: 0 when the thread's cgroup cannot be read (no cgroup2).
pub(super) fn get_current_cgroup_id(
    _: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(current_cgroup_path()
        .and_then(|p| cgroup_id(&p))
        .unwrap_or(0))
}

/// `bpf_get_current_ancestor_cgroup_id(level)`: the id of the thread's ancestor cgroup at
/// `level` (0 = the root); 0 beyond the thread's own level.
pub(super) fn get_current_ancestor_cgroup_id(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    let level = a[0] as i32;
    if level < 0 {
        return Ok(0);
    }
    Ok(current_cgroup_ancestry()
        .and_then(|ids| ids.get(level as usize).copied())
        .unwrap_or(0))
}

/// `bpf_current_task_under_cgroup(map, index)`: 1 when the calling thread's cgroup is the
/// CGROUP_ARRAY slot's cgroup or below it, else 0; `-E2BIG` for an index beyond the slots,
/// `-EAGAIN` for an empty slot (the kernel's answers).
pub(super) fn current_task_under_cgroup(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    let idx = h.map_arg(bpftime_abi::HelperId::CURRENT_TASK_UNDER_CGROUP, 1, a[0])?;
    let Some(cgroups) = h.maps[idx].as_cgroup_array() else {
        return Ok(super::neg(libc::EINVAL));
    };
    Ok(match cgroups.cgroup(a[1] as u32) {
        Err(e) => super::neg(e),
        Ok(None) => super::neg(libc::EAGAIN),
        Ok(Some(id)) => u64::from(current_cgroup_ancestry().is_some_and(|ids| ids.contains(&id))),
    })
}
