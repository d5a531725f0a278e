//! `libbpf_rs_uprobe_tool`: uprobe_tool.c written on libbpf-rs without a generated skeleton, as
//! an ordinary libbpf-rs user would: it opens the same `uprobe_tool.bpf.o`, sets `min_arg` in
//! the open object's `.rodata` initial value (at the offset the object's BTF gives), loads it,
//! attaches `on_entry` as a uprobe and `on_return` as a uretprobe to a function or file offset
//! of a binary, prints every ring buffer event (`RingBuffer::poll`, libbpf's epoll loop), then
//! the `hist` map (walked from user space) and the `.bss` counters. Same options and output as
//! uprobe_tool.c; run it with `-h`.

use std::cell::Cell;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bpftime_example_libbpf_apps::cli::{self, Options, Target};
use bpftime_example_libbpf_apps::object_path;
use libbpf_rs::btf::types::{DataSec, Var};
use libbpf_rs::{
    AsRawLibbpf, Btf, ErrorKind, Map, MapCore, MapFlags, Object, ObjectBuilder, OpenObject,
    PrintLevel, RingBufferBuilder, UprobeOpts,
};

const PROG: &str = "libbpf_rs_uprobe_tool";

fn main() -> ExitCode {
    cli::main(PROG, run)
}

/// libbpf's messages under `-v` (warnings and information; no debug), as uprobe_tool.c's
/// print callback.
fn print_libbpf(_level: PrintLevel, message: String) {
    eprint!("{message}");
}

/// Runs the tool; an error is reported by `main` (exit 1), a timeout is reported here and also
/// exits 1, after the maps are printed, as in uprobe_tool.c.
fn run(options: &Options) -> Result<ExitCode> {
    cli::install_stop_handler().context("installing the signal handlers")?;
    // libbpf-rs prints libbpf's information messages unless told otherwise.
    libbpf_rs::set_print(
        options
            .verbose
            .then_some((PrintLevel::Info, print_libbpf as libbpf_rs::PrintCallback)),
    );

    let path = object_path();
    let mut open = ObjectBuilder::default()
        .open_file(&path)
        .with_context(|| format!("opening the BPF object {}", path.display()))?;
    set_rodata_u64(&mut open, "min_arg", options.min_arg)?;
    if options.multi {
        // uprobe_multi links need programs loaded for that attach type (SEC("uprobe.multi")).
        for mut program in open.progs_mut() {
            program.set_attach_type(libbpf_rs::ProgramAttachType::TraceUprobeMulti);
        }
    }
    let object = open.load().context("loading the BPF object")?;

    // The links detach when dropped: keep them to the end.
    let _on_entry = attach(&object, "on_entry", false, options)?;
    let _on_return = attach(&object, "on_return", true, options)?;

    let events = find_map(&object, |name| name == "events")?;
    // The callback counts what it printed; the poll loop reads the count.
    let received = Cell::new(0u64);
    let mut builder = RingBufferBuilder::new();
    builder
        .add(&events, |record: &[u8]| {
            match cli::event_line(record) {
                Ok(line) => println!("{line}"),
                Err(why) => eprintln!("{PROG}: {why}"),
            }
            received.set(received.get() + 1);
            0
        })
        .context("adding `events` to the ring buffer reader")?;
    let ring = builder.build().context("creating the ring buffer reader")?;
    println!("attached");

    let mut timed_out = false;
    let deadline = Instant::now().checked_add(options.duration);
    while !cli::stop_requested() && (options.max_events == 0 || received.get() < options.max_events)
    {
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            if options.max_events != 0 {
                eprintln!(
                    "{PROG}: timed out after {} of {} events",
                    received.get(),
                    options.max_events
                );
                timed_out = true;
            }
            break;
        }
        match ring.poll(cli::POLL_TIMEOUT) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("polling the ring buffer"),
        }
    }
    drop(ring);

    let hist = print_hist(&object);
    let [entries, returns] = bss_counters(&object)?;
    println!("{}", cli::bss_line(entries, returns));
    hist?;
    Ok(if timed_out {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Attaches program `name` to the binary of `options`: a uprobe, or a uretprobe
/// when `retprobe`. By function name libbpf resolves the symbol (`func_name`, offset 0); by
/// offset there is no `func_name` and the offset is the file offset.
fn attach(
    object: &Object,
    name: &str,
    retprobe: bool,
    options: &Options,
) -> Result<libbpf_rs::Link> {
    let program = object
        .progs_mut()
        .find(|p| p.name() == name)
        .with_context(|| format!("the object has no program `{name}`"))?;
    let binary = &options.binary;
    let (offset, func_name, at) = match &options.target {
        Target::Function(func) => (
            0,
            Some(func.clone()),
            format!("{}:{func}", binary.display()),
        ),
        Target::Offset(offset) => (
            usize::try_from(*offset).with_context(|| format!("offset {offset:#x} is too large"))?,
            None,
            format!("{}+{offset:#x}", binary.display()),
        ),
    };
    if options.multi {
        let opts = libbpf_rs::UprobeMultiOpts {
            offsets: if func_name.is_none() {
                vec![offset]
            } else {
                Vec::new()
            },
            retprobe,
            ..Default::default()
        };
        return program
            .attach_uprobe_multi_with_opts(
                options.pid,
                binary,
                func_name.as_deref().unwrap_or(""),
                opts,
            )
            .with_context(|| format!("attaching {name} to {at} (uprobe_multi)"));
    }
    let opts = UprobeOpts {
        retprobe,
        func_name,
        ..Default::default()
    };
    program
        .attach_uprobe_with_opts(options.pid, binary, offset, opts)
        .with_context(|| format!("attaching {name} to {at}"))
}

/// Writes `value` over the `u64` global `var` in the open object's `.rodata` initial value,
/// at the offset the `.rodata` DATASEC of the object's BTF gives it (what a generated
/// skeleton's `rodata` struct encodes).
fn set_rodata_u64(open: &mut OpenObject, var: &str, value: u64) -> Result<()> {
    let (offset, size) = {
        // SAFETY: `open` owns a valid bpf_object for as long as this borrow of it lives, and
        // the BTF borrowed from it is dropped at the end of this block.
        let object = unsafe { open.as_libbpf_object().as_ref() };
        let btf = Btf::from_bpf_object(object)
            .context("reading the object's BTF")?
            .context("the object has no BTF")?;
        var_in_section(&btf, ".rodata", var)?
    };
    if size != size_of::<u64>() {
        bail!("`{var}` is {size} bytes, not a u64");
    }
    let mut map = open
        .maps_mut()
        .find(|m| m.name().to_string_lossy().ends_with(".rodata"))
        .context("the object has no .rodata map")?;
    let data = map
        .initial_value_mut()
        .context("the .rodata map has no initial value")?;
    let slot = data
        .get_mut(offset..offset + size)
        .with_context(|| format!("`{var}` at {offset}+{size} is outside .rodata"))?;
    slot.copy_from_slice(&value.to_ne_bytes());
    Ok(())
}

/// The loaded object's map whose name satisfies `wanted`.
fn find_map<'obj>(object: &'obj Object, wanted: impl Fn(&str) -> bool) -> Result<Map<'obj>> {
    let mut names = Vec::new();
    for map in object.maps() {
        let name = map.name().to_string_lossy().into_owned();
        if wanted(&name) {
            return Ok(map);
        }
        names.push(name);
    }
    bail!("no such map among {names:?}")
}

/// Prints `hist K V` for every key of the `hist` map, sorted: the keys by walking the map
/// (`MapCore::keys`, `BPF_MAP_GET_NEXT_KEY`), then a lookup of each.
fn print_hist(object: &Object) -> Result<()> {
    let hist = find_map(object, |name| name == "hist").context("finding `hist`")?;
    let mut keys = Vec::new();
    for key in hist.keys() {
        if keys.len() == cli::MAX_HIST {
            bail!("more than {} hist keys", cli::MAX_HIST);
        }
        let key: [u8; 4] = key
            .as_slice()
            .try_into()
            .with_context(|| format!("hist key of {} bytes", key.len()))?;
        keys.push(u32::from_ne_bytes(key));
    }
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        let value = hist
            .lookup(&key.to_ne_bytes(), MapFlags::ANY)
            .with_context(|| format!("looking up hist key {key}"))?
            .with_context(|| format!("hist key {key} vanished"))?;
        let value: [u8; 8] = value
            .as_slice()
            .try_into()
            .with_context(|| format!("hist value of {} bytes", value.len()))?;
        entries.push((key, u64::from_ne_bytes(value)));
    }
    print!("{}", cli::hist_lines(entries));
    Ok(())
}

/// The `.bss` counters `[entries, returns]`: element 0 of the map whose name ends in `.bss`
/// (libbpf names it after the object, `uprobe_.bss`), the section as one value, read at the
/// offsets its BTF gives.
fn bss_counters(object: &Object) -> Result<[u64; 2]> {
    let bss = find_map(object, |name| name.ends_with(".bss")).context("finding .bss")?;
    let value = bss
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .context("looking up .bss")?
        .context(".bss has no element 0")?;
    let btf = object
        .btf()
        .context("reading the object's BTF")?
        .context("the object has no BTF")?;
    let mut counters = [0u64; 2];
    for (slot, var) in counters.iter_mut().zip(["entries", "returns"]) {
        let (at, size) = var_in_section(&btf, ".bss", var)?;
        let bytes: [u8; 8] = value
            .get(at..at + size)
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("`{var}` ({size} bytes at {at}) is no u64 inside .bss"))?;
        *slot = u64::from_ne_bytes(bytes);
    }
    Ok(counters)
}

/// The offset and size of global `var` in data section `section` (`.rodata`, `.bss`), from
/// the section's DATASEC in `btf`.
fn var_in_section(btf: &Btf<'_>, section: &str, var: &str) -> Result<(usize, usize)> {
    let datasec: DataSec<'_> = btf
        .type_by_name(section)
        .with_context(|| format!("the object's BTF has no {section} section"))?;
    (0..datasec.len())
        .filter_map(|i| datasec.get(i))
        .find(|info| {
            btf.type_by_id::<Var<'_>>(info.ty)
                .and_then(|v| v.name())
                .is_some_and(|n| n == var)
        })
        .map(|info| (info.offset as usize, info.size))
        .with_context(|| format!("no variable `{var}` in {section}"))
}
