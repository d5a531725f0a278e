// Bad input to bpf() and perf_event_open(), as a loader with bugs would pass it, after a
// uprobe program is loaded (so that under bpftime-rs the object is sealed and the shim serves
// the calls). One line per call: `NAME ok` or `NAME errno ENAME`. Run on the kernel and under
// `bpftime-rs load --`, the lines must agree, except those the shim documents as different
// (marked `shim-differs:`). `bad_calls BINARY FILE_OFFSET` (a function in BINARY).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* bpf_link_info of a perf link as Linux 6.6+ lays it out (Debian 12's linux/bpf.h predates the
 * perf_event member). */
struct perf_link_info {
	uint32_t type, id, prog_id, pad0;
	uint32_t perf_type, pad1;
	uint64_t file_name;
	uint32_t name_len, offset;
	uint64_t cookie, ref_ctr_offset;
	uint8_t rest[64];
};

static long sys_bpf(int cmd, void *attr, unsigned int size)
{
	return syscall(__NR_bpf, cmd, attr, size);
}

static void report(const char *name, long r)
{
	if (r < 0)
		printf("%s errno %d %s\n", name, errno, strerrorname_np(errno) ?: "?");
	else
		printf("%s ok\n", name);
	fflush(stdout);
}

static int map_create(int type, int key, int value, int max)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_type = type;
	a.key_size = key;
	a.value_size = value;
	a.max_entries = max;
	return sys_bpf(BPF_MAP_CREATE, &a, sizeof(a));
}

/* BTF for `struct pair { u64 a; struct bpf_spin_lock lock; u64 b; }` (type 4), keyed by a
 * u32 (type 5): a map value with a spin lock, which BPF_F_LOCK copies under. */
static int pair_btf_load(void)
{
	static const char strs[] = "\0u64\0int\0bpf_spin_lock\0val\0pair\0a\0lock\0b\0u32";
	enum { S_U64 = 1, S_INT = 5, S_LOCK_T = 9, S_VAL = 23, S_PAIR = 27, S_A = 32, S_LOCK = 34,
	       S_B = 39, S_U32 = 41 };
	uint32_t types[] = {
		/* [1] u64 */ S_U64, 1u << 24, 8, 64,
		/* [2] int */ S_INT, 1u << 24, 4, (1u << 24) | 32,
		/* [3] struct bpf_spin_lock { int val; } */ S_LOCK_T, (4u << 24) | 1, 4,
		S_VAL, 2, 0,
		/* [4] struct pair */ S_PAIR, (4u << 24) | 3, 24,
		S_A, 1, 0, S_LOCK, 3, 64, S_B, 1, 128,
		/* [5] u32 */ S_U32, 1u << 24, 4, 32,
	};
	struct {
		uint16_t magic;
		uint8_t version, flags;
		uint32_t hdr_len, type_off, type_len, str_off, str_len;
	} hdr = { 0xeb9f, 1, 0, 24, 0, sizeof(types), sizeof(types), sizeof(strs) };
	static char blob[24 + 256 + 64];
	union bpf_attr a;

	memcpy(blob, &hdr, sizeof(hdr));
	memcpy(blob + 24, types, sizeof(types));
	memcpy(blob + 24 + sizeof(types), strs, sizeof(strs));
	memset(&a, 0, sizeof(a));
	a.btf = (uintptr_t)blob;
	a.btf_size = 24 + sizeof(types) + sizeof(strs);
	return sys_bpf(BPF_BTF_LOAD, &a, sizeof(a));
}

static int pair_map_create(int btf)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_type = BPF_MAP_TYPE_HASH;
	a.key_size = 4;
	a.value_size = 24;
	a.max_entries = 4;
	a.btf_fd = btf;
	a.btf_key_type_id = 5;
	a.btf_value_type_id = 4;
	return sys_bpf(BPF_MAP_CREATE, &a, sizeof(a));
}

static long elem(int cmd, int fd, const void *key, void *value, uint64_t flags)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_fd = fd;
	a.key = (uintptr_t)key;
	a.value = (uintptr_t)value;
	a.flags = flags;
	return sys_bpf(cmd, &a, sizeof(a));
}

static int prog_load(void)
{
	/* r0 = 0; exit */
	struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.prog_type = BPF_PROG_TYPE_KPROBE;
	a.insns = (uintptr_t)insns;
	a.insn_cnt = 2;
	a.license = (uintptr_t) "GPL";
	return sys_bpf(BPF_PROG_LOAD, &a, sizeof(a));
}

static int uprobe_type(void)
{
	FILE *f = fopen("/sys/bus/event_source/devices/uprobe/type", "r");
	int t = -1;

	if (!f || fscanf(f, "%d", &t) != 1)
		t = -1;
	if (f)
		fclose(f);
	return t;
}

static int uprobe_open(const char *path, unsigned long long offset, uint64_t path_ptr)
{
	struct perf_event_attr a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.type = uprobe_type();
	a.config1 = path_ptr ? path_ptr : (uintptr_t)path;
	a.config2 = offset;
	return syscall(__NR_perf_event_open, &a, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
}

static long lookup(int fd, const void *key, void *value)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_fd = fd;
	a.key = (uintptr_t)key;
	a.value = (uintptr_t)value;
	return sys_bpf(BPF_MAP_LOOKUP_ELEM, &a, sizeof(a));
}

int main(int argc, char **argv)
{
	union bpf_attr a;
	uint64_t value;
	uint32_t key;
	int array, hash, prog, event, link;

	if (argc != 3) {
		fprintf(stderr, "usage: %s BINARY FILE_OFFSET\n", argv[0]);
		return 2;
	}
	unsigned long long offset = strtoull(argv[2], NULL, 0);

	array = map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 4);
	report("array_create", array);
	hash = map_create(BPF_MAP_TYPE_HASH, 4, 8, 16);
	report("hash_create", hash);
	int btf = pair_btf_load();
	report("pair_btf_load", btf);
	int pairs = pair_map_create(btf);
	report("pair_map_create", pairs);
	prog = prog_load();
	report("kprobe_prog_load", prog);
	if (array < 0 || hash < 0 || prog < 0)
		return 1;

	key = 1;
	report("lookup_bad_fd", lookup(-1, &key, &value));
	report("lookup_closed_fd", lookup(1000, &key, &value));
	report("bpf_bad_attr_pointer", sys_bpf(BPF_MAP_LOOKUP_ELEM, (void *)8, sizeof(a)));
	report("lookup_bad_key_pointer", lookup(array, (void *)8, &value));
	report("lookup_bad_value_pointer", lookup(array, &key, (void *)8));
	key = 4;
	report("lookup_index_out_of_range", lookup(array, &key, &value));
	key = 7;
	report("hash_lookup_missing_key", lookup(hash, &key, &value));
	memset(&a, 0, sizeof(a));
	a.map_fd = hash;
	a.key = (uintptr_t)&key;
	a.value = (uintptr_t)&value;
	a.flags = BPF_EXIST;
	value = 1;
	report("hash_update_exist_missing", sys_bpf(BPF_MAP_UPDATE_ELEM, &a, sizeof(a)));
	a.flags = 99;
	report("hash_update_bad_flags", sys_bpf(BPF_MAP_UPDATE_ELEM, &a, sizeof(a)));
	report("unknown_command", sys_bpf(999, &a, sizeof(a)));
	void *m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, hash, 0);
	report("mmap_hash_map", m == MAP_FAILED ? -1 : 0);

	report("uprobe_bad_path_pointer", uprobe_open(NULL, offset, 8));
	report("uprobe_missing_file", uprobe_open("/nonexistent/bpftime-test", offset, 0));
	event = uprobe_open(argv[1], offset, 0);
	report("uprobe_open", event);
	if (event < 0)
		return 1;
	report("uprobe_unknown_ioctl", ioctl(event, _IO('$', 0x7f), 0));

	memset(&a, 0, sizeof(a));
	a.link_create.prog_fd = array; /* a map, not a program */
	a.link_create.target_fd = event;
	a.link_create.attach_type = BPF_PERF_EVENT;
	report("link_create_map_as_prog", sys_bpf(BPF_LINK_CREATE, &a, sizeof(a)));
	a.link_create.prog_fd = 1000; /* not open */
	report("link_create_closed_prog", sys_bpf(BPF_LINK_CREATE, &a, sizeof(a)));
	a.link_create.prog_fd = prog;
	link = sys_bpf(BPF_LINK_CREATE, &a, sizeof(a));
	report("link_create", link);
	if (link >= 0) {
		struct perf_link_info info;
		char name[256] = "";

		memset(&a, 0, sizeof(a));
		memset(&info, 0, sizeof(info));
		info.file_name = (uintptr_t)name;
		info.name_len = sizeof(name);
		a.info.bpf_fd = link;
		a.info.info_len = sizeof(info);
		a.info.info = (uintptr_t)&info;
		report("link_info", sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &a, sizeof(a)));
		printf("link_info type=%u prog_id_set=%d perf_type=%u offset=0x%x cookie=%llu "
		       "name=%s name_len=%u\n",
		       info.type, info.prog_id != 0, info.perf_type, info.offset,
		       (unsigned long long)info.cookie, name, info.name_len);
		memset(&a, 0, sizeof(a));
		a.info.bpf_fd = event;
		a.info.info_len = sizeof(info);
		a.info.info = (uintptr_t)&info;
		report("event_info", sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &a, sizeof(a)));
		report("link_close", close(link));
	}
	/* BPF_F_LOCK on a value with a spin lock, and on one without (after the link: under
	 * bpftime-rs the object is sealed now, and user space serves the maps). */
	{
		uint64_t pair[3] = { 5, 0xdeadbeef, 6 }, out[3] = { 0, 0, 0 };

		key = 1;
		report("pair_update_f_lock", elem(BPF_MAP_UPDATE_ELEM, pairs, &key, pair, BPF_F_LOCK));
		report("pair_update_f_lock_noexist",
		       elem(BPF_MAP_UPDATE_ELEM, pairs, &key, pair, BPF_F_LOCK | BPF_NOEXIST));
		pair[0] = 9;
		pair[2] = 10;
		report("pair_update_f_lock_exist",
		       elem(BPF_MAP_UPDATE_ELEM, pairs, &key, pair, BPF_F_LOCK | BPF_EXIST));
		report("pair_lookup_f_lock", elem(BPF_MAP_LOOKUP_ELEM, pairs, &key, out, BPF_F_LOCK));
		printf("pair a=%llu lock=%llu b=%llu\n", (unsigned long long)out[0],
		       (unsigned long long)out[1], (unsigned long long)out[2]);
		report("pair_lookup_bad_flags", elem(BPF_MAP_LOOKUP_ELEM, pairs, &key, out, BPF_EXIST));
		report("hash_update_f_lock", elem(BPF_MAP_UPDATE_ELEM, hash, &key, &value, BPF_F_LOCK));
		report("hash_lookup_f_lock", elem(BPF_MAP_LOOKUP_ELEM, hash, &key, &value, BPF_F_LOCK));
	}
	report("event_close", close(event));

	/* A forked child (what popen() without posix_spawn does) closes and uses descriptors. */
	fflush(stdout);
	pid_t child = fork();
	if (child == 0) {
		key = 1;
		int r = lookup(array, &key, &value) == 0 && close(hash) == 0 ? 0 : 1;
		_exit(r);
	}
	int child_status = 0;
	waitpid(child, &child_status, 0);
	report("forked_child_lookup_close",
	       WIFEXITED(child_status) && WEXITSTATUS(child_status) == 0 ? 0 : -1);

	/* A syscall tracepoint (served by the kernel only, so refused under the shim). */
	FILE *idf = fopen("/sys/kernel/tracing/events/syscalls/sys_enter_getpid/id", "r");
	int tp_id = -1;

	if (!idf)
		idf = fopen("/sys/kernel/debug/tracing/events/syscalls/sys_enter_getpid/id", "r");
	if (idf && fscanf(idf, "%d", &tp_id) != 1)
		tp_id = -1;
	if (idf)
		fclose(idf);
	if (tp_id >= 0) {
		struct perf_event_attr tp;
		int tp_fd;

		memset(&tp, 0, sizeof(tp));
		tp.size = sizeof(tp);
		tp.type = PERF_TYPE_TRACEPOINT;
		tp.config = tp_id;
		tp_fd = syscall(__NR_perf_event_open, &tp, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
		report("shim-differs: tracepoint_open", tp_fd);
		if (tp_fd >= 0)
			close(tp_fd);
	} else {
		printf("no tracefs: sys_enter_getpid not found\n");
	}
	printf("done\n");
	return 0;
}
