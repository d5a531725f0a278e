// A victim with USDT probes (<sys/sdt.h>): `victim_usdt N` waits for a line on stdin, then for
// i in 0..N fires vt:add(i, 3*i) (register or stack operands), vt:konst(42) (a constant
// operand), vt:sib(arr[i % 4 + 1]) (a Scale-Index-Base memory operand) and, only while a
// tracer holds its semaphore up, vt:sem(i, -i, (char)i); it prints "done ADDS SEMS" (SEMS: how
// many times the semaphore was seen up).
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

// vt:sib's note is written here by hand, as sdt.h writes notes, because sdt.h lets the compiler
// choose each operand and only sometimes does it pick `OFF(%base,%index,scale)` (array
// elements at -O2): its one argument is `-8@8(%base,%index,8)`, i.e. arr[i + 1]; no semaphore.
__attribute__((noinline)) static void sib(const long *arr, long i)
{
	__asm__ __volatile__("990: nop\n"
			     ".pushsection .note.stapsdt,\"?\",\"note\"\n"
			     ".balign 4\n"
			     ".4byte 992f-991f, 994f-993f, 3\n"
			     "991: .asciz \"stapsdt\"\n"
			     "992: .balign 4\n"
			     "993: .8byte 990b\n"
			     ".8byte _.stapsdt.base\n"
			     ".8byte 0\n"
			     ".asciz \"vt\"\n"
			     ".asciz \"sib\"\n"
			     ".asciz \"-8@8(%0,%1,8)\"\n"
			     "994: .balign 4\n"
			     ".popsection\n"
			     :
			     : "r"(arr), "r"(i)
			     : "memory");
}

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : 1000;
	long arr[5] = { 10, 20, 30, 40, 50 };
	char line[16];
	long sems = 0;

	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < rounds; i++) {
		sems += work(i);
		sib(arr, i % 4);
	}
	printf("done %ld %ld\n", rounds, sems);
	return 0;
}
