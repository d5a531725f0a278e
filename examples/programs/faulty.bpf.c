// For fault tests: dereferences the first argument as if it were a pointer. The kernel
// verifier rejects this; loaded with --no-verify it runs on the checked interpreter, which
// stops the program at the bad access while the target keeps running.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

__u64 runs;

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(deref_argument, long a, long b)
{
	__sync_fetch_and_add(&runs, 1);
	return *(volatile long *)(a + 16);
}
