// A per-CPU array: counts per bucket on the CPU that ran the probe (compare by sum).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} per_cpu_calls SEC(".maps");

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(count_per_cpu, long a, long b)
{
	__u32 bucket = (__u64)a % 4;
	__u64 *n = bpf_map_lookup_elem(&per_cpu_calls, &bucket);

	if (n)
		*n += 1; /* per-CPU: no other CPU writes this slot */
	return 0;
}
