#!/usr/bin/env bash
# Idempotent machine set-up for vmwatch (Debian bookworm, amd64):
#   1. host packages: QEMU >= 9.2 from bookworm-backports, and the tools the
#      build and the image builder use (skipped entirely when all present);
#   2. `cargo build --release` of the workspace;
#   3. the lab guest images (`vmwatch lab build`, cached under
#      $VMWATCH_CACHE or ~/.cache/vmwatch; a no-op when nothing changed).
# Re-runs on a set-up machine take a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

# Oldest QEMU with TCG plugin API v4.
QEMU_MIN_MAJOR=9
QEMU_MIN_MINOR=2

qemu_version() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    qemu-system-x86_64 --version | sed -n 's/.*version \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n1
}

qemu_ok() {
    local v major minor
    v="$(qemu_version)" || return 1
    [ -n "$v" ] || return 1
    read -r major minor <<<"$v"
    [ "$major" -gt "$QEMU_MIN_MAJOR" ] || { [ "$major" -eq "$QEMU_MIN_MAJOR" ] && [ "$minor" -ge "$QEMU_MIN_MINOR" ]; }
}

# tool -> Debian package that provides it.
declare -A TOOLS=(
    [cpio]=cpio
    [xz]=xz-utils
    [zstd]=zstd
    [dpkg-deb]=dpkg
    [apt-get]=apt
    [cc]=gcc
    [objcopy]=binutils
    [make]=make
    [pkg-config]=pkg-config
    [socat]=socat
    [python3]=python3
    [gdb]=gdb
    [unshare]=util-linux
)
missing=()
for tool in "${!TOOLS[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${TOOLS[$tool]}")
done
if [ ! -e /usr/share/doc/ca-certificates ]; then
    missing+=(ca-certificates)
fi
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev) # static glibc: guest/scripted (hook-plugin tests)

if [ "${#missing[@]}" -gt 0 ] || ! qemu_ok; then
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    if [ "$codename" != bookworm ]; then
        echo "setup.sh: this is ${codename:-an unknown release}, not Debian bookworm; continuing, but images and QEMU come from bookworm(-backports)" >&2
    fi
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "== adding bookworm-backports to apt sources"
        echo "deb http://deb.debian.org/debian bookworm-backports main" \
            | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
    fi
    echo "== apt-get update"
    $SUDO apt-get update -qq
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "== installing: ${missing[*]}"
        $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! qemu_ok; then
        echo "== installing qemu-system-x86 from bookworm-backports"
        $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
    fi
fi
if ! qemu_ok; then
    echo "setup.sh: need qemu-system-x86_64 >= $QEMU_MIN_MAJOR.$QEMU_MIN_MINOR, found: $(qemu_version 2>/dev/null | tr ' ' . || echo none)" >&2
    exit 1
fi
echo "== host ok: QEMU $(qemu_version | tr ' ' .)"

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup.sh: cargo not found: install Rust (https://rustup.rs) and re-run" >&2
    exit 1
fi
echo "== cargo build --release"
cargo build --release --workspace --quiet

echo "== guest images"
for flavour in stable backports; do
    target/release/vmwatch lab build --kernel "$flavour"
done

# Test rootkit kernel modules (guest/kmods/, for crates/integrity's tests):
# installs the lab kernels' headers if missing and builds each module for both
# lab kernels into $VMWATCH_CACHE/kmods/<release>/ (a no-op when up to date).
echo "== test rootkit modules"
scripts/build-kmods.sh
