"""systemd integration with real processes: the unit files pass
``systemd-analyze verify``, a real daemon notifies readiness, status, watchdog
pings and stopping over a real $NOTIFY_SOCKET, and serves a socket passed to
it as fd 3 (socket activation)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = ROOT / "deploy" / "systemd"


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        # Never skip: scripts/bootstrap installs it (Debian package systemd).
        pytest.fail("systemd-analyze is not installed; run scripts/test (it installs systemd)")
    return path


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart= is executable; point it at the phpsess
    # of this checkout instead of /usr/bin/phpsess.  Nothing else changes.
    phpsess = Path(sys.executable).with_name("phpsess")
    assert phpsess.exists(), f"{phpsess} is missing; run scripts/bootstrap"
    service = (UNITS / "phpsess.service").read_text()
    assert "ExecStart=/usr/bin/phpsess serve" in service
    (tmp_path / "phpsess.service").write_text(service.replace("/usr/bin/phpsess", str(phpsess)))
    shutil.copy(UNITS / "phpsess.socket", tmp_path / "phpsess.socket")
    result = subprocess.run(
        [_systemd_analyze(), "verify",
         str(tmp_path / "phpsess.service"), str(tmp_path / "phpsess.socket")],
        capture_output=True, text=True, timeout=60,
    )
    # verify exits 0 on warnings too: any output at all is a finding.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


class _Notifications:
    """A $NOTIFY_SOCKET like systemd's: a unix datagram socket we read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.received: list[str] = []

    def wait_until(self, done: Callable[[list[str]], bool], timeout_s: float = 15) -> None:
        """Receive until ``done(every line received so far)``."""
        deadline = time.monotonic() + timeout_s
        while not done(self.received):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout_s} s; got {self.received}")
            self.sock.settimeout(remaining)
            try:
                datagram = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.extend(datagram.decode().split("\n"))

    def wait_for(self, prefix: str, timeout_s: float = 15) -> str:
        """The first received line starting with ``prefix``."""
        self.wait_until(lambda lines: any(x.startswith(prefix) for x in lines), timeout_s)
        return next(x for x in self.received if x.startswith(prefix))


@pytest.fixture
def notifications(workdir: Path) -> Iterator[_Notifications]:
    n = _Notifications(str(workdir / "notify"))
    yield n
    n.sock.close()


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID",
                        "LISTEN_FDS", "LISTEN_FDNAMES")}
    env.update(extra)
    return env


def _hello(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(path)
        c.sendall(b"HELLO 1\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


def test_daemon_notifies_ready_status_watchdog_and_stopping(
    workdir: Path, notifications: _Notifications
) -> None:
    sock_path = str(workdir / "phpsess.sock")
    log_path = workdir / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "phpsess", "serve", "--memory-only",
             "--listen", f"unix:{sock_path}"],
            env=_env(NOTIFY_SOCKET=notifications.path, WATCHDOG_USEC="400000"),
            stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT,
        )
    try:
        try:
            notifications.wait_for("READY=1")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndaemon log:\n{log_path.read_text()}") from None
        # READY=1 means accepting: a client gets through at once.
        assert _hello(sock_path) == b"OK 1\n"
        status = notifications.wait_for("STATUS=")
        assert f"unix:{sock_path}" in status
        # WATCHDOG_USEC=0.4 s: a ping every 0.2 s.
        notifications.wait_until(lambda lines: lines.count("WATCHDOG=1") >= 3, timeout_s=10)
        proc.send_signal(signal.SIGTERM)
        notifications.wait_for("STOPPING=1")
        assert proc.wait(15) == 0
    finally:
        _stop(proc)


def test_socket_activation_serves_the_inherited_socket(
    workdir: Path, notifications: _Notifications
) -> None:
    # Like systemd with phpsess.socket: we bind and listen, the daemon gets
    # the socket as fd 3 with LISTEN_PID naming it and never binds itself.
    sock_path = str(workdir / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    fd = listener.fileno()
    other = workdir / "not-bound.sock"  # the --listen the daemon must ignore
    log_path = workdir / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh",
             sys.executable, "-m", "phpsess", "serve", "--memory-only",
             "--listen", f"unix:{other}"],
            env=_env(NOTIFY_SOCKET=notifications.path, LISTEN_FDS="1", LISTEN_FDNAMES="client"),
            # The socket becomes fd 3 in the child.  close_fds=False because
            # with pass_fds the child would close fd 3 after preexec_fn made
            # it; Python's other descriptors are close-on-exec anyway.
            preexec_fn=lambda: os.dup2(fd, 3),
            close_fds=False,
            stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT,
        )
    listener.close()  # the daemon holds the only copy now
    try:
        # A client may connect before the daemon is up: it waits in the
        # backlog, which is the point of socket activation.
        assert _hello(sock_path) == b"OK 1\n"
        try:
            notifications.wait_for("READY=1")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndaemon log:\n{log_path.read_text()}") from None
        assert not other.exists(), "the daemon bound --listen despite LISTEN_FDS"
        assert _stop(proc) == 0
        # An inherited socket file is systemd's: the daemon must not unlink it.
        assert os.path.exists(sock_path)
        logged = log_path.read_text()
        assert "event=socket_inherited name=client fd=3" in logged, logged
        # The --listen it does not serve is named in a warning, not dropped
        # silently (a TCP address in the config file would be missed).
        assert f"event=listen_ignored addresses=unix:{other} serving=unix:{sock_path}" \
            in logged, logged
    finally:
        _stop(proc)


@pytest.mark.parametrize("to_journal", [True, False], ids=["journal", "elsewhere"])
def test_log_lines_carry_their_syslog_priority_when_stderr_is_the_journal(
    workdir: Path, to_journal: bool
) -> None:
    # systemd sets JOURNAL_STREAM to the device and inode of the stream it
    # gave as stderr; only then do lines start with <priority> (sd-daemon(3)).
    sock_path = str(workdir / "phpsess.sock")
    log_path = workdir / "daemon.log"
    log_path.touch()
    info = os.stat(workdir if not to_journal else log_path)  # elsewhere: not stderr
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "phpsess", "serve", "--memory-only",
             "--max-connections", "1", "--listen", f"unix:{sock_path}"],
            env=_env(JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}"),
            stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 15
        while "event=listening" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        from phpsess.server import ADMIN_RESERVED_CONNECTIONS

        # Every slot, the few kept for root and the daemon's user too.
        held = [socket.socket(socket.AF_UNIX) for _ in range(1 + ADMIN_RESERVED_CONNECTIONS)]
        try:
            for s in held:
                s.connect(sock_path)
            assert _hello(sock_path).startswith(b"ERR BUSY ")  # a warning is logged
        finally:
            for s in held:
                s.close()
        assert _stop(proc) == 0
    finally:
        _stop(proc)
    lines = log_path.read_text().splitlines()
    listening = next(line for line in lines if "event=listening" in line)
    refused = next(line for line in lines if "event=connection_refused" in line)
    if to_journal:
        assert listening.startswith("<6>") and " level=info " in listening
        assert refused.startswith("<4>") and " level=warning " in refused
        assert all(line[:3] in ("<6>", "<4>") for line in lines), lines
    else:
        assert all(line[:1].isdigit() for line in lines), lines  # the timestamp first
