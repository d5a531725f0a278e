#!/usr/bin/env bash
# The README's test command: sets the machine up, then runs formatting, lints and every test
# (kernel tests included: they fail, never skip, unless BPFTIME_SKIP_KERNEL_TESTS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked -- --test-threads 2
