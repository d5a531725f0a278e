//! `bpftime-rs unload [OBJ]`: unpublishes an object's programs (agents remove their hooks),
//! removes its shared memory and its kernel pins; without OBJ, removes the segments of loaders
//! that are gone and that no process maps any more.

use std::time::Duration;

use anyhow::{Context, Result};
use bpftime_kernel_bridge::mirror::remove_object_pins;
use bpftime_runtime::maps::{find_stale, remove_object, ShmObject};

#[derive(clap::Args)]
pub struct UnloadArgs {
    /// The object (file stem) to unload; omitted: clean up after dead loaders.
    object: Option<String>,
}

pub fn run(args: &UnloadArgs) -> Result<()> {
    match &args.object {
        Some(object) => unload(object),
        None => {
            let stale = find_stale().context("listing shared-memory segments")?;
            if stale.is_empty() {
                println!("no stale segments");
            }
            for segment in stale {
                if !segment.mapped_by.is_empty() {
                    println!(
                        "{}: its loader (pid {}) is gone but pids {:?} still use it; kept",
                        segment.object, segment.creator_pid, segment.mapped_by
                    );
                    continue;
                }
                unload(&segment.object)?;
            }
            Ok(())
        }
    }
}

fn unload(object: &str) -> Result<()> {
    if let Ok(shm) = ShmObject::open(object) {
        let programs = shm.programs();
        for program in &programs {
            shm.unregister_program(program.index);
        }
        if !programs.is_empty() {
            // Agents poll the registry generation; give them a moment to remove their hooks.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let segment = match remove_object(object) {
        Ok(()) => true,
        Err(e) if e.errno() == libc::ENOENT => false,
        Err(e) => return Err(e).with_context(|| format!("removing the maps of {object}")),
    };
    let pins =
        remove_object_pins(object).with_context(|| format!("removing the pins of {object}"))?;
    if !segment && pins == 0 {
        anyhow::bail!("{object} is not loaded (no shared memory, no pins)");
    }
    println!(
        "unloaded {object}: {} shared memory, {pins} kernel pin(s)",
        if segment { "removed" } else { "no" }
    );
    Ok(())
}
