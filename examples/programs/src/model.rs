//! What each example's maps must hold after `rounds` rounds of the victim, computed in Rust from
//! the victim's calls. Both the kernel run and the userspace run are checked against it.

use std::collections::BTreeMap;

const WORDS: [&str; 5] = ["alpha", "bravo", "charlie", "delta", "echo-echo-echo-echo"];

fn u64s(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn u32s(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// vt_add(i % 7, i) for i in 0..rounds.
fn adds(rounds: u32) -> impl Iterator<Item = (u64, u64)> {
    (0..u64::from(rounds)).map(|i| (i % 7, i))
}

fn mix(a: u64, b: u64) -> u64 {
    let scratch = [a, b, a ^ b, a.wrapping_add(b)];
    let mut h: u64 = 1469598103934665603;
    for s in scratch {
        h = (h ^ s).wrapping_mul(1099511628211);
    }
    h
}

use crate::Entries;

fn sorted(map: BTreeMap<Vec<u8>, Vec<u8>>) -> Entries {
    map.into_iter().collect()
}

/// The expected contents of the maps the example's result depends on (maps not listed, such
/// as `.rodata`, are checked only kernel against userspace).
pub fn expected(example: &str, rounds: u32) -> BTreeMap<String, Entries> {
    let mut maps = BTreeMap::new();
    match example {
        "hash_counter" => {
            let mut m = BTreeMap::new();
            for (a, _) in adds(rounds) {
                let e = m.entry(u64s(a)).or_insert(u64s(0));
                *e = u64s(u64::from_le_bytes(e[..].try_into().unwrap()) + 1);
            }
            maps.insert("calls_by_arg".into(), sorted(m));
        }
        "array_counters" => {
            let mut sums = [0u64; 16];
            for (a, b) in adds(rounds) {
                sums[(b % 16) as usize] += a;
            }
            let m = (0..16u32)
                .map(|i| (u32s(i), u64s(sums[i as usize])))
                .collect();
            maps.insert("sums".into(), sorted(m));
        }
        "rodata_config" => {
            let mut m: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            for (a, b) in adds(rounds) {
                *m.entry(u32s((a % 5) as u32)).or_default() += b * 3;
            }
            maps.insert(
                "scaled".into(),
                m.into_iter().map(|(k, v)| (k, u64s(v))).collect(),
            );
        }
        "bss_atomics" => {
            let (mut calls, mut sum, mut largest) = (0u64, 0u64, 0u64);
            for (a, b) in adds(rounds) {
                calls += 1;
                sum += a + b + 100;
                largest = largest.max(b);
            }
            let bss = [u64s(calls), u64s(sum), u64s(largest)].concat();
            maps.insert(".bss".into(), vec![(u32s(0), bss)]);
            maps.insert(".data".into(), vec![(u32s(0), u64s(100))]);
        }
        "ringbuf_events" => {
            let events = adds(rounds)
                .enumerate()
                .map(|(n, (a, b))| (u32s(n as u32), [u64s(a), u64s(b), u64s(a + b)].concat()))
                .collect();
            maps.insert("events".into(), events);
            maps.insert(
                "outcome".into(),
                vec![(u32s(0), u64s(u64::from(rounds))), (u32s(1), u64s(0))],
            );
        }
        "percpu_array" => {
            let mut counts = [0u64; 4];
            for (a, _) in adds(rounds) {
                counts[(a % 4) as usize] += 1;
            }
            let m = (0..4u32)
                .map(|i| (u32s(i), u64s(counts[i as usize])))
                .collect();
            maps.insert("per_cpu_calls".into(), sorted(m));
        }
        "probe_read_str" => {
            let mut m: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            let mut copied = 0u64;
            for i in 0..rounds {
                let word = WORDS[(i % 5) as usize].as_bytes();
                let take = word.len().min(15);
                let mut key = vec![0u8; 16];
                key[..take].copy_from_slice(&word[..take]);
                copied += take as u64 + 1;
                *m.entry(key).or_default() += 1;
            }
            maps.insert(
                "by_word".into(),
                m.into_iter().map(|(k, v)| (k, u64s(v))).collect(),
            );
            maps.insert("copied_bytes".into(), vec![(u32s(0), u64s(copied))]);
        }
        "bpf_to_bpf" => {
            let mut m: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            for (a, b) in adds(rounds) {
                let e = m.entry(u32s((a % 8) as u32)).or_insert(0);
                *e ^= mix(a, b);
            }
            maps.insert(
                "mixed".into(),
                m.into_iter().map(|(k, v)| (k, u64s(v))).collect(),
            );
        }
        "bloom_filter" => {
            // Every value tests positive once pushed; false positives depend on the bits
            // (compared kernel against userspace only).
            maps.insert(
                "found_after_push".into(),
                vec![(u32s(0), u64s(u64::from(rounds)))],
            );
        }
        "lpm_prefixes" => {
            // A list scanned for the longest covering prefix: the LPM rules, written plainly.
            let covers =
                |len: u32, stored: u32, addr: u32| len == 0 || (stored ^ addr) >> (32 - len) == 0;
            let mut stored: Vec<(u32, u32, u64)> = Vec::new(); // (len, addr, hits)
            let mut outcomes = [0u64; 3];
            for (a, b) in adds(rounds) {
                let addr = (b as u32).wrapping_mul(2654435761);
                let best = stored
                    .iter_mut()
                    .filter(|(len, s, _)| covers(*len, *s, addr))
                    .max_by_key(|(len, _, _)| *len);
                if let Some(hit) = best {
                    hit.2 += 1;
                    outcomes[0] += 1;
                    continue;
                }
                let len = 4 * (a as u32 + 1);
                let exists = stored
                    .iter()
                    .any(|(l, s, _)| *l == len && covers(len, *s, addr));
                if exists || stored.len() == 64 {
                    outcomes[2] += 1;
                } else {
                    stored.push((len, addr, 0));
                    outcomes[1] += 1;
                }
            }
            let mut trie = BTreeMap::new();
            for (len, addr, hits) in stored {
                let mut key = u32s(len);
                key.extend_from_slice(&addr.to_be_bytes());
                trie.insert(key, u64s(hits));
            }
            maps.insert("prefixes".into(), sorted(trie));
            let counts = (0..3u32).map(|i| (u32s(i), u64s(outcomes[i as usize])));
            maps.insert("outcomes".into(), counts.collect());
        }
        "map_in_map" => {
            // Two inner arrays behind slots 0 and 1, two inner hashes behind keys 0 and 1; a
            // % 3 == 2 finds neither.
            let mut sums = [[0u64; 8]; 2];
            let mut counts = [BTreeMap::<u32, u64>::new(), BTreeMap::new()];
            let mut misses = [0u64; 2];
            for (a, b) in adds(rounds) {
                match (a % 3) as usize {
                    2 => misses = [misses[0] + 1, misses[1] + 1],
                    s => {
                        sums[s][(b % 8) as usize] += b;
                        *counts[s].entry(a as u32).or_default() += 1;
                    }
                }
            }
            let array = |s: &[u64; 8]| (0..8u32).map(|i| (u32s(i), u64s(s[i as usize]))).collect();
            maps.insert("even_sums".into(), array(&sums[0]));
            maps.insert("odd_sums".into(), array(&sums[1]));
            let hash =
                |c: &BTreeMap<u32, u64>| c.iter().map(|(k, v)| (u32s(*k), u64s(*v))).collect();
            maps.insert("low_counts".into(), hash(&counts[0]));
            maps.insert("high_counts".into(), hash(&counts[1]));
            let held = |names: [&str; 2]| {
                (0..2u32)
                    .map(|i| (u32s(i), names[i as usize].as_bytes().to_vec()))
                    .collect()
            };
            maps.insert("sums_by_slot".into(), held(["even_sums", "odd_sums"]));
            maps.insert("counts_by_key".into(), held(["low_counts", "high_counts"]));
            maps.insert(
                "misses".into(),
                vec![(u32s(0), u64s(misses[0])), (u32s(1), u64s(misses[1]))],
            );
        }
        other => panic!("no model for example {other}"),
    }
    maps
}
