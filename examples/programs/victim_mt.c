// A multi-threaded victim for the sync tests: `victim_mt THREADS CALLS [PAUSE_US]` waits for a
// line on stdin, then each of THREADS threads calls mt_work(i) for i in 0..CALLS (sleeping
// PAUSE_US microseconds after every 1000 calls, so a test can watch it while it runs), and it
// prints "done".
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static long calls, pause_us;

__attribute__((noinline)) long mt_work(long i, long thread)
{
	__asm__ volatile("" ::: "memory");
	return i * 2 + thread;
}

static void *worker(void *arg)
{
	long thread = (long)arg, sink = 0;

	for (long i = 0; i < calls; i++) {
		sink += mt_work(i, thread);
		if (pause_us && i % 1000 == 999)
			usleep(pause_us);
	}
	return (void *)sink;
}

int main(int argc, char **argv)
{
	int threads = argc > 1 ? atoi(argv[1]) : 8;
	char line[16];
	pthread_t tids[64];

	calls = argc > 2 ? atol(argv[2]) : 1000;
	pause_us = argc > 3 ? atol(argv[3]) : 0;
	if (threads > 64 || !fgets(line, sizeof(line), stdin))
		return 1;
	for (long t = 0; t < threads; t++)
		pthread_create(&tids[t], NULL, worker, (void *)t);
	for (int t = 0; t < threads; t++)
		pthread_join(tids[t], NULL);
	printf("done %ld\n", calls * threads);
	return 0;
}
