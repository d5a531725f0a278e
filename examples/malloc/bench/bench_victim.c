// The benchmark's victim: times calls of one probed function itself, so every row measures the
// same loop. `bench_victim FUNC ITERS [REPS [THREADS]]` waits for one line on stdin (probes are
// attached first), calls FUNC ITERS times per repetition (REPS, default 5), and prints
// "ns_per_call MEDIAN MIN CALLS" (CALLS = how many calls it made in total, warm-up included).
// With THREADS > 1, that many threads make the calls at once, each timing its own loop in
// thread CPU time (CLOCK_THREAD_CPUTIME_ID: on 2 vCPUs, 8 threads' wall time would mostly
// measure the scheduler); a repetition's figure is the mean over the threads.
//
// The probed functions are written in assembly: what the kernel's uprobe costs depends on the
// first instruction, so that must not depend on the compiler.
//   bench_target       push %rbp; mov %rsp,%rbp; ...  (a frame-pointer prologue: the kernel
//                      emulates the push, no single-step)
//   bench_target_plain mov %rdi,%rax; ...             (an instruction the kernel single-steps
//                      out of line)
//   bench_target_nop5  nopl 0(%rax,%rax,1); ...       (the 5-byte nop the kernel turns into a
//                      call to its uprobe trampoline: its fast path)
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

long bench_target(long a);
long bench_target_plain(long a);
long bench_target_nop5(long a);

__asm__(".text\n"
	".globl bench_target\n.type bench_target,@function\n.p2align 4\n"
	"bench_target:\n"
	"  push %rbp\n  mov %rsp,%rbp\n  lea 1(%rdi),%rax\n  add $2,%rax\n  pop %rbp\n  ret\n"
	".size bench_target, .-bench_target\n"
	".globl bench_target_plain\n.type bench_target_plain,@function\n.p2align 4\n"
	"bench_target_plain:\n"
	"  mov %rdi,%rax\n  add $1,%rax\n  add $2,%rax\n  add $3,%rax\n  ret\n"
	".size bench_target_plain, .-bench_target_plain\n"
	".globl bench_target_nop5\n.type bench_target_nop5,@function\n.p2align 4\n"
	"bench_target_nop5:\n"
	"  .byte 0x0f,0x1f,0x44,0x00,0x00\n"
	"  push %rbp\n  mov %rsp,%rbp\n  lea 1(%rdi),%rax\n  add $2,%rax\n  pop %rbp\n  ret\n"
	".size bench_target_nop5, .-bench_target_nop5\n");

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double thread_cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static long (*volatile target)(long);
static long thread_iters;
static pthread_barrier_t rep_start;

/* One thread's repetition: thread CPU ns per call. */
static void *thread_rep(void *out)
{
	volatile long sink = 0;

	pthread_barrier_wait(&rep_start);
	double start = thread_cpu_ns();
	for (long i = 0; i < thread_iters; i++)
		sink += target(i);
	*(double *)out = (thread_cpu_ns() - start) / (double)thread_iters;
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	long (*volatile fn)(long);
	long iters, reps, warm;
	double t[64];
	volatile long sink = 0;
	long calls = 0;
	char line[16];

	long threads = argc > 4 ? atol(argv[4]) : 1;

	if (argc < 3 || threads < 1 || threads > 64) {
		fprintf(stderr, "usage: bench_victim FUNC ITERS [REPS [THREADS]]\n");
		return 1;
	}
	if (!strcmp(argv[1], "bench_target"))
		fn = bench_target;
	else if (!strcmp(argv[1], "bench_target_plain"))
		fn = bench_target_plain;
	else if (!strcmp(argv[1], "bench_target_nop5"))
		fn = bench_target_nop5;
	else {
		fprintf(stderr, "unknown function %s\n", argv[1]);
		return 1;
	}
	iters = atol(argv[2]);
	reps = argc > 3 ? atol(argv[3]) : 5;
	if (reps < 1 || reps > 64)
		return 1;
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	// Warm-up: first hits set up per-thread state (and the kernel optimizes a nop5 site on its
	// first hit).
	warm = iters / 10 + 1;
	for (long i = 0; i < warm; i++)
		sink += fn(i);
	calls += warm;
	if (threads > 1) {
		pthread_t tid[64];
		double per[64];

		target = fn;
		thread_iters = iters;
		for (long r = 0; r < reps; r++) {
			double sum = 0;

			pthread_barrier_init(&rep_start, NULL, threads);
			for (long k = 0; k < threads; k++)
				pthread_create(&tid[k], NULL, thread_rep, &per[k]);
			for (long k = 0; k < threads; k++) {
				pthread_join(tid[k], NULL);
				sum += per[k];
			}
			pthread_barrier_destroy(&rep_start);
			t[r] = sum / threads;
			calls += iters * threads;
		}
		qsort(t, reps, sizeof(t[0]), cmp);
		printf("ns_per_call %.2f %.2f %ld\n", t[reps / 2], t[0], calls);
		return 0;
	}
	for (long r = 0; r < reps; r++) {
		double start = now_ns();

		for (long i = 0; i < iters; i++)
			sink += fn(i);
		t[r] = (now_ns() - start) / (double)iters;
		calls += iters;
	}
	qsort(t, reps, sizeof(t[0]), cmp);
	printf("ns_per_call %.2f %.2f %ld\n", t[reps / 2], t[0], calls);
	return 0;
}
