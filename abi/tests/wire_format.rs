//! The wire format checked against `ebpf/bridge.h` itself, not against numbers copied from it: a
//! C program compiled against the header prints every size, offset and constant, and encodes
//! records the Rust side decodes (and the other way round).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use bpftime_abi::bridge::*;

const PROBE: &str = r#"
#include <linux/types.h>
#include <stdio.h>
#include <stddef.h>
#include <string.h>
#include "bridge.h"

#define FIELD(s, f) printf(#s "." #f " %zu %zu\n", offsetof(struct s, f), sizeof(((struct s *)0)->f))
#define SIZE(s) printf(#s " %zu 0\n", sizeof(struct s))
#define CONST(c) printf(#c " %llu 0\n", (unsigned long long)(c))

int main(int argc, char **argv)
{
	SIZE(bridge_update);
	FIELD(bridge_update, seq); FIELD(bridge_update, mirror); FIELD(bridge_update, op);
	FIELD(bridge_update, key_size); FIELD(bridge_update, value_size); FIELD(bridge_update, flags);
	SIZE(bridge_mirror);
	FIELD(bridge_mirror, fd); FIELD(bridge_mirror, key_size); FIELD(bridge_mirror, value_size);
	FIELD(bridge_mirror, fast_shape);
	SIZE(bridge_confirm);
	SIZE(bridge_drain_args);
	FIELD(bridge_drain_args, confirm_each); FIELD(bridge_drain_args, pad);
	CONST(BRIDGE_MAX_MIRRORS); CONST(BRIDGE_SCRATCH_SIZE); CONST(BRIDGE_MIN_RECORD);
	CONST(BRIDGE_OP_UPDATE); CONST(BRIDGE_OP_DELETE); CONST(BRIDGE_OP_PUSH);
	/* A confirmation as the drain writes it, in hex. */
	struct bridge_confirm c = { .seq = 0x1122334455667788ull, .first_seq = 42, .result = -7,
				    .kind = BRIDGE_CONFIRM_FAILED, .count = 9 };
	unsigned char *b = (unsigned char *)&c;
	printf("confirm ");
	for (size_t i = 0; i < sizeof(c); i++)
		printf("%02x", b[i]);
	printf(" 0\n");
	printf("kinds %d%d%d%d 0\n", BRIDGE_CONFIRM_APPLIED, BRIDGE_CONFIRM_FAILED,
	       BRIDGE_CONFIRM_BATCH, BRIDGE_CONFIRM_REJECTED);
	/* A record Rust encoded, read through the C struct. */
	if (argc > 1) {
		unsigned char rec[64];
		size_t n = strlen(argv[1]) / 2;
		for (size_t i = 0; i < n && i < sizeof(rec); i++)
			sscanf(argv[1] + 2 * i, "%2hhx", &rec[i]);
		struct bridge_update *u = (struct bridge_update *)rec;
		unsigned char *payload = rec + sizeof(*u);
		printf("decoded seq=%llu mirror=%u op=%u key_size=%u value_size=%u flags=%llu "
		       "key0=%u value0=%u 0\n",
		       (unsigned long long)u->seq, u->mirror, u->op, u->key_size, u->value_size,
		       (unsigned long long)u->flags, payload[0], payload[u->key_size]);
	}
	return 0;
}
"#;

fn header_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ebpf")
}

/// Compiles the probe against bridge.h and runs it; its lines as `name -> (a, b)` text.
fn probe(record_hex: &str) -> BTreeMap<String, (String, String)> {
    // One directory per call: the tests run in parallel and each removes its own.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("bpftime-wire-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("probe.c");
    let exe = dir.join("probe");
    std::fs::write(&src, PROBE).unwrap();
    let cc = Command::new("cc")
        .arg("-I")
        .arg(header_dir())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running cc (gcc is part of the build set-up)");
    assert!(
        cc.status.success(),
        "compiling the bridge.h probe: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).arg(record_hex).output().unwrap();
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, rest) = l.split_once(' ').unwrap();
            let (a, b) = rest.rsplit_once(' ').unwrap();
            (name.to_string(), (a.to_string(), b.to_string()))
        })
        .collect()
}

fn num(c: &BTreeMap<String, (String, String)>, name: &str) -> (usize, usize) {
    let (a, b) = &c[name];
    (
        a.parse().unwrap_or_else(|_| panic!("{name}: {a}")),
        b.parse().unwrap(),
    )
}

#[test]
fn rust_layouts_are_bridge_h_layouts() {
    use std::mem::{offset_of, size_of};
    let c = probe("");
    assert_eq!(num(&c, "bridge_update").0, size_of::<UpdateHeader>());
    assert_eq!(num(&c, "bridge_update").0, UPDATE_HEADER_SIZE);
    for (field, offset, size) in [
        ("seq", offset_of!(UpdateHeader, seq), 8),
        ("mirror", offset_of!(UpdateHeader, mirror), 4),
        ("op", offset_of!(UpdateHeader, op), 4),
        ("key_size", offset_of!(UpdateHeader, key_size), 4),
        ("value_size", offset_of!(UpdateHeader, value_size), 4),
        ("flags", offset_of!(UpdateHeader, flags), 8),
    ] {
        assert_eq!(
            num(&c, &format!("bridge_update.{field}")),
            (offset, size),
            "{field}"
        );
    }
    assert_eq!(num(&c, "bridge_mirror").0, size_of::<MirrorSlot>());
    for (field, offset) in [
        ("fd", offset_of!(MirrorSlot, fd)),
        ("key_size", offset_of!(MirrorSlot, key_size)),
        ("value_size", offset_of!(MirrorSlot, value_size)),
        ("fast_shape", offset_of!(MirrorSlot, fast_shape)),
    ] {
        assert_eq!(num(&c, &format!("bridge_mirror.{field}")), (offset, 4));
    }
    assert_eq!(num(&c, "bridge_drain_args").0, size_of::<DrainArgs>());
    assert_eq!(
        num(&c, "bridge_drain_args.confirm_each"),
        (offset_of!(DrainArgs, confirm_each), 4)
    );
    assert_eq!(
        num(&c, "bridge_drain_args.pad"),
        (offset_of!(DrainArgs, pad), 4)
    );
    assert_eq!(num(&c, "bridge_confirm").0, CONFIRM_RECORD_SIZE);
    assert_eq!(num(&c, "BRIDGE_MAX_MIRRORS").0, MAX_MIRRORS as usize);
    assert_eq!(num(&c, "BRIDGE_SCRATCH_SIZE").0, SCRATCH_SIZE);
    assert_eq!(num(&c, "BRIDGE_MIN_RECORD").0, MIN_RECORD_SIZE);
    assert_eq!(num(&c, "BRIDGE_OP_UPDATE").0, Op::Update as usize);
    assert_eq!(num(&c, "BRIDGE_OP_DELETE").0, Op::Delete as usize);
    assert_eq!(num(&c, "BRIDGE_OP_PUSH").0, Op::Push as usize);
    assert_eq!(c["kinds"].0, "0123");
}

#[test]
fn records_cross_between_c_and_rust() {
    // A confirmation the C struct laid out decodes to its fields in Rust.
    let c = probe("");
    let hex = &c["confirm"].0;
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(
        ConfirmRecord::decode(&bytes),
        Some(ConfirmRecord {
            seq: 0x1122_3344_5566_7788,
            first_seq: 42,
            result: -7,
            kind: ConfirmKind::Failed,
            count: 9,
        })
    );
    // A record Rust encoded reads back through `struct bridge_update`.
    let header = UpdateHeader {
        seq: 123_456_789,
        mirror: 17,
        op: Op::Delete as u32,
        key_size: 4,
        value_size: 8,
        flags: 2,
    };
    let mut out = vec![0u8; record_size(12)];
    header.encode(&[0xaa, 1, 2, 3], &[0xbb, 0, 0, 0, 0, 0, 0, 0], &mut out);
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    let c = probe(&hex);
    assert_eq!(
        c["decoded"].0,
        "seq=123456789 mirror=17 op=1 key_size=4 value_size=8 flags=2 key0=170 value0=187"
    );
}
