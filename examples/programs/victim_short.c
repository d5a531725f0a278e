// A victim whose probed function is shorter than a 5-byte jump: `short_add` is
// `lea (%rdi,%rsi),%eax; ret` (4 bytes). `victim_short N` waits for a line on stdin, makes
// N calls short_add(i % 5, i) and prints "done SUM".
#include <stdio.h>
#include <stdlib.h>

__asm__(".text\n.globl short_add\n.type short_add,@function\n.p2align 4\nshort_add:\n"
	"leal (%rdi,%rsi), %eax\nret\n.size short_add, .-short_add\n");
int short_add(int a, int b);

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : 1000;
	char line[16];
	long sink = 0;

	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < rounds; i++)
		sink += short_add((int)(i % 5), (int)i);
	printf("done %ld\n", sink);
	return 0;
}
