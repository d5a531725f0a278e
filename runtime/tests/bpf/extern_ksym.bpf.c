// One program uses a __ksym extern (unsupported by the loader: it must be skipped with an error
// naming its section and instruction), the other is ordinary and must still load.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

extern const int bpf_prog_active __ksym;

SEC("raw_tp/sys_enter")
int uses_ksym(void *ctx)
{
	return bpf_prog_active;
}

SEC("raw_tp/sys_exit")
int plain(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
