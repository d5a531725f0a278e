//! Reading and writing the buffers an application passes to `bpf()` and `perf_event_open()`
//! without trusting its pointers: `process_vm_readv`/`process_vm_writev` on this process fail
//! with EFAULT on an address that is not mapped, as the kernel's `copy_from_user` does, where a
//! plain dereference would crash the application.

use crate::raw;

fn transfer(nr: i64, ptr: usize, buf: *mut u8, len: usize) -> Result<(), i64> {
    if len == 0 {
        return Ok(());
    }
    if ptr == 0 {
        return Err(-i64::from(libc::EFAULT));
    }
    let local = libc::iovec {
        iov_base: buf.cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: ptr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: both iovecs are live for the call; `buf` is valid for `len` bytes (the callers'
    // own buffers); the remote side is checked by the kernel.
    let r = unsafe {
        raw::syscall6(
            nr,
            i64::from(std::process::id()),
            &local as *const libc::iovec as i64,
            1,
            &remote as *const libc::iovec as i64,
            1,
            0,
        )
    };
    match r {
        n if n == len as i64 => Ok(()),
        n if n < 0 => Err(n),
        _ => Err(-i64::from(libc::EFAULT)),
    }
}

/// `len` bytes at the application's address `ptr`.
pub(crate) fn read(ptr: usize, len: usize) -> Result<Vec<u8>, i64> {
    let mut buf = vec![0u8; len];
    transfer(libc::SYS_process_vm_readv, ptr, buf.as_mut_ptr(), len)?;
    Ok(buf)
}

/// Writes `data` at the application's address `ptr`.
pub(crate) fn write(ptr: usize, data: &[u8]) -> Result<(), i64> {
    transfer(
        libc::SYS_process_vm_writev,
        ptr,
        data.as_ptr() as *mut u8,
        data.len(),
    )
}

/// A `T` (a plain UAPI struct, all-zero valid) from the first `size` bytes at `ptr`, the rest
/// zero: how the kernel reads a `bpf_attr` or `perf_event_attr` of an older or newer size.
pub(crate) fn read_struct<T: Copy>(ptr: usize, size: usize) -> Result<T, i64> {
    let n = size.min(std::mem::size_of::<T>());
    let bytes = read(ptr, n)?;
    // SAFETY: T is a plain C struct of integers (the callers' bindgen UAPI types) for which all
    // zeroes and any bytes are valid; `bytes` holds at most size_of::<T>() bytes.
    unsafe {
        let mut v: T = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), n);
        Ok(v)
    }
}

/// A NUL-terminated string at `ptr` (at most `max` bytes).
pub(crate) fn read_cstr(ptr: usize, max: usize) -> Result<Vec<u8>, i64> {
    let mut out = Vec::new();
    let mut at = ptr;
    while out.len() < max {
        // Page by page: a string near the end of a mapping must not fault the read.
        let page = 4096 - (at % 4096);
        let chunk = read(at, page.min(max - out.len()))?;
        if let Some(end) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..end]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
        at += chunk.len();
    }
    Err(-i64::from(libc::ENAMETOOLONG))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pointers_fail_with_efault_instead_of_crashing() {
        assert_eq!(read(8, 4), Err(-i64::from(libc::EFAULT)));
        assert_eq!(write(8, &[1]), Err(-i64::from(libc::EFAULT)));
        assert_eq!(read_cstr(0, 16), Err(-i64::from(libc::EFAULT)));
    }

    #[test]
    fn buffers_and_strings_are_copied() {
        let src = *b"path/to/bin\0tail";
        assert_eq!(read(src.as_ptr() as usize, 4).unwrap(), b"path");
        assert_eq!(
            read_cstr(src.as_ptr() as usize, 64).unwrap(),
            b"path/to/bin"
        );
        assert_eq!(
            read_cstr(src.as_ptr() as usize, 4),
            Err(-i64::from(libc::ENAMETOOLONG))
        );
        let mut dst = [0u8; 3];
        write(dst.as_mut_ptr() as usize, &[9, 8, 7]).unwrap();
        assert_eq!(dst, [9, 8, 7]);
    }
}
