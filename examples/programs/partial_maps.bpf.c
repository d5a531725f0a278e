// An object with a map type user space does not hold (a DEVMAP): the program that reads it
// must be refused alone, naming the map, while the other program loads and runs, although
// it too names the map and a helper user space lacks (bpf_get_current_task_btf), behind a
// `const volatile` switch the verifier proves off (the libbpf-tools pattern).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} calls SEC(".maps");

const volatile bool use_ports = false;

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(count_calls)
{
	__u32 key = 0;
	__u64 *n;

	if (use_ports) {
		struct task_struct *task = bpf_get_current_task_btf();

		if (bpf_map_lookup_elem(&ports, &key) || task->pid == 0)
			return 0;
	}
	n = bpf_map_lookup_elem(&calls, &key);
	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}

SEC("uprobe/victim:vt_message")
int BPF_KPROBE(read_ports)
{
	__u32 key = 0;

	return bpf_map_lookup_elem(&ports, &key) != 0;
}
