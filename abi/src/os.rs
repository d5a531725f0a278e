//! OS primitives every crate needs the same way: memory mappings, the page size, the number of
//! possible CPUs, the running kernel's version and build configuration. Each raw `mmap` of the
//! project is one of the constructors below.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

/// The system page size (`sysconf(_SC_PAGESIZE)`), 4096 if it cannot be read.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|s| s.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// The number of possible CPUs, as the kernel sizes per-CPU map values: one more than the
/// highest CPU in `/sys/devices/system/cpu/possible` (what libbpf's
/// `libbpf_num_possible_cpus` reads). Falls back to the available parallelism if the file
/// cannot be read or parsed.
pub fn possible_cpus() -> u32 {
    static CPUS: OnceLock<u32> = OnceLock::new();
    *CPUS.get_or_init(|| {
        std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()
            .and_then(|s| parse_cpu_list_count(&s))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
    })
}

/// The running kernel's build configuration (`CONFIG_NAME` -> the text after `=`, quotes kept),
/// from `/boot/config-RELEASE` or `/proc/config.gz`, as libbpf reads it for `__kconfig` externs;
/// `None` when neither is readable. Lines `# CONFIG_X is not set` are absent options.
pub fn kernel_config() -> Option<&'static std::collections::BTreeMap<String, String>> {
    static CONFIG: OnceLock<Option<std::collections::BTreeMap<String, String>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
            let text = std::fs::read_to_string(format!("/boot/config-{}", release.trim()))
                .ok()
                .or_else(|| {
                    let out = std::process::Command::new("zcat")
                        .arg("/proc/config.gz")
                        .output()
                        .ok()?;
                    out.status
                        .success()
                        .then(|| String::from_utf8(out.stdout).ok())
                        .flatten()
                })?;
            Some(parse_kernel_config(&text))
        })
        .as_ref()
}

/// `CONFIG_A=y` lines into a map; comments and blank lines skipped.
pub fn parse_kernel_config(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The running kernel's `KERNEL_VERSION(major, minor, patch)` (patch capped at 255, as the
/// kernel's own macro and libbpf's `get_kernel_version` do), from `uname -r`; 0 if unreadable.
pub fn kernel_version_code() -> u32 {
    static CODE: OnceLock<u32> = OnceLock::new();
    *CODE.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| version_code(&r))
            .unwrap_or(0)
    })
}

/// `6.18.3-amd64` -> `KERNEL_VERSION(6, 18, 3)`; missing parts count as 0.
pub fn version_code(release: &str) -> u32 {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let mut next = || {
        parts
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let (major, minor, patch) = (next(), next(), next());
    (major << 16) + (minor.min(255) << 8) + patch.min(255)
}

/// `0-3,5,7-8` -> 9: one more than the highest CPU listed.
fn parse_cpu_list_count(list: &str) -> Option<u32> {
    let mut max = None;
    for part in list.trim().split(',') {
        let last = part.rsplit('-').next()?.trim().parse::<u32>().ok()?;
        max = Some(max.map_or(last, |m: u32| m.max(last)));
    }
    max.map(|m| m + 1)
}

/// One memory mapping, unmapped on drop (or kept for the process with [`Mmap::leak`]).
///
/// It hands out a raw base pointer only: what the bytes mean, and who may write them when, is
/// the owner's business (shared segments use atomics; code is never written after mapping).
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is process memory, valid from any thread; `Mmap` itself never reads or
// writes it, and every access through `as_ptr` is the caller's own `unsafe` with its own rules.
unsafe impl Send for Mmap {}
// SAFETY: as above; `&Mmap` only yields the pointer and the length.
unsafe impl Sync for Mmap {}

/// Access to a shared mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `PROT_READ`.
    ReadOnly,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

impl Access {
    fn prot(self) -> libc::c_int {
        match self {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

impl Mmap {
    /// `len` bytes of `fd` from `offset`, shared with every other mapping of the file.
    pub fn shared(fd: BorrowedFd<'_>, len: usize, offset: u64, access: Access) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid("mmap offset too large"))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr = NULL) aliases no Rust object;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                access.prot(),
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        Self::checked(ptr, len)
    }

    /// `len` bytes of private, zero-filled, read-write memory.
    pub fn anonymous(len: usize) -> io::Result<Self> {
        Self::anonymous_with(len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// A read+execute copy of `code` (W^X: the pages are writable only before they become
    /// executable, and never again). The length is rounded up to whole pages.
    pub fn executable(code: &[u8]) -> io::Result<Self> {
        let len = code.len().max(1).next_multiple_of(page_size());
        let map = Self::anonymous(len)?;
        // SAFETY: `map` is a fresh writable mapping of `len >= code.len()` bytes that nothing
        // else refers to.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), map.as_ptr(), code.len()) };
        // SAFETY: changes the protection of our own mapping only.
        let rc =
            unsafe { libc::mprotect(map.as_ptr().cast(), len, libc::PROT_READ | libc::PROT_EXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(map)
    }

    /// A read+execute page within `reach` bytes of `near` (for code with 32-bit
    /// displacements to `near`, such as an instruction relocated next to its original), its
    /// bytes built by `code(address)` once the address is known (W^X as
    /// [`executable`](Self::executable)). `None` when no free page is close enough.
    pub fn executable_near(
        near: u64,
        reach: u64,
        code: impl FnOnce(u64) -> Vec<u8>,
    ) -> io::Result<Option<Self>> {
        let mut code = Some(code);
        let page = page_size() as u64;
        let base = near & !(page - 1);
        for step in 1..=256u64 {
            for hint in [
                base.checked_sub(step * (8 << 20)),
                base.checked_add(step * (8 << 20)),
            ] {
                let Some(hint) = hint else { continue };
                // SAFETY: a hint, not MAP_FIXED: the kernel never replaces an existing mapping;
                // the result is checked before use.
                let ptr = unsafe {
                    libc::mmap(
                        hint as *mut libc::c_void,
                        page as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                let map = Self::checked(ptr, page as usize)?;
                let at = map.as_ptr() as u64;
                if at.abs_diff(near) + page > reach {
                    continue; // dropped: unmapped
                }
                let bytes = (code.take().expect("called once: returns after"))(at);
                if bytes.len() > page as usize {
                    return Err(invalid("code larger than a page"));
                }
                // SAFETY: a fresh writable mapping of one page that nothing else refers to.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.as_ptr(), bytes.len()) };
                // SAFETY: changes the protection of our own mapping only.
                let rc = unsafe {
                    libc::mprotect(
                        map.as_ptr().cast(),
                        page as usize,
                        libc::PROT_READ | libc::PROT_EXEC,
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                return Ok(Some(map));
            }
        }
        Ok(None)
    }

    /// The kernel's ring-buffer trick, for a ring stored in `fd` at `offset`: `head` bytes
    /// (position pages) then `data` bytes, followed by the same `data` bytes a second time, so
    /// a record that wraps is contiguous in memory. `head`, `data` and `offset` must be page
    /// multiples.
    pub fn ring(fd: BorrowedFd<'_>, offset: u64, head: usize, data: usize) -> io::Result<Self> {
        let page = page_size();
        if !head.is_multiple_of(page)
            || !data.is_multiple_of(page)
            || !offset.is_multiple_of(page as u64)
        {
            return Err(invalid("ring mapping not page aligned"));
        }
        // Reserve the whole range first, so the two views land next to each other; dropping
        // the reservation unmaps whatever was mapped into it.
        let reservation = Self::anonymous_with(head + 2 * data, libc::PROT_NONE)?;
        let base = reservation.as_ptr();
        let views = [
            (0, offset, head + data),
            (head + data, offset + head as u64, data),
        ];
        for (at, file_off, len) in views {
            let file_off =
                libc::off_t::try_from(file_off).map_err(|_| invalid("mmap offset too large"))?;
            // SAFETY: MAP_FIXED over part of the reservation this function owns; nothing else
            // refers to those addresses.
            let ptr = unsafe {
                libc::mmap(
                    base.add(at).cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    file_off,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(reservation)
    }

    fn anonymous_with(len: usize, prot: libc::c_int) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping aliases nothing; checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Self::checked(ptr, len)
    }

    fn checked(ptr: *mut libc::c_void, len: usize) -> io::Result<Self> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Self { ptr, len })
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The first byte of the mapping, never null.
    pub fn as_non_null(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes (for `executable`, rounded up to pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a zero-length mapping fails to map.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the mapping for the rest of the process (code that may still run on other
    /// threads, counters written by handlers of an earlier session).
    pub fn leak(self) -> NonNull<u8> {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value mapped; its owner guarantees no
        // reference into it outlives the value (the reason `leak` exists).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn cpu_lists_count_up_to_the_highest_cpu() {
        assert_eq!(parse_cpu_list_count("0-3\n"), Some(4));
        assert_eq!(parse_cpu_list_count("0"), Some(1));
        assert_eq!(parse_cpu_list_count("0-3,5,7-8"), Some(9));
        assert_eq!(parse_cpu_list_count("x"), None);
        assert!(possible_cpus() >= 1);
    }

    #[test]
    fn kernel_versions_and_config_lines_parse_as_libbpf_reads_them() {
        assert_eq!(version_code("6.18.3-amd64\n"), (6 << 16) + (18 << 8) + 3);
        assert_eq!(version_code("4.19.300"), (4 << 16) + (19 << 8) + 255);
        assert_eq!(version_code("6.1"), (6 << 16) + (1 << 8));
        let c = parse_kernel_config(
            "# comment\nCONFIG_HZ=250\n# CONFIG_FOO is not set\nCONFIG_S=\"a b\"\n\n",
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c["CONFIG_HZ"], "250");
        assert_eq!(c["CONFIG_S"], "\"a b\"");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(kernel_version_code(), version_code(&release));
        assert_ne!(kernel_version_code(), 0);
    }

    #[test]
    fn executable_code_runs_and_is_not_writable() {
        // mov eax, 42; ret
        let map = Mmap::executable(&[0xb8, 42, 0, 0, 0, 0xc3]).unwrap();
        assert_eq!(map.len(), page_size());
        // SAFETY: the mapping holds a complete function with the C ABI.
        let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(map.as_ptr()) };
        assert_eq!(f(), 42);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", map.as_ptr() as usize);
        let line = maps.lines().find(|l| l.starts_with(&start)).unwrap();
        assert!(line.contains(" r-xp "), "{line}");
    }

    #[test]
    fn a_ring_sees_its_data_twice() {
        let page = page_size();
        let file = tempfile();
        file.set_len((3 * page) as u64).unwrap();
        let ring = Mmap::ring(file.as_fd(), 0, page, 2 * page).unwrap();
        assert_eq!(ring.len(), 5 * page);
        // SAFETY: both offsets are inside the mapping; the second view aliases the first, which
        // is what is being tested, through raw pointers only.
        unsafe {
            ring.as_ptr().add(page).write_volatile(7);
            assert_eq!(ring.as_ptr().add(3 * page).read_volatile(), 7);
            ring.as_ptr().add(5 * page - 1).write_volatile(9);
            assert_eq!(ring.as_ptr().add(3 * page - 1).read_volatile(), 9);
        }
        assert!(Mmap::ring(file.as_fd(), 0, 1, page).is_err());
    }

    #[test]
    fn shared_mappings_of_one_file_see_each_other() {
        let file = tempfile();
        file.set_len(page_size() as u64).unwrap();
        let a = Mmap::shared(file.as_fd(), page_size(), 0, Access::ReadWrite).unwrap();
        let b = Mmap::shared(file.as_fd(), page_size(), 0, Access::ReadOnly).unwrap();
        // SAFETY: in-bounds accesses of two mappings of the same page.
        unsafe {
            a.as_ptr().add(10).write_volatile(5);
            assert_eq!(b.as_ptr().add(10).read_volatile(), 5);
        }
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "bpftime-abi-os-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
