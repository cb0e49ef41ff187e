"""Who is on the other end of a client connection: the user ID the admin
verbs that stop the daemon or list every session ID (DRAIN, LIST) are
checked against (PROTOCOL.md §4.9).

On a unix socket the kernel says (``SO_PEERCRED``, which gives the process
ID too: the daemon's log lines about a connection name both).  A TCP client
on this machine owns a socket listed in ``/proc/net/tcp`` (or ``tcp6``) with
its local and remote ends swapped; its owner's uid is in that line.  A
client on another machine is not listed: no uid, so not an administrator.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Final

_UCRED: Final = struct.Struct("3i")  # pid, uid, gid


def unix_peer(sock: socket.socket) -> tuple[int, int] | None:
    """The uid and pid of the process at the other end of a unix socket (as
    the kernel recorded them when it connected: one system call), or None
    for another socket or if the kernel does not say."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return None
    return int(uid), int(pid)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process that owns the other end, or None if unknown."""
    try:
        if sock.family == socket.AF_UNIX:
            peer = unix_peer(sock)
            return None if peer is None else peer[0]
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return _tcp_owner(sock.getpeername()[:2], sock.getsockname()[:2])
    except OSError:
        pass
    return None


def may_administer(uid: int | None) -> bool:
    """Root and the daemon's own user may use DRAIN and LIST."""
    return uid is not None and uid in (0, os.geteuid())


def _tcp_owner(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid in /proc/net/tcp* of the socket whose local end is ``peer``
    and remote end ``local`` (the client's socket, seen from its side).

    The tables list every TCP socket of the host (a megabyte with 8,000):
    each is read whole and searched with ``bytes.find``, not split line by
    line in Python, which held the GIL for milliseconds (the daemon calls
    this in a thread, beside its event loop)."""
    ends = (_encode(peer).encode("ascii"), _encode(local).encode("ascii"))
    needle = b" %s %s " % ends
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, "rb") as f:
                table = f.read()
        except OSError:
            continue
        at = table.find(needle)
        while at >= 0:
            start = table.rfind(b"\n", 0, at) + 1
            end = table.find(b"\n", at)
            fields = table[start : len(table) if end < 0 else end].split()
            if len(fields) > 7 and (fields[1], fields[2]) == ends:
                try:
                    return int(fields[7])
                except ValueError:
                    break  # as a table we cannot read: try the next
            at = table.find(needle, at + 1)
    return None


def _encode(end: tuple[str, int]) -> str:
    """An address as /proc/net/tcp prints it: the address in host byte order
    32 bits at a time, in hex, a colon, the port in hex.  An IPv4-mapped IPv6
    address is printed as IPv4 when the client's socket is IPv4 (the usual
    case), so such addresses are matched in that form."""
    host, port = end
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    packed = address.packed
    words = "".join(packed[i : i + 4][::-1].hex() for i in range(0, len(packed), 4))
    return f"{words.upper()}:{port:04X}"
