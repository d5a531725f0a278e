//! Fault-tolerant access to arbitrary addresses of this process (`bpf_probe_read*`,
//! `bpf_probe_write_user`, `%s` of `bpf_trace_printk`).
//!
//! `process_vm_readv`/`process_vm_writev` on our own pid go through the kernel's page-table
//! walk, so an unmapped or protected address gives `EFAULT` instead of a SIGSEGV, and a write
//! to a read-only mapping fails the way the kernel's `copy_to_user_nofault` does.

use bpftime_abi::HelperId;

use super::{neg, read_arg, write_arg, RuntimeHelpers};
use crate::vm::{CallContext, HelperError};

/// Size of the chunks string reads use: a read never crosses a page boundary, so a string that
/// ends right before an unmapped page is still read.
const PAGE: u64 = 4096;

fn self_pid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Copy `dst.len()` bytes from address `src` of this process into `dst`. `false` if any byte
/// is not readable (`dst` is then unspecified).
pub fn read(src: u64, dst: &mut [u8]) -> bool {
    if dst.is_empty() {
        return true;
    }
    if src.checked_add(dst.len() as u64).is_none() {
        return false;
    }
    let local = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    let remote = libc::iovec {
        iov_base: src as *mut libc::c_void,
        iov_len: dst.len(),
    };
    // SAFETY: `local` describes `dst`, which we own mutably; the kernel validates `remote`
    // (any address, checked by the page-table walk) and never touches our memory beyond
    // `local`.
    let n = unsafe { libc::process_vm_readv(self_pid(), &local, 1, &remote, 1, 0) };
    n == dst.len() as isize
}

/// Copy `src` to address `dst` of this process. `false` if any byte is not writable.
pub fn write(dst: u64, src: &[u8]) -> bool {
    if src.is_empty() {
        return true;
    }
    if dst.checked_add(src.len() as u64).is_none() {
        return false;
    }
    let local = libc::iovec {
        iov_base: src.as_ptr() as *mut libc::c_void,
        iov_len: src.len(),
    };
    let remote = libc::iovec {
        iov_base: dst as *mut libc::c_void,
        iov_len: src.len(),
    };
    // SAFETY: `local` describes `src`, which the kernel only reads; `remote` is validated by
    // the kernel (writes to unmapped or read-only pages fail with EFAULT).
    let n = unsafe { libc::process_vm_writev(self_pid(), &local, 1, &remote, 1, 0) };
    n == src.len() as isize
}

/// Kernel `strncpy_from_*_nofault` into `dst`: copies bytes from `src` up to and including the
/// first NUL, at most `dst.len() - 1` bytes plus a NUL. Returns the length including the NUL,
/// `Some(0)` for an empty `dst`, `None` if a byte before the end is not readable.
pub fn read_str(src: u64, dst: &mut [u8]) -> Option<usize> {
    if dst.is_empty() {
        return Some(0);
    }
    let max = dst.len() - 1;
    let mut done = 0usize;
    // Like the kernel, bytes of `dst` after the NUL are left as they were: read each chunk
    // aside and copy only up to the NUL (programs key maps by zero-initialized buffers).
    let mut chunk = [0u8; 256];
    while done < max {
        let addr = src.checked_add(done as u64)?;
        let in_page = (PAGE - addr % PAGE) as usize;
        let n = in_page.min(max - done).min(chunk.len());
        if !read(addr, &mut chunk[..n]) {
            return None;
        }
        if let Some(z) = chunk[..n].iter().position(|&b| b == 0) {
            dst[done..done + z + 1].copy_from_slice(&chunk[..z + 1]);
            return Some(done + z + 1);
        }
        dst[done..done + n].copy_from_slice(&chunk[..n]);
        done += n;
    }
    dst[max] = 0;
    Some(dst.len())
}

// The helpers themselves. The `_kernel` variants read this process's memory too (there is no
// kernel memory to read from user space).

type Ret = Result<u64, HelperError>;

pub(super) fn probe_read(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    read_helper(HelperId::PROBE_READ, a, ctx)
}

pub(super) fn probe_read_user(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    read_helper(HelperId::PROBE_READ_USER, a, ctx)
}

pub(super) fn probe_read_kernel(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    read_helper(HelperId::PROBE_READ_KERNEL, a, ctx)
}

/// `(dst, size, unsafe_ptr)`: the destination is zeroed when the source is unreadable.
fn read_helper(id: HelperId, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    let dst = write_arg(ctx, id, 1, a[0], a[1] as u32 as usize)?;
    Ok(if read(a[2], dst) {
        0
    } else {
        dst.fill(0);
        neg(libc::EFAULT)
    })
}

pub(super) fn probe_read_str(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    read_str_helper(HelperId::PROBE_READ_STR, a, ctx)
}

pub(super) fn probe_read_user_str(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    read_str_helper(HelperId::PROBE_READ_USER_STR, a, ctx)
}

pub(super) fn probe_read_kernel_str(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    read_str_helper(HelperId::PROBE_READ_KERNEL_STR, a, ctx)
}

/// r0 is the string's length including its NUL.
fn read_str_helper(id: HelperId, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    let dst = write_arg(ctx, id, 1, a[0], a[1] as u32 as usize)?;
    Ok(match read_str(a[2], dst) {
        Some(n) => n as u64,
        None => {
            dst.fill(0);
            neg(libc::EFAULT)
        }
    })
}

pub(super) fn probe_write_user(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let src = read_arg(
        ctx,
        HelperId::PROBE_WRITE_USER,
        2,
        a[1],
        a[2] as u32 as usize,
    )?;
    Ok(if write(a[0], src) {
        0
    } else {
        neg(libc::EFAULT)
    })
}

/// `bpf_copy_from_user(dst, size, user_ptr)` (sleepable programs): as `probe_read_user`, the
/// whole destination zeroed on a fault.
pub(super) fn copy_from_user(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    read_helper(HelperId::COPY_FROM_USER, a, ctx)
}

/// `bpf_strncmp(s1, s1_sz, s2)`: the kernel's `strncmp(s1, s2, s1_sz)` (bytes compared
/// unsigned, up to the first NUL), returning -1, 0 or 1. `s2` is a constant string (the
/// verifier checked it is NUL-terminated in a read-only map value).
pub(super) fn strncmp(_: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    const ID: HelperId = HelperId::STRNCMP;
    let n = a[1] as u32 as usize;
    let s1 = read_arg(ctx, ID, 1, a[0], n)?.to_vec();
    for (i, &c1) in s1.iter().enumerate() {
        let c2 = read_arg(ctx, ID, 3, a[2] + i as u64, 1)?[0];
        if c1 != c2 {
            return Ok(if c1 < c2 { u64::MAX } else { 1 });
        }
        if c1 == 0 {
            break;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_faults() {
        let src = *b"hello\0world";
        let mut dst = [0u8; 11];
        assert!(read(src.as_ptr() as u64, &mut dst));
        assert_eq!(dst, src);
        assert!(!read(8, &mut dst));
        assert!(!read(u64::MAX - 2, &mut dst));
        let mut dst = [0xaau8; 11];
        assert_eq!(read_str(src.as_ptr() as u64, &mut dst), Some(6));
        assert_eq!(&dst[..6], b"hello\0");
        assert!(
            dst[6..].iter().all(|b| *b == 0xaa),
            "bytes after the NUL are untouched"
        );
        let mut small = [0xffu8; 4];
        assert_eq!(read_str(src.as_ptr() as u64, &mut small), Some(4));
        assert_eq!(&small, b"hel\0");
        assert_eq!(read_str(16, &mut small), None);
        let mut out = [0u8; 3];
        assert!(write(out.as_mut_ptr() as u64, b"abc"));
        assert_eq!(&out, b"abc");
        assert!(!write(16, b"abc"));
        // Read-only memory (a string literal in .rodata) cannot be written.
        let ro: &'static [u8] = b"constant";
        assert!(!write(ro.as_ptr() as u64, b"x"));
    }
}
