//! USDT notes of a real `<sys/sdt.h>` victim read as libbpf reads them, checked against
//! binutils' `readelf -n` (an independent reader of `.note.stapsdt`): every probe with its
//! provider, name, address, semaphore and argument string; each site's file offset holds the
//! probe's `nop`, each semaphore's offset its zero counter; every argument string parses into
//! the spec `usdt.bpf.h` reads, with the sizes and signs of the C expressions.

use bpftime_attach::usdt::{parse_args, read_sites, spec_value, ArgKind, SpecLayout};
use bpftime_example_programs::victim_usdt_path;

/// (provider, name, location, semaphore, arguments) per note, from `readelf -n`.
fn readelf_notes(path: &std::path::Path) -> Vec<(String, String, u64, u64, String)> {
    let out = std::process::Command::new("readelf")
        .args(["-n", "--wide"])
        .arg(path)
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap();
    let mut notes = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(l) = lines.next() {
        // "stapsdt 0x.. NT_STAPSDT (SystemTap probe descriptors)  Provider: vt"
        let Some((_, rest)) = l.split_once("Provider: ") else {
            continue;
        };
        let provider = rest.trim().to_string();
        let name = lines
            .next()
            .unwrap()
            .trim_start_matches("Name: ")
            .to_string();
        // Location: 0x..., Base: 0x..., Semaphore: 0x...
        let loc_line = lines.next().unwrap();
        let fields: Vec<&str> = loc_line.split(',').collect();
        let location = hex(fields[0].trim().trim_start_matches("Location: "));
        let semaphore = hex(fields[2].trim().trim_start_matches("Semaphore: "));
        let args = lines
            .next()
            .unwrap()
            .trim_start_matches("Arguments:")
            .trim()
            .to_string();
        notes.push((provider, name, location, semaphore, args));
    }
    notes
}

#[test]
fn usdt_sites_match_readelf_and_their_arguments_parse() {
    let path = victim_usdt_path();
    let bytes = std::fs::read(&path).unwrap();
    let sites = read_sites(&path).unwrap();
    let theirs = readelf_notes(&path);
    let ours: Vec<_> = sites
        .iter()
        .map(|s| {
            (
                s.provider.clone(),
                s.name.clone(),
                s.address,
                s.semaphore.map_or(0, |(v, _)| v),
                s.args.clone(),
            )
        })
        .collect();
    assert_eq!(ours, theirs, "our notes == readelf's");
    let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["sib", "add", "konst", "sem"], "in note order");
    for s in &sites {
        assert_eq!(
            bytes[s.file_offset as usize], 0x90,
            "{}: the site is a nop",
            s.name
        );
        if let Some((_, off)) = s.semaphore {
            assert_eq!(&bytes[off as usize..off as usize + 2], [0, 0], "{}", s.name);
        }
        let args = parse_args(s).unwrap_or_else(|e| panic!("{e}"));
        let shape: Vec<(bool, u8)> = args.iter().map(|a| (a.signed, a.bitshift)).collect();
        let want: &[(bool, u8)] = match s.name.as_str() {
            "add" => &[(true, 32), (true, 0)],
            "konst" => &[(true, 32)],
            "sib" => &[(true, 0)],
            _ => &[(true, 32), (true, 32), (true, 56)],
        };
        assert_eq!(shape, want, "{}: {}", s.name, s.args);
        if s.name == "konst" {
            assert_eq!((args[0].kind, args[0].val_off), (ArgKind::Const, 42));
        }
        if s.name == "sib" {
            assert!(matches!(args[0].kind, ArgKind::Sib { .. }), "{}", s.args);
            assert!(spec_value(&args, 7, SpecLayout::Compact).is_err());
        } else {
            let spec = spec_value(&args, 7, SpecLayout::Compact).unwrap();
            assert_eq!(spec[200] as usize, args.len());
        }
        let spec = spec_value(&args, 7, SpecLayout::Sib).unwrap();
        assert_eq!(spec[296] as usize, args.len());
    }
    let semaphores: Vec<u64> = sites
        .iter()
        .filter_map(|s| s.semaphore)
        .map(|s| s.0)
        .collect();
    assert_eq!(
        semaphores.len(),
        3,
        "one semaphore per sdt.h probe (the hand-written vt:sib has none)"
    );
    assert!(semaphores[0] != semaphores[1] && semaphores[1] != semaphores[2]);
}
