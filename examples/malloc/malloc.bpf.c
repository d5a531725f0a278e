// malloc in libc: calls and bytes per process, a log2 histogram of sizes per process, latency
// (uprobe -> uretprobe) as a log2 histogram, and two deterministic maps for comparing the kernel
// with the userspace runtime: exact counts of allocations whose size is in [MARK_LO, MARK_HI)
// (a range only the victim uses on purpose), and how many of those returned a 16-byte aligned,
// non-NULL pointer (seen by the uretprobe).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define MARK_LO 700
#define MARK_HI 800
#define SLOTS 64

struct alloc_stats {
	__u64 calls;
	__u64 bytes;
};

// (process, slot): slot is a log2 bucket in `sizes`, an exact size in `marked*`.
struct tgid_slot {
	__u32 tgid;
	__u32 slot;
};

// What the uprobe leaves for the uretprobe of the same call (keyed by thread).
struct pending {
	__u64 start_ns;
	__u64 size;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct alloc_stats);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tgid_slot);
	__type(value, __u64);
} sizes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tgid_slot);
	__type(value, __u64);
} marked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tgid_slot);
	__type(value, __u64);
} marked_ret SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct pending);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} latency_ns SEC(".maps");

// floor(log2(v)) for v > 0, 0 for 0; branch-light so the verifier sees no loop.
static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0, s;

	s = (v > 0xFFFFFFFFULL) << 5; v >>= s; r |= s;
	s = (v > 0xFFFF) << 4; v >>= s; r |= s;
	s = (v > 0xFF) << 3; v >>= s; r |= s;
	s = (v > 0xF) << 2; v >>= s; r |= s;
	s = (v > 0x3) << 1; v >>= s; r |= s;
	r |= (v >> 1);
	return r;
}

// Adds one to a per-(process, slot) counter, creating it at 0 first. Two threads creating the
// same key race on BPF_NOEXIST and both then add to the one entry that won.
static __always_inline void bump(void *map, struct tgid_slot *key)
{
	__u64 *count = bpf_map_lookup_elem(map, key);

	if (!count) {
		__u64 zero = 0;

		bpf_map_update_elem(map, key, &zero, BPF_NOEXIST);
		count = bpf_map_lookup_elem(map, key);
		if (!count)
			return;
	}
	__sync_fetch_and_add(count, 1);
}

SEC("uprobe/libc.so.6:malloc")
int BPF_KPROBE(malloc_enter, __u64 size)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct alloc_stats *st = bpf_map_lookup_elem(&stats, &tgid);
	struct tgid_slot key = { .tgid = tgid, .slot = log2_u64(size) };
	struct pending p = { .start_ns = bpf_ktime_get_ns(), .size = size };

	if (!st) {
		struct alloc_stats zero = {};

		bpf_map_update_elem(&stats, &tgid, &zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&stats, &tgid);
	}
	if (st) {
		__sync_fetch_and_add(&st->calls, 1);
		__sync_fetch_and_add(&st->bytes, size);
	}
	bump(&sizes, &key);
	if (size >= MARK_LO && size < MARK_HI) {
		key.slot = size;
		bump(&marked, &key);
	}
	bpf_map_update_elem(&pending, &id, &p, BPF_ANY);
	return 0;
}

SEC("uretprobe/libc.so.6:malloc")
int BPF_KRETPROBE(malloc_exit, void *ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending *p = bpf_map_lookup_elem(&pending, &id);
	__u64 delta, size;
	__u32 slot;
	__u64 *count;

	if (!p)
		return 0;
	// Copied before the delete: the element may be reused once it is deleted.
	delta = bpf_ktime_get_ns() - p->start_ns;
	size = p->size;
	bpf_map_delete_elem(&pending, &id);

	slot = log2_u64(delta);
	if (slot >= SLOTS)
		slot = SLOTS - 1;
	count = bpf_map_lookup_elem(&latency_ns, &slot);
	if (count)
		__sync_fetch_and_add(count, 1);

	if (size >= MARK_LO && size < MARK_HI && ret && ((__u64)ret & 15) == 0) {
		struct tgid_slot key = { .tgid = id >> 32, .slot = size };

		bump(&marked_ret, &key);
	}
	return 0;
}
