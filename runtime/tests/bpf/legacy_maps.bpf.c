// Old-style map definitions in the "maps" section (struct bpf_map_def, removed from libbpf 1.0's
// headers, so declared here).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct bpf_map_def {
	unsigned int type;
	unsigned int key_size;
	unsigned int value_size;
	unsigned int max_entries;
	unsigned int map_flags;
};

struct bpf_map_def SEC("maps") legacy_hash = {
	.type = BPF_MAP_TYPE_HASH,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u64),
	.max_entries = 64,
};

struct bpf_map_def SEC("maps") legacy_array = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u32),
	.max_entries = 8,
	.map_flags = 0,
};

SEC("kprobe/do_sys_openat2")
int legacy_prog(struct pt_regs *ctx)
{
	__u32 k = 1;
	__u64 one = 1;
	__u32 *a = bpf_map_lookup_elem(&legacy_array, &k);
	if (a)
		one += *a;
	bpf_map_update_elem(&legacy_hash, &k, &one, BPF_ANY);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
