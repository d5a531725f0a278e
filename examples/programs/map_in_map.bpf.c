// Maps of maps, as libbpf declares them: each vt_add(a, b) call picks an inner array by
// a % 3 in an ARRAY_OF_MAPS (slots 0 and 1 filled at load from `.values`, slot 2 empty) and
// adds b to index b % 8 of it; then it picks an inner hash by a % 3 in a HASH_OF_MAPS
// (keys 0 and 1 filled at load, key 2 absent) and counts a there. Misses of either outer
// map are counted in `misses`.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct sums {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} even_sums SEC(".maps"), odd_sums SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 3);
	__type(key, __u32);
	__array(values, struct sums);
} sums_by_slot SEC(".maps") = {
	.values = { [0] = &even_sums, [1] = &odd_sums },
};

struct counts {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} low_counts SEC(".maps"), high_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 4);
	__type(key, __u32);
	__array(values, struct counts);
} counts_by_key SEC(".maps") = {
	.values = { [0] = &low_counts, [1] = &high_counts },
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} misses SEC(".maps"); /* [0] empty array slot, [1] absent hash key */

static void miss(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&misses, &which);

	if (n)
		__sync_fetch_and_add(n, 1);
}

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(route, unsigned long a, unsigned long b)
{
	__u32 slot = a % 3, index = b % 8, key = a;
	__u64 one = 1, *v;
	void *inner;

	inner = bpf_map_lookup_elem(&sums_by_slot, &slot);
	if (inner) {
		v = bpf_map_lookup_elem(inner, &index);
		if (v)
			__sync_fetch_and_add(v, b);
	} else {
		miss(0);
	}
	inner = bpf_map_lookup_elem(&counts_by_key, &slot);
	if (!inner) {
		miss(1);
		return 0;
	}
	v = bpf_map_lookup_elem(inner, &key);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(inner, &key, &one, BPF_NOEXIST);
	return 0;
}
