"""Log setup for the daemon: one line per event on stderr, ``key=value``
fields, never session data; session IDs appear only as a short tag."""

from __future__ import annotations

import hashlib
import logging
import sys
import time


def sid_tag(sid: str) -> str:
    """A short, non-reversible tag for a session ID, for logs."""
    return hashlib.blake2b(sid.encode(), digest_size=4).hexdigest()


class _Formatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        level = record.levelname.lower()
        line = f"{stamp}.{int(record.msecs):03d}Z level={level} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("phpsess")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
