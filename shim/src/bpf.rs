//! The application's `bpf()` commands. Each reaches the kernel first unless it is about an
//! object the shim serves (a sealed map, a uprobe event, a link); see the crate docs.

use std::os::fd::AsRawFd;

use bpftime_runtime::maps::{EntryValue, MapHandle, MapType};
use libbpf_sys as sys;

use crate::table::{self, Handle, MapRec, ProgRec};
use crate::{link, publish, raw, user};

/// `BPF_PROG_TYPE_KPROBE`: the type of uprobe programs, the ones the runtime runs.
pub(crate) const PROG_TYPE_KPROBE: u32 = sys::BPF_PROG_TYPE_KPROBE;

pub(crate) fn errno(e: i32) -> i64 {
    -i64::from(e)
}

/// The command as the kernel would run it.
pub(crate) fn kernel(cmd: u32, attr: usize, size: u32) -> i64 {
    // SAFETY: the application's own arguments, passed on unchanged.
    unsafe { raw::syscall3(libc::SYS_bpf, i64::from(cmd), attr as i64, i64::from(size)) }
}

/// One `bpf(cmd, attr, size)` call of the application.
pub(crate) fn command(cmd: i32, attr: usize, size: u32) -> i64 {
    let Ok(cmd) = u32::try_from(cmd) else {
        return kernel(cmd as u32, attr, size);
    };
    let parsed = match user::read_struct::<sys::bpf_attr>(attr, size as usize) {
        Ok(a) => a,
        Err(_) => return kernel(cmd, attr, size),
    };
    match cmd {
        sys::BPF_MAP_CREATE => map_create(cmd, attr, size, &parsed),
        sys::BPF_MAP_LOOKUP_ELEM
        | sys::BPF_MAP_UPDATE_ELEM
        | sys::BPF_MAP_DELETE_ELEM
        | sys::BPF_MAP_GET_NEXT_KEY
        | sys::BPF_MAP_LOOKUP_AND_DELETE_ELEM => map_elem(cmd, attr, size, &parsed),
        sys::BPF_MAP_LOOKUP_BATCH
        | sys::BPF_MAP_LOOKUP_AND_DELETE_BATCH
        | sys::BPF_MAP_UPDATE_BATCH
        | sys::BPF_MAP_DELETE_BATCH => {
            // SAFETY: reading the `batch` member of a zero-initialised attr copy.
            let b = unsafe { parsed.batch };
            match sealed_map(b.map_fd as i32) {
                Some(map) => batch(cmd, attr, &map, &b),
                None => kernel(cmd, attr, size),
            }
        }
        sys::BPF_PROG_LOAD => prog_load(cmd, attr, size, &parsed),
        sys::BPF_OBJ_PIN => obj_pin(cmd, attr, size, &parsed),
        sys::BPF_BTF_LOAD => btf_load(cmd, attr, size, &parsed),
        sys::BPF_LINK_CREATE => link::create(cmd, attr, size, &parsed),
        sys::BPF_LINK_DETACH => {
            // SAFETY: reading the `link_detach` member of the attr copy.
            let fd = unsafe { parsed.link_detach.link_fd } as i32;
            let ours = table::with(|s| match s.fds.get(&fd) {
                Some(Handle::Link(i)) => {
                    s.links[*i].detached = true;
                    true
                }
                _ => false,
            });
            if ours {
                publish::links_changed();
                return 0;
            }
            kernel(cmd, attr, size)
        }
        sys::BPF_OBJ_GET_INFO_BY_FD => {
            // SAFETY: reading the `info` member of the attr copy.
            let info = unsafe { parsed.info };
            match table::with(|s| s.fds.get(&(info.bpf_fd as i32)).copied()) {
                Some(Handle::Link(i)) => link::info(attr, &info, i),
                Some(Handle::Event(_) | Handle::PerfBuf(_)) => {
                    // The kernel's answer for a perf event descriptor: not a BPF object.
                    errno(libc::EINVAL)
                }
                _ => kernel(cmd, attr, size),
            }
        }
        _ => kernel(cmd, attr, size),
    }
}

/// BPF_OBJ_PIN of a sealed map: its kernel map no longer holds the contents (user space does),
/// the sync forwarder's kernel mirror does, so the mirror is what gets pinned when `load`
/// syncs (`/sys/fs/bpf/bpftime-rs/<object>/<map>`, dots as `_`, where the loader pins it).
/// Without a mirror the kernel map is pinned, as the kernel would, with one line saying its
/// contents stay those of the moment the object was sealed.
fn obj_pin(cmd: u32, attr: usize, size: u32, a: &sys::bpf_attr) -> i64 {
    // SAFETY: reading the OBJ_PIN member of the attr copy.
    let o = unsafe { a.__bindgen_anon_4 };
    let Some(map) = sealed_map(o.bpf_fd as i32) else {
        return kernel(cmd, attr, size);
    };
    let Some(object) = table::with(|s| Some(s.sealed.as_ref()?.shm.object_name().to_string()))
    else {
        return kernel(cmd, attr, size);
    };
    let mirror = format!(
        "/sys/fs/bpf/bpftime-rs/{}/{}",
        object.replace('.', "_"),
        map.name().replace('.', "_")
    );
    let Ok(mirror) = std::ffi::CString::new(mirror) else {
        return kernel(cmd, attr, size);
    };
    // SAFETY: bpf_attr is plain old data; all-zero is valid.
    let mut get: sys::bpf_attr = unsafe { std::mem::zeroed() };
    get.__bindgen_anon_4.pathname = mirror.as_ptr() as u64;
    let attr_size = std::mem::size_of::<sys::bpf_attr>();
    let fd = kernel(
        sys::BPF_OBJ_GET,
        &get as *const _ as usize,
        attr_size as u32,
    );
    if fd < 0 {
        eprintln!(
            "bpftime-shim: BPF_OBJ_PIN of map {}: user space holds its contents; the pin is the \
             kernel map as it was when the object was sealed (with `bpftime-rs load --sync` \
             the kernel mirror is pinned instead)",
            map.name()
        );
        return kernel(cmd, attr, size);
    }
    let mut pin = *a;
    pin.__bindgen_anon_4.bpf_fd = fd as u32;
    let r = kernel(cmd, &pin as *const _ as usize, size.min(attr_size as u32));
    raw::close(fd as i32);
    r
}

/// BPF_BTF_LOAD: the kernel's, and the BTF kept (what `bpftime-rs maps` formats entries with).
fn btf_load(cmd: u32, attr: usize, size: u32, a: &sys::bpf_attr) -> i64 {
    let fd = kernel(cmd, attr, size);
    if fd < 0 {
        return fd;
    }
    // SAFETY: reading the BTF_LOAD member of the attr copy.
    let b = unsafe { a.__bindgen_anon_7 };
    if let Ok(bytes) = user::read(b.btf as usize, b.btf_size as usize) {
        table::with(|s| {
            s.btfs.push(table::BtfRec { bytes, open: 1 });
            s.fds.insert(fd as i32, Handle::Btf(s.btfs.len() - 1));
        });
    }
    fd
}

fn map_create(cmd: u32, attr: usize, size: u32, a: &sys::bpf_attr) -> i64 {
    let fd = kernel(cmd, attr, size);
    if fd < 0 {
        return fd;
    }
    // SAFETY: reading the MAP_CREATE member of the attr copy.
    let c = unsafe { a.__bindgen_anon_1 };
    let name: Vec<u8> = c
        .map_name
        .iter()
        .map(|&b| b as u8)
        .take_while(|&b| b != 0)
        .collect();
    let rec = MapRec {
        kernel_fd: -1,
        map_type: c.map_type,
        key_size: c.key_size,
        value_size: c.value_size,
        max_entries: c.max_entries,
        flags: c.map_flags,
        map_extra: c.map_extra,
        name: String::from_utf8_lossy(&name).into_owned(),
        open: 0,
        segment_index: None,
        prog_slots: Vec::new(),
        cgroup_slots: Vec::new(),
        btf: None,
    };
    // A map created after sealing (libbpf's lazy feature probes make some) stays a kernel
    // map; a program that uses one is refused when it is attached, with the reason.
    let mut rec = rec;
    match table::with(|s| {
        if let Some(Handle::Btf(id)) = s.fds.get(&(c.btf_fd as i32)) {
            rec.btf = Some((*id, c.btf_key_type_id, c.btf_value_type_id));
        }
        s.add_map(fd as i32, rec)
    }) {
        Ok(_) => fd,
        Err(e) => {
            raw::close(fd as i32);
            e
        }
    }
}

/// The shared map `fd` stands for, sealing the object first if it must be (an `mmap` or
/// `epoll` of a map is where user space takes over).
fn sealed_map_now(fd: i32) -> Option<MapHandle> {
    table::with(|s| {
        if s.map_of(fd).is_some() {
            crate::publish::ensure_sealed(s);
        }
    });
    sealed_map(fd)
}

/// The shared map `fd` stands for, once the object is sealed.
pub(crate) fn sealed_map(fd: i32) -> Option<MapHandle> {
    table::with(|s| {
        let id = s.map_of(fd)?;
        let index = s.maps[id].segment_index?;
        s.sealed.as_ref()?.shm.map(index).ok()
    })
}

fn map_elem(cmd: u32, attr: usize, size: u32, a: &sys::bpf_attr) -> i64 {
    // SAFETY: reading the element-command member of the attr copy.
    let e = unsafe { a.__bindgen_anon_2 };
    let Some(map) = sealed_map(e.map_fd as i32) else {
        record_slot_before_sealing(cmd, &e);
        return kernel(cmd, attr, size);
    };
    // SAFETY: `value` and `next_key` share the union's one u64.
    let value_ptr = unsafe { e.__bindgen_anon_1.value } as usize;
    match serve_elem(cmd, &map, e.key as usize, value_ptr, e.flags) {
        Ok(()) => 0,
        Err(r) => r,
    }
}

/// Before sealing: a PROG_ARRAY or CGROUP_ARRAY slot the application sets (or deletes) in
/// the kernel map is remembered, to be set in the segment at sealing (the kernel cannot hand
/// either back: a lookup gives no program or cgroup).
fn record_slot_before_sealing(cmd: u32, e: &sys::bpf_attr__bindgen_ty_2) {
    if cmd != sys::BPF_MAP_UPDATE_ELEM && cmd != sys::BPF_MAP_DELETE_ELEM {
        return;
    }
    table::with(|s| {
        let Some(id) = s.map_of(e.map_fd as i32) else {
            return;
        };
        if s.sealed.is_some() {
            return;
        }
        let Ok(key) = user::read(e.key as usize, 4) else {
            return;
        };
        if s.maps[id].map_type == sys::BPF_MAP_TYPE_CGROUP_ARRAY {
            let index = u32::from_le_bytes(key.clone().try_into().expect("4 bytes"));
            s.maps[id].cgroup_slots.retain(|(i, _)| *i != index);
            // SAFETY: `value` is the union's u64.
            let value = unsafe { e.__bindgen_anon_1.value } as usize;
            let cgroup = (cmd == sys::BPF_MAP_UPDATE_ELEM)
                .then(|| user::read(value, 4).ok())
                .flatten()
                .and_then(|v| {
                    bpftime_runtime::maps::cgroup_id_of_fd(i32::from_le_bytes(v.try_into().ok()?))
                        .ok()
                });
            if let Some(cgroup) = cgroup {
                s.maps[id].cgroup_slots.push((index, cgroup));
            }
            return;
        }
        if s.maps[id].map_type != sys::BPF_MAP_TYPE_PROG_ARRAY {
            return;
        }
        s.maps[id].prog_slots.retain(|(k, _)| *k != key);
        if cmd == sys::BPF_MAP_UPDATE_ELEM {
            // SAFETY: `value` is the union's u64.
            let value = unsafe { e.__bindgen_anon_1.value } as usize;
            let prog = user::read(value, 4)
                .ok()
                .and_then(|v| s.prog_of(i32::from_le_bytes(v.try_into().ok()?)));
            if let Some(prog) = prog {
                s.maps[id].prog_slots.push((key, prog));
            }
        }
    });
}

/// The value size user space passes for `map`: per-CPU maps take one 8-byte-padded value
/// per possible CPU, as the kernel's syscall does.
fn user_value_size(map: &MapHandle) -> usize {
    let def = map.def();
    if def.map_type.is_percpu() {
        (def.value_size as usize).next_multiple_of(8) * map.ncpu() as usize
    } else {
        def.value_size as usize
    }
}

fn value_bytes(map: &MapHandle, v: EntryValue) -> Vec<u8> {
    match v {
        EntryValue::Single(b) => b,
        EntryValue::PerCpu(per_cpu) => {
            let stride = (map.def().value_size as usize).next_multiple_of(8);
            let mut out = vec![0u8; stride * per_cpu.len()];
            for (cpu, value) in per_cpu.iter().enumerate() {
                let n = value.len().min(stride);
                out[cpu * stride..cpu * stride + n].copy_from_slice(&value[..n]);
            }
            out
        }
    }
}

fn map_errno(e: &bpftime_runtime::maps::MapError) -> i64 {
    errno(e.errno())
}

fn serve_elem(cmd: u32, map: &MapHandle, key: usize, value: usize, flags: u64) -> Result<(), i64> {
    let def = map.def().clone();
    let read_key = || user::read(key, def.key_size as usize);
    match cmd {
        sys::BPF_MAP_LOOKUP_ELEM => {
            if let Some(b) = map.as_bloom_filter() {
                // The value is the one to test (the kernel copies it in, nothing out).
                let v = user::read(value, def.value_size as usize)?;
                return b.peek(&v).map_err(|e| map_errno(&e));
            }
            if def.map_type.is_keyless() {
                let q = map.as_queue().ok_or(errno(libc::EINVAL))?;
                let v = q.peek().map_err(|e| map_errno(&e))?;
                return user::write(value, &v);
            }
            let k = read_key()?;
            // BPF_F_LOCK: copied under the value's spin lock.
            match map.get_with_flags(&k, flags).map_err(|e| map_errno(&e))? {
                Some(v) => user::write(value, &value_bytes(map, v)),
                None => Err(errno(libc::ENOENT)),
            }
        }
        sys::BPF_MAP_UPDATE_ELEM => {
            let v = user::read(value, user_value_size(map))?;
            if let Some(b) = map.as_bloom_filter() {
                return b.push(&v, flags).map_err(|e| map_errno(&e));
            }
            if def.map_type.is_keyless() {
                let q = map.as_queue().ok_or(errno(libc::EINVAL))?;
                return q.push(&v, flags).map_err(|e| map_errno(&e));
            }
            let k = read_key()?;
            if def.map_type == MapType::ProgArray {
                return prog_array_update(map, &k, &v, flags);
            }
            if def.map_type == MapType::PerfEventArray {
                return publish::bind_perf_buffer(map, &k, &v);
            }
            map.update_percpu(&k, &v, flags).map_err(|e| map_errno(&e))
        }
        sys::BPF_MAP_DELETE_ELEM => {
            let k = read_key()?;
            if def.map_type == MapType::PerfEventArray {
                return publish::unbind_perf_buffer(map, &k);
            }
            map.delete(&k).map_err(|e| map_errno(&e))
        }
        sys::BPF_MAP_LOOKUP_AND_DELETE_ELEM => {
            if def.map_type.is_keyless() {
                let q = map.as_queue().ok_or(errno(libc::EINVAL))?;
                let v = q.pop().map_err(|e| map_errno(&e))?;
                return user::write(value, &v);
            }
            let k = read_key()?;
            let v = map
                .get(&k)
                .map_err(|e| map_errno(&e))?
                .ok_or(errno(libc::ENOENT))?;
            map.delete(&k).map_err(|e| map_errno(&e))?;
            user::write(value, &value_bytes(map, v))
        }
        sys::BPF_MAP_GET_NEXT_KEY => {
            let current = if key == 0 { None } else { Some(read_key()?) };
            let next = map
                .next_key(current.as_deref())
                .map_err(|e| map_errno(&e))?
                .ok_or(errno(libc::ENOENT))?;
            user::write(value, &next)
        }
        _ => Err(errno(libc::EINVAL)),
    }
}

/// The batch commands on a shared map, as the kernel's `generic_map_*_batch`/`htab_map_*_batch`
/// run them: up to `count` elements from the position in `in_batch` (a u32 cursor: an index
/// into the map's iteration order; absent = from the start), the next position written to
/// `out_batch`, `count` set to how many were done, ENOENT once the map is exhausted.
fn batch(cmd: u32, attr: usize, map: &MapHandle, b: &sys::bpf_attr__bindgen_ty_3) -> i64 {
    let key_size = map.def().key_size as usize;
    let value_size = user_value_size(map);
    let count = b.count as usize;
    let write_count = |n: usize| {
        let at = attr + std::mem::offset_of!(sys::bpf_attr__bindgen_ty_3, count);
        user::write(at, &(n as u32).to_le_bytes())
    };
    let r: Result<(), i64> = (|| match cmd {
        sys::BPF_MAP_UPDATE_BATCH | sys::BPF_MAP_DELETE_BATCH => {
            for i in 0..count {
                let key = user::read(b.keys as usize + i * key_size, key_size)?;
                let done = if cmd == sys::BPF_MAP_UPDATE_BATCH {
                    let value = user::read(b.values as usize + i * value_size, value_size)?;
                    map.update_percpu(&key, &value, b.elem_flags)
                } else {
                    map.delete(&key)
                };
                if let Err(e) = done {
                    write_count(i)?;
                    return Err(map_errno(&e));
                }
            }
            write_count(count)
        }
        _ => {
            let start = if b.in_batch == 0 {
                0
            } else {
                let c = user::read(b.in_batch as usize, 4)?;
                u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize
            };
            let entries = map.iter();
            let chunk: Vec<_> = entries.iter().skip(start).take(count).collect();
            for (i, e) in chunk.iter().enumerate() {
                user::write(b.keys as usize + i * key_size, &e.key)?;
                let value = value_bytes(map, e.value.clone());
                user::write(b.values as usize + i * value_size, &value)?;
            }
            if cmd == sys::BPF_MAP_LOOKUP_AND_DELETE_BATCH {
                for e in &chunk {
                    map.delete(&e.key).map_err(|e| map_errno(&e))?;
                }
            }
            // After deleting, what followed moved up to this position.
            let next = if cmd == sys::BPF_MAP_LOOKUP_AND_DELETE_BATCH {
                start
            } else {
                start + chunk.len()
            };
            user::write(b.out_batch as usize, &(next as u32).to_le_bytes())?;
            write_count(chunk.len())?;
            if start + chunk.len() >= entries.len() {
                Err(errno(libc::ENOENT))
            } else {
                Ok(())
            }
        }
    })();
    match r {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// A PROG_ARRAY slot set to a program descriptor holds the program's manifest index.
fn prog_array_update(map: &MapHandle, key: &[u8], value: &[u8], flags: u64) -> Result<(), i64> {
    let fd = i32::from_le_bytes(
        value
            .get(..4)
            .ok_or(errno(libc::EINVAL))?
            .try_into()
            .unwrap(),
    );
    let index = table::with(|s| {
        let id = s.prog_of(fd)?;
        publish::publish_program(s, id);
        s.progs[id].manifest_index
    })
    .ok_or(errno(libc::EINVAL))?;
    map.update(key, &index.to_le_bytes(), flags)
        .map_err(|e| map_errno(&e))
}

fn prog_load(cmd: u32, attr: usize, size: u32, a: &sys::bpf_attr) -> i64 {
    let fd = kernel(cmd, attr, size);
    if fd < 0 {
        return fd;
    }
    // SAFETY: reading the PROG_LOAD member of the attr copy.
    let p = unsafe { a.__bindgen_anon_3 };
    let name: Vec<u8> = p
        .prog_name
        .iter()
        .map(|&b| b as u8)
        .take_while(|&b| b != 0)
        .collect();
    let name = String::from_utf8_lossy(&name).into_owned();
    let insns = user::read(p.insns as usize, p.insn_cnt as usize * 8);
    // Programs the runtime runs: which instructions the verifier proved dead.
    let live = (p.prog_type == PROG_TYPE_KPROBE)
        .then(|| verifier_walk(a, size, p.insn_cnt as usize))
        .flatten();
    table::with(|s| {
        let (insns, unrunnable) = match insns {
            Ok(insns) => map_refs_to_records(s, neutralise_dead(insns, live.as_deref())),
            Err(_) => (
                Vec::new(),
                Some("its instructions could not be read back".to_string()),
            ),
        };
        s.progs.push(ProgRec {
            name,
            prog_type: p.prog_type,
            insns,
            unrunnable,
            manifest_index: None,
            open: 1,
        });
        let id = s.progs.len() - 1;
        s.fds.insert(fd as i32, Handle::Prog(id));
        if p.prog_type == PROG_TYPE_KPROBE {
            // Published now if the object is sealed already; else when it is.
            publish::publish_program(s, id);
        }
    });
    fd
}

/// Loads the application's program once more, with a level-2 verifier log of our own, and
/// reads from it which instructions the verifier visited (see
/// `bpftime_runtime::verifier::visited_instructions`). `None` if that fails (the program then
/// runs as it is).
fn verifier_walk(a: &sys::bpf_attr, size: u32, insn_count: usize) -> Option<Vec<bool>> {
    const LOG_SIZE: usize = 64 << 20;
    let mut log = vec![0u8; LOG_SIZE];
    let mut attr = *a;
    attr.__bindgen_anon_3.log_level = 2;
    attr.__bindgen_anon_3.log_size = LOG_SIZE as u32;
    attr.__bindgen_anon_3.log_buf = log.as_mut_ptr() as u64;
    let size = (size as usize).min(std::mem::size_of::<sys::bpf_attr>()) as u32;
    let fd = kernel(
        sys::BPF_PROG_LOAD,
        &attr as *const sys::bpf_attr as usize,
        size,
    );
    if fd < 0 {
        return None;
    }
    raw::close(fd as i32);
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    bpftime_runtime::verifier::visited_instructions(
        &String::from_utf8_lossy(&log[..end]),
        insn_count,
    )
}

/// Replaces every instruction the verifier never visited with `exit`: no run reaches it, and a
/// helper or map it names (one user space does not have) then does not stop the program from
/// running in user space. An `lddw`'s two halves go together.
fn neutralise_dead(mut insns: Vec<u8>, live: Option<&[bool]>) -> Vec<u8> {
    const EXIT: [u8; 8] = [(sys::BPF_JMP | sys::BPF_EXIT) as u8, 0, 0, 0, 0, 0, 0, 0];
    let Some(live) = live else {
        return insns;
    };
    for (i, slots) in instructions(&insns) {
        if !live.get(i).copied().unwrap_or(true) {
            for k in i..(i + slots).min(insns.len() / 8) {
                insns[k * 8..k * 8 + 8].copy_from_slice(&EXIT);
            }
        }
    }
    insns
}

/// `lddw`, the one instruction two 8-byte slots wide.
const LD_IMM64: u8 = (sys::BPF_LD | sys::BPF_DW | sys::BPF_IMM) as u8;

/// Each instruction of `insns` as (index of its first slot, slots it takes), in order: the one
/// walk over a program the shim makes (`lddw` takes two).
fn instructions(insns: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while (i + 1) * 8 <= insns.len() {
        let slots = if insns[i * 8] == LD_IMM64 { 2 } else { 1 };
        out.push((i, slots));
        i += slots;
    }
    out
}

/// Calls `f` for each `lddw` of `insns` with its index, its source (`BPF_PSEUDO_*`) and its
/// immediate (the 4 bytes a map reference's descriptor or index sits in, to rewrite).
pub(crate) fn for_each_lddw(insns: &mut [u8], mut f: impl FnMut(usize, u32, &mut [u8])) {
    for (i, slots) in instructions(insns) {
        let at = i * 8;
        if slots == 2 && at + 16 <= insns.len() {
            let src = u32::from(insns[at + 1] >> 4);
            f(i, src, &mut insns[at + 4..at + 8]);
        }
    }
}

/// The instructions with each map reference's descriptor replaced by the map's record index;
/// and why the program cannot run in user space, if a reference is not to a map of ours.
fn map_refs_to_records(s: &table::Shim, mut insns: Vec<u8>) -> (Vec<u8>, Option<String>) {
    let mut why = None;
    for_each_lddw(&mut insns, |i, src, imm| {
        if src == sys::BPF_PSEUDO_MAP_FD || src == sys::BPF_PSEUDO_MAP_VALUE {
            let fd = i32::from_le_bytes((&*imm).try_into().expect("4 bytes"));
            match s.map_of(fd) {
                Some(id) => imm.copy_from_slice(&(id as u32).to_le_bytes()),
                None => {
                    why.get_or_insert(format!(
                        "instruction {i} loads descriptor {fd}, which is no map this process \
                         created with bpf(BPF_MAP_CREATE)"
                    ));
                }
            }
        } else if src == sys::BPF_PSEUDO_MAP_IDX || src == sys::BPF_PSEUDO_MAP_IDX_VALUE {
            why.get_or_insert(format!(
                "instruction {i} refers to a map through fd_array, which the shim does not serve"
            ));
        }
    });
    (insns, why)
}

/// `mmap` of a sealed map's descriptor: the segment's range for it, as the kernel maps the
/// map (`None`: not a sealed map, the kernel maps it).
pub(crate) fn mmap(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: i64,
) -> Option<i64> {
    let perf = table::with(|s| {
        let id = s.perfbuf_of(fd)?;
        Some(crate::perfbuf::mmap(
            &mut s.perfbufs[id],
            addr,
            len,
            prot,
            flags,
            offset,
        ))
    });
    if perf.is_some() {
        return perf;
    }
    let map = sealed_map_now(fd)?;
    let seg_fd = table::with(|s| Some(s.sealed.as_ref()?.shm.segment_fd().as_raw_fd()))?;
    let Some((file_off, range)) = map.mmap_range() else {
        // The kernel's answer for a map type without `map_mmap` (`bpf_map_mmap`): ENOTSUPP,
        // its internal 524.
        const ENOTSUPP: i32 = 524;
        eprintln!(
            "bpftime-shim: mmap of map {}: a {} map cannot be mapped; failing with ENOTSUPP \
             (524), as the kernel does",
            map.name(),
            map.map_type()
        );
        return Some(errno(ENOTSUPP));
    };
    let offset = offset as u64;
    let len64 = len as u64;
    let do_map = |at: usize, n: usize, prot: i32, flags: i32, off: u64| -> i64 {
        // SAFETY: maps the segment file (alive while the object is) where the application
        // asked, as its own mmap would; MAP_FIXED only over the reservation made below or
        // where the application itself passed MAP_FIXED.
        unsafe { raw::mmap(at, n, prot, flags, seg_fd, off as i64) }
    };
    let user_ring = map.map_type() == MapType::UserRingbuf;
    if map.map_type() != MapType::Ringbuf && !user_ring {
        if offset + len64 > range {
            return Some(errno(libc::EINVAL));
        }
        return Some(do_map(addr, len, prot, flags, file_off + offset));
    }
    let pg = bpftime_abi::page_size() as u64;
    let data = range - 2 * pg;
    match offset {
        // The consumer page: the only part user space may write of a RINGBUF, and the part
        // it may not write of a USER_RINGBUF (ringbuf_map_mmap_user: EPERM).
        0 if len64 <= pg => {
            if user_ring && prot & libc::PROT_WRITE != 0 {
                return Some(errno(libc::EPERM));
            }
            Some(do_map(addr, len, prot, flags, file_off))
        }
        // The producer page and the data, the data mapped twice (ringbuf_map_mmap_kern and
        // _user); user space produces into a USER_RINGBUF, so there they may be written.
        o if o == pg && len64 <= pg + 2 * data => {
            if !user_ring && prot & libc::PROT_WRITE != 0 {
                return Some(errno(libc::EPERM));
            }
            // SAFETY: an anonymous reservation of len bytes, replaced below.
            let base = unsafe {
                raw::mmap(
                    addr,
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | (flags & libc::MAP_FIXED),
                    -1,
                    0,
                )
            };
            if base < 0 {
                return Some(base);
            }
            let first = len.min((pg + data) as usize);
            let fixed = libc::MAP_SHARED | libc::MAP_FIXED;
            let r = do_map(base as usize, first, prot, fixed, file_off + pg);
            if r < 0 {
                return Some(r);
            }
            if len > first {
                let r = do_map(
                    base as usize + first,
                    len - first,
                    prot,
                    fixed,
                    file_off + 2 * pg,
                );
                if r < 0 {
                    return Some(r);
                }
            }
            Some(base)
        }
        _ => Some(errno(libc::EINVAL)),
    }
}

/// For `epoll_ctl` and `poll` on a sealed RINGBUF's descriptor, or a perf buffer event's: the
/// eventfd that stands for its readiness.
pub(crate) fn ring_readiness_fd(fd: i32) -> Option<i32> {
    if let Some(ready) = table::with(|s| Some(s.perfbufs[s.perfbuf_of(fd)?].eventfd)) {
        return Some(ready);
    }
    let map = sealed_map_now(fd)?;
    if map.map_type() != MapType::Ringbuf {
        return None;
    }
    publish::ring_readiness(map)
}
