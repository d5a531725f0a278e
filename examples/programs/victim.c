// The victim process for the example programs: deterministic calls to functions the examples
// probe. `victim N` waits for one line on stdin (so probes can be attached first), then makes
// N rounds of calls and prints "done".
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const words[] = {"alpha", "bravo", "charlie", "delta", "echo-echo-echo-echo"};

__attribute__((noinline)) long vt_add(long a, long b)
{
	__asm__ volatile("" ::: "memory");
	return a + b;
}

__attribute__((noinline)) int vt_message(const char *msg, int len)
{
	__asm__ volatile("" ::: "memory");
	return len + (msg[0] == 'a');
}

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : 1000;
	char line[16];
	long sink = 0;

	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < rounds; i++) {
		const char *w = words[i % 5];
		sink += vt_add(i % 7, i);
		sink += vt_message(w, (int)strlen(w));
	}
	printf("done %ld\n", sink);
	return 0;
}
