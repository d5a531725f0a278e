// SPDX-License-Identifier: GPL-2.0 OR MIT
// Kernel side of uprobe_tool: an entry and a return probe on one user function. The loader
// (uprobe_tool.c) attaches both to the binary and function it is given, so the sections name
// no target.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define EVENT_ENTRY 0
#define EVENT_RETURN 1
#define HIST_BUCKETS 8

struct event {
	u32 pid;
	u32 kind;  /* EVENT_ENTRY or EVENT_RETURN */
	u64 value; /* first argument on entry, return value on return */
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* The same events through a perf buffer, when the loader sets use_perf (-P). */
struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(u32));
	__uint(value_size, sizeof(u32));
} pevents SEC(".maps");

/* Entry count per (first argument % hist_buckets); the loader may resize it (-H). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, u32);
	__type(value, u64);
} hist SEC(".maps");

/* A cgroup filter as libbpf tools have one: off unless the loader sets filter_cg, so the
 * verifier proves the test of the CGROUP_ARRAY (a map user space does not hold) dead. */
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, u32);
} cgroup_map SEC(".maps");

const volatile bool filter_cg = false;

/* Entry stacks (-S): user stacks by id, and entries per stack id. */
#define STACK_DEPTH 16
struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 64);
	__uint(key_size, sizeof(u32));
	__uint(value_size, STACK_DEPTH * sizeof(u64));
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, s32);
	__type(value, u64);
} stack_calls SEC(".maps");

const volatile bool count_stacks = false;

/* Commands from the loader (-U): each entry applies one, adding its value to `commanded`. */
struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 4 * 4096);
} commands SEC(".maps");

/* The applied commands' sum (a map, not .bss: the aya tool reads .bss by layout). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, u64);
} commanded SEC(".maps");

const volatile bool drain_commands = false;

static long apply_command(struct bpf_dynptr *command, void *ctx)
{
	u64 value;
	u32 zero = 0;
	u64 *sum = bpf_map_lookup_elem(&commanded, &zero);

	if (sum && bpf_dynptr_read(&value, sizeof(value), command, 0, 0) == 0)
		__sync_fetch_and_add(sum, value);
	return 1; /* one command per call */
}

/* Set by the loader before load (-H, with hist resized to match). */
const volatile u32 hist_buckets = HIST_BUCKETS;

/* Set by the loader before load: entries with a smaller first argument are ignored. */
const volatile u64 min_arg = 0;
/* Set by the loader before load: events go to pevents instead of events. */
const volatile bool use_perf = false;

u64 entries = 0;
u64 returns = 0;

static void hist_add(u32 key)
{
	u64 one = 1;
	u64 *count;

	count = bpf_map_lookup_elem(&hist, &key);
	if (count) {
		__sync_fetch_and_add(count, 1);
		return;
	}
	if (bpf_map_update_elem(&hist, &key, &one, BPF_NOEXIST) == 0)
		return;
	/* Another CPU created the bucket between our lookup and update. */
	count = bpf_map_lookup_elem(&hist, &key);
	if (count)
		__sync_fetch_and_add(count, 1);
}

static void emit(void *ctx, u32 kind, u64 value)
{
	struct event *e;

	if (use_perf) {
		struct event pe = {
			.pid = bpf_get_current_pid_tgid() >> 32,
			.kind = kind,
			.value = value,
		};

		bpf_perf_event_output(ctx, &pevents, BPF_F_CURRENT_CPU, &pe, sizeof(pe));
		return;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->kind = kind;
	e->value = value;
	bpf_ringbuf_submit(e, 0);
}

/* Counters and the histogram are updated before the event is submitted, so a reader that has
 * seen an event also sees the counts that include it. */
SEC("uprobe")
int BPF_KPROBE(on_entry, long arg)
{
	u64 value = (u64)arg;

	if (filter_cg && !bpf_current_task_under_cgroup(&cgroup_map, 0))
		return 0;
	if (value < min_arg)
		return 0;
	__sync_fetch_and_add(&entries, 1);
	hist_add(value % hist_buckets);
	if (drain_commands)
		bpf_user_ringbuf_drain(&commands, apply_command, NULL, 0);
	if (count_stacks) {
		s32 id = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
		u64 one = 1, *n = bpf_map_lookup_elem(&stack_calls, &id);

		if (n)
			__sync_fetch_and_add(n, 1);
		else
			bpf_map_update_elem(&stack_calls, &id, &one, BPF_NOEXIST);
	}
	emit(ctx, EVENT_ENTRY, value);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(on_return, long rc)
{
	if (filter_cg && !bpf_current_task_under_cgroup(&cgroup_map, 0))
		return 0;
	__sync_fetch_and_add(&returns, 1);
	emit(ctx, EVENT_RETURN, (u64)rc);
	return 0;
}
