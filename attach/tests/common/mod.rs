//! Shared helpers: compile small C victims with the system `cc` into a temp dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A fresh directory under the system temp dir, removed at exit (best effort, not needed).
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "bpftime-attach-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles `src` with `cc` and the given extra args into `dir/out`.
pub fn cc(dir: &Path, name: &str, src: &str, out: &str, args: &[&str]) -> PathBuf {
    let c = dir.join(name);
    std::fs::write(&c, src).unwrap();
    let o = dir.join(out);
    let st = Command::new("cc")
        .args([
            "-O2",
            "-g",
            "-fcf-protection=none",
            "-fno-omit-frame-pointer",
        ])
        .args(args)
        .arg("-o")
        .arg(&o)
        .arg(&c)
        .status()
        .expect("running cc");
    assert!(st.success(), "cc failed for {name}");
    o
}

pub const VICTIM_LIB: &str = r#"
#include <stdlib.h>
#include <setjmp.h>
#include <stddef.h>
#define NI __attribute__((noinline))
NI long add6(long a, long b, long c, long d, long e, long f) {
    return a + 2*b + 3*c + 4*d + 5*e + 6*f;
}
NI long fib(long n) {
    if (n < 2) return n;
    long r = fib(n - 1);
    r += fib(n - 2);
    __asm__ volatile("" : "+r"(r)); /* keep both calls real calls */
    return r;
}
NI int check_secret(int x) { volatile int y = x * 7; return y == 42 ? 1 : 0; }
NI long work(long x) { volatile long y = x; return y + 1; }
NI long churn(long x) { volatile long y = x; return y * 3; }
NI long deep(long n) {
    if (n == 0) return 0;
    long r = deep(n - 1);
    __asm__ volatile("" : "+r"(r)); /* a real call, not a loop */
    return r + 1;
}
NI long thread_hit(long x) { volatile long y = x; return y + 2; }
NI int tiny(int x) { return x; }
NI double fmix(double a, double b, long c) { return a * 2.0 + b + (double)c; }
static jmp_buf jb;
NI long jumper(long x) { volatile long y = x; if (y > 0) longjmp(jb, 1); return y; }
NI long call_jumper(long x) { if (setjmp(jb) == 0) { jumper(x); return -1; } return 7; }
NI void *alloc_wrap(size_t n) { return malloc(n); }
NI long pass_through(long (*cb)(long), long x) {
    long r = cb(x);
    __asm__ volatile("" : "+r"(r));
    return r + 1;
}
NI long bench_plain(long x) { volatile long y = x; return y + 1; }
/* tail_f ends in a tail call (`jmp tail_g`): tail_g returns straight to tail_f's caller */
NI long tail_g(long x) { volatile long y = x; return y + 5; }
NI long tail_f(long x) { volatile long z = x; return tail_g(z * 2); }
__asm__(".text\n.globl bench_nop5\n.type bench_nop5,@function\n.p2align 4\nbench_nop5:\n"
        ".byte 0x0f,0x1f,0x44,0x00,0x00\nleaq 1(%rdi), %rax\nret\n.size bench_nop5, .-bench_nop5\n");
/* int3 sites. tiny_jmp is a 2-byte tail jump (jmp rel8) to the function after it; nop_loop
   has a 1-byte nop at +2 (a USDT site's shape) followed by a branch target at +3, where a
   5-byte detour would cut the loop's target in two: nop_loop(n) = n for n >= 1. */
__asm__(".text\n.globl tiny_jmp\n.type tiny_jmp,@function\n.p2align 4\ntiny_jmp:\n"
        "jmp 1f\n.size tiny_jmp, .-tiny_jmp\n"
        ".globl tiny_jmp_target\n.type tiny_jmp_target,@function\ntiny_jmp_target:\n"
        "1: leaq 3(%rdi), %rax\nret\n.size tiny_jmp_target, .-tiny_jmp_target\n");
/* bench_short: a 4-byte function (leal; ret), shorter than a detour: the int3 fallback. */
__asm__(".text\n.globl bench_short\n.type bench_short,@function\n.p2align 4\nbench_short:\n"
        "leal 1(%rdi), %eax\nret\n.size bench_short, .-bench_short\n");
__asm__(".text\n.globl nop_loop\n.type nop_loop,@function\n.p2align 4\nnop_loop:\n"
        "xorl %eax, %eax\nnop\n2: incl %eax\ncmpl %edi, %eax\njl 2b\nret\n"
        ".size nop_loop, .-nop_loop\n");
/* Two back-to-back 1-byte nops (two USDT probes in a row), then 7 bytes of code: a detour at
   +0 would displace the nop at +1. nop_pair_a(x, y) = nop_pair_b(x, y) = x + y + 7. */
__asm__(".text\n.globl nop_pair_a\n.type nop_pair_a,@function\n.p2align 4\nnop_pair_a:\n"
        "nop\nnop\nleaq 7(%rdi), %rax\naddq %rsi, %rax\nret\n.size nop_pair_a, .-nop_pair_a\n");
__asm__(".text\n.globl nop_pair_b\n.type nop_pair_b,@function\n.p2align 4\nnop_pair_b:\n"
        "nop\nnop\nleaq 7(%rdi), %rax\naddq %rsi, %rax\nret\n.size nop_pair_b, .-nop_pair_b\n");
NI long mid_target(long x) {
    volatile long a = x;
    a = a * 5;
    a = a + 3;
    return a;
}
"#;

pub struct VictimLib {
    pub path: PathBuf,
    pub handle: usize,
}

/// Builds and dlopens the victim library once per test binary.
pub fn victim() -> &'static VictimLib {
    static LIB: OnceLock<VictimLib> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = temp_dir("lib");
        let path = cc(
            &dir,
            "victim.c",
            VICTIM_LIB,
            "libvictim.so",
            &["-shared", "-fPIC", "-fexceptions"],
        );
        let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: dlopen of a library we just built.
        let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW) } as usize;
        assert_ne!(handle, 0, "dlopen victim");
        VictimLib { path, handle }
    })
}

/// Looks up a function of the victim library.
pub fn sym<T: Copy>(name: &str) -> T {
    let v = victim();
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: dlsym on a live handle.
    let p = unsafe { libc::dlsym(v.handle as *mut libc::c_void, c.as_ptr()) };
    assert!(!p.is_null(), "dlsym {name}");
    assert_eq!(std::mem::size_of::<T>(), 8);
    // SAFETY: caller passes the right fn pointer type.
    unsafe { std::mem::transmute_copy(&p) }
}

/// `libvictim.so:FUNC`.
pub fn target(func: &str) -> String {
    let _ = victim();
    format!("libvictim.so:{func}")
}

/// Installs a hook of `kind` running `h` on the victim library's `func`.
pub fn install(
    set: &mut bpftime_attach::HookSet,
    func: &str,
    kind: bpftime_attach::ProbeKind,
    h: std::sync::Arc<dyn bpftime_attach::ProbeHandler>,
) {
    let t = bpftime_attach::resolve(&target(func)).unwrap();
    set.install(&t, kind, h).unwrap();
}

/// The victim's `fib(n)`, counting the calls it makes and summing their results (wrapping).
pub fn fib_ref(n: i64, calls: &mut u64, sum: &mut u64) -> i64 {
    *calls += 1;
    let r = if n < 2 {
        n
    } else {
        fib_ref(n - 1, calls, sum) + fib_ref(n - 2, calls, sum)
    };
    *sum = sum.wrapping_add(r as u64);
    r
}

/// A victim function `long f(long)`.
pub type LongFn = extern "C" fn(i64) -> i64;

/// Runs `threads` threads at once, thread `t` calling `f(i + t)` for `i` in `0..calls`; each
/// thread's wrapping sum of the results, by thread.
pub fn sums_on_threads(f: LongFn, threads: i64, calls: i64) -> Vec<i64> {
    let handles: Vec<_> = (0..threads)
        .map(|t| std::thread::spawn(move || (0..calls).fold(0i64, |s, i| s.wrapping_add(f(i + t)))))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Threads calling `f(n)` for n = 0, 1, 2, ... and checking each result against `expect(n)`,
/// until stopped.
pub struct Callers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Callers {
    pub fn start(f: LongFn, expect: fn(i64) -> i64, threads: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        assert_eq!(f(n as i64), expect(n as i64));
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops the threads; how many calls they made.
    pub fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.into_iter().map(|h| h.join().unwrap()).sum()
    }
}
