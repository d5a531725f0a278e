// SPDX-License-Identifier: GPL-2.0 OR MIT
// usdt_tool: a plain libbpf application for USDT objects. It opens a BPF object file, loads it,
// attaches every program where its section says (libbpf's USDT attach for `usdt/...`: argument
// specs written into the object's spec map, semaphores as the uprobes' reference counters),
// prints "attached", runs until SIGINT/SIGTERM or -d SECONDS, then prints every entry of the
// object's `totals` array and the number of entries of its `sem_args` hash.
//
//   usdt_tool OBJECT [-d SECONDS]
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <linux/types.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static int quiet_print(enum libbpf_print_level level, const char *fmt, va_list args)
{
	if (level == LIBBPF_DEBUG)
		return 0;
	return vfprintf(stderr, fmt, args);
}

int main(int argc, char **argv)
{
	double duration = 10;
	struct bpf_object *obj;
	struct bpf_program *prog;
	struct bpf_map *map;
	int err;

	if (argc < 2) {
		fprintf(stderr, "usage: %s OBJECT [-d SECONDS]\n", argv[0]);
		return 2;
	}
	if (argc == 4 && strcmp(argv[2], "-d") == 0)
		duration = atof(argv[3]);
	libbpf_set_print(quiet_print);
	obj = bpf_object__open_file(argv[1], NULL);
	if (!obj) {
		fprintf(stderr, "open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	err = bpf_object__load(obj);
	if (err) {
		fprintf(stderr, "load: %s\n", strerror(-err));
		return 1;
	}
	bpf_object__for_each_program(prog, obj) {
		if (!bpf_program__attach(prog))
			printf("attach-failed %s\n", bpf_program__name(prog));
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	printf("attached\n");
	fflush(stdout);
	struct timespec start, now;
	clock_gettime(CLOCK_MONOTONIC, &start);
	while (!stop) {
		usleep(10000);
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) / 1e9 > duration)
			break;
	}
	map = bpf_object__find_map_by_name(obj, "totals");
	if (!map) {
		fprintf(stderr, "no totals map\n");
		return 1;
	}
	for (__u32 k = 0; k < bpf_map__max_entries(map); k++) {
		long long v = 0;

		if (bpf_map__lookup_elem(map, &k, sizeof(k), &v, sizeof(v), 0) == 0)
			printf("totals %u %lld\n", k, v);
	}
	map = bpf_object__find_map_by_name(obj, "sem_args");
	if (map) {
		long long key, next, n = 0;
		void *prev = NULL;

		while (bpf_map__get_next_key(map, prev, &next, sizeof(next)) == 0) {
			key = next;
			prev = &key;
			n++;
		}
		printf("sem_args %lld\n", n);
	}
	bpf_object__close(obj);
	return 0;
}
