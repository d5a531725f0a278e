//! The one table of the helpers [`RuntimeHelpers`] implements: id, implementation and whether
//! the helper keeps state for the length of a run. The supported list, the load-time check,
//! the run-state classification and the dispatch are all read from it, so they cannot drift
//! apart; names come from the kernel's list ([`HelperId::display_name`]).

use bpftime_abi::HelperId;

use super::{cgroup, control, dynptr, map, printk, probe, ringbuf, stack, task, RuntimeHelpers};
use crate::vm::insn::{Insn, CALL, LDDW};
use crate::vm::{CallContext, HelperError, HelperFault, Program};

/// A helper's implementation: the five argument registers in, r0 out.
pub(crate) type HelperFn =
    fn(&mut RuntimeHelpers, [u64; 5], &mut CallContext<'_, '_>) -> Result<u64, HelperError>;

/// One implemented helper.
pub(crate) struct HelperDef {
    pub(crate) id: HelperId,
    pub(crate) call: HelperFn,
    /// Keeps state between calls of one run, reset by [`RuntimeHelpers::begin_run`] (tail-call
    /// count, override request, ringbuf reservations): a program calling it cannot run from
    /// an entry that skips the reset (see [`needs_no_run_reset`]).
    pub(crate) keeps_run_state: bool,
}

const fn def(id: HelperId, call: HelperFn) -> HelperDef {
    HelperDef {
        id,
        call,
        keeps_run_state: false,
    }
}

const fn stateful(id: HelperId, call: HelperFn) -> HelperDef {
    HelperDef {
        id,
        call,
        keeps_run_state: true,
    }
}

type H = HelperId;

/// Ascending by id (checked at compile time below).
const HELPERS: &[HelperDef] = &[
    def(H::MAP_LOOKUP_ELEM, map::lookup_elem),
    def(H::MAP_UPDATE_ELEM, map::update_elem),
    def(H::MAP_DELETE_ELEM, map::delete_elem),
    def(H::PROBE_READ, probe::probe_read),
    def(H::KTIME_GET_NS, task::ktime_get_ns),
    def(H::TRACE_PRINTK, printk::trace_printk),
    def(H::GET_PRANDOM_U32, task::get_prandom_u32),
    def(H::GET_SMP_PROCESSOR_ID, task::get_smp_processor_id),
    stateful(H::TAIL_CALL, control::tail_call),
    def(H::GET_CURRENT_PID_TGID, task::get_current_pid_tgid),
    def(H::GET_CURRENT_UID_GID, task::get_current_uid_gid),
    def(H::GET_CURRENT_COMM, task::get_current_comm),
    def(H::PERF_EVENT_OUTPUT, ringbuf::perf_event_output),
    def(H::GET_STACKID, stack::get_stackid),
    def(H::GET_CURRENT_TASK, task::get_current_task),
    def(H::PROBE_WRITE_USER, probe::probe_write_user),
    def(
        H::CURRENT_TASK_UNDER_CGROUP,
        cgroup::current_task_under_cgroup,
    ),
    def(H::PROBE_READ_STR, probe::probe_read_str),
    stateful(H::OVERRIDE_RETURN, control::override_return),
    def(H::GET_STACK, stack::get_stack),
    def(H::GET_CURRENT_CGROUP_ID, cgroup::get_current_cgroup_id),
    def(H::MAP_PUSH_ELEM, map::push_elem),
    def(H::MAP_POP_ELEM, map::pop_elem),
    def(H::MAP_PEEK_ELEM, map::peek_elem),
    stateful(H::SPIN_LOCK, control::spin_lock),
    stateful(H::SPIN_UNLOCK, control::spin_unlock),
    def(H::SEND_SIGNAL, task::send_signal),
    def(H::PROBE_READ_USER, probe::probe_read_user),
    def(H::PROBE_READ_KERNEL, probe::probe_read_kernel),
    def(H::PROBE_READ_USER_STR, probe::probe_read_user_str),
    def(H::PROBE_READ_KERNEL_STR, probe::probe_read_kernel_str),
    def(H::SEND_SIGNAL_THREAD, task::send_signal_thread),
    def(H::JIFFIES64, task::jiffies64),
    def(H::GET_NS_CURRENT_PID_TGID, task::get_ns_current_pid_tgid),
    def(
        H::GET_CURRENT_ANCESTOR_CGROUP_ID,
        cgroup::get_current_ancestor_cgroup_id,
    ),
    def(H::KTIME_GET_BOOT_NS, task::ktime_get_boot_ns),
    def(H::RINGBUF_OUTPUT, ringbuf::ringbuf_output),
    stateful(H::RINGBUF_RESERVE, ringbuf::ringbuf_reserve),
    stateful(H::RINGBUF_SUBMIT, ringbuf::ringbuf_submit),
    stateful(H::RINGBUF_DISCARD, ringbuf::ringbuf_discard),
    def(H::RINGBUF_QUERY, ringbuf::ringbuf_query),
    def(H::COPY_FROM_USER, probe::copy_from_user),
    def(H::KTIME_GET_COARSE_NS, task::ktime_get_coarse_ns),
    def(H::FOR_EACH_MAP_ELEM, map::for_each_map_elem),
    def(H::SNPRINTF, printk::snprintf),
    def(H::GET_FUNC_IP, control::get_func_ip),
    def(H::GET_ATTACH_COOKIE, control::get_attach_cookie),
    def(H::TRACE_VPRINTK, printk::trace_vprintk),
    def(H::LOOP, control::bpf_loop),
    def(H::STRNCMP, probe::strncmp),
    def(H::MAP_LOOKUP_PERCPU_ELEM, map::lookup_percpu_elem),
    def(H::DYNPTR_FROM_MEM, dynptr::dynptr_from_mem),
    def(H::DYNPTR_READ, dynptr::dynptr_read),
    def(H::DYNPTR_WRITE, dynptr::dynptr_write),
    def(H::DYNPTR_DATA, dynptr::dynptr_data),
    def(H::KTIME_GET_TAI_NS, task::ktime_get_tai_ns),
    def(H::USER_RINGBUF_DRAIN, dynptr::user_ringbuf_drain),
];

/// Ids index this array directly: the dispatch is one bounds check and one indirect call.
const DISPATCH_LEN: usize = 256;

static DISPATCH: [Option<HelperFn>; DISPATCH_LEN] = {
    let mut table: [Option<HelperFn>; DISPATCH_LEN] = [None; DISPATCH_LEN];
    let mut i = 0;
    while i < HELPERS.len() {
        let id = HELPERS[i].id.0 as usize;
        assert!(id < DISPATCH_LEN, "helper id beyond the dispatch table");
        assert!(
            i == 0 || HELPERS[i - 1].id.0 < HELPERS[i].id.0,
            "HELPERS must be ascending by id, without duplicates"
        );
        table[id] = Some(HELPERS[i].call);
        i += 1;
    }
    table
};

/// The call a failed CO-RE relocation leaves in the program (see [`crate::object::co_re`]).
pub const POISON_HELPER: u32 = crate::object::POISON_HELPER as u32;

/// Runs helper `id`.
#[inline]
pub(crate) fn dispatch(
    h: &mut RuntimeHelpers,
    id: u32,
    args: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Result<u64, HelperError> {
    match DISPATCH.get(id as usize).copied().flatten() {
        Some(call) => call(h, args, ctx),
        None if id == POISON_HELPER => Err(HelperFault::CoreRelocation { id, pc: ctx.pc() }.into()),
        None => Err(HelperError::Unknown(id)),
    }
}

fn find(id: u32) -> Option<&'static HelperDef> {
    HELPERS
        .binary_search_by_key(&id, |d| d.id.0)
        .ok()
        .map(|i| &HELPERS[i])
}

/// Every helper id [`RuntimeHelpers`] implements, ascending.
pub fn supported_helpers() -> impl Iterator<Item = HelperId> {
    HELPERS.iter().map(|d| d.id)
}

/// Whether [`RuntimeHelpers`] implements helper `id`.
pub fn is_supported(id: u32) -> bool {
    find(id).is_some()
}

/// A program calls a helper [`RuntimeHelpers`] does not implement (found at load time).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("helper {id} ({name}) is not supported at instruction {pc}")]
pub struct UnknownHelper {
    /// The helper id called.
    pub id: u32,
    /// `bpf_<name>` from the kernel's helper list, or `unknown`.
    pub name: String,
    /// Index of the first such call instruction (8-byte slots).
    pub pc: usize,
}

/// Load-time check: every `call <helper>` of `prog` is one [`RuntimeHelpers`] implements.
/// (Calls of the CO-RE poison helper are accepted: they fail only if reached.)
pub fn check_helpers(prog: &Program) -> Result<(), UnknownHelper> {
    check_helper_calls(prog.insns())
}

/// [`check_helpers`] on raw instructions.
pub fn check_helper_calls(insns: &[Insn]) -> Result<(), UnknownHelper> {
    for (pc, id) in helper_calls(insns) {
        if !is_supported(id) && id != POISON_HELPER {
            return Err(UnknownHelper {
                id,
                name: HelperId(id).display_name(),
                pc,
            });
        }
    }
    Ok(())
}

/// Whether runs of `prog` can do without the per-run reset of the helpers' state
/// ([`RuntimeHelpers::begin_run`] / [`RuntimeHelpers::end_run`]): it calls no helper that
/// keeps state for the length of a run ([`HelperDef::keeps_run_state`]) and makes no `callx`
/// (which may reach any helper). Such a program may run from a JIT hook entry
/// (`vm::jit::JitHook`) that skips the reset.
pub fn needs_no_run_reset(prog: &Program) -> bool {
    const CALLX: u8 = 0x8d;
    let insns = prog.insns();
    if insn_starts(insns).any(|pc| insns[pc].opc == CALLX) {
        return false;
    }
    !helper_calls(insns).any(|(_, id)| find(id).is_some_and(|d| d.keeps_run_state))
}

/// Positions of instruction starts (the second slot of an `lddw` is not one).
fn insn_starts(insns: &[Insn]) -> impl Iterator<Item = usize> + '_ {
    let mut pc = 0;
    std::iter::from_fn(move || {
        let at = pc;
        let i = insns.get(at)?;
        pc += if i.opc == LDDW { 2 } else { 1 };
        Some(at)
    })
}

/// `(pc, helper id)` of every helper call.
fn helper_calls(insns: &[Insn]) -> impl Iterator<Item = (usize, u32)> + '_ {
    insn_starts(insns)
        .filter(move |&pc| insns[pc].opc == CALL && insns[pc].src == 0)
        .map(move |pc| (pc, insns[pc].imm as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_helper_is_named_and_dispatched() {
        for d in HELPERS {
            assert!(d.id.name().is_some(), "{}", d.id);
            assert!(DISPATCH[d.id.0 as usize].is_some(), "{}", d.id);
        }
        let dispatched = DISPATCH.iter().filter(|f| f.is_some()).count();
        assert_eq!(dispatched, HELPERS.len());
        assert!(!is_supported(84), "bpf_sk_lookup_tcp is not implemented");
    }

    #[test]
    fn run_state_helpers_are_the_ones_reset_per_run() {
        let stateful: Vec<_> = HELPERS
            .iter()
            .filter(|d| d.keeps_run_state)
            .map(|d| d.id.display_name())
            .collect();
        assert_eq!(
            stateful,
            [
                "bpf_tail_call",
                "bpf_override_return",
                "bpf_spin_lock",
                "bpf_spin_unlock",
                "bpf_ringbuf_reserve",
                "bpf_ringbuf_submit",
                "bpf_ringbuf_discard"
            ]
        );
    }
}
