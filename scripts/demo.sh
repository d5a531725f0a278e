#!/usr/bin/env bash
# The README's demo command: builds bpftime-rs and shows the kernel bridge at work.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

cargo build --release --locked --workspace --bins
bin=target/release/bpftime-rs

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "bpftime-rs bridge selftest: 100,000 updates/deletes through the user ringbuf into kernel maps"
"$bin" bridge selftest --updates 100000

step "bpftime-rs maps: the kernel mirror maps"
"$bin" maps

step "bpftool map dump pinned /sys/fs/bpf/bpftime-rs/selftest/small_u32_u64 (first entries)"
# head closes the pipe early, which pipefail would report as a failure of bpftool.
bpftool map dump pinned /sys/fs/bpf/bpftime-rs/selftest/small_u32_u64 | head -n 8 || true

step "examples/user_ringbuf: user space -> user ringbuf -> sys_exit_kill tracepoint -> ringbuf"
target/release/user_ringbuf --count 5 --interval-ms 200
