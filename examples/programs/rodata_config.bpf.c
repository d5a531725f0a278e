// .rodata configuration: constants the verifier sees, read by the program.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

const volatile __u64 scale = 3;
const volatile __u32 buckets = 5;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} scaled SEC(".maps");

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(scaled_sum, long a, long b)
{
	__u32 key = buckets ? (__u64)a % buckets : 0;
	__u64 add = (__u64)b * scale, *sum;

	sum = bpf_map_lookup_elem(&scaled, &key);
	if (sum)
		__sync_fetch_and_add(sum, add);
	else
		bpf_map_update_elem(&scaled, &key, &add, BPF_NOEXIST);
	return 0;
}
