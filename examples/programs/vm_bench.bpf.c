// Bodies for the VM benchmark. XDP, because the kernel only test-runs XDP/skb programs with
// `repeat`, which is how the kernel's JIT row is measured; our VMs run the same bytes.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} table SEC(".maps");

SEC("xdp")
int trivial(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("xdp")
int array_counter(struct xdp_md *ctx)
{
	__u32 key = 0;
	__u64 *value = bpf_map_lookup_elem(&counter, &key);

	if (value)
		__sync_fetch_and_add(value, 1);
	return XDP_PASS;
}

SEC("xdp")
int hash_lookup_update(struct xdp_md *ctx)
{
	__u32 key = 7;
	__u64 *value = bpf_map_lookup_elem(&table, &key);
	__u64 next = value ? *value + 1 : 1;

	bpf_map_update_elem(&table, &key, &next, BPF_ANY);
	return XDP_PASS;
}

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} spread SEC(".maps");

// The hash row over 1024 distinct keys instead of one hot key: bucket walks, cache misses and
// inserts, not one cached entry.
SEC("xdp")
int hash_random_keys(struct xdp_md *ctx)
{
	__u32 key = bpf_get_prandom_u32() % 1024;
	__u64 *value = bpf_map_lookup_elem(&spread, &key);
	__u64 next = value ? *value + 1 : 1;

	bpf_map_update_elem(&spread, &key, &next, BPF_ANY);
	return XDP_PASS;
}

// Compute-bound: 256 rounds of xorshift on a value from the context, no helper or map call:
// what is timed is each VM's ALU and branch code.
SEC("xdp")
int compute_loop(struct xdp_md *ctx)
{
	__u64 x = ctx->data_end - ctx->data + 0x9e3779b97f4a7c15ULL;

	for (int i = 0; i < 256; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	return (x & 1) ? XDP_PASS : XDP_DROP;
}
