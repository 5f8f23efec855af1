#!/usr/bin/env bash
# Runs every fuzz target of the guest-data parsers for a while (default 60 s each)
# and prints one summary line per target. Needs the nightly toolchain and
# cargo-fuzz (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    # Start from the committed seeds (valid tables, past crashers of other parsers).
    [ -d "seeds/$target" ] && cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
    log="$(mktemp)"
    if cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
        verdict="no crash"
    else
        verdict="FAILED (see fuzz/artifacts/$target)"
    fi
    runs=$(grep -Eo '#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 || true)
    [ -n "$runs" ] || tail -n 20 "$log" >&2
    echo "$target: ${secs}s, ${runs:-?} runs, ${cov:-cov: ?}, $verdict"
    rm -f "$log"
done
