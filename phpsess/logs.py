"""Log setup for the daemon: one line per event on stderr, ``key=value``
fields, never session data; session IDs appear only as a short tag.

Under systemd, when stderr is the journal (``$JOURNAL_STREAM`` names it),
every line starts with its syslog priority (``<3>`` error ... ``<7>``
debug, sd-daemon(3)), so ``journalctl -p warning`` and the journal's
colouring see the level."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time


def sid_tag(sid: str) -> str:
    """A short, non-reversible tag for a session ID, for logs."""
    return hashlib.blake2b(sid.encode(), digest_size=4).hexdigest()


def quoted(value: object) -> str:
    """``value`` as the value of a ``key=value`` (logfmt) field: as it is if
    it is one word, else in double quotes with ``"``, ``\\`` and control
    characters escaped, so that a parser reads all of it as the value."""
    text = str(value)
    if text and not any(c <= " " or c in '="\x7f' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def clipped(value: object, max_chars: int) -> str:
    """``value`` as text of at most ``max_chars`` characters: cut, and
    ``...`` at its end, when it is longer (for a log line, which a client's
    text must not make long)."""
    text = str(value)
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - 3)] + "..."


class Throttle:
    """At most ``per_s`` lines a second of one kind of event that clients
    can cause at will (a revoked lock, a refused connection): the rest are
    left out, and counted twice over, so that no count is lost:

    - the next line logged of the kind says how many were left out since
      the previous one (:meth:`allow`, :meth:`suffix`:
      ``not_logged_before=N``);
    - once the second in which some were left out is over, :meth:`left_out`
      gives their number, for a line of its own (the daemon's
      ``event=<kind>_not_logged count=N``): the count of a burst that ends
      is logged though no line of the kind follows it.  Each line left out
      is in exactly one such count.

    (STATS and the metrics count revoked locks and refused connections
    whether logged or not.)  Pure: the caller passes the time in."""

    __slots__ = ("_closed", "_open", "_skipped", "_used", "_window", "per_s")

    def __init__(self, per_s: int = 10) -> None:
        self.per_s = per_s
        self._window = float("-inf")
        self._used = 0
        self._skipped = 0  # left out since the last line allowed
        self._open = 0  # left out in the window now open
        self._closed = 0  # left out in windows over, not yet given by left_out

    def allow(self, now: float) -> int | None:
        """None if this line is left out; else how many were since the last."""
        if now >= self._window + 1.0:
            self._window = now
            self._used = 0
            self._closed += self._open
            self._open = 0
        if self._used >= self.per_s:
            self._skipped += 1
            self._open += 1
            return None
        self._used += 1
        skipped, self._skipped = self._skipped, 0
        return skipped

    def suffix(self, now: float) -> str | None:
        """:meth:`allow` as the end of the line to log: None if it is left
        out, else ``" not_logged_before=N"`` when some were, or ``""``."""
        skipped = self.allow(now)
        if skipped is None:
            return None
        return f" not_logged_before={skipped}" if skipped else ""

    def left_out(self, now: float) -> int:
        """How many lines were left out in the windows (seconds) over by
        ``now`` that an earlier call has not counted already: 0 while a
        burst goes on in the window still open.  ``now=math.inf`` (at the
        stop) counts the open window too."""
        if now >= self._window + 1.0:
            self._closed += self._open
            self._open = 0
        count, self._closed = self._closed, 0
        return count


# sd-daemon(3) prefixes: the syslog priority of a Python level.
_PRIORITIES = {
    logging.CRITICAL: "<2>", logging.ERROR: "<3>", logging.WARNING: "<4>",
    logging.INFO: "<6>", logging.DEBUG: "<7>",
}


class _Formatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        level = record.levelname.lower()
        line = f"{stamp}.{int(record.msecs):03d}Z level={level} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.journal:
            # Each line is its own journal entry: a traceback's lines too.
            prefix = _PRIORITIES.get(record.levelno, "<6>")
            line = "\n".join(prefix + part for part in line.split("\n"))
        return line


def stderr_is_journal() -> bool:
    """Whether stderr is the stream systemd connected to the journal: the
    device and inode ``$JOURNAL_STREAM`` gives (systemd.exec(5))."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def print_failure(message: str) -> None:
    """``phpsess: <message>`` on stderr: why the daemon stops, in one line
    for the person or unit that started it (not a log event as well: the
    same stderr would show it twice).  To the journal with the error
    priority, so that ``journalctl -p err`` lists it as it lists logged errors."""
    prefix = _PRIORITIES[logging.ERROR] if stderr_is_journal() else ""
    line = f"phpsess: {message}"
    print("\n".join(prefix + part for part in line.split("\n")), file=sys.stderr)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journal=stderr_is_journal()))
    root = logging.getLogger("phpsess")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
