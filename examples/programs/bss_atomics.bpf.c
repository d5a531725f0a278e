// .bss and .data globals updated with atomics, no map helper at all.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

__u64 calls;          /* .bss */
__u64 arg_sum;        /* .bss */
__u64 largest;        /* .bss */
__u64 base = 100;     /* .data */

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(global_counters, long a, long b)
{
	__sync_fetch_and_add(&calls, 1);
	__sync_fetch_and_add(&arg_sum, a + b + base);
	if ((__u64)b > largest)
		largest = b;
	return 0;
}
