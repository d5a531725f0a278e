//! `__kconfig` externs (`kconfig.bpf.c`): the values libbpf resolves for the kernel are the
//! values our loader resolves for user space, read by the same object on kernel uprobes (loaded
//! by libbpf) and through the agent on our JIT and interpreter; the expected values are also
//! computed here from uname and the kernel configuration, independently of both loaders. A
//! strong extern the configuration lacks refuses only the program that reads it
//! (`kconfig_missing.bpf.c`), naming the extern; libbpf refuses the whole object.

use bpftime_example_programs::{object_path, run_kernel_libbpf, victim_path};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_testutils::{error_chain, require_kernel};

mod common;

const ROUNDS: u32 = 20;

/// `CONFIG_NAME=value` lines of the running kernel, read with zcat or from /boot.
fn config_value(name: &str) -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let text = std::fs::read_to_string(format!("/boot/config-{}", release.trim()))
        .ok()
        .or_else(|| {
            let out = std::process::Command::new("zcat")
                .arg("/proc/config.gz")
                .output()
                .ok()?;
            String::from_utf8(out.stdout).ok()
        })
        .expect("the kernel configuration is readable");
    let prefix = format!("{name}=");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
}

fn u64s(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// What each slot of `seen` must hold, from uname and the configuration.
fn expected(calls: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    // SAFETY: utsname is plain bytes; all zeroes is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct it is given.
    assert_eq!(unsafe { libc::uname(&mut uts) }, 0);
    // SAFETY: uname leaves NUL-terminated strings.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let nums: Vec<u64> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    let version = (nums[0] << 16) + (nums[1].min(255) << 8) + nums[2].min(255);
    let yes = |name: &str| config_value(name).as_deref() == Some("y");
    let hostname = config_value("CONFIG_DEFAULT_HOSTNAME").expect("CONFIG_DEFAULT_HOSTNAME");
    let mut host = [0u8; 8];
    let text = hostname.trim_matches('"').as_bytes();
    let n = text.len().min(7);
    host[..n].copy_from_slice(&text[..n]);
    let illegal = config_value("CONFIG_ILLEGAL_POINTER_VALUE").expect("a hex option");
    let illegal = u64::from_str_radix(illegal.trim_start_matches("0x"), 16).unwrap();
    let tristate = match config_value("CONFIG_EXT4_FS").as_deref() {
        Some("y") => 1,
        Some("m") => 2,
        _ => 0,
    };
    let values = [
        version,
        1,
        config_value("CONFIG_HZ").unwrap().parse().unwrap(),
        u64::from(yes("CONFIG_BPF_SYSCALL")),
        tristate,
        u64::from(if yes("CONFIG_X86_64") { b'y' } else { 0 }),
        u64::from_le_bytes(host),
        illegal,
        u64::from(yes("CONFIG_COMPILE_TEST")),
        0,
        0,
        calls,
    ];
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| ((i as u32).to_le_bytes().to_vec(), u64s(v)))
        .collect()
}

#[test]
fn kconfig_externs_read_what_libbpf_resolves_for_the_kernel() {
    if !require_kernel("kconfig_externs_read_what_libbpf_resolves_for_the_kernel") {
        return;
    }
    let want = expected(u64::from(ROUNDS));
    let kernel = run_kernel_libbpf("kconfig", &victim_path(), ROUNDS, "vt_add")
        .unwrap_or_else(|e| panic!("kernel run: {e:#}"));
    assert_eq!(kernel.maps["seen"], want, "libbpf on kernel uprobes");
    for no_jit in [false, true] {
        let segment = format!("test-kconfig-{no_jit}");
        bpftime_runtime::loaded::unload_object(&segment);
        let loaded = LoadedObject::load(
            &object_path("kconfig"),
            Some(&segment),
            LoadOptions {
                no_jit,
                ..LoadOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        assert!(loaded.refused.is_empty(), "{:?}", loaded.refused);
        let ran = common::run_agent_victim(&victim_path(), ROUNDS, &segment);
        let snapshot = common::snapshot_of(&loaded.shm).unwrap();
        let _ = loaded.unload();
        ran.unwrap_or_else(|e| panic!("victim: {e}"));
        assert_eq!(
            snapshot.maps["seen"], kernel.maps["seen"],
            "user space (no_jit {no_jit}) == kernel"
        );
        let kconfig = &snapshot.maps[".kconfig"];
        assert_eq!(kconfig.len(), 1, "one read-only value, as libbpf's map");
    }
    assert_kernel_takes_btf_of("kconfig");
}

/// The BTF handed to the verifier gate is one the kernel accepts: the `.kconfig` DATASEC
/// sized, its variables (resolved or not) placed in offset order and no longer extern.
fn assert_kernel_takes_btf_of(example: &str) {
    let object = bpftime_runtime::object::BpfObject::from_file(object_path(example)).unwrap();
    let raw = object.kernel_btf.expect("the object has BTF");
    // SAFETY: a valid buffer and length; no log requested.
    let fd = unsafe {
        libbpf_sys::bpf_btf_load(raw.as_ptr().cast(), raw.len() as _, std::ptr::null_mut())
    };
    assert!(
        fd >= 0,
        "{example}: BPF_BTF_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the fd was just returned to us.
    unsafe { libc::close(fd) };
}

#[test]
fn a_strong_kconfig_extern_the_kernel_lacks_refuses_its_program_only() {
    if !require_kernel("a_strong_kconfig_extern_the_kernel_lacks_refuses_its_program_only") {
        return;
    }
    let libbpf = libbpf_rs::ObjectBuilder::default()
        .open_file(object_path("kconfig_missing"))
        .and_then(|o| o.load());
    assert!(libbpf.is_err(), "libbpf refuses the object");
    let segment = "test-kconfig-missing";
    bpftime_runtime::loaded::unload_object(segment);
    let loaded = LoadedObject::load(
        &object_path("kconfig_missing"),
        Some(segment),
        LoadOptions {
            publish: false,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let names: Vec<&str> = loaded.programs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["plain"], "refused: {:?}", loaded.refused);
    let (name, why) = loaded.refused[0].clone();
    let why = error_chain(why.as_ref());
    let _ = loaded.unload();
    assert_eq!(name, "needs_missing");
    assert!(
        why.contains("CONFIG_BPFTIME_NO_SUCH_OPTION") && why.contains("not set"),
        "the refusal names the extern: {why}"
    );
    assert_kernel_takes_btf_of("kconfig_missing");
}
