//! POSIX shared-memory segments: naming, creation, mapping, discovery.
//!
//! We call shm_open/mmap through `libc` rather than the `shared_memory` crate because we need
//! exact control over the name (`/dev/shm/bpftime-rs.<object>.shm`, so `unload` and stale
//! detection can find segments by listing /dev/shm), O_EXCL creation, an explicit fchmod so
//! non-root targets can open a root loader's segment despite the umask, and the raw fd to map
//! ring buffer data pages twice back to back as the kernel does.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub(crate) const SHM_DIR: &str = "/dev/shm";
pub(crate) const PREFIX: &str = "bpftime-rs.";
pub(crate) const SUFFIX: &str = ".shm";

pub(crate) fn page_size() -> usize {
    static PG: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PG.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p <= 0 {
            4096
        } else {
            p as usize
        }
    })
}

/// Object names become file names, so keep them to a safe alphabet.
pub(crate) fn valid_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'))
}

pub(crate) fn shm_name(object: &str) -> String {
    format!("/{PREFIX}{object}{SUFFIX}")
}

pub(crate) fn shm_path(object: &str) -> String {
    format!("{SHM_DIR}/{PREFIX}{object}{SUFFIX}")
}

/// A whole-file shared mapping. Unmapped on drop.
pub(crate) struct Mapping {
    base: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; all concurrent access goes through atomics or
// through raw-pointer copies whose races are part of the documented map semantics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn create(object: &str, len: usize, mode: u32, reserve: bool) -> io::Result<Self> {
        let name = CString::new(shm_name(object)).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: valid NUL-terminated name.
        let fd = unsafe {
            libc::shm_open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                mode as libc::mode_t,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by shm_open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let setup = || -> io::Result<()> {
            // SAFETY: plain syscalls on our own fd.
            if unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above. tmpfs allocates pages on first touch, so a large, mostly
            // unused segment costs nothing until used.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
            if reserve {
                // Commit the pages now, as the kernel preallocates its maps: a full /dev/shm
                // then fails here, at load time, instead of as SIGBUS inside a target process
                // touching a fresh page later.
                // SAFETY: plain syscall on our own fd.
                let r = unsafe { libc::posix_fallocate(fd.as_raw_fd(), 0, len as libc::off_t) };
                if r != 0 {
                    return Err(io::Error::from_raw_os_error(r));
                }
            }
            Ok(())
        };
        if let Err(e) = setup() {
            // SAFETY: removing the name we just created.
            unsafe { libc::shm_unlink(name.as_ptr()) };
            return Err(e);
        }
        match Self::map_fd(fd, len) {
            Ok(m) => Ok(m),
            Err(e) => {
                // SAFETY: as above.
                unsafe { libc::shm_unlink(name.as_ptr()) };
                Err(e)
            }
        }
    }

    pub(crate) fn open(object: &str) -> io::Result<Self> {
        let name = CString::new(shm_name(object)).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: valid NUL-terminated name.
        let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by shm_open.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = std::fs::File::from(fd.try_clone()?).metadata()?.len() as usize;
        Self::map_fd(fd, len)
    }

    fn map_fd(fd: OwnedFd, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "empty segment"));
        }
        // SAFETY: fresh shared mapping of a file we hold open; nothing else owns this range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: p as *mut u8,
            len,
            fd,
        })
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.base
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Maps `[file_off, file_off + 2 pages + data)` and then the data pages a second time right
    /// after, so a ring record that wraps is contiguous in memory (the kernel's ringbuf trick;
    /// a BPF program writes a reserved record through one pointer).
    pub(crate) fn map_ring(&self, file_off: usize, data: usize) -> io::Result<RingMapping> {
        let pg = page_size();
        let total = 2 * pg + 2 * data;
        // SAFETY: reserving address space only.
        let res = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if res == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let res = res as *mut u8;
        let ring = RingMapping {
            base: res,
            len: total,
        };
        // SAFETY: MAP_FIXED over the reservation we own; offsets are page aligned by layout.
        let a = unsafe {
            libc::mmap(
                res as *mut libc::c_void,
                2 * pg + data,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                file_off as libc::off_t,
            )
        };
        if a == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above, the second view of the data pages.
        let b = unsafe {
            libc::mmap(
                res.add(2 * pg + data) as *mut libc::c_void,
                data,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                (file_off + 2 * pg) as libc::off_t,
            )
        };
        if b == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ring)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map_fd mapped; no references outlive self (handles
        // hold an Arc to the mapping).
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

/// The double view of one ring (consumer page, producer page, data, data again).
pub(crate) struct RingMapping {
    pub(crate) base: *mut u8,
    len: usize,
}

// SAFETY: shared memory accessed via atomics / documented racy copies.
unsafe impl Send for RingMapping {}
// SAFETY: as above.
unsafe impl Sync for RingMapping {}

impl Drop for RingMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the reservation made in map_ring.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

pub(crate) fn unlink(object: &str) -> io::Result<()> {
    let name = CString::new(shm_name(object)).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: valid NUL-terminated name.
    if unsafe { libc::shm_unlink(name.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Object names of every bpftime-rs segment in /dev/shm.
pub(crate) fn list_object_names() -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir(SHM_DIR)? {
        let ent = ent?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(obj) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_suffix(SUFFIX))
        {
            if valid_object_name(obj) {
                out.push(obj.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Start time (clock ticks since boot) of a process, to tell a live creator from a recycled pid.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?;
    if matches!(state, "Z" | "X" | "x") {
        return None;
    }
    // After the state, starttime is the 19th field (field 22 of the whole line).
    f.nth(18)?.parse().ok()
}

pub(crate) fn exists(object: &str) -> bool {
    std::path::Path::new(&shm_path(object)).exists()
}

/// Pids (other than ours) whose /proc/PID/maps shows `path`.
pub(crate) fn pids_mapping(path: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| {
                m.lines()
                    .any(|l| l.ends_with(path) || l.contains(&format!("{path} ")))
            })
        })
        .collect();
    out.sort_unstable();
    out
}

/// Inode number of our pid namespace (0 if unknown).
pub(crate) fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}
