// The victim of the allocator-counting example: between va_begin() and va_end() it makes
// exactly N malloc calls (argv[1]) and nothing else that allocates, and stays in that window
// for about 300 ms, long enough for an agent thread that allocates to be caught doing so.
// Waits for one line on stdin first; prints "done" at the end.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

volatile long window;

/* Long enough to hook (a store, not a bare ret). */
__attribute__((noinline)) void va_begin(long n)
{
	window = n;
}

__attribute__((noinline)) void va_end(void)
{
	window = 0;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 100;
	static void *blocks[64];
	char line[16];
	struct timespec pause = {0, 20 * 1000 * 1000};

	if (!fgets(line, sizeof(line), stdin))
		return 1;
	va_begin(n);
	for (long i = 0; i < n; i++) {
		free(blocks[i % 64]);
		blocks[i % 64] = malloc(16 + i % 100);
		if (i % (n / 15 + 1) == 0)
			nanosleep(&pause, NULL);
	}
	for (int i = 0; i < 64; i++)
		free(blocks[i]);
	nanosleep(&pause, NULL);
	va_end();
	printf("done %ld\n", n);
	return 0;
}
