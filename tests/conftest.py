"""Fixtures that run real phpsess daemon processes and real php processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
PREPEND = ROOT / "php-ext-shim" / "prepend.php"


def _file_has_storage(args: tuple[str, ...]) -> bool:
    """Whether ``--config FILE`` in ``args`` gives ``memory_only = true`` or
    a ``data_dir``: no ``--data-dir`` of the test's own then (serve refuses
    it beside memory_only)."""
    from phpsess import config as config_file

    if "--config" not in args:
        return False
    settings = dict(config_file.load(args[args.index("--config") + 1]).items())
    return bool(settings.get("memory_only")) or "data_dir" in settings


class Daemon:
    """A ``phpsess serve`` process on a unix socket in a private directory."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.sock_path = str(workdir / "phpsess.sock")
        self.address = f"unix:{self.sock_path}"
        self.php_address = f"unix://{self.sock_path}"
        self.stderr_path = workdir / "daemon.log"
        self.data_dir = workdir / "data"
        if "--memory-only" not in args and "--data-dir" not in args and not _file_has_storage(args):
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



class HangingFdatasync:
    """``os.fdatasync`` of a disk that hangs: every call waits (at most
    ``limit_s``) until the test sets ``release``; ``hung`` says one did.
    ``real`` is the function it stands in for."""

    def __init__(self, limit_s: float = 30.0) -> None:
        self.hung = threading.Event()
        self.release = threading.Event()
        self.real = os.fdatasync
        self._limit_s = limit_s

    def __call__(self, fd: int) -> None:
        if not self.release.is_set():
            self.hung.set()
            self.release.wait(self._limit_s)
        self.real(fd)

def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure of process ``pid`` from /proc (``VmRSS``, ``VmHWM``...), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@contextlib.asynccontextmanager
async def fsync_always_server(nursery: Any) -> AsyncIterator[str]:
    """An in-process daemon with ``--fsync always`` in a temporary
    directory (lock wait 30 s, lease 300 s), served in ``nursery``; yields
    its socket path."""
    from phpsess.addresses import UnixAddress
    from phpsess.engine import Limits
    from phpsess.persist import PersistConfig
    from phpsess.server import Server, ServerConfig

    with tempfile.TemporaryDirectory(prefix="ps-", dir="/tmp") as tmp:
        path = str(Path(tmp) / "s.sock")
        server = Server(ServerConfig(
            listen=(UnixAddress(path),),
            limits=Limits(lock_wait_s=30, lock_lease_s=300),
            persist=PersistConfig(str(Path(tmp) / "data"), "always"),
        ))
        await nursery.start(server.serve)
        try:
            yield path
        finally:
            server.shutdown()


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


# -- MariaDB for the SQL storage backend (phpsess.sqlserver)


class MariaDB:
    """A private ``mariadbd`` on a unix socket (no TCP), data in ``base``,
    with a database ``phpsess`` and a user ``phpsess`` allowed to use it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.datadir = base / "data"
        self.sock_path = str(base / "mariadb.sock")
        self.pid_file = base / "mariadb.pid"
        self.log_path = base / "mariadb.log"
        self.password_file = base / "password"
        self.proc: subprocess.Popen[bytes] | None = None
        for tool in ("mariadbd", "mariadb-install-db", "mariadb"):
            if shutil.which(tool) is None:
                # Never skip: scripts/bootstrap installs mariadb-server.
                pytest.fail(f"{tool} is not installed; run scripts/test (it installs "
                            "mariadb-server)")
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}",
             "--user=root", "--auth-root-authentication-method=socket", "--skip-test-db"],
            check=True, capture_output=True, timeout=120,
        )
        self.start()
        password = os.urandom(12).hex()
        self.password_file.write_text(password + "\n")
        self.sql(
            "CREATE DATABASE phpsess; "
            f"CREATE USER 'phpsess'@'localhost' IDENTIFIED BY '{password}'; "
            "GRANT ALL ON phpsess.* TO 'phpsess'@'localhost'; "
            # KILL of its own sessions needs no privilege; nothing else is needed.
        )

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            # Bounded in time even if the test run dies without stopping it.
            self.proc = subprocess.Popen(
                ["timeout", "-s", "KILL", "1800", "mariadbd", "--no-defaults",
                 f"--datadir={self.datadir}", f"--socket={self.sock_path}",
                 "--skip-networking", "--user=root", f"--pid-file={self.pid_file}",
                 "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=32M",
                 "--skip-log-bin", "--max-connections=400"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {self.log_path.read_text()[-2000:]}")
            ping = subprocess.run(
                ["mariadb", "--no-defaults", "-S", self.sock_path, "-uroot", "-e", "SELECT 1"],
                capture_output=True, timeout=10,
            )
            if ping.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("mariadbd did not start")

    @property
    def server_pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def sql(self, statements: str, database: str = "") -> str:
        done = subprocess.run(
            ["mariadb", "--no-defaults", "-S", self.sock_path, "-uroot", "-N", "-B",
             *([database] if database else []), "-e", statements],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def kill9(self) -> None:
        """kill -9 of the database server (a crash)."""
        assert self.proc is not None
        os.kill(self.server_pid, signal.SIGKILL)
        self.proc.wait(30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                os.kill(self.server_pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def url(self, database: str = "phpsess") -> str:
        return f"mysql://phpsess@localhost/{database}?socket={self.sock_path}"

    def daemon_args(self, table: str) -> tuple[str, ...]:
        return ("--storage", self.url(), "--storage-password-file", str(self.password_file),
                "--storage-table", table)


@contextlib.contextmanager
def private_mariadb() -> Iterator[MariaDB]:
    """A MariaDB server in a temporary directory, stopped and removed after."""
    base = Path(tempfile.mkdtemp(prefix="phpsess-mdb-", dir="/tmp"))
    server = MariaDB(base)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    with private_mariadb() as server:
        yield server


# Ports for the daemons the tests start. They come from below the kernel's
# ephemeral range, so no outgoing connection (a daemon dialling its peer, a
# PHP client) can take one between the probe and the daemon's bind, and from a
# slice of their own for each xdist worker, so the two workers never pick the
# same one. This process never hands out a port twice: a probe releases its
# port at once, and a CI run failed when two picks for one cluster got the
# same port back from bind(0) ("peers b and c have the same address").
_HANDED_OUT: set[int] = set()
_PORT_FLOOR, _PORTS_PER_WORKER = 10_000, 5_000


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    low = _PORT_FLOOR + (index % 4) * _PORTS_PER_WORKER
    return range(low, low + _PORTS_PER_WORKER)


def free_port(host: str = "127.0.0.1", udp: bool = False) -> int:
    """A port on ``host`` free right now (for TCP, and for UDP too when
    ``udp``), never one this process has handed out before."""
    ports = _port_slice()
    offset = int.from_bytes(os.urandom(2)) % len(ports)
    for i in range(len(ports)):
        port = ports[(offset + i) % len(ports)]
        if port in _HANDED_OUT:
            continue
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
            try:
                tcp.bind((host, port))
                if udp:
                    dgram.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port left in {ports} on {host}")


# Grouped tests that their worker's collection left without their group.
_UNGROUPED: set[str] = set()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` (scripts/test), a worker's grouped tests
    carry their group in their node ID, by which xdist sends each group to
    one worker.  pytest 9.2 broke that in silence (pytest-xdist#1386): the
    cluster tests, which time failure detection, ran on both workers at
    once.  They fail, saying why, rather than flake."""
    if getattr(config.option, "loadgroup", False):
        _UNGROUPED.update(item.nodeid for item in items
                          if item.get_closest_marker("xdist_group") and "@" not in item.nodeid)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in _UNGROUPED:
        pytest.fail(
            f"--dist loadgroup does not group tests with this pytest {pytest.__version__} and "
            "pytest-xdist (pytest-xdist#1386): this test would run beside the others of its "
            "group; install the versions pyproject.toml asks for (scripts/bootstrap)",
            pytrace=False,
        )


def free_tcp_port() -> int:
    """A loopback TCP port free right now."""
    return free_port()


def wait_listening(port: int, proc: subprocess.Popen[Any], what: str,
                   log: Path | None = None) -> None:
    """Return once something accepts on loopback ``port`` (``proc``, e.g.
    ``php -S``, within 10 s); fail with its log if it exits first."""
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, log.read_text() if log else f"{what} exited"
            assert time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.02)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_metrics(port: int) -> Samples:
    """A daemon's /metrics, parsed: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def fresh_table() -> str:
    """A table of its own for each test (named locks are scoped by table too)."""
    return f"t_{os.urandom(6).hex()}"


@pytest.fixture(params=["journal", "mariadb"])
def backend(request: pytest.FixtureRequest) -> str:
    """The storage a parametrized test runs against."""
    param: str = request.param
    return param


@pytest.fixture(params=["engine", "sql"])
def storage_args(request: pytest.FixtureRequest) -> list[str]:
    """The daemon's own store, or the SQL backend (its own connection loop)."""
    if request.param == "engine":
        return ["--memory-only"]
    mariadb: MariaDB = request.getfixturevalue("mariadb")
    return list(mariadb.daemon_args(fresh_table()))


@pytest.fixture
def any_daemon(request: pytest.FixtureRequest, backend: str, start_daemon: Any) -> Daemon:
    """A daemon with the default memory + journal storage, or the SQL backend
    on the test run's private MariaDB (the same tests run against both)."""
    if backend == "journal":
        d: Daemon = start_daemon()
        return d
    db: MariaDB = request.getfixturevalue("mariadb")
    d = start_daemon(*db.daemon_args(fresh_table()))
    return d
