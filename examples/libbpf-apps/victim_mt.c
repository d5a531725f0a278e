// The benchmark's victim: `victim_mt THREADS CALLS` waits for one line on stdin, then THREADS
// threads each call lt_work CALLS times; prints the mean wall time per call (of the slowest
// thread: all run at once) as `ns_per_call N` and exits 0.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) long lt_work(long a)
{
	volatile long scratch = a;

	__asm__ volatile("" ::: "memory");
	return scratch * 2 + 1;
}

static long calls;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void *worker(void *arg)
{
	double *elapsed = arg, start = now();
	long sum = 0;

	for (long i = 0; i < calls; i++)
		sum += lt_work(i);
	*elapsed = now() - start;
	return (void *)sum;
}

int main(int argc, char **argv)
{
	char line[64];
	int threads;

	if (argc != 3 || (threads = atoi(argv[1])) < 1 || threads > 64 ||
	    (calls = atol(argv[2])) < 1) {
		fprintf(stderr, "usage: %s THREADS CALLS\n", argv[0]);
		return 2;
	}
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	pthread_t tids[64];
	double elapsed[64], slowest = 0;

	for (int t = 0; t < threads; t++)
		if (pthread_create(&tids[t], NULL, worker, &elapsed[t]))
			return 1;
	for (int t = 0; t < threads; t++) {
		pthread_join(tids[t], NULL);
		if (elapsed[t] > slowest)
			slowest = elapsed[t];
	}
	printf("ns_per_call %.1f\n", slowest / calls);
	return 0;
}
