//! Files we write into the guest image ourselves: init, inittab, users.
//!
//! Boot: the kernel runs `/init` (busybox sh), which mounts the pseudo
//! filesystems, sets the hostname from `vmwatch.name=` on the kernel command
//! line, brings `lo` up, configures the NICs when the command line asks
//! (`vmwatch.net=ADDR/LEN,GATEWAY,DNS` for eth0, `vmwatch.lan=ADDR/LEN` for
//! eth1; see `vm::UpOptions::network`) and hands PID 1 to busybox `init`.
//! busybox init reaps orphans and respawns the agent on `/dev/ttyS1` (and a
//! shell on the console).

/// `/init`.
pub const INIT: &str = r#"#!/bin/sh
# vmwatch lab guest init (written by `vmwatch lab build`; do not edit in the guest).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
name=lab
net=
lan=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmwatch.name=*) name="${arg#vmwatch.name=}" ;;
    vmwatch.net=*) net="${arg#vmwatch.net=}" ;;
    vmwatch.lan=*) lan="${arg#vmwatch.lan=}" ;;
  esac
done
hostname "$name"
echo "$name" > /etc/hostname
echo "127.0.0.1 localhost $name" > /etc/hosts
ip link set lo up
# The NICs are virtio-net on PCI, modules in Debian's kernel; the host puts
# the slirp NIC in a lower PCI slot than the LAN NIC, so it is eth0.
# Without vmwatch.net/lan (networking off) nothing is loaded: only lo.
# IPv6 stays off on them: the lab's traffic is what its tests send.
netup() {
  i=0
  while [ ! -e "/sys/class/net/$1" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  if [ ! -e "/sys/class/net/$1" ]; then
    echo "vmwatch: no $1: the network is not configured" >&2
    return 1
  fi
  echo 1 > "/proc/sys/net/ipv6/conf/$1/disable_ipv6"
  ip addr add "$2" dev "$1" && ip link set "$1" up
}
if [ -n "$net$lan" ]; then
  modprobe virtio_pci
  modprobe virtio_net
fi
if [ -n "$net" ]; then
  oldifs=$IFS; IFS=,; set -- $net; IFS=$oldifs
  if netup eth0 "$1"; then
    [ -n "$2" ] && ip route add default via "$2" dev eth0
    [ -n "$3" ] && echo "nameserver $3" > /etc/resolv.conf
  fi
fi
[ -n "$lan" ] && netup eth1 "$lan"
echo "vmwatch: guest $name init done at $(cut -d' ' -f1 /proc/uptime)s${net:+, eth0 ${net%%,*}}${lan:+, eth1 $lan}"
exec /usr/bin/busybox init
"#;

/// `/etc/inittab` for busybox init.
pub const INITTAB: &str = "\
::sysinit:/bin/true
::respawn:/usr/sbin/vmwatch-agent-loop
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/sbin/poweroff -f
::shutdown:/bin/sync
";

/// `/usr/sbin/vmwatch-agent-loop`: one agent life, then a pause so a broken
/// agent cannot spin (busybox init respawns this script at once).
pub const AGENT_LOOP: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
cd /
/usr/sbin/vmwatch-agent /dev/ttyS1 </dev/null >/dev/null 2>>/run/vmwatch-agent.err
sleep 1
"#;

pub const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
user:x:1000:1000:lab user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
";

pub const GROUP: &str = "\
root:x:0:
daemon:x:1:
user:x:1000:
nogroup:x:65534:
";

pub const PROFILE: &str = r#"export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PS1='\h:\w\$ '
"#;

/// Every guest file with its path and mode.
pub fn files() -> [(&'static str, &'static str, u32); 8] {
    [
        // Every dynamically linked program loads the log-vault syslog
        // library (built from SYSLOG_LIB_SOURCE at image build time).
        (
            "etc/ld.so.preload",
            "/usr/lib/vmwatch/libvmwsyslog.so\n",
            0o644,
        ),
        ("init", INIT, 0o755),
        ("etc/inittab", INITTAB, 0o644),
        ("usr/sbin/vmwatch-agent-loop", AGENT_LOOP, 0o755),
        ("etc/passwd", PASSWD, 0o644),
        ("etc/group", GROUP, 0o644),
        ("etc/profile", PROFILE, 0o644),
        ("etc/shells", "/bin/sh\n/bin/bash\n", 0o644),
    ]
}

/// Where the syslog replacement library lives in the guest.
pub const SYSLOG_LIB_PATH: &str = "usr/lib/vmwatch/libvmwsyslog.so";

/// The source of the syslog replacement library (`guest/syslog`): compiled
/// on the host (same glibc as the guest: both Debian bookworm) into the image.
pub const SYSLOG_LIB_SOURCE: &str = include_str!("../../../../guest/syslog/vmwsyslog.c");

/// Compiler flags of the library, as `guest/syslog/Makefile` has them.
pub const SYSLOG_LIB_CFLAGS: [&str; 13] = [
    "-O2",
    "-fPIC",
    "-shared",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fexceptions",
    "-fvisibility=hidden",
    "-Wl,-soname,libvmwsyslog.so",
    "-Wl,-z,relro,-z,now",
    "-x",
    "c",
    "-",
];
