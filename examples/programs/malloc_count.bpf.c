// Counts malloc calls of processes inside a window their own code opens (va_begin) and
// closes (va_end): on victim_alloc exactly the N blocks it allocates. A count above N means
// the probes saw allocations that are not the target's (an agent's own).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} open_window SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} mallocs SEC(".maps");

SEC("uprobe/victim_alloc:va_begin")
int BPF_KPROBE(window_opens)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u8 one = 1;

	bpf_map_update_elem(&open_window, &tgid, &one, BPF_ANY);
	return 0;
}

SEC("uprobe/victim_alloc:va_end")
int BPF_KPROBE(window_closes)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	bpf_map_delete_elem(&open_window, &tgid);
	return 0;
}

SEC("uprobe/libc.so.6:malloc")
int BPF_KPROBE(count_malloc)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32, zero = 0;
	__u64 *n;

	if (!bpf_map_lookup_elem(&open_window, &tgid))
		return 0;
	n = bpf_map_lookup_elem(&mallocs, &zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}
