// Values with a struct bpf_spin_lock, for BPF_F_LOCK from user space: a program (XDP, a type
// the kernel lets take spin locks; tracing programs may not) bumps both counters of pairs[0]
// and slots[0] under the value's lock, so a copy taken under the same lock always sees a == b.
// `plain` has no lock: BPF_F_LOCK on it is EINVAL.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct pair {
	__u64 a;
	struct bpf_spin_lock lock;
	__u64 b;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, struct pair);
} pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct pair);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} plain SEC(".maps");

static void bump(struct pair *p)
{
	bpf_spin_lock(&p->lock);
	p->a++;
	p->b++;
	bpf_spin_unlock(&p->lock);
}

SEC("xdp")
int bump_pairs(struct xdp_md *ctx)
{
	__u32 k = 0;
	struct pair *p = bpf_map_lookup_elem(&pairs, &k);

	if (p)
		bump(p);
	p = bpf_map_lookup_elem(&slots, &k);
	if (p)
		bump(p);
	return XDP_PASS;
}
