#!/usr/bin/python3
"""Comparison helpers for guest/syslog/test.sh.

File formats:
  *.recv (dgram)  "LEN\\n" + datagram, repeated (tests/recv.py)
  *.recv (stream) raw stream: each message followed by NUL
  tee file        "LEN BYTES\\n", repeated (libvmwsyslog.so VMWATCH_SYSLOG_TEE)
  *.pid           decimal pid of the program (for [PID] normalisation)

Exit status 0 = check passed; otherwise the reason is printed.
"""
import calendar
import re
import sys
import time

MAX_TRANSFER = 65536
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun",
          "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
TS_RE = rb"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 123]\d [0-2]\d:[0-5]\d:[0-6]\d"
HEAD_RE = re.compile(rb"^(<\d+>)(" + TS_RE + rb") ")
PART_RE = re.compile(rb"^(<\d+>" + TS_RE + rb" .*?: )\[part (\d+)/(\d+)\] ", re.S)


def fail(msg):
    print(msg)
    sys.exit(1)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def parse_dgram(path):
    data, out, i = read(path), [], 0
    while i < len(data):
        j = data.index(b"\n", i)
        n = int(data[i:j])
        out.append(data[j + 1:j + 1 + n])
        i = j + 1 + n
    return out


def parse_tee(path):
    try:
        data = read(path)
    except FileNotFoundError:
        return []
    out, i = [], 0
    while i < len(data):
        j = data.index(b" ", i)
        n = int(data[i:j])
        rec = data[j + 1:j + 1 + n]
        if len(rec) != n or data[j + 1 + n:j + 2 + n] != b"\n":
            fail("tee: truncated or malformed record at offset %d" % i)
        out.append(rec)
        i = j + 2 + n
    return out


def reassemble(recs):
    """Join numbered parts back into whole lines; validate the split."""
    out, i, nparts_total = [], 0, 0
    while i < len(recs):
        r = recs[i]
        if len(r) > MAX_TRANSFER:
            fail("tee: record %d is %d bytes > %d" % (i, len(r), MAX_TRANSFER))
        m = PART_RE.match(r)
        if not m or int(m.group(2)) != 1:
            out.append(r)
            i += 1
            continue
        hdr, n = m.group(1), int(m.group(3))
        if n < 2:
            fail("tee: part 1/%d" % n)
        slices = []
        for k in range(1, n + 1):
            if i + k - 1 >= len(recs):
                fail("tee: missing part %d/%d" % (k, n))
            p = recs[i + k - 1]
            if len(p) > MAX_TRANSFER:
                fail("tee: part %d/%d is %d bytes" % (k, n, len(p)))
            marker = hdr + b"[part %d/%d] " % (k, n)
            if not p.startswith(marker):
                fail("tee: part %d/%d has a wrong header/marker: %r" % (k, n, p[:80]))
            slices.append(p[len(marker):])
        sizes = {len(s) for s in slices[:-1]}
        if len(sizes) != 1 or len(slices[-1]) > min(sizes) or len(slices[-1]) == 0:
            fail("tee: uneven slices %r" % [len(s) for s in slices])
        # a part with the widest marker must fill the transfer exactly
        widest = len(hdr) + len(b"[part %d/%d] " % (n, n)) + len(slices[0])
        if widest != MAX_TRANSFER:
            fail("tee: parts are not filled to the bound (%d)" % widest)
        out.append(hdr + b"".join(slices))
        nparts_total += n
        i += n
    return out, nparts_total


def pid_of(path):
    return int(read(path).strip())


def normalize(msg, pid, stamps=None):
    m = HEAD_RE.match(msg)
    if m:
        if stamps is not None:
            stamps.append(m.group(2).decode())
        msg = m.group(1) + b"TIMESTAMP " + msg[m.end():]
    elif stamps is not None:
        fail("no valid RFC 3164 timestamp: %r" % msg[:60])
    return msg.replace(b"[%d]: " % pid, b"[PID]: ")


def ts_seconds(s):
    mon, day, hms = s[:3], int(s[4:6]), s[7:]
    h, mi, se = (int(x) for x in hms.split(":"))
    year = time.localtime().tm_year
    return calendar.timegm((year, MONTHS.index(mon) + 1, day, h, mi, se))


def check_stamps(stamps_a, stamps_b):
    """Both runs use local time (TZ set by the harness) and ran seconds apart."""
    now = time.localtime()
    now_s = calendar.timegm(now)
    for s in stamps_a + stamps_b:
        d = abs(ts_seconds(s) - now_s)
        if d > 600 and abs(d - 365 * 86400) > 600:
            fail("timestamp %r is not local time now (%d s off)" % (s, d))


def first_diff(a, b, what):
    if a == b:
        return
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            k = next(j for j in range(min(len(x), len(y)) + 1)
                     if j == min(len(x), len(y)) or x[j] != y[j])
            fail("%s: message %d differs at byte %d:\n  glibc: %r\n  vmw:   %r"
                 % (what, i, k, x[max(0, k - 40):k + 40], y[max(0, k - 40):k + 40]))
    fail("%s: %d vs %d messages" % (what, len(a), len(b)))


def cmd_cmp_dgram(a, apid, b, bpid):
    sa, sb = [], []
    na = [normalize(m, pid_of(apid), sa) for m in parse_dgram(a)]
    nb = [normalize(m, pid_of(bpid), sb) for m in parse_dgram(b)]
    if not na:
        fail("glibc run logged nothing")
    first_diff(na, nb, "dgram")
    check_stamps(sa, sb)
    print("%d messages identical" % len(na))


def cmd_cmp_sorted(a, apid, b, bpid):
    """Same multiset of datagrams (threads interleave differently per run)."""
    na = sorted(normalize(m, pid_of(apid)) for m in parse_dgram(a))
    nb = sorted(normalize(m, pid_of(bpid)) for m in parse_dgram(b))
    if not na:
        fail("glibc run logged nothing")
    first_diff(na, nb, "sorted dgram")
    print("%d messages identical (as sets)" % len(na))


STREAM_TS = re.compile(rb"(?:(?<=\x00)|^)(<\d+>)" + TS_RE + rb" ")


def norm_stream(data, pid):
    if not data.endswith(b"\x00"):
        fail("stream does not end with NUL")
    data = STREAM_TS.sub(rb"\1TIMESTAMP ", data)
    return data.replace(b"[%d]: " % pid, b"[PID]: ")


def cmd_cmp_stream(a, apid, b, bpid):
    na, nb = norm_stream(read(a), pid_of(apid)), norm_stream(read(b), pid_of(bpid))
    first_diff(na.split(b"\x00<"), nb.split(b"\x00<"), "stream")
    print("%d bytes identical" % len(na))


def cmd_tee_vs_recv(tee, recv, kind="dgram"):
    msgs, nparts = reassemble(parse_tee(tee))
    if kind == "stream":
        joined = b"".join(m + b"\x00" for m in msgs)
        if joined != read(recv):
            fail("tee (%d msgs) != stream" % len(msgs))
    else:
        first_diff(parse_dgram(recv), msgs, "tee vs /dev/log")
    print("%d doorbell messages (%d parts) == /dev/log bytes" % (len(msgs), nparts))


def cmd_tee_vs_glibc(tee, teepid, grecv, gpid):
    msgs, nparts = reassemble(parse_tee(tee))
    sa, sb = [], []
    na = [normalize(m, pid_of(gpid), sa) for m in parse_dgram(grecv)]
    nb = [normalize(m, pid_of(teepid), sb) for m in msgs]
    first_diff(na, nb, "tee vs glibc")
    check_stamps(sa, sb)
    print("%d doorbell messages (%d parts) == glibc's" % (len(nb), nparts))


def cmd_count(recv, n):
    got = len(parse_dgram(recv))
    if got != int(n):
        fail("%d messages, expected %s" % (got, n))
    print("%d messages" % got)


def cmd_threads(recv, nthreads, nmsg, tee=None):
    nthreads, nmsg = int(nthreads), int(nmsg)
    msgs = parse_tee(recv) if tee == "tee" else parse_dgram(recv)
    if tee == "tee":
        msgs, _ = reassemble(msgs)
    seen = {}
    last = [-1] * nthreads
    for m in msgs:
        mm = re.search(rb": thread (\d+) msg (\d+)$", m)
        if not mm:
            fail("unexpected message %r" % m)
        t, i = int(mm.group(1)), int(mm.group(2))
        seen[(t, i)] = seen.get((t, i), 0) + 1
        if i <= last[t]:
            fail("thread %d: message %d after %d" % (t, i, last[t]))
        last[t] = i
    want = {(t, i) for t in range(nthreads) for i in range(nmsg)}
    missing = want - set(seen)
    dup = [k for k, v in seen.items() if v != 1]
    if missing or dup or len(msgs) != len(want):
        fail("missing %d, duplicated %d, total %d/%d"
             % (len(missing), len(dup), len(msgs), len(want)))
    print("%d messages, each exactly once, in order per thread" % len(msgs))


def cmd_cmp_text(a, apid, b, bpid):
    ta = read(a).replace(b"[%d]" % pid_of(apid), b"[PID]")
    tb = read(b).replace(b"[%d]" % pid_of(bpid), b"[PID]")
    if ta != tb:
        la, lb = ta.split(b"\n"), tb.split(b"\n")
        first_diff(la, lb, "text")
    print("%d bytes identical" % len(ta))


def cmd_grep_recv(recv, regex, n):
    msgs = parse_dgram(recv)
    got = [m for m in msgs if re.search(regex.encode(), m)]
    if len(got) != int(n):
        fail("%d messages match %r, expected %s" % (len(got), regex, n))
    print("%d of %d messages match" % (len(got), len(msgs)))


def cmd_doorbells(gdblog, tee):
    """gdb's record of cpuid executions vs the tee file (same run)."""
    rings, data, i = [], read(gdblog), 0
    while i < len(data):
        j = data.index(b"\n", i)
        rax, rbx, rcx = (int(x, 16) for x in data[i:j].split())
        rec = data[j + 1:j + 1 + rcx]
        if rax != 0xFFFF:
            fail("cpuid with rax=%#x" % rax)
        if rbx == 0:
            fail("rbx = 0")
        rings.append(rec)
        i = j + 1 + rcx
    tee_recs = parse_tee(tee)
    if not rings:
        fail("gdb saw no doorbell")
    first_diff(tee_recs, rings, "cpuid buffers vs tee")
    print("%d cpuid doorbells: rax=0xffff, rbx/rcx point at the tee'd bytes" % len(rings))


if __name__ == "__main__":
    cmds = {k[4:].replace("_", "-"): v for k, v in globals().items() if k.startswith("cmd_")}
    cmds[sys.argv[1]](*sys.argv[2:])
