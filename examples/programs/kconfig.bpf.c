// __kconfig externs as libbpf resolves them: virtual LINUX_* values, CONFIG_* options of every
// kcfg type (int, bool, tristate, char, char array, a hex number) and __weak options the
// kernel configuration lacks (read as 0). Each vt_add call stores what it read in `seen`;
// a `const volatile`-style branch on an absent option stays dead code.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

extern __u32 LINUX_KERNEL_VERSION __kconfig;
extern bool LINUX_HAS_BPF_COOKIE __kconfig;
extern int CONFIG_HZ __kconfig;
extern bool CONFIG_BPF_SYSCALL __kconfig;
extern enum libbpf_tristate CONFIG_EXT4_FS __kconfig;
extern char CONFIG_X86_64 __kconfig;
extern char CONFIG_DEFAULT_HOSTNAME[8] __kconfig;
extern unsigned long CONFIG_ILLEGAL_POINTER_VALUE __kconfig;
extern bool CONFIG_COMPILE_TEST __kconfig __weak;
extern int CONFIG_BPFTIME_NO_SUCH_OPTION __kconfig __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 12);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

static void put(__u32 slot, __u64 value)
{
	__u64 *v = bpf_map_lookup_elem(&seen, &slot);

	if (v)
		*v = value;
}

SEC("uprobe/victim:vt_add")
int BPF_KPROBE(read_kconfig, long a, long b)
{
	__u64 host = 0;
	__u32 calls = 11;
	__u64 *n;

	__builtin_memcpy(&host, CONFIG_DEFAULT_HOSTNAME, sizeof(host));
	put(0, LINUX_KERNEL_VERSION);
	put(1, LINUX_HAS_BPF_COOKIE);
	put(2, CONFIG_HZ);
	put(3, CONFIG_BPF_SYSCALL);
	put(4, CONFIG_EXT4_FS);
	put(5, CONFIG_X86_64);
	put(6, host);
	put(7, CONFIG_ILLEGAL_POINTER_VALUE);
	put(8, CONFIG_COMPILE_TEST);
	put(9, CONFIG_BPFTIME_NO_SUCH_OPTION);
	/* absent option: the verifier proves this branch dead */
	if (CONFIG_BPFTIME_NO_SUCH_OPTION)
		put(10, bpf_get_prandom_u32());
	n = bpf_map_lookup_elem(&seen, &calls);
	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}
