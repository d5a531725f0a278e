// An array of counters: the sum of vt_add's first argument per bucket of its second.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} sums SEC(".maps");

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(sum_by_bucket, long a, long b)
{
	__u32 bucket = (__u64)b % 16;
	__u64 *sum = bpf_map_lookup_elem(&sums, &bucket);

	if (sum)
		__sync_fetch_and_add(sum, a);
	return 0;
}
