// Every map type the runtime has, touched on every vt_add call: the object the corruption test
// runs while another process rewrites its shared memory at random.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} sums SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} per_cpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16);
	__type(key, __u64);
	__type(value, __u64);
} recent SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, 32);
	__type(value, __u64);
} pushed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 14);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} perf SEC(".maps");

__u64 calls = 0;

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(touch_all, long a, long b)
{
	__u64 key = a, *v;
	__u32 idx = (__u32)a % 8, zero = 0;

	v = bpf_map_lookup_elem(&sums, &key);
	if (v)
		__sync_fetch_and_add(v, b);
	else
		bpf_map_update_elem(&sums, &key, &b, BPF_NOEXIST);
	v = bpf_map_lookup_elem(&slots, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
	v = bpf_map_lookup_elem(&per_cpu, &zero);
	if (v)
		*v += 1;
	key = b;
	bpf_map_update_elem(&recent, &key, &key, BPF_ANY);
	if (b % 16 == 0)
		bpf_map_push_elem(&pushed, &key, BPF_EXIST);
	bpf_ringbuf_output(&events, &key, sizeof(key), 0);
	bpf_perf_event_output(ctx, &perf, BPF_F_CURRENT_CPU, &key, sizeof(key));
	__sync_fetch_and_add(&calls, 1);
	return 0;
}
