// Probes on a function shorter than a 5-byte jump (victim_short's short_add): the entry
// counts calls and sums the arguments, the return sums the results.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} totals SEC(".maps"); /* [0] calls, [1] sum of a + b, [2] sum of results */

static void add(__u32 key, __u64 v)
{
	__u64 *n = bpf_map_lookup_elem(&totals, &key);

	if (n)
		__sync_fetch_and_add(n, v);
}

SEC("uprobe/victim_short:short_add")
int BPF_KPROBE(short_entry, int a, int b)
{
	add(0, 1);
	add(1, (__u64)(a + b));
	return 0;
}

SEC("uretprobe/victim_short:short_add")
int BPF_KRETPROBE(short_return, int ret)
{
	add(2, (__u64)ret);
	return 0;
}
