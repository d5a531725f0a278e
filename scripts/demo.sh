#!/usr/bin/env bash
# The README's demo command: builds bpftime-rs and shows the whole story: a BPF object loaded
# into user space, a victim whose function calls run the uprobe in-process (no kernel trap), the
# shared maps synced into real kernel maps through the user-ringbuf bridge, bpftool agreeing, and
# an unmodified libbpf tool whose programs run in its target through `load -- APP`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

cargo build --release --locked --workspace
bin=target/release/bpftime-rs
examples=$(ls -td target/release/build/bpftime-example-programs-*/out | head -n 1)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "bpftime-rs bridge selftest: 100,000 updates/deletes through the user ringbuf into kernel maps"
"$bin" bridge selftest --updates 100000

step "bpftime-rs load sync_counter.bpf.o (verified by the kernel, maps in shared memory, synced)"
"$bin" unload sync_counter >/dev/null 2>&1 || true
log=$(mktemp)
"$bin" load "$examples/sync_counter.bpf.o" >"$log" 2>&1 &
loader=$!
trap 'kill -INT $loader 2>/dev/null || true' EXIT
until grep -q '^loaded ' "$log"; do
    kill -0 "$loader" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
cat "$log"

step "bpftime-rs start -- victim_mt 8 100000: 8 threads, 800,000 hooked calls, counted in user space"
echo go | "$bin" start -- "$examples/victim_mt" 8 100000

step "bpftime-rs maps: userspace entries, kernel mirror entries, sync counters"
sleep 0.5
"$bin" maps

step "bpftime-rs maps --diff hits: userspace and kernel, entry by entry"
"$bin" maps --diff sync_counter/hits

step "bpftool map dump pinned /sys/fs/bpf/bpftime-rs/sync_counter/hits (first entries)"
# head closes the pipe early, which pipefail would report as a failure of bpftool.
bpftool map dump pinned /sys/fs/bpf/bpftime-rs/sync_counter/hits | head -n 8 || true
echo "sum of all counts in the kernel map: $(bpftool -j map dump pinned /sys/fs/bpf/bpftime-rs/sync_counter/hits |
    python3 -c 'import json,sys; print(sum(int.from_bytes(bytes(int(b,16) for b in e["value"]),"little") for e in json.load(sys.stdin)))')"

step "stopping the loader; bpftime-rs unload sync_counter"
kill -INT "$loader"
wait "$loader" || true
trap - EXIT
tail -n 3 "$log"
"$bin" unload sync_counter

step "bpftime-rs load usdt_counts: USDT probes (<sys/sdt.h>) read with libbpf's usdt.bpf.h in user space"
"$bin" unload usdt_counts_libbpf_rs >/dev/null 2>&1 || true
usdtlog=$(mktemp)
"$bin" load --no-sync "$examples/usdt_counts_libbpf_rs.bpf.o" >"$usdtlog" 2>&1 &
usdt=$!
until grep -q '^loaded ' "$usdtlog"; do
    kill -0 "$usdt" 2>/dev/null || { cat "$usdtlog"; exit 1; }
    sleep 0.1
done
# "done 300 300": the probe behind vt:sem's semaphore fired on every call (the agent raised it).
echo go | "$bin" start -- "$examples/victim_usdt" 300
echo "totals (slot: value), as the programs read their arguments:"
"$bin" maps --json | python3 -c '
import json, sys
for m in json.load(sys.stdin)["maps"]:
    if m["object"] == "usdt_counts_libbpf_rs" and m["name"] == "totals":
        print(" ".join("%s:%s" % (e["formatted"]["key"], e["formatted"]["value"]) for e in m["entries"]))'
kill -INT "$usdt"
wait "$usdt" || true
"$bin" unload usdt_counts_libbpf_rs

apps=$(ls -td target/release/build/bpftime-example-libbpf-apps-*/out | head -n 1)
step "bpftime-rs load -- uprobe_tool: an unmodified libbpf skeleton tool, its programs run in the target"
"$bin" unload uprobe_tool >/dev/null 2>&1 || true
applog=$(mktemp)
"$bin" load --no-sync -- "$apps/uprobe_tool" -b "$apps/victim" -f lt_work -m 3 -n 17 >"$applog" 2>&1 &
app=$!
until grep -q '^attached' "$applog"; do
    kill -0 "$app" 2>/dev/null || { cat "$applog"; exit 1; }
    sleep 0.1
done
echo go | "$bin" start --object uprobe_tool -- "$apps/victim" 10
wait "$app"
cat "$applog"
"$bin" unload uprobe_tool

step "examples/user_ringbuf: user space -> user ringbuf -> sys_exit_kill tracepoint -> ringbuf"
target/release/user_ringbuf --count 5 --interval-ms 200
