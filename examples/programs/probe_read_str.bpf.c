// bpf_probe_read_user_str: counts vt_message calls per message (the first 15 bytes).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct word {
	char text[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct word);
	__type(value, __u64);
} by_word SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} copied_bytes SEC(".maps");

SEC("uprobe/victim:vt_message")
int BPF_KPROBE(count_words, const char *msg, int len)
{
	struct word w = {};
	__u64 one = 1, *count;
	__u32 zero = 0;
	long copied = bpf_probe_read_user_str(w.text, sizeof(w.text), msg);

	if (copied <= 0)
		return 0;
	count = bpf_map_lookup_elem(&copied_bytes, &zero);
	if (count)
		__sync_fetch_and_add(count, copied);
	count = bpf_map_lookup_elem(&by_word, &w);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		bpf_map_update_elem(&by_word, &w, &one, BPF_NOEXIST);
	return 0;
}
