// The victim of the sync scale tests: `victim_keys THREADS KEYS BASE [PASSES]` waits for a line
// on stdin, then each thread t writes keys BASE + t * KEYS + i for i in 0..KEYS: vk_put(key,
// key * 3 + 1) for every key, then vk_bump(key, 100) for every 4th and vk_del(key) for every 7th
// (in that order, so a key that is both ends deleted). It does that PASSES times (default 1;
// 0: until killed), then prints "done" and the key count.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static unsigned long keys_per_thread, base, passes;
/* The probed functions do a little work, so each is long enough for an entry detour. */
static volatile unsigned long sink;

__attribute__((noinline)) void vk_put(unsigned int key, unsigned long value)
{
	sink += key ^ value;
}

__attribute__((noinline)) void vk_bump(unsigned int key, unsigned long by)
{
	sink += key + by;
}

__attribute__((noinline)) void vk_del(unsigned int key)
{
	sink -= key;
}

static void *worker(void *arg)
{
	unsigned long first = base + (unsigned long)arg * keys_per_thread;

	for (unsigned long pass = 0; passes == 0 || pass < passes; pass++) {
		for (unsigned long i = 0; i < keys_per_thread; i++)
			vk_put(first + i, (first + i) * 3 + 1);
		for (unsigned long i = 0; i < keys_per_thread; i += 4)
			vk_bump(first + i, 100);
		for (unsigned long i = 0; i < keys_per_thread; i += 7)
			vk_del(first + i);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int threads = argc > 1 ? atoi(argv[1]) : 1;
	char line[16];
	pthread_t tids[64];

	keys_per_thread = argc > 2 ? strtoul(argv[2], NULL, 0) : 1000;
	base = argc > 3 ? strtoul(argv[3], NULL, 0) : 0;
	passes = argc > 4 ? strtoul(argv[4], NULL, 0) : 1;
	if (threads < 1 || threads > 64 || !fgets(line, sizeof(line), stdin))
		return 1;
	for (long t = 0; t < threads; t++)
		pthread_create(&tids[t], NULL, worker, (void *)t);
	for (int t = 0; t < threads; t++)
		pthread_join(tids[t], NULL);
	printf("done %lu\n", keys_per_thread * threads);
	return 0;
}
