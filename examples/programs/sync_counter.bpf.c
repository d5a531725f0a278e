// The sync test's program: counts calls in a hash map through the looked-up value pointer
// (`__sync_fetch_and_add`, no update helper), and keeps a second map with the update helper.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} per_thread SEC(".maps");

SEC("uprobe/victim_mt:mt_work")
int BPF_KPROBE(count_work, long i, long thread)
{
	__u32 key = (__u64)i % 64;
	__u64 zero = 0, *count;

	count = bpf_map_lookup_elem(&hits, &key);
	if (!count) {
		bpf_map_update_elem(&hits, &key, &zero, BPF_NOEXIST);
		count = bpf_map_lookup_elem(&hits, &key);
		if (!count)
			return 0;
	}
	__sync_fetch_and_add(count, 1);

	/* Through the update helper: the highest i each thread of each process reached. */
	key = ((__u32)bpf_get_current_pid_tgid() & 0xffff) << 6 | (thread & 63);
	bpf_map_update_elem(&per_thread, &key, &i, BPF_ANY);
	return 0;
}
