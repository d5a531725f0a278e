//! System calls issued directly (the `syscall` instruction), bypassing libc: the shim exports
//! `syscall`, `close`, `mmap`, ... itself, so calling libc's wrappers from inside the shim would
//! come back here. Results are the kernel's: a value, or `-errno`.

use std::arch::asm;

/// One system call with up to six arguments; returns the kernel's result (`-errno` on error).
///
/// # Safety
/// As the system call `nr` requires of its arguments (pointers valid for what it reads and
/// writes).
#[inline]
pub unsafe fn syscall6(nr: i64, a1: i64, a2: i64, a3: i64, a4: i64, a5: i64, a6: i64) -> i64 {
    let ret: i64;
    // SAFETY: the x86-64 Linux system call convention: number in rax, arguments in rdi, rsi,
    // rdx, r10, r8, r9; the kernel clobbers rcx and r11. What the call does with the arguments
    // is the caller's contract.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            in("r8") a5,
            in("r9") a6,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `syscall6` with three arguments.
///
/// # Safety
/// As [`syscall6`].
#[inline]
pub unsafe fn syscall3(nr: i64, a1: i64, a2: i64, a3: i64) -> i64 {
    // SAFETY: the caller's contract.
    unsafe { syscall6(nr, a1, a2, a3, 0, 0, 0) }
}

/// `mmap(2)`, not through libc: the address, or `-errno`.
///
/// # Safety
/// As `mmap(2)` (`MAP_FIXED` replaces whatever is mapped at `addr`).
pub unsafe fn mmap(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, offset: i64) -> i64 {
    // SAFETY: the caller's contract.
    unsafe {
        syscall6(
            libc::SYS_mmap,
            addr as i64,
            len as i64,
            prot.into(),
            flags.into(),
            fd.into(),
            offset,
        )
    }
}

/// `close(fd)`, not through libc.
pub fn close(fd: i32) -> i64 {
    // SAFETY: close takes no pointer.
    unsafe { syscall3(libc::SYS_close, i64::from(fd), 0, 0) }
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`, not through libc: a private duplicate the application
/// cannot close by number by accident (it is at or above `min`).
pub fn dup_private(fd: i32, min: i32) -> i64 {
    // SAFETY: fcntl with F_DUPFD_CLOEXEC takes no pointer.
    unsafe {
        syscall3(
            libc::SYS_fcntl,
            i64::from(fd),
            i64::from(libc::F_DUPFD_CLOEXEC),
            i64::from(min),
        )
    }
}

/// `eventfd2(0, EFD_CLOEXEC | EFD_NONBLOCK)`, not through libc: the real descriptor the shim
/// hands an application for an object that has no kernel counterpart (a uprobe event, a link,
/// a ring's readiness).
pub fn eventfd(cloexec: bool) -> i64 {
    let flags = libc::EFD_NONBLOCK | if cloexec { libc::EFD_CLOEXEC } else { 0 };
    // SAFETY: eventfd2 takes no pointer.
    unsafe { syscall3(libc::SYS_eventfd2, 0, i64::from(flags), 0) }
}

/// `write(fd, &1u64, 8)` on an eventfd: makes it readable.
pub fn eventfd_signal(fd: i32) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64.
    unsafe {
        syscall3(libc::SYS_write, i64::from(fd), &one as *const u64 as i64, 8);
    }
}

/// `read(fd, &mut u64, 8)` on an eventfd: clears it (non-blocking).
pub fn eventfd_clear(fd: i32) {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64.
    unsafe {
        syscall3(libc::SYS_read, i64::from(fd), &mut v as *mut u64 as i64, 8);
    }
}
