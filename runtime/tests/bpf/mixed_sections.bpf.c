// An object mixing uprobes with a SEC("syscall") program (unknown to aya-obj 0.3), a section name
// nobody knows, and a program calling bpf_override_return (rejected by this kernel for kprobes).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

SEC("uprobe/victim:work")
int on_work(struct pt_regs *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&hits, &k);
	if (v)
		__sync_fetch_and_add(v, 1);
	return 0;
}

SEC("uprobe/victim:work")
int on_work_too(struct pt_regs *ctx)
{
	__u32 k = 1;
	__u64 *v = bpf_map_lookup_elem(&hits, &k);
	if (v)
		__sync_fetch_and_add(v, 2);
	bpf_ringbuf_output(&events, &k, sizeof(k), 0);
	return 0;
}

SEC("kprobe/__x64_sys_getpid")
int override(struct pt_regs *ctx)
{
	bpf_override_return(ctx, -1);
	return 0;
}

SEC("syscall")
int sys_prog(void *ctx)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&hits, &k);
	return v ? 1 : 0;
}

SEC("weird_unknown_section/abc")
int weird(void *ctx)
{
	return 42;
}

SEC(".note.weird") int weird_data = 5;

char LICENSE[] SEC("license") = "GPL";
