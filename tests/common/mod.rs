//! Shared by the CLI test binaries.

use serde_json::Value;

/// bpftool and `bpftime-rs maps --json` write bytes as `"0x.."` strings.
pub fn bytes(value: &Value) -> Vec<u8> {
    value
        .as_array()
        .expect("byte array")
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect()
}
