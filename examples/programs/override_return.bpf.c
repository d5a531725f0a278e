// For the agent's bpf_override_return test: vt_add returns a * 100 instead of running (the
// victim's printed sum then tells whether the override reached the caller). The kernel cannot
// run this program (no CONFIG_BPF_KPROBE_OVERRIDE, and never for uprobes); the verifier gate
// checks it with bpf_get_func_ip in the call's place.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(replace_add, long a, long b)
{
	bpf_override_return(ctx, a * 100);
	return 0;
}
