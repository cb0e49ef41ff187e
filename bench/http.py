"""End-to-end HTTP benchmark: nginx -> php-fpm -> a session counter page.

    .venv/bin/python bench/http.py [--rounds 3] [--seconds 10] [--budget-s 900]

Puts phpsess in the table of the competing session handlers, measured the
way they were (see ``bench/README.md``): nginx with one worker, php-fpm with
a static pool of 8 children on a unix socket (OPcache on), and a counter page
(``bench/http/counter.php``: ``session_start()``, a 1 KiB value on the first
visit, ``count++``, echo), driven by ``wrk -t2 -c32 -d10s`` with a Lua script
(``bench/http/pool.lua``) that reuses a pool of 1000 session cookies
round-robin, so that no two requests in flight share a session.

1. Throughput: every handler once per round, rounds interleaved; the median
   requests/s, its ratio to the files handler on tmpfs, latency p50/p99, wrk's
   errors, the CPU time PHP and the session server spend per request, and
   the commands and connections the session server sees per request.
2. Lost updates: after the rounds, the counts of all pooled sessions must add
   up to the requests that succeeded.
3. Contention: 50 concurrent requests on one session, the page holding it
   0 ms and 20 ms; the count must rise by 50.

Installs what it needs with apt when missing (as root, services not started),
runs every server as a child process on loopback and unix sockets in
temporary directories, stops each by its PID when done (also on Ctrl-C), and
writes ``http.md``, ``http.json`` and ``http.png`` to ``--out``.  Progress goes
to stderr.  The machine may be shared: before each run it waits (briefly)
while other processes use the CPUs, and it reports how much they used during
each run.  Past ``--budget-s`` the remaining runs are skipped and the results
so far are written.
"""

# This file is bench/http.py: running it puts bench/ first on sys.path, where
# it would hide the standard library's `http` package, so bench/ is taken off
# sys.path before anything else is imported.
# ruff: noqa: E402

from __future__ import annotations

import os
import sys

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]

import argparse
import contextlib
import glob
import http.client
import importlib.metadata
import json
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(_BENCH_DIR).parent
TEMPLATES = ROOT / "bench" / "http"
PHPSESS = ROOT / ".venv" / "bin" / "phpsess"
PREPEND = ROOT / "php-ext-shim" / "prepend.php"

APT_PACKAGES = ["nginx", "php-fpm", "wrk", "redis-server", "php-redis", "memcached",
                "php-memcached", "mariadb-server"]

CONTENTION_REQUESTS = 50
CONTENTION_HOLDS_MS = (0, 20)
WARMUP_S = 1.0
# How long php-fpm lets the requests under way finish when it is stopped (SIGQUIT),
# before it kills its children; below the 10 s php_fpm() waits before SIGKILL.
FPM_STOP_GRACE_S = 8
# Seconds a measured run costs beyond wrk's own duration (php-fpm start and
# stop, the warm-up), and what the final phase (sums and contention) needs per
# handler: used to stop in time.
RUN_OVERHEAD_S = 3.0
# Before each measured run, wait while other processes use more than this share
# of all cores (the machine is shared), for at most --quiet-wait-s.
QUIET_SHARE = 0.10
FINAL_PHASE_S_PER_HANDLER = 8.0

STARTED = time.monotonic()
LOAD_AT_START = os.getloadavg()


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """Something the benchmark needs does not work: stop, say what."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so that every server is stopped."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


# --------------------------------------------------------------------------
# Child processes


class Proc:
    """A server run as a child in its own process group, stopped by its PID."""

    def __init__(self, name: str, argv: Sequence[str], logfile: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.logfile = logfile
        with open(logfile, "ab") as out:
            self.popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, cwd=ROOT,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def wait(self, timeout_s: float) -> bool:
        try:
            self.popen.wait(max(timeout_s, 0.0))
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        if self.alive():
            log(f"{self.name} (pid {self.pid}) did not stop in time: SIGKILL")
        # the whole group: workers of nginx and php-fpm too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        self.send(sig)
        if not self.wait(timeout_s):
            self.kill()
        else:
            # children left behind in the group (there should be none)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_all(procs: Sequence[Proc], timeout_s: float = 12.0) -> None:
    """SIGTERM to all at once, then SIGKILL to whatever is left at the deadline."""
    for proc in procs:
        proc.send(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        if not proc.wait(deadline - time.monotonic()):
            proc.kill()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_listening(proc: Proc, where: str, connect: Callable[[], socket.socket],
                    timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}) before listening "
                             f"on {where}:\n{proc.log_tail()}")
        try:
            connect().close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name} is not listening on {where} after "
                                 f"{timeout_s:.0f} s:\n{proc.log_tail()}") from None
            time.sleep(0.02)


def wait_unix_socket(path: Path, proc: Proc, timeout_s: float = 20.0) -> None:
    def connect() -> socket.socket:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            probe.close()
            raise
        return probe

    _wait_listening(proc, str(path), connect, timeout_s)


def wait_tcp(port: int, proc: Proc, timeout_s: float = 10.0) -> None:
    _wait_listening(proc, f"127.0.0.1:{port}",
                    lambda: socket.create_connection(("127.0.0.1", port), timeout=1.0),
                    timeout_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process_group() -> dict[int, float]:
    """CPU time (utime + stime) of every live process, summed by process group."""
    tick = os.sysconf("SC_CLK_TCK")
    groups: dict[int, float] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgid = int(fields[2])
        groups[pgid] = groups.get(pgid, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return groups


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of every live process in one group (php-fpm and its workers)."""
    return cpu_by_process_group().get(pgid, 0.0)


def machine_busy_seconds() -> float:
    """CPU time all cores have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_text(argv: Sequence[str], timeout_s: float = 30.0) -> str:
    """stdout + stderr of a command, or "" when it cannot run."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


# --------------------------------------------------------------------------
# What the machine needs


def php_fpm_binary() -> str | None:
    found = sorted(glob.glob("/usr/sbin/php-fpm[0-9]*.[0-9]*"),
                   key=lambda p: [int(n) for n in re.findall(r"\d+", Path(p).name)])
    if found:
        return found[-1]
    return shutil.which("php-fpm")


def missing_packages() -> list[str]:
    missing: list[str] = []
    for binary, package in (("nginx", "nginx"), ("wrk", "wrk"),
                            ("redis-server", "redis-server"), ("memcached", "memcached"),
                            ("mariadbd", "mariadb-server")):
        if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            missing.append(package)
    fpm = php_fpm_binary()
    if fpm is None:
        missing += ["php-fpm", "php-redis", "php-memcached"]
    else:
        modules = run_text([fpm, "-m"]).lower().split()
        if "redis" not in modules:
            missing.append("php-redis")
        if "memcached" not in modules:
            missing.append("php-memcached")
    return missing


def ensure_packages() -> None:
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError("missing: " + " ".join(missing) + "; install them with "
                         "apt-get install " + " ".join(APT_PACKAGES) + " and run again")
    log(f"installing with apt-get: {' '.join(missing)} (their system services are not started)")
    # Debian starts a package's service on installation unless policy-rc.d
    # forbids it; the benchmark runs its own instances only.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# bench/http.py: do not start services while installing\n"
                          "exit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}"
                                 f"{done.stderr[-2000:]}")
    finally:
        if made_policy:
            policy.unlink()
    still = missing_packages()
    if still:
        raise BenchError("still missing after apt-get install: " + " ".join(still))


def filesystem_of(path: Path) -> str:
    out = run_text(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)])
    if out:
        return out.split()[0]
    out = run_text(["df", "--output=fstype", str(path)])
    lines = out.splitlines()
    return lines[-1].strip() if len(lines) > 1 else "unknown"


def disk_dir() -> Path:
    """A directory on a real disk for the files handler (not tmpfs)."""
    for candidate in (Path("/var/tmp"), Path("/tmp"), ROOT):
        if candidate.is_dir() and os.access(candidate, os.W_OK) and \
                filesystem_of(candidate) not in ("tmpfs", "ramfs", "unknown"):
            return candidate
    raise BenchError("found no writable directory on a disk (/var/tmp and /tmp are tmpfs)")


def first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text else "?"


def machine_facts(fpm: str, info: dict[str, Any]) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    debian = "?"
    with contextlib.suppress(OSError):
        debian = Path("/etc/debian_version").read_text().strip()
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    commit = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "?"
    dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--",
                            "phpsess", "php-ext-shim"], capture_output=True,
                           check=False).returncode
    if dirty == 1:
        commit += " (with uncommitted changes in phpsess/ or php-ext-shim/)"
    wrk = re.search(r"wrk\s+\S+", run_text(["wrk", "-v"]))
    try:
        trio_version = importlib.metadata.version("trio")
    except importlib.metadata.PackageNotFoundError:
        trio_version = "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load average before the run (1, 5, 15 min)": " ".join(f"{v:.2f}" for v in LOAD_AT_START),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "kernel": platform.release(),
        "debian": debian,
        "php": re.sub(r"\s*\(built:.*?\)", "", first_line(run_text([fpm, "-v"]))),
        "phpredis": str(info.get("redis") or "?"),
        "php-memcached": str(info.get("memcached") or "?"),
        "nginx": first_line(run_text(["nginx", "-v"])).replace("nginx version: ", ""),
        "redis": re.sub(r"^Redis server v=(\S+).*", r"redis \1",
                        first_line(run_text(["redis-server", "--version"]))),
        "memcached": first_line(run_text(["memcached", "-V"])),
        "wrk": wrk.group(0) if wrk else "?",
        "python": platform.python_version(),
        "trio": trio_version,
        "phpsess commit": commit,
    }


# --------------------------------------------------------------------------
# Session servers and their counters


@dataclass
class Counters:
    """What a session server has done so far."""

    connections: float | None = None
    commands: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0


def _unix_exchange(path: Path, request: bytes, done: Callable[[bytes], bool]) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5.0)
        s.connect(str(path))
        s.sendall(request)
        data = b""
        while not done(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def redis_counters(path: Path, pid: int) -> Counters:
    def complete(data: bytes) -> bool:
        head, sep, rest = data.partition(b"\r\n")
        return bool(sep) and len(rest) >= int(head[1:]) + 2

    raw = _unix_exchange(path, b"INFO all\r\n", complete).decode()
    c = Counters(cpu_s=cpu_seconds(pid))
    for line in raw.splitlines():
        if line.startswith("total_connections_received:"):
            c.connections = float(line.split(":")[1]) - 1  # without this one
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
        if m and m.group(1) != "info":
            c.commands[m.group(1).upper()] = float(m.group(2))
    return c


def memcached_counters(path: Path, pid: int) -> Counters:
    raw = _unix_exchange(path, b"stats\r\n", lambda d: d.endswith(b"END\r\n")).decode()
    stats = dict(line.split()[1:3] for line in raw.splitlines() if line.startswith("STAT "))
    c = Counters(cpu_s=cpu_seconds(pid))
    c.connections = float(stats["total_connections"]) - 1
    # add, set, replace, cas... all count as cmd_set
    for name, keys in (("GET", ["cmd_get"]), ("SET/ADD", ["cmd_set"]),
                       ("TOUCH", ["cmd_touch"]), ("DELETE", ["delete_hits", "delete_misses"]),
                       ("INCR/DECR", ["incr_hits", "incr_misses", "decr_hits", "decr_misses"])):
        c.commands[name] = sum(float(stats.get(k, 0)) for k in keys)
    return c


def phpsess_counters(path: Path, pids: Sequence[int]) -> Counters:
    out = subprocess.run([str(PHPSESS), "status", "--connect", f"unix:{path}", "--json"],
                         capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise BenchError(f"phpsess status --connect unix:{path} failed: {out.stderr.strip()}")
    status = json.loads(out.stdout)
    c = Counters(cpu_s=sum(cpu_seconds(pid) for pid in pids))
    # the status command's own HELLO and STATS are left out; HELLO is sent with
    # every request's first command (pipelined), so it says nothing about
    # connections, which the daemon does not count
    verbs: dict[str, int] = status.get("verbs", {})
    for verb, n in verbs.items():
        if verb != "STATS":
            c.commands[verb] = float(n)
    if "HELLO" in c.commands:
        c.commands["HELLO"] -= 1
    return c


# --------------------------------------------------------------------------
# Handlers


@dataclass(frozen=True)
class Handler:
    key: str
    label: str
    ini: dict[str, str]
    server: str | None  # which session server: redis, memcached, phpsess, ...
    page: str = "/counter.php"
    expect_save_handler: str | None = None  # what ini_get() must say (None: no session)

    @property
    def sessions(self) -> bool:
        return self.expect_save_handler is not None


def handlers(dirs: dict[str, Path], disk_fs: str) -> list[Handler]:
    redis = f"unix://{dirs['run'] / 'redis.sock'}"
    memcached = str(dirs["run"] / "memcached.sock")

    def phpsess(sock: str, options: str) -> dict[str, str]:
        address = f"unix://{dirs['run'] / sock}" + (f"?{options}" if options else "")
        return {"auto_prepend_file": str(PREPEND), "session.save_path": f'"{address}"'}

    return [
        Handler("none", "no session at all (ceiling)", {}, None, page="/nosession.php"),
        Handler("files-tmpfs", "files, tmpfs", {
            "session.save_handler": "files",
            "session.save_path": str(dirs["tmpfs"])}, None, expect_save_handler="files"),
        Handler("files-disk", f"files, {disk_fs}", {
            "session.save_handler": "files",
            "session.save_path": str(dirs["disk"])}, None, expect_save_handler="files"),
        Handler("redis", "phpredis, unix socket, no locking", {
            "session.save_handler": "redis", "session.save_path": f'"{redis}"',
            "redis.session.locking_enabled": "0"}, "redis", expect_save_handler="redis"),
        Handler("redis-lock", "phpredis, unix socket, locking", {
            "session.save_handler": "redis", "session.save_path": f'"{redis}"',
            "redis.session.locking_enabled": "1"}, "redis", expect_save_handler="redis"),
        Handler("memcached", "php-memcached, unix socket, no locking", {
            "session.save_handler": "memcached", "session.save_path": f'"{memcached}"',
            "memcached.sess_locking": "0"}, "memcached", expect_save_handler="memcached"),
        Handler("memcached-lock", "php-memcached, unix socket, locking", {
            "session.save_handler": "memcached", "session.save_path": f'"{memcached}"',
            "memcached.sess_locking": "1"}, "memcached", expect_save_handler="memcached"),
        Handler("phpsess", "phpsess, persistent=0 (a connection per request)",
                phpsess("phpsess.sock", "persistent=0"), "phpsess", expect_save_handler="user"),
        Handler("phpsess-persistent", "phpsess, persistent=1 (the handler's default)",
                phpsess("phpsess.sock", "persistent=1"), "phpsess", expect_save_handler="user"),
        Handler("phpsess-memory", "phpsess, persistent=1, daemon --memory-only",
                phpsess("phpsess-memory.sock", "persistent=1"), "phpsess-memory",
                expect_save_handler="user"),
        Handler("phpsess-cluster", "phpsess, persistent=1, 2-daemon cluster with backups",
                phpsess("phpsess-a.sock", "persistent=1"), "phpsess-cluster",
                expect_save_handler="user"),
        Handler("phpsess-mariadb", "phpsess + MariaDB, persistent=1, --storage mysql:// (InnoDB)",
                phpsess("phpsess-mariadb.sock", "persistent=1"), "phpsess-mariadb",
                expect_save_handler="user"),
    ]


# --------------------------------------------------------------------------
# HTTP


@dataclass
class Reply:
    status: int
    body: str
    session_id: str | None


def http_get(conn: http.client.HTTPConnection, path: str, sid: str | None = None) -> Reply:
    headers = {"Cookie": f"PHPSESSID={sid}"} if sid else {}
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read().decode(errors="replace")
    new_sid = None
    for value in resp.headers.get_all("Set-Cookie") or []:
        m = re.match(r"\s*PHPSESSID=([^;]+)", value)
        if m:
            new_sid = m.group(1)
    return Reply(resp.status, body, new_sid)


def count_of(reply: Reply) -> int | None:
    m = re.fullmatch(r"count=(\d+)\n?", reply.body)
    return int(m.group(1)) if m and reply.status == 200 else None


# --------------------------------------------------------------------------
# The benchmark


@dataclass
class Run:
    round: int
    requests_per_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    php_cpu_us: float
    server_cpu_us: float | None
    connects: float | None
    commands: dict[str, float]
    php_warnings: int
    other_cpu_pct: float  # CPU of processes not ours, % of all cores


@dataclass
class HandlerResult:
    handler: Handler
    runs: list[Run] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    expected_count: int = 0  # sum of the pooled sessions' counts if nothing is lost
    pool_sum: int | None = None
    pool_unreadable: int = 0
    contention: dict[int, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    skipped_runs: int = 0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline: float = STARTED + args.budget_s
        self.servers: list[Proc] = []
        self.fpm: Proc | None = None
        self.nginx: Proc | None = None
        self.tmpdirs: list[Path] = []
        # Looked up again once run() has installed what is missing.
        self.fpm_binary = php_fpm_binary() or "php-fpm"
        self.root_user = os.geteuid() == 0
        self.ids: dict[str, Path] = {}
        self.results: dict[str, HandlerResult] = {}
        self.counters: dict[str, Callable[[], Counters]] = {}
        self.notes: list[str] = []

    # ---- setup and teardown

    def mkdtemp(self, prefix: str, under: Path) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=under))
        self.tmpdirs.append(path)
        return path

    def cleanup(self) -> None:
        procs = [p for p in [self.fpm, self.nginx, *reversed(self.servers)] if p is not None]
        if procs:
            log("stopping " + ", ".join(f"{p.name} ({p.pid})" for p in procs))
        stop_all(procs)
        self.fpm = None
        self.servers.clear()
        if self.args.keep:
            log("keeping " + " ".join(map(str, self.tmpdirs)))
            return
        for path in self.tmpdirs:
            shutil.rmtree(path, ignore_errors=True)

    def template(self, name: str, **values: str) -> str:
        text = (TEMPLATES / name).read_text()
        for key, value in values.items():
            text = text.replace(f"@@{key}@@", value)
        left = re.findall(r"@@\w+@@", text)
        if left:
            raise BenchError(f"unfilled placeholders in {name}: {', '.join(left)}")
        return text

    def setup(self) -> list[Handler]:
        run = self.mkdtemp("phpsess-http-", Path("/tmp"))
        os.chmod(run, 0o755)
        disk_base = disk_dir()
        dirs = {
            "run": run,
            "tmpfs": self.mkdtemp("phpsess-http-sessions-", Path("/dev/shm")),
            "disk": self.mkdtemp("phpsess-http-sessions-", disk_base),
        }
        tmpfs_fs = filesystem_of(dirs["tmpfs"])
        if tmpfs_fs != "tmpfs":
            raise BenchError(f"/dev/shm is {tmpfs_fs}, not tmpfs")
        disk_fs = filesystem_of(dirs["disk"])
        self.notes.append(f"files on tmpfs: {dirs['tmpfs'].parent}; files on disk: "
                          f"{disk_base} ({disk_fs})")
        self.run_dir = run
        (run / "docroot").mkdir()
        for page in ("counter.php", "nosession.php"):
            shutil.copy(TEMPLATES / page, run / "docroot" / page)
        (run / "nginx-tmp").mkdir()
        all_handlers = handlers(dirs, disk_fs)
        wanted = set(self.args.handlers.split(",")) if self.args.handlers else None
        if wanted is not None:
            unknown = wanted - {h.key for h in all_handlers}
            if unknown:
                raise BenchError(f"unknown handlers: {', '.join(sorted(unknown))}; known: "
                                 + ", ".join(h.key for h in all_handlers))
            if "files-tmpfs" not in wanted:
                wanted.add("files-tmpfs")  # the reference every ratio is to
        chosen = [h for h in all_handlers if wanted is None or h.key in wanted]
        self.start_servers({h.server for h in chosen if h.server})
        self.start_nginx()
        return chosen

    def start_nginx(self) -> None:
        self.port = free_port()
        conf = self.run_dir / "nginx.conf"
        conf.write_text(self.template(
            "nginx.conf", USER="user root;" if self.root_user else "", DIR=str(self.run_dir),
            PORT=str(self.port), DOCROOT=str(self.run_dir / "docroot"),
            FPM_SOCKET=str(self.run_dir / "php-fpm.sock")))
        self.nginx = Proc("nginx", ["nginx", "-p", str(self.run_dir), "-e",
                                    str(self.run_dir / "nginx-error.log"), "-c", str(conf),
                                    "-g", "daemon off;"], self.run_dir / "nginx.out")
        wait_tcp(self.port, self.nginx)

    def start_servers(self, wanted: set[str]) -> None:
        run = self.run_dir
        if "redis" in wanted:
            (run / "redis").mkdir()
            conf = run / "redis.conf"
            # Redis defaults otherwise (its default RDB snapshot schedule included)
            conf.write_text(f"port 0\nunixsocket {run / 'redis.sock'}\nunixsocketperm 700\n"
                            f"daemonize no\ndir {run / 'redis'}\nlogfile \"\"\n")
            proc = Proc("redis-server", ["redis-server", str(conf)], run / "redis.log")
            self.servers.append(proc)
            wait_unix_socket(run / "redis.sock", proc)
            self.counters["redis"] = lambda: redis_counters(run / "redis.sock", proc.pid)
        if "memcached" in wanted:
            argv = ["memcached", "-s", str(run / "memcached.sock"), "-a", "0700", "-m", "64"]
            if self.root_user:
                argv += ["-u", "root"]
            mc = Proc("memcached", argv, run / "memcached.log")
            self.servers.append(mc)
            wait_unix_socket(run / "memcached.sock", mc)
            self.counters["memcached"] = lambda: memcached_counters(run / "memcached.sock",
                                                                    mc.pid)
        serve = [str(PHPSESS), "serve", "--log-level", "warning"]
        if "phpsess" in wanted:
            single = Proc("phpsess", [*serve, "--listen", f"unix:{run / 'phpsess.sock'}",
                                      "--data-dir", str(run / "phpsess-data")],
                          run / "phpsess.log")
            self.servers.append(single)
            wait_unix_socket(run / "phpsess.sock", single)
            self.counters["phpsess"] = lambda: phpsess_counters(run / "phpsess.sock",
                                                                [single.pid])
        if "phpsess-memory" in wanted:
            memory = Proc("phpsess --memory-only",
                          [*serve, "--listen", f"unix:{run / 'phpsess-memory.sock'}",
                           "--memory-only"], run / "phpsess-memory.log")
            self.servers.append(memory)
            wait_unix_socket(run / "phpsess-memory.sock", memory)
            self.counters["phpsess-memory"] = lambda: phpsess_counters(
                run / "phpsess-memory.sock", [memory.pid])
        if "phpsess-cluster" in wanted:
            self.start_cluster(serve)
        if "phpsess-mariadb" in wanted:
            self.start_mariadb(serve)

    def start_mariadb(self, serve: list[str]) -> None:
        """A private mariadbd on a unix socket, and a daemon storing in it."""
        run = self.run_dir
        if shutil.which("mariadbd") is None:
            raise BenchError("phpsess-mariadb needs mariadbd: apt-get install mariadb-server")
        datadir, sock = run / "mariadb", run / "mariadb.sock"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}",
                        "--user=root", "--auth-root-authentication-method=socket",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        db = Proc("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={datadir}",
                               f"--socket={sock}", "--skip-networking", "--user=root",
                               "--skip-log-bin"], run / "mariadb.log")
        self.servers.append(db)
        wait_unix_socket(sock, db)
        password = secrets.token_hex(16)
        (run / "mariadb.password").write_text(password + "\n")
        subprocess.run(["mariadb", "--no-defaults", "-S", str(sock), "-uroot", "-e",
                        "CREATE DATABASE phpsess; CREATE USER 'phpsess'@'localhost' "
                        f"IDENTIFIED BY '{password}'; "
                        "GRANT ALL ON phpsess.* TO 'phpsess'@'localhost'"],
                       check=True, capture_output=True, timeout=60)
        daemon = Proc("phpsess --storage mysql://", [
            *serve, "--listen", f"unix:{run / 'phpsess-mariadb.sock'}",
            "--storage", f"mysql://phpsess@localhost/phpsess?socket={sock}",
            "--storage-password-file", str(run / "mariadb.password")],
            run / "phpsess-mariadb.log")
        self.servers.append(daemon)
        wait_unix_socket(run / "phpsess-mariadb.sock", daemon)
        # The database's CPU is part of what this storage costs.
        self.counters["phpsess-mariadb"] = lambda: phpsess_counters(
            run / "phpsess-mariadb.sock", [daemon.pid, db.pid])

    def start_cluster(self, serve: list[str]) -> None:
        run = self.run_dir
        secret = run / "cluster.secret"
        secret.write_text(secrets.token_hex(32) + "\n")
        secret.chmod(0o600)
        ports = {"a": free_port(), "b": free_port()}
        nodes: list[Proc] = []
        for name, other in (("a", "b"), ("b", "a")):
            node = Proc(f"phpsess cluster node {name}", [
                *serve, "--listen", f"unix:{run / f'phpsess-{name}.sock'}",
                "--data-dir", str(run / f"phpsess-data-{name}"), "--node", name,
                "--cluster-listen", f"127.0.0.1:{ports[name]}",
                "--peer", f"{other}=127.0.0.1:{ports[other]}",
                "--cluster-secret-file", str(secret)], run / f"phpsess-{name}.log")
            self.servers.append(node)
            nodes.append(node)
        for name, node in zip("ab", nodes, strict=True):
            wait_unix_socket(run / f"phpsess-{name}.sock", node)
        self.wait_cluster([run / "phpsess-a.sock", run / "phpsess-b.sock"])
        self.counters["phpsess-cluster"] = lambda: phpsess_counters(
            run / "phpsess-a.sock", [n.pid for n in nodes])

    def wait_cluster(self, socks: Sequence[Path], timeout_s: float = 15.0) -> None:
        """Until every node reports every peer alive and the cluster not degraded."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            formed = True
            for sock in socks:
                out = subprocess.run([str(PHPSESS), "status", "--connect", f"unix:{sock}",
                                      "--json"], capture_output=True, text=True, timeout=30,
                                     check=False)
                last = out.stdout + out.stderr
                cluster = json.loads(out.stdout).get("cluster", {}) if out.returncode == 0 \
                    else {}
                peers = cluster.get("peers", {})
                if cluster.get("degraded", True) or not peers or any(
                        p.get("state") != "alive" for p in peers.values()):
                    formed = False
            if formed:
                return
            time.sleep(0.2)
        raise BenchError(f"the cluster did not form within {timeout_s:.0f} s: {last[-1500:]}")

    # ---- php-fpm per handler

    @contextlib.contextmanager
    def php_fpm(self, h: Handler) -> Iterator[Proc]:
        run = self.run_dir
        sock = run / "php-fpm.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        conf = run / f"php-fpm-{h.key}.conf"
        lines = [self.template(
            "php-fpm.conf", DIR=str(run), FPM_SOCKET=str(sock),
            CHILDREN=str(self.args.children),
            USER="user = root\ngroup = root" if self.root_user else "",
            PHP_ERROR_LOG=str(self.php_error_log(h)))]
        lines += [f"php_admin_value[{k}] = {v}" for k, v in h.ini.items()]
        # Stopped gracefully (SIGQUIT) after each run: with php-fpm's default
        # process_control_timeout (0) the master follows SIGQUIT at once with SIGTERM to
        # its children, killing the requests under way. PHP's files handler writes a
        # session as ftruncate(0) then pwrite(), so a child killed between the two (the
        # ftruncate takes ~1 ms on ext4 mounted with discard) leaves the session file
        # empty: the next request starts it again from 0, and the final sum showed that
        # as lost updates. Let the requests under way finish their writes.
        lines += ["", "[global]", f"process_control_timeout = {FPM_STOP_GRACE_S}s"]
        conf.write_text("\n".join(lines) + "\n")
        argv = [self.fpm_binary, "-F", "-y", str(conf)]
        if self.root_user:
            argv.append("-R")
        proc = Proc(f"php-fpm ({h.key})", argv, run / "php-fpm.out")
        self.fpm = proc
        try:
            wait_unix_socket(sock, proc)
            yield proc
        finally:
            # graceful: requests under way finish and write their sessions
            proc.stop(signal.SIGQUIT, timeout_s=FPM_STOP_GRACE_S + 2)
            self.fpm = None

    def php_error_log(self, h: Handler) -> Path:
        return self.run_dir / f"php-errors-{h.key}.log"

    def php_log_lines(self, h: Handler) -> list[str]:
        try:
            return self.php_error_log(h).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def connection(self, timeout_s: float = 30.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)

    def prepare(self, h: Handler, result: HandlerResult) -> None:
        """Checks the handler really works, then makes its pool of sessions."""
        conn = self.connection()
        try:
            info_reply = http_get(conn, "/counter.php?info=1")
            if info_reply.status != 200:
                raise BenchError(f"{h.label}: the info page answered {info_reply.status}: "
                                 f"{info_reply.body[:500]}")
            info: dict[str, Any] = json.loads(info_reply.body)
            result.info = info
            if not info.get("opcache"):
                raise BenchError(f"{h.label}: OPcache is off in php-fpm")
            if h.sessions and info.get("save_handler") != h.expect_save_handler:
                raise BenchError(f"{h.label}: session.save_handler is "
                                 f"{info.get('save_handler')!r}, expected "
                                 f"{h.expect_save_handler!r} (save_path "
                                 f"{info.get('save_path')!r})")
            first = http_get(conn, h.page)
            if h.sessions:
                second = http_get(conn, h.page, first.session_id)
                if (count_of(first), count_of(second)) != (1, 2) or not first.session_id:
                    raise BenchError(
                        f"{h.label} does not work: two requests with one session cookie "
                        f"answered {first.status} {first.body.strip()!r} then {second.status} "
                        f"{second.body.strip()!r}\n"
                        + "\n".join(self.php_log_lines(h)[-10:]))
            elif count_of(first) != 1:
                raise BenchError(f"{h.label}: {first.status} {first.body[:200]!r}")
        finally:
            conn.close()
        ids_file = self.run_dir / f"ids-{h.key}.txt"
        if h.sessions:
            ids = self.create_sessions(h)
        else:
            ids = [secrets.token_hex(13) for _ in range(self.args.sessions)]
        ids_file.write_text("\n".join(ids) + "\n")
        self.ids[h.key] = ids_file
        result.expected_count = len(ids) if h.sessions else 0

    def create_sessions(self, h: Handler) -> list[str]:
        def make(n: int) -> list[str]:
            conn = self.connection()
            made: list[str] = []
            try:
                for _ in range(n):
                    reply = http_get(conn, h.page)
                    if count_of(reply) != 1 or reply.session_id is None:
                        raise BenchError(f"{h.label}: making a session answered "
                                         f"{reply.status} {reply.body[:200]!r}")
                    made.append(reply.session_id)
            finally:
                conn.close()
            return made

        workers = 8
        share = [self.args.sessions // workers + (i < self.args.sessions % workers)
                 for i in range(workers)]
        with ThreadPoolExecutor(workers) as pool:
            ids = [sid for part in pool.map(make, share) for sid in part]
        if len(set(ids)) != len(ids):
            raise BenchError(f"{h.label}: the handler gave the same session ID twice")
        return ids

    def wrk(self, h: Handler, seconds: float) -> dict[str, Any]:
        argv = ["wrk", f"-t{self.args.threads}", f"-c{self.args.connections}",
                f"-d{seconds:g}s", "-s", str(TEMPLATES / "pool.lua"),
                f"http://127.0.0.1:{self.port}", "--", str(self.ids[h.key]), h.page,
                str(self.args.threads)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=seconds + 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for line in out.splitlines():
            if line.startswith("WRK-JSON "):
                parsed: dict[str, Any] = json.loads(line[len("WRK-JSON "):])
                return parsed
        raise BenchError(f"wrk printed no result (exit {proc.returncode}):\n{out}\n{err}")

    def counters_now(self, h: Handler) -> Counters | None:
        return self.counters[h.server]() if h.server else None

    def measure(self, h: Handler, result: HandlerResult, round_no: int,
                quiet_wait_s: float) -> None:
        with self.php_fpm(h) as fpm:
            if h.key not in self.ids:
                self.prepare(h, result)
            warm = self.wrk(h, WARMUP_S)
            result.expected_count += (warm["requests"] - warm["errors"]["status"]
                                      if h.sessions else 0)
            self.wait_quiet(quiet_wait_s)
            log_before = len(self.php_log_lines(h))
            before = self.counters_now(h)
            php_before = group_cpu_seconds(fpm.pid)
            ours_before, busy_before, wall_before = self.our_cpu_seconds(), \
                machine_busy_seconds(), time.monotonic()
            out = self.wrk(h, self.args.seconds)
            ours_after, busy_after, wall_after = self.our_cpu_seconds(), \
                machine_busy_seconds(), time.monotonic()
            php_after = group_cpu_seconds(fpm.pid)
            after = self.counters_now(h)
            new_log = self.php_log_lines(h)[log_before:]
        n = out["requests"]
        ok = n - out["errors"]["status"]
        if h.sessions:
            result.expected_count += ok
        server_cpu = connects = None
        commands: dict[str, float] = {}
        if before is not None and after is not None and n:
            server_cpu = (after.cpu_s - before.cpu_s) * 1e6 / n
            if before.connections is not None and after.connections is not None:
                connects = (after.connections - before.connections) / n
            commands = {k: (v - before.commands.get(k, 0.0)) / n
                        for k, v in after.commands.items()
                        if v - before.commands.get(k, 0.0) > 0}
        self.note_warnings(result, new_log)
        run = Run(round=round_no, requests_per_s=n / (out["duration_us"] / 1e6), requests=n,
                  ok=ok, errors=out["errors"], latency_us=out["latency_us"],
                  php_cpu_us=(php_after - php_before) * 1e6 / n if n else 0.0,
                  server_cpu_us=server_cpu, connects=connects, commands=commands,
                  php_warnings=sum(1 for line in new_log if "PHP " in line),
                  other_cpu_pct=max(0.0, (busy_after - busy_before) - (ours_after - ours_before))
                  * 100 / ((wall_after - wall_before) * (os.cpu_count() or 1)))
        result.runs.append(run)
        errors = sum(out["errors"].values())
        log(f"round {round_no}: {h.label}: {run.requests_per_s:,.0f} req/s, "
            f"p50 {run.latency_us['p50'] / 1000:.1f} ms, p99 {run.latency_us['p99'] / 1000:.1f} ms"
            + (f", {errors} errors {out['errors']}" if errors else "")
            + (f", {run.php_warnings} PHP warnings" if run.php_warnings else "")
            + (f"; other processes used {run.other_cpu_pct:.0f} % of the CPUs"
               if run.other_cpu_pct >= 5 else ""))

    def others_cpu_share(self, window_s: float) -> float:
        """The share of all cores used by processes that are not ours, over window_s."""
        ours, busy, started = self.our_cpu_seconds(), machine_busy_seconds(), time.monotonic()
        time.sleep(window_s)
        used = (machine_busy_seconds() - busy) - (self.our_cpu_seconds() - ours)
        return max(0.0, used) / ((time.monotonic() - started) * (os.cpu_count() or 1))

    def wait_quiet(self, max_wait_s: float) -> None:
        """Before a measured run: while other processes use more than QUIET_SHARE of
        the CPUs, wait (at most max_wait_s)."""
        if max_wait_s <= 0:
            return
        deadline = time.monotonic() + max_wait_s
        share = self.others_cpu_share(0.5)
        if share <= QUIET_SHARE:
            return
        log(f"waiting for a quieter machine: other processes use {share:.0%} of the CPUs")
        while time.monotonic() < deadline:
            share = self.others_cpu_share(1.0)
            if share <= QUIET_SHARE:
                return
        log(f"still {share:.0%} used by others after {max_wait_s:.0f} s: measuring anyway")

    def our_cpu_seconds(self) -> float:
        """CPU time of everything this benchmark runs: servers, nginx, php-fpm, wrk
        (a child that has been waited for), and this process."""
        groups = cpu_by_process_group()
        total = sum(groups.get(p.pid, 0.0) for p in [*self.servers, self.nginx, self.fpm]
                    if p is not None)
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def note_warnings(self, result: HandlerResult, lines: list[str]) -> None:
        for line in lines:
            # "[date] PHP Warning:  message in file on line N": keep distinct messages
            message = re.sub(r"^\[[^\]]*\]\s*", "", line).strip()
            message = re.sub(r"\b[0-9a-zA-Z]{20,}(-[a-z0-9]+-[a-z0-9]+)?\b", "<id>", message)
            if message and message not in result.warnings and len(result.warnings) < 20:
                result.warnings.append(message)

    # ---- correctness

    def final_checks(self, h: Handler, result: HandlerResult) -> None:
        with self.php_fpm(h):
            if h.key not in self.ids:
                self.prepare(h, result)
            if result.runs:
                self.sum_pool(h, result)
            for hold in CONTENTION_HOLDS_MS:
                result.contention[hold] = self.contention(h, result, hold)
                c = result.contention[hold]
                log(f"contention: {h.label}, holding {hold} ms: count +{c['increase']} of "
                    f"{CONTENTION_REQUESTS}, {c['failed']} failed, {c['seconds']:.2f} s"
                    + (f", {c['php_warnings']} PHP warnings" if c["php_warnings"] else ""))

    def sum_pool(self, h: Handler, result: HandlerResult) -> None:
        ids = self.ids[h.key].read_text().split()

        def peek(part: list[str]) -> tuple[int, int]:
            conn = self.connection()
            total = unreadable = 0
            try:
                for sid in part:
                    count = count_of(http_get(conn, "/counter.php?peek=1", sid))
                    if count is None:
                        unreadable += 1
                    else:
                        total += count
            finally:
                conn.close()
            return total, unreadable

        parts = [ids[i::8] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            sums = list(pool.map(peek, parts))
        result.pool_sum = sum(s for s, _ in sums)
        result.pool_unreadable = sum(u for _, u in sums)
        diff = result.pool_sum - result.expected_count
        log(f"sessions: {h.label}: counts add up to {result.pool_sum:,}, "
            f"{result.expected_count:,} requests succeeded ({diff:+,})"
            + (f", {result.pool_unreadable} unreadable" if result.pool_unreadable else ""))

    def contention(self, h: Handler, result: HandlerResult, hold_ms: int) -> dict[str, Any]:
        conn = self.connection(timeout_s=120)
        try:
            first = http_get(conn, h.page)
        finally:
            conn.close()
        if first.session_id is None or count_of(first) != 1:
            raise BenchError(f"{h.label}: {first.status} {first.body[:200]!r}")
        sid = first.session_id
        path = h.page + (f"?hold_ms={hold_ms}" if hold_ms else "")
        conns = [self.connection(timeout_s=120) for _ in range(CONTENTION_REQUESTS)]
        for c in conns:
            c.connect()
        barrier = threading.Barrier(CONTENTION_REQUESTS)
        replies: list[Reply | str] = ["not sent"] * CONTENTION_REQUESTS
        log_before = len(self.php_log_lines(h))

        def one(i: int) -> None:
            try:
                barrier.wait(timeout=30)
                replies[i] = http_get(conns[i], path, sid)
            except Exception as e:  # any failure is a failed request
                replies[i] = f"{type(e).__name__}: {e}"

        started = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(CONTENTION_REQUESTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        for c in conns:
            c.close()
        conn = self.connection()
        try:
            peek = http_get(conn, "/counter.php?peek=1", sid)
        finally:
            conn.close()
        final = count_of(peek)
        new_log = self.php_log_lines(h)[log_before:]
        self.note_warnings(result, new_log)
        failures: dict[str, int] = {}
        for r in replies:
            if isinstance(r, str):
                why = r
            elif count_of(r) is None:
                why = f"{r.status} {r.body.strip()[:80]}"
            else:
                continue
            failures[why] = failures.get(why, 0) + 1
        return {
            "increase": None if final is None else final - 1,
            "failed": sum(failures.values()),
            "failures": failures,
            "seconds": seconds,
            "php_warnings": sum(1 for line in new_log if "PHP " in line),
        }

    # ---- the whole run

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self) -> tuple[dict[str, str], list[HandlerResult]]:
        ensure_packages()
        # Debian's package installs php-fpm as /usr/sbin/php-fpmX.Y, which
        # was not there when this object was made on a fresh machine.
        self.fpm_binary = php_fpm_binary() or "php-fpm"
        chosen = self.setup()
        log(f"nginx on 127.0.0.1:{self.port}, work directory {self.run_dir}; handlers: "
            + ", ".join(h.key for h in chosen))
        self.results = {h.key: HandlerResult(h) for h in chosen}
        final_reserve = FINAL_PHASE_S_PER_HANDLER * len(chosen)
        per_run = self.args.seconds + WARMUP_S + RUN_OVERHEAD_S
        runs_left = self.args.rounds * len(chosen)
        for round_no in range(1, self.args.rounds + 1):
            skipped: list[str] = []
            for h in chosen:
                result = self.results[h.key]
                first_time = h.key not in self.ids
                need = per_run + (self.args.sessions / 500 if first_time else 0)
                runs_left -= 1
                spare = self.time_left() - final_reserve - need
                if spare < 0:
                    result.skipped_runs += 1
                    skipped.append(h.key)
                    continue
                # wait for a quieter machine only as long as every later run still fits
                quiet_wait = min(self.args.quiet_wait_s, spare - runs_left * per_run)
                self.measure(h, result, round_no, quiet_wait)
            if skipped:
                log(f"budget: skipped round {round_no} of {', '.join(skipped)}")
        if not self.args.skip_contention:
            for h in chosen:
                if not h.sessions:
                    continue
                if self.time_left() < FINAL_PHASE_S_PER_HANDLER:
                    log(f"budget: no time left for the correctness checks of {h.label}")
                    continue
                self.final_checks(h, self.results[h.key])
        first = next(iter(self.results.values()))
        facts = machine_facts(self.fpm_binary, first.info)
        return facts, list(self.results.values())


# --------------------------------------------------------------------------
# Reporting


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt_us_as_ms(us: float) -> str:
    return f"{us / 1000:.1f}" if us == us else "-"


def summarize(results: list[HandlerResult]) -> list[dict[str, Any]]:
    rows = []
    base = next((median([r.requests_per_s for r in res.runs])
                 for res in results if res.handler.key == "files-tmpfs"), float("nan"))
    for res in results:
        runs = res.runs
        rps = median([r.requests_per_s for r in runs])
        server_cpu = [r.server_cpu_us for r in runs if r.server_cpu_us is not None]
        connects = [r.connects for r in runs if r.connects is not None]
        verbs = sorted({k for r in runs for k in r.commands})
        rows.append({
            "key": res.handler.key,
            "label": res.handler.label,
            "runs": len(runs),
            "req_per_s": rps,
            "req_per_s_all": [r.requests_per_s for r in runs],
            "ratio": rps / base if base == base and base else float("nan"),
            "p50_us": median([r.latency_us["p50"] for r in runs]),
            "p99_us": median([r.latency_us["p99"] for r in runs]),
            "errors": {k: sum(r.errors[k] for r in runs) for k in
                       (runs[0].errors if runs else {})},
            "php_cpu_us": median([r.php_cpu_us for r in runs]),
            "server_cpu_us": median(server_cpu) if server_cpu else None,
            "connects": median(connects) if connects else None,
            "commands": {v: median([r.commands.get(v, 0.0) for r in runs]) for v in verbs},
            "php_warnings": sum(r.php_warnings for r in runs),
        })
    return rows


def optional(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def commands_text(commands: dict[str, float]) -> str:
    total = sum(commands.values())
    if not commands:
        return "-"
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(commands.items(), key=lambda kv: -kv[1])
                      if v >= 0.005)
    return f"{total:.2f} ({parts})"


def markdown(facts: dict[str, str], results: list[HandlerResult], args: argparse.Namespace,
             notes: list[str], elapsed_s: float) -> str:
    rows = summarize(results)
    rounds = max((r["runs"] for r in rows), default=0)
    out: list[str] = []
    w = out.append
    w("# HTTP benchmark: nginx -> php-fpm -> session handler\n")
    settings = " ".join(f"--{k.replace('_', '-')} {getattr(args, k):g}" for k in (
        "rounds", "seconds", "threads", "connections", "sessions", "children", "budget_s",
        "quiet_wait_s"))
    w(f"`bench/http.py {settings}`, {elapsed_s / 60:.1f} min.\n")
    w("| machine | |\n|---|---|")
    for k, v in facts.items():
        w(f"| {k} | {v} |")
    w("")
    w(f"nginx (1 worker) -> php-fpm (`pm = static`, {args.children} children, unix socket, "
      f"OPcache on) -> `counter.php` (`session_start()`, a 1 KiB value on the first visit, "
      f"`count++`, echo). `wrk -t{args.threads} -c{args.connections} -d{args.seconds:g}s`, "
      f"{args.sessions} session cookies reused round-robin (no two requests in flight share a "
      f"session), after a {WARMUP_S:g} s warm-up per run; rounds interleaved across handlers. "
      "Redis and memcached on unix sockets, handler defaults otherwise. "
      + " ".join(notes) + "\n")
    w(f"## Requests per second (median of {rounds}), ratio to files on tmpfs\n")
    w("| handler | req/s | ratio | p50 ms | p99 ms | errors | PHP CPU us/req "
      "| server CPU us/req | connects/req | server commands/req |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if not r["runs"]:
            w(f"| {r['label']} | skipped (budget) | | | | | | | | |")
            continue
        errors = sum(r["errors"].values())
        err_text = str(errors) if not errors else \
            f"{errors} (" + ", ".join(f"{k} {v}" for k, v in r["errors"].items() if v) + ")"
        w(f"| {r['label']} | {r['req_per_s']:,.0f} | {r['ratio']:.2f} "
          f"| {fmt_us_as_ms(r['p50_us'])} | {fmt_us_as_ms(r['p99_us'])} | {err_text} "
          f"| {r['php_cpu_us']:.0f} "
          f"| {optional(r['server_cpu_us'], '.0f')} | {optional(r['connects'], '.2f')} "
          f"| {commands_text(r['commands'])} |")
    w("")
    w("errors: wrk's socket errors and responses >= 400, summed over the rounds. "
      "CPU per request: user + system time of all php-fpm processes, and of the session "
      "server (the 2-daemon row: both daemons), divided by the requests. connects and commands: "
      "from the server's own counters (redis `INFO`, memcached `stats`, `phpsess status`); "
      "phpsess does not count connections, and its client sends `HELLO` with the first "
      "command of every request (pipelined, no extra round trip).\n")
    w("Every run, req/s (in brackets: CPU used meanwhile by processes that are not part of "
      "the benchmark, % of all cores; the machine is shared):\n")
    w("| handler | " + " | ".join(f"round {i}" for i in range(1, rounds + 1)) + " |")
    w("|---|" + "---:|" * rounds)
    for res in results:
        cells = [f"{r.requests_per_s:,.0f} ({r.other_cpu_pct:.0f} %)" for r in res.runs]
        cells += ["skipped"] * (rounds - len(cells))
        w(f"| {res.handler.label} | " + " | ".join(cells) + " |")
    w("")
    checked = [res for res in results if res.pool_sum is not None]
    if checked:
        w("## No lost updates under load\n")
        w("After the rounds, the counts of the pooled sessions are read back (`?peek=1`, "
          "`read_and_close`). Their sum should equal the sessions plus the requests that "
          "succeeded (warm-ups included); requests still in flight when wrk stops are "
          f"served but not counted by wrk, so up to +{args.connections} per run is expected, "
          "a negative difference is lost updates. unreadable: pooled sessions whose "
          "`?peek=1` gave no count (`session_start()` failed, or the session is gone or "
          "empty); they add nothing to the sum.\n")
        w("| handler | sessions' counts | expected | difference | runs | unreadable |")
        w("|---|---:|---:|---:|---:|---:|")
        for res in checked:
            assert res.pool_sum is not None
            w(f"| {res.handler.label} | {res.pool_sum:,} | {res.expected_count:,} "
              f"| {res.pool_sum - res.expected_count:+,} | {2 * len(res.runs)} "
              f"| {res.pool_unreadable} |")
        w("")
    contended = [res for res in results if res.contention]
    if contended:
        w(f"## {CONTENTION_REQUESTS} concurrent requests on one session "
          f"(the count should rise by {CONTENTION_REQUESTS})\n")
        w("One new session, then "
          f"{CONTENTION_REQUESTS} simultaneous GETs with its cookie (threads, one connection "
          "each), the page holding the session the given time between `session_start()` and "
          "the implicit write; then the count is read. failed: not 200 or no count in the "
          "page (e.g. `session_start()` failed). PHP warnings: lines in that pool's PHP error "
          "log.\n")
        head = " | ".join(f"holds {ms} ms: count | failed | time | PHP warnings"
                          for ms in CONTENTION_HOLDS_MS)
        w(f"| handler | {head} |")
        w("|---|" + "---:|---:|---:|---:|" * len(CONTENTION_HOLDS_MS))
        for res in contended:
            cells = []
            for ms in CONTENTION_HOLDS_MS:
                c = res.contention.get(ms)
                if c is None:
                    cells += ["-", "-", "-", "-"]
                    continue
                inc = "?" if c["increase"] is None else f"+{c['increase']}"
                if c["increase"] is not None and c["increase"] != CONTENTION_REQUESTS:
                    inc = f"**{inc}**"
                cells += [inc, str(c["failed"]), f"{c['seconds']:.2f} s", str(c["php_warnings"])]
            w(f"| {res.handler.label} | " + " | ".join(cells) + " |")
        w("")
    warned = [res for res in results if res.warnings]
    if warned:
        w("## PHP warnings and errors logged (distinct messages, session IDs elided)\n")
        for res in warned:
            w(f"- {res.handler.label}:")
            for message in res.warnings[:8]:
                w(f"  - `{message[:300]}`")
        w("")
    return "\n".join(out)


def chart(results: list[HandlerResult], facts: dict[str, str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing (pip install -e '.[bench]'): no chart")
        return False
    rows = [r for r in summarize(results) if r["runs"]]
    labels = [r["label"] for r in rows][::-1]
    rps = [r["req_per_s"] for r in rows][::-1]
    lo = [r["req_per_s"] - min(r["req_per_s_all"]) for r in rows][::-1]
    hi = [max(r["req_per_s_all"]) - r["req_per_s"] for r in rows][::-1]
    p99 = [r["p99_us"] / 1000 for r in rows][::-1]
    colors = ["#d9822b" if r["key"].startswith("phpsess") else
              "#888888" if r["key"] == "none" else "#3a6ea5" for r in rows][::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2.2),
                                   gridspec_kw={"width_ratios": [3, 1.3]}, sharey=True)
    ax1.barh(labels, rps, xerr=[lo, hi], color=colors, capsize=3)
    top = max(v + h for v, h in zip(rps, hi, strict=True))
    for y, (value, above, r) in enumerate(zip(rps, hi, rows[::-1], strict=True)):
        ax1.text(value + above + top * 0.015, y, f"{value:,.0f}  ({r['ratio']:.2f})",
                 va="center", fontsize=8)
    ax1.set_xlim(0, top * 1.25)
    ax1.set_xlabel("requests/s (median, whiskers: min-max of rounds); ratio to files, tmpfs")
    ax2.barh(labels, p99, color=colors)
    ax2.set_xlabel("p99 latency, ms (median of rounds)")
    fig.suptitle(f"nginx -> php-fpm -> session handler, {facts.get('cores')} cores, "
                 f"phpsess {facts.get('phpsess commit', '?').split()[0]}, {facts.get('date')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def to_json(facts: dict[str, str], results: list[HandlerResult],
            args: argparse.Namespace) -> dict[str, Any]:
    return {
        "machine": facts,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "summary": summarize(results),
        "handlers": [{
            "key": res.handler.key, "label": res.handler.label, "ini": res.handler.ini,
            "info": res.info,
            "runs": [vars(r) for r in res.runs],
            "skipped_runs": res.skipped_runs,
            "pool_sum": res.pool_sum, "expected_count": res.expected_count,
            "contention": {str(k): v for k, v in res.contention.items()},
            "warnings": res.warnings,
        } for res in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="every handler once per round, rounds interleaved (default: 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk duration per run")
    parser.add_argument("--budget-s", type=float, default=900.0,
                        help="overall time budget; later runs are skipped (default: 900)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--sessions", type=int, default=1000, help="session cookies in the pool")
    parser.add_argument("--children", type=int, default=8, help="php-fpm pm.max_children")
    parser.add_argument("--handlers", default="",
                        help="comma-separated subset (files-tmpfs is always included): none, "
                             "files-tmpfs, files-disk, redis, redis-lock, memcached, "
                             "memcached-lock, phpsess, phpsess-persistent, phpsess-memory, "
                             "phpsess-cluster, phpsess-mariadb")
    parser.add_argument("--quiet-wait-s", type=float, default=20.0,
                        help="before each run, wait up to this long while other processes "
                             f"use more than {QUIET_SHARE * 100:.0f} %% of the CPUs (default: 20; "
                             "never beyond what the budget leaves)")
    parser.add_argument("--skip-contention", action="store_true",
                        help="skip the lost-update and contention checks")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="where http.md, http.json and http.png go (default: bench/results)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = parser.parse_args()
    if args.sessions < args.connections * 2:
        parser.error("--sessions must be at least twice --connections")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    bench = Bench(args)
    facts: dict[str, str] = {}
    results: list[HandlerResult] = []
    failure: str | None = None
    try:
        facts, results = bench.run()
    except BenchError as e:
        failure = str(e)
    except (KeyboardInterrupt, Interrupted) as e:
        failure = f"interrupted ({type(e).__name__} {e})"
    finally:
        bench.cleanup()
    if failure is not None:
        log(f"FAILED: {failure}")
        results = [r for r in bench.results.values() if r.runs]
        if not results:
            return 1
        facts = facts or machine_facts(bench.fpm_binary, results[0].info)
        bench.notes.append(f"**Incomplete run: {failure.splitlines()[0]}**")
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(facts, results, args, bench.notes, time.monotonic() - STARTED)
    (args.out / "http.md").write_text(text + "\n")
    (args.out / "http.json").write_text(json.dumps(to_json(facts, results, args), indent=1,
                                                   default=str) + "\n")
    made_chart = chart(results, facts, args.out / "http.png")
    log(f"wrote {args.out / 'http.md'}, http.json" + (", http.png" if made_chart else ""))
    print(text)
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
