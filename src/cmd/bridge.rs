use anyhow::{bail, Context, Result};
use bpftime_kernel_bridge::selftest::{self, SelftestOptions};

#[derive(clap::Args)]
pub struct SelftestArgs {
    /// How many updates and deletes to send.
    #[arg(long, default_value_t = 100_000)]
    updates: u64,
    /// One confirmation per update instead of one per drained batch plus one per failure.
    #[arg(long)]
    confirm_each: bool,
    /// Seed of the deterministic update stream.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn selftest(args: &SelftestArgs) -> Result<()> {
    let report = selftest::run(&SelftestOptions {
        updates: args.updates,
        confirm_each: args.confirm_each,
        seed: args.seed,
    })
    .context("bridge selftest")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let c = &report.counters;
        println!(
            "mode: {}",
            if args.confirm_each {
                "confirm each update"
            } else {
                "confirm per batch + failures"
            }
        );
        println!(
            "{:<16} {:<13} {:>9} {:>9}  PIN",
            "MAP", "TYPE", "EXPECTED", "KERNEL"
        );
        for map in &report.maps {
            println!(
                "{:<16} {:<13} {:>9} {:>9}  {}",
                map.name, map.kind, map.expected_entries, map.kernel_entries, map.pin
            );
        }
        let mut failures: Vec<_> = report.expected_failures.iter().collect();
        failures.sort();
        println!(
            "sent {}  confirmed {}  failed {}  lost {}  pending {}",
            c.sent, c.applied, c.failed, report.lost, c.pending
        );
        println!(
            "expected failures: {}",
            failures
                .iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "{:.0} updates/s ({} in {:.3} s)",
            report.updates_per_sec, c.sent, report.seconds
        );
        for mismatch in &report.mismatches {
            println!("MISMATCH {mismatch}");
        }
    }
    if !report.passed() {
        bail!(
            "selftest failed: {} lost, {} pending, {} mismatches",
            report.lost,
            report.counters.pending,
            report.mismatches.len()
        );
    }
    Ok(())
}
