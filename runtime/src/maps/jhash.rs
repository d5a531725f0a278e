//! Bob Jenkins' lookup3 hash as the kernel implements it (`include/linux/jhash.h`): stack ids
//! (`jhash2` over the addresses, `kernel/bpf/stackmap.c`) and bloom-filter bits
//! (`kernel/bpf/bloom_filter.c`) must come out as the kernel's for the same input, so the
//! same program gives the same ids and the same false positives in user space and the kernel.

const JHASH_INITVAL: u32 = 0xdead_beef;

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// Kernel `jhash2(k, length, initval)` over 32-bit words.
pub(crate) fn jhash2(k: &[u32], initval: u32) -> u32 {
    let len = k.len() as u32;
    let init = JHASH_INITVAL.wrapping_add(len << 2).wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut k = k;
    while k.len() > 3 {
        a = a.wrapping_add(k[0]);
        b = b.wrapping_add(k[1]);
        c = c.wrapping_add(k[2]);
        mix(&mut a, &mut b, &mut c);
        k = &k[3..];
    }
    // The last 1 to 3 words (the kernel's switch with fallthrough); none: no final mix.
    if !k.is_empty() {
        if k.len() == 3 {
            c = c.wrapping_add(k[2]);
        }
        if k.len() >= 2 {
            b = b.wrapping_add(k[1]);
        }
        a = a.wrapping_add(k[0]);
        final_mix(&mut a, &mut b, &mut c);
    }
    c
}

/// `jhash2` over bytes whose length is a multiple of 4 (native-endian words, as the kernel
/// reads them).
pub(crate) fn jhash2_bytes(bytes: &[u8], initval: u32) -> u32 {
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|w| u32::from_ne_bytes(w.try_into().expect("4 bytes")))
        .collect();
    jhash2(&words, initval)
}

/// Kernel `jhash(key, length, initval)` over bytes.
pub(crate) fn jhash(key: &[u8], initval: u32) -> u32 {
    let init = JHASH_INITVAL
        .wrapping_add(key.len() as u32)
        .wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut k = key;
    let word = |s: &[u8]| u32::from_le_bytes(s[..4].try_into().expect("4 bytes"));
    while k.len() > 12 {
        a = a.wrapping_add(word(&k[0..]));
        b = b.wrapping_add(word(&k[4..]));
        c = c.wrapping_add(word(&k[8..]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    if k.is_empty() {
        return c;
    }
    // The tail, little-endian byte by byte (the kernel's switch with fallthrough).
    let mut tail = [0u8; 12];
    tail[..k.len()].copy_from_slice(k);
    a = a.wrapping_add(word(&tail[0..]));
    b = b.wrapping_add(word(&tail[4..]));
    c = c.wrapping_add(word(&tail[8..]));
    final_mix(&mut a, &mut b, &mut c);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// lookup3's published check values (`hashlittle("", 0)`, `hashlittle("Four score and
    /// seven years ago", 0 / 1)`), which the kernel's `jhash` reproduces.
    #[test]
    fn jhash_matches_lookup3_reference_values() {
        assert_eq!(jhash(b"", 0), 0xdeadbeef);
        assert_eq!(jhash(b"Four score and seven years ago", 0), 0x17770551);
        assert_eq!(jhash(b"Four score and seven years ago", 1), 0xcd628161);
    }

    /// On whole words (little-endian) the kernel's word and byte forms agree: both start
    /// from the length in bytes and mix 12 bytes at a time. With the reference values above
    /// this ties `jhash2` down; the comparison with the kernel's stack ids is in the
    /// stack-map tests against kernel uprobes.
    #[test]
    fn jhash2_agrees_with_jhash_on_whole_words() {
        assert_eq!(jhash2(&[], 0), 0xdeadbeef);
        let k = [1u32, 2, 3];
        let bytes: Vec<u8> = k.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(jhash2(&k, 7), jhash(&bytes, 7));
        let k = [0xdead_beefu32, 5, 6, 7, 8];
        let bytes: Vec<u8> = k.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(jhash2(&k, 0), jhash(&bytes, 0));
    }
}
