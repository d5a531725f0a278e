//! The kernel drain program (`ebpf/bridge.bpf.c`) and the maps it owns.
//!
//! aya 0.14 cannot load a `SEC("syscall")` program (aya-obj has no such program section), so this
//! one object is loaded through libbpf (libbpf-rs; libbpf-sys builds libbpf from its own crate
//! sources), which knows syscall programs, sets `BPF_F_SLEEPABLE` and loads BTF with func_info for
//! the drain callback. Loading the object is the one place where libbpf issues its own `bpf()`
//! commands; every command on the loaded maps and program (registering mirrors, running the
//! drain) goes through `bpftime_abi::sys` like the rest of the project. See kernel-bridge/README.md.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use libbpf_rs::{MapCore, Object, ObjectBuilder};

use bpftime_abi::bridge::{DrainArgs, MirrorSlot};
use bpftime_abi::sys;
use bpftime_abi::MapType;

use crate::error::BridgeError;
use crate::mirror::MirrorDesc;

const BRIDGE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bridge.bpf.o"));

/// `BPF_ANY`.
const ANY: u64 = 0;

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
    /// The drain program's own fd (a duplicate: the object keeps its own).
    drain: OwnedFd,
    /// The loaded object, owner of the maps [`DrainProgram::map`] finds. `None` only in the unit
    /// tests' stand-in ([`DrainProgram::stand_in`]), which has a program fd and no maps.
    object: Option<Object>,
}

impl DrainProgram {
    /// Opens and loads `ebpf/bridge.bpf.o` with libbpf (its own `bpf()` commands: needs
    /// CAP_BPF) and keeps a duplicate of the `drain` program's fd.
    pub fn load() -> Result<Self, BridgeError> {
        let open = ObjectBuilder::default()
            .name("bpftime_bridge")
            .map_err(BridgeError::LoadDrain)?
            .open_memory(BRIDGE_OBJECT)
            .map_err(BridgeError::LoadDrain)?;
        let object = open.load().map_err(BridgeError::LoadDrain)?;
        let drain = object
            .progs()
            .find(|p| p.name() == "drain")
            .ok_or_else(|| BridgeError::DrainIncomplete("program drain".into()))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| BridgeError::System {
                what: "duplicating the drain program fd",
                source,
            })?;
        Ok(Self {
            drain,
            object: Some(object),
        })
    }

    /// A drain of `drain` alone, whose commands `sys`'s test override answers: no object, so
    /// [`DrainProgram::map`] finds nothing (registering a mirror fails with `DrainIncomplete`).
    #[cfg(test)]
    pub(crate) fn stand_in(drain: OwnedFd) -> Self {
        Self {
            drain,
            object: None,
        }
    }

    fn map(&self, name: &str) -> Result<libbpf_rs::Map<'_>, BridgeError> {
        self.object
            .iter()
            .flat_map(Object::maps)
            .find(|m| m.name() == name)
            .ok_or_else(|| BridgeError::DrainIncomplete(format!("map {name}")))
    }

    /// A new fd of one of the object's maps.
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
        let update_err = |source| BridgeError::MapCreate {
            map: desc.name.clone(),
            source,
        };
        let fast = fast_shape(desc).filter(|_| allow_fast);
        if let Some((_, outer)) = fast {
            let outer = self.map(outer)?;
            sys::map_update_elem(
                outer.as_fd(),
                &index.to_ne_bytes(),
                &mirror_fd.to_ne_bytes(),
                ANY,
            )
            .map_err(update_err)?;
        }
        let slot = MirrorSlot {
            fd: mirror_fd,
            key_size: desc.key_bytes(),
            value_size: desc.value_bytes(),
            fast_shape: fast.map_or(0, |(id, _)| id),
        };
        let mirrors = self.map("mirrors")?;
        sys::map_update_elem(mirrors.as_fd(), &index.to_ne_bytes(), &slot.to_bytes(), ANY)
            .map_err(update_err)?;
        Ok(fast.is_some())
    }

    /// Runs the drain once with BPF_PROG_RUN; returns how many records it consumed.
    pub fn run(&self, confirm_each: bool) -> Result<u32, BridgeError> {
        run_drain(self.drain.as_fd(), confirm_each)
    }
}

/// One BPF_PROG_RUN of the drain program `drain`: the command's failure, or the program's
/// `-errno`, is an error; otherwise the number of records consumed.
fn run_drain(drain: BorrowedFd<'_>, confirm_each: bool) -> Result<u32, BridgeError> {
    let args = DrainArgs {
        confirm_each: confirm_each as u32,
        pad: 0,
    };
    let mut ctx = [0u8; std::mem::size_of::<DrainArgs>()];
    ctx[..4].copy_from_slice(&args.confirm_each.to_ne_bytes());
    ctx[4..].copy_from_slice(&args.pad.to_ne_bytes());
    let run = sys::prog_test_run(drain, &ctx).map_err(BridgeError::Drain)?;
    let retval = run.retval as i32;
    if retval < 0 {
        return Err(BridgeError::DrainReturned(
            std::io::Error::from_raw_os_error(-retval),
        ));
    }
    Ok(retval as u32)
}

#[cfg(test)]
mod tests {
    //! The drain run's error paths through `sys`'s test override (no root, no drain object).

    use std::cell::RefCell;
    use std::rc::Rc;

    use bpftime_abi::sys::{fake, Call};

    use super::*;

    #[test]
    fn a_failing_prog_run_keeps_its_errno() {
        let _fake = fake::install(|call: &mut Call<'_>| match call {
            Call::ProgTestRun { .. } => Err(libc::EPERM),
            other => Ok(fake::success(other)),
        });
        let fd = fake::dummy_fd();
        match run_drain(fd.as_fd(), false) {
            Err(BridgeError::Drain(e)) => {
                assert_eq!((e.call, e.errno()), ("BPF_PROG_TEST_RUN", libc::EPERM));
            }
            other => panic!("expected a Drain error, got {other:?}"),
        }
    }

    #[test]
    fn a_negative_drain_return_is_its_errno() {
        let _fake = fake::install(|call: &mut Call<'_>| {
            if let Call::ProgTestRun { result, .. } = call {
                result.retval = (-libc::E2BIG) as u32;
            }
            Ok(fake::success(call))
        });
        let fd = fake::dummy_fd();
        match run_drain(fd.as_fd(), false) {
            Err(BridgeError::DrainReturned(e)) => assert_eq!(e.raw_os_error(), Some(libc::E2BIG)),
            other => panic!("expected DrainReturned, got {other:?}"),
        }
    }

    #[test]
    fn the_drain_gets_its_mode_and_its_count_comes_back() {
        let ctxs = Rc::new(RefCell::new(Vec::new()));
        let seen = Rc::clone(&ctxs);
        let _fake = fake::install(move |call: &mut Call<'_>| {
            if let Call::ProgTestRun { ctx_in, result, .. } = call {
                seen.borrow_mut().push(ctx_in.to_vec());
                result.retval = 17;
            }
            Ok(fake::success(call))
        });
        let fd = fake::dummy_fd();
        assert_eq!(run_drain(fd.as_fd(), true).unwrap(), 17);
        assert_eq!(run_drain(fd.as_fd(), false).unwrap(), 17);
        let ctxs = ctxs.borrow();
        assert_eq!(ctxs[0], [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ctxs[1], [0; 8]);
    }
}
