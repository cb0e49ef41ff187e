"""Fixtures that run real phpsess daemon processes and real php processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREPEND = ROOT / "php-ext-shim" / "prepend.php"


class Daemon:
    """A ``phpsess serve`` process on a unix socket in a private directory."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.sock_path = str(workdir / "phpsess.sock")
        self.address = f"unix:{self.sock_path}"
        self.php_address = f"unix://{self.sock_path}"
        self.stderr_path = workdir / "daemon.log"
        self.data_dir = workdir / "data"
        if "--memory-only" not in args and "--data-dir" not in args:
            args = (*args, "--data-dir", str(self.data_dir))
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.stderr_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "phpsess", "serve", "--listen", self.address, *self.args],
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.sock_path)
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"daemon did not start listening: {self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: unix socket names are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="phpsess-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_daemon(workdir: Path) -> Iterator[Any]:
    daemons: list[Daemon] = []
    counter = iter(range(1000))

    def start(*args: str) -> Daemon:
        d = workdir / f"d{next(counter)}"
        d.mkdir()
        daemon = Daemon(d, *args)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon: Any) -> Daemon:
    d: Daemon = start_daemon()
    return d


def read_counter(address: str, sid: str) -> int:
    """The ``n`` a PHP counter page stored in session ``sid`` (0 if none)."""
    import re

    from phpsess import protocol as p
    from phpsess.client import Client

    with Client(address) as c:
        reply = c.request(p.Read(sid, lock=False))
    if reply == p.MISS:
        return 0
    assert isinstance(reply, p.Data), reply
    match = re.fullmatch(rb"n\|i:(\d+);", reply.data)
    assert match, reply.data
    return int(match.group(1))


def php_binary() -> str:
    php = shutil.which("php")
    if php is None:
        # Never skip: scripts/test installs php; a missing php is a failure.
        pytest.fail("the php CLI is not installed; run scripts/test (it installs php-cli)")
    return php


def run_php(
    script: str | Path,
    *,
    handler: str,
    address: str | None = None,
    ini: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60,
    save_path: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a PHP script with sessions in phpsess (``handler="phpsess"``) or in
    PHP's own files handler (``handler="files"``), everything else equal."""
    cmd = [php_binary(), "-d", "display_errors=stderr"]
    settings = {
        "error_reporting": str(32767),
        "log_errors": "0",
        "html_errors": "0",
        "session.gc_probability": "0",
        "session.use_cookies": "0",
        "session.use_only_cookies": "0",
        "session.cache_limiter": "",
    }
    if handler == "phpsess":
        assert address is not None
        settings["auto_prepend_file"] = str(PREPEND)
        settings["phpsess.address"] = address
    else:
        assert handler == "files" and save_path is not None
        settings["session.save_handler"] = "files"
        settings["session.save_path"] = save_path
    settings.update(ini or {})
    for key, value in settings.items():
        cmd += ["-d", f"{key}={value}"]
    cmd += [str(script), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
