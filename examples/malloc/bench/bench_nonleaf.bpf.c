// The benchmark's non-leaf program: the array counter plus what real uprobe programs do on
// every call, a helper call (bpf_get_current_pid_tgid) and a hash update keyed by its result.
// Calls leave the JIT's leaf fast path (no helper, inline map lookup) for the general one.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} by_thread SEC(".maps");

SEC("uprobe/bench_victim:bench_target")
int count_nonleaf(struct pt_regs *ctx)
{
	__u32 key = 0, tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *n = bpf_map_lookup_elem(&hits, &key), one = 1;

	if (n)
		__sync_fetch_and_add(n, 1);
	n = bpf_map_lookup_elem(&by_thread, &tid);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&by_thread, &tid, &one, BPF_NOEXIST);
	return 0;
}
