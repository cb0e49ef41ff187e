"""PHP's session semantics through phpsess, each compared with PHP's own
files handler in the same situation (real php processes, a real daemon).

Every scenario is a list of "web requests" (one php process each).  The
transcripts of both handlers must be equal once session IDs are replaced by
placeholders (ID1, ID2, ... in order of appearance)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from phpsess import protocol as p
from phpsess.client import Client
from tests.conftest import run_php

SCENARIO = Path(__file__).parent / "php" / "scenario.php"


@pytest.fixture
def daemon(any_daemon: Any) -> Any:
    """Every test here runs against memory + journal and against SQL storage."""
    return any_daemon

# (scenario, [(step, sid-source, extra args)]) — sid-source "first" reuses the
# ID printed by step 0, "new" passes none, "last" reuses the latest sid,
# "regenerated" the ID session_regenerate_id() made, or a literal ID.
Steps = list[tuple[int, str, tuple[str, ...]]]


def _run(handler: str, scenario: str, steps: Steps, *, address: str | None,
         save_path: str, ini: dict[str, str] | None = None) -> list[str]:
    transcript: list[str] = []
    first = last = regenerated = ""
    for step, source, extra in steps:
        sid = {"new": "", "first": first, "last": last, "regenerated": regenerated}.get(
            source, source
        )
        proc = run_php(
            SCENARIO, handler=handler, address=address, save_path=save_path,
            args=(scenario, str(step), sid, *extra), ini=ini,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", proc.stderr
        lines = proc.stdout.splitlines()
        for line in lines:
            if line.startswith(("sid: ", "new-sid: ")):
                last = line.split(": ", 1)[1]
                first = first or last
            if line.startswith("new-sid: "):
                regenerated = line.split(": ", 1)[1]
        transcript += [f"--- request {step}", *lines]
    return _normalise(transcript)


def _normalise(lines: list[str]) -> list[str]:
    ids: dict[str, str] = {}

    def name(match: re.Match[str]) -> str:
        return ids.setdefault(match.group(0), f"ID{len(ids) + 1}")

    pattern = re.compile(r"\b[0-9a-v]{26,}\b")
    return [pattern.sub(name, line) for line in lines]


def compare(scenario: str, steps: Steps, daemon: Any, tmp_path: Path,
            ini: dict[str, str] | None = None) -> list[str]:
    files_dir = tmp_path / "files"
    files_dir.mkdir(exist_ok=True)
    want = _run("files", scenario, steps, address=None, save_path=str(files_dir), ini=ini)
    got = _run("phpsess", scenario, steps, address=daemon.php_address,
               save_path=str(files_dir), ini=ini)
    assert got == want
    # Both handlers failing the same way would prove nothing.
    if scenario != "invalid":
        assert "warned: true" not in got, got
        assert "start: false" not in got, got
    return got


def test_counter_across_requests(daemon: Any, tmp_path: Path) -> None:
    got = compare("counter", [(0, "new", ()), (1, "first", ()), (2, "first", ())],
                  daemon, tmp_path)
    assert "warned: true" not in got
    assert [line for line in got if line.startswith("n:")] == ["n: 1", "n: 2", "n: 3"]


@pytest.mark.parametrize("serializer", ["php", "php_binary", "php_serialize"])
def test_serialize_handlers_objects_references_binary_2mib(
    serializer: str, daemon: Any, tmp_path: Path
) -> None:
    ini = {"session.serialize_handler": serializer}
    got = compare("rich", [(0, "new", ()), (1, "first", ())], daemon, tmp_path, ini)
    assert "cart-self-is-cart: true" in got
    assert "reference-kept: 2" in got
    assert "bin: 0001ff7c3b3a220a0d" in got


@pytest.mark.parametrize("delete", ["keep", "delete"])
def test_regenerate_id(delete: str, daemon: Any, tmp_path: Path) -> None:
    steps: Steps = [
        (0, "new", ()), (1, "first", (delete,)), (2, "first", ()), (2, "regenerated", ()),
    ]
    got = compare("regenerate", steps, daemon, tmp_path)
    assert "regenerate: true" in got and "warned: true" not in got
    # The old ID still holds the old data unless deleted; the new one the new.
    tail = got[got.index("--- request 2"):]
    assert tail.count("v: old" if delete == "keep" else "v: null") == 1
    assert "v: new" in tail


def test_destroy(daemon: Any, tmp_path: Path) -> None:
    got = compare("destroy", [(0, "new", ()), (1, "first", ()), (2, "first", ())],
                  daemon, tmp_path)
    assert "session: []" in got


def test_abort(daemon: Any, tmp_path: Path) -> None:
    got = compare("abort", [(0, "new", ()), (1, "first", ()), (2, "first", ())],
                  daemon, tmp_path)
    assert got[-3] == "v: kept"


def test_reset(daemon: Any, tmp_path: Path) -> None:
    got = compare("reset", [(0, "new", ()), (1, "first", ())], daemon, tmp_path)
    assert "v: stored" in got


def test_read_and_close(daemon: Any, tmp_path: Path) -> None:
    got = compare("read_and_close", [(0, "new", ()), (1, "first", ()), (2, "first", ())],
                  daemon, tmp_path)
    assert got.count("v: one") == 2


def test_strict_mode_unknown_and_known_ids(daemon: Any, tmp_path: Path) -> None:
    steps: Steps = [(0, "unknownid0123456789abcdefgh", ()), (1, "last", ())]
    got = compare("strict", steps, daemon, tmp_path)
    assert got.count("kept-given-id: false") == 1  # the unknown one was replaced
    assert got.count("kept-given-id: true") == 1  # the known one was kept
    assert "n: 2" in got


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "a" * 257, "semi;colon", "dot.dot"])
def test_invalid_ids_fail_like_files_and_store_nothing(
    bad_id: str, daemon: Any, tmp_path: Path
) -> None:
    got = compare("invalid", [(0, bad_id, ())], daemon, tmp_path)
    assert "start: false" in got
    assert "warned: true" in got
    with Client(daemon.address) as c:
        listing = c.request(p.List(None, 10))
        assert listing == p.Data(b"", ("*",))
        # The handler refused the ID itself: nothing was sent for it.
        stats = c.request(p.Stats())
        assert isinstance(stats, p.Data)
        verbs = json.loads(stats.data)["verbs"]
        assert set(verbs) <= {"HELLO", "LIST", "STATS"}, verbs
    assert list((tmp_path / "files").iterdir()) == []


def test_id_that_php_itself_drops_gets_a_new_session(daemon: Any, tmp_path: Path) -> None:
    # PHP discards IDs with tabs, spaces, quotes... before any handler sees them.
    got = compare("invalid", [(0, "tab\there", ())], daemon, tmp_path)
    assert "start: true" in got and "warned: false" in got


def test_new_session_id_format(daemon: Any, tmp_path: Path) -> None:
    ini = {"session.sid_length": "26", "session.sid_bits_per_character": "5"}
    got = compare("empty", [(0, "new", ())], daemon, tmp_path, ini)
    assert "sid-length: 26" in got and "sid-alphabet-ok: true" in got


def test_lazy_write_touches_instead_of_rewriting(daemon: Any, tmp_path: Path) -> None:
    ini = {"session.gc_maxlifetime": "1000"}
    compare("lazy", [(0, "new", ())], daemon, tmp_path, ini)
    with Client(daemon.address) as c:
        page = c.request(p.List(None, 10))
        assert isinstance(page, p.Data)
        sid = page.data.split()[0].decode()
        before = _stats(c)
        # Read back with a longer lifetime and no change: a TOUCH, no WRITE.
        proc = run_php(SCENARIO, handler="phpsess", address=daemon.php_address,
                       save_path="/nonexistent", args=("lazy", "1", sid),
                       ini={"session.gc_maxlifetime": "5000"})
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        after = _stats(c)
        assert after["verbs"].get("TOUCH", 0) == before["verbs"].get("TOUCH", 0) + 1
        assert after["verbs"].get("WRITE", 0) == before["verbs"].get("WRITE", 0)
        got = c.request(p.Get(sid))
        assert isinstance(got, p.Data)
        assert 4_000_000 < int(got.tokens[0]) <= 5_000_000  # the TTL moved to 5000 s
        assert got.data == b'v|s:4:"same";'


def _stats(c: Client) -> dict[str, Any]:
    import json

    reply = c.request(p.Stats())
    assert isinstance(reply, p.Data)
    stats: dict[str, Any] = json.loads(reply.data)
    return stats


def test_a_bad_address_fails_session_start_and_never_falls_back_to_files(
    tmp_path: Path,
) -> None:
    script = tmp_path / "start.php"
    script.write_text('<?php var_dump(session_start()); var_dump(session_status());')
    proc = run_php(script, handler="phpsess", address="http://not-an-address",
                   save_path=str(tmp_path))
    assert proc.returncode == 0
    assert proc.stdout == "bool(false)\nint(1)\n"  # PHP_SESSION_NONE
    assert 'cannot use "http://not-an-address"' in proc.stderr
    assert list(tmp_path.glob("sess_*")) == []
