//! The loaded objects the CLI may act on: those with a trusted manifest (root's, or the
//! invoking user's; see `bpftime_runtime::state`). Everything else that looks like an object
//! (a segment file in /dev/shm without such a manifest, a manifest someone else could have
//! written) is skipped with a line saying why, never used.

use bpftime_runtime::maps::{list_segments, trusted_owners};
use bpftime_runtime::state::{discover, FoundObject};

/// Trusted objects, with one line per thing skipped (printed to stderr by the caller's choice).
pub fn trusted_objects() -> (Vec<FoundObject>, Vec<String>) {
    let (found, mut skipped) = discover();
    let trusted = trusted_owners();
    for segment in list_segments().unwrap_or_default() {
        let named = found.iter().any(|f| {
            f.manifest.object == segment.object && Some(f.manifest.segment) == segment.identity
        });
        if named {
            continue;
        }
        if !trusted.contains(&segment.owner_uid) {
            skipped.push(format!(
                "skipping {}: owned by uid {}, which is neither root nor you",
                segment.path, segment.owner_uid
            ));
        } else if !segment.object.starts_with("run-") {
            skipped.push(format!(
                "skipping {}: no trusted manifest names it (left by a loader that was not \
                 unloaded? `bpftime-rs unload` removes it)",
                segment.path
            ));
        }
    }
    (found, skipped)
}

/// Prints the skip lines of [`trusted_objects`] as warnings.
pub fn warn_skipped(skipped: &[String]) {
    for line in skipped {
        eprintln!("bpftime-rs: {line}");
    }
}
