//! The run-time environment of generated code: [`JitEnv`] (what r12 points at), the status
//! codes the code leaves in it, the helper trampoline, running an image ([`JitProgram::run`],
//! tail calls, errors) and [`JitSession`]s that keep an environment across runs.

use std::sync::Arc;

use super::super::error::{HelperError, VmError};
use super::super::helpers::{CallContext, FuncInvoker, Helpers};
use super::super::memory::MemoryMap;
use super::super::program::{
    Program, FUNC_PTR_MASK, FUNC_PTR_TAG, MAX_CALL_FRAMES, MAX_TAIL_CALLS,
};
use super::JitProgram;

// Status codes written to `JitEnv::status`.
const ST_OK: u32 = 0;
pub(super) const ST_HELPER_ERR: u32 = 1;
const ST_TAIL_CALL: u32 = 2;
pub(super) const ST_DEPTH: u32 = 3;
pub(super) const ST_BAD_CALLX: u32 = 4;

// Offsets of the fields of `JitEnv` the generated code touches.
pub(super) const ENV_SAVED_RSP: i32 = 0;
pub(super) const ENV_STATUS: i32 = 8;
pub(super) const ENV_PC: i32 = 12;
pub(super) const ENV_HELPER_ID: i32 = 16;
pub(super) const ENV_DEPTH: i32 = 20;
pub(super) const ENV_AUX: i32 = 24;
pub(super) const ENV_ENTRY: i32 = 32;
pub(super) const ENV_FAST: i32 = 40;

const _: () = {
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, saved_rsp) == ENV_SAVED_RSP as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, status) == ENV_STATUS as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, pc) == ENV_PC as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, helper_id) == ENV_HELPER_ID as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, depth) == ENV_DEPTH as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, aux) == ENV_AUX as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, entry) == ENV_ENTRY as usize);
    assert!(std::mem::offset_of!(JitEnv<'static, 'static>, fast) == ENV_FAST as usize);
};

/// State shared between the generated code and the helper trampoline.
#[repr(C)]
pub(super) struct JitEnv<'h, 'm> {
    saved_rsp: u64,
    pub(super) status: u32,
    pub(super) pc: u32,
    helper_id: u32,
    depth: u32,
    aux: u64,
    /// Native address of the function the outer entry calls (the program, or a callback).
    entry: u64,
    /// Nonzero when the running helpers name the maps the image's fast paths were compiled
    /// against (see the JIT's module docs); the fast paths test it before anything else.
    fast: u64,
    /// The image running (for callbacks: its function table).
    jit: *const JitProgram,
    helpers: *mut (dyn Helpers + 'h),
    mem: *mut MemoryMap<'m>,
    pub(super) error: Option<VmError>,
    tail: Option<(Arc<Program>, u64)>,
}

type EntryFn = unsafe extern "C" fn(u64, u64, u64, u64, u64, *mut JitEnv<'_, '_>) -> u64;

impl JitProgram {
    /// Whether the fast paths may run with helpers whose [`Helpers::map_set_id`] is `map_set`.
    #[inline]
    fn fast_for(&self, map_set: Option<u64>) -> u64 {
        u64::from(self.map_set.is_some() && self.map_set == map_set)
    }

    /// Run the compiled code with r1..r5 = `args`; helpers reach `helpers` and `mem` through
    /// the trampoline. Tail calls requested by a helper run the target's JIT image.
    ///
    /// # Safety
    /// Memory accesses are not checked: the program must only touch memory that is valid for
    /// the whole run (verified by the kernel verifier, or known to use only its stack and
    /// buffers that stay alive, like the conformance suite's `-- mem`).
    pub unsafe fn run(
        &self,
        args: [u64; 5],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError> {
        let map_set = helpers.map_set_id();
        // SAFETY: the caller's contract.
        unsafe { self.run_with_map_set(args, mem, helpers, map_set) }
    }

    /// [`run`](Self::run) for a caller that knows `helpers.map_set_id()` already (saves a
    /// dynamic call per run).
    ///
    /// # Safety
    /// As [`run`](Self::run); `map_set` must be `helpers.map_set_id()`.
    #[inline]
    pub unsafe fn run_with_map_set(
        &self,
        args: [u64; 5],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
        map_set: Option<u64>,
    ) -> Result<u64, VmError> {
        let mut env = self.fresh_env(
            map_set,
            helpers as *mut (dyn Helpers + '_),
            mem as *mut MemoryMap<'_>,
        );
        // SAFETY: the caller upholds the memory contract; `env` outlives the call.
        let r = unsafe { self.enter(args, &mut env) };
        if env.status == ST_OK {
            return Ok(r);
        }
        // SAFETY: as above.
        unsafe { Self::finish(env, r, map_set) }
    }

    /// The environment of a run starting in this image's main function.
    #[inline(always)]
    fn fresh_env<'h, 'm>(
        &self,
        map_set: Option<u64>,
        helpers: *mut (dyn Helpers + 'h),
        mem: *mut MemoryMap<'m>,
    ) -> JitEnv<'h, 'm> {
        JitEnv {
            saved_rsp: 0,
            status: ST_OK,
            pc: 0,
            helper_id: 0,
            depth: 0,
            aux: 0,
            entry: self.func_table[0],
            fast: self.fast_for(map_set),
            jit: self,
            helpers,
            mem,
            error: None,
            tail: None,
        }
    }

    /// A run that did not simply return: tail calls (run here) and errors.
    ///
    /// # Safety
    /// As [`run`](Self::run), for the `env` of that run.
    #[cold]
    #[inline(never)]
    unsafe fn finish(
        mut env: JitEnv<'_, '_>,
        r: u64,
        map_set: Option<u64>,
    ) -> Result<u64, VmError> {
        // SAFETY: forwarded.
        unsafe { Self::finish_in_place(&mut env, r, map_set) }
    }

    /// [`finish`](Self::finish) on an environment that stays in place (a [`JitSession`]'s).
    /// Leaves `env.entry`, `env.fast` and `env.jit` naming the last tail-called image.
    ///
    /// # Safety
    /// As [`finish`](Self::finish).
    unsafe fn finish_in_place(
        env: &mut JitEnv<'_, '_>,
        mut r: u64,
        map_set: Option<u64>,
    ) -> Result<u64, VmError> {
        let mut holder: Arc<Program>;
        let mut tail_calls = 0;
        loop {
            if env.status == ST_TAIL_CALL {
                let (next, r1) = env.tail.take().expect("tail call target");
                tail_calls += 1;
                if tail_calls > MAX_TAIL_CALLS {
                    return Err(VmError::TailCallLimit(MAX_TAIL_CALLS));
                }
                holder = next;
                let jit = holder.jit()?;
                env.status = ST_OK;
                env.depth = 0;
                env.entry = jit.func_table[0];
                env.fast = jit.fast_for(map_set);
                env.jit = jit;
                // SAFETY: as above; the tail-called program is under the same contract.
                r = unsafe { jit.enter([r1, 0, 0, 0, 0], env) };
                continue;
            }
            return take_outcome(env, r);
        }
    }

    /// # Safety
    /// See [`JitProgram::run`].
    #[inline(always)]
    unsafe fn enter(&self, args: [u64; 5], env: *mut JitEnv<'_, '_>) -> u64 {
        // SAFETY: `code` starts with the outer entry, which follows the SysV ABI with the
        // signature `EntryFn`.
        let f: EntryFn = unsafe { std::mem::transmute::<*mut u8, EntryFn>(self.code.as_ptr()) };
        // SAFETY: see the function contract.
        unsafe { f(args[0], args[1], args[2], args[3], args[4], env) }
    }
}

/// A run environment kept across runs of one image with the same helpers: a hook runs the
/// same program with the same per-thread helpers on every call, so the environment is filled
/// once and a run that returns normally stores only its arguments (filling it per run, with the
/// memory map and the result moves around it, was ~40 stores on every hooked call).
pub struct JitSession<'h> {
    pub(super) env: JitEnv<'h, 'static>,
    /// Where helpers may register regions (the JIT never checks them); emptied after a run
    /// that did.
    mem: MemoryMap<'static>,
    pub(super) image: *const JitProgram,
    map_set: Option<u64>,
}

impl JitProgram {
    /// A session running this image with `helpers`, boxed so the environment can point at
    /// its own memory map.
    ///
    /// # Safety
    /// `helpers` must stay valid, and be used by nothing else while a run is in progress, for
    /// as long as the session lives; so must this image.
    pub unsafe fn session<'h>(&self, helpers: *mut (dyn Helpers + 'h)) -> Box<JitSession<'h>> {
        // SAFETY: the caller's contract: `helpers` is valid.
        let map_set = unsafe { (*helpers).map_set_id() };
        let mut session = Box::new(JitSession {
            env: self.fresh_env(map_set, helpers, std::ptr::null_mut()),
            mem: MemoryMap::new(),
            image: self,
            map_set,
        });
        session.env.mem = &mut session.mem;
        session
    }
}

impl JitSession<'_> {
    /// Runs the image with r1 = `r1`, r2 = `r2`.
    ///
    /// # Safety
    /// As [`JitProgram::run`], plus the contract of [`JitProgram::session`].
    #[inline(always)]
    pub unsafe fn run(&mut self, r1: u64, r2: u64) -> Result<u64, VmError> {
        // SAFETY: the caller's contract; the image outlives the session.
        let r = unsafe { (*self.image).enter([r1, r2, 0, 0, 0], &mut self.env) };
        if self.env.status == ST_OK && self.mem.regions().is_empty() {
            return Ok(r);
        }
        // SAFETY: as above.
        unsafe { self.finish(r) }
    }

    /// What [`JitHook`]'s entry leaves to its `after` callback: the outcome of a run (of
    /// this session) that returned `r0` without status OK; the session is ready again after.
    ///
    /// # Safety
    /// As [`run`](Self::run); only right after such a run, before any other.
    ///
    /// [`JitHook`]: super::JitHook
    pub unsafe fn finish_hook_run(&mut self, r0: u64) -> Result<u64, VmError> {
        // SAFETY: forwarded.
        unsafe { self.finish(r0) }
    }

    /// Tail calls and errors ([`JitProgram::finish`]); then puts the environment back as
    /// [`JitProgram::session`] filled it.
    ///
    /// # Safety
    /// As [`run`](Self::run).
    #[cold]
    #[inline(never)]
    unsafe fn finish(&mut self, r: u64) -> Result<u64, VmError> {
        let result = if self.env.status == ST_OK {
            Ok(r)
        } else {
            // SAFETY: forwarded.
            unsafe { JitProgram::finish_in_place(&mut self.env, r, self.map_set) }
        };
        // SAFETY: the image outlives the session.
        let image = unsafe { &*self.image };
        self.mem = MemoryMap::new();
        self.env = image.fresh_env(self.map_set, self.env.helpers, &mut self.mem);
        result
    }
}

/// The result of a (nested) entry that returned `r`: `Ok(r)`, or the error its status names.
/// Resets the status for the caller. Not for `ST_TAIL_CALL`.
fn take_outcome(env: &mut JitEnv<'_, '_>, r: u64) -> Result<u64, VmError> {
    let status = std::mem::replace(&mut env.status, ST_OK);
    match status {
        ST_OK => Ok(r),
        ST_DEPTH => Err(VmError::CallDepth {
            pc: env.pc as usize,
            max: MAX_CALL_FRAMES,
        }),
        ST_BAD_CALLX => Err(VmError::BadCallx {
            pc: env.pc as usize,
            target: env.aux,
        }),
        _ => Err(env.error.take().unwrap_or(VmError::FellOffEnd {
            pc: env.pc as usize,
        })),
    }
}

/// Runs callbacks for a helper called from JIT code at `pc`, call depth `depth`.
struct JitInvoker<'h, 'm> {
    env: *mut JitEnv<'h, 'm>,
    pc: usize,
    depth: u32,
}

impl FuncInvoker for JitInvoker<'_, '_> {
    fn invoke(
        &mut self,
        func: u64,
        args: [u64; 5],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError> {
        let env = self.env;
        // SAFETY: `env` is the live `JitEnv` of the run whose helper trampoline created this
        // invoker; nothing else accesses it while the helper runs (the trampoline holds no
        // reference to it across the helper call). `jit` points at the image running, kept
        // alive by `run`.
        let jit = unsafe { &*(*env).jit };
        let idx = (func & !FUNC_PTR_MASK) as usize;
        let target = if func & FUNC_PTR_MASK == FUNC_PTR_TAG {
            jit.func_table.get(idx).copied().unwrap_or(0)
        } else {
            0
        };
        if target == 0 {
            return Err(VmError::BadCallback { pc: self.pc, func });
        }
        if self.depth as usize + 1 >= MAX_CALL_FRAMES {
            return Err(VmError::CallDepth {
                pc: self.pc,
                max: MAX_CALL_FRAMES,
            });
        }
        // SAFETY: see above. The helpers and memory map the nested code reaches are the ones
        // the helper passed in (reborrows of what the trampoline handed it), so no `&mut` is
        // derived twice from the outer pointers; the lifetimes are erased only for the nested
        // run and the previous pointers are restored before returning.
        unsafe {
            let saved = (
                (*env).saved_rsp,
                (*env).entry,
                (*env).depth,
                (*env).helpers,
                (*env).mem,
                (*env).fast,
            );
            (*env).entry = target;
            (*env).depth = self.depth + 1;
            // The callback's helper calls go to `helpers`, which may name other maps.
            (*env).fast = jit.fast_for(helpers.map_set_id());
            (*env).helpers = std::mem::transmute::<*mut (dyn Helpers + '_), *mut (dyn Helpers + '_)>(
                helpers as *mut (dyn Helpers + '_),
            );
            (*env).mem = (mem as *mut MemoryMap<'_>).cast();
            let r = jit.enter(args, env);
            (*env).saved_rsp = saved.0;
            (*env).entry = saved.1;
            (*env).depth = saved.2;
            (*env).helpers = saved.3;
            (*env).mem = saved.4;
            (*env).fast = saved.5;
            if (*env).status == ST_TAIL_CALL {
                (*env).status = ST_OK;
                (*env).tail = None;
                return Err(VmError::TailCallInSubprog { pc: self.pc });
            }
            take_outcome(&mut *env, r)
        }
    }
}

/// Called from generated code for every helper call.
pub(super) unsafe extern "C" fn helper_trampoline(
    a1: u64,
    a2: u64,
    a3: u64,
    a4: u64,
    a5: u64,
    env: *mut JitEnv<'_, '_>,
) -> u64 {
    // SAFETY: generated code passes the `JitEnv` given to `enter`, exclusively borrowed by `run`
    // for the duration of the call; its `helpers` and `mem` pointers come from live `&mut`s.
    // No reference to `*env` is held across the helper call (callbacks the helper starts use
    // `env` through the invoker's raw pointer).
    let (id, pc, depth, helpers, mem) = unsafe {
        (
            (*env).helper_id,
            (*env).pc as usize,
            (*env).depth,
            (*env).helpers,
            (*env).mem,
        )
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: see above.
        let (helpers, mem) = unsafe { (&mut *helpers, &mut *mem) };
        let mut inv = JitInvoker { env, pc, depth };
        let mut ctx = CallContext::with_invoker(pc, mem, &mut inv, false);
        let r = helpers.call(id, [a1, a2, a3, a4, a5], &mut ctx);
        (r, ctx.take_tail_call())
    }));
    // SAFETY: see above; the helper has returned.
    let env = unsafe { &mut *env };
    match outcome {
        Ok((Ok(v), None)) => v,
        Ok((Ok(v), Some(p))) => {
            if depth != 0 {
                env.error = Some(VmError::TailCallInSubprog { pc });
                env.status = ST_HELPER_ERR;
            } else {
                env.tail = Some((p, a1));
                env.status = ST_TAIL_CALL;
            }
            v
        }
        Ok((Err(source), _)) => {
            env.error = Some(VmError::from_helper(pc, id, source));
            env.status = ST_HELPER_ERR;
            0
        }
        Err(_) => {
            env.error = Some(VmError::Helper {
                pc,
                id,
                source: HelperError::Panicked,
            });
            env.status = ST_HELPER_ERR;
            0
        }
    }
}
