//! The kernel's `bpf_trace_printk`/`bpf_trace_vprintk`/`bpf_snprintf` format subset.
//!
//! Accepted conversions (as the kernel's `bpf_bprintf_prepare`): `%d %i %u %x %X` with the
//! length modifiers `l` and `ll`, `%p` (and `%px`, `%pK`: the raw value in hex, as `%px`
//! prints it; userspace has no pointer hashing), `%s`, `%c`, `%%`, each with optional flags
//! `0 - + space` and a width. Anything else, a format without its NUL, or more arguments than
//! allowed is `EINVAL`, as in the kernel.

use bpftime_abi::HelperId;
use thiserror::Error;

use super::{neg, probe, read_arg, write_arg, RuntimeHelpers};
use crate::vm::{CallContext, HelperError, HelperFault};

/// Longest formatted output, as the kernel's per-CPU printk buffer.
pub const MAX_OUTPUT: usize = 512;
/// Most arguments a vprintk/snprintf format takes (the kernel's `MAX_BPRINTF_VARARGS`).
const MAX_ARGS: usize = 12;
/// Longest string a `%s` reads.
const MAX_STR: usize = 256;

/// Why a format is refused (the helper returns `-EINVAL`).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum FormatError {
    /// No NUL within the format's size argument.
    #[error("format string is not NUL-terminated within its size")]
    NotTerminated,
    /// A conversion outside the accepted subset; the value is the offset of its `%`.
    #[error("unsupported conversion at byte {0}")]
    Unsupported(usize),
    /// The format has more conversions than arguments were given (the value: how many were).
    #[error("format uses more than {0} arguments")]
    TooManyArgs(usize),
}

/// Format `fmt` (the bytes before the NUL) with `args`. `read_str(addr)` reads a `%s`
/// argument (`None`: unreadable, printed as in the kernel as an empty string).
pub fn format(
    fmt: &[u8],
    args: &[u64],
    mut read_str: impl FnMut(u64, usize) -> Option<Vec<u8>>,
) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::with_capacity(fmt.len() + 16);
    let mut next = 0usize;
    let mut i = 0usize;
    let mut take = || -> Result<u64, FormatError> {
        let v = *args.get(next).ok_or(FormatError::TooManyArgs(args.len()))?;
        next += 1;
        Ok(v)
    };
    while i < fmt.len() {
        let c = fmt[i];
        if c != b'%' {
            out.push(c);
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        if fmt.get(i) == Some(&b'%') {
            out.push(b'%');
            i += 1;
            continue;
        }
        let mut spec = Spec::default();
        while let Some(&f) = fmt.get(i) {
            match f {
                b'0' => spec.zero = true,
                b'-' => spec.left = true,
                b'+' => spec.plus = true,
                b' ' => spec.space = true,
                _ => break,
            }
            i += 1;
        }
        while let Some(&d) = fmt.get(i).filter(|d| d.is_ascii_digit()) {
            spec.width = (spec.width * 10 + (d - b'0') as usize).min(MAX_OUTPUT);
            i += 1;
        }
        let mut longs = 0;
        while fmt.get(i) == Some(&b'l') && longs < 2 {
            longs += 1;
            i += 1;
        }
        let conv = *fmt.get(i).ok_or(FormatError::Unsupported(start))?;
        i += 1;
        let body: Vec<u8> = match conv {
            b'd' | b'i' | b'u' | b'x' | b'X' => {
                let v = take()?;
                let v = if longs == 0 {
                    match conv {
                        b'd' | b'i' => v as u32 as i32 as i64 as u64,
                        _ => v as u32 as u64,
                    }
                } else {
                    v
                };
                match conv {
                    b'd' | b'i' => {
                        let s = v as i64;
                        let mut t = s.unsigned_abs().to_string();
                        if s < 0 {
                            t.insert(0, '-');
                        } else if spec.plus {
                            t.insert(0, '+');
                        } else if spec.space {
                            t.insert(0, ' ');
                        }
                        t.into_bytes()
                    }
                    b'u' => v.to_string().into_bytes(),
                    b'x' => format!("{v:x}").into_bytes(),
                    _ => format!("{v:X}").into_bytes(),
                }
            }
            b'p' if longs == 0 => {
                // %p, %px, %pK: raw hex. Other %p extensions (%pS, %pI4, ...) are refused.
                if matches!(fmt.get(i), Some(b'x' | b'K')) {
                    i += 1;
                } else if fmt.get(i).is_some_and(|c| c.is_ascii_alphanumeric()) {
                    return Err(FormatError::Unsupported(start));
                }
                let v = take()?;
                format!("{v:016x}").into_bytes()
            }
            b's' if longs == 0 => {
                let v = take()?;
                read_str(v, MAX_STR).unwrap_or_default()
            }
            b'c' if longs == 0 => vec![take()? as u8],
            _ => return Err(FormatError::Unsupported(start)),
        };
        spec.pad(
            &mut out,
            &body,
            matches!(conv, b'd' | b'i' | b'u' | b'x' | b'X'),
        );
    }
    out.truncate(MAX_OUTPUT - 1);
    Ok(out)
}

#[derive(Default)]
struct Spec {
    zero: bool,
    left: bool,
    plus: bool,
    space: bool,
    width: usize,
}

impl Spec {
    fn pad(&self, out: &mut Vec<u8>, body: &[u8], numeric: bool) {
        let fill = self.width.saturating_sub(body.len());
        if self.left {
            out.extend_from_slice(body);
            out.extend(std::iter::repeat_n(b' ', fill));
        } else if self.zero && numeric {
            // Zeros go after a sign.
            let (sign, digits) = match body.first() {
                Some(b'-' | b'+' | b' ') => body.split_at(1),
                _ => body.split_at(0),
            };
            out.extend_from_slice(sign);
            out.extend(std::iter::repeat_n(b'0', fill));
            out.extend_from_slice(digits);
        } else {
            out.extend(std::iter::repeat_n(b' ', fill));
            out.extend_from_slice(body);
        }
    }
}

/// The bytes of a format argument up to its NUL, checking the kernel's rule that the NUL lies
/// within `fmt_size` bytes.
pub fn terminated(fmt: &[u8]) -> Result<&[u8], FormatError> {
    match fmt.iter().position(|&b| b == 0) {
        Some(n) => Ok(&fmt[..n]),
        None => Err(FormatError::NotTerminated),
    }
}

// The helpers themselves.

type Ret = Result<u64, HelperError>;

/// `bpf_trace_printk(fmt, fmt_size, arg1, arg2, arg3)`.
pub(super) fn trace_printk(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let fmt = read_arg(ctx, HelperId::TRACE_PRINTK, 1, a[0], a[1] as u32 as usize)?;
    Ok(emit(h, fmt, &a[2..5]))
}

/// `bpf_trace_vprintk(fmt, fmt_size, data, data_len)`.
#[inline(never)]
pub(super) fn trace_vprintk(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    const ID: HelperId = HelperId::TRACE_VPRINTK;
    let Some(args) = packed_args(ctx, ID, 3, a[2], a[3])? else {
        return Ok(neg(libc::EINVAL));
    };
    let fmt = read_arg(ctx, ID, 1, a[0], a[1] as u32 as usize)?.to_vec();
    Ok(emit(h, &fmt, &args))
}

/// `bpf_snprintf(str, str_size, fmt, data, data_len)`.
#[inline(never)]
pub(super) fn snprintf(_: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    const ID: HelperId = HelperId::SNPRINTF;
    let Some(args) = packed_args(ctx, ID, 4, a[3], a[4])? else {
        return Ok(neg(libc::EINVAL));
    };
    // A constant string (the verifier requires read-only map memory) of unknown length: read
    // up to the kernel's limit.
    let mut fmt = vec![0u8; MAX_OUTPUT];
    let n = probe::read_str(a[2], &mut fmt).unwrap_or(0);
    fmt.truncate(n);
    let Ok(fmt) = terminated(&fmt) else {
        return Ok(neg(libc::EINVAL));
    };
    let out = write_arg(ctx, ID, 1, a[0], a[1] as u32 as usize)?;
    Ok(match format(fmt, &args, read_str_arg) {
        Ok(s) => {
            if !out.is_empty() {
                let n = s.len().min(out.len() - 1);
                out[..n].copy_from_slice(&s[..n]);
                out[n] = 0;
            }
            s.len() as u64 + 1
        }
        Err(_) => {
            if let Some(b) = out.first_mut() {
                *b = 0;
            }
            neg(libc::EINVAL)
        }
    })
}

/// The u64 arguments packed at `data` (`data_len` bytes, argument `arg`), as the kernel's
/// `bpf_bprintf_prepare` takes them; `None` for a length it refuses.
fn packed_args(
    ctx: &mut CallContext<'_, '_>,
    id: HelperId,
    arg: u8,
    data: u64,
    data_len: u64,
) -> Result<Option<Vec<u64>>, HelperFault> {
    let data_len = data_len as u32 as usize;
    if !data_len.is_multiple_of(8) || data_len > MAX_ARGS * 8 {
        return Ok(None);
    }
    let data = read_arg(ctx, id, arg, data, data_len)?;
    Ok(Some(
        data.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    ))
}

/// Formats one line into the trace sink; r0 is its length, trailing newline included.
#[inline(never)]
fn emit(h: &mut RuntimeHelpers, fmt: &[u8], args: &[u64]) -> u64 {
    let Ok(fmt) = terminated(fmt) else {
        return neg(libc::EINVAL);
    };
    match format(fmt, args, read_str_arg) {
        Ok(mut line) => {
            let n = line.len() as u64;
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            h.trace.emit(&line);
            n
        }
        Err(_) => neg(libc::EINVAL),
    }
}

/// `%s` argument reader: up to `max` bytes of a string anywhere in the process.
fn read_str_arg(addr: u64, max: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; max];
    let n = probe::read_str(addr, &mut v)?;
    v.truncate(n.saturating_sub(1));
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(fmt: &str, args: &[u64]) -> Result<String, FormatError> {
        format(fmt.as_bytes(), args, |a, _| {
            (a == 1).then(|| b"str".to_vec())
        })
        .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn conversions() {
        assert_eq!(f("a %d b", &[(-5i64) as u64]).unwrap(), "a -5 b");
        assert_eq!(f("%d", &[0xffff_ffff]).unwrap(), "-1");
        assert_eq!(f("%u", &[0xffff_ffff_ffff]).unwrap(), "4294967295");
        assert_eq!(
            f("%lld %llu", &[u64::MAX, u64::MAX]).unwrap(),
            "-1 18446744073709551615"
        );
        assert_eq!(
            f("%x %X %lx", &[255, 255, 1 << 40]).unwrap(),
            "ff FF 10000000000"
        );
        assert_eq!(
            f("%05d|%-4d|%4d", &[(-42i64) as u64, 7, 7]).unwrap(),
            "-0042|7   |   7"
        );
        assert_eq!(f("%s %s %c", &[1, 2, b'z' as u64]).unwrap(), "str  z");
        assert_eq!(
            f("%p %px", &[0x1000, 0x10]).unwrap(),
            "0000000000001000 0000000000000010"
        );
        assert_eq!(f("100%%", &[]).unwrap(), "100%");
        assert_eq!(f("%d %d", &[1]), Err(FormatError::TooManyArgs(1)));
        assert_eq!(f("%q", &[1]), Err(FormatError::Unsupported(0)));
        assert_eq!(f("%pS", &[1]), Err(FormatError::Unsupported(0)));
        assert_eq!(f("%", &[1]), Err(FormatError::Unsupported(0)));
        assert_eq!(terminated(b"ab"), Err(FormatError::NotTerminated));
        assert_eq!(terminated(b"ab\0cd").unwrap(), b"ab");
    }
}
