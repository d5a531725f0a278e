//! `JitHook`: the machine-code entry running a leaf program in per-slot sessions. It must run
//! the program like `ProgramRunner::run`, send a slot's first call to `slow`, refuse programs
//! whose helpers keep per-run state, and leave xmm0-7 untouched (a hook engine calling it saves
//! none), also when the program calls native map functions.

mod helpers_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bpftime_runtime::helpers::RuntimeHelpers;
use bpftime_runtime::loaded::{ProgramRunner, RunnableProgram};
use bpftime_runtime::maps::MapType;
use bpftime_runtime::vm::jit::JitHook;
use bpftime_runtime::vm::{Program, VmKind};
use helpers_common::*;

// Calls `f(a, b, c)` with xmm0-7 loaded from `xin` (8 x 16 bytes) and stores xmm0-7 after the
// call into `xout`: shows whether `f` preserved them.
core::arch::global_asm!(
    ".text",
    ".globl bpftime_test_call_with_xmm",
    ".type bpftime_test_call_with_xmm,@function",
    "bpftime_test_call_with_xmm:",
    // rdi = f, rsi = a, rdx = b, rcx = c, r8 = xin, r9 = xout
    "push rbx",
    "push r12",
    "push r13",
    "mov rbx, r9",
    "movdqu xmm0, [r8]",
    "movdqu xmm1, [r8+16]",
    "movdqu xmm2, [r8+32]",
    "movdqu xmm3, [r8+48]",
    "movdqu xmm4, [r8+64]",
    "movdqu xmm5, [r8+80]",
    "movdqu xmm6, [r8+96]",
    "movdqu xmm7, [r8+112]",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "mov rdx, rcx",
    "call rax",
    "movdqu [rbx], xmm0",
    "movdqu [rbx+16], xmm1",
    "movdqu [rbx+32], xmm2",
    "movdqu [rbx+48], xmm3",
    "movdqu [rbx+64], xmm4",
    "movdqu [rbx+80], xmm5",
    "movdqu [rbx+96], xmm6",
    "movdqu [rbx+112], xmm7",
    "pop r13",
    "pop r12",
    "pop rbx",
    "ret",
    ".size bpftime_test_call_with_xmm, .-bpftime_test_call_with_xmm",
);

type EntryFn = unsafe extern "C" fn(*const (), *mut u8, usize) -> u64;

extern "C" {
    fn bpftime_test_call_with_xmm(
        f: EntryFn,
        a: *const (),
        b: *mut u8,
        c: usize,
        xin: *const u8,
        xout: *mut u8,
    ) -> u64;
}

/// What the hook's callbacks see.
struct Harness {
    program: RunnableProgram,
    runners: Vec<std::cell::UnsafeCell<Option<Box<ProgramRunner>>>>,
    hook: Option<Box<JitHook>>,
    /// The test's object (outlives the harness).
    obj: *const bpftime_runtime::maps::ShmObject,
    slow_calls: AtomicU64,
    after_calls: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

unsafe extern "C" fn slow(data: *const (), ctx: *mut u8, slot: usize) -> u64 {
    // SAFETY: `data` is the test's harness; `ctx` points at its 16-byte context.
    let (h, ctx) = unsafe {
        (
            &*(data as *const Harness),
            std::slice::from_raw_parts_mut(ctx, 16),
        )
    };
    h.slow_calls.fetch_add(1, Ordering::Relaxed);
    // SAFETY: one test thread uses the harness.
    let cell = unsafe { &mut *h.runners[slot].get() };
    let runner = cell.get_or_insert_with(|| {
        Box::new(ProgramRunner::new(
            &h.program,
            // SAFETY: the object outlives the harness.
            RuntimeHelpers::from_object(unsafe { &*h.obj }),
        ))
    });
    // SAFETY: the runner stays boxed in the harness for the hook's life; one thread.
    assert!(unsafe { runner.register_hook_slot(h.hook.as_ref().unwrap(), slot) });
    runner.run(ctx).unwrap();
    0
}

unsafe extern "C" fn after(data: *const (), slot: usize, r0: u64) -> u64 {
    // SAFETY: as in `slow`.
    let h = unsafe { &*(data as *const Harness) };
    h.after_calls.fetch_add(1, Ordering::Relaxed);
    // SAFETY: one test thread uses the harness; the slot's runner made the run.
    if let Some(runner) = unsafe { &mut *h.runners[slot].get() } {
        // SAFETY: right after the entry's run of this runner's session.
        let outcome = unsafe { runner.finish_hook_run(r0) };
        *h.last_error.lock().unwrap() = outcome.err().map(|e| e.to_string());
    }
    0
}

impl Harness {
    /// A harness running `program` on our JIT with `slots` thread slots and helpers on `obj`,
    /// with its hook entry (if the program gets one; see `JitHook::new`).
    fn new(
        program: Arc<Program>,
        obj: &bpftime_runtime::maps::ShmObject,
        slots: usize,
        no_run_reset: bool,
    ) -> Box<Self> {
        let mut harness = Box::new(Harness {
            program: runnable(program, VmKind::Jit),
            runners: (0..slots).map(|_| Default::default()).collect(),
            hook: None,
            obj,
            slow_calls: AtomicU64::new(0),
            after_calls: AtomicU64::new(0),
            last_error: Default::default(),
        });
        let data = &*harness as *const Harness as *const ();
        let image = harness.program.program.jit().unwrap();
        // SAFETY: the image lives in the harness's program, and the harness (the callbacks'
        // data) lives as long as its hook; `no_run_reset` is the caller's to vouch for.
        let hook = unsafe { JitHook::new(image, slots, 16, slow, after, data, no_run_reset) };
        harness.hook = hook;
        harness
    }

    /// The hook's entry's first argument.
    fn hook_ptr(&self) -> *const () {
        &**self.hook.as_ref().expect("a hook entry") as *const JitHook as *const ()
    }
}

/// Runs the hook's entry `calls` times on slot 1 with ctx[0..8] = the call number and xmm0-7
/// loaded with a pattern (from `seed`); each call must return 0 and leave xmm0-7 as they were.
fn run_keeping_xmm(harness: &Harness, calls: u64, seed: u8) {
    let (hook_ptr, entry) = (harness.hook_ptr(), JitHook::entry());
    let xin: Vec<u8> = (0..128u8)
        .map(|b| b.wrapping_mul(seed).wrapping_add(11))
        .collect();
    for i in 0..calls {
        let mut ctx = [0u8; 16];
        ctx[..8].copy_from_slice(&i.to_le_bytes());
        let mut xout = [0u8; 128];
        // SAFETY: the entry with its hook, a 16-byte context and slot 1 (the harnesses have 4).
        let r = unsafe {
            bpftime_test_call_with_xmm(
                entry,
                hook_ptr,
                ctx.as_mut_ptr(),
                1,
                xin.as_ptr(),
                xout.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        assert_eq!(&xout[..], &xin[..], "xmm0-7 changed by call {i}");
    }
}

#[test]
fn leaf_program_runs_through_the_entry_and_keeps_vector_registers() {
    let e = Env::new(
        "jit-hook",
        true,
        &[
            def("a", MapType::Array, 4, 8, 1),
            def("h", MapType::Hash, 8, 8, 64),
        ],
    );
    // a[0] += 1 (inline lookup); h[ctx[0] % 64] = ctx[0] (update: a call into native code)
    let p = e.load(
        "mov %r6, %r1\nmov %r1, 0\nstxw [%r10-4], %r1\nmov %r2, %r10\nadd %r2, -4\n\
         ldmap %r1, 0\ncall 1\njeq %r0, 0, upd\nmov %r1, 1\nlock add [%r0], %r1\n\
         upd:\nldxdw %r1, [%r6]\nmod %r1, 64\nstxdw [%r10-16], %r1\nldxdw %r1, [%r6]\n\
         stxdw [%r10-24], %r1\nmov %r2, %r10\nadd %r2, -16\nmov %r3, %r10\nadd %r3, -24\n\
         mov %r4, 0\nldmap %r1, 1\ncall 2\nmov %r0, 0\nexit",
    );
    let harness = Harness::new(p, &e.obj, 4, false);
    assert!(harness.hook.as_ref().unwrap().preserves_vector_regs());
    run_keeping_xmm(&harness, 200, 37);
    let (hook_ptr, entry) = (harness.hook_ptr(), JitHook::entry());
    assert_eq!(
        harness.slow_calls.load(Ordering::Relaxed),
        1,
        "first call only"
    );
    assert_eq!(harness.after_calls.load(Ordering::Relaxed), 0);
    assert_eq!(value_u64(&e.obj, "a", &0u32.to_le_bytes()), 200);
    for k in 0..64u64 {
        let last = (0..200u64).filter(|i| i % 64 == k).max().unwrap();
        assert_eq!(value_u64(&e.obj, "h", &k.to_le_bytes()), last);
    }
    // slot out of range: the slow path, never a table overrun
    let mut ctx = [0u8; 16];
    // SAFETY: as above; the slow callback indexes `runners` with slot 2.
    unsafe { entry(hook_ptr, ctx.as_mut_ptr(), 2) };
    assert_eq!(harness.slow_calls.load(Ordering::Relaxed), 2);
}

/// 64-byte values: the native update copies them with a memcpy of runtime length and the
/// lookup hands out their address; xmm0-7 still come back unchanged.
#[test]
fn wide_values_through_native_map_calls_keep_vector_registers() {
    let e = Env::new("jit-hook-wide", true, &[def("h", MapType::Hash, 8, 64, 64)]);
    // h[ctx[0] % 64] = eight copies of ctx[0]; then look it up again.
    let mut asm =
        String::from("mov %r6, %r1\nldxdw %r1, [%r6]\nmod %r1, 64\nstxdw [%r10-8], %r1\n");
    asm.push_str("ldxdw %r1, [%r6]\n");
    for k in 0..8 {
        asm.push_str(&format!("stxdw [%r10-{}], %r1\n", 72 - 8 * k));
    }
    asm.push_str(
        "mov %r2, %r10\nadd %r2, -8\nmov %r3, %r10\nadd %r3, -72\nmov %r4, 0\nldmap %r1, 0\n\
         call 2\nmov %r2, %r10\nadd %r2, -8\nldmap %r1, 0\ncall 1\nmov %r0, 0\nexit",
    );
    let harness = Harness::new(e.load(&asm), &e.obj, 4, false);
    assert!(harness.hook.as_ref().unwrap().preserves_vector_regs());
    run_keeping_xmm(&harness, 200, 91);
    assert_eq!(harness.after_calls.load(Ordering::Relaxed), 0);
    for k in 0..64u64 {
        let last = (0..200u64).filter(|i| i % 64 == k).max().unwrap();
        let v = e
            .obj
            .map("h")
            .unwrap()
            .get(&k.to_le_bytes())
            .unwrap()
            .unwrap();
        let want: Vec<u8> = (0..8).flat_map(|_| last.to_le_bytes()).collect();
        assert_eq!(
            v,
            bpftime_runtime::maps::EntryValue::Single(want),
            "key {k}"
        );
    }
}

#[test]
fn hook_entries_only_for_programs_without_per_run_helper_state() {
    use bpftime_runtime::helpers::needs_no_run_reset;
    use bpftime_runtime::vm::insn::Insn;
    let exit = Insn::new(0x95, 0, 0, 0, 0);
    let call = |id: i32| Insn::new(0x85, 0, 0, 0, id);
    let hook_for = |insns: Vec<Insn>| {
        let p = Program::new(insns).expect("valid program");
        let no_reset = needs_no_run_reset(&p);
        // SAFETY: never called.
        let hook = unsafe {
            JitHook::new(
                p.jit().unwrap(),
                1,
                16,
                slow,
                after,
                std::ptr::null(),
                no_reset,
            )
        };
        (no_reset, hook.map(|h| h.preserves_vector_regs()))
    };
    // helpers keeping per-run state: tail call, override_return, ringbuf reserve/submit/discard
    for id in [12, 58, 131, 132, 133] {
        assert_eq!(hook_for(vec![call(id), exit]), (false, None), "helper {id}");
    }
    // callx may reach any helper
    let callx = vec![
        Insn::new(0xb7, 1, 0, 0, 1),
        Insn::new(0x8d, 1, 0, 0, 0),
        exit,
    ];
    assert_eq!(hook_for(callx), (false, None));
    // other helpers: an entry, but the caller must save the vector registers
    assert_eq!(hook_for(vec![call(5), call(14), exit]), (true, Some(false)));
    // map helpers only (a leaf): an entry that keeps them itself
    assert_eq!(
        hook_for(vec![Insn::new(0xb7, 0, 0, 0, 0), exit]),
        (true, Some(true))
    );
}

#[test]
fn program_calling_other_helpers_runs_through_the_entry() {
    let e = Env::new(
        "jit-hook-helpers",
        true,
        &[def("a", MapType::Array, 4, 8, 1)],
    );
    // a[0] = bpf_ktime_get_ns(); return 0
    let p = e.load(
        "call 5\nstxdw [%r10-16], %r0\nmov %r1, 0\nstxw [%r10-4], %r1\nmov %r2, %r10\n\
         add %r2, -4\nmov %r3, %r10\nadd %r3, -16\nmov %r4, 0\nldmap %r1, 0\ncall 2\n\
         mov %r0, 0\nexit",
    );
    assert!(bpftime_runtime::helpers::needs_no_run_reset(&p));
    // ktime keeps no per-run state
    let harness = Harness::new(p, &e.obj, 2, true);
    assert!(!harness.hook.as_ref().unwrap().preserves_vector_regs());
    let hook_ptr = harness.hook_ptr();
    let mut last = 0;
    for _ in 0..50 {
        let mut ctx = [0u8; 16];
        let r0 = {
            // SAFETY: the entry with its hook, a 16-byte context and slot 0.
            unsafe { JitHook::entry()(hook_ptr, ctx.as_mut_ptr(), 0) }
        };
        assert_eq!(r0, 0);
        let t = value_u64(&e.obj, "a", &0u32.to_le_bytes());
        assert!(t > last, "a fresh timestamp on every run");
        last = t;
    }
    assert_eq!(harness.slow_calls.load(Ordering::Relaxed), 1);
    assert_eq!(harness.after_calls.load(Ordering::Relaxed), 0);
}

#[test]
fn a_failing_run_goes_to_after_and_the_next_runs_go_on() {
    let e = Env::new("jit-hook-after", true, &[def("a", MapType::Array, 4, 8, 1)]);
    // ctx[0] != 0: a map lookup with a bad map argument (the run fails); else a[0] += 1
    let p = e.load(
        "ldxdw %r2, [%r1]\njeq %r2, 0, ok\nmov %r1, 12345\nmov %r2, %r10\nadd %r2, -8\n\
         call 1\nexit\nok:\nmov %r1, 0\nstxw [%r10-4], %r1\nmov %r2, %r10\nadd %r2, -4\n\
         ldmap %r1, 0\ncall 1\njeq %r0, 0, out\nmov %r1, 1\nlock add [%r0], %r1\nout:\n\
         mov %r0, 0\nexit",
    );
    let harness = Harness::new(p, &e.obj, 1, false);
    let hook_ptr = harness.hook_ptr();
    let run = |fail: u64| {
        let mut ctx = [0u8; 16];
        ctx[..8].copy_from_slice(&fail.to_le_bytes());
        // SAFETY: the entry with its hook, a 16-byte context and slot 0.
        unsafe { JitHook::entry()(hook_ptr, ctx.as_mut_ptr(), 0) }
    };
    run(0); // the slot's first run: `slow` sets it up
    for round in 1..=3u64 {
        run(1);
        assert_eq!(harness.after_calls.load(Ordering::Relaxed), round);
        let err = harness.last_error.lock().unwrap().take();
        assert!(err.as_deref().is_some_and(|e| e.contains("map")), "{err:?}");
        run(0);
        run(0);
        assert_eq!(
            harness.after_calls.load(Ordering::Relaxed),
            round,
            "good runs: no after"
        );
    }
    assert_eq!(value_u64(&e.obj, "a", &0u32.to_le_bytes()), 7);
    assert_eq!(harness.slow_calls.load(Ordering::Relaxed), 1);
}
