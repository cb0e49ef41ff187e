"""Loading and replaying ``protocol/vectors`` (PROTOCOL.md §11)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

VECTOR_DIR = Path(__file__).resolve().parent.parent / "protocol" / "vectors"
NO_REPLY_S = 0.2
REPLY_TIMEOUT_S = 5.0


def unescape(text: str) -> bytes:
    """Decode the C escapes of §11: \\n, \\\\, \\xHH."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("ascii")
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "n":
            out.append(10)
            i += 2
        elif nxt == "\\":
            out.append(92)
            i += 2
        elif nxt == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{nxt}")
    return bytes(out)


def load_vectors() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(VECTOR_DIR.glob("*.json"))]


def daemon_args(vector: dict[str, Any]) -> list[str]:
    args = []
    for key, value in vector.get("daemon", {}).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _read_exact(sock: socket.socket, n: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _read_line(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def replay(vector: dict[str, Any], sock_path: str) -> None:
    """Replay one vector against a daemon; AssertionError on any difference."""
    conns: dict[str, socket.socket] = {}
    name = vector["name"]
    try:
        for index, step in enumerate(vector["steps"]):
            where = f"{name} step {index} ({step})"
            if "sleep_ms" in step:
                time.sleep(step["sleep_ms"] / 1000)
            conn = conns.get(step["conn"])
            if conn is None:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(sock_path)
                conns[step["conn"]] = conn
            if step.get("hangup"):
                conn.close()
                continue
            if "send" in step:
                conn.sendall(unescape(step["send"]))
            expect = step.get("expect", "")
            if expect is None:
                conn.settimeout(NO_REPLY_S)
                try:
                    got = conn.recv(1)
                except TimeoutError:
                    got = b""
                else:
                    raise AssertionError(f"{where}: expected no reply yet, got {got!r}")
                continue
            want = unescape(expect)
            if want.startswith(b"ERR ") and want.endswith(b" ") and want.count(b" ") == 2:
                got = _read_line(conn, REPLY_TIMEOUT_S)
                assert got.startswith(want) and got.endswith(b"\n"), f"{where}: got {got!r}"
            else:
                got = _read_exact(conn, len(want), REPLY_TIMEOUT_S)
                assert got == want, f"{where}: got {got!r}"
            if step.get("close"):
                rest = _read_exact(conn, 1, REPLY_TIMEOUT_S)
                assert rest == b"", f"{where}: expected the daemon to close, got {rest!r}"
    finally:
        for conn in conns.values():
            conn.close()
