//! The test override: a thread-local hook that answers this layer's `bpf()` commands instead of
//! the kernel, so error paths (EPERM, E2BIG, a rejecting verifier, a failing program run) get
//! unit tests that run without root.
//!
//! A test installs a hook with [`install`]; it sees each command as a [`Call`] and answers
//! `Err(errno)`, or `Ok` with [`success`]'s reply after filling any output buffers (a value, a
//! log with [`write_log`], a program's return value).
//!
//! The hook belongs to the thread that installed it: commands issued by other threads go to the
//! kernel. A thread that the code under test starts itself (such as the bridge's drain thread)
//! is reached by its name instead, with [`install_for_thread`]. A hook must not issue commands
//! itself.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Call, Reply};

type Hook = Box<dyn FnMut(&mut Call<'_>) -> Result<Reply, i32>>;
type SendHook = Box<dyn FnMut(&mut Call<'_>) -> Result<Reply, i32> + Send>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// The [`install_for_thread`] hooks: guard id, thread name, hook. The newest for a name answers.
static NAMED: Mutex<Vec<(u64, String, SendHook)>> = Mutex::new(Vec::new());
static NEXT_NAMED: AtomicU64 = AtomicU64::new(0);

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

/// Answers, with `hook`, every command of each thread named `name` (as
/// [`std::thread::Builder::name`] set it) that has no [`install`]ed hook of its own, until the
/// returned guard is dropped. For threads the code under test starts itself, which a test cannot
/// reach with [`install`].
///
/// Unlike [`install`]'s, this hook is process-wide: two tests that give it the same thread name
/// must not run at the same time. It runs under a lock shared by all such hooks, so, as for
/// [`install`], it must not issue commands itself (that would deadlock or panic).
#[must_use = "the override ends when the guard is dropped"]
pub fn install_for_thread(
    name: &str,
    hook: impl FnMut(&mut Call<'_>) -> Result<Reply, i32> + Send + 'static,
) -> ThreadOverride {
    let id = NEXT_NAMED.fetch_add(1, Ordering::Relaxed);
    named().push((id, name.to_owned(), Box::new(hook)));
    ThreadOverride { id }
}

/// Keeps an [`install_for_thread`] hook installed.
pub struct ThreadOverride {
    id: u64,
}

impl Drop for ThreadOverride {
    fn drop(&mut self) {
        named().retain(|(id, _, _)| *id != self.id);
    }
}

/// The named hooks; a hook that panicked (a failed assertion in it) leaves them usable.
fn named() -> std::sync::MutexGuard<'static, Vec<(u64, String, SendHook)>> {
    NAMED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    let own = HOOK.with(|h| {
        let mut hook = h
            .try_borrow_mut()
            .expect("the test override issued a bpf() command itself");
        hook.as_mut().map(|hook| hook(call))
    });
    own.or_else(|| {
        let thread = std::thread::current();
        let name = thread.name()?;
        let mut named = named();
        let (_, _, hook) = named.iter_mut().rev().find(|(_, n, _)| n == name)?;
        Some(hook(call))
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
    fn a_named_thread_is_answered_by_its_hook_until_the_guard_is_dropped() {
        let name = sys::object_name("m");
        let args = MapCreate::new(crate::MapType::Array.as_raw(), &name, 4, 4, 1);
        let create_on = |thread: &str| {
            std::thread::scope(|s| {
                std::thread::Builder::new()
                    .name(thread.into())
                    .spawn_scoped(s, move || sys::map_create(&args).map_err(|e| e.errno()))
                    .unwrap()
                    .join()
                    .unwrap()
            })
        };
        let guard = install_for_thread("fake-named-test", |call: &mut Call<'_>| match call {
            Call::MapCreate(_) => Err(libc::ENOSPC),
            other => Ok(success(other)),
        });
        assert_eq!(create_on("fake-named-test").unwrap_err(), libc::ENOSPC);
        // Another name, and this thread (its own hook first, then none), never see it.
        assert_ne!(create_on("fake-other-name").err(), Some(libc::ENOSPC));
        {
            let _own = install(|call: &mut Call<'_>| Ok(success(call)));
            assert!(sys::map_create(&args).is_ok());
        }
        assert_ne!(
            sys::map_create(&args).err().map(|e| e.errno()),
            Some(libc::ENOSPC)
        );
        drop(guard);
        assert_ne!(create_on("fake-named-test").err(), Some(libc::ENOSPC));
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
