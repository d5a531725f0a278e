// Longest-prefix matching: each vt_add(a, b) call looks a 32-bit address made from b up in an
// LPM trie; a hit counts on the longest stored prefix that covers it, a miss stores a new
// prefix of 4 * (a + 1) bits of that address. The trie fills up (64 prefixes), so later
// misses are refused.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

struct prefix {
	__u32 prefixlen;
	__u32 addr; /* network order: the first bits are the high ones */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct prefix);
	__type(value, __u64);
} prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} outcomes SEC(".maps"); /* [0] hits, [1] prefixes stored, [2] stores refused */

static void bump(__u32 key)
{
	__u64 *n = bpf_map_lookup_elem(&outcomes, &key);

	if (n)
		__sync_fetch_and_add(n, 1);
}

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(match_prefix, long a, long b)
{
	struct prefix p = {32, bpf_htonl((__u32)b * 2654435761u)};
	__u64 zero = 0, *hits = bpf_map_lookup_elem(&prefixes, &p);

	if (hits) {
		__sync_fetch_and_add(hits, 1);
		bump(0);
		return 0;
	}
	p.prefixlen = 4 * (a + 1);
	bump(bpf_map_update_elem(&prefixes, &p, &zero, BPF_NOEXIST) == 0 ? 1 : 2);
	return 0;
}
