// Stack traces of the calls victim_stacks makes: user stacks by id (bpf_get_stackid) counted
// per id, the same stacks with the innermost frame skipped, raw stacks (bpf_get_stack) as
// ring records, kernel stacks of a user-space probe (none: the kernel answers -EFAULT and 0
// bytes), stacks taken at a return probe while an outer return probe is pending, and a map
// too small for every stack (collisions: -EEXIST).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define DEPTH 16

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 64);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, DEPTH * sizeof(__u64));
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 64);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, DEPTH * sizeof(__u64));
} skipped SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 2);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, DEPTH * sizeof(__u64));
} tiny SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __s64);
	__type(value, __u64);
} calls_by_stack SEC(".maps"); /* id (or -errno) -> calls */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __s64);
	__type(value, __u64);
} results SEC(".maps"); /* what each other call returned (tag << 32 | value) -> calls */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} raw_stacks SEC(".maps");

struct raw_stack {
	__s64 len;
	__u64 ips[6];
};

static void count(void *map, __s64 key)
{
	__u64 one = 1, *n = bpf_map_lookup_elem(map, &key);

	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(map, &key, &one, BPF_NOEXIST);
}

static void result(__s64 tag, __s64 value)
{
	count(&results, (tag << 32) | (value & 0xffffffff));
}

SEC("uprobe/victim_stacks:vs_leaf")
int BPF_KPROBE(leaf_stack)
{
	struct raw_stack *r;

	count(&calls_by_stack, bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK));
	result(1, bpf_get_stackid(ctx, &skipped, BPF_F_USER_STACK | 1));
	result(2, bpf_get_stackid(ctx, &stacks, 0));
	result(3, bpf_get_stackid(ctx, &tiny, BPF_F_USER_STACK));
	result(4, bpf_get_stackid(ctx, &tiny, BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP));
	result(5, bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK | 200));

	r = bpf_ringbuf_reserve(&raw_stacks, sizeof(*r), 0);
	if (!r)
		return 0;
	result(6, bpf_get_stack(ctx, r->ips, sizeof(r->ips), 0));
	r->len = bpf_get_stack(ctx, r->ips, sizeof(r->ips), BPF_F_USER_STACK);
	bpf_ringbuf_submit(r, 0);
	return 0;
}

SEC("uretprobe/victim_stacks:vs_mid_a")
int BPF_KRETPROBE(mid_a_return)
{
	count(&calls_by_stack, 1000 + bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK));
	return 0;
}

/* At vs_mid_a's first instruction (push %rbp) the return address is still at the stack
 * pointer: the kernel's walk includes it. */
SEC("uprobe/victim_stacks:vs_mid_a")
int BPF_KPROBE(mid_a_entry)
{
	count(&calls_by_stack, 2000 + bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK));
	return 0;
}
