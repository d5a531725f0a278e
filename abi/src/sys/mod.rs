//! Every `bpf()` command bpftime-rs issues itself, in one place, with one convention: created
//! objects come back as [`OwnedFd`] (closing it is what unloads them), and a failure is a
//! [`SyscallError`] naming the command and keeping the kernel's errno.
//!
//! The commands go through libbpf's thin wrappers from libbpf-sys (`bpf_map_create`,
//! `bpf_prog_load`, ...): they size `union bpf_attr` for the running kernel and retry
//! `BPF_PROG_LOAD` on `EAGAIN`, and return `-errno`, which is all this layer needs from them.
//!
//! Each function first offers its call, described as a [`Call`], to the test override of the
//! calling thread (the [`fake`] module, behind the `fake` feature): unit tests of the gate, the
//! mirrors and the bridge choose the kernel's answer (an fd, an errno, a verifier log, a program's
//! return value) and run without root. Without the feature, the check compiles to nothing.
//!
//! Loading a whole BPF object (the bridge's drain) stays with libbpf-rs, which does its own
//! `bpf()` calls; every command on the maps and programs it loads goes through here.

#[cfg(any(test, feature = "fake"))]
pub mod fake;

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libbpf_sys as libbpf;

/// A failed `bpf()` command: which one (`BPF_MAP_CREATE`, ...) and the kernel's errno.
#[derive(Debug, thiserror::Error)]
#[error("{call} failed")]
pub struct SyscallError {
    /// The `bpf()` command, as the kernel names it.
    pub call: &'static str,
    /// The errno, as an OS error (`raw_os_error` is always set).
    #[source]
    pub source: io::Error,
}

impl SyscallError {
    /// `call` failed with `errno`.
    pub fn new(call: &'static str, errno: i32) -> Self {
        Self {
            call,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// The kernel's errno.
    pub fn errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(0)
    }
}

/// The result of one command.
pub type SysResult<T> = Result<T, SyscallError>;

/// Arguments of `BPF_MAP_CREATE`.
#[derive(Debug, Clone, Copy)]
pub struct MapCreate<'a> {
    /// A `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// The kernel keeps 15 bytes of `[A-Za-z0-9_.]` (see [`object_name`]).
    pub name: &'a CStr,
    /// Key bytes.
    pub key_size: u32,
    /// Value bytes.
    pub value_size: u32,
    /// Capacity (for a ringbuf: its size in bytes).
    pub max_entries: u32,
    /// `BPF_F_*` map flags.
    pub map_flags: u32,
    /// Read by the kernel only with `BPF_F_NUMA_NODE` in `map_flags`.
    pub numa_node: u32,
    /// Type-specific extra (a bloom filter's hash count); 0 otherwise.
    pub map_extra: u64,
    /// Type information for keys and values from a loaded BTF object.
    pub btf: Option<MapBtf<'a>>,
    /// For ARRAY_OF_MAPS and HASH_OF_MAPS: a map of the inner maps' shape (the template the
    /// kernel checks every inserted map against).
    pub inner_map_fd: Option<BorrowedFd<'a>>,
}

impl<'a> MapCreate<'a> {
    /// A map without BTF, flags or extras.
    pub fn new(
        map_type: u32,
        name: &'a CStr,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> Self {
        Self {
            map_type,
            name,
            key_size,
            value_size,
            max_entries,
            map_flags: 0,
            numa_node: 0,
            map_extra: 0,
            btf: None,
            inner_map_fd: None,
        }
    }
}

/// BTF type ids of a map's key and value, in the BTF object `fd`.
#[derive(Debug, Clone, Copy)]
pub struct MapBtf<'a> {
    /// The loaded BTF object.
    pub fd: BorrowedFd<'a>,
    /// Type id of the key.
    pub key_type_id: u32,
    /// Type id of the value.
    pub value_type_id: u32,
}

/// Arguments of `BPF_PROG_LOAD` (the log buffer is passed beside them).
#[derive(Debug, Clone, Copy)]
pub struct ProgLoad<'a> {
    /// A `BPF_PROG_TYPE_*`.
    pub prog_type: u32,
    /// Program name (the kernel keeps 15 bytes).
    pub name: &'a CStr,
    /// License string; GPL-only helpers need a GPL-compatible one.
    pub license: &'a CStr,
    /// Raw 8-byte instructions, in memory order.
    pub insns: &'a [[u8; 8]],
    /// A `BPF_*` attach type, for program types that need one at load.
    pub expected_attach_type: u32,
    /// `BPF_F_*` program flags (e.g. `BPF_F_SLEEPABLE`).
    pub prog_flags: u32,
    /// `LINUX_VERSION_CODE` for old kprobe checks; 0 otherwise.
    pub kern_version: u32,
    /// BTF id of the attach target (tracing programs).
    pub attach_btf_id: u32,
    /// The program's BTF; `func_info` and `line_info` are passed only with it.
    pub btf: Option<BorrowedFd<'a>>,
    /// Map fds the instructions refer to by index (`BPF_PSEUDO_MAP_IDX`); -1 for unused slots.
    pub fd_array: &'a [RawFd],
    /// `.BTF.ext` function records (needed for callbacks and subprograms).
    pub func_info: &'a [libbpf::bpf_func_info],
    /// `.BTF.ext` line records (for readable verifier logs).
    pub line_info: &'a [libbpf::bpf_line_info],
    /// `BPF_LOG_LEVEL1` (1), `BPF_LOG_LEVEL2` (2), `BPF_LOG_STATS` (4), or a mix.
    pub log_level: u32,
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says about a map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapInfo {
    /// Its `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Its kernel-wide id.
    pub id: u32,
    /// Key bytes.
    pub key_size: u32,
    /// Value bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` map flags.
    pub map_flags: u32,
    /// The kernel's copy of the name (at most 15 bytes).
    pub name: String,
}

/// A `BPF_PROG_TEST_RUN`'s outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value.
    pub retval: u32,
    /// Mean run time in ns, as the kernel measured it.
    pub duration_ns: u32,
}

/// One command, as the test override sees it: its arguments, and the buffers the kernel would
/// fill (which the override may fill instead). Each variant is the command of the function of
/// the same name, and its fields are that function's arguments.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum Call<'a> {
    MapCreate(&'a MapCreate<'a>),
    MapLookupElem {
        fd: RawFd,
        key: &'a [u8],
        value: &'a mut [u8],
        flags: u64,
    },
    MapUpdateElem {
        fd: RawFd,
        key: &'a [u8],
        value: &'a [u8],
        flags: u64,
    },
    MapDeleteElem {
        fd: RawFd,
        key: &'a [u8],
    },
    MapLookupAndDeleteElem {
        fd: RawFd,
        key: &'a [u8],
        value: &'a mut [u8],
    },
    MapGetNextKey {
        fd: RawFd,
        key: Option<&'a [u8]>,
        next_key: &'a mut [u8],
    },
    MapLookupBatch {
        fd: RawFd,
        in_batch: Option<&'a [u8]>,
        out_batch: &'a mut [u8],
        keys: &'a mut [u8],
        values: &'a mut [u8],
        count: &'a mut u32,
    },
    MapFreeze {
        fd: RawFd,
    },
    MapInfo {
        fd: RawFd,
        info: &'a mut MapInfo,
    },
    ObjPin {
        fd: RawFd,
        path: &'a Path,
    },
    ObjGet {
        path: &'a Path,
    },
    BtfLoad {
        data: &'a [u8],
        log: &'a mut [u8],
    },
    ProgLoad {
        load: &'a ProgLoad<'a>,
        log: &'a mut [u8],
    },
    ProgTestRun {
        fd: RawFd,
        ctx_in: &'a [u8],
        result: &'a mut TestRun,
    },
}

impl Call<'_> {
    /// The command's name, as in [`SyscallError::call`].
    pub fn name(&self) -> &'static str {
        match self {
            Call::MapCreate(_) => "BPF_MAP_CREATE",
            Call::MapLookupElem { .. } => "BPF_MAP_LOOKUP_ELEM",
            Call::MapUpdateElem { .. } => "BPF_MAP_UPDATE_ELEM",
            Call::MapDeleteElem { .. } => "BPF_MAP_DELETE_ELEM",
            Call::MapLookupAndDeleteElem { .. } => "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
            Call::MapGetNextKey { .. } => "BPF_MAP_GET_NEXT_KEY",
            Call::MapLookupBatch { .. } => "BPF_MAP_LOOKUP_BATCH",
            Call::MapFreeze { .. } => "BPF_MAP_FREEZE",
            Call::MapInfo { .. } => "BPF_OBJ_GET_INFO_BY_FD",
            Call::ObjPin { .. } => "BPF_OBJ_PIN",
            Call::ObjGet { .. } => "BPF_OBJ_GET",
            Call::BtfLoad { .. } => "BPF_BTF_LOAD",
            Call::ProgLoad { .. } => "BPF_PROG_LOAD",
            Call::ProgTestRun { .. } => "BPF_PROG_TEST_RUN",
        }
    }
}

/// What a test override answers for a call that succeeds.
#[derive(Debug)]
pub enum Reply {
    /// Success for a command that returns no fd (the override filled any output buffers).
    Done,
    /// The new object's fd, for the commands that create or open one (any fd the test owns,
    /// such as [`fake::dummy_fd`]'s).
    Fd(OwnedFd),
}

/// Offers a call to this thread's test override (`None`: no override, ask the kernel). Only with
/// the `fake` feature: without it the call is not even built.
macro_rules! offer {
    ($call:expr) => {{
        #[cfg(any(test, feature = "fake"))]
        let offered = fake::intercept(&mut $call);
        #[cfg(not(any(test, feature = "fake")))]
        let offered: Option<Result<Reply, i32>> = None;
        offered
    }};
}

/// An answer for a command that returns no fd.
fn done(name: &'static str, offered: Option<Result<Reply, i32>>) -> Option<SysResult<()>> {
    offered.map(|r| match r {
        Ok(_) => Ok(()),
        Err(errno) => Err(SyscallError::new(name, errno)),
    })
}

/// An answer for a command that returns an fd.
fn fd_reply(name: &'static str, offered: Option<Result<Reply, i32>>) -> Option<SysResult<OwnedFd>> {
    offered.map(|r| match r {
        Ok(Reply::Fd(fd)) => Ok(fd),
        Ok(Reply::Done) => panic!("the test override answered {name} without an fd"),
        Err(errno) => Err(SyscallError::new(name, errno)),
    })
}

/// libbpf's convention: `-errno` on failure (and `errno` set).
fn check(name: &'static str, ret: c_int) -> SysResult<c_int> {
    if ret < 0 {
        Err(SyscallError::new(name, -ret))
    } else {
        Ok(ret)
    }
}

fn owned(name: &'static str, ret: c_int) -> SysResult<OwnedFd> {
    let fd = check(name, ret)?;
    // SAFETY: a successful libbpf call that creates or opens an object returns a new fd that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn c_path(name: &'static str, path: &Path) -> SysResult<CString> {
    // The kernel could not be given a path with a NUL; EINVAL is what it says of bad paths.
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SyscallError::new(name, libc::EINVAL))
}

fn ptr_or_null(bytes: &[u8]) -> *const c_void {
    if bytes.is_empty() {
        std::ptr::null()
    } else {
        bytes.as_ptr().cast()
    }
}

/// A kernel object name from any string: at most 15 bytes, characters outside `[A-Za-z0-9_.]`
/// replaced by `_` (the kernel refuses names with others).
pub fn object_name(name: &str) -> CString {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(15)
        .collect();
    CString::new(cleaned).unwrap_or_default()
}

/// `BPF_MAP_CREATE`.
pub fn map_create(args: &MapCreate<'_>) -> SysResult<OwnedFd> {
    const NAME: &str = "BPF_MAP_CREATE";
    if let Some(r) = fd_reply(NAME, offer!(Call::MapCreate(args))) {
        return r;
    }
    let mut opts = libbpf::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf::bpf_map_create_opts>() as _,
        map_flags: args.map_flags,
        numa_node: args.numa_node,
        map_extra: args.map_extra,
        ..Default::default()
    };
    if let Some(inner) = args.inner_map_fd {
        opts.inner_map_fd = inner.as_raw_fd() as u32;
    }
    if let Some(btf) = args.btf {
        opts.btf_fd = btf.fd.as_raw_fd() as u32;
        opts.btf_key_type_id = btf.key_type_id;
        opts.btf_value_type_id = btf.value_type_id;
    }
    // SAFETY: `name` is a C string and `opts` a sized struct, both outliving the call.
    let ret = unsafe {
        libbpf::bpf_map_create(
            args.map_type,
            args.name.as_ptr(),
            args.key_size,
            args.value_size,
            args.max_entries,
            &opts,
        )
    };
    owned(NAME, ret)
}

/// `BPF_MAP_LOOKUP_ELEM`: copies the value of `key` into `value` (sized for the map's value:
/// per-CPU maps, one 8-byte-aligned slot per possible CPU). `ENOENT` if the key is absent.
pub fn map_lookup_elem(
    fd: BorrowedFd<'_>,
    key: &[u8],
    value: &mut [u8],
    flags: u64,
) -> SysResult<()> {
    const NAME: &str = "BPF_MAP_LOOKUP_ELEM";
    let fd = fd.as_raw_fd();
    if let Some(r) = done(
        NAME,
        offer!(Call::MapLookupElem {
            fd,
            key,
            value: &mut *value,
            flags,
        }),
    ) {
        return r;
    }
    // SAFETY: the kernel reads the map's key size from `key` and writes its value size to
    // `value`; the caller sized both for this map, and both outlive the call.
    let ret = unsafe {
        libbpf::bpf_map_lookup_elem_flags(fd, ptr_or_null(key), value.as_mut_ptr().cast(), flags)
    };
    check(NAME, ret).map(drop)
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`, `BPF_NOEXIST` or `BPF_EXIST` (and other flags).
pub fn map_update_elem(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> SysResult<()> {
    const NAME: &str = "BPF_MAP_UPDATE_ELEM";
    let fd = fd.as_raw_fd();
    if let Some(r) = done(
        NAME,
        offer!(Call::MapUpdateElem {
            fd,
            key,
            value,
            flags,
        }),
    ) {
        return r;
    }
    // SAFETY: the kernel reads the map's key and value sizes from the buffers, which the caller
    // sized for this map and which outlive the call.
    let ret =
        unsafe { libbpf::bpf_map_update_elem(fd, ptr_or_null(key), value.as_ptr().cast(), flags) };
    check(NAME, ret).map(drop)
}

/// `BPF_MAP_DELETE_ELEM`. `ENOENT` if the key is absent.
pub fn map_delete_elem(fd: BorrowedFd<'_>, key: &[u8]) -> SysResult<()> {
    const NAME: &str = "BPF_MAP_DELETE_ELEM";
    let fd = fd.as_raw_fd();
    if let Some(r) = done(NAME, offer!(Call::MapDeleteElem { fd, key })) {
        return r;
    }
    // SAFETY: the kernel reads the map's key size from `key`, sized by the caller.
    let ret = unsafe { libbpf::bpf_map_delete_elem(fd, ptr_or_null(key)) };
    check(NAME, ret).map(drop)
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`: for queues and stacks (empty `key`), pops into `value`;
/// `ENOENT` when empty.
pub fn map_lookup_and_delete_elem(
    fd: BorrowedFd<'_>,
    key: &[u8],
    value: &mut [u8],
) -> SysResult<()> {
    const NAME: &str = "BPF_MAP_LOOKUP_AND_DELETE_ELEM";
    let fd = fd.as_raw_fd();
    if let Some(r) = done(
        NAME,
        offer!(Call::MapLookupAndDeleteElem {
            fd,
            key,
            value: &mut *value,
        }),
    ) {
        return r;
    }
    // SAFETY: as for `map_lookup_elem`; keyless maps get a null key, which the kernel ignores.
    let ret = unsafe {
        libbpf::bpf_map_lookup_and_delete_elem(fd, ptr_or_null(key), value.as_mut_ptr().cast())
    };
    check(NAME, ret).map(drop)
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first key for `None`) into `next_key`;
/// `ENOENT` after the last.
pub fn map_get_next_key(
    fd: BorrowedFd<'_>,
    key: Option<&[u8]>,
    next_key: &mut [u8],
) -> SysResult<()> {
    const NAME: &str = "BPF_MAP_GET_NEXT_KEY";
    let fd = fd.as_raw_fd();
    if let Some(r) = done(
        NAME,
        offer!(Call::MapGetNextKey {
            fd,
            key,
            next_key: &mut *next_key,
        }),
    ) {
        return r;
    }
    let key_ptr = key.map_or(std::ptr::null(), ptr_or_null);
    // SAFETY: both buffers hold the map's key size (the caller's duty) and outlive the call.
    let ret = unsafe { libbpf::bpf_map_get_next_key(fd, key_ptr, next_key.as_mut_ptr().cast()) };
    check(NAME, ret).map(drop)
}

/// `BPF_MAP_LOOKUP_BATCH`: up to `*count` entries after the batch token `in_batch` (`None`:
/// from the start) into `keys` and `values`; `*count` becomes the number copied and
/// `out_batch` the next token. `ENOENT` marks the last batch (with `*count` still valid).
pub fn map_lookup_batch(
    fd: BorrowedFd<'_>,
    in_batch: Option<&[u8]>,
    out_batch: &mut [u8],
    keys: &mut [u8],
    values: &mut [u8],
    count: &mut u32,
) -> SysResult<()> {
    const NAME: &str = "BPF_MAP_LOOKUP_BATCH";
    let fd = fd.as_raw_fd();
    if let Some(r) = done(
        NAME,
        offer!(Call::MapLookupBatch {
            fd,
            in_batch,
            out_batch: &mut *out_batch,
            keys: &mut *keys,
            values: &mut *values,
            count: &mut *count,
        }),
    ) {
        return r;
    }
    let opts = libbpf::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf::bpf_map_batch_opts>() as _,
        ..Default::default()
    };
    let in_ptr = in_batch.map_or(std::ptr::null_mut(), |b| b.as_ptr().cast_mut().cast());
    // SAFETY: `keys` and `values` hold `*count` keys and values of the map's sizes and the
    // tokens one batch token each (the caller's duty); the kernel only reads `in_batch`, though
    // libbpf's prototype has it mutable. Everything outlives the call.
    let ret = unsafe {
        libbpf::bpf_map_lookup_batch(
            fd,
            in_ptr,
            out_batch.as_mut_ptr().cast(),
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            count,
            &opts,
        )
    };
    check(NAME, ret).map(drop)
}

/// `BPF_MAP_FREEZE`: no more writes from user space.
pub fn map_freeze(fd: BorrowedFd<'_>) -> SysResult<()> {
    const NAME: &str = "BPF_MAP_FREEZE";
    let fd = fd.as_raw_fd();
    if let Some(r) = done(NAME, offer!(Call::MapFreeze { fd })) {
        return r;
    }
    // SAFETY: no pointers; a bad fd is the kernel's EBADF.
    let ret = unsafe { libbpf::bpf_map_freeze(fd) };
    check(NAME, ret).map(drop)
}

/// `BPF_OBJ_GET_INFO_BY_FD` for a map.
pub fn map_info(fd: BorrowedFd<'_>) -> SysResult<MapInfo> {
    const NAME: &str = "BPF_OBJ_GET_INFO_BY_FD";
    let fd = fd.as_raw_fd();
    #[cfg(any(test, feature = "fake"))]
    {
        let mut info = MapInfo::default();
        let call = &mut Call::MapInfo {
            fd,
            info: &mut info,
        };
        if let Some(r) = done(NAME, fake::intercept(call)) {
            return r.map(|()| info);
        }
    }
    let mut raw = libbpf::bpf_map_info::default();
    let mut len = std::mem::size_of::<libbpf::bpf_map_info>() as u32;
    // SAFETY: `raw` is `len` bytes; the kernel writes at most that many.
    let ret = unsafe { libbpf::bpf_map_get_info_by_fd(fd, &mut raw, &mut len) };
    check(NAME, ret)?;
    let name: Vec<u8> = raw
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(MapInfo {
        map_type: raw.type_,
        id: raw.id,
        key_size: raw.key_size,
        value_size: raw.value_size,
        max_entries: raw.max_entries,
        map_flags: raw.map_flags,
        name: String::from_utf8_lossy(&name).into_owned(),
    })
}

/// `BPF_OBJ_PIN`: pins the map or program `fd` at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> SysResult<()> {
    const NAME: &str = "BPF_OBJ_PIN";
    let raw = fd.as_raw_fd();
    if let Some(r) = done(NAME, offer!(Call::ObjPin { fd: raw, path })) {
        return r;
    }
    let c = c_path(NAME, path)?;
    // SAFETY: `c` is a C string outliving the call.
    let ret = unsafe { libbpf::bpf_obj_pin(raw, c.as_ptr()) };
    check(NAME, ret).map(drop)
}

/// `BPF_OBJ_GET`: opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> SysResult<OwnedFd> {
    const NAME: &str = "BPF_OBJ_GET";
    if let Some(r) = fd_reply(NAME, offer!(Call::ObjGet { path })) {
        return r;
    }
    let c = c_path(NAME, path)?;
    // SAFETY: `c` is a C string outliving the call.
    let ret = unsafe { libbpf::bpf_obj_get(c.as_ptr()) };
    owned(NAME, ret)
}

/// `BPF_BTF_LOAD`; the kernel's log goes to `log` (NUL-terminated, see [`log_text`]), written
/// only at `log_level` 1 or on failure.
pub fn btf_load(data: &[u8], log: &mut [u8], log_level: u32) -> SysResult<OwnedFd> {
    const NAME: &str = "BPF_BTF_LOAD";
    if let Some(r) = fd_reply(
        NAME,
        offer!(Call::BtfLoad {
            data,
            log: &mut *log,
        }),
    ) {
        return r;
    }
    let mut opts = libbpf::bpf_btf_load_opts {
        sz: std::mem::size_of::<libbpf::bpf_btf_load_opts>() as _,
        log_buf: log.as_mut_ptr() as *mut c_char,
        log_size: log.len() as u32,
        log_level,
        ..Default::default()
    };
    // SAFETY: `data` and `log` outlive the call, with their lengths beside them; `opts.sz` is
    // this struct's size.
    let ret = unsafe { libbpf::bpf_btf_load(data.as_ptr().cast(), data.len() as _, &mut opts) };
    owned(NAME, ret)
}

/// `BPF_PROG_LOAD` (the verifier runs here); its log goes to `log` (see [`log_text`]). An empty
/// `log` asks for none.
pub fn prog_load(args: &ProgLoad<'_>, log: &mut [u8]) -> SysResult<OwnedFd> {
    const NAME: &str = "BPF_PROG_LOAD";
    if let Some(r) = fd_reply(
        NAME,
        offer!(Call::ProgLoad {
            load: args,
            log: &mut *log,
        }),
    ) {
        return r;
    }
    // 8-byte aligned copy of the instructions for the C side (`struct bpf_insn` is 4-aligned,
    // the caller's bytes need not be).
    let words: Vec<u64> = args.insns.iter().map(|i| u64::from_ne_bytes(*i)).collect();
    let mut opts = libbpf::bpf_prog_load_opts {
        sz: std::mem::size_of::<libbpf::bpf_prog_load_opts>() as _,
        expected_attach_type: args.expected_attach_type,
        prog_flags: args.prog_flags,
        kern_version: args.kern_version,
        attach_btf_id: args.attach_btf_id,
        fd_array: if args.fd_array.is_empty() {
            std::ptr::null()
        } else {
            args.fd_array.as_ptr()
        },
        ..Default::default()
    };
    if !log.is_empty() {
        opts.log_level = args.log_level;
        opts.log_size = log.len() as u32;
        opts.log_buf = log.as_mut_ptr() as *mut c_char;
    }
    if let Some(btf) = args.btf {
        opts.prog_btf_fd = btf.as_raw_fd() as u32;
        if !args.func_info.is_empty() {
            opts.func_info = args.func_info.as_ptr().cast();
            opts.func_info_cnt = args.func_info.len() as u32;
            opts.func_info_rec_size = std::mem::size_of::<libbpf::bpf_func_info>() as u32;
        }
        if !args.line_info.is_empty() {
            opts.line_info = args.line_info.as_ptr().cast();
            opts.line_info_cnt = args.line_info.len() as u32;
            opts.line_info_rec_size = std::mem::size_of::<libbpf::bpf_line_info>() as u32;
        }
    }
    // SAFETY: every pointer in `opts` and the arguments (name, license, instructions, fd_array,
    // func/line info, log) points into buffers that outlive this call, with the counts and
    // sizes set beside them; `opts.sz` is this struct's size.
    let ret = unsafe {
        libbpf::bpf_prog_load(
            args.prog_type,
            args.name.as_ptr(),
            args.license.as_ptr(),
            words.as_ptr().cast(),
            words.len() as _,
            &mut opts,
        )
    };
    owned(NAME, ret)
}

/// `BPF_PROG_TEST_RUN` once with `ctx_in` as the context (for programs, such as `syscall` ones,
/// that take one) and no packet data.
pub fn prog_test_run(fd: BorrowedFd<'_>, ctx_in: &[u8]) -> SysResult<TestRun> {
    const NAME: &str = "BPF_PROG_TEST_RUN";
    let fd = fd.as_raw_fd();
    #[cfg(any(test, feature = "fake"))]
    {
        let mut result = TestRun::default();
        let call = &mut Call::ProgTestRun {
            fd,
            ctx_in,
            result: &mut result,
        };
        if let Some(r) = done(NAME, fake::intercept(call)) {
            return r.map(|()| result);
        }
    }
    let mut opts = libbpf::bpf_test_run_opts {
        sz: std::mem::size_of::<libbpf::bpf_test_run_opts>() as _,
        ctx_in: ptr_or_null(ctx_in),
        ctx_size_in: ctx_in.len() as u32,
        ..Default::default()
    };
    // SAFETY: `opts` points at `ctx_in`, which outlives the call; the kernel reads
    // `ctx_size_in` bytes from it and writes only `opts`' own fields.
    let ret = unsafe { libbpf::bpf_prog_test_run_opts(fd, &mut opts) };
    check(NAME, ret)?;
    Ok(TestRun {
        retval: opts.retval,
        duration_ns: opts.duration,
    })
}

/// The text of a NUL-terminated log buffer the kernel filled.
pub fn log_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_the_command_and_errno() {
        let e = SyscallError::new("BPF_MAP_CREATE", libc::E2BIG);
        assert_eq!(e.errno(), libc::E2BIG);
        assert_eq!(e.to_string(), "BPF_MAP_CREATE failed");
        let source = std::error::Error::source(&e).expect("the errno is the source");
        assert_eq!(
            source.to_string(),
            io::Error::from_raw_os_error(libc::E2BIG).to_string()
        );
    }

    #[test]
    fn libbpf_returns_become_errors() {
        assert_eq!(check("X", 3).unwrap(), 3);
        assert_eq!(check("X", -libc::EPERM).unwrap_err().errno(), libc::EPERM);
    }

    #[test]
    fn object_names_are_what_the_kernel_accepts() {
        assert_eq!(object_name("a-b.c_d").to_bytes(), b"a_b.c_d");
        assert_eq!(object_name("0123456789abcdefgh").to_bytes().len(), 15);
    }

    #[test]
    fn paths_with_nul_are_refused_before_the_kernel() {
        let e = obj_get(Path::new("/sys/fs/bpf/a\0b")).unwrap_err();
        assert_eq!((e.call, e.errno()), ("BPF_OBJ_GET", libc::EINVAL));
    }
}
