/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * Wire format between kernel-bridge (Rust, kernel-bridge/src/record.rs) and the drain program.
 * Both sides must agree byte for byte: kernel-bridge/tests/wire_format.rs compiles a probe against
 * this header and compares every size, offset and constant with the Rust side.
 */
#ifndef BPFTIME_BRIDGE_H
#define BPFTIME_BRIDGE_H

/* How many mirror maps one bridge can serve at once. */
#define BRIDGE_MAX_MIRRORS 1024
/*
 * Largest key+value of one record. The kernel allows hash values up to about KMALLOC_MAX_SIZE
 * (4 MiB); one record is copied into a one-entry scratch map of this size before bpf_sys_bpf
 * (the BPF stack is only 512 bytes).
 */
#define BRIDGE_SCRATCH_SIZE (1u << 22)

enum bridge_op {
	BRIDGE_OP_UPDATE = 0,
	BRIDGE_OP_DELETE = 1,
	BRIDGE_OP_PUSH = 2,
};

/* One user-ringbuf sample: this header, then key_size key bytes, then value_size value bytes. */
struct bridge_update {
	__u64 seq;
	__u32 mirror;
	__u32 op;
	__u32 key_size;
	__u32 value_size;
	__u64 flags;
};

/*
 * User space pads every record to at least this size, so the drain reads a header plus a small
 * key and value with one bpf_dynptr_read (the fast shapes fit in the 16 bytes after the header).
 */
#define BRIDGE_MIN_RECORD 48

/* Registered per mirror by user space before any record names it. */
struct bridge_mirror {
	__u32 fd;         /* fd of the mirror in the process that runs the drain */
	__u32 key_size;   /* bytes the kernel copies for a key (0 for queue/stack) */
	__u32 value_size; /* bytes the kernel copies for a value (per-CPU: round_up(v, 8) * ncpus) */
	__u32 fast_shape; /* 0: generic path through bpf_sys_bpf; else index of a fast path */
};

enum bridge_confirm_kind {
	BRIDGE_CONFIRM_APPLIED = 0, /* one update applied (confirm-each mode) */
	BRIDGE_CONFIRM_FAILED = 1,  /* one update failed with -result */
	BRIDGE_CONFIRM_BATCH = 2,   /* seqs first_seq..=seq drained; failures among them reported */
	BRIDGE_CONFIRM_REJECTED = 3 /* malformed record (sizes do not match the mirror) */
};

struct bridge_confirm {
	__u64 seq;
	__u64 first_seq;
	__s64 result;
	__u32 kind;
	__u32 count;
};

/* Context passed in with BPF_PROG_RUN. */
struct bridge_drain_args {
	__u32 confirm_each;
	__u32 pad;
};

/* Fast paths: mirrors of these shapes are updated with bpf_map_update_elem on an inner map. */
#define BRIDGE_FAST_HASH_4_8 1
#define BRIDGE_FAST_HASH_8_8 2
#define BRIDGE_FAST_HASH_4_4 3
#define BRIDGE_FAST_LRU_4_8 4
#define BRIDGE_FAST_LRU_8_8 5

#endif
