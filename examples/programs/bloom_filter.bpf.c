// A bloom filter of the values vt_add has seen: each call tests its second argument (a new
// value every round, so a positive is a false positive), adds it, and tests it again (always
// positive). The filter's seed is zero, so user space and the kernel set and test the same
// bits and agree on every false positive.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_BLOOM_FILTER);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_ZERO_SEED);
	__uint(map_extra, 3);
	__type(value, __u64);
} seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} found_after_push SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} false_positives SEC(".maps");

static void bump(void *map)
{
	__u32 key = 0;
	__u64 *n = bpf_map_lookup_elem(map, &key);

	if (n)
		__sync_fetch_and_add(n, 1);
}

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(remember, long a, long b)
{
	__u64 value = b;

	if (bpf_map_peek_elem(&seen, &value) == 0)
		bump(&false_positives);
	bpf_map_push_elem(&seen, &value, BPF_ANY);
	if (bpf_map_peek_elem(&seen, &value) == 0)
		bump(&found_after_push);
	return 0;
}
