// Per-CPU and atomic counting from many threads at once (victim_mt: THREADS threads each call
// mt_work(i, thread) for i in 0..CALLS): a PERCPU_ARRAY bumped per call (summed over CPUs, the
// totals are exact whatever CPU each call ran on) and .bss counters updated with atomics.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} per_thread SEC(".maps");

__u64 calls = 0;
__u64 sum_i = 0;
__u64 xor_all = 0;
__u64 max_thread = 0;

SEC("uprobe/" BPF_OUT_DIR "/victim_mt:mt_work")
int BPF_KPROBE(count_mt, long i, long thread)
{
	__u32 slot = thread & 7;
	__u64 *n = bpf_map_lookup_elem(&per_thread, &slot);

	/* Atomic even on a per-CPU value: a thread preempted between the load and the store
	 * would lose a count to the next one on its CPU (on the kernel too: programs run with
	 * migration, not preemption, disabled). */
	if (n)
		__sync_fetch_and_add(n, 1);
	__sync_fetch_and_add(&calls, 1);
	__sync_fetch_and_add(&sum_i, i);
	__sync_fetch_and_xor(&xor_all, (__u64)i << (thread & 7));
	if (thread > max_thread)
		__sync_lock_test_and_set(&max_thread, thread);
	return 0;
}
