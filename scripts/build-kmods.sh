#!/usr/bin/env bash
# Builds the test rootkit modules (guest/kmods/*/) for each lab kernel.
#
#   scripts/build-kmods.sh [-f|--force] [MODULE...]
#
# For each lab flavour (stable, backports) whose image is built, reads
# `kernel_release` from $VMWATCH_CACHE/images/<flavour>/image.json, installs
# linux-headers-<release> on the host when missing (apt, sudo when not root;
# backports' headers with -t bookworm-backports), copies each module's sources
# to $VMWATCH_CACHE/kmods/<release>/build/<name>/ (never builds in the repo) and
# writes $VMWATCH_CACHE/kmods/<release>/<name>.ko.  A module whose .ko is newer
# than its sources is skipped (re-runs take well under a second); --force
# rebuilds.  MODULE... restricts the build to those module names.
# $VMWATCH_CACHE defaults like vmwatch's own (crates/lab/src/util.rs):
# $XDG_CACHE_HOME/vmwatch, else ~/.cache/vmwatch.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

force=0
only=()
for arg in "$@"; do
    case "$arg" in
        -f|--force) force=1 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build-kmods.sh: unknown option $arg" >&2; exit 2 ;;
        *) only+=("$arg") ;;
    esac
done

if [ -n "${VMWATCH_CACHE:-}" ]; then
    cache="$VMWATCH_CACHE"
elif [ -n "${XDG_CACHE_HOME:-}" ]; then
    cache="$XDG_CACHE_HOME/vmwatch"
else
    cache="${HOME:-/tmp}/.cache/vmwatch"
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

for tool in make python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "build-kmods.sh: $tool not found: run scripts/setup.sh (or apt-get install $tool)" >&2; exit 1; }
done

modules=()
for dir in "$repo"/guest/kmods/*/; do
    name="$(basename "$dir")"
    [ -f "$dir/Makefile" ] && [ -f "$dir/$name.c" ] || continue
    if [ "${#only[@]}" -gt 0 ] && [[ " ${only[*]} " != *" $name "* ]]; then
        continue
    fi
    modules+=("$name")
done
if [ "${#modules[@]}" -eq 0 ]; then
    echo "build-kmods.sh: no module to build under guest/kmods/${only[*]:+ matching: ${only[*]}}" >&2
    exit 1
fi

apt_updated=0
# install_headers RELEASE FLAVOUR
install_headers() {
    local rel="$1" flavour="$2" pkg="linux-headers-$1" target=()
    [ "$flavour" = backports ] && target=(-t bookworm-backports)
    echo "== installing $pkg"
    if ! $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "$pkg" >/dev/null 2>&1; then
        if [ "$apt_updated" = 0 ]; then
            apt_updated=1
            $SUDO apt-get update -qq >/dev/null 2>&1 || true
            $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "$pkg" >/dev/null 2>&1 && return 0
        fi
        return 1
    fi
}

built=0
skipped=0
for flavour in stable backports; do
    json="$cache/images/$flavour/image.json"
    if [ ! -f "$json" ]; then
        echo "== $flavour: no lab image ($json): skipped (build it with: target/release/vmwatch lab build --kernel $flavour)"
        continue
    fi
    rel="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["kernel_release"])' "$json")"
    kdir="/usr/src/linux-headers-$rel"
    if [ ! -f "$kdir/Makefile" ]; then
        if ! install_headers "$rel" "$flavour" || [ ! -f "$kdir/Makefile" ]; then
            bp=""
            [ "$flavour" = backports ] && bp="-t bookworm-backports "
            echo "build-kmods.sh: kernel headers for $rel missing: install them with: ${SUDO:+sudo }apt-get install --no-install-recommends ${bp}linux-headers-$rel" >&2
            exit 1
        fi
    fi
    out="$cache/kmods/$rel"
    mkdir -p "$out/build"
    for name in "${modules[@]}"; do
        src="$repo/guest/kmods/$name"
        ko="$out/$name.ko"
        # Sources: the module's directory and the shared headers (guest/kmods/include).
        if [ "$force" = 0 ] && [ -f "$ko" ] && [ -z "$(find "$src" "$repo/guest/kmods/include" -type f -newer "$ko" -print -quit)" ]; then
            skipped=$((skipped + 1))
            continue
        fi
        bdir="$out/build/$name"
        mkdir -p "$bdir"
        cp -f "$src"/* "$repo"/guest/kmods/include/*.h "$bdir"/
        echo "== $rel: building $name"
        if ! make -C "$kdir" M="$bdir" -j2 modules >"$bdir/build.log" 2>&1; then
            tail -n 30 "$bdir/build.log" >&2
            echo "build-kmods.sh: building $name for $rel failed (full log: $bdir/build.log)" >&2
            exit 1
        fi
        # warnings are shown, not fatal
        grep -E 'warning:' "$bdir/build.log" >&2 || true
        cp -f "$bdir/$name.ko" "$ko.tmp"
        mv -f "$ko.tmp" "$ko"
        built=$((built + 1))
    done
    echo "== $flavour ($rel): modules in $out"
done
echo "== kmods: $built built, $skipped up to date"
