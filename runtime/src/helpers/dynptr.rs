//! Dynamic pointers and the user ring buffer: `bpf_user_ringbuf_drain`, which hands each
//! record to a callback as a dynptr, and the dynptr helpers callbacks use
//! (`bpf_dynptr_from_mem`, `bpf_dynptr_read`, `bpf_dynptr_write`, `bpf_dynptr_data`).
//!
//! A dynptr is the kernel's `struct bpf_dynptr_kern` in the program's 16-byte
//! `struct bpf_dynptr`: the data address, a u32 of size (low 24 bits), type (bits 28-30) and
//! read-only flag (bit 31), and a u32 offset. Programs never look inside; the helpers check
//! every access against the size, with the kernel's errnos (`-EINVAL` for a NULL or
//! read-only dynptr or bad flags, `-E2BIG` out of bounds).

use bpftime_abi::HelperId;

use super::{neg, read_arg, register, write_arg, RuntimeHelpers};
use crate::vm::{CallContext, HelperError, HelperFault};

type Ret = Result<u64, HelperError>;

/// `DYNPTR_MAX_SIZE`.
const MAX_SIZE: u64 = (1 << 24) - 1;
const SIZE_MASK: u32 = (1 << 24) - 1;
const TYPE_SHIFT: u32 = 28;
const RDONLY_BIT: u32 = 1 << 31;
/// `BPF_DYNPTR_TYPE_LOCAL`: memory of the program (stack, map value) or a user ring record.
const TYPE_LOCAL: u32 = 1;
/// `sizeof(struct bpf_dynptr)`.
const DYNPTR_SIZE: usize = 16;

#[derive(Clone, Copy)]
struct Dynptr {
    data: u64,
    size: u32,
    offset: u32,
    rdonly: bool,
}

impl Dynptr {
    fn encode(&self) -> [u8; DYNPTR_SIZE] {
        let mut b = [0u8; DYNPTR_SIZE];
        let word = (self.size & SIZE_MASK)
            | (TYPE_LOCAL << TYPE_SHIFT)
            | if self.rdonly { RDONLY_BIT } else { 0 };
        b[..8].copy_from_slice(&self.data.to_le_bytes());
        b[8..12].copy_from_slice(&word.to_le_bytes());
        b[12..].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        let word = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        Self {
            data: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            size: word & SIZE_MASK,
            offset: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
            rdonly: word & RDONLY_BIT != 0,
        }
    }

    /// `bpf_dynptr_check_off_len`: the address of `[offset, offset + len)`, or `-E2BIG`.
    fn range(&self, offset: u64, len: u64) -> Result<u64, i32> {
        let size = u64::from(self.size);
        if len > size || offset > size - len {
            return Err(libc::E2BIG);
        }
        Ok(self.data + u64::from(self.offset) + offset)
    }
}

fn read_dynptr(
    ctx: &mut CallContext<'_, '_>,
    id: HelperId,
    arg: u8,
    at: u64,
) -> Result<Dynptr, HelperFault> {
    Ok(Dynptr::decode(read_arg(ctx, id, arg, at, DYNPTR_SIZE)?))
}

/// `bpf_dynptr_from_mem(data, size, flags, ptr)`: a local dynptr over program memory.
pub(super) fn dynptr_from_mem(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    const ID: HelperId = HelperId::DYNPTR_FROM_MEM;
    let (data, size, flags) = (a[0], a[1] as u32 as u64, a[2]);
    let result = if flags != 0 {
        Err(libc::EINVAL)
    } else if size > MAX_SIZE {
        Err(libc::E2BIG)
    } else {
        // The memory must be the program's to use (a map value or its stack).
        read_arg(ctx, ID, 1, data, size as usize)?;
        Ok(Dynptr {
            data,
            size: size as u32,
            offset: 0,
            rdonly: false,
        })
    };
    let out = write_arg(ctx, ID, 4, a[3], DYNPTR_SIZE)?;
    Ok(match result {
        Ok(d) => {
            out.copy_from_slice(&d.encode());
            0
        }
        Err(e) => {
            out.fill(0);
            neg(e)
        }
    })
}

/// `bpf_dynptr_read(dst, len, src, offset, flags)`.
pub(super) fn dynptr_read(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    const ID: HelperId = HelperId::DYNPTR_READ;
    let len = a[1] as u32 as u64;
    let src = read_dynptr(ctx, ID, 3, a[2])?;
    if src.data == 0 || a[4] != 0 {
        return Ok(neg(libc::EINVAL));
    }
    let from = match src.range(a[3] as u32 as u64, len) {
        Ok(p) => p,
        Err(e) => return Ok(neg(e)),
    };
    let bytes = read_arg(ctx, ID, 3, from, len as usize)?.to_vec();
    write_arg(ctx, ID, 1, a[0], len as usize)?.copy_from_slice(&bytes);
    Ok(0)
}

/// `bpf_dynptr_write(dst, offset, src, len, flags)`.
pub(super) fn dynptr_write(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    const ID: HelperId = HelperId::DYNPTR_WRITE;
    let len = a[3] as u32 as u64;
    let dst = read_dynptr(ctx, ID, 1, a[0])?;
    if dst.data == 0 || dst.rdonly || a[4] != 0 {
        return Ok(neg(libc::EINVAL));
    }
    let to = match dst.range(a[1] as u32 as u64, len) {
        Ok(p) => p,
        Err(e) => return Ok(neg(e)),
    };
    let bytes = read_arg(ctx, ID, 3, a[2], len as usize)?.to_vec();
    write_arg(ctx, ID, 1, to, len as usize)?.copy_from_slice(&bytes);
    Ok(0)
}

/// `bpf_dynptr_data(ptr, offset, len)`: a pointer into the dynptr's memory, NULL when out of
/// bounds or read-only.
pub(super) fn dynptr_data(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let d = read_dynptr(ctx, HelperId::DYNPTR_DATA, 1, a[0])?;
    let len = a[2] as u32 as u64;
    if d.data == 0 || d.rdonly {
        return Ok(0);
    }
    Ok(match d.range(a[1] as u32 as u64, len) {
        Ok(p) => {
            register(ctx, &h.maps, p, len, true);
            p
        }
        Err(_) => 0,
    })
}

/// `bpf_user_ringbuf_drain(map, callback, ctx, flags)`: each committed record of the
/// USER_RINGBUF to `callback(dynptr, ctx)` until it returns non-zero or the ring is empty;
/// r0 is the number of records drained or a negative errno.
pub(super) fn user_ringbuf_drain(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let idx = h.map_arg(HelperId::USER_RINGBUF_DRAIN, 1, a[0])?;
    let map = h.maps[idx].clone();
    let Some(ring) = map
        .as_ringbuf()
        .filter(|_| map.map_type() == crate::maps::MapType::UserRingbuf)
    else {
        return Ok(neg(libc::EINVAL));
    };
    let all_maps = h.maps.clone();
    // The dynptr the callback gets, in memory of ours that lives across the whole drain.
    let mut cell = Box::new([0u8; DYNPTR_SIZE]);
    let cell_addr = cell.as_mut_ptr() as u64;
    let drained = ring.drain_user(a[3], |sample, size| {
        let sample = sample as u64;
        *cell = Dynptr {
            data: sample,
            size,
            offset: 0,
            rdonly: false,
        }
        .encode();
        let checked = ctx.is_checked();
        if checked {
            let mem = ctx.memory();
            mem.keep_alive(&all_maps);
            // SAFETY: the dynptr cell lives until the drain returns and the record until
            // it is released after this callback; both are removed again below.
            unsafe {
                mem.add_raw(cell_addr, DYNPTR_SIZE as u64, true);
                mem.add_raw(sample, u64::from(size), false);
            }
        }
        let r = ctx.call_function(h, a[1], [cell_addr, a[2], 0, 0, 0]);
        if checked {
            ctx.memory().remove(cell_addr, DYNPTR_SIZE as u64);
            ctx.memory().remove(sample, u64::from(size));
        }
        r
    })?;
    Ok(match drained {
        Ok(n) => n,
        Err(e) => neg(e),
    })
}
