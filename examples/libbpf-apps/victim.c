// The process uprobe_tool probes. `victim N` waits for one line on stdin (so the tool can attach
// first), calls lt_work(i) for i in 0..N, prints "done SUM" and exits 0. With VICTIM_CGROUP
// set to a cgroup2 directory, it first moves itself into that cgroup (for cgroup filters).
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) long lt_work(long a)
{
	/* The volatile local and the barrier keep a real call with a body of some size. */
	volatile long scratch = a;

	__asm__ volatile("" ::: "memory");
	return scratch * 2 + 1;
}

int main(int argc, char **argv)
{
	char line[64];
	long calls, sum = 0;
	char *end;

	if (argc != 2) {
		fprintf(stderr, "usage: %s N\n", argv[0]);
		return 2;
	}
	calls = strtol(argv[1], &end, 10);
	if (*argv[1] == '\0' || *end != '\0' || calls < 0) {
		fprintf(stderr, "%s: bad call count '%s'\n", argv[0], argv[1]);
		return 2;
	}
	if (getenv("VICTIM_CGROUP")) {
		char procs[4096];
		FILE *f;

		snprintf(procs, sizeof(procs), "%s/cgroup.procs", getenv("VICTIM_CGROUP"));
		f = fopen(procs, "w");
		if (!f || fprintf(f, "0\n") < 0 || fclose(f) != 0) {
			perror(procs);
			return 1;
		}
	}
	if (!fgets(line, sizeof(line), stdin)) {
		fprintf(stderr, "%s: no start line on stdin\n", argv[0]);
		return 1;
	}
	for (long i = 0; i < calls; i++)
		sum += lt_work(i);
	printf("done %ld\n", sum);
	return 0;
}
