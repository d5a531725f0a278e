// A bpf-to-bpf call: a non-inlined subprogram with a loop and its own stack.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} mixed SEC(".maps");

static __noinline __u64 mix(__u64 a, __u64 b)
{
	volatile __u64 scratch[4] = {a, b, a ^ b, a + b};
	__u64 h = 1469598103934665603ULL;

	for (int i = 0; i < 4; i++)
		h = (h ^ scratch[i]) * 1099511628211ULL;
	return h;
}

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(mix_args, long a, long b)
{
	__u32 key = (__u64)a % 8;
	__u64 h = mix(a, b), *acc;

	acc = bpf_map_lookup_elem(&mixed, &key);
	if (acc)
		__sync_fetch_and_xor(acc, h);
	else
		bpf_map_update_elem(&mixed, &key, &h, BPF_NOEXIST);
	return 0;
}
