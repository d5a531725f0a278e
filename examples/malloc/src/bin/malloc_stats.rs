//! `malloc-stats [OBJECT] [--interval-ms MS] [--count N]`: decodes the maps of a loaded
//! malloc.bpf.o (shared memory segment OBJECT, default `malloc`) every MS milliseconds: calls and
//! bytes per process, and the latency histogram. `bpftime-rs maps --json` shows the same entries
//! as raw bytes.

use anyhow::{Context, Result};
use bpftime_example_malloc::MallocMaps;
use bpftime_runtime::maps::ShmObject;

fn main() -> Result<()> {
    let mut object = "malloc".to_string();
    let (mut interval_ms, mut count) = (1000u64, 1u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--interval-ms" => interval_ms = args.next().context("--interval-ms MS")?.parse()?,
            "--count" => count = args.next().context("--count N")?.parse()?,
            _ => object = arg,
        }
    }
    let shm = ShmObject::open(&object)
        .map_err(|e| anyhow::anyhow!("{object}: {e}; is it loaded (`bpftime-rs load`)?"))?;
    for round in 0..count {
        if round > 0 {
            std::thread::sleep(std::time::Duration::from_millis(interval_ms));
        }
        let maps = MallocMaps::from_shm(&shm)?;
        println!("{:>8} {:>12} {:>16} {:>10}", "PID", "CALLS", "BYTES", "AVG");
        for (pid, (calls, bytes)) in &maps.stats {
            println!(
                "{pid:>8} {calls:>12} {bytes:>16} {:>10}",
                bytes / (*calls).max(1)
            );
        }
        let total: u64 = maps.latency_ns.iter().sum();
        println!("malloc latency (log2 ns buckets), {total} returns:");
        for (slot, n) in maps.latency_ns.iter().enumerate().filter(|(_, n)| **n > 0) {
            let bar = (n * 40 / total.max(1)) as usize;
            println!(
                "  {:>8} .. {:<8} {n:>10} {}",
                1u64 << slot,
                (1u64 << (slot + 1)) - 1,
                "#".repeat(bar)
            );
        }
        println!();
    }
    Ok(())
}
