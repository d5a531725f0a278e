// A victim with USDT probes (<sys/sdt.h>): `victim_usdt N` waits for a line on stdin, then for
// i in 0..N fires vt:add(i, 3*i) (register or stack operands), vt:konst(42) (a constant
// operand) and, only while a tracer holds its semaphore up, vt:sem(i, -i, (char)i); it prints
// "done ADDS SEMS" (SEMS: how many times the semaphore was seen up).
#define _SDT_HAS_SEMAPHORES 1
#include <stdio.h>
#include <stdlib.h>
#include <sys/sdt.h>

// With _SDT_HAS_SEMAPHORES every probe has a semaphore; only vt:sem's guards work.
#define VT_SEMAPHORE(name) \
	unsigned short vt_##name##_semaphore __attribute__((unused)) __attribute__((section(".probes")))
VT_SEMAPHORE(add);
VT_SEMAPHORE(konst);
VT_SEMAPHORE(sem);

__attribute__((noinline)) static long work(long i)
{
	int small = (int)i;
	long big = 3 * i;

	STAP_PROBE2(vt, add, small, big);
	STAP_PROBE1(vt, konst, 42);
	if (vt_sem_semaphore) {
		STAP_PROBE3(vt, sem, small, -small, (char)i);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : 1000;
	char line[16];
	long sems = 0;

	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < rounds; i++)
		sems += work(i);
	printf("done %ld %ld\n", rounds, sems);
	return 0;
}
