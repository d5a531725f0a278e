// SPDX-License-Identifier: GPL-2.0 OR MIT
// uprobe_tool: a plain libbpf application on a bpftool-generated skeleton. It attaches an entry
// and a return uprobe to one function of a binary, prints every ring buffer event, and at exit
// prints the entry histogram and the .bss counters.
//
//   uprobe_tool -b BINARY (-f FUNC | -o OFFSET) [-p PID] [-m MIN] [-n N] [-d SECONDS] [-v]
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <linux/types.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

/* The BPF side declares its globals with vmlinux.h's kernel type names; the skeleton repeats
 * them. */
typedef __u32 u32;
typedef __u64 u64;

#include "uprobe_tool.skel.h"

#define EVENT_ENTRY 0
#define EVENT_RETURN 1
#define MAX_HIST 64

/* Must match struct event in uprobe_tool.bpf.c. */
struct event {
	uint32_t pid;
	uint32_t kind;
	uint64_t value;
};

struct options {
	const char *binary;
	const char *func;
	const char *cgroup; /* -c: only calls from processes in this cgroup2 directory (or below) */
	unsigned long long commands; /* -U: commands sent through the USER_RINGBUF */
	const char *pin; /* -K: pin the histogram map there before exiting */
	unsigned long long buckets; /* -H: histogram buckets (the map resized before load) */
	long long offset; /* -1: attach by function name */
	int pid;
	unsigned long long min_arg;
	unsigned long long max_events; /* 0: until the deadline */
	double duration;
	bool verbose;
	bool perf; /* -P: events through a perf buffer instead of the ring buffer */
	bool batch; /* -B: read hist with bpf_map_lookup_batch instead of get_next_key */
	bool stacks; /* -S: count entries per user stack and print the stacks' depths */
	bool quiet; /* -q: count events instead of printing them (benchmarks) */
};

static volatile sig_atomic_t stop;
static bool verbose;
static bool quiet;
static unsigned long long lost_events;
static unsigned long long received;

static void usage(FILE *to, const char *prog)
{
	fprintf(to,
		"usage: %s -b BINARY (-f FUNC | -o OFFSET) [-p PID] [-m MIN] [-n N] [-d SECONDS] [-v]\n"
		"  -b BINARY   the binary to probe\n"
		"  -f FUNC     attach to this function (libbpf resolves it to a file offset)\n"
		"  -o OFFSET   attach at this file offset instead\n"
		"  -p PID      only this process (default -1: all processes)\n"
		"  -m MIN      report entries only for a first argument >= MIN (default 0)\n"
		"  -n N        exit after N ring buffer events (default 0: run until -d)\n"
		"  -d SECONDS  poll for at most SECONDS after attaching (default 10)\n"
		"  -P          receive events through a perf buffer instead of the ring buffer\n"
		"  -B          read the histogram with bpf_map_lookup_batch\n"
		"  -S          count entries per user stack; print each stack's depth and count\n"
		"  -c CGROUP   only calls of processes in this cgroup2 directory or below it\n"
		"  -U N        send N commands (1..N) through a user ring buffer; each entry applies one\n"
		"  -K PATH     pin the histogram map at PATH (in bpffs) before exiting\n"
		"  -H N        N histogram buckets (default 8; the map is resized before load)\n"
		"  -q          count events instead of printing them; print `received N` at exit\n"
		"  -v          print libbpf's messages on stderr\n",
		prog);
}

static int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list args)
{
	if (!verbose || level == LIBBPF_DEBUG)
		return 0;
	return vfprintf(stderr, fmt, args);
}

static void on_signal(int sig)
{
	stop = sig;
}

static bool parse_ull(const char *text, unsigned long long *out)
{
	char *end;

	if (*text == '\0' || *text == '-')
		return false;
	errno = 0;
	*out = strtoull(text, &end, 0);
	return errno == 0 && *end == '\0';
}

static int parse_args(int argc, char **argv, struct options *opts)
{
	unsigned long long value;
	char *end;
	int opt;

	while ((opt = getopt(argc, argv, "b:f:o:p:m:n:d:c:U:K:H:vPBSqh")) != -1) {
		switch (opt) {
		case 'b':
			opts->binary = optarg;
			break;
		case 'f':
			opts->func = optarg;
			break;
		case 'o':
			if (!parse_ull(optarg, &value) || value > INT64_MAX) {
				fprintf(stderr, "uprobe_tool: bad offset '%s'\n", optarg);
				return -1;
			}
			opts->offset = (long long)value;
			break;
		case 'p':
			errno = 0;
			opts->pid = (int)strtol(optarg, &end, 10);
			if (errno || *optarg == '\0' || *end != '\0' || opts->pid < -1) {
				fprintf(stderr, "uprobe_tool: bad pid '%s'\n", optarg);
				return -1;
			}
			break;
		case 'm':
			if (!parse_ull(optarg, &opts->min_arg)) {
				fprintf(stderr, "uprobe_tool: bad minimum '%s'\n", optarg);
				return -1;
			}
			break;
		case 'n':
			if (!parse_ull(optarg, &opts->max_events)) {
				fprintf(stderr, "uprobe_tool: bad event count '%s'\n", optarg);
				return -1;
			}
			break;
		case 'd':
			errno = 0;
			opts->duration = strtod(optarg, &end);
			if (errno || *optarg == '\0' || *end != '\0' || opts->duration <= 0) {
				fprintf(stderr, "uprobe_tool: bad duration '%s'\n", optarg);
				return -1;
			}
			break;
		case 'v':
			opts->verbose = true;
			break;
		case 'P':
			opts->perf = true;
			break;
		case 'B':
			opts->batch = true;
			break;
		case 'S':
			opts->stacks = true;
			break;
		case 'c':
			opts->cgroup = optarg;
			break;
		case 'K':
			opts->pin = optarg;
			break;
		case 'H':
			if (!parse_ull(optarg, &value) || value == 0 || value > 1000000) {
				fprintf(stderr, "uprobe_tool: bad bucket count '%s'\n", optarg);
				return -1;
			}
			opts->buckets = value;
			break;
		case 'U':
			if (!parse_ull(optarg, &value)) {
				fprintf(stderr, "uprobe_tool: bad command count '%s'\n", optarg);
				return -1;
			}
			opts->commands = value;
			break;
		case 'q':
			opts->quiet = true;
			break;
		case 'h':
			usage(stdout, argv[0]);
			exit(0);
		default:
			usage(stderr, argv[0]);
			return -1;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "uprobe_tool: unexpected argument '%s'\n", argv[optind]);
		return -1;
	}
	if (!opts->binary || (!opts->func) == (opts->offset < 0)) {
		fprintf(stderr, "uprobe_tool: need -b BINARY and exactly one of -f FUNC, -o OFFSET\n");
		usage(stderr, argv[0]);
		return -1;
	}
	return 0;
}

static int handle_event(void *ctx, void *data, size_t size)
{
	const struct event *e = data;

	(void)ctx;
	if (quiet) {
		received++;
		return 0;
	}
	if (size < sizeof(*e)) {
		fprintf(stderr, "uprobe_tool: short event (%zu bytes)\n", size);
		return 0;
	}
	if (e->kind == EVENT_ENTRY)
		printf("entry pid=%u arg=%llu\n", e->pid, (unsigned long long)e->value);
	else if (e->kind == EVENT_RETURN)
		printf("return pid=%u rc=%llu\n", e->pid, (unsigned long long)e->value);
	else
		printf("unknown pid=%u kind=%u value=%llu\n", e->pid, e->kind,
		       (unsigned long long)e->value);
	fflush(stdout);
	received++;
	return 0;
}

static void handle_sample(void *ctx, int cpu, void *data, __u32 size)
{
	(void)cpu;
	if (size >= sizeof(struct event))
		handle_event(ctx, data, sizeof(struct event));
}

static void handle_lost(void *ctx, int cpu, __u64 lost)
{
	(void)ctx;
	lost_events += lost;
	if (!quiet)
		fprintf(stderr, "uprobe_tool: lost %llu events on CPU %d\n", (unsigned long long)lost,
			cpu);
}

static struct bpf_link *attach(struct bpf_program *prog, const struct options *opts, bool retprobe)
{
	LIBBPF_OPTS(bpf_uprobe_opts, uprobe_opts, .retprobe = retprobe, .func_name = opts->func);
	size_t offset = opts->func ? 0 : (size_t)opts->offset;
	struct bpf_link *link;

	link = bpf_program__attach_uprobe_opts(prog, opts->pid, opts->binary, offset,
					       &uprobe_opts);
	if (!link) {
		int err = errno;

		if (opts->func)
			fprintf(stderr, "uprobe_tool: attaching %s to %s:%s: %s\n",
				bpf_program__name(prog), opts->binary, opts->func, strerror(err));
		else
			fprintf(stderr, "uprobe_tool: attaching %s to %s+0x%llx: %s\n",
				bpf_program__name(prog), opts->binary, opts->offset,
				strerror(err));
	}
	return link;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* The histogram read in batches of 3 (several calls, as a tool with a large map makes). */
static int print_hist_batch(int fd)
{
	uint32_t keys[MAX_HIST], batch_keys[3], cursor;
	uint64_t values[MAX_HIST], batch_values[3];
	size_t n = 0;
	bool first = true;

	for (;;) {
		__u32 count = 3;
		int err = bpf_map_lookup_batch(fd, first ? NULL : &cursor, &cursor, batch_keys,
					       batch_values, &count, NULL);
		int saved = errno;

		first = false;
		for (__u32 i = 0; i < count && n < MAX_HIST; i++) {
			keys[n] = batch_keys[i];
			values[n++] = batch_values[i];
		}
		if (err) {
			if (saved == ENOENT)
				break;
			fprintf(stderr, "uprobe_tool: bpf_map_lookup_batch on hist: %s\n",
				strerror(saved));
			return -1;
		}
	}
	/* Sorted by key, as print_hist prints. */
	for (size_t i = 1; i < n; i++)
		for (size_t j = i; j > 0 && keys[j - 1] > keys[j]; j--) {
			uint32_t k = keys[j];
			uint64_t v = values[j];

			keys[j] = keys[j - 1];
			values[j] = values[j - 1];
			keys[j - 1] = k;
			values[j - 1] = v;
		}
	for (size_t i = 0; i < n; i++)
		printf("hist %u %llu\n", keys[i], (unsigned long long)values[i]);
	return 0;
}

/* Entries per stack, as `stack depth=D calls=N` lines sorted by depth then count (ids and
 * addresses differ from run to run): each id from stack_calls, its stack looked up in the
 * STACK_TRACE map as memleak-style tools do. */
static int print_stacks(int calls_fd, int stacks_fd)
{
	uint64_t lines[64], ips[16], calls;
	int32_t key, next, *prev = NULL;
	size_t n = 0;

	while (n < 64 && bpf_map_get_next_key(calls_fd, prev, &next) == 0) {
		unsigned depth = 0;

		key = next;
		prev = &key;
		if (bpf_map_lookup_elem(calls_fd, &key, &calls))
			continue;
		if (key < 0) {
			printf("stack error=%d calls=%llu\n", key, (unsigned long long)calls);
			continue;
		}
		if (bpf_map_lookup_elem(stacks_fd, &key, ips)) {
			fprintf(stderr, "uprobe_tool: looking up stack %d: %s\n", key, strerror(errno));
			return -1;
		}
		while (depth < 16 && ips[depth])
			depth++;
		lines[n++] = (uint64_t)depth << 32 | calls;
	}
	for (size_t i = 0; i < n; i++)
		for (size_t j = i + 1; j < n; j++)
			if (lines[j] < lines[i]) {
				uint64_t t = lines[i];

				lines[i] = lines[j];
				lines[j] = t;
			}
	for (size_t i = 0; i < n; i++)
		printf("stack depth=%llu calls=%llu\n", (unsigned long long)(lines[i] >> 32),
		       (unsigned long long)(lines[i] & 0xffffffff));
	return 0;
}

static int print_hist(int fd, size_t max)
{
	uint32_t *keys = calloc(max + 1, sizeof(*keys)), key, next;
	const uint32_t *prev = NULL;
	size_t n = 0;
	int err = 0;

	if (!keys)
		return -1;
	while (bpf_map_get_next_key(fd, prev, &next) == 0) {
		if (n == max) {
			fprintf(stderr, "uprobe_tool: more than %zu hist keys\n", max);
			free(keys);
			return -1;
		}
		keys[n++] = next;
		key = next;
		prev = &key;
	}
	if (errno != ENOENT) {
		fprintf(stderr, "uprobe_tool: walking hist: %s\n", strerror(errno));
		free(keys);
		return -1;
	}
	qsort(keys, n, sizeof(keys[0]), cmp_u32);
	for (size_t i = 0; i < n; i++) {
		uint64_t count;

		if (bpf_map_lookup_elem(fd, &keys[i], &count)) {
			fprintf(stderr, "uprobe_tool: looking up hist key %u: %s\n", keys[i],
				strerror(errno));
			err = -1;
			break;
		}
		printf("hist %u %llu\n", keys[i], (unsigned long long)count);
	}
	free(keys);
	return err;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	struct options opts = { .offset = -1, .pid = -1, .duration = 10 };
	struct ring_buffer *rb = NULL;
	struct perf_buffer *pb = NULL;
	struct uprobe_tool_bpf *skel;
	double deadline;
	int err;

	if (parse_args(argc, argv, &opts))
		return 2;
	verbose = opts.verbose;
	quiet = opts.quiet;
	libbpf_set_print(libbpf_print);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);

	skel = uprobe_tool_bpf__open();
	if (!skel) {
		fprintf(stderr, "uprobe_tool: opening the BPF skeleton: %s\n", strerror(errno));
		return 1;
	}
	skel->rodata->min_arg = opts.min_arg;
	skel->rodata->use_perf = opts.perf;
	skel->rodata->count_stacks = opts.stacks;
	skel->rodata->filter_cg = opts.cgroup != NULL;
	skel->rodata->drain_commands = opts.commands > 0;
	if (opts.buckets) {
		/* As tools size their maps from options: before load. */
		skel->rodata->hist_buckets = opts.buckets;
		if (bpf_map__set_max_entries(skel->maps.hist, opts.buckets)) {
			fprintf(stderr, "uprobe_tool: resizing hist: %s\n", strerror(errno));
			return 1;
		}
	}
	err = uprobe_tool_bpf__load(skel);
	if (err) {
		fprintf(stderr, "uprobe_tool: loading the BPF object: %s\n", strerror(-err));
		goto out;
	}
	if (opts.commands) {
		/* The loader's side of a user ring buffer: reserve, fill, submit. */
		struct user_ring_buffer *urb =
			user_ring_buffer__new(bpf_map__fd(skel->maps.commands), NULL);

		if (!urb) {
			err = -errno;
			fprintf(stderr, "uprobe_tool: user ring buffer: %s\n", strerror(errno));
			goto out;
		}
		for (unsigned long long i = 1; i <= opts.commands; i++) {
			__u64 *command = user_ring_buffer__reserve(urb, sizeof(*command));

			if (!command) {
				err = -errno;
				fprintf(stderr, "uprobe_tool: reserving command %llu: %s\n", i,
					strerror(errno));
				user_ring_buffer__free(urb);
				goto out;
			}
			*command = i;
			user_ring_buffer__submit(urb, command);
		}
		user_ring_buffer__free(urb);
	}
	if (opts.cgroup) {
		/* As libbpf-tools' -c: the cgroup's descriptor into slot 0 of the CGROUP_ARRAY. */
		int cg_fd = open(opts.cgroup, O_RDONLY | O_DIRECTORY), zero = 0;

		if (cg_fd < 0 ||
		    bpf_map_update_elem(bpf_map__fd(skel->maps.cgroup_map), &zero, &cg_fd, BPF_ANY)) {
			err = -errno;
			fprintf(stderr, "uprobe_tool: cgroup filter %s: %s\n", opts.cgroup,
				strerror(errno));
			goto out;
		}
	}

	skel->links.on_entry = attach(skel->progs.on_entry, &opts, false);
	if (!skel->links.on_entry) {
		err = -1;
		goto out;
	}
	skel->links.on_return = attach(skel->progs.on_return, &opts, true);
	if (!skel->links.on_return) {
		err = -1;
		goto out;
	}

	if (opts.perf)
		pb = perf_buffer__new(bpf_map__fd(skel->maps.pevents), 8 /* pages per CPU */,
				      handle_sample, handle_lost, NULL, NULL);
	else
		rb = ring_buffer__new(bpf_map__fd(skel->maps.events), handle_event, NULL, NULL);
	if (!rb && !pb) {
		err = -errno;
		fprintf(stderr, "uprobe_tool: creating the ring buffer reader: %s\n", strerror(-err));
		goto out;
	}
	printf("attached\n");
	fflush(stdout);

	deadline = now() + opts.duration;
	while (!stop && (!opts.max_events || received < opts.max_events)) {
		if (now() >= deadline) {
			if (opts.max_events) {
				fprintf(stderr, "uprobe_tool: timed out after %llu of %llu events\n",
					received, opts.max_events);
				err = -ETIMEDOUT;
			}
			break;
		}
		err = pb ? perf_buffer__poll(pb, 100 /* ms */) : ring_buffer__poll(rb, 100 /* ms */);
		if (err == -EINTR) {
			err = 0;
			continue;
		}
		if (err < 0) {
			fprintf(stderr, "uprobe_tool: polling the ring buffer: %s\n", strerror(-err));
			goto out;
		}
		err = 0;
	}

	if ((opts.batch ? print_hist_batch(bpf_map__fd(skel->maps.hist))
			: print_hist(bpf_map__fd(skel->maps.hist),
				     bpf_map__max_entries(skel->maps.hist))) &&
	    !err)
		err = -1;
	if (opts.pin && bpf_obj_pin(bpf_map__fd(skel->maps.hist), opts.pin)) {
		fprintf(stderr, "uprobe_tool: pinning hist at %s: %s\n", opts.pin, strerror(errno));
		if (!err)
			err = -errno;
	}
	if (opts.commands) {
		__u32 zero = 0;
		__u64 applied = 0;

		if (bpf_map_lookup_elem(bpf_map__fd(skel->maps.commanded), &zero, &applied) && !err)
			err = -errno;
		printf("commands sent=%llu applied=%llu\n", opts.commands,
		       (unsigned long long)applied);
	}
	if (opts.stacks &&
	    print_stacks(bpf_map__fd(skel->maps.stack_calls), bpf_map__fd(skel->maps.stacks)) &&
	    !err)
		err = -1;
	if (stop)
		fprintf(stderr, "uprobe_tool: stopped by signal %d\n", (int)stop);
	if (quiet)
		printf("received %llu lost %llu\n", received, lost_events);
	printf("bss entries=%llu returns=%llu\n", (unsigned long long)skel->bss->entries,
	       (unsigned long long)skel->bss->returns);
	fflush(stdout);

out:
	perf_buffer__free(pb);
	ring_buffer__free(rb);
	uprobe_tool_bpf__destroy(skel);
	return err ? 1 : 0;
}
