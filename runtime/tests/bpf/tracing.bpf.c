// BTF-attached tracing programs: the verifier gate resolves their attach BTF id in vmlinux.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

__u64 calls;

SEC("fentry/do_unlinkat")
int BPF_PROG(on_unlink, int dfd, struct filename *name)
{
	__sync_fetch_and_add(&calls, 1);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(on_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__sync_fetch_and_add(&calls, prev->pid > 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
