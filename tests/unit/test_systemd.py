"""phpsess.systemd against real sockets: sd_notify datagrams, the watchdog
variables, and socket activation with real inherited descriptors."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from phpsess import systemd
from tests.conftest import ROOT

_ENV = (
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


# -- notify


def test_notify_sends_one_datagram(receiver: socket.socket) -> None:
    assert systemd.notify("READY=1\nSTATUS=serving on unix:/x")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving on unix:/x"
    assert systemd.notify("STOPPING=1")
    assert receiver.recv(4096) == b"STOPPING=1"


def test_notify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"phpsess-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_notify_is_a_no_op_outside_systemd() -> None:
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", ""])
def test_notify_ignores_unsupported_addresses(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False


def test_notify_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False


# -- watchdog


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        ("30000000", "junk", None),
        ("0", None, None),
        ("-5", None, None),
        ("junk", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        pid_value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", pid_value)
    assert systemd.watchdog_interval_s() == expected


async def test_watchdog_pings_at_half_the_interval(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")  # 10 s: a ping every 5 s
    receiver.setblocking(False)
    async with trio.open_nursery() as nursery:
        await nursery.start(systemd.run_watchdog)
        start = trio.current_time()
        await trio.sleep(12)  # pings at 0, 5 and 10 s
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(12)
    pings = []
    while True:
        try:
            pings.append(receiver.recv(4096))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 3


async def test_watchdog_returns_without_a_watchdog() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(systemd.run_watchdog)
    # Reaching here means the task ended on its own.


# -- socket activation


def _listening(family: int = socket.AF_UNIX, tmp: Path | None = None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        assert tmp is not None
        sock.bind(str(tmp / f"s{secrets.token_hex(4)}"))
    else:
        sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _free_fd_run(count: int) -> int:
    """The first of ``count`` consecutive unused descriptor numbers."""
    base = 200
    while True:
        for fd in range(base, base + count):
            try:
                fcntl.fcntl(fd, fcntl.F_GETFD)
            except OSError:
                continue
            break
        else:
            return base
        base += count


@pytest.fixture
def passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, list[socket.socket]]]:
    """A unix and a TCP listening socket at consecutive fds, as systemd passes them."""
    originals = [_listening(socket.AF_UNIX, tmp_path), _listening(socket.AF_INET)]
    first = _free_fd_run(len(originals))
    for i, sock in enumerate(originals):
        os.dup2(sock.fileno(), first + i)  # inheritable, as systemd leaves them
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", str(len(originals)))
    yield first, originals
    for i in range(len(originals)):
        with contextlib.suppress(OSError):  # adopted and closed by the test
            os.close(first + i)
    for sock in originals:
        sock.close()


def test_inherited_sockets_with_names(
    passed: tuple[int, list[socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, originals = passed
    monkeypatch.setenv("LISTEN_FDNAMES", "client:tcp")
    got = systemd.inherited_sockets(first_fd=first)
    try:
        assert [name for name, _ in got] == ["client", "tcp"]
        unix_sock, tcp_sock = got[0][1], got[1][1]
        assert unix_sock.fileno() == first and tcp_sock.fileno() == first + 1
        assert unix_sock.family == socket.AF_UNIX and tcp_sock.family == socket.AF_INET
        assert unix_sock.type == tcp_sock.type == socket.SOCK_STREAM
        for _, sock in got:
            assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert not sock.get_inheritable()
        assert systemd.describe(unix_sock) == f"unix:{originals[0].getsockname()}"
        assert systemd.describe(tcp_sock) == f"tcp:127.0.0.1:{originals[1].getsockname()[1]}"
        # They really are the listening sockets: a client gets through.
        with socket.create_connection(originals[1].getsockname()):
            conn, _ = tcp_sock.accept()
            conn.close()
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            assert name not in os.environ
    finally:
        for _, sock in got:
            sock.close()


def test_inherited_sockets_without_names(passed: tuple[int, list[socket.socket]]) -> None:
    first, _ = passed
    got = systemd.inherited_sockets(first_fd=first)
    assert [name for name, _ in got] == ["unknown", "unknown"]
    for _, sock in got:
        sock.close()


def test_wrong_listen_pid_is_ignored(
    passed: tuple[int, list[socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = passed
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert systemd.inherited_sockets(first_fd=first) == []
    assert "LISTEN_FDS" not in os.environ  # still unset, as sd_listen_fds does
    fcntl.fcntl(first, fcntl.F_GETFD)  # and the descriptors were left alone


def test_no_variables_no_sockets() -> None:
    assert systemd.inherited_sockets() == []


@pytest.mark.parametrize(
    ("pid", "fds", "names", "message"),
    [
        ("junk", "1", None, "LISTEN_PID"),
        (None, "junk", None, "LISTEN_FDS"),
        (None, "-1", None, "negative"),
        (None, "2", "client", "LISTEN_FDNAMES names 1 sockets but LISTEN_FDS=2"),
    ],
)
def test_malformed_variables_are_errors(
    monkeypatch: pytest.MonkeyPatch, pid: str | None, fds: str, names: str | None, message: str
) -> None:
    monkeypatch.setenv("LISTEN_PID", pid or str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", fds)
    if names is not None:
        monkeypatch.setenv("LISTEN_FDNAMES", names)
    with pytest.raises(systemd.SystemdError, match=message):
        systemd.inherited_sockets(first_fd=_free_fd_run(2))


@pytest.fixture
def pass_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], int]]:
    """Pass a copy of one descriptor as systemd would; the number it got."""
    used: list[int] = []

    def pass_fd(fileno: int) -> int:
        fd = _free_fd_run(1)
        os.dup2(fileno, fd)
        used.append(fd)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        monkeypatch.setenv("LISTEN_FDNAMES", "client")
        return fd

    yield pass_fd
    for fd in used:
        with contextlib.suppress(OSError):  # closed when rejected
            os.close(fd)


def test_datagram_socket_is_rejected(pass_one: Callable[[int], int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
        dgram.bind(("127.0.0.1", 0))
        fd = pass_one(dgram.fileno())
        with pytest.raises(systemd.SystemdError, match="not a stream socket; use ListenStream="):
            systemd.inherited_sockets(first_fd=fd)


def test_connected_socket_is_rejected(pass_one: Callable[[int], int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        fd = pass_one(a.fileno())
        with pytest.raises(systemd.SystemdError, match=r"not a listening socket.*Accept=yes"):
            systemd.inherited_sockets(first_fd=fd)


def test_non_socket_is_rejected(pass_one: Callable[[int], int], tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        fd = pass_one(f.fileno())
        with pytest.raises(systemd.SystemdError, match="not a socket"):
            systemd.inherited_sockets(first_fd=fd)


def test_describe_abstract_and_ipv6() -> None:
    name = f"phpsess-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("\0" + name)
        assert systemd.describe(sock) == f"unix:@{name}"
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        assert systemd.describe(sock) == f"tcp:[::1]:{sock.getsockname()[1]}"


def test_real_fd_3_in_a_child_process(tmp_path: Path) -> None:
    """The default ``first_fd=3``, in a process that got the socket as fd 3
    across exec, with LISTEN_PID naming it, as systemd starts a service."""
    sock = _listening(socket.AF_UNIX, tmp_path)
    path = sock.getsockname()
    script = textwrap.dedent(
        """
        import os
        from phpsess import systemd
        got = systemd.inherited_sockets()
        print([(n, s.fileno(), systemd.describe(s)) for n, s in got])
        print(sorted(k for k in os.environ if k.startswith("LISTEN_")))
        """
    )
    fd = sock.fileno()
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "client"}
    env.pop("LISTEN_PID", None)
    with sock:
        out = subprocess.run(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-c", script],
            # close_fds=False: with pass_fds, the child would close fd 3
            # after preexec_fn made it.  Python's own descriptors are
            # close-on-exec anyway; only fd 3 crosses exec.
            preexec_fn=lambda: os.dup2(fd, 3),
            close_fds=False,
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    assert out.splitlines() == [
        f"[('client', 3, 'unix:{path}')]",
        "[]",
    ]
