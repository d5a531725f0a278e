// USDT probes of victim_usdt through libbpf's usdt.bpf.h: BPF_USDT argument reads (register,
// stack, constant and Scale-Index-Base operands, sign extension of narrow ones),
// bpf_usdt_arg_cnt, an argument number past the count, and a probe behind a semaphore that
// fires only while the tracer holds the semaphore up. BPF_OUT_DIR is the build's output
// directory (where victim_usdt is). Built twice: against the system's libbpf headers and
// against libbpf-sys's (their struct __bpf_usdt_spec differ; only the newer reads SIB operands).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>

char LICENSE[] SEC("license") = "GPL";

#define VICTIM BPF_OUT_DIR "/victim_usdt"

// Slots: 0 vt:add calls, 1 sum of its first argument, 2 sum of its second, 3 its arg count,
// 4 vt:konst calls, 5 sum of its argument, 6 its arg count, 7 what bpf_usdt_arg answers for an
// argument past the count, 8 vt:sem calls, 9 sum of its three arguments (as signed), 10 its
// arg count, 11 its third argument's sum (a char, sign-extended), 12 vt:sib's argument sum.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 13);
	__type(key, __u32);
	__type(value, __s64);
} totals SEC(".maps");

// vt:sem's second argument by its first: every distinct key the probe saw.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __s64);
	__type(value, __s64);
} sem_args SEC(".maps");

static void add(__u32 slot, __s64 v)
{
	__s64 *p = bpf_map_lookup_elem(&totals, &slot);

	if (p)
		__sync_fetch_and_add(p, v);
}

static void set(__u32 slot, __s64 v)
{
	bpf_map_update_elem(&totals, &slot, &v, BPF_ANY);
}

SEC("usdt/" VICTIM ":vt:add")
int BPF_USDT(on_add, int small, long big)
{
	add(0, 1);
	add(1, small);
	add(2, big);
	set(3, bpf_usdt_arg_cnt(ctx));
	return 0;
}

SEC("usdt/" VICTIM ":vt:konst")
int BPF_USDT(on_konst, long k)
{
	long past = 0;

	add(4, 1);
	add(5, k);
	set(6, bpf_usdt_arg_cnt(ctx));
	set(7, bpf_usdt_arg(ctx, 1, &past));
	return 0;
}

SEC("usdt/" VICTIM ":vt:sem")
int BPF_USDT(on_sem, int a, int b, char c)
{
	__s64 key = a, value = b;

	add(8, 1);
	add(9, (__s64)a + b + c);
	set(10, bpf_usdt_arg_cnt(ctx));
	add(11, c);
	bpf_map_update_elem(&sem_args, &key, &value, BPF_ANY);
	return 0;
}

SEC("usdt/" VICTIM ":vt:sib")
int BPF_USDT(on_sib, long v)
{
	add(12, v);
	return 0;
}
