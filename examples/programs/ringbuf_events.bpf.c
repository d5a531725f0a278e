// A ringbuf event stream: one event per vt_add call.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct event {
	__u64 a;
	__u64 b;
	__u64 sum;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} outcome SEC(".maps"); /* [0] submitted, [1] ring full */

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(emit_event, long a, long b)
{
	__u32 key = 0;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	__u64 *n;

	if (!e)
		key = 1;
	else {
		e->a = a;
		e->b = b;
		e->sum = a + b;
		bpf_ringbuf_submit(e, 0);
	}
	n = bpf_map_lookup_elem(&outcome, &key);
	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}
