//! The test override: a thread-local hook that answers this layer's `bpf()` commands instead of
//! the kernel, so error paths (EPERM, E2BIG, a rejecting verifier, a failing program run) get
//! unit tests that run without root.
//!
//! A test installs a hook with [`install`]; it sees each command as a [`Call`] and answers
//! `Err(errno)`, or `Ok` with [`success`]'s reply after filling any output buffers (a value, a
//! log with [`write_log`], a program's return value).
//!
//! The hook belongs to the thread that installed it: commands issued by other threads (such as
//! the bridge's drain thread) go to the kernel. It must not issue commands itself.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::OwnedFd;

use super::{Call, Reply};

type Hook = Box<dyn FnMut(&mut Call<'_>) -> Result<Reply, i32>>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Answers every command of this thread with `hook` (`Err(errno)` for a failure) until the
/// returned guard is dropped; the previous hook, if any, is then back.
#[must_use = "the override ends when the guard is dropped"]
pub fn install(hook: impl FnMut(&mut Call<'_>) -> Result<Reply, i32> + 'static) -> Override {
    let previous = HOOK.with(|h| h.borrow_mut().replace(Box::new(hook)));
    Override { previous }
}

/// Keeps a test override installed; see [`install`].
pub struct Override {
    previous: Option<Hook>,
}

impl Drop for Override {
    fn drop(&mut self) {
        let previous = self.previous.take();
        HOOK.with(|h| *h.borrow_mut() = previous);
    }
}

/// The plain success of `call`: a fresh [`dummy_fd`] for the commands that return an fd,
/// [`Reply::Done`] (output buffers left as they are) for the others.
pub fn success(call: &Call<'_>) -> Reply {
    match call {
        Call::MapCreate(_) | Call::ObjGet { .. } | Call::BtfLoad { .. } | Call::ProgLoad { .. } => {
            Reply::Fd(dummy_fd())
        }
        _ => Reply::Done,
    }
}

/// An fd the test owns and that no kernel object is behind (`/dev/null`), to stand for a map,
/// a program or BTF.
pub fn dummy_fd() -> OwnedFd {
    File::open("/dev/null")
        .expect("opening /dev/null for a fake fd")
        .into()
}

/// Writes `text` into a log buffer as the kernel does: NUL-terminated, truncated to fit.
pub fn write_log(log: &mut [u8], text: &str) {
    if log.is_empty() {
        return;
    }
    let n = text.len().min(log.len() - 1);
    log[..n].copy_from_slice(&text.as_bytes()[..n]);
    log[n] = 0;
}

pub(super) fn intercept(call: &mut Call<'_>) -> Option<Result<Reply, i32>> {
    HOOK.with(|h| {
        let mut hook = h
            .try_borrow_mut()
            .expect("the test override issued a bpf() command itself");
        hook.as_mut().map(|hook| hook(call))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{self, MapCreate};

    #[test]
    fn the_hook_answers_until_its_guard_is_dropped() {
        let name = sys::object_name("m");
        let args = MapCreate::new(crate::MapType::Array.as_raw(), &name, 4, 4, 1);
        {
            let _fake = install(|call: &mut Call<'_>| match call {
                Call::MapCreate(_) => Err(libc::E2BIG),
                other => Ok(success(other)),
            });
            let err = sys::map_create(&args).unwrap_err();
            assert_eq!((err.call, err.errno()), ("BPF_MAP_CREATE", libc::E2BIG));
            let nested = install(|call: &mut Call<'_>| Ok(success(call)));
            assert!(sys::map_create(&args).is_ok());
            drop(nested);
            assert!(sys::map_create(&args).is_err());
        }
        // Without a hook, the command reaches the kernel (or fails there without root), never
        // the hook above: its E2BIG cannot come back.
        if let Err(e) = sys::map_create(&args) {
            assert_ne!(e.errno(), libc::E2BIG);
        }
    }

    #[test]
    fn output_buffers_are_the_hooks_to_fill() {
        let _fake = install(|call: &mut Call<'_>| {
            match call {
                Call::ProgTestRun { result, .. } => result.retval = 7,
                Call::MapLookupElem { value, .. } => value.copy_from_slice(&[1, 2]),
                _ => {}
            }
            Ok(success(call))
        });
        let fd = dummy_fd();
        let run = sys::prog_test_run(std::os::fd::AsFd::as_fd(&fd), &[0; 8]).unwrap();
        assert_eq!(run.retval, 7);
        let mut value = [0u8; 2];
        sys::map_lookup_elem(std::os::fd::AsFd::as_fd(&fd), &[0; 4], &mut value, 0).unwrap();
        assert_eq!(value, [1, 2]);
        let mut log = [0xffu8; 4];
        write_log(&mut log, "abcdef");
        assert_eq!(sys::log_text(&log), "abc");
    }
}
