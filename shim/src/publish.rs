//! The application's object as bpftime-rs publishes it: the shared segment of its maps, the
//! manifest of its programs and links (what the targets' agents install), and the readiness
//! of its rings for the application's `epoll`.
//!
//! Naming: the object is called what `BPFTIME_SHIM_OBJECT` says (`bpftime-rs load -- APP`
//! sets it to APP's file name), else this executable's file name. If a loader that still runs
//! holds that name, `.2`, `.3`, ... are tried; a dead loader's object of that name is removed
//! first (as `bpftime-rs unload` would), since the application builds its maps afresh.

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bpftime_abi::sys as abi_sys;
use bpftime_runtime::helpers::trace_map_def;
use bpftime_runtime::loaded::{check_program, unload_object};
use bpftime_runtime::maps::{MapDef, MapHandle, MapType, ShmObject};
use bpftime_runtime::state::manifest::{vm_name, ManifestLink, ManifestProgram};
use bpftime_runtime::state::{Manifest, StateDir};
use bpftime_runtime::vm::VmKind;
use parking_lot::Mutex;

use crate::perfbuf::{PerfOut, PerfPump};
use crate::table::{self, Shim};
use crate::{bpf, raw};

/// The sealed object.
pub(crate) struct Sealed {
    pub object: String,
    pub shm: ShmObject,
    dir: StateDir,
    manifest: Manifest,
    vm: VmKind,
    /// What the watcher thread keeps up to date (started on first use).
    watched: Arc<Mutex<Watched>>,
    watcher_started: bool,
}

/// The watcher thread's work: rings whose readiness an `epoll` waits on, perf buffers it fills.
#[derive(Default)]
struct Watched {
    rings: Vec<RingWatch>,
    perf: Vec<PerfPump>,
}

struct RingWatch {
    map: MapHandle,
    eventfd: RawFd,
    signalled: bool,
}

/// The VM programs run on: `BPFTIME_SHIM_VM` (`bpftime-rs load --vm/--no-jit` sets it), else
/// our JIT.
fn vm_from_env() -> VmKind {
    match std::env::var("BPFTIME_SHIM_VM").as_deref() {
        Ok("interpreter") => VmKind::Interpreter,
        Ok("rbpf") => VmKind::Rbpf,
        Ok("rbpf-interpreter") => VmKind::RbpfInterpreter,
        _ => VmKind::Jit,
    }
}

fn base_name() -> String {
    let name = std::env::var("BPFTIME_SHIM_OBJECT").ok().or_else(|| {
        std::env::current_exe()
            .ok()?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    });
    let name: String = name
        .unwrap_or_else(|| "app".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("app{name}")
    } else {
        name
    }
}

/// A free object name (see the module docs).
fn object_name(dir: &StateDir) -> String {
    let base = base_name();
    for n in 1..100 {
        let name = if n == 1 {
            base.clone()
        } else {
            format!("{base}.{n}")
        };
        match Manifest::read(dir, &name) {
            Ok(m) if m.loader_alive() && m.loader_pid != std::process::id() => continue,
            Ok(_) => unload_object(&name),
            Err(_) => {
                if ShmObject::open(&name).is_ok() {
                    // A segment nobody's manifest names: left by a crashed loader.
                    unload_object(&name);
                }
            }
        }
        return name;
    }
    format!("{base}.{}", std::process::id())
}

/// A unique segment map name for `name` (libbpf names internal maps `obj.rodata`).
fn unique_name(taken: &[MapDef], name: &str, id: usize) -> String {
    let name = if name.is_empty() {
        format!("map{id}")
    } else {
        name.to_string()
    };
    if !taken.iter().any(|d| d.name == name) {
        return name;
    }
    (2..)
        .map(|n| format!("{name}_{n}"))
        .find(|c| !taken.iter().any(|d| d.name == *c))
        .expect("some suffix is free")
}

/// Seals the object if it is not sealed yet and the application has a uprobe program open:
/// called where user space must take over (a uprobe link, an `mmap` or `epoll` of a map, a perf
/// buffer), not at the program's load: loaders load feature-probe programs of the same type
/// (aya does, before it creates the object's maps), and libbpf fills PROG_ARRAYs and global
/// data after loading.
pub(crate) fn ensure_sealed(shim: &mut Shim) {
    let has_uprobe_program = shim
        .progs
        .iter()
        .any(|p| p.prog_type == bpf::PROG_TYPE_KPROBE && p.open > 0);
    if shim.sealed.is_none() && has_uprobe_program {
        seal(shim);
    }
}

/// Seals the object (see the crate docs): the maps still open become its segment, with their
/// kernel contents; the manifest is published. On failure the application keeps running on
/// kernel maps only (its programs then cannot run in user space), with a line saying why.
fn seal(shim: &mut Shim) {
    if shim.sealed.is_some() {
        return;
    }
    if let Err(why) = try_seal(shim) {
        eprintln!("bpftime-shim: cannot create the user-space object: {why}");
    }
}

fn try_seal(shim: &mut Shim) -> Result<(), String> {
    let dir = StateDir::ours().map_err(|e| bpftime_abi::error_chain(&e))?;
    let object = object_name(&dir);
    let mut members: Vec<usize> = Vec::new();
    let mut defs: Vec<MapDef> = Vec::new();
    for (id, m) in shim.maps.iter().enumerate() {
        if m.open == 0 {
            continue;
        }
        // A type user space does not hold stays a kernel map, silently: programs that reach it
        // (outside code the verifier proved dead) are refused at attach, naming it.
        let Some(map_type) = MapType::from_raw(m.map_type) else {
            continue;
        };
        if map_type.is_map_of_maps() {
            // Its slots hold the application's descriptors of kernel maps; `bpftime-rs load
            // OBJ` serves maps of maps, application mode not yet.
            eprintln!(
                "bpftime-shim: map {} ({map_type}) stays a kernel map: maps of maps are not \
                 served in application mode; programs using it cannot run in user space",
                m.name
            );
            continue;
        }
        let mut def = MapDef::new(
            map_type,
            m.key_size,
            m.value_size,
            m.max_entries,
            unique_name(&defs, &m.name, id),
        );
        def.flags = m.flags;
        def.map_extra = m.map_extra;
        // The value's `struct bpf_spin_lock`, from the BTF the application created the map
        // with (what `bpf_spin_lock` and BPF_F_LOCK copies lock).
        def.spin_lock = m.btf.and_then(|(btf, _, value)| {
            let bytes = &shim.btfs.get(btf)?.bytes;
            bpftime_runtime::object::Btf::parse(bytes)
                .ok()?
                .spin_lock_offset(value)
        });
        defs.push(def);
        members.push(id);
    }
    // A map the segment refuses is left out alone (with why); the others still go in.
    let shm = loop {
        let mut all = defs.clone();
        all.push(trace_map_def());
        match ShmObject::create(&object, &all) {
            Ok(shm) => break shm,
            Err(bpftime_runtime::maps::MapError::InvalidDef { map, reason })
                if defs.iter().any(|d| d.name == map) =>
            {
                eprintln!(
                    "bpftime-shim: map {map} stays a kernel map ({reason}); programs using it \
                     cannot run in user space"
                );
                let i = defs.iter().position(|d| d.name == map).expect("present");
                defs.remove(i);
                members.remove(i);
            }
            Err(e) => return Err(bpftime_abi::error_chain(&e)),
        }
    };
    for (index, &id) in members.iter().enumerate() {
        let handle = shm.map(index).map_err(|e| bpftime_abi::error_chain(&e))?;
        if let Err(why) = copy_from_kernel(shim.maps[id].kernel_fd, &handle) {
            eprintln!(
                "bpftime-shim: map {}: cannot copy its kernel contents: {why}",
                handle.name()
            );
        }
        shim.maps[id].segment_index = Some(index);
    }
    let source = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut manifest = Manifest::new(&object, &source, &shm.map_defs(), shm.identity());
    manifest.links = Some(Vec::new());
    // `load --grant/--grant-group -- APP`: other users' targets get the maps, as `load OBJ`
    // grants them (POSIX ACL entries on the segment, recorded in the manifest).
    let (uids, gids) = (
        ids_from_env("BPFTIME_SHIM_GRANT_UIDS"),
        ids_from_env("BPFTIME_SHIM_GRANT_GIDS"),
    );
    if !uids.is_empty() || !gids.is_empty() {
        shm.grant(&uids, &gids).map_err(|e| {
            format!(
                "granting access to the maps: {}",
                bpftime_abi::error_chain(&e)
            )
        })?;
        manifest.granted_uids = uids;
        manifest.granted_gids = gids;
    }
    manifest
        .publish(&dir)
        .map_err(|e| bpftime_abi::error_chain(&e))?;
    save_map_types(shim, &dir, &object, &shm, &members);
    notify_loader(&format!("sealed {object}"));
    shim.sealed = Some(Sealed {
        object,
        shm,
        dir,
        manifest,
        vm: vm_from_env(),
        watched: Arc::new(Mutex::new(Watched::default())),
        watcher_started: false,
    });
    for id in 0..shim.progs.len() {
        if shim.progs[id].open > 0 {
            publish_program(shim, id);
        }
    }
    // CGROUP_ARRAY slots set before sealing (a tool's `-c CGROUP` filter): by cgroup id.
    for &id in &members {
        let slots = std::mem::take(&mut shim.maps[id].cgroup_slots);
        let Some(index) = shim.maps[id].segment_index else {
            continue;
        };
        let sealed = shim.sealed.as_ref().expect("just sealed");
        if let Ok(map) = sealed.shm.map(index) {
            if let Some(cgroups) = map.as_cgroup_array() {
                for (slot, cgroup) in slots {
                    let _ = cgroups.set(slot, cgroup);
                }
            }
        }
    }
    // PROG_ARRAY slots set before sealing (libbpf fills them right after loading): the
    // segment's slots hold manifest indices.
    for &id in &members {
        let slots = std::mem::take(&mut shim.maps[id].prog_slots);
        let Some(index) = shim.maps[id].segment_index else {
            continue;
        };
        for (key, prog) in slots {
            publish_program(shim, prog);
            let Some(program) = shim.progs[prog].manifest_index else {
                eprintln!(
                    "bpftime-shim: {}: a PROG_ARRAY slot names program {}, which cannot run in \
                     user space; the slot stays empty",
                    shim.maps[id].name, shim.progs[prog].name
                );
                continue;
            };
            let sealed = shim.sealed.as_ref().expect("just sealed");
            if let Err(e) = sealed
                .shm
                .map(index)
                .and_then(|m| m.update(&key, &program.to_le_bytes(), 0))
            {
                eprintln!(
                    "bpftime-shim: {}: cannot set a PROG_ARRAY slot: {}",
                    shim.maps[id].name,
                    bpftime_abi::error_chain(&e)
                );
            }
        }
    }
    Ok(())
}

/// Saves the key and value types of the segment's maps from the application's BTF, where
/// `bpftime-rs maps` reads them (`maps-btf.json`, as `load OBJ` saves its object's): entries
/// are then also shown formatted, as bpftool shows them.
fn save_map_types(shim: &Shim, dir: &StateDir, object: &str, shm: &ShmObject, members: &[usize]) {
    use bpftime_runtime::object::btf::Btf;
    use bpftime_runtime::object::btf_format::{MapBtfInfo, MapTypes};
    let parsed: Vec<Option<Btf>> = shim
        .btfs
        .iter()
        .map(|b| Btf::parse(&b.bytes).ok())
        .collect();
    let mut info = MapBtfInfo::default();
    for (index, &id) in members.iter().enumerate() {
        let m = &shim.maps[id];
        let Some((btf, key_id, value_id)) = m.btf else {
            continue;
        };
        let Some(Some(btf)) = parsed.get(btf) else {
            continue;
        };
        // MAP_CREATE's type ids, 0 for none; libbpf's global-data maps have a DATASEC value
        // and no key type.
        let id = |t: u32| (t != 0).then_some(t);
        let global_data = key_id == 0 && value_id != 0;
        let types = MapTypes::from_btf(
            btf,
            id(key_id),
            id(value_id),
            global_data,
            m.key_size,
            m.value_size,
        );
        if let Ok(handle) = shm.map(index) {
            info.maps.insert(handle.name().to_string(), types);
        }
    }
    let path = bpftime_runtime::loaded::map_btf_path(dir, object);
    if let Err(e) =
        bpftime_runtime::state::fs::write_atomic(&path, info.to_json().as_bytes(), 0o644)
    {
        eprintln!(
            "bpftime-shim: cannot save map types to {}: {}",
            path.display(),
            bpftime_abi::error_chain(&e)
        );
    }
}

/// Comma-separated ids in the environment variable `name` (unset or empty: none).
fn ids_from_env(name: &str) -> Vec<u32> {
    std::env::var(name)
        .unwrap_or_default()
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// Tells `bpftime-rs load -- APP` (the descriptor it passed in `BPFTIME_SHIM_NOTIFY_FD`).
fn notify_loader(line: &str) {
    let Some(fd) = std::env::var("BPFTIME_SHIM_NOTIFY_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    let text = format!("{line}\n");
    // SAFETY: writes the bytes of a live string to a descriptor (a pipe the loader made; a
    // wrong number only fails the write).
    unsafe {
        raw::syscall3(
            libc::SYS_write,
            fd.into(),
            text.as_ptr() as i64,
            text.len() as i64,
        );
    }
}

/// Copies a kernel map's entries (what the application wrote before its first program:
/// `.rodata`, `.data`, preset values) into its shared map.
fn copy_from_kernel(kernel_fd: RawFd, map: &MapHandle) -> Result<(), String> {
    // SAFETY: the shim's private duplicate, open for as long as the record exists.
    let fd = unsafe { BorrowedFd::borrow_raw(kernel_fd) };
    let def = map.def().clone();
    let value_len = if def.map_type.is_percpu() {
        (def.value_size as usize).next_multiple_of(8) * map.ncpu() as usize
    } else {
        def.value_size as usize
    };
    let mut value = vec![0u8; value_len];
    if def.map_type.is_keyless()
        || matches!(
            def.map_type,
            MapType::ProgArray | MapType::StackTrace | MapType::BloomFilter | MapType::CgroupArray
        )
    {
        // Rings have no entries; queue contents and program slots (descriptors) are not
        // carried over; stacks come only from programs (none ran yet) and a bloom filter's
        // bits cannot be read back (the application may push before its programs run: those
        // values are not in user space's filter).
        return Ok(());
    }
    if !def.map_type.is_hash() {
        for i in 0..def.max_entries {
            let key = i.to_le_bytes();
            if abi_sys::map_lookup_elem(fd, &key, &mut value, 0).is_ok()
                && value.iter().any(|&b| b != 0)
            {
                map.update_percpu(&key, &value, 0)
                    .map_err(|e| bpftime_abi::error_chain(&e))?;
            }
        }
        return Ok(());
    }
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; def.key_size as usize];
    while abi_sys::map_get_next_key(fd, key.as_deref(), &mut next).is_ok() {
        if abi_sys::map_lookup_elem(fd, &next, &mut value, 0).is_ok() {
            map.update_percpu(&next, &value, 0)
                .map_err(|e| bpftime_abi::error_chain(&e))?;
        }
        key = Some(next.clone());
    }
    Ok(())
}

/// Publishes program `id` in the manifest if it is a uprobe program the runtime can run
/// (otherwise records why not), once the object is sealed.
pub(crate) fn publish_program(shim: &mut Shim, id: usize) {
    let Some(sealed) = shim.sealed.as_mut() else {
        return;
    };
    let prog = &shim.progs[id];
    if prog.manifest_index.is_some()
        || prog.unrunnable.is_some()
        || prog.prog_type != bpf::PROG_TYPE_KPROBE
    {
        return;
    }
    // Record indices -> segment indices.
    let mut bytes = prog.insns.clone();
    let mut why = None;
    bpf::for_each_lddw(&mut bytes, |i, src, imm| {
        if src != libbpf_sys::BPF_PSEUDO_MAP_FD && src != libbpf_sys::BPF_PSEUDO_MAP_VALUE {
            return;
        }
        let id = u32::from_le_bytes((&*imm).try_into().expect("4 bytes")) as usize;
        match shim.maps.get(id).and_then(|m| m.segment_index) {
            Some(index) => imm.copy_from_slice(&(index as u32).to_le_bytes()),
            None => {
                why.get_or_insert(format!(
                    "instruction {i} uses map {}, which is not in user space",
                    shim.maps.get(id).map_or("?", |m| m.name.as_str())
                ));
            }
        }
    });
    let name = prog.name.clone();
    let why = why.or_else(|| {
        check_program(&sealed.shm, &name, "uprobe", &bytes, sealed.vm)
            .err()
            .map(|e| bpftime_abi::error_chain(&e))
    });
    if let Some(why) = why {
        shim.progs[id].unrunnable = Some(why);
        return;
    }
    let index = sealed.manifest.programs.len() as u32;
    sealed.manifest.programs.push(ManifestProgram {
        index,
        name,
        section: "uprobe".into(),
        attach_target: String::new(),
        prog_type: bpf::PROG_TYPE_KPROBE,
        vm: vm_name(sealed.vm).to_string(),
        verified: true,
        insns: ManifestProgram::encode_insns(&bytes),
    });
    shim.progs[id].manifest_index = Some(index);
    write_manifest(sealed);
}

/// The links that are live now: an enabled uprobe event with a program through an open link
/// (which keeps the event alive, as the kernel's perf link holds the event: aya closes the
/// event's descriptor once linked) or, through PERF_EVENT_IOC_SET_BPF, while the event's
/// descriptor is open.
fn live_links(shim: &Shim) -> Vec<ManifestLink> {
    let mut out = Vec::new();
    let mut add = |event: usize, prog: usize, cookie: u64| {
        let e = &shim.events[event];
        let Some(program) = shim.progs[prog].manifest_index else {
            return;
        };
        if !e.enabled {
            return;
        }
        match bpftime_attach::symbols::target_at_file_offset(&e.path, e.file_offset) {
            Ok(target) => out.push(ManifestLink {
                program,
                retprobe: e.retprobe,
                target,
                pid: e.pid,
                cookie,
                ref_ctr_offset: e.ref_ctr_offset,
            }),
            Err(why) => eprintln!(
                "bpftime-shim: uprobe {}+{:#x}: {why}",
                e.path.display(),
                e.file_offset
            ),
        }
    };
    for l in shim.links.iter().filter(|l| l.open > 0 && !l.detached) {
        for &(event, cookie) in &l.targets {
            add(event, l.prog, cookie);
        }
    }
    for (i, e) in shim.events.iter().enumerate() {
        if let (Some(prog), true) = (e.ioctl_prog, e.open > 0) {
            add(i, prog, 0);
        }
    }
    out
}

/// Writes the manifest again if its links changed.
fn republish(shim: &mut Shim) {
    let links = live_links(shim);
    let Some(sealed) = shim.sealed.as_mut() else {
        return;
    };
    if sealed.manifest.links.as_ref() != Some(&links) {
        sealed.manifest.links = Some(links);
        write_manifest(sealed);
    }
}

/// Replaces the published manifest with `sealed`'s (agents follow its generation).
fn write_manifest(sealed: &mut Sealed) {
    if let Err(e) = sealed.manifest.publish(&sealed.dir) {
        eprintln!(
            "bpftime-shim: cannot publish {}: {}",
            sealed.object,
            bpftime_abi::error_chain(&e)
        );
    }
}

/// Links, events or programs changed: the agents' view is brought up to date.
pub(crate) fn links_changed() {
    table::with(republish);
}

/// The watcher of the sealed object, started on first use.
fn watched(shim: &mut Shim) -> Option<Arc<Mutex<Watched>>> {
    let sealed = shim.sealed.as_mut()?;
    if !sealed.watcher_started {
        let watched = Arc::clone(&sealed.watched);
        let spawned = std::thread::Builder::new()
            .name("bpftime-shim-rings".into())
            .spawn(move || watch(&watched));
        if spawned.is_err() {
            eprintln!(
                "bpftime-shim: cannot start the ring watcher: epoll on rings and perf buffers \
                 never wakes"
            );
        }
        sealed.watcher_started = true;
    }
    Some(Arc::clone(&sealed.watched))
}

/// The eventfd standing for `ring`'s readiness (created on first use).
pub(crate) fn ring_readiness(ring: MapHandle) -> Option<RawFd> {
    let watched = table::with(watched)?;
    let mut w = watched.lock();
    if let Some(r) = w.rings.iter().find(|r| r.map.name() == ring.name()) {
        return Some(r.eventfd);
    }
    let fd = raw::eventfd(true);
    if fd < 0 {
        return None;
    }
    w.rings.push(RingWatch {
        map: ring,
        eventfd: fd as RawFd,
        signalled: false,
    });
    Some(fd as RawFd)
}

/// Whether BPF_OUTPUT events are the shim's: the sealed object holds a PERF_EVENT_ARRAY in
/// user space (its programs' perf output arrives only there).
pub(crate) fn serves_perf_buffers() -> bool {
    table::with(|s| {
        ensure_sealed(s);
        s.sealed.as_ref().is_some_and(|sealed| {
            sealed
                .shm
                .maps()
                .iter()
                .any(|m| m.map_type() == MapType::PerfEventArray)
        })
    })
}

/// Whether the application's object is sealed (its maps are the user-space ones).
pub(crate) fn object_sealed() -> bool {
    table::with(|s| s.sealed.is_some())
}

/// `MAP_UPDATE_ELEM` of a perf event descriptor into a shared PERF_EVENT_ARRAY: that CPU's
/// records go to the event's ring.
pub(crate) fn bind_perf_buffer(map: &MapHandle, key: &[u8], value: &[u8]) -> Result<(), i64> {
    let index = u32::from_le_bytes(key.try_into().map_err(|_| -i64::from(libc::EINVAL))?);
    let fd = i32::from_le_bytes(
        value
            .get(..4)
            .and_then(|v| v.try_into().ok())
            .ok_or(-i64::from(libc::EINVAL))?,
    );
    if index >= map.def().max_entries {
        return Err(-i64::from(libc::E2BIG));
    }
    table::with(|s| {
        let id = s.perfbuf_of(fd).ok_or(-i64::from(libc::EBADF))?;
        let out = PerfOut::new(index, &s.perfbufs[id]).ok_or_else(|| {
            eprintln!(
                "bpftime-shim: perf event {fd} stored in {} before it was mapped: not served; \
                 failing with EINVAL",
                map.name()
            );
            -i64::from(libc::EINVAL)
        })?;
        let watched = watched(s).ok_or(-i64::from(libc::EINVAL))?;
        let mut w = watched.lock();
        let pump = match w.perf.iter().position(|p| p.map.name() == map.name()) {
            Some(i) => &mut w.perf[i],
            None => {
                let pump = PerfPump::new(map.clone()).ok_or(-i64::from(libc::EINVAL))?;
                w.perf.push(pump);
                w.perf.last_mut().expect("just pushed")
            }
        };
        pump.outs.retain(|o| o.key != index);
        pump.outs.push(out);
        Ok(())
    })
}

/// `MAP_DELETE_ELEM` of a shared PERF_EVENT_ARRAY slot.
pub(crate) fn unbind_perf_buffer(map: &MapHandle, key: &[u8]) -> Result<(), i64> {
    let index = u32::from_le_bytes(key.try_into().map_err(|_| -i64::from(libc::EINVAL))?);
    let watched = table::with(|s| Some(Arc::clone(&s.sealed.as_ref()?.watched)));
    let mut found = false;
    if let Some(watched) = watched {
        for pump in watched
            .lock()
            .perf
            .iter_mut()
            .filter(|p| p.map.name() == map.name())
        {
            let before = pump.outs.len();
            pump.outs.retain(|o| o.key != index);
            found |= pump.outs.len() != before;
        }
    }
    if found {
        Ok(())
    } else {
        Err(-i64::from(libc::ENOENT))
    }
}

/// The last descriptor of perf buffer event `id` was closed: its ring is no longer filled and
/// its readiness eventfd goes (which takes it out of the application's epoll).
pub(crate) fn perfbuf_closed(shim: &mut Shim, id: usize) {
    let memfd = shim.perfbufs[id].memfd;
    if let Some(sealed) = shim.sealed.as_ref() {
        for pump in sealed.watched.lock().perf.iter_mut() {
            pump.outs.retain(|o| o.memfd != memfd);
        }
    }
    raw::close(shim.perfbufs[id].eventfd);
}

/// Keeps each watched ring's eventfd readable exactly while the ring holds records, and moves
/// perf records into the application's perf buffers. A producer in another process cannot
/// reach this process's epoll: when nothing waits, the watcher sleeps on the map's wake word
/// (`MapHandle::wait_for_records`: the next commit wakes it, as the kernel's
/// `bpf_ringbuf_commit` wakes a ring's waiters), or, watching several maps, polls every
/// millisecond; while records wait for the application, every 100 µs.
fn watch(watched: &Mutex<Watched>) {
    // This thread's own calls (sleep, eventfd reads/writes) never come back into the shim.
    let _busy = crate::Busy::enter();
    loop {
        let mut any = false;
        let only: Option<MapHandle> = {
            let mut w = watched.lock();
            for r in w.rings.iter_mut() {
                let pending = r.map.as_ringbuf().is_some_and(|rb| rb.pending() > 0);
                any |= pending;
                if pending && !r.signalled {
                    raw::eventfd_signal(r.eventfd);
                    r.signalled = true;
                } else if !pending && r.signalled {
                    raw::eventfd_clear(r.eventfd);
                    r.signalled = false;
                }
            }
            for pump in w.perf.iter_mut() {
                any |= pump.pump() > 0;
            }
            match (w.rings.as_slice(), w.perf.as_slice()) {
                ([r], []) => Some(r.map.clone()),
                ([], [p]) => Some(p.map.clone()),
                _ => None,
            }
        };
        match (any, only) {
            (true, _) => std::thread::sleep(Duration::from_micros(100)),
            (false, Some(map)) => map.wait_for_records(Duration::from_millis(50)),
            (false, None) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}
