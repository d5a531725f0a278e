// .rodata config, .data and .bss globals, used through BPF_PSEUDO_MAP_VALUE relocations.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

const volatile __u32 config_factor = 3;
const volatile __u64 config_limit = 1000;
__u64 data_counter = 7;
__u32 data_array[4] = { 1, 2, 3, 4 };
__u64 bss_total;
__u64 bss_calls;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} arr SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_write")
int use_globals(void *ctx)
{
	__u32 k = 2;
	__u64 *slot = bpf_map_lookup_elem(&arr, &k);
	__sync_fetch_and_add(&bss_calls, 1);
	bss_total += config_factor * data_array[2];
	if (bss_total > config_limit)
		bss_total = 0;
	data_counter++;
	bpf_printk("total %llu", bss_total);
	if (slot)
		*slot = bss_total;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
