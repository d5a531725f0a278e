// A user's own kernel program reading a map that bpftime-rs syncs: it declares the map with
// LIBBPF_PIN_BY_NAME and the same shape, and is opened with libbpf's pin_root_path set to
// /sys/fs/bpf/bpftime-rs/<object>, so libbpf reuses the pinned mirror instead of creating one.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hits SEC(".maps");

struct reader_args {
	__u32 key;
	__u32 found;
	__u64 value;
};

SEC("syscall")
int read_hit(struct reader_args *args)
{
	__u32 key = args->key;
	__u64 *value = bpf_map_lookup_elem(&hits, &key);

	args->found = value != 0;
	args->value = value ? *value : 0;
	return 0;
}
