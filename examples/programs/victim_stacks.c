// The victim of the stack-trace example: the probed function `vs_leaf` is reached through
// several distinct call chains, each starting in `vs_root`, which clears the frame pointer
// before calling in (as `_start` and `clone` do for the outermost frame): every frame-pointer
// walk ends there, on the kernel and in user space alike. Built without PIE, so the code
// addresses (and so the stack ids) are the same in every run. `victim_stacks N` waits for
// one line on stdin, makes N rounds of calls and prints "done".
#include <stdio.h>
#include <stdlib.h>

int vs_root(long (*f)(long), long x);
__asm__(".text\n"
	".globl vs_root\n"
	".type vs_root, @function\n"
	"vs_root:\n"
	"	push %rbp\n"
	"	xor %ebp, %ebp\n"
	"	mov %rdi, %rax\n"
	"	mov %rsi, %rdi\n"
	"	call *%rax\n"
	"	pop %rbp\n"
	"	ret\n"
	".size vs_root, .-vs_root\n");

__attribute__((noinline)) long vs_leaf(long x)
{
	__asm__ volatile("" ::: "memory");
	return x * 2 + 1;
}

__attribute__((noinline)) long vs_mid_a(long x)
{
	return vs_leaf(x) + 1;
}

__attribute__((noinline)) long vs_mid_b(long x)
{
	return vs_mid_a(x) + vs_leaf(x + 1);
}

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : 100;
	char line[16];
	long sink = 0;

	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < rounds; i++) {
		sink += vs_root(vs_leaf, i);
		sink += vs_root(vs_mid_a, i);
		if (i % 3 == 0)
			sink += vs_root(vs_mid_b, i);
	}
	printf("done %ld\n", sink);
	return 0;
}
