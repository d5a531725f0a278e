#!/usr/bin/env bash
# Installs and mounts what bpftime-rs needs on a fresh Debian 12 machine (run as root).
# Idempotent: installs only missing packages, mounts only missing filesystems.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (BPF maps, bpffs and kernel tests need it)" >&2
    exit 1
fi

packages=(clang llvm libbpf-dev bpftool libelf-dev zlib1g-dev pkg-config make gcc systemtap-sdt-dev binutils)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mount_if_missing() { # type target
    if ! awk -v t="$2" '$2 == t { found = 1 } END { exit !found }' /proc/mounts; then
        mkdir -p "$2"
        mount -t "$1" "$1" "$2"
        echo "setup.sh: mounted $1 at $2"
    fi
}
mount_if_missing bpf /sys/fs/bpf
mount_if_missing tracefs /sys/kernel/tracing
mount_if_missing debugfs /sys/kernel/debug
# A cgroup2 hierarchy for cgroup filters (bpf_current_task_under_cgroup, cgroup ids): most
# systems have one (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid ones).
if ! awk '$3 == "cgroup2" { found = 1 } END { exit !found }' /proc/mounts; then
    if awk '$2 == "/sys/fs/cgroup" { found = 1 } END { exit !found }' /proc/mounts; then
        mkdir -p /sys/fs/cgroup/unified
        mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
        echo "setup.sh: mounted cgroup2 at /sys/fs/cgroup/unified"
    else
        mount -t cgroup2 cgroup2 /sys/fs/cgroup
        echo "setup.sh: mounted cgroup2 at /sys/fs/cgroup"
    fi
fi

if [ ! -r /sys/kernel/btf/vmlinux ]; then
    echo "setup.sh: /sys/kernel/btf/vmlinux is missing: the kernel needs CONFIG_DEBUG_INFO_BTF" >&2
    exit 1
fi
if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || { echo "setup.sh: cargo (Rust 1.85+) is required" >&2; exit 1; }
fi
# Debian installs bpftool in /usr/sbin.
command -v bpftool >/dev/null || export PATH="$PATH:/usr/sbin"
