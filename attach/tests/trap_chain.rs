//! The int3 fallback beside a process's own SIGTRAP handler (its own binary: it installs
//! process-wide signal handlers). Installed before the first int3 site, the process's
//! handler gets the traps that are not ours; installed after, through `signal`, it does not
//! replace ours (the `sigaction` guard) and still gets them.

mod common;

use bpftime_attach::{resolve, EntryAction, HookSet, ProbeHandler, ProbeKind, PtRegs};
use common::{sym, target};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

static BEFORE: AtomicU64 = AtomicU64::new(0);
static AFTER: AtomicU64 = AtomicU64::new(0);

extern "C" fn before(_: libc::c_int) {
    BEFORE.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn after(_: libc::c_int) {
    AFTER.fetch_add(1, Ordering::Relaxed);
}

#[derive(Default)]
struct Count(AtomicU64);

impl ProbeHandler for Count {
    fn on_entry(&self, _regs: &mut PtRegs) -> EntryAction {
        self.0.fetch_add(1, Ordering::Relaxed);
        EntryAction::Continue
    }
}

#[test]
fn the_processs_sigtrap_handlers_get_the_traps_that_are_not_ours() {
    type F = extern "C" fn(i32) -> i32;
    let tiny: F = sym("tiny");
    // SAFETY: handlers that only bump atomics.
    unsafe { libc::signal(libc::SIGTRAP, before as *const () as libc::sighandler_t) };
    let t = resolve(&target("tiny")).unwrap();
    let c = Arc::new(Count::default());
    let mut set = HookSet::new();
    set.install(&t, ProbeKind::Uprobe, c.clone()).unwrap();
    assert_eq!(bpftime_attach::site_mechanism(t.address), Some("int3"));
    assert_eq!(tiny(4), 4);
    assert_eq!(c.0.load(Ordering::Relaxed), 1);
    // SAFETY: raising a signal whose handler is installed.
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(
        BEFORE.load(Ordering::Relaxed),
        1,
        "the earlier handler got the foreign trap"
    );

    // A handler installed now does not take our traps, and gets the foreign ones.
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGTRAP, after as *const () as libc::sighandler_t) };
    assert_eq!(tiny(5), 5, "the int3 site still works");
    assert_eq!(c.0.load(Ordering::Relaxed), 2);
    // SAFETY: as above.
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(
        AFTER.load(Ordering::Relaxed),
        1,
        "the later handler got the foreign trap"
    );
    assert_eq!(BEFORE.load(Ordering::Relaxed), 1);
}
