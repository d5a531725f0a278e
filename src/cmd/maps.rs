//! `bpftime-rs maps`: one row per map, joining the userspace (shared-memory) side, the kernel
//! mirror and the sync counters.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bpftime_abi::ErrorChain;
use bpftime_kernel_bridge::mirror::{list_pinned, pin_path, Mirror};
use bpftime_runtime::loaded::map_btf_path;
use bpftime_runtime::maps::{EntryValue, MapHandle, ShmObject};
use bpftime_runtime::object::btf_format::MapBtfInfo;
use serde_json::{json, Value};

use super::objects::{trusted_objects, warn_skipped};

#[derive(clap::Args)]
pub struct MapsArgs {
    /// bpftool-style JSON with every entry.
    #[arg(long)]
    json: bool,
    /// Compare userspace and kernel contents of MAP (`name` or `object/name`) entry by entry.
    #[arg(long, value_name = "MAP")]
    diff: Option<String>,
    /// Wait until every synced map's forwarder is idle with nothing pending or unsynced (the
    /// kernel mirrors hold what userspace holds), at most SECONDS; exits 1 on timeout naming the
    /// maps still behind.
    #[arg(long, value_name = "SECONDS", conflicts_with_all = ["json", "diff"])]
    wait_synced: Option<f64>,
}

/// One map as the table shows it: a userspace side, a kernel mirror, or both.
struct Row {
    object: String,
    name: String,
    user: Option<MapHandle>,
    mirror: Option<Mirror>,
    /// Where the loader saved the BTF of the object's maps, and whose file it is.
    btf: Option<(PathBuf, u32)>,
}

impl Row {
    fn full_name(&self) -> String {
        format!("{}/{}", self.object, self.name)
    }

    fn shape(&self) -> (String, u32, u32, u32) {
        if let Some(user) = &self.user {
            let def = user.def();
            (
                def.map_type.name().to_string(),
                def.key_size,
                def.value_size,
                def.max_entries,
            )
        } else {
            let desc = self.mirror.as_ref().expect("a row has a side").desc();
            (
                desc.kind.name().to_string(),
                desc.key_size,
                desc.value_size,
                desc.max_entries,
            )
        }
    }

    /// The forwarder's counters, when a forwarder has ever synced this map.
    fn sync(&self) -> Option<SyncView> {
        let r = self.user.as_ref()?.sync_report()?;
        Some(SyncView {
            changes_seen: r.changes_seen,
            sent: r.sent,
            confirmed: r.confirmed,
            failed: r.failed,
            pending: r.pending,
            oldest_pending_ns: r.oldest_pending_ns,
            forwarder_pid: r.forwarder_pid,
            forwarder_alive: process_alive(r.forwarder_pid as i32),
            resyncs: r.resyncs,
            sweeps: r.sweeps,
            sweep_fixes: r.sweep_fixes,
            unsynced: r.unsynced,
            idle: r.idle,
            in_sync: r.idle && r.pending == 0 && r.unsynced == 0,
        })
    }
}

#[derive(serde::Serialize)]
struct SyncView {
    changes_seen: u64,
    sent: u64,
    confirmed: u64,
    failed: u64,
    pending: u64,
    oldest_pending_ns: u64,
    forwarder_pid: u64,
    forwarder_alive: bool,
    resyncs: u64,
    sweeps: u64,
    sweep_fixes: u64,
    unsynced: u64,
    idle: bool,
    /// The forwarder is idle with nothing pending and nothing known to differ.
    in_sync: bool,
}

impl SyncView {
    /// The table's STATE: never "in-sync" while anything is unconfirmed or known to differ.
    fn state(&self) -> &'static str {
        if !self.forwarder_alive {
            "stopped"
        } else if self.in_sync {
            "in-sync"
        } else if self.unsynced > 0 {
            "behind"
        } else {
            "syncing"
        }
    }
}

fn process_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Every map bpftime-rs knows: shared-memory objects first (with their mirrors), then mirrors
/// whose object has no userspace side (e.g. the bridge selftest).
fn rows() -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut mirrors: BTreeMap<PathBuf, Mirror> = list_pinned()
        .context("listing kernel mirror maps")?
        .into_iter()
        .map(|m| (m.desc().pin_path(), m))
        .collect();
    let (found, skipped) = trusted_objects();
    warn_skipped(&skipped);
    for object in found {
        let manifest = &object.manifest;
        let name = &manifest.object;
        let shm = match ShmObject::open_expect(name, &manifest.segment, &manifest.map_defs()) {
            Ok(shm) => shm,
            Err(e) => {
                eprintln!(
                    "bpftime-rs: skipping the maps of {name}: {}",
                    ErrorChain(&e)
                );
                continue;
            }
        };
        let btf = Some((map_btf_path(&object.dir, name), object.dir.uid()));
        for user in shm.maps() {
            let map = user.name().to_string();
            let mirror = mirrors.remove(&pin_path(name, &map));
            rows.push(Row {
                object: name.clone(),
                name: map,
                user: Some(user),
                mirror,
                btf: btf.clone(),
            });
        }
    }
    for (_, mirror) in mirrors {
        rows.push(Row {
            object: mirror.desc().object.clone(),
            name: mirror.desc().name.clone(),
            user: None,
            mirror: Some(mirror),
            btf: None,
        });
    }
    Ok(rows)
}

pub fn run(args: &MapsArgs) -> Result<()> {
    let rows = rows()?;
    if let Some(seconds) = args.wait_synced {
        return wait_synced(&rows, std::time::Duration::from_secs_f64(seconds));
    }
    if let Some(target) = &args.diff {
        return diff(&rows, target);
    }
    if args.json {
        // One BTF description file per object, not one read per map.
        let mut btf: BTreeMap<&str, Option<MapBtfInfo>> = BTreeMap::new();
        for row in &rows {
            btf.entry(row.object.as_str()).or_insert_with(|| {
                let (path, owner) = row.btf.as_ref()?;
                MapBtfInfo::load(path, *owner).ok()
            });
        }
        let maps = rows
            .iter()
            .map(|row| row_json(row, btf[row.object.as_str()].as_ref()))
            .collect::<Result<Vec<_>>>()?;
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "maps": maps }))?
        );
        return Ok(());
    }
    println!(
        "{:<32} {:<16} {:>4} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>7} {:>9} {:<8}  PIN",
        "NAME",
        "TYPE",
        "KEY",
        "VALUE",
        "MAX",
        "USER",
        "KERNEL",
        "SENT",
        "CONFIRMED",
        "FAILED",
        "PENDING",
        "OLDEST",
        "STATE"
    );
    for row in &rows {
        let (kind, key, value, max) = row.shape();
        let user = row
            .user
            .as_ref()
            .map_or("-".to_string(), |u| u.len().to_string());
        let kernel = row
            .mirror
            .as_ref()
            .map_or("-".to_string(), |m| m.key_count().to_string());
        let pin = row.mirror.as_ref().map_or("-".to_string(), |m| {
            m.desc().pin_path().display().to_string()
        });
        let dash = || "-".to_string();
        let (sent, confirmed, failed, pending, oldest, state) = match row.sync() {
            Some(s) => (
                s.sent.to_string(),
                s.confirmed.to_string(),
                s.failed.to_string(),
                s.pending.to_string(),
                format!(
                    "{:.1?}",
                    std::time::Duration::from_nanos(s.oldest_pending_ns)
                ),
                s.state().to_string(),
            ),
            None => (dash(), dash(), dash(), dash(), dash(), dash()),
        };
        println!(
            "{:<32} {:<16} {:>4} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>7} {:>9} {:<8}  {}",
            row.full_name(),
            kind,
            key,
            value,
            max,
            user,
            kernel,
            sent,
            confirmed,
            failed,
            pending,
            oldest,
            state,
            pin
        );
    }
    Ok(())
}

/// bpftool's byte-array convention: `["0x01", "0x00", ...]`.
fn hex_bytes(bytes: &[u8]) -> Value {
    Value::Array(bytes.iter().map(|b| json!(format!("0x{b:02x}"))).collect())
}

fn entry_json(key: &[u8], values: &[Vec<u8>], per_cpu: bool) -> Value {
    if per_cpu {
        let values: Vec<Value> = values
            .iter()
            .enumerate()
            .map(|(cpu, v)| json!({ "cpu": cpu, "value": hex_bytes(v) }))
            .collect();
        json!({ "key": hex_bytes(key), "values": values })
    } else {
        json!({ "key": hex_bytes(key), "value": hex_bytes(&values[0]) })
    }
}

fn user_entries(user: &MapHandle) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    user.iter()
        .into_iter()
        .map(|e| {
            let values = match e.value {
                EntryValue::Single(v) => vec![v],
                EntryValue::PerCpu(v) => v,
            };
            (e.key, values)
        })
        .collect()
}

/// Adds bpftool's `formatted` object when the loader saved the map's BTF types (per-CPU maps:
/// one formatted value per CPU).
fn with_formatted(
    mut entry: Value,
    btf: Option<&MapBtfInfo>,
    map: &str,
    key: &[u8],
    values: &[Vec<u8>],
    per_cpu: bool,
) -> Value {
    let Some(btf) = btf else {
        return entry;
    };
    let parts: Vec<Value> = values
        .iter()
        .filter_map(|v| btf.format_entry(map, key, v))
        .collect();
    if parts.len() != values.len() || parts.is_empty() {
        return entry;
    }
    entry["formatted"] = if per_cpu {
        let values: Vec<Value> = parts
            .iter()
            .enumerate()
            .map(|(cpu, p)| json!({ "cpu": cpu, "value": p["value"] }))
            .collect();
        json!({ "key": parts[0]["key"], "values": values })
    } else {
        parts[0].clone()
    };
    entry
}

fn row_json(row: &Row, btf: Option<&MapBtfInfo>) -> Result<Value> {
    let (kind, key_size, value_size, max_entries) = row.shape();
    let per_cpu = kind.contains("percpu");
    let entries: Vec<Value> = match (&row.user, &row.mirror) {
        (Some(user), _) => user_entries(user)
            .iter()
            .map(|(k, v)| with_formatted(entry_json(k, v, per_cpu), btf, &row.name, k, v, per_cpu))
            .collect(),
        (None, Some(mirror)) => mirror
            .entries()
            .with_context(|| format!("reading {}", mirror.desc().pin_path().display()))?
            .iter()
            .map(|e| entry_json(&e.key, &e.values, per_cpu))
            .collect(),
        (None, None) => Vec::new(),
    };
    Ok(json!({
        "name": row.name,
        "object": row.object,
        "type": kind,
        "key_size": key_size,
        "value_size": value_size,
        "max_entries": max_entries,
        "pinned": row.mirror.as_ref().map(|m| m.desc().pin_path()),
        "userspace": row.user.is_some(),
        "entries": entries,
        "kernel_entries": row.mirror.as_ref().map(|m| m.key_count()),
        "sync": row.sync(),
    }))
}

/// Why a synced map is not in sync yet, `None` when it is.
fn behind(row: &Row, since_unix_ns: u64) -> Option<String> {
    let user = row.user.as_ref()?;
    let report = user.sync_report()?;
    if !process_alive(report.forwarder_pid as i32) {
        return Some(format!(
            "its forwarder (pid {}) is gone",
            report.forwarder_pid
        ));
    }
    if report.last_pass_unix_ns < since_unix_ns {
        return Some("no forwarder pass since the wait began".into());
    }
    if user.has_changes() {
        return Some("changes not yet read by the forwarder".into());
    }
    if report.pending > 0 || report.unsynced > 0 || !report.idle {
        return Some(format!(
            "{} pending, {} unsynced{}",
            report.pending,
            report.unsynced,
            if report.idle { "" } else { ", forwarder busy" }
        ));
    }
    None
}

fn wait_synced(rows: &[Row], timeout: std::time::Duration) -> Result<()> {
    let unix_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    let since = unix_ns();
    let deadline = std::time::Instant::now() + timeout;
    let synced: Vec<&Row> = rows
        .iter()
        .filter(|r| r.user.as_ref().is_some_and(|u| u.sync_report().is_some()))
        .collect();
    loop {
        let late: Vec<String> = synced
            .iter()
            .filter_map(|r| behind(r, since).map(|why| format!("{}: {why}", r.full_name())))
            .collect();
        if late.is_empty() {
            println!("{} synced map(s) in sync", synced.len());
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("not in sync after {timeout:?}: {}", late.join("; "));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn diff(rows: &[Row], target: &str) -> Result<()> {
    let row = rows
        .iter()
        .find(|r| r.full_name() == target || r.name == target)
        .with_context(|| format!("no map named {target}; `bpftime-rs maps` lists them"))?;
    let (Some(user), Some(mirror)) = (&row.user, &row.mirror) else {
        bail!(
            "map {} has no {} side to compare",
            row.full_name(),
            if row.user.is_none() {
                "userspace"
            } else {
                "kernel"
            }
        );
    };
    let user: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = user_entries(user).into_iter().collect();
    let kernel: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = mirror
        .entries()
        .context("reading the kernel mirror")?
        .into_iter()
        .map(|e| (e.key, e.values))
        .collect();
    let (mut equal, mut differ) = (0, 0);
    for (key, value) in &user {
        match kernel.get(key) {
            Some(k) if k == value => equal += 1,
            Some(k) => {
                differ += 1;
                println!("differs      key {key:02x?}: userspace {value:02x?} kernel {k:02x?}");
            }
            None => {
                differ += 1;
                println!("only in userspace  key {key:02x?}: {value:02x?}");
            }
        }
    }
    for (key, value) in &kernel {
        if !user.contains_key(key) {
            differ += 1;
            println!("only in kernel     key {key:02x?}: {value:02x?}");
        }
    }
    println!("{}: {equal} equal, {differ} different", row.full_name());
    if differ > 0 {
        std::process::exit(2);
    }
    Ok(())
}
