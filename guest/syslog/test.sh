#!/bin/bash
# guest/syslog/test.sh -- libvmwsyslog.so against real glibc, on this host.
#
# Every test program runs twice inside a private mount namespace whose /dev
# is a fresh tmpfs with a test receiver on /dev/log: once with plain glibc,
# once with LD_PRELOAD=libvmwsyslog.so and VMWATCH_SYSLOG_TEE.  The /dev/log
# bytes must be identical (timestamp and pid masked; timestamps checked
# separately), the tee'd doorbell buffers must reassemble to exactly the
# bytes sent, and stdout/stderr/console output must match.
# Needs root (unshare -m, mount, mknod), gcc, python3.  KEEP=1 keeps the
# work directory.  Last line: "N passed, N failed".
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
LIB=$HERE/libvmwsyslog.so
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3)

if [ "${1:-}" != "--inner" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "test.sh needs root (unshare -m, mount, mknod)"; echo "0 passed, 1 failed"; exit 1
    fi
    if ! command -v unshare >/dev/null; then
        echo "unshare is not available: cannot give the tests a private /dev/log"
        echo "0 passed, 1 failed"; exit 1
    fi
    if ! make -C "$HERE" libvmwsyslog.so >/dev/null; then
        echo "build of libvmwsyslog.so failed"; echo "0 passed, 1 failed"; exit 1
    fi
    exec unshare -m --propagation private "$0" --inner
fi

# ---------------------------------------------------------------- setup
PASS=0 FAIL=0
T=$(mktemp -d /tmp/vmwsyslog-test.XXXXXX)
chmod 755 "$T"
RPID=
cleanup() {
    [ -n "$RPID" ] && kill "$RPID" 2>/dev/null
    [ "${ETC_MOUNTED:-0}" = 1 ] && umount /etc 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $T"; else rm -rf --one-file-system "$T"; fi
}
trap cleanup EXIT

ok()   { PASS=$((PASS + 1)); echo "ok   - $1"; }
bad()  { FAIL=$((FAIL + 1)); echo "FAIL - $1"; [ -n "${2:-}" ] && sed 's/^/       /' <<<"$2" | head -20; }
# check DESCRIPTION CMD...: passes if CMD exits 0
check() {
    local d=$1 out; shift
    if out=$("$@" 2>&1); then ok "$d${out:+ ($(tail -1 <<<"$out"))}"; else bad "$d" "$out"; fi
}
C() { $PY "$HERE/tests/vmwcheck.py" "$@"; }

# A private /dev: tmpfs with the few device nodes the programs need, so the
# receiver can own /dev/log and /dev/console can be a file or a FIFO.
mount -t tmpfs -o mode=755 vmwsyslog-dev /dev || { echo "cannot mount a tmpfs on /dev"; echo "0 passed, 1 failed"; exit 1; }
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8; mknod -m 666 /dev/urandom c 1 9; mknod -m 666 /dev/tty c 5 0
ln -s /proc/self/fd /dev/fd; ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
mkdir /dev/shm /dev/pts && mount -t tmpfs -o mode=1777 shm /dev/shm
: >/dev/console                     # absorbs LOG_CONS output unless a test reads it
export TZ=JST-9                     # local time != UTC: the timestamp must be local
export LC_ALL=C.UTF-8

# ---------------------------------------------------------------- helpers
start_recv() {  # MODE PATH OUT
    rm -f "$3" "$3.ready"
    $PY "$HERE/tests/recv.py" "$1" "$2" "$3" & RPID=$!
    for _ in $(seq 200); do [ -e "$3.ready" ] && return 0; sleep 0.05; done
    echo "receiver did not start"; return 1
}
stop_recv() { [ -n "$RPID" ] && { kill -TERM "$RPID"; wait "$RPID"; RPID=; }; }

# run NAME RECV [VAR=VALUE...] -- PROGRAM ARGS...
#   RECV: dgram | stream | none (no /dev/log) | stale (socket file, nobody listening)
#   writes $T/NAME.{recv,stdout,stderr,rc,pid}; the pid is the program's own
run() {
    local name=$1 mode=$2 o=$T/$1; shift 2
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
    rm -f /dev/log "$o".*
    case $mode in
        dgram|stream) start_recv "$mode" /dev/log "$o.recv" || return 1 ;;
        stale) start_recv dgram /dev/log "$o.dummy" && stop_recv ;;
    esac
    # (subshell: bash's "Aborted" job notice for the %n test goes to /dev/null)
    ( timeout 300 sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$o.pid" env "${envs[@]}" "$@" \
        >"$o.stdout" 2>"$o.stderr"; echo $? >"$o.rc" ) 2>/dev/null
    case $mode in dgram|stream) stop_recv ;; esac
    : >>"$o.recv"
}
# pair NAME RECV -- PROGRAM...: NAME.glibc plain, NAME.vmw preloaded with tee
pair() {
    local name=$1 mode=$2; shift 2; shift
    run "$name.glibc" "$mode" -- "$@"
    rm -f "$T/$name.tee"
    run "$name.vmw" "$mode" LD_PRELOAD="$LIB" VMWATCH_SYSLOG_TEE="$T/$name.tee" -- "$@"
}
same_file() { cmp "$1" "$2" || { diff <(head -c 3000 "$1") <(head -c 3000 "$2") | head; return 1; }; }
rc_is() { [ "$(cat "$1")" = "$2" ] || { echo "exit status $(cat "$1"), expected $2"; cat "${1%.rc}.stderr" | head -5; return 1; }; }

# ---------------------------------------------------------------- build
B=$T/bin; mkdir -p "$B"
CFLAGS="-O2 -Wall -Wextra -Werror -pthread -U_FORTIFY_SOURCE"
build_ok=1
for p in t_basic t_threads t_cons t_reconnect t_cancel t_small; do
    gcc $CFLAGS -o "$B/$p" "$HERE/tests/$p.c" || build_ok=0
done
gcc -O2 -D_FORTIFY_SOURCE=2 -Wall -o "$B/t_fortify" "$HERE/tests/t_fortify.c" || build_ok=0
[ $build_ok = 1 ] && ok "test programs build (dynamically linked)" || bad "test programs build"

exports() {
    local got; got=$(nm -D --defined-only "$LIB" | awk '{print $3}' | sort | tr '\n' ' ')
    [ "$got" = "__syslog_chk __vsyslog_chk closelog openlog setlogmask syslog vsyslog " ] || { echo "exports: $got"; return 1; }
    echo "exports exactly the 7 glibc names"
}
check "library exports" exports
doorbell_code() {
    objdump -d --no-show-raw-insn "$LIB" | awk '/<vmw_doorbell>:/,/ret/' >"$T/doorbell.s"
    grep -q 'push *%rbx' "$T/doorbell.s" && grep -q 'mov *$0xffff,%eax' "$T/doorbell.s" &&
        grep -q cpuid "$T/doorbell.s" && grep -q 'pop *%rbx' "$T/doorbell.s" || { cat "$T/doorbell.s"; return 1; }
    echo "cpuid with eax=0xffff, rbx saved/restored"
}
check "doorbell instruction sequence" doorbell_code
symrefs() {  # BINARY SYMBOL...
    local b=$1; shift
    for s in "$@"; do nm -D "$b" | grep -Eq " U $s(@|\$)" || { echo "$b does not import $s"; return 1; }; done
}
check "t_basic imports syslog/vsyslog/openlog/closelog/setlogmask @GLIBC_2.2.5" \
    symrefs "$B/t_basic" syslog@GLIBC_2.2.5 vsyslog@GLIBC_2.2.5 openlog closelog setlogmask
check "t_fortify imports __syslog_chk/__vsyslog_chk (_FORTIFY_SOURCE=2)" \
    symrefs "$B/t_fortify" __syslog_chk@GLIBC_2.4 __vsyslog_chk@GLIBC_2.4

# ---------------------------------------------------------------- (1)(2)(4)(5) t_basic
pair basic dgram -- "$B/t_basic"
check "t_basic: exit status" rc_is "$T/basic.vmw.rc" 0
check "t_basic: /dev/log datagrams identical to glibc's (incl. setlogmask, bad pri, %m, 100 KiB)" \
    C cmp-dgram "$T/basic.glibc.recv" "$T/basic.glibc.pid" "$T/basic.vmw.recv" "$T/basic.vmw.pid"
check "t_basic: stdout (return values, errno, socket counts) identical" same_file "$T/basic.glibc.stdout" "$T/basic.vmw.stdout"
check "t_basic: LOG_PERROR stderr identical" C cmp-text "$T/basic.glibc.stderr" "$T/basic.glibc.pid" "$T/basic.vmw.stderr" "$T/basic.vmw.pid"
check "t_basic: doorbell buffers (tee) == bytes sent to /dev/log, long ones in parts" \
    C tee-vs-recv "$T/basic.tee" "$T/basic.vmw.recv"
masks() { C grep-recv "$T/basic.vmw.recv" 'upto-notice level' 6 && C grep-recv "$T/basic.vmw.recv" 'debug[|]err level' 2; }
check "t_basic: setlogmask filtering: 6 of 8 levels for LOG_UPTO(LOG_NOTICE), 2 of 8 for debug|err" masks

# ---------------------------------------------------------------- (6) doorbell only
run basic.local0 dgram LD_PRELOAD="$LIB" VMWATCH_SYSLOG_TEE="$T/basic.local0.tee" VMWATCH_SYSLOG_LOCAL=0 -- "$B/t_basic"
check "VMWATCH_SYSLOG_LOCAL=0: nothing sent to /dev/log" C count "$T/basic.local0.recv" 0
check "VMWATCH_SYSLOG_LOCAL=0: doorbell still rung for every message, == glibc's bytes" \
    C tee-vs-glibc "$T/basic.local0.tee" "$T/basic.local0.pid" "$T/basic.glibc.recv" "$T/basic.glibc.pid"
check "VMWATCH_SYSLOG_LOCAL=0: LOG_PERROR stderr unchanged" \
    C cmp-text "$T/basic.glibc.stderr" "$T/basic.glibc.pid" "$T/basic.local0.stderr" "$T/basic.local0.pid"

# ---------------------------------------------------------------- SOCK_STREAM fallback
pair stream stream -- "$B/t_basic"
check "SOCK_STREAM /dev/log (EPROTOTYPE fallback, NUL terminators): stream identical" \
    C cmp-stream "$T/stream.glibc.recv" "$T/stream.glibc.pid" "$T/stream.vmw.recv" "$T/stream.vmw.pid"
check "SOCK_STREAM: doorbell buffers == stream records (without the NUL)" \
    C tee-vs-recv "$T/stream.tee" "$T/stream.vmw.recv" stream

# ---------------------------------------------------------------- (3) threads
pair threads dgram -- "$B/t_threads" 16 1000
check "16 threads x 1000 (glibc): each message once" C threads "$T/threads.glibc.recv" 16 1000
check "16 threads x 1000 (vmw): each message once on /dev/log" C threads "$T/threads.vmw.recv" 16 1000
check "16 threads x 1000 (vmw): each message once in the doorbell, same order as /dev/log" \
    C tee-vs-recv "$T/threads.tee" "$T/threads.vmw.recv"
check "16 threads x 1000: same set of datagrams as glibc's (order aside)" \
    C cmp-sorted "$T/threads.glibc.recv" "$T/threads.glibc.pid" "$T/threads.vmw.recv" "$T/threads.vmw.pid"

# ---------------------------------------------------------------- fortify
pair fortify dgram -- "$B/t_fortify"
check "_FORTIFY_SOURCE=2 (__syslog_chk/__vsyslog_chk): datagrams identical" \
    C cmp-dgram "$T/fortify.glibc.recv" "$T/fortify.glibc.pid" "$T/fortify.vmw.recv" "$T/fortify.vmw.pid"
fort_out() { cmp "$T/fortify.glibc.stdout" "$T/fortify.vmw.stdout" && C tee-vs-recv "$T/fortify.tee" "$T/fortify.vmw.recv"; }
check "_FORTIFY_SOURCE=2: stdout identical, doorbell == /dev/log" fort_out
pair fortn dgram -- "$B/t_fortify" n
fort_n() {
    rc_is "$T/fortn.glibc.rc" 134 && rc_is "$T/fortn.vmw.rc" 134 &&
        grep -q '%n in writable segment detected' "$T/fortn.vmw.stderr" &&
        cmp "$T/fortn.glibc.stderr" "$T/fortn.vmw.stderr" &&
        C cmp-dgram "$T/fortn.glibc.recv" "$T/fortn.glibc.pid" "$T/fortn.vmw.recv" "$T/fortn.vmw.pid"
}
check "_FORTIFY_SOURCE=2: %n in a writable format aborts like glibc" fort_n

# ---------------------------------------------------------------- LOG_CONS
cons_pair() {  # NAME RECV
    local n=$1 mode=$2 v
    for v in glibc vmw; do
        rm -f /dev/console; mkfifo -m 622 /dev/console
        local r=$RPID; start_recv fifo /dev/console "$T/$n.$v.console"; local fr=$RPID; RPID=$r
        if [ $v = glibc ]; then run "$n.$v" "$mode" -- "$B/t_cons"
        else rm -f "$T/$n.tee"; run "$n.$v" "$mode" LD_PRELOAD="$LIB" VMWATCH_SYSLOG_TEE="$T/$n.tee" -- "$B/t_cons"; fi
        RPID=$fr; stop_recv
        rm -f /dev/console; : >/dev/console
    done
}
cons_check() {
    local n=$1
    [ -s "$T/$n.glibc.console" ] || { echo "glibc wrote nothing to /dev/console"; return 1; }
    C cmp-text "$T/$n.glibc.console" "$T/$n.glibc.pid" "$T/$n.vmw.console" "$T/$n.vmw.pid" &&
        cmp "$T/$n.glibc.stdout" "$T/$n.vmw.stdout" &&
        [ "$($PY -c 'import sys; sys.path.insert(0, "'"$HERE"'/tests"); import vmwcheck as v; print(len(v.parse_tee(sys.argv[1])))' "$T/$n.tee")" = 5 ] ||
        { echo "tee does not hold the 5 messages"; return 1; }
}
cons_pair cons none
check "LOG_CONS, no /dev/log: console output (TAG[PID]: MSG\\r\\n) and errno identical" cons_check cons
cons_pair consstale stale
check "LOG_CONS, dead /dev/log socket: console output and errno identical" cons_check consstale

# ---------------------------------------------------------------- reconnect
reconnect() {  # NAME ENV...
    local n=$1 o=$T/$1; shift
    rm -f /dev/log "$o".* "$T/step1" "$T/step2"
    start_recv dgram /dev/log "$o.recv1" || return 1
    sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$o.pid" env "$@" "$B/t_reconnect" "$T/step1" "$T/step2" &
    local p=$!
    for _ in $(seq 200); do [ -e "$T/step1" ] && break; sleep 0.05; done
    stop_recv; rm -f /dev/log
    start_recv dgram /dev/log "$o.recv2" || return 1
    touch "$T/step2"; wait $p
    stop_recv
    cat "$o.recv1" "$o.recv2" >"$o.recv"
}
reconnect reconn.glibc
reconnect reconn.vmw LD_PRELOAD="$LIB" VMWATCH_SYSLOG_TEE="$T/reconn.tee"
reconn_check() {
    C count "$T/reconn.vmw.recv" 3 &&
        C cmp-dgram "$T/reconn.glibc.recv" "$T/reconn.glibc.pid" "$T/reconn.vmw.recv" "$T/reconn.vmw.pid" &&
        C tee-vs-recv "$T/reconn.tee" "$T/reconn.vmw.recv"
}
check "receiver restarted between messages: reconnect, nothing lost, identical" reconn_check

# ---------------------------------------------------------------- cancellation
run cancel.vmw dgram LD_PRELOAD="$LIB" -- "$B/t_cancel"
cancel_check() { grep -qx done "$T/cancel.vmw.stdout" && C grep-recv "$T/cancel.vmw.recv" 'after cancel [0-9]+$' 20; }
check "pthread_cancel inside syslog releases the lock (20 rounds)" cancel_check

# ---------------------------------------------------------------- (7) python3
PYPROG='import syslog
syslog.openlog("pytest", syslog.LOG_PID, syslog.LOG_LOCAL6)
syslog.syslog(syslog.LOG_WARNING, "hello from python %s")
syslog.syslog("default priority")
syslog.setlogmask(syslog.LOG_UPTO(syslog.LOG_NOTICE))
syslog.syslog(syslog.LOG_INFO, "masked")
syslog.syslog(syslog.LOG_ERR, "x" * 70000)
syslog.closelog()
syslog.syslog(syslog.LOG_ERR, "after closelog, unicode \u00e9\u20ac")'
pair python dgram -- "$PY" -c "$PYPROG"
check "python3 syslog module: /dev/log identical to glibc's" \
    C cmp-dgram "$T/python.glibc.recv" "$T/python.glibc.pid" "$T/python.vmw.recv" "$T/python.vmw.pid"
check "python3 syslog module: doorbell == /dev/log" C tee-vs-recv "$T/python.tee" "$T/python.vmw.recv"

# ---------------------------------------------------------------- symbol binding
bindings() {  # SYMBOL... -- PROGRAM ARGS...
    local syms=()
    while [ "$1" != "--" ]; do syms+=("$1"); shift; done; shift
    LD_DEBUG=bindings LD_DEBUG_OUTPUT=$T/bind LD_PRELOAD=$LIB VMWATCH_SYSLOG_LOCAL=0 "$@" >/dev/null 2>&1
    for s in "${syms[@]}"; do
        grep -h "normal symbol \`$s'" "$T"/bind.* | grep -q "to $LIB " ||
            { echo "$s not bound to libvmwsyslog.so:"; grep -h "symbol \`$s'" "$T"/bind.*; rm -f "$T"/bind.*; return 1; }
    done
    rm -f "$T"/bind.*; echo "bound: ${syms[*]}"
}
check "LD_PRELOAD: versioned references (GLIBC_2.2.5) bind to libvmwsyslog.so" \
    bindings openlog syslog setlogmask closelog -- "$B/t_small"
check "LD_PRELOAD: __syslog_chk/__vsyslog_chk (GLIBC_2.4) bind to libvmwsyslog.so" \
    bindings __syslog_chk __vsyslog_chk -- "$B/t_fortify"
check "LD_PRELOAD: python3's __syslog_chk/openlog bind to libvmwsyslog.so" \
    bindings openlog __syslog_chk closelog -- "$PY" -c 'import syslog; syslog.syslog("x"); syslog.closelog()'

# ---------------------------------------------------------------- real cpuid under gdb
if command -v gdb >/dev/null; then
    gdbrun() {
        rm -f "$T/gdb.tee" "$T/gdb.rings"
        VMWATCH_SYSLOG_LOCAL=0 gdb -q -batch -nx -ex "python OUT='$T/gdb.rings'" \
            -ex "set environment LD_PRELOAD=$LIB" -ex "set environment VMWATCH_SYSLOG_TEE=$T/gdb.tee" \
            -x "$HERE/tests/gdb_doorbell.py" --args "$B/t_small" >"$T/gdb.out" 2>&1 || { tail "$T/gdb.out"; return 1; }
        C doorbells "$T/gdb.rings" "$T/gdb.tee"
    }
    check "gdb at the cpuid: rax=0xffff, memory at rbx for rcx bytes == the message (parts for 100 KiB)" gdbrun
else
    echo "skip - gdb not installed: cpuid register check not run"
fi

# ---------------------------------------------------------------- /etc/ld.so.preload
preload_file() {
    mkdir -p "$T/etc.up" "$T/etc.work"
    echo "$LIB" >"$T/etc.up/ld.so.preload"
    mount -t overlay vmwsyslog-etc -o "lowerdir=/etc,upperdir=$T/etc.up,workdir=$T/etc.work" /etc || return 2
    ETC_MOUNTED=1
    run preload.vmw dgram VMWATCH_SYSLOG_TEE="$T/preload.tee" -- "$B/t_small"
    # setuid-root program run by nobody: the lib is loaded (ld.so.preload) but
    # secure_getenv must ignore VMWATCH_SYSLOG_TEE / VMWATCH_SYSLOG_LOCAL
    # (control: the same program without the setuid bit honours both)
    mkdir -m 1777 "$T/pub"
    cp "$B/t_small" "$T/t_small_suid"; chmod 4755 "$T/t_small_suid"
    cp "$B/t_small" "$T/t_small_nosuid"; chmod 755 "$T/t_small_nosuid"
    run suid.vmw dgram VMWATCH_SYSLOG_TEE="$T/pub/suid.tee" VMWATCH_SYSLOG_LOCAL=0 -- \
        setpriv --reuid=65534 --regid=65534 --clear-groups "$T/t_small_suid"
    run nosuid.vmw dgram VMWATCH_SYSLOG_TEE="$T/pub/nosuid.tee" VMWATCH_SYSLOG_LOCAL=0 -- \
        setpriv --reuid=65534 --regid=65534 --clear-groups "$T/t_small_nosuid"
    umount /etc; ETC_MOUNTED=0
    run preload.glibc dgram -- "$B/t_small"
    C cmp-dgram "$T/preload.glibc.recv" "$T/preload.glibc.pid" "$T/preload.vmw.recv" "$T/preload.vmw.pid" &&
        C tee-vs-recv "$T/preload.tee" "$T/preload.vmw.recv" || return 1
}
pout=$(preload_file 2>&1); prc=$?
if [ $prc = 2 ]; then
    echo "skip - cannot overlay-mount /etc in the namespace: /etc/ld.so.preload not tested"
else
    [ $prc = 0 ] && ok "/etc/ld.so.preload (no LD_PRELOAD): identical to glibc, doorbell rung" || bad "/etc/ld.so.preload" "$pout"
    suid() {
        [ ! -e "$T/pub/suid.tee" ] || { echo "tee file written by a setuid program"; return 1; }
        # 3 datagrams: ran as euid 0 (nobody may not connect to /dev/log) and LOCAL=0 was ignored
        C count "$T/suid.vmw.recv" 3 || return 1
        # control: not setuid -> LOCAL=0 and the tee are honoured
        C count "$T/nosuid.vmw.recv" 0 && [ -s "$T/pub/nosuid.tee" ] || { echo "control run without setuid: env not honoured"; return 1; }
    }
    if findmnt -n -o OPTIONS -T "$T" | grep -q nosuid; then
        echo "skip - $T is nosuid: setuid check not run"
    else
        check "setuid program: VMWATCH_SYSLOG_* ignored (secure_getenv), local logging kept" suid
    fi
fi

echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
