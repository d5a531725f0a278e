//! The BPF ring buffer's record header (`linux/bpf.h`), shared by the userspace RINGBUF map and
//! the kernel USER_RINGBUF producer.

use libbpf_sys as sys;

/// Set in a record's length word while its producer still writes it.
pub const BUSY_BIT: u32 = sys::BPF_RINGBUF_BUSY_BIT;
/// Set in a record's length word when the consumer must skip it.
pub const DISCARD_BIT: u32 = sys::BPF_RINGBUF_DISCARD_BIT;
/// Size of the header in front of every record.
pub const HDR_SZ: usize = sys::BPF_RINGBUF_HDR_SZ as usize;

/// Bytes a record with `len` payload bytes takes in the ring: header plus payload, rounded up
/// to 8 (the kernel's `round_up(len + BPF_RINGBUF_HDR_SZ, 8)`).
pub const fn record_len(len: usize) -> usize {
    (len + HDR_SZ).next_multiple_of(8)
}

/// The payload length a header word holds, without the busy and discard bits.
pub const fn payload_len(word: u32) -> u32 {
    word & !(BUSY_BIT | DISCARD_BIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bits_and_lengths() {
        assert_eq!(BUSY_BIT, 1 << 31);
        assert_eq!(DISCARD_BIT, 1 << 30);
        assert_eq!(record_len(0), 8);
        assert_eq!(record_len(1), 16);
        assert_eq!(record_len(8), 16);
        assert_eq!(record_len(9), 24);
        assert_eq!(payload_len(5 | BUSY_BIT | DISCARD_BIT), 5);
    }
}
