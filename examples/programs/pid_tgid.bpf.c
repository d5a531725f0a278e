// What bpf_get_current_pid_tgid answers in each caller of victim_pids' vp_mark(id): threads,
// a thread reusing an exited one's slot, fork, vfork and clone(CLONE_VM) children.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} seen SEC(".maps");

SEC("uprobe/" BPF_OUT_DIR "/victim_pids:vp_mark")
int BPF_KPROBE(mark, long id)
{
	__u64 key = id, value = bpf_get_current_pid_tgid();

	bpf_map_update_elem(&seen, &key, &value, BPF_ANY);
	return 0;
}
