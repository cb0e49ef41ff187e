"""Daemon-alone benchmark: requests per second and latency percentiles of one
``phpsess serve`` process driven by a C load generator (``bench/loadgen.c``)
that speaks the protocol directly, and memory per session at 1,000,000
sessions.

    .venv/bin/python bench/daemon.py [--seconds 10] [--sessions 1000000] [--out bench/results]

The daemon is pinned to CPU 0 and the load generator to CPU 1 with
``taskset``, so "one daemon core" is literal.  For each daemon configuration
(``--memory-only`` and the default durable one, ``--data-dir`` with
``--fsync interval``) and each workload mix (``rw``: what PHP's
SessionHandler sends for one web request, ``read``, ``write``) it runs
1 connection, 32 connections, 32 connections pipelined (``--depth``), then a
fixed-rate run at half the measured 32-connection rate (latency measured from
the scheduled send time, so queueing is not hidden).  Then it fills
``--sessions`` sessions of 1 KiB into a fresh daemon and reports the growth of
its resident memory per session.

The machine may be shared: before each run the script waits (up to
``--quiet-wait`` seconds) until other processes use little CPU, and every row
reports how much of the daemon's core other processes took during the
measured window, so a disturbed number can be recognised.

Progress goes to stderr; the Markdown report to stdout and ``OUT/daemon.md``.
Everything runs on unix sockets in a temporary directory; daemons are stopped
by PID (SIGTERM, then SIGKILL) and the directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PHPSESS = ROOT / ".venv" / "bin" / "phpsess"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
LOADGEN_SRC = ROOT / "bench" / "loadgen.c"
DAEMON_CPU = 0
LOADGEN_CPU = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
VALUE_BYTES = 1024
# Others may use this many cores before a run counts as disturbed.
QUIET_CORES = 0.15
# A run during which others took more of the daemon's core than this is redone.
DISTURBED_PCT = 10.0


def note(message: str) -> None:
    print(f"[daemon-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ CPU time


def cpu_busy_seconds() -> dict[int, float]:
    """Busy time of each CPU since boot (everything but idle and iowait; steal counts)."""
    busy: dict[int, float] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *rest = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in rest[:8]]
                busy[int(name[3:])] = (sum(v) - v[3] - v[4]) / CLK_TCK
    return busy


def process_cpu_seconds(pid: int) -> float:
    """User plus system time of a process and all its threads."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuWindow:
    """CPU use over a window: the daemon's, and everybody else's on both CPUs."""

    seconds: float = 0.0
    daemon: float = 0.0  # daemon CPU seconds
    loadgen: float = 0.0  # load generator CPU seconds
    other_cpu0: float = 0.0  # CPU 0 busy seconds not spent in the daemon
    other_cpu1: float = 0.0  # CPU 1 busy seconds not spent in the load generator

    def _pct(self, v: float) -> float:
        return 100 * max(0.0, v) / self.seconds if self.seconds else 0.0

    @property
    def daemon_pct(self) -> float:
        return self._pct(self.daemon)

    @property
    def loadgen_pct(self) -> float:
        return self._pct(self.loadgen)

    @property
    def other_pct(self) -> float:
        """Others' share of the daemon's core."""
        return self._pct(self.other_cpu0)

    @property
    def other_loadgen_pct(self) -> float:
        """Others' share of the load generator's core."""
        return self._pct(self.other_cpu1)

    @property
    def disturbance(self) -> float:
        return max(self.other_pct, self.other_loadgen_pct)


class CpuProbe:
    """CPU counters at a moment; ``window()`` gives the use since then."""

    def __init__(self, daemon_pid: int, loadgen_pid: int | None = None) -> None:
        self.daemon_pid = daemon_pid
        self.loadgen_pid = loadgen_pid
        self.t = time.monotonic()
        self.busy = cpu_busy_seconds()
        self.daemon = process_cpu_seconds(daemon_pid)
        self.loadgen = process_cpu_seconds(loadgen_pid) if loadgen_pid else 0.0

    def window(self) -> CpuWindow:
        t = time.monotonic()
        busy = cpu_busy_seconds()
        d = process_cpu_seconds(self.daemon_pid) - self.daemon
        lg = (process_cpu_seconds(self.loadgen_pid) - self.loadgen) if self.loadgen_pid else 0.0
        return CpuWindow(
            seconds=t - self.t,
            daemon=d,
            loadgen=lg,
            other_cpu0=busy[DAEMON_CPU] - self.busy[DAEMON_CPU] - d,
            other_cpu1=busy[LOADGEN_CPU] - self.busy[LOADGEN_CPU] - lg,
        )


def wait_quiet(pid: int, max_wait: float) -> float:
    """Waits until other processes use under QUIET_CORES cores (on both CPUs,
    the idle daemon excluded); returns what they used in the last sample."""
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        probe = CpuProbe(pid)
        time.sleep(0.5)
        w = probe.window()
        others = (w.other_cpu0 + w.other_cpu1) / w.seconds
        if others < QUIET_CORES or time.monotonic() >= deadline:
            if others >= QUIET_CORES:
                note(f"machine still busy ({others:.2f} cores used by others); running anyway")
            return others
        if not announced:
            note(f"waiting for a quiet machine: others use {others:.2f} cores")
            announced = True


# ------------------------------------------------------------------- daemon


class Daemon:
    """One ``phpsess serve`` pinned to DAEMON_CPU, stopped by PID."""

    def __init__(self, workdir: Path, name: str, extra: list[str]) -> None:
        self.name = name
        self.sock = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.stop_seconds = 0.0

    @property
    def address(self) -> str:
        return f"unix:{self.sock}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> None:
        cmd = [
            "taskset", "-c", str(DAEMON_CPU), str(PHPSESS), "serve",
            "--listen", self.address, "--log-level", "warning", *self.extra,
        ]
        note(f"starting {self.name}: {' '.join(cmd[3:])}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}: {self.log_text()[-2000:]}"
                )
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self.sock))
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen within {timeout:.0f} s")
            time.sleep(0.02)
        # taskset execs the daemon, so the PID is the daemon's own.
        cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        if b"phpsess" not in cmdline:
            raise RuntimeError(f"PID {self.pid} is not the daemon: {cmdline!r}")

    def stop(self, timeout: float = 60.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self.exit_code = proc.returncode
            return
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            note(f"{self.name} ignored SIGTERM for {timeout:.0f} s; killing it")
            proc.kill()
            proc.wait(30)
        self.stop_seconds = time.monotonic() - started
        self.exit_code = proc.returncode

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stats(self) -> dict[str, Any]:
        """The daemon's STATS object (PROTOCOL.md §4.9)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.sock))
            s.sendall(b"HELLO 1 client=bench\nSTATS\n")
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} closed the connection during STATS")
                buf += chunk
                if not buf.startswith(b"OK 1\n"):
                    if b"\n" in buf:
                        raise RuntimeError(f"unexpected reply to HELLO: {buf[:200]!r}")
                    continue
                rest = buf[5:]
                if b"\n" not in rest:
                    continue
                header, payload = rest.split(b"\n", 1)
                parts = header.split()
                if parts[0] != b"DATA":
                    raise RuntimeError(f"unexpected reply to STATS: {header!r}")
                if len(payload) >= int(parts[1]):
                    stats: dict[str, Any] = json.loads(payload[: int(parts[1])])
                    return stats


# ------------------------------------------------------------------ loadgen


def build_loadgen(build_dir: Path) -> Path:
    exe = build_dir / "loadgen"
    cmd = [
        "gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror",
        "-o", str(exe), str(LOADGEN_SRC), "-lm",
    ]
    note(f"building: {' '.join(cmd)}")
    subprocess.run(cmd, check=True, timeout=120)
    return exe


@dataclass
class Run:
    config: str
    label: str
    args: list[str]
    result: dict[str, Any] = field(default_factory=dict)
    cpu: CpuWindow = field(default_factory=CpuWindow)
    loadgen_cpu: float = 0.0
    others_before: float = 0.0
    attempts: int = 1
    messages: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return float(self.result.get("rps", 0.0))


def run_loadgen(
    exe: Path, daemon: Daemon, args: list[str], timeout: float, messages: list[str]
) -> tuple[dict[str, Any], CpuWindow, float]:
    """Runs the load generator on LOADGEN_CPU; returns its JSON result, the
    CPU use during its measured window and its own CPU seconds."""
    cmd = ["taskset", "-c", str(LOADGEN_CPU), str(exe), *args, daemon.address]
    cpu_before = children_cpu_seconds()
    probe: CpuProbe | None = None
    window = CpuWindow()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert proc.stderr is not None
        deadline = time.monotonic() + timeout
        try:
            for line in _lines(proc.stderr, deadline):
                if line == "loadgen: measuring":
                    # taskset execs the load generator: the PID is its own.
                    probe = CpuProbe(daemon.pid, proc.pid)
                elif line == "loadgen: measured":
                    if probe is not None:
                        window = probe.window()
                elif line.startswith("loadgen: prefilled"):
                    note(line)
                else:
                    messages.append(line)
                    note(line)
            proc.wait(max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                note("the load generator overran its time; killing it")
                proc.kill()
                proc.wait()
        out.seek(0)
        text = out.read().decode(errors="replace").strip()
    if not text:
        raise RuntimeError(f"load generator gave no result (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(text.splitlines()[-1])
    if proc.returncode != 0:
        messages.append(f"load generator exited with {proc.returncode}")
    return result, window, children_cpu_seconds() - cpu_before


def _lines(stream: IO[bytes], deadline: float) -> Iterator[str]:
    buf = b""
    fd = stream.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("load generator timed out")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if buf:
                yield buf.decode(errors="replace")
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace")


# -------------------------------------------------------------- the runs


@dataclass
class Memory:
    config: str
    sessions: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    hwm_kib: int = 0
    fill_seconds: float = 0.0
    stats_sessions: int = 0
    stats_bytes: int = 0
    disk_bytes: int | None = None
    errors: int = 0

    @property
    def per_session(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) * 1024 / max(1, self.sessions)


@dataclass
class Bench:
    exe: Path
    seconds: float
    warmup: float
    depth: int
    keys: int
    quiet_wait: float
    retries: int
    runs: list[Run] = field(default_factory=list)

    def closed(
        self, daemon: Daemon, mix: str, conns: int, depth: int, label: str,
        extra: list[str] | None = None,
    ) -> Run:
        args = [
            "-m", mix, "-c", str(conns), "-P", str(depth), "-k", str(self.keys),
            "-d", str(self.seconds), "-w", str(self.warmup), "-s", str(VALUE_BYTES),
            *(extra if extra is not None else ["--prefill"]),
        ]
        return self._run(daemon, label, args)

    def fixed_rate(
        self, daemon: Daemon, mix: str, conns: int, rate: float, label: str,
        extra: list[str] | None = None,
    ) -> Run:
        args = [
            "-m", mix, "-c", str(conns), "-P", "1", "-R", f"{rate:.0f}", "-k", str(self.keys),
            "-d", str(self.seconds), "-w", str(self.warmup), "-s", str(VALUE_BYTES),
            *(extra if extra is not None else ["--prefill"]),
        ]
        return self._run(daemon, label, args)

    def _run(self, daemon: Daemon, label: str, args: list[str]) -> Run:
        """Runs once, and again (up to ``retries`` times) while other processes
        took more than DISTURBED_PCT of either core; keeps the least disturbed
        attempt."""
        best: Run | None = None
        for attempt in range(1 + self.retries):
            run = self._attempt(daemon, label, args)
            run.attempts = attempt + 1
            if best is None or run.cpu.disturbance < best.cpu.disturbance:
                best = run
            if run.cpu.disturbance <= DISTURBED_PCT:
                break
            if attempt < self.retries:
                note(f"  disturbed (others took {run.cpu.other_pct:.0f} % of CPU "
                     f"{DAEMON_CPU} and {run.cpu.other_loadgen_pct:.0f} % of CPU "
                     f"{LOADGEN_CPU}); running it again")
        assert best is not None
        best.attempts = run.attempts
        self.runs.append(best)
        return best

    def _attempt(self, daemon: Daemon, label: str, args: list[str]) -> Run:
        run = Run(daemon.name, label, args)
        run.others_before = wait_quiet(daemon.pid, self.quiet_wait)
        note(f"{daemon.name}: {label}: loadgen {' '.join(args)}")
        timeout = self.seconds + self.warmup + 300
        run.result, run.cpu, run.loadgen_cpu = run_loadgen(
            self.exe, daemon, args, timeout, run.messages
        )
        r = run.result
        note(
            f"  {r['rps']:,.0f} req/s, {r['cps']:,.0f} cycles/s, p50 {r['p50_us']} us, "
            f"p99 {r['p99_us']} us, max {r['max_us']} us, errors {r['errors']}, "
            f"daemon CPU {run.cpu.daemon_pct:.0f} %, loadgen CPU {run.cpu.loadgen_pct:.0f} %, "
            f"others on CPU {DAEMON_CPU}/{LOADGEN_CPU} {run.cpu.other_pct:.0f}/"
            f"{run.cpu.other_loadgen_pct:.0f} %"
        )
        return run


def throughput_runs(bench: Bench, daemon: Daemon, mixes: list[str], reconnect: bool) -> None:
    for mix in mixes:
        bench.closed(daemon, mix, 1, 1, "1 conn")
        c32 = bench.closed(daemon, mix, 32, 1, "32 conns")
        bench.closed(daemon, mix, 32, bench.depth, f"32 conns, pipelined {bench.depth}")
        if c32.rps > 0:
            half = c32.rps / 2
            bench.fixed_rate(daemon, mix, 32, half, f"32 conns, fixed {half:,.0f} req/s (half)")
        if mix == "rw":
            bench.fixed_rate(daemon, mix, 32, 10_000, "32 conns, fixed 10,000 req/s (half target)")
            if reconnect:
                bench.closed(daemon, "rwc", 32, 1, "32 conns, new connection per cycle")


def memory_run(
    bench: Bench, daemon: Daemon, sessions: int, big_store_runs: bool
) -> Memory:
    mem = Memory(daemon.name, sessions)
    time.sleep(0.5)
    mem.rss_before_kib = daemon.rss_kib()
    note(f"{daemon.name}: filling {sessions:,} sessions of {VALUE_BYTES} bytes "
         f"(RSS before {mem.rss_before_kib / 1024:.1f} MiB)")
    conns = 8 if sessions % 8 == 0 else 1
    args = [
        "-m", "write", "-c", str(conns), "-k", str(sessions), "-s", str(VALUE_BYTES),
        "--prefill", "--prefill-depth", "64", "-d", "0",
    ]
    messages: list[str] = []
    result, _, _ = run_loadgen(bench.exe, daemon, args, 600 + sessions / 2000, messages)
    mem.fill_seconds = float(result["prefill_s"])
    mem.errors = int(result["errors"])
    time.sleep(2.0)  # let a durable daemon's journal catch up
    mem.rss_after_kib = daemon.rss_kib()
    mem.hwm_kib = daemon.hwm_kib()
    stats = daemon.stats()
    mem.stats_sessions = int(stats.get("sessions", 0))
    mem.stats_bytes = int(stats.get("bytes", 0))
    data_dir = daemon.sock.parent / f"{daemon.name}-data"
    if data_dir.is_dir():
        mem.disk_bytes = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())
    note(
        f"  filled in {mem.fill_seconds:.1f} s; RSS {mem.rss_after_kib / 1024:.1f} MiB; "
        f"{mem.per_session:,.0f} bytes/session; STATS sessions {mem.stats_sessions:,}"
    )
    if big_store_runs:
        # The same sessions (same -k) exist: rw on a full store.
        saved = bench.keys
        bench.keys = sessions
        try:
            label = f"rw on {sessions:,} sessions"
            c32 = bench.closed(daemon, "rw", 32, 1, f"32 conns, {label}", ["--exist"])
            bench.closed(daemon, "rw", 32, bench.depth,
                         f"32 conns, pipelined {bench.depth}, {label}", ["--exist"])
            if c32.rps > 0:
                bench.fixed_rate(daemon, "rw", 32, c32.rps / 2,
                                 f"32 conns, fixed {c32.rps / 2:,.0f} req/s (half), {label}",
                                 ["--exist"])
        finally:
            bench.keys = saved
    return mem


# ----------------------------------------------------------------- report


def machine_facts() -> list[tuple[str, str]]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = proc_status_kib_meminfo("MemTotal")
    daemon_python = _output([str(VENV_PYTHON), "-c", "import sys; print(sys.version.split()[0])"])
    trio_version = _output([str(VENV_PYTHON), "-c", "import trio; print(trio.__version__)"])
    commit = _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "phpsess"])
    gcc = _output(["gcc", "-dumpfullversion"])
    return [
        ("CPU", f"{model}, {os.cpu_count()} CPUs"),
        ("memory", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("daemon Python", f"{daemon_python} (trio {trio_version})"),
        ("phpsess commit", commit + (" + uncommitted changes in phpsess/" if dirty else "")),
        ("load generator", f"bench/loadgen.c, gcc {gcc} -O2, one thread, epoll"),
        ("pinning", f"daemon on CPU {DAEMON_CPU}, load generator on CPU {LOADGEN_CPU} (taskset)"),
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
    ]


def proc_status_kib_meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _output(cmd: list[str]) -> str:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _us(v: Any) -> str:
    return f"{int(v):,}"


def _per_sec_range(r: dict[str, Any]) -> str:
    per_sec = [int(x) for x in r.get("per_sec", [])]
    if not per_sec:
        return "-"
    return f"{min(per_sec):,}-{max(per_sec):,}"


def report(
    bench: Bench, memories: list[Memory], daemons: list[Daemon], args: argparse.Namespace
) -> str:
    lines: list[str] = ["# phpsess: the daemon alone", ""]
    lines += [
        "Generated by `bench/daemon.py` "
        f"(`--seconds {args.seconds:g} --depth {args.depth} --keys {args.keys} "
        f"--sessions {args.sessions}`).",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine_facts()]
    lines += [
        "",
        "Workloads (`bench/loadgen.c -m`), values of 1,024 random binary bytes, "
        "session IDs of 32 characters, each connection on its own sessions "
        "(no lock contention):",
        "",
        "- `rw`: one PHP web request on an existing session, as "
        "`php-ext-shim/src/SessionHandler.php` sends it: `HELLO 1 wait_ms=... "
        "lease_ms=... client=...` pipelined with `READ <sid> LOCK` (one round trip), "
        "then `WRITE <sid> 1440 1024` + data, which also releases the lock (second "
        "round trip; no CLOSE is needed). 3 requests per cycle. Pipelined runs "
        "keep several such cycles in flight per connection and send `HELLO` once "
        "per connection only (a `HELLO` releases every lock of the connection, so "
        "it cannot be interleaved with other cycles): 2 requests per cycle.",
        "- `rwc`: `rw` on a new connection per cycle (the handler's default, "
        "`persistent=0`): connect, `HELLO`+`READ LOCK`, `WRITE`, close.",
        "- `read`: `READ <sid> NOLOCK`; `write`: `WRITE <sid> 1440 1024`.",
        "",
        "Columns: *req/s* counts protocol requests (HELLO included), *cycles/s* "
        "web requests (`rw`) or requests; latency percentiles are per request in "
        "microseconds, from sending it (fixed-rate runs: from the scheduled send "
        "time of the cycle, so queueing delay counts; no coordinated omission) to "
        "its complete reply; *cycle p99* is per web request. *1-s range* is the "
        "lowest and highest throughput of any one second (a stall shows as a low "
        "minimum). *daemon CPU* is the daemon's CPU time over the measured window "
        "(100 % = its core is saturated); "
        f"*others* is the share of CPU {DAEMON_CPU} (the daemon's) / CPU {LOADGEN_CPU} "
        "(the load generator's) that other processes took during it: the machine "
        "is shared, rows with a high value are disturbed; a run disturbed by more "
        f"than {DISTURBED_PCT:g} % is repeated (up to {args.retries} times) and the "
        "least disturbed attempt kept. Errors are counted over the whole run. "
        f"{args.seconds:g} s measured after {args.warmup:g} s warm-up; "
        f"{args.keys:,} sessions prefilled.",
        "",
        "| daemon | mix | run | req/s | cycles/s | p50 | p90 | p99 | p99.9 | max "
        "| cycle p99 | 1-s range | errors | daemon CPU | others |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in bench.runs:
        r = run.result
        lines.append(
            f"| {run.config} | {r['mix']} | {run.label} | {r['rps']:,.0f} | {r['cps']:,.0f} "
            f"| {_us(r['p50_us'])} | {_us(r['p90_us'])} | {_us(r['p99_us'])} "
            f"| {_us(r['p999_us'])} | {_us(r['max_us'])} | {_us(r['cycle_p99_us'])} "
            f"| {_per_sec_range(r)} | {r['errors']} | {run.cpu.daemon_pct:.0f} % "
            f"| {run.cpu.other_pct:.0f} / {run.cpu.other_loadgen_pct:.0f} %"
            + (f" ({run.attempts} tries)" if run.attempts > 1 else "") + " |"
        )
    lines += ["", "## Targets (one daemon core)", ""]
    lines += _targets(bench)
    if memories:
        lines += [
            "",
            "## Memory per session",
            "",
            f"A fresh daemon filled with sessions of {VALUE_BYTES} bytes (8 connections, "
            "64 pipelined WRITEs each); resident memory (`VmRSS` of `/proc/PID/status`) "
            "before and after. *Overhead* is what a session costs beyond its "
            f"{VALUE_BYTES}-byte value. *Peak* is `VmHWM`.",
            "",
            "| daemon | sessions | fill time | writes/s | RSS before | RSS after "
            "| bytes/session | overhead/session | peak RSS | STATS sessions | on disk "
            "| errors |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for m in memories:
            disk = "-" if m.disk_bytes is None else f"{m.disk_bytes / 2**20:,.0f} MiB"
            lines.append(
                f"| {m.config} | {m.sessions:,} | {m.fill_seconds:.1f} s "
                f"| {m.sessions / max(m.fill_seconds, 1e-9):,.0f} "
                f"| {m.rss_before_kib / 1024:,.1f} MiB | {m.rss_after_kib / 1024:,.1f} MiB "
                f"| {m.per_session:,.0f} | {m.per_session - VALUE_BYTES:,.0f} "
                f"| {m.hwm_kib / 1024:,.1f} MiB | {m.stats_sessions:,} | {disk} | {m.errors} |"
            )
    lines += ["", "## Daemons", ""]
    for d in daemons:
        log = d.log_text().strip().splitlines()
        lines.append(
            f"- {d.name} (`phpsess serve {' '.join(d.extra)}`): stopped by SIGTERM in "
            f"{d.stop_seconds:.1f} s, exit code {d.exit_code}; "
            f"{len(log)} log lines at level warning or above"
            + (":" if log else ".")
        )
        lines += [f"    - `{line[:300]}`" for line in log[:10]]
    problems = [(run, m) for run in bench.runs for m in run.messages]
    if problems:
        lines += ["", "## Load generator messages", ""]
        lines += [f"- {run.config} / {run.label}: `{m}`" for run, m in problems[:30]]
    return "\n".join(lines) + "\n"


def _targets(bench: Bench) -> list[str]:
    out = [
        "| daemon | mix | target | measured | |",
        "|---|---|---|--:|---|",
    ]
    for run in bench.runs:
        r = run.result
        mix = r["mix"]
        if mix == "rwc" or "sessions" in run.label:
            continue
        if run.label == f"32 conns, pipelined {bench.depth}":
            ok = r["rps"] >= 40_000
            out.append(f"| {run.config} | {mix} | ≥ 40,000 req/s, 32 pipelining conns "
                       f"| {r['rps']:,.0f} req/s | {'met' if ok else 'NOT met'} |")
        elif run.label == "32 conns":
            ok = r["rps"] >= 20_000
            out.append(f"| {run.config} | {mix} | ≥ 20,000 req/s, 32 conns, not pipelined "
                       f"| {r['rps']:,.0f} req/s ({r['cps']:,.0f} cycles/s) "
                       f"| {'met' if ok else 'NOT met'} |")
        elif "fixed" in run.label:
            ok = int(r["p99_us"]) < 1000
            why = "half the 20,000 target" if "target" in run.label else "half the measured rate"
            out.append(f"| {run.config} | {mix} | p99 < 1 ms at {float(r['rate']):,.0f} req/s "
                       f"offered ({why}) | {_us(r['p99_us'])} us "
                       f"| {'met' if ok else 'NOT met'} |")
    return out


# -------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each run")
    ap.add_argument("--depth", type=int, default=16,
                    help="pipeline depth (cycles in flight per connection) of pipelined runs")
    ap.add_argument("--keys", type=int, default=32_000,
                    help="sessions used by the throughput runs (split over the connections)")
    ap.add_argument("--mixes", default="rw,read,write", help="comma-separated: rw, read, write")
    ap.add_argument("--configs", default="memory-only,durable",
                    help="comma-separated daemon configurations: memory-only, durable")
    ap.add_argument("--sessions", type=int, default=1_000_000,
                    help="sessions for the memory test (0 skips it)")
    ap.add_argument("--no-reconnect", action="store_true",
                    help="skip the new-connection-per-request run")
    ap.add_argument("--no-big-store", action="store_true",
                    help="skip the rw runs on the full store after the memory test")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="at most this long before each run, wait for other processes to "
                    "go quiet")
    ap.add_argument("--retries", type=int, default=2,
                    help=f"run again up to this many times when others took more than "
                    f"{DISTURBED_PCT:g} %% of the daemon's core")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                    help="directory for daemon.md")
    args = ap.parse_args()
    mixes = [m for m in args.mixes.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    for m in mixes:
        if m not in ("rw", "read", "write"):
            ap.error(f"unknown mix {m!r}")
    for c in configs:
        if c not in ("memory-only", "durable"):
            ap.error(f"unknown configuration {c!r}")
    if args.keys < 32 * args.depth or args.keys % 32:
        ap.error("--keys must be a multiple of 32 and at least 32 x --depth")
    if os.cpu_count() is None or (os.cpu_count() or 0) < 2:
        ap.error("needs at least 2 CPUs (daemon and load generator on separate cores)")
    if shutil.which("taskset") is None or shutil.which("gcc") is None:
        ap.error("needs taskset and gcc")

    # SIGTERM and SIGHUP end the run through the finally blocks below.
    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    workdir = Path(tempfile.mkdtemp(prefix="phpsess-daemon-bench-"))
    daemons: list[Daemon] = []
    memories: list[Memory] = []
    started = time.monotonic()
    try:
        exe = build_loadgen(workdir)
        bench = Bench(exe, args.seconds, args.warmup, args.depth, args.keys, args.quiet_wait,
                      args.retries)
        for config in configs:
            extra = ["--memory-only"] if config == "memory-only" else [
                "--data-dir", str(workdir / f"{config}-data")]
            daemon = Daemon(workdir, config, extra)
            daemons.append(daemon)
            try:
                daemon.start()
                throughput_runs(bench, daemon, mixes, not args.no_reconnect)
            finally:
                daemon.stop()
            if args.sessions > 0:
                name = f"{config}-fill"
                extra = ["--memory-only"] if config == "memory-only" else [
                    "--data-dir", str(workdir / f"{name}-data")]
                daemon = Daemon(workdir, name, extra)
                daemons.append(daemon)
                try:
                    daemon.start()
                    memories.append(memory_run(
                        bench, daemon, args.sessions,
                        not args.no_big_store and config == "memory-only",
                    ))
                finally:
                    note(f"stopping {name}")
                    daemon.stop()
                    note(f"  stopped in {daemon.stop_seconds:.1f} s, exit {daemon.exit_code}")
        text = report(bench, memories, daemons, args)
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "daemon.md").write_text(text)
    sys.stdout.write(text)
    note(f"done in {time.monotonic() - started:.0f} s; wrote {args.out / 'daemon.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
