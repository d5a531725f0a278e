//! The kernel drain program (`ebpf/bridge.bpf.c`) and the maps it owns.
//!
//! aya 0.14 cannot load a `SEC("syscall")` program (aya-obj has no such program section), so this
//! one object is loaded through libbpf (libbpf-rs; libbpf-sys builds libbpf from its own crate
//! sources), which knows syscall programs, sets `BPF_F_SLEEPABLE` and loads BTF with func_info for
//! the drain callback. Everything else in the crate uses aya. See kernel-bridge/README.md.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use libbpf_rs::{MapCore, MapFlags, Object, ObjectBuilder};

use bpftime_abi::bridge::{DrainArgs, MirrorSlot};
use bpftime_abi::MapType;

use crate::error::BridgeError;
use crate::mirror::MirrorDesc;

const BRIDGE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bridge.bpf.o"));

/// Mirror shapes with a fast path in the drain (`FAST_SHAPE` in bridge.bpf.c): updated with
/// `bpf_map_update_elem` on an inner map instead of a whole `bpf_sys_bpf` syscall per record.
/// The kernel only accepts an inner map whose type, key/value sizes and flags equal the
/// template's, so only flag-less mirrors of these exact shapes qualify.
const FAST_SHAPES: [(MapType, u32, u32, u32, &str); 5] = [
    (MapType::Hash, 4, 8, 1, "fast_hash_4_8"),
    (MapType::Hash, 8, 8, 2, "fast_hash_8_8"),
    (MapType::Hash, 4, 4, 3, "fast_hash_4_4"),
    (MapType::LruHash, 4, 8, 4, "fast_lru_4_8"),
    (MapType::LruHash, 8, 8, 5, "fast_lru_8_8"),
];

fn fast_shape(desc: &MirrorDesc) -> Option<(u32, &'static str)> {
    if desc.flags != 0 {
        return None;
    }
    FAST_SHAPES
        .iter()
        .find(|(kind, key, value, _, _)| {
            *kind == desc.kind && *key == desc.key_size && *value == desc.value_size
        })
        .map(|(_, _, _, id, outer)| (*id, *outer))
}

pub(crate) struct DrainProgram {
    object: Object,
}

impl DrainProgram {
    pub fn load() -> Result<Self, BridgeError> {
        let load_err = |e: libbpf_rs::Error| BridgeError::LoadDrain(std::io::Error::other(e));
        let open = ObjectBuilder::default()
            .name("bpftime_bridge")
            .map_err(load_err)?
            .open_memory(BRIDGE_OBJECT)
            .map_err(load_err)?;
        let object = open.load().map_err(load_err)?;
        Ok(Self { object })
    }

    fn map(&self, name: &str) -> Result<libbpf_rs::Map<'_>, BridgeError> {
        self.object
            .maps()
            .find(|m| m.name() == name)
            .ok_or_else(|| BridgeError::LoadDrain(std::io::Error::other(format!("no map {name}"))))
    }

    /// A new fd of one of the object's maps (for aya's `MapData::from_fd`).
    pub fn map_fd(&self, name: &str) -> Result<OwnedFd, BridgeError> {
        self.map(name)?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| BridgeError::System {
                what: "duplicating a bridge map fd",
                source,
            })
    }

    /// Makes mirror `index` (fd `mirror_fd` in this process) known to the drain.
    pub fn register(
        &self,
        index: u32,
        mirror_fd: u32,
        desc: &MirrorDesc,
        allow_fast: bool,
    ) -> Result<bool, BridgeError> {
        let update_err = |e: libbpf_rs::Error| BridgeError::MapCreate {
            map: desc.name.clone(),
            source: std::io::Error::other(e),
        };
        let fast = fast_shape(desc).filter(|_| allow_fast);
        if let Some((_, outer)) = fast {
            self.map(outer)?
                .update(
                    &index.to_ne_bytes(),
                    &mirror_fd.to_ne_bytes(),
                    MapFlags::ANY,
                )
                .map_err(update_err)?;
        }
        let slot = MirrorSlot {
            fd: mirror_fd,
            key_size: desc.key_bytes(),
            value_size: desc.value_bytes(),
            fast_shape: fast.map_or(0, |(id, _)| id),
        };
        self.map("mirrors")?
            .update(&index.to_ne_bytes(), &slot.to_bytes(), MapFlags::ANY)
            .map_err(update_err)?;
        Ok(fast.is_some())
    }

    /// Runs the drain once with BPF_PROG_RUN; returns how many records it consumed.
    pub fn run(&self, confirm_each: bool) -> Result<u32, BridgeError> {
        let program = self
            .object
            .progs()
            .find(|p| p.name() == "drain")
            .ok_or_else(|| BridgeError::LoadDrain(std::io::Error::other("no program drain")))?;
        let mut args = DrainArgs {
            confirm_each: confirm_each as u32,
            pad: 0,
        };
        let mut opts = libbpf_rs::libbpf_sys::bpf_test_run_opts {
            sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_test_run_opts>() as _,
            ctx_in: (&mut args as *mut DrainArgs).cast(),
            ctx_size_in: std::mem::size_of::<DrainArgs>() as u32,
            ..Default::default()
        };
        // SAFETY: `opts` points at `args`, which lives across the call; the kernel only reads
        // ctx_size_in bytes from it, and the program fd is owned by `self.object`.
        let rc = unsafe {
            libbpf_rs::libbpf_sys::bpf_prog_test_run_opts(program.as_fd().as_raw_fd(), &mut opts)
        };
        if rc < 0 {
            return Err(BridgeError::Drain(std::io::Error::from_raw_os_error(-rc)));
        }
        let retval = opts.retval as i32;
        if retval < 0 {
            return Err(BridgeError::Drain(std::io::Error::from_raw_os_error(
                -retval,
            )));
        }
        Ok(retval as u32)
    }
}
