#!/usr/bin/env bash
# Runs the whole vmwatch test suite. Sets the machine up first (apt packages,
# QEMU from bookworm-backports, guest images from Debian's packages, release
# build); every step is cached, so re-runs only pay for the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --release -- -D warnings
# The fuzz targets live outside the workspace; keep them compiling.
cargo check -q --manifest-path fuzz/Cargo.toml --bins
echo "== guest syslog library against the host's glibc (no VM)"
make -s -C guest/syslog test
echo "== tests (unit tests, then end-to-end tests that boot lab VMs under QEMU)"
cargo test --workspace --release -- --test-threads=2
