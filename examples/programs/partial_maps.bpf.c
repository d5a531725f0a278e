// An object with a map type user space does not hold (a USER_RINGBUF): the program that
// drains it must be refused alone, naming the map, while the other program loads and runs,
// although it too names the map and a helper user space lacks, behind a `const volatile`
// switch the verifier proves off (the libbpf-tools pattern).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 4096);
} inbox SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} calls SEC(".maps");

const volatile bool use_inbox = false;

static long on_message(struct bpf_dynptr *msg, void *ctx)
{
	return 0;
}

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(count_calls)
{
	__u32 key = 0;
	__u64 *n = bpf_map_lookup_elem(&calls, &key);

	if (use_inbox)
		bpf_user_ringbuf_drain(&inbox, on_message, NULL, 0);
	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}

SEC("uprobe/victim:vt_message")
int BPF_KPROBE(drain_inbox)
{
	bpf_user_ringbuf_drain(&inbox, on_message, NULL, 0);
	return 0;
}
