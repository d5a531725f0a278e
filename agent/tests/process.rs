//! End-to-end tests with real processes: LD_PRELOAD start, ptrace attach (sleeping and busy
//! targets), detach. The agent cdylib is the one cargo built for this test run.

// Linking the library makes cargo rebuild libbpftime_agent.so before this test runs.
use bpftime_agent as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VICTIM: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include <signal.h>
#include <ucontext.h>
#include <errno.h>
#include <dlfcn.h>
static void on_segv(int sig, siginfo_t *si, void *uc_) {
    ucontext_t *uc = uc_;
    char buf[200];
    int n = snprintf(buf, sizeof buf, "victim: signal %d addr %p rip %llx rsp %llx\n", sig, si->si_addr,
                     (unsigned long long)uc->uc_mcontext.gregs[REG_RIP],
                     (unsigned long long)uc->uc_mcontext.gregs[REG_RSP]);
    write(2, buf, n);
    char maps[64];
    snprintf(maps, sizeof maps, "/proc/%d/maps", getpid());
    FILE *f = fopen("/tmp/victim-crash-maps", "w"); FILE *m = fopen(maps, "r");
    if (f && m) { int c; while ((c = fgetc(m)) != EOF) fputc(c, f); fclose(f); fclose(m); }
    _exit(99);
}
#define NI __attribute__((noinline))
NI long target_fn(long x) { volatile long y = x; return y * 2; }
NI int tiny(int x) { return x; }
__attribute__((constructor)) static void early(void) { target_fn(1000); }
static int stop_requested(const char *f) { return access(f, F_OK) == 0; }
static const char *stop_file;
static pthread_mutex_t bm = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bc = PTHREAD_COND_INITIALIZER;
static void on_usr1(int sig) { (void)sig; _exit(7); }
static void *blocked_worker(void *arg) {
    pthread_mutex_lock(&bm);
    for (;;) pthread_cond_wait(&bc, &bm);
    return arg;
}
static void *worker(void *arg) {
    long n = 0, sum = 0;
    unsigned seed = (unsigned)(long)arg;
    while (!stop_requested(stop_file)) {
        for (int k = 0; k < 2000; k++) {
            void * volatile p = malloc(1 + rand_r(&seed) % 3000);
            sum += target_fn(n++);
            free(p);
        }
    }
    return (void *)sum;
}
int main(int argc, char **argv) {
    long sum = 0, n = 0;
    struct sigaction sa = {0};
    sa.sa_sigaction = on_segv; sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, 0); sigaction(SIGBUS, &sa, 0); sigaction(SIGILL, &sa, 0);
    if (argc > 2 && strcmp(argv[1], "count") == 0) {
        long N = atol(argv[2]);
        for (long i = 0; i < N; i++) {
            sum += target_fn(i);
            void * volatile p = malloc(4242); free(p);
        }
        printf("sum %ld\n", sum);
        return 0;
    }
    if (strcmp(argv[1], "blocked") == 0) {
        /* every thread blocked in futex: no safe point for injection */
        signal(SIGUSR1, on_usr1);
        pthread_t t;
        pthread_create(&t, 0, blocked_worker, 0);
        printf("ready %d\n", getpid());
        fflush(stdout);
        pthread_join(t, 0);
        return 0;
    }
    if (strcmp(argv[1], "threads") == 0) {
        stop_file = argv[2];
        pthread_t t[4];
        for (long i = 0; i < 4; i++) pthread_create(&t[i], 0, worker, (void *)i);
        printf("ready %d\n", getpid());
        fflush(stdout);
        for (int i = 0; i < 4; i++) pthread_join(t[i], 0); /* main thread waits in futex */
        printf("done 0\n");
        return 0;
    }
    if (strcmp(argv[1], "redzone") == 0) {
        /* The only thread keeps canaries in the 128-byte red zone below rsp for ~1 ms at a time:
           an injection that pushed anything there while stopping it would be caught. */
        printf("ready %d\n", getpid());
        fflush(stdout);
        for (long round = 0;; round++) {
            long bad, canary = round ^ 0x5a5a5a5a5a5a5a5aL;
            __asm__ volatile(
                "mov %1, -8(%%rsp)\n\t"
                "mov %1, -64(%%rsp)\n\t"
                "mov %1, -128(%%rsp)\n\t"
                "mov $20000, %%ecx\n\t"
                "1: pause\n\t"
                "dec %%ecx\n\t"
                "jnz 1b\n\t"
                "xor %0, %0\n\t"
                "cmp %1, -8(%%rsp)\n\t"
                "jne 2f\n\t"
                "cmp %1, -64(%%rsp)\n\t"
                "jne 2f\n\t"
                "cmp %1, -128(%%rsp)\n\t"
                "je 3f\n\t"
                "2: mov $1, %0\n\t"
                "3:\n\t"
                : "=&r"(bad) : "r"(canary) : "rcx", "memory", "cc");
            if (bad) { write(2, "victim: red zone clobbered\n", 27); _exit(42); }
            if ((round & 63) == 0 && stop_requested(argv[2])) break;
        }
        printf("done redzone\n");
        return 0;
    }
    if (strcmp(argv[1], "reader") == 0) {
        /* The only thread is blocked in read(2) on stdin: injection must make it restart. */
        char buf[64];
        printf("ready %d\n", getpid());
        fflush(stdout);
        ssize_t got = read(0, buf, sizeof buf - 1);
        if (got < 0) { printf("read failed: %s\n", strerror(errno)); return 43; }
        buf[got] = 0;
        printf("got %s", buf);
        return 0;
    }
    if (strcmp(argv[1], "dlopen") == 0) {
        /* The only thread loads and unloads a library in a loop, with a short spin outside libc
           between: many stops land inside the dynamic loader's lock, where injecting dlopen would
           deadlock, and some outside it. */
        long loops = 0;
        printf("ready %d\n", getpid());
        fflush(stdout);
        while (!stop_requested(argv[2])) {
            void *h = dlopen("libm.so.6", RTLD_NOW | RTLD_LOCAL);
            if (!h) { printf("dlopen: %s\n", dlerror()); return 44; }
            dlclose(h);
            for (volatile int k = 0; k < 20000; k++) {}
            loops++;
        }
        printf("done %ld\n", loops);
        return 0;
    }
    /* sleep|busy STOPFILE */
    int busy = strcmp(argv[1], "busy") == 0;
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) {
        for (int k = 0; k < (busy ? 100000 : 1); k++) { sum += target_fn(n++); }
        void * volatile p = malloc(4242); free(p);
        if (!busy) { struct timespec ts = {0, 20 * 1000 * 1000}; nanosleep(&ts, 0); }
        if (stop_requested(argv[2])) break;
    }
    printf("done %ld\n", n);
    return 0;
}
"#;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "bpftime-agent-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn build_victim(dir: &Path, pie: bool) -> PathBuf {
    let c = dir.join("victim.c");
    std::fs::write(&c, VICTIM).unwrap();
    let out = dir.join(if pie { "victim" } else { "victim_nopie" });
    let st = Command::new("cc")
        .args(["-O2", "-g", "-fcf-protection=none", "-pthread"])
        .arg(if pie { "-pie" } else { "-no-pie" })
        .arg(if pie { "-fPIE" } else { "-fno-PIE" })
        .arg("-o")
        .arg(&out)
        .arg(&c)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

/// The agent built by cargo for this test run: `target/<profile>/deps/libbpftime_agent.so` (built
/// as this test's dependency) or `target/<profile>/libbpftime_agent.so`, whichever is newer.
fn agent_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [
        deps.join("libbpftime_agent.so"),
        deps.parent().unwrap().join("libbpftime_agent.so"),
    ];
    candidates
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .expect("libbpftime_agent.so not built")
}

/// Reads `<config>.counts`: per request `[entries, returns, sum PARM1, sum RC]`.
fn counts(config: &Path) -> Vec<[u64; 4]> {
    let mut p = config.as_os_str().to_owned();
    p.push(".counts");
    let b = std::fs::read(PathBuf::from(p)).unwrap_or_default();
    if b.len() < 16 {
        return vec![];
    }
    let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!(w(0), u64::from_le_bytes(*b"BPFTAGNT"));
    (0..w(1) as usize)
        .map(|i| [w(2 + 4 * i), w(3 + 4 * i), w(4 + 4 * i), w(5 + 4 * i)])
        .collect()
}

fn status(config: &Path) -> String {
    let mut p = config.as_os_str().to_owned();
    p.push(".status");
    std::fs::read_to_string(PathBuf::from(p)).unwrap_or_default()
}

fn run_preloaded(exe: &Path, config: &Path, n: u64) -> String {
    let out = Command::new(exe)
        .args(["count", &n.to_string()])
        .env("LD_PRELOAD", agent_path())
        .env("BPFTIME_AGENT_CONFIG", config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "victim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn start_with_ld_preload_hooks_before_main() {
    let dir = temp_dir("start");
    for pie in [true, false] {
        let exe = build_victim(&dir, pie);
        let config = dir.join(format!("hooks-{pie}.conf"));
        std::fs::write(
            &config,
            format!(
                "uprobe target_fn\nuretprobe {}:target_fn\nuprobe libc.so.6:malloc\nuretprobe libc.so.6:malloc\nuprobe no_such_function\nuprobe tiny\n",
                exe.display()
            ),
        )
        .unwrap();
        let n = 10_000u64;
        let out = run_preloaded(&exe, &config, n);
        let expected_sum: u64 = (0..n).map(|i| 2 * i).sum();
        assert_eq!(out.trim(), format!("sum {expected_sum}"));
        let c = counts(&config);
        let st = status(&config);
        assert_eq!(c.len(), 6, "{st}");
        // +1: the executable's constructor calls target_fn(1000) before main
        assert_eq!(c[0][0], n + 1, "entries (pie={pie}) {st}");
        assert_eq!(c[0][2], (0..n).sum::<u64>() + 1000, "sum of PARM1");
        assert_eq!(c[1][1], n + 1, "returns");
        assert_eq!(c[1][3], expected_sum + 2000, "sum of RC");
        assert!(c[2][0] >= n, "malloc entries {}", c[2][0]);
        assert!(c[3][1] >= n, "malloc returns {}", c[3][1]);
        let lines: Vec<&str> = st.lines().collect();
        assert!(lines[0].starts_with("ok uprobe target_fn"), "{st}");
        assert!(
            lines[4].starts_with("error")
                && lines[4].contains("no_such_function")
                && lines[4].contains("victim"),
            "{st}"
        );
        // Shorter than a detour: hooked through an int3, and said so.
        assert!(
            lines[5].starts_with("ok uprobe tiny") && lines[5].ends_with(" via int3"),
            "{st}"
        );
    }
}

struct Victim {
    child: Child,
    stop: PathBuf,
    pid: i32,
}

impl Drop for Victim {
    fn drop(&mut self) {
        // never leave a victim behind when a test fails
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_victim(exe: &Path, mode: &str, dir: &Path) -> Victim {
    let stop = dir.join(format!("stop-{mode}"));
    let mut child = Command::new(exe)
        .args([mode, stop.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "{line}");
    let pid = child.id() as i32;
    Victim { child, stop, pid }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn attach_detach_cycle(mode: &str) {
    use bpftime_attach::inject::{detach_agent, inject_agent, InjectOptions};
    let dir = temp_dir(mode);
    let exe = build_victim(&dir, true);
    let mut v = spawn_victim(&exe, mode, &dir);
    let config = dir.join("attach.conf");
    std::fs::write(
        &config,
        "uprobe target_fn\nuretprobe target_fn\nuprobe libc.so.6:malloc\nuprobe nope_missing\n",
    )
    .unwrap();
    let opts = InjectOptions::default();
    let rep = inject_agent(v.pid, &agent_path(), Some(&config), &opts).expect("inject");
    assert_ne!(rep.handle, 0);
    assert_eq!(rep.start_result, Some(0));
    wait_until("status", Duration::from_secs(10), || {
        status(&config).lines().count() == 4
    });
    let st = status(&config);
    assert!(st.contains("error") && st.contains("nope_missing"), "{st}");
    assert_eq!(
        st.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{st}"
    );
    wait_until("calls counted", Duration::from_secs(10), || {
        let c = counts(&config);
        c.len() == 4 && c[0][0] > 5 && c[1][1] > 5 && c[2][0] > 2
    });
    assert_eq!(detach_agent(v.pid, &opts).expect("detach"), 0);
    // a call already inside the hook when detach ran may still finish its count
    std::thread::sleep(Duration::from_millis(100));
    let after = counts(&config);
    std::thread::sleep(Duration::from_millis(300));
    let later = counts(&config);
    assert_eq!(after[0][0], later[0][0], "no entry counted after detach");
    assert!(status(&config).contains("detached"));
    // the target is still alive and exits normally
    std::fs::write(&v.stop, b"").unwrap();
    let st = v.child.wait().unwrap();
    assert!(st.success(), "victim exit {st:?}");
    let mut rest = String::new();
    v.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut rest)
        .unwrap();
    assert!(rest.contains("done"), "{rest}");
    let _ = rep;
}

#[test]
fn attach_to_a_process_sleeping_in_nanosleep_then_detach() {
    attach_detach_cycle("sleep");
}

#[test]
fn attach_to_a_busy_process_then_detach() {
    attach_detach_cycle("busy");
}

#[test]
fn repeated_attach_detach_into_malloc_heavy_threads() {
    let dir = temp_dir("threads");
    let exe = build_victim(&dir, true);
    let mut v = spawn_victim(&exe, "threads", &dir);
    let config = dir.join("threads.conf");
    let probes = "uprobe libc.so.6:malloc\nuretprobe libc.so.6:malloc\nuprobe libc.so.6:free\nuprobe target_fn\nuretprobe target_fn\n";
    let unsafe_stops = attach_detach_rounds(v.pid, &config, probes, 12, || {
        let attached = status(&config)
            .lines()
            .filter(|l| l.starts_with("ok "))
            .count()
            == 5;
        let c = counts(&config);
        attached && c.len() == 5 && c[0][0] > 100 && c[1][1] > 100 && c[4][1] > 100
    });
    eprintln!("12 rounds, {unsafe_stops} stops rejected as unsafe");
    // The threads spend most of their time inside malloc/free: injection must have met (and
    // refused) stops there; 170 over the 12 rounds when measured.
    assert!(
        unsafe_stops > 0,
        "no stop inside malloc was ever refused: the safe-point check did not run"
    );
    std::fs::write(&v.stop, b"").unwrap();
    let st = v.child.wait().unwrap();
    assert!(st.success(), "victim exit {st:?}");
}

/// Injects the agent with `probes` as its config and detaches it, `rounds` times: each round
/// waits for `ready()` (its probes attached and counting) before detaching, and checks the
/// detach was reported. Returns how many stops injection refused as unsafe.
fn attach_detach_rounds(
    pid: i32,
    config: &Path,
    probes: &str,
    rounds: usize,
    mut ready: impl FnMut() -> bool,
) -> u64 {
    use bpftime_attach::inject::{detach_agent, inject_agent, InjectOptions};
    std::fs::write(config, probes).unwrap();
    let opts = InjectOptions::default();
    let mut unsafe_stops = 0;
    for round in 0..rounds {
        let rep = inject_agent(pid, &agent_path(), Some(config), &opts)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(rep.start_result, Some(0), "round {round}");
        unsafe_stops += u64::from(rep.unsafe_stops);
        wait_until("the probes attached", Duration::from_secs(10), &mut ready);
        assert_eq!(
            detach_agent(pid, &opts).expect("detach"),
            0,
            "round {round}"
        );
        assert!(status(config).contains("detached"), "round {round}");
        // the next round's status must be fresh
        let mut st = config.as_os_str().to_owned();
        st.push(".status");
        std::fs::remove_file(PathBuf::from(st)).unwrap();
    }
    unsafe_stops
}

/// [`attach_detach_rounds`] with one probe on `target_fn`, ready once it reports `ok`.
fn attach_detach_target_fn(pid: i32, config: &Path, rounds: usize) -> u64 {
    attach_detach_rounds(pid, config, "uprobe target_fn\n", rounds, || {
        status(config).lines().any(|l| l.starts_with("ok "))
    })
}

#[test]
fn injection_leaves_the_red_zone_intact() {
    let dir = temp_dir("redzone");
    let exe = build_victim(&dir, true);
    let mut v = spawn_victim(&exe, "redzone", &dir);
    attach_detach_target_fn(v.pid, &dir.join("redzone.conf"), 8);
    std::fs::write(&v.stop, b"").unwrap();
    let st = v.child.wait().unwrap();
    // Exit 42: a canary below rsp changed while the thread was stopped for an injection.
    assert!(st.success(), "victim exit {st:?}");
    let mut rest = String::new();
    v.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut rest)
        .unwrap();
    assert!(rest.contains("done redzone"), "{rest}");
}

#[test]
fn a_read_blocked_during_injection_restarts_instead_of_failing() {
    let dir = temp_dir("reader");
    let exe = build_victim(&dir, true);
    let mut child = Command::new(&exe)
        .args(["reader", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready"), "{line}");
    let pid = child.id() as i32;
    // Blocked in read(2) before the first injection (not merely started).
    wait_until(
        "the victim blocked in read",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(format!("/proc/{pid}/syscall"))
                .is_ok_and(|s| s.split_whitespace().next() == Some("0"))
        },
    );
    attach_detach_target_fn(pid, &dir.join("reader.conf"), 4);
    use std::io::Write;
    child.stdin.as_mut().unwrap().write_all(b"hello\n").unwrap();
    let st = child.wait().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    // Exit 43 with "read failed: Interrupted system call": the syscall was not restarted.
    assert!(st.success(), "victim exit {st:?}: {rest}");
    assert_eq!(rest, "got hello\n");
}

#[test]
fn injection_never_stops_a_thread_inside_the_dynamic_loader() {
    let dir = temp_dir("dlopen");
    let exe = build_victim(&dir, true);
    let mut v = spawn_victim(&exe, "dlopen", &dir);
    // Injecting dlopen while the thread holds the loader's lock would deadlock: run the rounds
    // on a thread and require them to finish.
    let pid = v.pid;
    let config = dir.join("dlopen.conf");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(attach_detach_target_fn(pid, &config, 6)).unwrap());
    let unsafe_stops = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("attach rounds into a dlopen loop did not finish (a deadlock in the loader?)");
    eprintln!("6 rounds, {unsafe_stops} stops rejected as unsafe");
    assert!(
        unsafe_stops > 0,
        "no stop inside the loader was ever refused: the safe-point check did not run"
    );
    std::fs::write(&v.stop, b"").unwrap();
    let st = v.child.wait().unwrap();
    assert!(st.success(), "victim exit {st:?}");
    let mut rest = String::new();
    v.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut rest)
        .unwrap();
    let loops: u64 = rest.trim().strip_prefix("done ").unwrap().parse().unwrap();
    assert!(loops > 0, "{rest}");
}

#[test]
fn no_safe_point_fails_cleanly_and_leaves_the_target_alone() {
    use bpftime_attach::inject::{inject_agent, InjectOptions};
    use bpftime_attach::InjectError;
    let dir = temp_dir("blocked");
    let exe = build_victim(&dir, true);
    let mut v = spawn_victim(&exe, "blocked", &dir);
    let opts = InjectOptions {
        max_tries: 30,
        ..InjectOptions::default()
    };
    let err = inject_agent(v.pid, &agent_path(), None, &opts).unwrap_err();
    assert!(matches!(err, InjectError::NoSafePoint { .. }), "{err}");
    assert!(err.to_string().contains("inside libc"), "{err}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", v.pid)).unwrap();
    assert!(!maps.contains("libbpftime_agent"), "nothing loaded");
    // still alive and responsive
    // SAFETY: signalling our own child.
    unsafe { libc::kill(v.pid, libc::SIGUSR1) };
    let st = v.child.wait().unwrap();
    assert_eq!(st.code(), Some(7), "{st:?}");
}
