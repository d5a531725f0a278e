// For `bpftime-rs run` tests: results that depend on the context, so a run that read nothing
// (or the wrong bytes) cannot print the expected r0.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

// a * 1000 + b: pt_regs(5, 9) gives 5009.
SEC("uprobe/victim:vt_add")
int BPF_KPROBE(weighted_args, long a, long b)
{
	return a * 1000 + b;
}

// The sixth argument (r9, at byte 64 of struct pt_regs) plus 1: a context file shorter than
// pt_regs is zero-padded, so a 16-byte file gives 1.
SEC("uprobe/victim:vt_add")
int sixth_arg(struct pt_regs *ctx)
{
	return ctx->r9 + 1;
}
