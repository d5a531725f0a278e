// SPDX-License-Identifier: (MIT OR Apache-2.0)
/*
 * The classic user_ringbuf tutorial: user space writes samples into a
 * BPF_MAP_TYPE_USER_RINGBUF; whenever the process calls kill(), this program
 * drains them and echoes each as an event, tagged with the caller's pid and
 * comm, through a BPF_MAP_TYPE_RINGBUF.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "user_ringbuf.h"

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader: kill() calls from other processes must not consume our samples. */
const volatile __u32 target_tgid = 0;

struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 256 * 1024);
} user_ringbuf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} kernel_ringbuf SEC(".maps");

/* Slot 0: samples drained but not echoed (short sample or kernel ringbuf full). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

static void count_lost(void)
{
	__u32 key = 0;
	__u64 *n = bpf_map_lookup_elem(&lost, &key);

	if (n)
		__sync_fetch_and_add(n, 1);
}

/* Must be static: the verifier needs it as a BTF-described subprogram. */
static long echo_sample(struct bpf_dynptr *dynptr, void *ctx)
{
	struct user_sample sample;
	struct event *e;

	if (bpf_dynptr_read(&sample, sizeof(sample), dynptr, 0, 0)) {
		count_lost();
		return 0;
	}
	e = bpf_ringbuf_reserve(&kernel_ringbuf, sizeof(*e), 0);
	if (!e) {
		count_lost();
		return 0;
	}
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->seq = sample.seq;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	__builtin_memcpy(e->msg, sample.msg, sizeof(e->msg));
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp/syscalls/sys_exit_kill")
int kill_exit(void *ctx)
{
	if ((bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	bpf_user_ringbuf_drain(&user_ringbuf, echo_sample, NULL, 0);
	return 0;
}
