"""Golden transcript (Symfony style): the handler calls PHP makes through
PhpSess\\SessionHandler for start, lazy write, regenerate with and without
delete, read_and_close, abort, reset, destroy and strict mode, with their
results from a real daemon, must equal golden/trace.expected."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import php_binary

HERE = Path(__file__).parent


def test_handler_call_order_matches_golden_transcript(daemon: Any) -> None:
    proc = subprocess.run(
        [php_binary(), "-d", "display_errors=stderr", str(HERE / "php" / "trace.php"),
         daemon.php_address],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == (HERE / "golden" / "trace.expected").read_text()
