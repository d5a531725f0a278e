//! `bpftime-rs unload [OBJ]`: removes an object's manifest (agents can no longer open it), its
//! shared memory and its kernel pins; without OBJ, does so for every object of ours whose loader
//! is gone and whose maps no process uses any more, and removes our segment files that no
//! manifest names and no process maps.

use anyhow::{Context, Result};
use bpftime_abi::ErrorChain;
use bpftime_kernel_bridge::mirror::remove_object_pins;
use bpftime_runtime::maps::{euid, list_segments, remove_object, SegmentInfo};
use bpftime_runtime::state::{Manifest, StateDir};

#[derive(clap::Args)]
pub struct UnloadArgs {
    /// The object (file stem) to unload; omitted: clean up after dead loaders.
    object: Option<String>,
}

pub fn run(args: &UnloadArgs) -> Result<()> {
    let state = StateDir::ours().context("opening the state directory")?;
    match &args.object {
        Some(object) => unload(&state, object),
        None => unload_stale(&state),
    }
}

fn segment_of(object: &str) -> Option<SegmentInfo> {
    list_segments()
        .unwrap_or_default()
        .into_iter()
        .find(|s| s.object == object)
}

fn unload_stale(state: &StateDir) -> Result<()> {
    let mut removed = 0;
    for object in state.object_names() {
        let manifest = match Manifest::read(state, &object) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("bpftime-rs: skipping object {object}: {}", ErrorChain(&e));
                continue;
            }
        };
        if manifest.loader_alive() {
            continue;
        }
        if let Some(segment) = segment_of(&object) {
            if !segment.mapped_by.is_empty() {
                println!(
                    "{object}: its loader (pid {}) is gone but pids {:?} still use its maps; kept",
                    manifest.loader_pid, segment.mapped_by
                );
                continue;
            }
        }
        unload(state, &object)?;
        removed += 1;
    }
    // Segment files of ours that no manifest names (a loader killed before it published, a
    // `run` killed mid-way) and nobody maps.
    for segment in list_segments().context("listing /dev/shm")? {
        if segment.owner_uid != euid()
            || !segment.mapped_by.is_empty()
            || state.object_dir(&segment.object).exists()
        {
            continue;
        }
        remove_object(&segment.object).with_context(|| format!("removing {}", segment.path))?;
        println!("removed {} (no manifest names it)", segment.path);
        removed += 1;
    }
    if removed == 0 {
        println!("no stale objects");
    }
    Ok(())
}

fn unload(state: &StateDir, object: &str) -> Result<()> {
    let manifest = Manifest::read(state, object).ok();
    let had_manifest = Manifest::remove(state, object)
        .with_context(|| format!("removing the manifest of {object}"))?;
    // The segment goes if it is the one the manifest named, or (no manifest) one of ours.
    let segment = match segment_of(object) {
        Some(seg) => {
            let ours = match &manifest {
                Some(m) => Some(m.segment) == seg.identity,
                None => seg.owner_uid == euid(),
            };
            if ours {
                match remove_object(object) {
                    Ok(()) => true,
                    Err(e) if e.errno() == libc::ENOENT => false,
                    Err(e) => {
                        return Err(e).with_context(|| format!("removing the maps of {object}"))
                    }
                }
            } else {
                eprintln!(
                    "bpftime-rs: leaving {}: it is not the segment {object}'s loader made \
                     (owned by uid {})",
                    seg.path, seg.owner_uid
                );
                false
            }
        }
        None => false,
    };
    let pins =
        remove_object_pins(object).with_context(|| format!("removing the pins of {object}"))?;
    if !segment && pins == 0 && !had_manifest {
        anyhow::bail!("{object} is not loaded (no manifest, no shared memory, no pins)");
    }
    println!(
        "unloaded {object}: {} shared memory, {pins} kernel pin(s)",
        if segment { "removed" } else { "no" }
    );
    Ok(())
}
