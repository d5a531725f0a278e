// A hash map counter: calls of vt_add per first argument.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} calls_by_arg SEC(".maps");

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(count_calls, long a, long b)
{
	__u64 key = a, one = 1, *count;

	count = bpf_map_lookup_elem(&calls_by_arg, &key);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		bpf_map_update_elem(&calls_by_arg, &key, &one, BPF_NOEXIST);
	return 0;
}
