//! Lab VM networking: eth0 on QEMU's user-mode network reaches the host,
//! eth1 on the lab LAN reaches the other lab VMs, and `network: false`
//! leaves the guest with `lo` only.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

use common::*;
use lab::{Flavour, UpOptions, Vm, VmInfo};

/// One row of a /proc/net/tcp table: local, remote, state (1 = ESTABLISHED), inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpRow {
    local: SocketAddrV4,
    remote: SocketAddrV4,
    state: u8,
    inode: u64,
}

/// `0F02000A:1F90` (address as the kernel stores it, little-endian here).
fn parse_hex_addr(s: &str) -> Option<SocketAddrV4> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.swap_bytes()), port))
}

fn parse_proc_net_tcp(text: &str) -> Vec<TcpRow> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(TcpRow {
                local: parse_hex_addr(f.get(1)?)?,
                remote: parse_hex_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Runs a shell script in the guest and returns its stdout; fails the test
/// with both streams if it fails.
fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec_sh(script).expect("agent exec");
    assert!(
        out.success(),
        "{}: script failed ({}):\n{script}\nstdout: {}\nstderr: {}",
        vm.name(),
        out.code(),
        out.stdout_str(),
        out.stderr_str()
    );
    out.stdout_str()
}

/// The guest's IPv4 addresses per interface, from `ip -4 -o addr`.
fn guest_addrs(vm: &Vm) -> Vec<(String, String)> {
    sh(vm, "ip -4 -o addr show")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "inet")?;
            Some((f.get(1)?.to_string(), f.get(i + 1)?.to_string()))
        })
        .collect()
}

/// The VM's addresses as vm.json records them.
fn network_of(vm: &Vm) -> lab::vm::VmNetwork {
    vm.info()
        .network
        .clone()
        .unwrap_or_else(|| panic!("{}: vm.json has no network", vm.name()))
}

/// True if one of `pid`'s open files is the socket with this inode.
fn process_holds_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .any(|target| target.as_os_str() == want.as_str())
        })
        .unwrap_or(false)
}

#[test]
fn guest_connects_to_the_host_over_slirp() {
    require_image(Flavour::Stable);
    let vm = boot(&UpOptions::new(&unique_name("nh")));
    let net = network_of(&vm);
    assert_eq!(net.guest_ip, Ipv4Addr::new(10, 0, 2, 15));
    assert_eq!(net.host_ip, Ipv4Addr::new(10, 0, 2, 2));
    let addrs = guest_addrs(&vm);
    assert!(
        addrs.contains(&("eth0".into(), "10.0.2.15/24".into())),
        "{addrs:?}"
    );
    assert!(
        addrs.contains(&("eth1".into(), format!("{}/24", net.lan_ip))),
        "{addrs:?}"
    );

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let line = format!("leak {} {}", std::process::id(), vm.info().uuid);
    let qemu_pid = vm.info().qemu_pid;
    // The host side: accept (bounded), read the line, check that the
    // connection is slirp's (a socket of this VM's QEMU), answer `ok`.
    let host = std::thread::spawn(move || -> (String, SocketAddrV4, bool) {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let (conn, peer) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no connection from the guest");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let std::net::SocketAddr::V4(peer) = peer else {
            panic!("IPv6 peer {peer}")
        };
        let mut got = String::new();
        BufReader::new(&conn).read_line(&mut got).unwrap();
        let rows = parse_proc_net_tcp(&std::fs::read_to_string("/proc/net/tcp").unwrap());
        let from_qemu = rows
            .iter()
            .filter(|r| r.local == peer && r.remote.port() == port)
            .any(|r| process_holds_socket(qemu_pid, r.inode));
        (&conn).write_all(b"ok\n").unwrap();
        (got, peer, from_qemu)
    });

    let script = format!(
        "import socket\n\
         s = socket.create_connection(('10.0.2.2', {port}), timeout=60)\n\
         print('%s:%d' % s.getsockname()); print('%s:%d' % s.getpeername())\n\
         s.sendall(b'{line}\\n')\n\
         print(s.makefile().readline().strip())\n"
    );
    let out = vm.exec(&["python3", "-c", &script]).expect("agent exec");
    assert!(out.success(), "guest client failed: {out:?}");
    let (got, peer, from_qemu) = host.join().expect("host side");
    assert_eq!(got, format!("{line}\n"), "the host got other bytes");
    assert_eq!(
        *peer.ip(),
        Ipv4Addr::LOCALHOST,
        "slirp connects from loopback"
    );
    assert!(
        from_qemu,
        "the host's end of the connection from {peer} is not a socket of QEMU pid {qemu_pid}"
    );
    let stdout = out.stdout_str();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("10.0.2.15:"), "guest end: {stdout}");
    assert_eq!(
        lines[1],
        format!("10.0.2.2:{port}"),
        "guest's peer: {stdout}"
    );
    assert_eq!(lines[2], "ok", "the host's answer: {stdout}");
}

#[test]
fn two_vms_talk_over_the_lab_lan() {
    require_image(Flavour::Stable);
    require_image(Flavour::Backports);
    // One VM of each kernel, so both load the NIC driver and configure it.
    let mut opts_b = UpOptions::new(&unique_name("nb"));
    opts_b.flavour = Flavour::Backports;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| boot(&UpOptions::new(&unique_name("na"))));
        let b = s.spawn(|| boot(&opts_b));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (na, nb) = (network_of(&a), network_of(&b));
    assert_ne!(na.lan_ip, nb.lan_ip, "two running VMs got one LAN address");
    assert_ne!(na.lan_mac, nb.lan_mac);
    assert_eq!(
        (na.lan_group, na.lan_port),
        (nb.lan_group, nb.lan_port),
        "VMs of one cache must share the LAN"
    );
    for (vm, net) in [(&a, &na), (&b, &nb)] {
        let addrs = guest_addrs(vm);
        assert!(
            addrs.contains(&("eth1".into(), format!("{}/24", net.lan_ip))),
            "{}: {addrs:?}",
            vm.name()
        );
        let mac = sh(vm, "cat /sys/class/net/eth1/address");
        assert_eq!(mac.trim(), net.lan_mac, "{}", vm.name());
    }

    // B: a server on its LAN address that writes what it got and from whom,
    // then holds the connection until the client closes it.
    let line = format!("lan {} {}", std::process::id(), a.info().uuid);
    let server = format!(
        "import socket\n\
         s = socket.socket(); s.bind(('{b}', 7777)); s.listen()\n\
         c, peer = s.accept()\n\
         f = c.makefile('rb')\n\
         data = f.readline()\n\
         open('/tmp/got.tmp', 'wb').write(data + ('%s:%d\\n' % c.getpeername()).encode())\n\
         import os; os.rename('/tmp/got.tmp', '/tmp/got')\n\
         f.read()\n",
        b = nb.lan_ip
    );
    sh(
        &b,
        &format!(
            "cat > /tmp/server.py <<'EOF'\n{server}EOF\n\
             setsid python3 /tmp/server.py < /dev/null > /tmp/server.log 2>&1 &\n\
             for i in $(seq 300); do grep -q ':1E61 00000000:0000 0A' /proc/net/tcp && exit 0; sleep 0.1; done\n\
             echo 'server not listening:'; cat /tmp/server.log; exit 1\n"
        ),
    );
    // A: a client that sends the line, records both ends, and keeps the
    // connection open until told to close (so both tables show it).
    let client = format!(
        "import socket, os, time\n\
         s = socket.create_connection(('{b}', 7777), timeout=60)\n\
         open('/tmp/ends.tmp', 'w').write('%s:%d %s:%d\\n' % (s.getsockname() + s.getpeername()))\n\
         os.rename('/tmp/ends.tmp', '/tmp/ends')\n\
         s.sendall(b'{line}\\n')\n\
         t = time.time()\n\
         while not os.path.exists('/tmp/close') and time.time() - t < 120: time.sleep(0.05)\n\
         s.close()\n",
        b = nb.lan_ip
    );
    let ends = sh(
        &a,
        &format!(
            "cat > /tmp/client.py <<'EOF'\n{client}EOF\n\
             setsid python3 /tmp/client.py < /dev/null > /tmp/client.log 2>&1 &\n\
             for i in $(seq 300); do [ -e /tmp/ends ] && cat /tmp/ends && exit 0; sleep 0.1; done\n\
             echo 'client did not connect:'; cat /tmp/client.log; exit 1\n"
        ),
    );
    let got = sh(
        &b,
        "for i in $(seq 300); do [ -e /tmp/got ] && cat /tmp/got && exit 0; sleep 0.1; done\n\
         echo 'nothing received:'; cat /tmp/server.log; exit 1\n",
    );
    let tcp_a = parse_proc_net_tcp(&sh(&a, "cat /proc/net/tcp"));
    let tcp_b = parse_proc_net_tcp(&sh(&b, "cat /proc/net/tcp"));
    sh(&a, "touch /tmp/close");

    // What the peers report.
    let (a_end, b_end) = ends.trim().split_once(' ').expect("two ends");
    let a_end: SocketAddrV4 = a_end.parse().unwrap();
    let b_end: SocketAddrV4 = b_end.parse().unwrap();
    assert_eq!(*a_end.ip(), na.lan_ip, "A's end: {ends}");
    assert_eq!(
        b_end,
        SocketAddrV4::new(nb.lan_ip, 7777),
        "A's peer: {ends}"
    );
    let (data, peer) = got.split_once('\n').expect("line and peer");
    assert_eq!(data, line, "B got other bytes");
    assert_eq!(peer.trim(), a_end.to_string(), "B's peer is not A's end");

    // What the guest kernels show: the same connection from both sides.
    let est = |rows: &[TcpRow], local, remote| {
        rows.iter()
            .any(|r| r.local == local && r.remote == remote && r.state == 1)
    };
    assert!(est(&tcp_a, a_end, b_end), "A's /proc/net/tcp: {tcp_a:?}");
    assert!(est(&tcp_b, b_end, a_end), "B's /proc/net/tcp: {tcp_b:?}");
}

#[test]
fn network_off_leaves_only_lo() {
    require_image(Flavour::Stable);
    let mut opts = UpOptions::new(&unique_name("nn"));
    opts.network = false;
    let vm = boot(&opts);
    assert_eq!(vm.info().network, None);
    assert!(
        !vm.info().cmdline.contains("vmwatch.net"),
        "{}",
        vm.info().cmdline
    );
    assert!(!vm.info().qemu_argv.iter().any(|a| a == "-netdev"));
    assert_eq!(sh(&vm, "ls /sys/class/net").trim(), "lo");
    let modules = sh(&vm, "cut -d' ' -f1 /proc/modules");
    assert!(!modules.lines().any(|m| m == "virtio_net"), "{modules}");

    // A vm.json written before networking existed (no `network`) still loads.
    let path = vm.info().state_dir.join("vm.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("network");
    let old: VmInfo = serde_json::from_value(v).expect("old vm.json");
    assert_eq!(old.network, None);
}
