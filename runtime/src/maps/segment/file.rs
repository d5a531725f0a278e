//! POSIX shared-memory segments: naming, creation, mapping, ownership checks, access grants.
//!
//! We call shm_open/mmap through `libc` rather than the `shared_memory` crate because we need
//! exact control over the name (`/dev/shm/bpftime-rs.<object>.shm`, so `unload` can find
//! segments by listing /dev/shm), O_EXCL creation with an exact mode (0600: nobody but the
//! loader's user, whatever the umask), `fstat` of the descriptor to check who owns what we
//! mapped, POSIX ACL entries on the descriptor to grant one more user or group access, and the
//! raw fd to map ring buffer data pages twice back to back as the kernel does.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use bpftime_abi::os::Access;
use bpftime_abi::Mmap;

use super::SegmentIdentity;

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The users whose files this process trusts: root and itself.
pub fn trusted_owners() -> Vec<u32> {
    let me = euid();
    if me == 0 {
        vec![0]
    } else {
        vec![0, me]
    }
}

pub(crate) const SHM_DIR: &str = "/dev/shm";
pub(crate) const PREFIX: &str = "bpftime-rs.";
pub(crate) const SUFFIX: &str = ".shm";

pub(crate) use bpftime_abi::page_size;

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
    map: Mmap,
    fd: OwnedFd,
    identity: SegmentIdentity,
}

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

    /// Opens the segment of `object` if its owner is one of `trusted` and it is not writable by
    /// everyone (checked on the descriptor).
    pub(crate) fn open(object: &str, trusted: &[u32]) -> Result<Self, OpenError> {
        let name = CString::new(shm_name(object)).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: valid NUL-terminated name (glibc's shm_open adds O_NOFOLLOW).
        let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd was just returned by shm_open.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
        if !meta.is_file() {
            return Err(OpenError::Untrusted("not a regular file".into()));
        }
        if !trusted.contains(&meta.uid()) {
            return Err(OpenError::Untrusted(format!(
                "owned by uid {}, not by {}",
                meta.uid(),
                trusted
                    .iter()
                    .map(|u| if *u == 0 {
                        "root".to_string()
                    } else {
                        format!("uid {u}")
                    })
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        if meta.mode() & 0o002 != 0 {
            return Err(OpenError::Untrusted(format!(
                "writable by every user (mode {:o}); an older bpftime-rs made it so: unload it",
                meta.mode() & 0o777
            )));
        }
        Ok(Self::map_fd(fd, meta.len() as usize)?)
    }

    fn map_fd(fd: OwnedFd, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "empty segment"));
        }
        let map = Mmap::shared(fd.as_fd(), len, 0, Access::ReadWrite)?;
        let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
        let identity = SegmentIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            uid: meta.uid(),
        };
        Ok(Self { map, fd, identity })
    }

    /// Which file this is (device, inode, owner), from `fstat` of the mapped descriptor.
    pub(crate) fn identity(&self) -> SegmentIdentity {
        self.identity
    }

    /// Adds POSIX ACL entries giving `uids` and `gids` read-write access (the mode's owner
    /// bits stay; others keep none). Needs a filesystem with ACLs (tmpfs has them with
    /// CONFIG_TMPFS_POSIX_ACL, as Debian's kernels do).
    pub(crate) fn grant(&self, uids: &[u32], gids: &[u32]) -> io::Result<()> {
        acl::grant(&self.fd, uids, gids)
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Maps `[file_off, file_off + 2 pages + data)` and then the data pages a second time right
    /// after, so a ring record that wraps is contiguous in memory (the kernel's ringbuf trick;
    /// a BPF program writes a reserved record through one pointer).
    pub(crate) fn map_ring(&self, file_off: usize, data: usize) -> io::Result<RingMapping> {
        let map = Mmap::ring(self.fd.as_fd(), file_off as u64, 2 * page_size(), data)?;
        Ok(RingMapping { map })
    }
}

/// The double view of one ring (consumer page, producer page, data, data again).
pub(crate) struct RingMapping {
    map: Mmap,
}

impl RingMapping {
    pub(crate) fn base(&self) -> *mut u8 {
        self.map.as_ptr()
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
pub fn process_start_time(pid: u32) -> Option<u64> {
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

/// The parent of process `pid` (field 4 of /proc/PID/stat).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
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

/// Why an existing segment was not opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    Io(io::Error),
    /// It exists but is not one this process may trust (owner, mode).
    Untrusted(String),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<io::ErrorKind> for OpenError {
    fn from(e: io::ErrorKind) -> Self {
        Self::Io(e.into())
    }
}

/// POSIX access control lists, written directly as the kernel's `system.posix_acl_access`
/// extended attribute (no libacl: the format is a version word and fixed 8-byte entries).
mod acl {
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;

    const NAME: &[u8] = b"system.posix_acl_access\0";
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const UNDEFINED_ID: u32 = u32::MAX;
    const RW: u16 = 0o6;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    struct Entry {
        tag: u16,
        id: u32,
        perm: u16,
    }

    fn read(fd: &OwnedFd) -> io::Result<Vec<Entry>> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: buf is writable for its length; the name is NUL-terminated.
        let n = unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                NAME.as_ptr().cast(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(e);
            }
            // No ACL yet: the one the mode stands for.
            let file = std::fs::File::from(fd.try_clone()?);
            let mode = file.metadata()?.mode();
            let bits = |shift: u32| ((mode >> shift) & 7) as u16;
            return Ok(vec![
                Entry {
                    tag: USER_OBJ,
                    id: UNDEFINED_ID,
                    perm: bits(6),
                },
                Entry {
                    tag: GROUP_OBJ,
                    id: UNDEFINED_ID,
                    perm: bits(3),
                },
                Entry {
                    tag: OTHER,
                    id: UNDEFINED_ID,
                    perm: bits(0),
                },
            ]);
        }
        let buf = &buf[..n as usize];
        if buf.len() < 4 || u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unknown ACL format",
            ));
        }
        Ok(buf[4..]
            .chunks_exact(8)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect())
    }

    pub(super) fn grant(fd: &OwnedFd, uids: &[u32], gids: &[u32]) -> io::Result<()> {
        if uids.is_empty() && gids.is_empty() {
            return Ok(());
        }
        let mut entries = read(fd)?;
        let mut add =
            |tag: u16, id: u32| match entries.iter_mut().find(|e| e.tag == tag && e.id == id) {
                Some(e) => e.perm |= RW,
                None => entries.push(Entry { tag, id, perm: RW }),
            };
        for &uid in uids {
            add(USER, uid);
        }
        for &gid in gids {
            add(GROUP, gid);
        }
        // The mask bounds the group class (named users, groups, the owning group): exactly
        // what they were given.
        let mask = entries
            .iter()
            .filter(|e| matches!(e.tag, USER | GROUP | GROUP_OBJ))
            .fold(0, |m, e| m | e.perm);
        entries.retain(|e| e.tag != MASK);
        entries.push(Entry {
            tag: MASK,
            id: UNDEFINED_ID,
            perm: mask,
        });
        entries.sort_by_key(|e| (e.tag, e.id));
        let mut buf = VERSION.to_le_bytes().to_vec();
        for e in &entries {
            buf.extend_from_slice(&e.tag.to_le_bytes());
            buf.extend_from_slice(&e.perm.to_le_bytes());
            buf.extend_from_slice(&e.id.to_le_bytes());
        }
        // SAFETY: buf is readable for its length; the name is NUL-terminated.
        let r = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                NAME.as_ptr().cast(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
