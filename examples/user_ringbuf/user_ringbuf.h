/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/* Shared by user_ringbuf.bpf.c and src/main.rs (which mirrors these layouts with #[repr(C)]). */
#ifndef USER_RINGBUF_EXAMPLE_H
#define USER_RINGBUF_EXAMPLE_H

#define TASK_COMM_LEN 16
#define MSG_LEN 48

/* Written by user space into the user ringbuf. */
struct user_sample {
	__u32 seq;
	__u32 pad;
	char msg[MSG_LEN];
};

/* Echoed by the BPF program through the kernel ringbuf. */
struct event {
	__u32 pid;
	__u32 seq;
	char comm[TASK_COMM_LEN];
	char msg[MSG_LEN];
};

#endif
