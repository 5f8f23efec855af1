#!/usr/bin/python3
"""Test receiver standing in for syslogd on /dev/log.

recv.py dgram  PATH OUT   AF_UNIX SOCK_DGRAM: OUT gets "LEN\\n" + datagram per message
recv.py stream PATH OUT   AF_UNIX SOCK_STREAM: OUT gets the raw byte stream
recv.py fifo   PATH OUT   PATH is a FIFO (fake /dev/console): OUT gets the bytes
OUT.ready is created once listening; SIGTERM drains what is queued and exits.
"""
import os
import select
import signal
import socket
import sys

mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
chunks = []

if mode == "dgram":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    fds = [s]
elif mode == "stream":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    fds = [s]
elif mode == "fifo":
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    keep = os.open(path, os.O_WRONLY)  # no EOF between writers
    fds = [r]
else:
    sys.exit("bad mode")

open(out + ".ready", "w").close()


def pump(timeout):
    """Handle whatever is ready; return True if anything was read."""
    got = False
    rd, _, _ = select.select(fds, [], [], timeout)
    for f in rd:
        if mode == "dgram":
            try:
                data = s.recv(1 << 21, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            chunks.append(b"%d\n" % len(data) + data)
            got = True
        elif mode == "stream" and f is s:
            c, _ = s.accept()
            fds.append(c)
            got = True
        elif mode == "stream":
            data = f.recv(1 << 20)
            if data:
                chunks.append(data)
            else:
                fds.remove(f)
                f.close()
            got = True
        else:
            try:
                data = os.read(r, 1 << 20)
            except BlockingIOError:
                continue
            chunks.append(data)
            got = bool(data)
    return got


while not stop:
    try:
        pump(0.05)
    except InterruptedError:
        pass
while pump(0.05):
    pass
with open(out, "wb") as f:
    f.write(b"".join(chunks))
