"""systemd integration with the standard library only (no python-systemd):
readiness and status notifications (sd_notify(3)), the watchdog, and socket
activation (sd_listen_fds(3)).

Outside systemd every function here is a harmless no-op: :func:`notify`
returns False, :func:`watchdog_interval_s` returns None and
:func:`inherited_sockets` returns an empty list.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from typing import Final

import trio

from phpsess.addresses import TcpAddress, UnixAddress

log = logging.getLogger("phpsess")

# sd_listen_fds(3): passed descriptors start right after stdin/out/err.
SD_LISTEN_FDS_START: Final = 3
# A notification must never stall the event loop for long; systemd reads its
# notify socket promptly, so this only bites if systemd itself is wedged.
_NOTIFY_TIMEOUT_S: Final = 1.0
_STREAM_FAMILIES: Final = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)


class SystemdError(Exception):
    """What systemd handed us cannot be used; the message says how to fix
    the unit file."""


# -- sd_notify


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``, ``"STATUS=..."``, several joined
    by newlines) to systemd's $NOTIFY_SOCKET.

    Returns True if the datagram was sent, False outside systemd or when
    sending failed.  Never raises: a lost notification is logged at debug.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        address = "\0" + target[1:]  # Linux abstract namespace
    elif target.startswith("/"):
        address = target
    else:
        log.debug("event=sd_notify_skipped reason=unsupported_notify_socket value=%s", target)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_NOTIFY_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("event=sd_notify_failed socket=%s error=%s", target, exc)
        return False
    return True


# -- watchdog


def watchdog_interval_s() -> float | None:
    """The watchdog timeout systemd set (WatchdogSec=), in seconds, or None
    if no watchdog is enabled for this process."""
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None  # meant for a parent that exec'd us without clearing it
        except ValueError:
            log.debug("event=watchdog_ignored reason=bad_watchdog_pid value=%s", pid_text)
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.debug("event=watchdog_ignored reason=bad_watchdog_usec value=%s", usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


async def run_watchdog(
    interval_s: float | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping ``WATCHDOG=1`` at half the watchdog interval, forever.

    Being a Trio task is the point: it pings only while the event loop keeps
    scheduling tasks, so a wedged loop gets the daemon restarted.  Returns at
    once when no watchdog is configured.  ``interval_s`` overrides
    :func:`watchdog_interval_s` (for tests).
    """
    if interval_s is None:
        interval_s = watchdog_interval_s()
    task_status.started()
    if interval_s is None:
        return
    log.info("event=watchdog_enabled interval_s=%.3f", interval_s)
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval_s / 2)


# -- socket activation


def inherited_sockets(first_fd: int = SD_LISTEN_FDS_START) -> list[tuple[str, socket.socket]]:
    """The listening sockets systemd passed us (socket activation), as
    ``(name, socket)`` pairs; the name is the socket unit's
    FileDescriptorName= (``"unknown"`` if systemd sent none).

    Honours $LISTEN_PID (the variables are ignored unless it is our pid),
    $LISTEN_FDS and $LISTEN_FDNAMES, then removes all three from the
    environment so that children do not take the sockets for theirs.  Each
    descriptor is marked close-on-exec.  ``first_fd`` is 3 except in tests.

    Raises :class:`SystemdError` for malformed variables and for sockets the
    daemon cannot serve on (datagram sockets, ``Accept=yes`` connections).
    """
    pid_text = os.environ.pop("LISTEN_PID", None)
    fds_text = os.environ.pop("LISTEN_FDS", None)
    names_text = os.environ.pop("LISTEN_FDNAMES", None)
    if pid_text is None or fds_text is None:
        return []
    try:
        pid = int(pid_text)
    except ValueError:
        raise SystemdError(f"LISTEN_PID={pid_text!r} is not a process id") from None
    if pid != os.getpid():
        log.debug("event=listen_fds_ignored reason=listen_pid listen_pid=%d", pid)
        return []
    try:
        count = int(fds_text)
    except ValueError:
        raise SystemdError(f"LISTEN_FDS={fds_text!r} is not a number") from None
    if count < 0:
        raise SystemdError(f"LISTEN_FDS={fds_text!r} is negative")
    names = names_text.split(":") if names_text else ["unknown"] * count
    if len(names) != count:
        raise SystemdError(
            f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS={count}"
        )
    result: list[tuple[str, socket.socket]] = []
    try:
        for fd, name in zip(range(first_fd, first_fd + count), names, strict=True):
            result.append((name, _adopt(fd, name)))
    except BaseException:
        for _, sock in result:
            sock.close()
        raise
    return result


def _adopt(fd: int, name: str) -> socket.socket:
    what = f"inherited fd {fd} (FileDescriptorName={name})"
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        # Family, type and protocol are read from the descriptor.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise SystemdError(
                f"{what} is not a socket; the socket unit must use ListenStream="
            ) from None
        raise SystemdError(f"{what} is unusable: {exc.strerror}") from None
    try:
        if sock.family not in _STREAM_FAMILIES:
            raise SystemdError(
                f"{what} is a {_name(sock.family)} socket; phpsess serves only unix and "
                "TCP sockets (ListenStream=/path or ListenStream=HOST:PORT)"
            )
        if sock.type != socket.SOCK_STREAM:
            raise SystemdError(
                f"{what} is a {_name(sock.type)} socket, not a stream socket; use "
                "ListenStream= (not ListenDatagram= or ListenSequentialPacket=) "
                "in the socket unit"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise SystemdError(
                f"{what} is not a listening socket; the socket unit must not set Accept=yes"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def _name(constant: int) -> str:
    return getattr(constant, "name", str(constant))


def describe(sock: socket.socket) -> str:
    """An inherited socket as an address for logs: ``unix:/path``,
    ``unix:@abstract`` or ``tcp:HOST:PORT``."""
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        if name.startswith("\0"):
            return f"unix:@{name[1:]}"
        return str(UnixAddress(name)) if name else "unix:(unnamed)"
    host, port = name[:2]
    return str(TcpAddress(host, port))


def inherited_listeners() -> list[tuple[str, trio.SocketListener]]:
    """:func:`inherited_sockets` as Trio listeners, each with its address
    (see :func:`describe`).  Must run inside ``trio.run``."""
    listeners: list[tuple[str, trio.SocketListener]] = []
    for name, sock in inherited_sockets():
        address = describe(sock)
        log.info("event=socket_inherited name=%s fd=%d address=%s", name, sock.fileno(), address)
        listeners.append((address, trio.SocketListener(trio.socket.from_stdlib_socket(sock))))
    return listeners
