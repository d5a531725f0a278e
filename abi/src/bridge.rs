//! The wire format shared with `ebpf/bridge.h`, the header the kernel drain program is compiled
//! with: one [`UpdateHeader`] per user-ringbuf sample, and one [`ConfirmRecord`] per
//! confirmation. `tests/wire_format.rs` compiles a C probe against the header and checks every
//! size, offset and constant here against it, and records in both directions.

/// What a record asks the drain to do to its mirror map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u32)]
pub enum Op {
    /// `BPF_MAP_UPDATE_ELEM` with key and value.
    Update = 0,
    /// `BPF_MAP_DELETE_ELEM` with a key.
    Delete = 1,
    /// `BPF_MAP_UPDATE_ELEM` with no key: a push onto a QUEUE or STACK.
    Push = 2,
}

/// `struct bridge_update`: the fixed part of a record, followed by key then value bytes.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct UpdateHeader {
    /// The bridge's sequence number of this record; confirmations name it.
    pub seq: u64,
    /// Index of the mirror in the drain's mirror table.
    pub mirror: u32,
    /// An [`Op`].
    pub op: u32,
    /// Key bytes following the header (0 for a push).
    pub key_size: u32,
    /// Value bytes following the key (0 for a delete).
    pub value_size: u32,
    /// `BPF_MAP_UPDATE_ELEM` flags (`BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`).
    pub flags: u64,
}

/// Size of [`UpdateHeader`] on the wire.
pub const UPDATE_HEADER_SIZE: usize = std::mem::size_of::<UpdateHeader>();

/// `BRIDGE_MIN_RECORD`: records are padded to this size so the drain reads a small record
/// with a single `bpf_dynptr_read`.
pub const MIN_RECORD_SIZE: usize = 48;

/// The sample size of a record carrying `payload` key + value bytes.
pub fn record_size(payload: usize) -> usize {
    (UPDATE_HEADER_SIZE + payload).max(MIN_RECORD_SIZE)
}

impl UpdateHeader {
    /// Writes the header and payload into `out`, which must be
    /// `record_size(key.len() + value.len())` bytes long; padding is zeroed.
    pub fn encode(&self, key: &[u8], value: &[u8], out: &mut [u8]) {
        let end = UPDATE_HEADER_SIZE + key.len() + value.len();
        debug_assert_eq!(out.len(), record_size(key.len() + value.len()));
        out[0..8].copy_from_slice(&self.seq.to_ne_bytes());
        out[8..12].copy_from_slice(&self.mirror.to_ne_bytes());
        out[12..16].copy_from_slice(&self.op.to_ne_bytes());
        out[16..20].copy_from_slice(&self.key_size.to_ne_bytes());
        out[20..24].copy_from_slice(&self.value_size.to_ne_bytes());
        out[24..32].copy_from_slice(&self.flags.to_ne_bytes());
        let (k, v) = out[UPDATE_HEADER_SIZE..end].split_at_mut(key.len());
        k.copy_from_slice(key);
        v.copy_from_slice(value);
        out[end..].fill(0);
    }
}

/// `struct bridge_mirror`: what the drain knows of each registered mirror.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct MirrorSlot {
    /// Fd of the mirror in the process that runs the drain.
    pub fd: u32,
    /// Bytes the kernel copies for a key (0 for a queue or stack).
    pub key_size: u32,
    /// Bytes the kernel copies for a value (per-CPU: `round_up(v, 8)` times the CPU count).
    pub value_size: u32,
    /// 0 for the generic path through `bpf_sys_bpf`, else the index of a fast path.
    pub fast_shape: u32,
}

impl MirrorSlot {
    /// The slot as the drain's mirror-table map stores it.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.fd.to_ne_bytes());
        out[4..8].copy_from_slice(&self.key_size.to_ne_bytes());
        out[8..12].copy_from_slice(&self.value_size.to_ne_bytes());
        out[12..16].copy_from_slice(&self.fast_shape.to_ne_bytes());
        out
    }
}

/// `enum bridge_confirm_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmKind {
    /// One update applied (confirm-each mode).
    Applied,
    /// One update failed with `-result`.
    Failed,
    /// Records `first_seq..=seq` drained; `result` of them failed (each also reported).
    Batch,
    /// A malformed record (its sizes do not match the mirror).
    Rejected,
}

/// `struct bridge_confirm`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfirmRecord {
    /// The record confirmed (for a batch: the last one).
    pub seq: u64,
    /// For a batch: the first record drained.
    pub first_seq: u64,
    /// The kernel's result: 0, a negative errno, or a batch's failure count.
    pub result: i64,
    /// What is confirmed.
    pub kind: ConfirmKind,
    /// Records a batch covers (1 otherwise).
    pub count: u32,
}

/// Size of `struct bridge_confirm` on the wire.
pub const CONFIRM_RECORD_SIZE: usize = 32;

impl ConfirmRecord {
    /// Decodes one confirmation; `None` for a record of the wrong size or an unknown kind.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < CONFIRM_RECORD_SIZE {
            return None;
        }
        let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        let kind = match u32_at(24) {
            0 => ConfirmKind::Applied,
            1 => ConfirmKind::Failed,
            2 => ConfirmKind::Batch,
            3 => ConfirmKind::Rejected,
            _ => return None,
        };
        Some(Self {
            seq: u64_at(0),
            first_seq: u64_at(8),
            result: u64_at(16) as i64,
            kind,
            count: u32_at(28),
        })
    }
}

/// `struct bridge_drain_args`: the context handed to the drain program by BPF_PROG_RUN.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainArgs {
    /// Non-zero: one confirmation per record instead of one per drained batch.
    pub confirm_each: u32,
    /// Keeps the struct 8 bytes, as in C.
    pub pad: u32,
}

/// `BRIDGE_MAX_MIRRORS` in bridge.h.
pub const MAX_MIRRORS: u32 = 1024;
/// `BRIDGE_SCRATCH_SIZE` in bridge.h: the largest key + value of one record.
pub const SCRATCH_SIZE: usize = 1 << 22;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_places_key_after_header_and_value_after_key() {
        let header = UpdateHeader {
            seq: 7,
            mirror: 3,
            op: Op::Update as u32,
            key_size: 2,
            value_size: 3,
            flags: 1,
        };
        let mut out = vec![0xffu8; record_size(5)];
        header.encode(&[1, 2], &[3, 4, 5], &mut out);
        assert_eq!(out.len(), MIN_RECORD_SIZE);
        assert_eq!(u64::from_ne_bytes(out[0..8].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(out[8..12].try_into().unwrap()), 3);
        assert_eq!(&out[32..37], &[1, 2, 3, 4, 5]);
        assert!(out[37..].iter().all(|b| *b == 0), "padding is zeroed");
    }

    #[test]
    fn decode_rejects_short_and_unknown_records() {
        assert_eq!(ConfirmRecord::decode(&[0u8; 16]), None);
        let mut bytes = [0u8; 32];
        bytes[24] = 9;
        assert_eq!(ConfirmRecord::decode(&bytes), None);
        bytes[24] = 1;
        bytes[16..24].copy_from_slice(&(-17i64).to_ne_bytes());
        let record = ConfirmRecord::decode(&bytes).unwrap();
        assert_eq!(record.kind, ConfirmKind::Failed);
        assert_eq!(record.result, -17);
    }
}
