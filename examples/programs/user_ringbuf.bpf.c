// Commands from user space through a USER_RINGBUF: each vt_add call drains the ring, adding
// each command's amount to its key's total, until a stop command (key 999, counted as
// drained) ends that drain; the rest waits for the next call. How many records each call
// drained is counted too, so the stop, a discarded record and the empty drains afterwards
// all show.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct command {
	__u64 key;
	__u64 amount;
};

struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 16 * 4096);
} commands SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} totals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __s64);
	__type(value, __u64);
} drained SEC(".maps"); /* records one drain call took (or -errno) -> calls */

static void add(void *map, __s64 key, __u64 amount)
{
	__u64 *v = bpf_map_lookup_elem(map, &key);

	if (v)
		__sync_fetch_and_add(v, amount);
	else
		bpf_map_update_elem(map, &key, &amount, BPF_NOEXIST);
}

static long apply(struct bpf_dynptr *record, void *ctx)
{
	struct command c;

	if (bpf_dynptr_read(&c, sizeof(c), record, 0, 0))
		return 1;
	if (c.key == 999)
		return 1;
	add(&totals, c.key, c.amount);
	return 0;
}

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(drain_commands)
{
	add(&drained, bpf_user_ringbuf_drain(&commands, apply, NULL, 0), 1);
	return 0;
}
