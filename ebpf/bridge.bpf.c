// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The kernel half of the bridge. User space (kernel-bridge) writes one `struct bridge_update`
 * record per map operation into the `updates` user ringbuf and runs `drain` with BPF_PROG_RUN.
 * Each record is applied to a real kernel map and confirmed through the `confirmations` ringbuf.
 *
 * Two paths apply a record:
 * - generic: any map type and size, through bpf_sys_bpf(BPF_MAP_*_ELEM) with the record copied
 *   into a scratch map (the BPF stack is 512 bytes). This is a full syscall per record.
 * - fast: mirrors of a few common shapes sit in an ARRAY_OF_MAPS per shape and are updated with
 *   bpf_map_update_elem directly, about twice as fast. No program is recompiled per map set:
 *   user space only inserts the mirror's fd into the outer map of its shape.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bridge.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define EINVAL 22
#define ENOENT 2
#define EFAULT 14
#define E2BIG 7
#define ENOMEM 12

/*
 * One drain handles at most BPF_MAX_USER_RINGBUF_SAMPLES (128 Ki) records; each yields at most one
 * confirmation of 8 + sizeof(struct bridge_confirm) = 48 bytes, plus one batch record. 8 MiB holds
 * a whole drain, and user space empties this ring after every run, so no confirmation is dropped.
 */
#define CONFIRM_RING_SIZE (8u << 20)

struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 8u << 20);
} updates SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CONFIRM_RING_SIZE);
} confirmations SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BRIDGE_MAX_MIRRORS);
	__type(key, __u32);
	__type(value, struct bridge_mirror);
} mirrors SEC(".maps");

struct scratch_buf {
	__u8 bytes[BRIDGE_SCRATCH_SIZE];
};

/* Only one drain runs at a time (user space serializes BPF_PROG_RUN), so one entry suffices. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch_buf);
} scratch SEC(".maps");

#define FAST_SHAPE(name, map_kind, key_t, value_t)                                                 \
	struct inner_##name {                                                                      \
		__uint(type, map_kind);                                                            \
		__uint(max_entries, 1);                                                            \
		__type(key, key_t);                                                                \
		__type(value, value_t);                                                            \
	};                                                                                         \
	struct {                                                                                   \
		__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);                                          \
		__uint(max_entries, BRIDGE_MAX_MIRRORS);                                           \
		__type(key, __u32);                                                                \
		__array(values, struct inner_##name);                                              \
	} fast_##name SEC(".maps");

FAST_SHAPE(hash_4_8, BPF_MAP_TYPE_HASH, __u32, __u64)
FAST_SHAPE(hash_8_8, BPF_MAP_TYPE_HASH, __u64, __u64)
FAST_SHAPE(hash_4_4, BPF_MAP_TYPE_HASH, __u32, __u32)
FAST_SHAPE(lru_4_8, BPF_MAP_TYPE_LRU_HASH, __u32, __u64)
FAST_SHAPE(lru_8_8, BPF_MAP_TYPE_LRU_HASH, __u64, __u64)

/* The prefix of union bpf_attr that BPF_MAP_*_ELEM reads; the kernel zero-fills the rest. */
struct map_elem_attr {
	__u32 map_fd;
	__u32 pad;
	__u64 key;
	__u64 value;
	__u64 flags;
};

struct drain_state {
	__u64 first_seq;
	__u64 last_seq;
	__u32 count;
	__u32 failed;
	__u32 confirm_each;
	__u32 overflow;
};

static __always_inline void confirm(struct drain_state *st, __u64 seq, long res, __u32 kind)
{
	struct bridge_confirm c = {
		.seq = seq,
		.first_seq = seq,
		.result = res,
		.kind = kind,
		.count = 1,
	};
	if (bpf_ringbuf_output(&confirmations, &c, sizeof(c), BPF_RB_NO_WAKEUP))
		st->overflow++;
}

/* The first BRIDGE_MIN_RECORD bytes of every record: enough for a fast-shape key and value. */
struct record_head {
	struct bridge_update u;
	__u8 payload[BRIDGE_MIN_RECORD - sizeof(struct bridge_update)];
};

#define FAST_CASE(id, name, key_t, value_t)                                                        \
	case id: {                                                                                 \
		key_t key;                                                                         \
		value_t value;                                                                     \
		void *inner = bpf_map_lookup_elem(&fast_##name, &idx);                             \
		if (!inner)                                                                        \
			return -ENOENT;                                                            \
		__builtin_memcpy(&key, head->payload, sizeof(key));                                \
		if (head->u.op == BRIDGE_OP_DELETE)                                                \
			return bpf_map_delete_elem(inner, &key);                                   \
		__builtin_memcpy(&value, head->payload + sizeof(key), sizeof(value));              \
		return bpf_map_update_elem(inner, &key, &value, head->u.flags);                    \
	}

static __always_inline long apply_fast(struct record_head *head, __u32 shape)
{
	__u32 idx = head->u.mirror;

	switch (shape) {
		FAST_CASE(BRIDGE_FAST_HASH_4_8, hash_4_8, __u32, __u64)
		FAST_CASE(BRIDGE_FAST_HASH_8_8, hash_8_8, __u64, __u64)
		FAST_CASE(BRIDGE_FAST_HASH_4_4, hash_4_4, __u32, __u32)
		FAST_CASE(BRIDGE_FAST_LRU_4_8, lru_4_8, __u32, __u64)
		FAST_CASE(BRIDGE_FAST_LRU_8_8, lru_8_8, __u64, __u64)
	}
	return -EINVAL;
}

static __always_inline long apply_generic(struct bpf_dynptr *rec, struct bridge_update *u,
					  __u32 fd)
{
	__u32 zero = 0;
	struct scratch_buf *s = bpf_map_lookup_elem(&scratch, &zero);
	struct map_elem_attr attr = {};
	__u32 key_size = u->key_size;
	__u32 len = key_size + u->value_size;

	if (!s)
		return -ENOMEM;
	if (key_size > BRIDGE_SCRATCH_SIZE || len > BRIDGE_SCRATCH_SIZE)
		return -E2BIG;
	if (len && bpf_dynptr_read(s->bytes, len, rec, sizeof(*u), 0))
		return -EFAULT;

	attr.map_fd = fd;
	attr.key = key_size ? (__u64)(unsigned long)s->bytes : 0;
	/* BPF_MAP_DELETE_ELEM rejects a non-zero value field with EINVAL. */
	if (u->op != BRIDGE_OP_DELETE)
		attr.value = (__u64)(unsigned long)(s->bytes + key_size);
	attr.flags = u->flags;
	return bpf_sys_bpf(u->op == BRIDGE_OP_DELETE ? BPF_MAP_DELETE_ELEM : BPF_MAP_UPDATE_ELEM,
			   &attr, sizeof(attr));
}

/*
 * The kernel copies exactly the mirror's key and value sizes from the pointers handed to
 * bpf_sys_bpf, so a record whose sizes differ from its mirror's would read past its bytes:
 * such records are rejected here, never applied.
 */
static __always_inline int record_fits(const struct bridge_update *u, const struct bridge_mirror *m)
{
	switch (u->op) {
	case BRIDGE_OP_UPDATE:
		return m->key_size && u->key_size == m->key_size && u->value_size == m->value_size;
	case BRIDGE_OP_DELETE:
		return m->key_size && u->key_size == m->key_size && u->value_size == 0;
	case BRIDGE_OP_PUSH:
		return !m->key_size && !u->key_size && u->value_size == m->value_size;
	}
	return 0;
}

static long apply_one(struct bpf_dynptr *rec, void *ctx)
{
	struct drain_state *st = ctx;
	struct record_head head;
	struct bridge_update *u = &head.u;
	struct bridge_mirror *m;
	__u32 idx;
	long res;

	if (bpf_dynptr_read(&head, sizeof(head), rec, 0, 0)) {
		/* Shorter than any record user space writes: nothing can be confirmed. */
		st->overflow++;
		return 0;
	}
	if (st->count == 0)
		st->first_seq = u->seq;
	st->last_seq = u->seq;
	st->count++;

	idx = u->mirror;
	m = bpf_map_lookup_elem(&mirrors, &idx);
	if (!m || !m->fd || !record_fits(u, m)) {
		st->failed++;
		confirm(st, u->seq, -EINVAL, BRIDGE_CONFIRM_REJECTED);
		return 0;
	}

	if (m->fast_shape && u->op != BRIDGE_OP_PUSH)
		res = apply_fast(&head, m->fast_shape);
	else
		res = apply_generic(rec, u, m->fd);

	if (res) {
		st->failed++;
		confirm(st, u->seq, res, BRIDGE_CONFIRM_FAILED);
	} else if (st->confirm_each) {
		confirm(st, u->seq, 0, BRIDGE_CONFIRM_APPLIED);
	}
	return 0;
}

SEC("syscall")
int drain(struct bridge_drain_args *args)
{
	struct drain_state st = {};
	long drained;

	st.confirm_each = args->confirm_each;
	drained = bpf_user_ringbuf_drain(&updates, apply_one, &st, 0);
	if (st.count && !st.confirm_each) {
		struct bridge_confirm batch = {
			.seq = st.last_seq,
			.first_seq = st.first_seq,
			.result = st.failed,
			.kind = BRIDGE_CONFIRM_BATCH,
			.count = st.count,
		};
		if (bpf_ringbuf_output(&confirmations, &batch, sizeof(batch), BPF_RB_NO_WAKEUP))
			st.overflow++;
	}
	if (st.overflow)
		return -ENOMEM;
	return drained;
}
