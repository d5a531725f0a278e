// A victim for bpf_get_current_pid_tgid: `victim_pids` waits for a line on stdin, then calls
// vp_mark(id) as the main thread (id 1), a thread (2), a thread started after that one exited
// (3: it may get the same TCB and thread slot), a fork child (4), a vfork child (5), a
// clone(CLONE_VM | CLONE_VFORK) child (6, what posix_spawn makes), and the main thread again
// (7). Each caller first records what the kernel says it is (getpid, gettid) in shared memory;
// the parent prints "ID PID TID" per call, then "done".
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

struct seen {
	long pid, tid;
};

static struct seen *seen;

__attribute__((noinline)) long vp_mark(long id)
{
	__asm__ volatile("" ::: "memory");
	return id;
}

static void mark(long id)
{
	seen[id].pid = syscall(SYS_getpid);
	seen[id].tid = syscall(SYS_gettid);
	vp_mark(id);
}

static void *thread_main(void *id)
{
	mark((long)id);
	return NULL;
}

static int clone_child(void *id)
{
	mark((long)id);
	return 0;
}

int main(void)
{
	char line[16];
	pthread_t t;
	pid_t pid;
	int status;

	seen = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (seen == MAP_FAILED || !fgets(line, sizeof(line), stdin))
		return 1;
	mark(1);
	pthread_create(&t, NULL, thread_main, (void *)2);
	pthread_join(t, NULL);
	pthread_create(&t, NULL, thread_main, (void *)3);
	pthread_join(t, NULL);
	pid = fork();
	if (pid == 0) {
		mark(4);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	pid = vfork();
	if (pid == 0) {
		mark(5);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	static char stack[64 * 1024];
	pid = clone(clone_child, stack + sizeof(stack), CLONE_VM | CLONE_VFORK | SIGCHLD, (void *)6);
	waitpid(pid, &status, 0);
	mark(7);
	for (long id = 1; id <= 7; id++)
		printf("%ld %ld %ld\n", id, seen[id].pid, seen[id].tid);
	printf("done\n");
	return 0;
}
