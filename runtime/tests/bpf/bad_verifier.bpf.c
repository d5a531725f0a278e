// Compiles fine but the kernel verifier must reject it: it dereferences a map value without the
// NULL check.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} m SEC(".maps");

SEC("uprobe")
int no_null_check(void *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&m, &k);
	return *v;
}

char LICENSE[] SEC("license") = "GPL";
