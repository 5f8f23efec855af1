#!/usr/bin/env bash
# Introspection benchmarks (BENCHMARKS.md): boots a lab VM with ~200 processes
# and measures vmwatch reading it. Prints Markdown rows.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
flavour="${1:-stable}"
vm="bench-$flavour"
V=target/release/vmwatch
$V lab down "$vm" >/dev/null 2>&1 || true
trap '$V lab down "$vm" >/dev/null 2>&1 || true' EXIT
$V lab up "$vm" --kernel "$flavour" --mem 1G
# ~200 processes, each holding a file of its own open.
$V lab exec "$vm" -- sh -c 'mkdir -p /root/b; for i in $(seq 190); do echo $i > /root/b/f$i; setsid sleep 100000 < /root/b/f$i >/dev/null 2>&1 & done; sleep 1; ls /proc | grep -c "^[0-9]"'
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), QEMU TCG, kernel flavour $flavour"
cargo run -q --release -p vmwatch --example introspection_bench -- "$vm"
echo
echo "vmwatch ps + lsof as commands (each parses the kernel image, attaches, lists):"
for cmd in ps lsof; do
    s=$(date +%s%N); $V $cmd --vm "$vm" >/dev/null; e=$(date +%s%N)
    echo "  vmwatch $cmd: $(( (e - s) / 1000000 )) ms"
done
