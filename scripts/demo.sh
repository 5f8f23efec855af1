#!/usr/bin/env bash
# The main job: boots two lab VMs (Debian's 6.1 and 6.12 kernels, KASLR on),
# starts a small workload in each through the test agent, and shows what
# vmwatch reads from their RAM from outside: where the kernel is, processes,
# open files, sockets and modules. Leaves the VMs running with --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
V=target/release/vmwatch
keep=0; [ "${1:-}" = "--keep" ] && keep=1
vms=(demo-web demo-db)
flavours=(stable backports)
cleanup() { [ $keep = 1 ] || for vm in "${vms[@]}"; do $V lab down "$vm" >/dev/null 2>&1 || true; done; }
trap cleanup EXIT
for i in 0 1; do
    $V lab down "${vms[$i]}" >/dev/null 2>&1 || true
    $V lab up "${vms[$i]}" --kernel "${flavours[$i]}"
done
# The workload (driven through the test-only agent; vmwatch never asks it anything).
for vm in "${vms[@]}"; do
    $V lab exec "$vm" -- sh -c '
        echo "quarterly numbers" > /root/secret.txt
        setsid sleep 100000 < /root/secret.txt >/dev/null 2>&1 &
        setsid sh -c "sleep 100001 | sleep 100002" </dev/null >/dev/null 2>&1 &
        setsid /usr/bin/nc -lk 8080 </dev/null >/dev/null 2>&1 &
        sleep 1; python3 -c "import socket; socket.create_connection((\"127.0.0.1\", 8080)).close()" 2>/dev/null || true
        modprobe dummy' >/dev/null
done
sleep 1
for vm in "${vms[@]}"; do
    echo
    echo "================ $vm: what vmwatch sees from outside the guest ================"
    echo "--- vmwatch kernel --vm $vm"; $V kernel --vm "$vm"
    echo "--- vmwatch ps --vm $vm (user processes)"; $V ps --vm "$vm" | grep -v '\[kernel\]'
    echo "--- vmwatch lsof --vm $vm (regular files and pipes)"; $V lsof --vm "$vm" | grep -E 'PATH|regular|pipe'
    echo "--- vmwatch sockets --vm $vm"; $V sockets --vm "$vm"
    echo "--- vmwatch modules --vm $vm"; $V modules --vm "$vm"
done
echo
echo "================ both VMs: live syscalls, seen by the hook plugin in QEMU, through vmwatchd ================"
export VMWATCHD_DIR="$(mktemp -d)"   # the demo's own daemon (socket, token)
target/release/vmwatchd --watch demo-web --watch demo-db 2>/dev/null &
daemon=$!
trap 'kill $daemon 2>/dev/null || true; cleanup' EXIT
for _ in $(seq 50); do $V daemon status >/dev/null 2>&1 && break; sleep 0.1; done
echo "--- vmwatch trace --vm '*' --syscall openat,read,write,close,execve,copy_file_range,sendfile --fds --comm cp (while each guest copies its secret)"
$V trace --vm '*' --syscall openat,read,write,close,execve,copy_file_range,sendfile --fds --comm cp --duration 8 &
tracer=$!
sleep 2
for vm in "${vms[@]}"; do
    $V lab exec "$vm" -- sh -c 'cp /root/secret.txt /root/copy.txt' >/dev/null
done
wait $tracer || true
echo "--- vmwatch daemon status"
$V daemon status
kill $daemon 2>/dev/null || true
echo
$V lab ls
[ $keep = 1 ] && echo "VMs left running; stop them with: $V lab down --all"
exit 0
