// For error tests: a uprobe on a function the victim does not have.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

__u64 calls;

SEC("uprobe/victim:no_such_function")
int BPF_KPROBE(never_attached)
{
	__sync_fetch_and_add(&calls, 1);
	return 0;
}
