//! Shared set-up of the `maps_*` tests: a segment per test, removed on drop, and short map
//! definitions.
#![allow(dead_code)]

use bpftime_runtime::maps::{remove_object, MapDef, MapType, ShmObject};

/// A fresh segment `test-<kind>-<pid>-<test>` (a stale one of that name is removed first);
/// removed again on drop.
pub struct Seg(pub ShmObject);

impl Seg {
    pub fn new(kind: &str, test: &str, defs: &[MapDef]) -> Self {
        let name = format!("test-{kind}-{}-{test}", std::process::id());
        let _ = remove_object(&name);
        Seg(ShmObject::create(&name, defs).expect("create segment"))
    }
}

impl Drop for Seg {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}

/// A map definition without flags.
pub fn def(t: MapType, k: u32, v: u32, m: u32, name: &str) -> MapDef {
    MapDef::new(t, k, v, m, name)
}

/// A 4-byte key.
pub fn k4(i: u32) -> [u8; 4] {
    i.to_le_bytes()
}
