// SPDX-License-Identifier: (MIT OR Apache-2.0)
/*
 * Kernel-side consumer for the UserRingBuf integration tests
 * (kernel-bridge/tests/user_ringbuf.rs).
 *
 * An XDP program is used only because aya 0.14 can run it on demand with
 * BPF_PROG_TEST_RUN, which makes every drain deterministic: each test run
 * drains the user ringbuf once and echoes every sample, truncated to ECHO_MAX
 * bytes, into a kernel ringbuf that the test reads back with aya's RingBuf.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* Must match the constants and the record layout in the Rust test. */
#define ECHO_MAX 256
#define LEN_SHORT 0xffffffffu /* sample shorter than its 4-byte length prefix */

/* Small on purpose: the tests fill it and wrap around it many times. */
struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 16 * 1024);
} user_ringbuf SEC(".maps");

/* Large enough for one full drain of user_ringbuf (at most 16 KiB / 8 B samples). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);
} echo SEC(".maps");

/* Slot 0: echo records lost because `echo` was full; a test must see 0. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} echo_drops SEC(".maps");

struct echo_rec {
	__u32 len; /* the sample's own u32 length prefix, or LEN_SHORT */
	__u32 len_exact; /* 1 if the kernel's sample size equals `len` */
	__u32 copied; /* bytes of the sample in data[] */
	__u32 pad;
	__u8 data[ECHO_MAX];
};

/*
 * Every test sample starts with its own total length as a u32. The kernel's
 * size of the dynptr would be simpler, but bpf_dynptr_size() is a kfunc and
 * aya 0.14 cannot relocate kfunc calls. Two zero-length reads check the
 * prefix instead: a read at offset `off` succeeds exactly when off <= size.
 */
static long echo_sample(struct bpf_dynptr *dynptr, void *ctx)
{
	struct echo_rec *rec;
	__u32 key = 0, len = 0, copied;
	__u64 *drops;
	char unused;

	rec = bpf_ringbuf_reserve(&echo, sizeof(*rec), 0);
	if (!rec) {
		drops = bpf_map_lookup_elem(&echo_drops, &key);
		if (drops)
			__sync_fetch_and_add(drops, 1);
		return 0;
	}
	rec->len_exact = 0;
	rec->copied = 0;
	rec->pad = 0;
	if (bpf_dynptr_read(&len, sizeof(len), dynptr, 0, 0)) {
		rec->len = LEN_SHORT;
		bpf_ringbuf_submit(rec, 0);
		return 0;
	}
	rec->len = len;
	if (bpf_dynptr_read(&unused, 0, dynptr, len, 0) == 0 &&
	    bpf_dynptr_read(&unused, 0, dynptr, len + 1, 0) != 0)
		rec->len_exact = 1;
	copied = len < ECHO_MAX ? len : ECHO_MAX;
	if (bpf_dynptr_read(rec->data, copied, dynptr, 0, 0) == 0)
		rec->copied = copied;
	bpf_ringbuf_submit(rec, 0);
	return 0;
}

/* Returns the drain's result: the number of samples drained, or a negative errno. */
SEC("xdp")
int drain(struct xdp_md *ctx)
{
	return bpf_user_ringbuf_drain(&user_ringbuf, echo_sample, NULL, 0);
}
