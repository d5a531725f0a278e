use anyhow::{Context, Result};
use bpftime_kernel_bridge::mirror::{list_pinned, Mirror};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct MapsArgs {
    /// bpftool-style JSON with every entry.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &MapsArgs) -> Result<()> {
    let mirrors = list_pinned().context("listing kernel mirror maps")?;
    if args.json {
        let maps = mirrors
            .iter()
            .map(mirror_json)
            .collect::<Result<Vec<_>>>()?;
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "maps": maps }))?
        );
        return Ok(());
    }
    println!(
        "{:<32} {:<16} {:>4} {:>6} {:>8} {:>8} {:>8}  PIN",
        "NAME", "TYPE", "KEY", "VALUE", "MAX", "USER", "KERNEL"
    );
    for mirror in &mirrors {
        let desc = mirror.desc();
        let kernel_entries = mirror.key_count();
        println!(
            "{:<32} {:<16} {:>4} {:>6} {:>8} {:>8} {:>8}  {}",
            format!("{}/{}", desc.object, desc.name),
            desc.kind.name(),
            desc.key_size,
            desc.value_size,
            desc.max_entries,
            "-",
            kernel_entries,
            desc.pin_path().display()
        );
    }
    Ok(())
}

/// bpftool's byte-array convention: `["0x01", "0x00", ...]`.
fn hex_bytes(bytes: &[u8]) -> Value {
    Value::Array(bytes.iter().map(|b| json!(format!("0x{b:02x}"))).collect())
}

fn mirror_json(mirror: &Mirror) -> Result<Value> {
    let desc = mirror.desc();
    let entries = mirror
        .entries()
        .with_context(|| format!("reading {}", desc.pin_path().display()))?
        .iter()
        .map(|entry| {
            if desc.kind.is_percpu() {
                let values: Vec<Value> = entry
                    .values
                    .iter()
                    .enumerate()
                    .map(|(cpu, v)| json!({ "cpu": cpu, "value": hex_bytes(v) }))
                    .collect();
                json!({ "key": hex_bytes(&entry.key), "values": values })
            } else {
                json!({ "key": hex_bytes(&entry.key), "value": hex_bytes(&entry.values[0]) })
            }
        })
        .collect::<Vec<_>>();
    Ok(json!({
        "name": desc.name,
        "object": desc.object,
        "type": desc.kind.name(),
        "key_size": desc.key_size,
        "value_size": desc.value_size,
        "max_entries": desc.max_entries,
        "pinned": desc.pin_path(),
        "entries": entries,
        "sync": Value::Null,
    }))
}
