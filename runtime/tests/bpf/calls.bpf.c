// bpf-to-bpf calls into .text (shared by two programs) and a bpf_loop callback.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} acc SEC(".maps");

static __noinline __u64 square(__u64 x)
{
	return x * x;
}

static __noinline __u64 sum_squares(__u64 n)
{
	__u64 s = 0;
	for (int i = 0; i < 8; i++)
		if (i < n)
			s += square(i);
	return s;
}

__noinline int global_helper(int x)
{
	return x + 1;
}

SEC("xdp")
int xdp_calls(struct xdp_md *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&acc, &k);
	if (v)
		*v = sum_squares(5) + square(3);
	return XDP_PASS + global_helper(0) - 1;
}

struct loop_ctx {
	__u64 sum;
};

static long loop_cb(__u64 index, void *data)
{
	struct loop_ctx *c = data;
	c->sum += index;
	return 0;
}

SEC("socket")
int loop_prog(struct __sk_buff *skb)
{
	struct loop_ctx c = { 0 };
	__u32 k = 0;
	__u64 *v;

	bpf_loop(10, loop_cb, &c, 0);
	v = bpf_map_lookup_elem(&acc, &k);
	if (v)
		*v = c.sum + square(2);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
