// The sync scale tests' program: every call writes a distinct key, through the update helper
// (vk_put), through the looked-up value pointer (vk_bump) or deletes it (vk_del), into a large
// HASH and a smaller LRU_HASH (which evicts), so the forwarder must carry many distinct keys.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__type(key, __u32);
	__type(value, __u64);
} keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u32);
	__type(value, __u64);
} recent SEC(".maps");

SEC("uprobe/victim_keys:vk_put")
int BPF_KPROBE(put, __u32 key, __u64 value)
{
	bpf_map_update_elem(&keys, &key, &value, BPF_ANY);
	bpf_map_update_elem(&recent, &key, &value, BPF_ANY);
	return 0;
}

SEC("uprobe/victim_keys:vk_bump")
int BPF_KPROBE(bump, __u32 key, __u64 by)
{
	__u64 *v = bpf_map_lookup_elem(&keys, &key);

	if (v)
		__sync_fetch_and_add(v, by);
	v = bpf_map_lookup_elem(&recent, &key);
	if (v)
		__sync_fetch_and_add(v, by);
	return 0;
}

SEC("uprobe/victim_keys:vk_del")
int BPF_KPROBE(del, __u32 key)
{
	bpf_map_delete_elem(&keys, &key);
	bpf_map_delete_elem(&recent, &key);
	return 0;
}
