// uprobe reading its first argument through CO-RE (PT_REGS_PARM1 on struct pt_regs) and counting
// calls per argument value in a hash map with an atomic add.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} counts SEC(".maps");

SEC("uprobe//usr/bin/victim:target_fn")
int count_arg(struct pt_regs *ctx)
{
	__u64 arg = PT_REGS_PARM1_CORE(ctx);
	__u64 one = 1, *v;

	v = bpf_map_lookup_elem(&counts, &arg);
	if (v) {
		__sync_fetch_and_add(v, 1);
	} else {
		bpf_map_update_elem(&counts, &arg, &one, BPF_NOEXIST);
	}
	return 0;
}

SEC("uretprobe//usr/lib/libc.so.6:malloc+16")
int ret_probe(struct pt_regs *ctx)
{
	__u64 rc = PT_REGS_RC(ctx);
	__u64 *v = bpf_map_lookup_elem(&counts, &rc);
	if (v)
		__sync_fetch_and_add(v, 1);
	return 0;
}

/* Field existence and size relocations on a kernel struct. */
SEC("uprobe")
int core_probe(struct pt_regs *ctx)
{
	__u64 r = 0;
	if (bpf_core_field_exists(ctx->si))
		r += bpf_core_field_size(ctx->si);
	r += BPF_CORE_READ(ctx, dx);
	return r;
}

/* Type- and enum-based CO-RE relocations. */
SEC("uprobe")
int core_types(struct pt_regs *ctx)
{
	__u64 r = 0;

	if (bpf_core_type_exists(struct pt_regs))
		r += 1000;
	r += bpf_core_type_size(struct pt_regs);
	r += bpf_core_enum_value(enum bpf_map_type, BPF_MAP_TYPE_RINGBUF);
	if (bpf_core_enum_value_exists(enum bpf_map_type, BPF_MAP_TYPE_RINGBUF))
		r += 100000;
	if (bpf_core_type_id_kernel(struct task_struct))
		r += 1000000;
	return r;
}

/* A field this kernel does not have: existence is 0 and the guarded read is poisoned (dead code). */
struct pt_regs___missing {
	unsigned long no_such_field;
} __attribute__((preserve_access_index));

SEC("uprobe")
int core_missing(struct pt_regs *ctx)
{
	struct pt_regs___missing *m = (void *)ctx;

	if (bpf_core_field_exists(m->no_such_field))
		return m->no_such_field;
	return 7;
}

char LICENSE[] SEC("license") = "GPL";
