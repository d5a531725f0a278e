// bpf_printk from a userspace uprobe: `bpftime-rs load` prints the lines as `trace: ...`, and
// each call also goes into a ringbuf and a perf event array that `load` prints in hex.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} perf_calls SEC(".maps");

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(print_add, long a, long b)
{
	if (a == 3) {
		bpf_printk("vt_add(%ld, %ld)", a, b);
		bpf_ringbuf_output(&calls, &b, sizeof(b), 0);
		bpf_perf_event_output(ctx, &perf_calls, BPF_F_CURRENT_CPU, &a, sizeof(a));
	}
	return 0;
}
