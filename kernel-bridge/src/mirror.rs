//! Mirror maps: real kernel maps that receive the bridge's updates, pinned under
//! `/sys/fs/bpf/bpftime-rs/<object>/<map>` so `bpftool map dump pinned ...` and users' own BPF
//! objects (libbpf `pin_root_path`) see them.
//!
//! Every `bpf()` command here (create, pin, reopen, shape query, lookups) goes through
//! `bpftime_abi::sys`; the unit tests below choose the kernel's answers with its test override and
//! pin under a temporary directory, so they run without root.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use bpftime_abi::sys::{self, MapCreate, SyscallError};
use bpftime_abi::{possible_cpus, MapType};

use crate::error::BridgeError;
use bpftime_abi::bridge::SCRATCH_SIZE;

/// Where every mirror is pinned.
pub const PIN_ROOT: &str = "/sys/fs/bpf/bpftime-rs";

/// Everything needed to create a mirror: the source map's shape and where to pin it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MirrorDesc {
    /// A type with [`MapType::is_mirrorable`]; [`Mirror::create`] refuses the others.
    pub kind: MapType,
    /// Key bytes, as the source map declares them (must be 0 for QUEUE and STACK).
    pub key_size: u32,
    /// Value bytes of one value; per-CPU maps copy one 8-byte-aligned slot of this per CPU
    /// (see [`MirrorDesc::value_bytes`]).
    pub value_size: u32,
    /// Capacity, as for `BPF_MAP_CREATE`.
    pub max_entries: u32,
    /// `BPF_F_*` map flags for `BPF_MAP_CREATE`; a mirror with any flag gets no drain fast path.
    pub flags: u32,
    /// Map name; the kernel keeps the first 15 bytes, the pin keeps it whole.
    pub name: String,
    /// The object the map belongs to: the pin directory's name.
    pub object: String,
}

impl MirrorDesc {
    /// Where this mirror is pinned: [`pin_path`] of its object and name.
    pub fn pin_path(&self) -> PathBuf {
        pin_path(&self.object, &self.name)
    }

    fn pin_path_in(&self, root: &Path) -> PathBuf {
        pin_path_in(root, &self.object, &self.name)
    }

    /// The bytes the kernel copies for one value: per-CPU maps carry one 8-byte-aligned slot
    /// per possible CPU.
    pub fn value_bytes(&self) -> u32 {
        if self.kind.is_percpu() {
            self.value_size.next_multiple_of(8) * possible_cpus()
        } else {
            self.value_size
        }
    }

    /// The bytes the kernel copies for one key (none for queues and stacks).
    pub fn key_bytes(&self) -> u32 {
        if self.kind.is_keyless() {
            0
        } else {
            self.key_size
        }
    }

    fn validate(&self) -> Result<(), BridgeError> {
        let invalid = |why: String| BridgeError::InvalidMirror {
            map: self.name.clone(),
            why,
        };
        if !self.kind.is_mirrorable() {
            return Err(invalid(format!(
                "a {} map carries events, not state, and has no kernel mirror",
                self.kind
            )));
        }
        if self.name.is_empty() || self.name.contains('/') || self.name.contains('\0') {
            return Err(invalid(
                "a map name must be non-empty, without '/' or NUL".into(),
            ));
        }
        if self.object.is_empty() || self.object.contains('/') || self.object.contains('\0') {
            return Err(invalid(format!(
                "object name {:?} must be non-empty, without '/' or NUL",
                self.object
            )));
        }
        if self.kind.is_keyless() && self.key_size != 0 {
            return Err(invalid(format!("a {} has no key", self.kind.name())));
        }
        let record = self.key_bytes() as usize + self.value_bytes() as usize;
        if record > SCRATCH_SIZE {
            return Err(invalid(format!(
                "key + value is {record} bytes, the bridge carries at most {SCRATCH_SIZE}"
            )));
        }
        Ok(())
    }
}

/// Where the mirror of `object`'s `map` is pinned. bpffs refuses names containing '.', so
/// dots (as in `.bss`, `.data`, `.rodata`) become '_' in the pin path.
pub fn pin_path(object: &str, map: &str) -> PathBuf {
    pin_path_in(Path::new(PIN_ROOT), object, map)
}

fn pin_path_in(root: &Path, object: &str, map: &str) -> PathBuf {
    root.join(pin_component(object)).join(pin_component(map))
}

fn pin_component(name: &str) -> String {
    name.replace('.', "_")
}

/// A created (or reopened) kernel mirror.
#[derive(Debug)]
pub struct Mirror {
    desc: MirrorDesc,
    fd: OwnedFd,
}

impl Mirror {
    /// Creates the kernel map and pins it. An existing pin of the same shape is reused (its
    /// entries are kept: a restarted loader re-syncs over them); one of another shape is an error
    /// unless `replace` is set, in which case it is unpinned and a fresh map created.
    pub fn create(desc: MirrorDesc, replace: bool) -> Result<Self, BridgeError> {
        Self::create_in(Path::new(PIN_ROOT), desc, replace)
    }

    /// [`Mirror::create`] with the pins under `root` instead of [`PIN_ROOT`].
    fn create_in(root: &Path, desc: MirrorDesc, replace: bool) -> Result<Self, BridgeError> {
        desc.validate()?;
        let path = desc.pin_path_in(root);
        if path.exists() {
            if replace {
                std::fs::remove_file(&path).map_err(|source| BridgeError::Pin {
                    path: path.clone(),
                    source,
                })?;
            } else {
                let mirror = Self::open_pinned(&path, &desc.object)?;
                if mirror.desc.kind != desc.kind
                    || mirror.desc.key_size != desc.key_size
                    || mirror.desc.value_size != desc.value_size
                    || mirror.desc.max_entries != desc.max_entries
                    || mirror.desc.flags != desc.flags
                {
                    return Err(BridgeError::InvalidMirror {
                        map: desc.name.clone(),
                        why: format!(
                            "{} is pinned with another shape ({:?}); remove it or unload {}",
                            path.display(),
                            mirror.desc,
                            desc.object
                        ),
                    });
                }
                return Ok(Self {
                    desc,
                    fd: mirror.fd,
                });
            }
        }
        // The kernel keeps 15 bytes of the name; `validate` refused NULs.
        let kernel_name: String = desc.name.chars().take(15).collect();
        let kernel_name = CString::new(kernel_name).unwrap_or_default();
        let args = MapCreate {
            map_flags: desc.flags,
            ..MapCreate::new(
                desc.kind.as_raw(),
                &kernel_name,
                desc.key_bytes(),
                desc.value_size,
                desc.max_entries,
            )
        };
        let fd = sys::map_create(&args).map_err(|source| BridgeError::MapCreate {
            map: desc.name.clone(),
            source,
        })?;
        let dir = path.parent().expect("pin path has a parent");
        std::fs::create_dir_all(dir).map_err(|source| BridgeError::Pin {
            path: dir.to_path_buf(),
            source,
        })?;
        sys::obj_pin(fd.as_fd(), &path).map_err(|source| BridgeError::PinnedMap {
            path: path.clone(),
            source,
        })?;
        Ok(Self { desc, fd })
    }

    /// Opens a pinned mirror; its description is read back from the kernel.
    pub fn open_pinned(path: &Path, object: &str) -> Result<Self, BridgeError> {
        let pinned = |source| BridgeError::PinnedMap {
            path: path.to_path_buf(),
            source,
        };
        let fd = sys::obj_get(path).map_err(pinned)?;
        let info = sys::map_info(fd.as_fd()).map_err(pinned)?;
        let map_type = info.map_type;
        let kind = MapType::from_raw(map_type)
            .filter(|t| t.is_mirrorable())
            .ok_or_else(|| BridgeError::InvalidMirror {
                map: path.display().to_string(),
                why: format!(
                    "{} cannot be a mirror",
                    bpftime_abi::UnknownMapType(map_type)
                ),
            })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            desc: MirrorDesc {
                kind,
                key_size: info.key_size,
                value_size: info.value_size,
                max_entries: info.max_entries,
                flags: info.map_flags,
                name,
                object: object.to_string(),
            },
            fd,
        })
    }

    /// The shape it was created with, or (for a pin opened by path) read back from the kernel.
    pub fn desc(&self) -> &MirrorDesc {
        &self.desc
    }

    /// The kernel map's fd, e.g. for `bpf()` commands of one's own on it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn raw_fd(&self) -> u32 {
        self.fd.as_raw_fd() as u32
    }

    /// Reads every entry back from the kernel (per-CPU maps: one value per CPU). Queues and
    /// stacks cannot be read without popping, so they list no entries. Uses
    /// BPF_MAP_LOOKUP_BATCH (a few syscalls for a million entries); a kernel that refuses it for
    /// this map gets one lookup per key.
    pub fn entries(&self) -> Result<Vec<KernelEntry>, BridgeError> {
        if self.desc.kind.is_keyless() {
            return Ok(Vec::new());
        }
        match self.entries_batched() {
            Ok(entries) => Ok(entries),
            // 524: the kernel's internal ENOTSUPP, which BPF commands can leak.
            Err(e) if matches!(e.errno(), libc::EINVAL | libc::ENOTSUP | 524) => {
                self.entries_by_key()
            }
            Err(source) => Err(self.read_err(source)),
        }
    }

    fn read_err(&self, source: SyscallError) -> BridgeError {
        BridgeError::MapRead {
            map: self.desc.name.clone(),
            source,
        }
    }

    /// (CPUs, bytes per CPU slot): one slot of the value size for other maps.
    fn value_slots(&self) -> (usize, usize) {
        if self.desc.kind.is_percpu() {
            (
                possible_cpus() as usize,
                self.desc.value_size.next_multiple_of(8) as usize,
            )
        } else {
            (1, self.desc.value_size as usize)
        }
    }

    /// One value as the kernel copies it, split into its per-CPU values.
    fn split_values(&self, value: &[u8], slot: usize) -> Vec<Vec<u8>> {
        value
            .chunks_exact(slot.max(1))
            .map(|v| v[..self.desc.value_size as usize].to_vec())
            .collect()
    }

    fn entries_batched(&self) -> Result<Vec<KernelEntry>, SyscallError> {
        let key_size = self.desc.key_size as usize;
        let (cpus, slot) = self.value_slots();
        let value_bytes = slot * cpus;
        let mut count: u32 = 4096;
        let mut entries = Vec::new();
        let mut in_batch = vec![0u8; key_size.max(4)];
        let mut out_batch = vec![0u8; key_size.max(4)];
        let mut first = true;
        loop {
            let mut keys = vec![0u8; count as usize * key_size];
            let mut values = vec![0u8; count as usize * value_bytes];
            let mut n = count;
            // The batch token is key-sized for hash maps, at least 4 bytes.
            let result = sys::map_lookup_batch(
                self.fd.as_fd(),
                if first {
                    None
                } else {
                    Some(in_batch.as_slice())
                },
                &mut out_batch,
                &mut keys,
                &mut values,
                &mut n,
            );
            let errno = match &result {
                Ok(()) => 0,
                Err(e) => e.errno(),
            };
            match errno {
                0 | libc::ENOENT => {
                    for i in 0..n as usize {
                        let value = &values[i * value_bytes..(i + 1) * value_bytes];
                        entries.push(KernelEntry {
                            key: keys[i * key_size..(i + 1) * key_size].to_vec(),
                            values: self.split_values(value, slot),
                        });
                    }
                    if errno == libc::ENOENT {
                        return Ok(entries);
                    }
                    std::mem::swap(&mut in_batch, &mut out_batch);
                    first = false;
                }
                // A hash bucket holds more entries than fit: retry this batch larger.
                libc::ENOSPC if count < (1 << 24) => count *= 4,
                libc::EINTR => {}
                _ => return Err(result.expect_err("errno 0 is handled above")),
            }
        }
    }

    fn entries_by_key(&self) -> Result<Vec<KernelEntry>, BridgeError> {
        let (keys, error) = self.keys_by_iteration();
        if let Some(e) = error {
            return Err(self.read_err(e));
        }
        let (cpus, slot) = self.value_slots();
        let mut value = vec![0u8; slot * cpus];
        let mut entries = Vec::new();
        for key in keys {
            match sys::map_lookup_elem(self.fd.as_fd(), &key, &mut value, 0) {
                Ok(()) => entries.push(KernelEntry {
                    values: self.split_values(&value, slot),
                    key,
                }),
                // Deleted since it was listed.
                Err(e) if e.errno() == libc::ENOENT => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
        Ok(entries)
    }

    /// The keys BPF_MAP_GET_NEXT_KEY lists, up to the first error other than the end (ENOENT).
    fn keys_by_iteration(&self) -> (Vec<Vec<u8>>, Option<SyscallError>) {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut next = vec![0u8; self.desc.key_size as usize];
            match sys::map_get_next_key(self.fd.as_fd(), keys.last().map(Vec::as_slice), &mut next)
            {
                Ok(()) => keys.push(next),
                Err(e) if e.errno() == libc::ENOENT => return (keys, None),
                Err(e) => return (keys, Some(e)),
            }
        }
    }

    /// Every key the kernel map holds (queues and stacks: none, they cannot be listed).
    pub fn keys(&self) -> Result<Vec<Vec<u8>>, BridgeError> {
        Ok(self.entries()?.into_iter().map(|e| e.key).collect())
    }

    /// How many keys the kernel map holds (queues and stacks: 0, they cannot be listed).
    pub fn key_count(&self) -> usize {
        if self.desc.kind.is_keyless() {
            return 0;
        }
        self.entries()
            .map(|e| e.len())
            .unwrap_or_else(|_| self.keys_by_iteration().0.len())
    }

    /// Pops every value of a QUEUE or STACK mirror, in pop order (this empties it).
    pub fn drain_queue(&self) -> Result<Vec<Vec<u8>>, BridgeError> {
        let mut values = Vec::new();
        loop {
            let mut value = vec![0u8; self.desc.value_size as usize];
            match sys::map_lookup_and_delete_elem(self.fd.as_fd(), &[], &mut value) {
                Ok(()) => values.push(value),
                Err(e) if e.errno() == libc::ENOENT => return Ok(values),
                Err(e) => return Err(self.read_err(e)),
            }
        }
    }

    /// Unpins the mirror; the map itself lives on while fds to it remain.
    pub fn unpin(&self) -> Result<(), BridgeError> {
        let path = self.desc.pin_path();
        std::fs::remove_file(&path).map_err(|source| BridgeError::Pin { path, source })
    }
}

/// One kernel map entry; `values` has one element, or one per CPU for per-CPU maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    /// The key bytes.
    pub key: Vec<u8>,
    /// `value_size` bytes each (the per-CPU slot padding dropped).
    pub values: Vec<Vec<u8>>,
}

/// Every mirror pinned under [`PIN_ROOT`], by object then map name.
pub fn list_pinned() -> Result<Vec<Mirror>, BridgeError> {
    let mut mirrors = Vec::new();
    let root = Path::new(PIN_ROOT);
    if !root.exists() {
        return Ok(mirrors);
    }
    let read_dir = |dir: &Path| {
        std::fs::read_dir(dir)
            .map_err(|source| BridgeError::Pin {
                path: dir.to_path_buf(),
                source,
            })
            .map(|it| {
                let mut paths: Vec<PathBuf> = it.flatten().map(|e| e.path()).collect();
                paths.sort();
                paths
            })
    };
    for object_dir in read_dir(root)? {
        if !object_dir.is_dir() {
            continue;
        }
        let object = object_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for map_path in read_dir(&object_dir)? {
            match Mirror::open_pinned(&map_path, &object) {
                Ok(mirror) => mirrors.push(mirror),
                Err(e) => tracing::warn!("skipping {}: {e}", map_path.display()),
            }
        }
    }
    Ok(mirrors)
}

/// Removes every pin of `object` and its directory.
pub fn remove_object_pins(object: &str) -> Result<usize, BridgeError> {
    let dir = Path::new(PIN_ROOT).join(pin_component(object));
    if !dir.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    let pin_err = |path: &Path, source| BridgeError::Pin {
        path: path.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(&dir)
        .map_err(|e| pin_err(&dir, e))?
        .flatten()
    {
        std::fs::remove_file(entry.path()).map_err(|e| pin_err(&entry.path(), e))?;
        removed += 1;
    }
    std::fs::remove_dir(&dir).map_err(|e| pin_err(&dir, e))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    //! Mirror error paths with the kernel's answers chosen through `sys`'s test override, pinned
    //! under a temporary directory: no root, no bpffs.

    use std::cell::RefCell;
    use std::rc::Rc;

    use bpftime_abi::sys::{fake, Call, MapInfo};

    use super::*;

    /// A fresh pin root for one test.
    struct TempRoot(PathBuf);

    impl TempRoot {
        fn new(test: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("bpftime-mirror-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp pin root");
            Self(dir)
        }
    }

    impl Drop for TempRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn desc() -> MirrorDesc {
        MirrorDesc {
            kind: MapType::Hash,
            key_size: 4,
            value_size: 8,
            max_entries: 100,
            flags: 0,
            name: "counts".into(),
            object: "prog.o".into(),
        }
    }

    /// Records the command names and answers `errno` for `failing`, success otherwise.
    fn failing(
        failing: &'static str,
        errno: i32,
    ) -> (fake::Override, Rc<RefCell<Vec<&'static str>>>) {
        let calls = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&calls);
        let guard = fake::install(move |call: &mut Call<'_>| {
            seen.borrow_mut().push(call.name());
            if call.name() == failing {
                Err(errno)
            } else {
                Ok(fake::success(call))
            }
        });
        (guard, calls)
    }

    #[test]
    fn a_failing_pin_names_the_path_and_keeps_the_errno() {
        for errno in [libc::EEXIST, libc::EACCES] {
            let root = TempRoot::new("pin");
            let (_fake, calls) = failing("BPF_OBJ_PIN", errno);
            let err = Mirror::create_in(&root.0, desc(), false).unwrap_err();
            let expected = root.0.join("prog_o").join("counts");
            match &err {
                BridgeError::PinnedMap { path, source } => {
                    assert_eq!(path, &expected);
                    assert_eq!((source.call, source.errno()), ("BPF_OBJ_PIN", errno));
                }
                other => panic!("expected PinnedMap, got {other:?}"),
            }
            assert_eq!(err.to_string(), expected.display().to_string());
            assert_eq!(*calls.borrow(), ["BPF_MAP_CREATE", "BPF_OBJ_PIN"]);
        }
    }

    #[test]
    fn a_failing_create_names_the_map_and_pins_nothing() {
        let root = TempRoot::new("create");
        let (_fake, calls) = failing("BPF_MAP_CREATE", libc::E2BIG);
        match Mirror::create_in(&root.0, desc(), false).unwrap_err() {
            BridgeError::MapCreate { map, source } => {
                assert_eq!(map, "counts");
                assert_eq!(source.errno(), libc::E2BIG);
            }
            other => panic!("expected MapCreate, got {other:?}"),
        }
        assert_eq!(*calls.borrow(), ["BPF_MAP_CREATE"]);
        assert!(!root.0.join("prog_o").join("counts").exists());
    }

    /// A pin file where the mirror would go, and an override that opens it as a map of
    /// `shape`'s key, value and size.
    fn pinned(
        root: &TempRoot,
        shape: MapInfo,
    ) -> (PathBuf, fake::Override, Rc<RefCell<Vec<&'static str>>>) {
        let path = desc().pin_path_in(&root.0);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"").unwrap();
        let calls = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&calls);
        let guard = fake::install(move |call: &mut Call<'_>| {
            seen.borrow_mut().push(call.name());
            if let Call::MapInfo { info, .. } = call {
                **info = shape.clone();
            }
            Ok(fake::success(call))
        });
        (path, guard, calls)
    }

    fn hash_info(max_entries: u32) -> MapInfo {
        MapInfo {
            map_type: MapType::Hash.as_raw(),
            key_size: 4,
            value_size: 8,
            max_entries,
            ..MapInfo::default()
        }
    }

    #[test]
    fn a_pin_of_another_shape_is_refused_unless_replaced() {
        let root = TempRoot::new("shape");
        let (path, _fake, calls) = pinned(&root, hash_info(10));
        let err = Mirror::create_in(&root.0, desc(), false).unwrap_err();
        assert!(matches!(err, BridgeError::InvalidMirror { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("is pinned with another shape"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert_eq!(*calls.borrow(), ["BPF_OBJ_GET", "BPF_OBJ_GET_INFO_BY_FD"]);

        calls.borrow_mut().clear();
        let mirror = Mirror::create_in(&root.0, desc(), true).expect("replaced");
        assert_eq!(mirror.desc(), &desc());
        assert_eq!(*calls.borrow(), ["BPF_MAP_CREATE", "BPF_OBJ_PIN"]);
        assert!(
            !path.exists(),
            "the old pin was removed (the fake pins nothing)"
        );
    }

    #[test]
    fn a_pin_of_the_same_shape_is_reopened() {
        let root = TempRoot::new("same");
        let (_path, _fake, calls) = pinned(&root, hash_info(100));
        let mirror = Mirror::create_in(&root.0, desc(), false).expect("reopened");
        assert_eq!(mirror.desc(), &desc());
        assert_eq!(*calls.borrow(), ["BPF_OBJ_GET", "BPF_OBJ_GET_INFO_BY_FD"]);
    }

    #[test]
    fn a_pin_that_cannot_be_opened_names_its_path() {
        let root = TempRoot::new("open");
        let path = desc().pin_path_in(&root.0);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"").unwrap();
        let (_fake, _calls) = failing("BPF_OBJ_GET", libc::EACCES);
        match Mirror::create_in(&root.0, desc(), false).unwrap_err() {
            BridgeError::PinnedMap { path: p, source } => {
                assert_eq!(p, path);
                assert_eq!((source.call, source.errno()), ("BPF_OBJ_GET", libc::EACCES));
            }
            other => panic!("expected PinnedMap, got {other:?}"),
        }
    }

    #[test]
    fn a_pinned_map_of_an_unmirrorable_type_is_refused() {
        let root = TempRoot::new("type");
        let info = MapInfo {
            map_type: MapType::Ringbuf.as_raw(),
            ..hash_info(100)
        };
        let (_path, _fake, _calls) = pinned(&root, info);
        let err = Mirror::create_in(&root.0, desc(), false).unwrap_err();
        assert!(matches!(err, BridgeError::InvalidMirror { .. }), "{err:?}");
        assert!(err.to_string().contains("cannot be a mirror"), "{err}");
    }

    fn fake_mirror() -> Mirror {
        Mirror {
            desc: desc(),
            fd: fake::dummy_fd(),
        }
    }

    #[test]
    fn entries_fall_back_to_lookups_when_batches_are_refused() {
        let _fake = fake::install(|call: &mut Call<'_>| {
            match call {
                Call::MapLookupBatch { .. } => return Err(libc::EINVAL),
                // Keys 1 and 2, then the end.
                Call::MapGetNextKey { key, next_key, .. } => {
                    let after = key.map_or(0, |k| u32::from_ne_bytes(k.try_into().unwrap()));
                    if after == 2 {
                        return Err(libc::ENOENT);
                    }
                    next_key.copy_from_slice(&(after + 1).to_ne_bytes());
                }
                Call::MapLookupElem { key, value, .. } => {
                    let k = u32::from_ne_bytes((*key).try_into().unwrap());
                    value.copy_from_slice(&u64::from(k * 10).to_ne_bytes());
                }
                _ => {}
            }
            Ok(fake::success(call))
        });
        let entries = fake_mirror().entries().expect("entries by key");
        let got: Vec<(Vec<u8>, Vec<Vec<u8>>)> =
            entries.into_iter().map(|e| (e.key, e.values)).collect();
        assert_eq!(
            got,
            [
                (
                    1u32.to_ne_bytes().to_vec(),
                    vec![10u64.to_ne_bytes().to_vec()]
                ),
                (
                    2u32.to_ne_bytes().to_vec(),
                    vec![20u64.to_ne_bytes().to_vec()]
                ),
            ]
        );
    }

    #[test]
    fn a_failing_batch_read_keeps_its_errno() {
        let (_fake, calls) = failing("BPF_MAP_LOOKUP_BATCH", libc::EPERM);
        match fake_mirror().entries().unwrap_err() {
            BridgeError::MapRead { map, source } => {
                assert_eq!(map, "counts");
                assert_eq!(
                    (source.call, source.errno()),
                    ("BPF_MAP_LOOKUP_BATCH", libc::EPERM)
                );
            }
            other => panic!("expected MapRead, got {other:?}"),
        }
        assert_eq!(*calls.borrow(), ["BPF_MAP_LOOKUP_BATCH"]);
    }

    #[test]
    fn draining_a_queue_stops_at_its_end_and_reports_other_errors() {
        let mirror = Mirror {
            desc: MirrorDesc {
                kind: MapType::Queue,
                key_size: 0,
                value_size: 4,
                ..desc()
            },
            fd: fake::dummy_fd(),
        };
        let left = Rc::new(RefCell::new(vec![Ok(7u32), Ok(8), Err(libc::ENOENT)]));
        let queue = Rc::clone(&left);
        let fake = fake::install(move |call: &mut Call<'_>| {
            if let Call::MapLookupAndDeleteElem { value, .. } = call {
                let v = queue.borrow_mut().remove(0)?;
                value.copy_from_slice(&v.to_ne_bytes());
            }
            Ok(fake::success(call))
        });
        let values = mirror.drain_queue().expect("drained");
        assert_eq!(
            values,
            [7u32.to_ne_bytes().to_vec(), 8u32.to_ne_bytes().to_vec()]
        );
        drop(fake);
        let (_fake, _calls) = failing("BPF_MAP_LOOKUP_AND_DELETE_ELEM", libc::EBADF);
        match mirror.drain_queue().unwrap_err() {
            BridgeError::MapRead { source, .. } => assert_eq!(source.errno(), libc::EBADF),
            other => panic!("expected MapRead, got {other:?}"),
        }
    }
}
