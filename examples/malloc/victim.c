// The malloc example's victim. `victim ROUNDS [--sleep-ms MS] [--no-wait]`: waits for one line on
// stdin (so kernel probes can be attached to this pid first; --no-wait skips that), then makes
// ROUNDS rounds of deterministic allocations, frees them, and prints "done CALLS BYTES".
//
// Each round i allocates, in this order:
//   16, 100, 777, 701 + 2 * (i % 50), 4000, 40000 bytes
// The odd sizes in [700, 800) are what the tests compare exactly: libc (and, under the agent,
// the agent itself while it installs its hooks) allocate during startup, but not these sizes.
// With --sleep-ms, the victim sleeps that long after every 1000 rounds so the maps can be
// watched while it runs.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PER_ROUND 6

// Stored so the allocations are observable and the calls cannot be optimized away.
void *volatile keep[PER_ROUND];

int main(int argc, char **argv)
{
	long rounds = 1000, sleep_ms = 0;
	int wait = 1;
	unsigned long long calls = 0, bytes = 0;
	char line[16];

	for (int a = 1; a < argc; a++) {
		if (!strcmp(argv[a], "--sleep-ms") && a + 1 < argc)
			sleep_ms = atol(argv[++a]);
		else if (!strcmp(argv[a], "--no-wait"))
			wait = 0;
		else
			rounds = atol(argv[a]);
	}
	if (wait && !fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < rounds; i++) {
		size_t sizes[PER_ROUND] = {16, 100, 777, 701 + 2 * (size_t)(i % 50), 4000, 40000};

		for (int k = 0; k < PER_ROUND; k++) {
			char *p = malloc(sizes[k]);

			if (!p)
				return 2;
			p[0] = (char)k;
			keep[k] = p;
			calls++;
			bytes += sizes[k];
		}
		for (int k = 0; k < PER_ROUND; k++)
			free(keep[k]);
		if (sleep_ms && (i + 1) % 1000 == 0) {
			struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};

			nanosleep(&ts, NULL);
		}
	}
	printf("done %llu %llu\n", calls, bytes);
	return 0;
}
