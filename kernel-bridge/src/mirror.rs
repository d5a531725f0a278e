//! Mirror maps: real kernel maps that receive the bridge's updates, pinned under
//! `/sys/fs/bpf/bpftime-rs/<object>/<map>` so `bpftool map dump pinned ...` and users' own BPF
//! objects (libbpf `pin_root_path`) see them.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use bpftime_abi::{possible_cpus, MapType};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::error::BridgeError;
use bpftime_abi::bridge::SCRATCH_SIZE;

/// Where every mirror is pinned.
pub const PIN_ROOT: &str = "/sys/fs/bpf/bpftime-rs";

/// Everything needed to create a mirror: the source map's shape and where to pin it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MirrorDesc {
    /// A type with [`MapType::is_mirrorable`]; [`MirrorDesc::validate`] refuses the others.
    pub kind: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    /// Map name; the kernel keeps the first 15 bytes, the pin keeps it whole.
    pub name: String,
    /// The object the map belongs to: the pin directory's name.
    pub object: String,
}

impl MirrorDesc {
    pub fn pin_path(&self) -> PathBuf {
        pin_path(&self.object, &self.name)
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
    Path::new(PIN_ROOT)
        .join(pin_component(object))
        .join(pin_component(map))
}

fn pin_component(name: &str) -> String {
    name.replace('.', "_")
}

/// A created (or reopened) kernel mirror.
#[derive(Debug)]
pub struct Mirror {
    desc: MirrorDesc,
    handle: MapHandle,
}

impl Mirror {
    /// Creates the kernel map and pins it. An existing pin of the same shape is reused (its
    /// entries are kept: a restarted loader re-syncs over them); one of another shape is an error
    /// unless `replace` is set, in which case it is unpinned and a fresh map created.
    pub fn create(desc: MirrorDesc, replace: bool) -> Result<Self, BridgeError> {
        desc.validate()?;
        let path = desc.pin_path();
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
                    handle: mirror.handle,
                });
            }
        }
        let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
            map_flags: desc.flags,
            ..Default::default()
        };
        let kernel_name: String = desc.name.chars().take(15).collect();
        let mut handle = MapHandle::create(
            libbpf_rs::MapType::from(desc.kind.as_raw()),
            Some(kernel_name),
            desc.key_bytes(),
            desc.value_size,
            desc.max_entries,
            &opts,
        )
        .map_err(|e| BridgeError::MapCreate {
            map: desc.name.clone(),
            source: std::io::Error::other(e),
        })?;
        let dir = path.parent().expect("pin path has a parent");
        std::fs::create_dir_all(dir).map_err(|source| BridgeError::Pin {
            path: dir.to_path_buf(),
            source,
        })?;
        handle.pin(&path).map_err(|e| BridgeError::Pin {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        Ok(Self { desc, handle })
    }

    /// Opens a pinned mirror; its description is read back from the kernel.
    pub fn open_pinned(path: &Path, object: &str) -> Result<Self, BridgeError> {
        let handle = MapHandle::from_pinned_path(path).map_err(|e| BridgeError::Pin {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        let info = handle.info().map_err(|e| BridgeError::Pin {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        let map_type = info.info.type_;
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
                key_size: info.info.key_size,
                value_size: info.info.value_size,
                max_entries: info.info.max_entries,
                flags: info.info.map_flags,
                name,
                object: object.to_string(),
            },
            handle,
        })
    }

    pub fn desc(&self) -> &MirrorDesc {
        &self.desc
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.handle.as_fd()
    }

    pub(crate) fn raw_fd(&self) -> u32 {
        self.handle.as_fd().as_raw_fd() as u32
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
            Err(libc::EINVAL | libc::ENOTSUP | 524) => self.entries_by_key(),
            Err(errno) => Err(BridgeError::MapRead {
                map: self.desc.name.clone(),
                source: std::io::Error::from_raw_os_error(errno),
            }),
        }
    }

    fn entries_batched(&self) -> Result<Vec<KernelEntry>, i32> {
        let key_size = self.desc.key_size as usize;
        let (cpus, slot) = if self.desc.kind.is_percpu() {
            (
                possible_cpus() as usize,
                self.desc.value_size.next_multiple_of(8) as usize,
            )
        } else {
            (1, self.desc.value_size as usize)
        };
        let value_bytes = slot * cpus;
        let mut count: u32 = 4096;
        let mut entries = Vec::new();
        let mut in_batch = vec![0u8; key_size.max(4)];
        let mut out_batch = vec![0u8; key_size.max(4)];
        let mut first = true;
        let opts = libbpf_rs::libbpf_sys::bpf_map_batch_opts {
            sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_batch_opts>() as _,
            ..Default::default()
        };
        loop {
            let mut keys = vec![0u8; count as usize * key_size];
            let mut values = vec![0u8; count as usize * value_bytes];
            let mut n = count;
            // SAFETY: keys and values hold `count` keys and values of the map's sizes (per-CPU
            // values: one 8-byte-padded slot per possible CPU, as the kernel copies them);
            // in_batch/out_batch hold one batch token (the kernel uses a key-sized token for
            // hash maps, at least 4 bytes); opts is initialised with its size.
            let r = unsafe {
                libbpf_rs::libbpf_sys::bpf_map_lookup_batch(
                    self.handle.as_fd().as_raw_fd(),
                    if first {
                        std::ptr::null_mut()
                    } else {
                        in_batch.as_mut_ptr().cast()
                    },
                    out_batch.as_mut_ptr().cast(),
                    keys.as_mut_ptr().cast(),
                    values.as_mut_ptr().cast(),
                    &mut n,
                    &opts,
                )
            };
            let errno = if r < 0 { -r } else { 0 };
            match errno {
                0 | libc::ENOENT => {
                    for i in 0..n as usize {
                        let value = &values[i * value_bytes..(i + 1) * value_bytes];
                        entries.push(KernelEntry {
                            key: keys[i * key_size..(i + 1) * key_size].to_vec(),
                            values: value
                                .chunks_exact(slot.max(1))
                                .map(|v| v[..self.desc.value_size as usize].to_vec())
                                .collect(),
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
                e => return Err(e),
            }
        }
    }

    fn entries_by_key(&self) -> Result<Vec<KernelEntry>, BridgeError> {
        let read_err = |e: libbpf_rs::Error| BridgeError::MapRead {
            map: self.desc.name.clone(),
            source: std::io::Error::other(e),
        };
        let mut entries = Vec::new();
        for key in self.handle.keys() {
            let values = if self.desc.kind.is_percpu() {
                match self
                    .handle
                    .lookup_percpu(&key, MapFlags::ANY)
                    .map_err(read_err)?
                {
                    Some(values) => values,
                    None => continue,
                }
            } else {
                match self.handle.lookup(&key, MapFlags::ANY).map_err(read_err)? {
                    Some(value) => vec![value],
                    None => continue,
                }
            };
            entries.push(KernelEntry { key, values });
        }
        Ok(entries)
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
            .unwrap_or_else(|_| self.handle.keys().count())
    }

    /// Pops every value of a QUEUE or STACK mirror, in pop order (this empties it).
    pub fn drain_queue(&self) -> Result<Vec<Vec<u8>>, BridgeError> {
        let mut values = Vec::new();
        while let Some(value) =
            self.handle
                .lookup_and_delete(&[])
                .map_err(|e| BridgeError::MapRead {
                    map: self.desc.name.clone(),
                    source: std::io::Error::other(e),
                })?
        {
            values.push(value);
        }
        Ok(values)
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
    pub key: Vec<u8>,
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
