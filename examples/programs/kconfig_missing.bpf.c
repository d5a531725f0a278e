// A strong __kconfig extern the kernel configuration does not set: libbpf refuses the object
// ("extern ... (strong): not resolved"); bpftime-rs refuses the program that reads it, with
// the extern's name, and keeps the one that does not.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

extern int CONFIG_BPFTIME_NO_SUCH_OPTION __kconfig;
/* sorts first in libbpf's layout, so the unresolved extern's place is not offset 0 */
extern int CONFIG_A_BPFTIME_ABSENT __kconfig __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(needs_missing)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&hits, &k);

	if (v)
		*v += CONFIG_BPFTIME_NO_SUCH_OPTION;
	return 0;
}

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(plain)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&hits, &k);

	if (v)
		*v += 1 + CONFIG_A_BPFTIME_ABSENT;
	return 0;
}
