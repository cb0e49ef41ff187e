"""Admin commands talking to a running daemon (PROTOCOL.md §4.9 admin verbs,
§4.5 DESTROY, §4.2 WRITE): ``status``, ``ls``, ``show``, ``export``,
``import``, ``kick``.

Everything streams: ``ls`` and ``export`` walk the daemon's sessions with
``LIST`` one page at a time, and ``export``/``import`` pipeline their GETs
and WRITEs in batches bounded by bytes, so a million sessions never sit in
memory at once."""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import ipaddress
import json
import math
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, Final

import attrs

from phpsess import protocol as p
from phpsess.addresses import (
    DEFAULT_LISTEN,
    Address,
    AddressError,
    TcpAddress,
    parse_address,
    parse_tcp_address,
)
from phpsess.argtypes import whole_number
from phpsess.client import Client, ClientError, describe
from phpsess.decode import FORMATS, MAX_PATH_CHARS, DecodeError, decode_session

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # daemon unreachable, or it refused a request
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_UNDECODABLE: Final = 4  # show: the data is not in the format asked for

EPILOG: Final = (
    "exit status: 0 ok; 1 daemon unreachable or a request refused "
    "(e.g. the session is locked); 2 bad usage; 3 session not found (show); "
    "4 session data not decodable (show: --raw writes its bytes)"
)
# The longest --timeout-s / --wait-s: a day (a socket timeout has a limit,
# and nothing an admin command waits for takes longer).
MAX_SECONDS: Final = 86400.0
# How long drain --wait waits for the daemon to exit when neither --wait-s
# nor --config says otherwise: the longest a drain takes with the daemon's
# default timeouts, drain_timeout_s (30 s, a cluster's hand-over) then
# shutdown_timeout_s (10 s, requests holding locks), plus 20 s for the
# journal's last write and the exit.
DRAIN_WAIT_S: Final = 60.0
DRAIN_WAIT_MARGIN_S: Final = 20.0
DEFAULT_PAGE_SIZE: Final = 1000
# How many session bytes export/import keep in flight in one pipelined batch.
BATCH_BYTES: Final = 8 << 20
BATCH_REQUESTS: Final = 1000

COMMANDS: Final = frozenset({"status", "ls", "show", "export", "import", "kick", "drain"})


class AdminError(Exception):
    """A failure to report to the user, with the exit status it deserves."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- parser


_page_size = whole_number(1, p.MAX_LIST_LIMIT)
_count = whole_number(0)
_SID_ALPHABET: Final = ",-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds, more than 0, at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_SECONDS:  # also NaN and inf
        raise argparse.ArgumentTypeError(
            f"{text!r} must be more than 0 and at most {MAX_SECONDS:g} seconds"
        )
    return value


def _prefix(text: str) -> str:
    """An argparse type: the start of a session ID (empty: every ID)."""
    if len(text) > p.MAX_SID_LENGTH or text.strip(_SID_ALPHABET):
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot start a session ID (up to {p.MAX_SID_LENGTH} characters "
            "of A-Z a-z 0-9 , -)"
        )
    return text


def _sid(text: str) -> str:
    if not p.is_valid_sid(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a session ID (1-256 characters of A-Z a-z 0-9 , -)"
        )
    return text


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the admin subcommands to the ``phpsess`` parser."""

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        sub.add_argument(
            "--connect", default=DEFAULT_LISTEN, metavar="ADDRESS",
            help=f"the daemon: unix:/abs/path.sock or [tcp:]HOST:PORT (default: {DEFAULT_LISTEN})",
        )
        sub.add_argument(
            "--config", metavar="PATH",
            help="find the daemon through the first listen address of this TOML file "
            "(when --connect is not given)",
        )
        sub.add_argument(
            "--timeout-s", type=_seconds, default=10.0, metavar="S",
            help=f"seconds for connecting and for each reply, at most {MAX_SECONDS:g} "
            "(default: 10)",
        )
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    command("status", "the daemon's version, uptime, sessions, connections, locks, requests")

    ls = command("ls", "list sessions: ID, size, remaining lifetime, locked (on a cluster "
                 "node, also whether it holds each as master or backup, and where the other "
                 "copy is)")
    ls.add_argument("--prefix", type=_prefix, default="", metavar="STR",
                    help="only IDs starting with STR")
    ls.add_argument("--min-bytes", type=_count, default=0, metavar="N",
                    help="only sessions of at least N bytes")
    ls.add_argument("--locked", action="store_true", help="only sessions locked now")
    ls.add_argument("--limit", type=_count, default=None, metavar="N",
                    help="list at most N sessions")
    ls.add_argument("--page-size", type=_page_size, default=DEFAULT_PAGE_SIZE, metavar="N",
                    help=f"sessions per LIST request, 1-{p.MAX_LIST_LIMIT} "
                    f"(default: {DEFAULT_PAGE_SIZE})")

    show = command("show", "one session's data, decoded from PHP's serialize format")
    show.epilog = (
        "decoded values: a string that is not UTF-8 is shown as "
        '{"__bytes_hex__": HEX}, a reference as {"__ref__": PATH}, an object as '
        '{"__class__": NAME, ...}, an enum case as {"__enum__": ...}, INF and NAN as '
        '{"__float__": ...}; a PHP array with such a key looks the same (--raw shows '
        "the bytes). A name that is not UTF-8, or has \\x in it, is shown with \\ "
        "doubled and the bytes that are not UTF-8 as \\xNN; a name shown twice in one "
        'array or object (a property named __class__) gets " [#2]"; a PATH longer than '
        f"{MAX_PATH_CHARS} characters is cut short; characters that a terminal acts on "
        "are shown as \\uXXXX. " + EPILOG
    )
    show.add_argument("sid", type=_sid, metavar="ID")
    show.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                      help="session.serialize_handler that wrote it (default: auto, which "
                      "tries php_serialize, php, php_binary)")
    show.add_argument("--raw", action="store_true",
                      help="write the stored bytes, undecoded, to stdout")

    export = command("export", "write every session as JSON Lines: "
                     '{"id", "ttl_ms", "expires_at_ms", "data_b64"} (expires_at_ms: '
                     "Unix time in ms, so that an import later counts the time since)")
    export.add_argument("--output", "-o", default="-", metavar="FILE",
                        help="write here instead of stdout")
    export.add_argument("--page-size", type=_page_size, default=DEFAULT_PAGE_SIZE, metavar="N",
                        help=f"sessions per LIST request, 1-{p.MAX_LIST_LIMIT} "
                        f"(default: {DEFAULT_PAGE_SIZE})")
    export.add_argument("--to-sql", metavar="URL",
                        help="instead, upsert every session into the classic PHP session table "
                        "(id, data, usetime) at mysql://USER@HOST:PORT/DB (sqlmigrate.py)")
    export.add_argument("--to-table", default="session", metavar="NAME",
                        help="with --to-sql: the table, created if missing (default: session)")

    imp = command("import", "write the sessions of an export into the daemon, each with "
                  "what is left of its lifetime by this machine's clock (expires_at_ms; "
                  "ttl_ms in exports without it); expired ones are skipped, existing IDs "
                  "overwritten")
    imp.add_argument("file", metavar="FILE", nargs="?",
                     help="an export file, or - for stdin (or --from-sql)")
    imp.add_argument("--from-sql", metavar="URL",
                     help="instead, read the classic PHP session table (id, data, usetime) "
                     "at mysql://USER@HOST:PORT/DB (sqlmigrate.py)")
    imp.add_argument("--from-table", default="session", metavar="NAME",
                     help="with --from-sql: the table (default: session)")
    for sub in (export, imp):
        sub.add_argument("--password-file", metavar="PATH",
                         help="with --to-sql / --from-sql: file holding the database password")
        sub.add_argument("--max-lifetime", type=_count, default=1440, metavar="S",
                         help="with --to-sql / --from-sql: session.gc_maxlifetime of the "
                         "classic table: a session lives this long after usetime "
                         "(default: 1440)")
    imp.add_argument("--strict", action="store_true",
                     help="stop at the first invalid line or refused write; the lines "
                     "before it are written, none after (it writes one session at a "
                     "time) (default: report it and go on)")

    kick = command("kick", "destroy a session (refused while a request holds its lock)")
    kick.add_argument("sid", type=_sid, metavar="ID")

    drain = command(
        "drain", "stop the daemon gracefully, as SIGTERM does: finish requests holding "
        "locks and, in a cluster, hand every session to other daemons before it exits",
    )
    drain.add_argument("--wait", action="store_true",
                       help="return only once the daemon has exited (up to --wait-s)")
    drain.add_argument(
        "--wait-s", type=_seconds, default=None, metavar="S",
        help="with --wait, how long the daemon may take to exit (default: as long as a "
        f"drain may take: the largest of {DRAIN_WAIT_S:g} (the default 10 + 30 s, plus "
        f"{DRAIN_WAIT_MARGIN_S:g}), with --config its shutdown_timeout_s + drain_timeout_s "
        f"+ {DRAIN_WAIT_MARGIN_S:g}, and --timeout-s)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the admin command ``args.command``; return the exit status."""
    handler = _HANDLERS[args.command]
    if args.config and args.connect == DEFAULT_LISTEN:
        from phpsess.config import ConfigError, load

        try:
            listen = load(args.config).get("listen") or [DEFAULT_LISTEN]
        except ConfigError as exc:
            print(f"phpsess: {exc}", file=sys.stderr)
            return EXIT_USAGE
        args.connect = listen[0]
    try:
        connect = args.connect
        if not connect.startswith(("unix:", "tcp:", "/")) and ":" in connect:
            # HOST:PORT, as cluster_listen and metrics_listen take it.
            address: Address = parse_tcp_address(connect)
        else:
            address = parse_address(connect)
    except AddressError as exc:
        print(f"phpsess: --connect: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.timeout_s > 0:
        print("phpsess: --timeout-s must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(address, timeout_s=args.timeout_s) as client:
            return handler(client, args)
    except ClientError as exc:
        hint = "" if args.connect != DEFAULT_LISTEN else " (is the daemon running? see --connect)"
        print(f"phpsess: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    except AdminError as exc:
        print(f"phpsess: {exc}", file=sys.stderr)
        return exc.status


# ---------------------------------------------------------------- helpers


def _refused(what: str, reply: p.Reply) -> AdminError:
    if isinstance(reply, p.Error):
        return AdminError(f"{what}: the daemon refused: {reply.code.value} {reply.message}")
    return AdminError(f"{what}: unexpected reply {reply!r}")


def _duration(ms: int) -> str:
    seconds = ms // 1000
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s" if seconds else f"{ms / 1000:.3g}s")
    return " ".join(parts)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _emit(obj: object) -> None:
    print(json.dumps(obj, sort_keys=True))


@attrs.frozen
class Entry:
    """One line of a LIST page (§4.9).  On a cluster node the line also says
    how the node holds the copy (CLUSTER.md §1): ``role`` is ``master`` or
    ``backup`` (``-``: no record yet, a session being started) and ``other``
    the node holding the other copy (``-``: none, the only copy).  Both are
    None from a single daemon, or one that does not send them."""

    sid: str
    bytes: int
    ttl_ms: int
    locked: bool
    role: str | None = None
    other: str | None = None


def _parse_list(payload: bytes) -> Iterator[Entry]:
    for line in payload.decode("ascii").splitlines():
        fields = line.split(" ")
        sid, size, ttl_ms, locked = fields[:4]
        # A cluster node's two more fields (LIST ... ROLES); any after them
        # are left for later versions.
        role, other = (fields[4], fields[5]) if len(fields) >= 6 else (None, None)
        yield Entry(sid, int(size), int(ttl_ms), locked == "1", role, other)


def _copies(entry: Entry) -> str:
    """``ls``'s COPIES column: how this node holds the session."""
    if entry.role in ("master", "backup"):
        if entry.other is None or entry.other == "-":
            return f"{entry.role}, single copy"
        return f"{entry.role}, other on {entry.other}"
    return "-"  # no record here yet (a session being started)


def _seek_before(prefix: str) -> str | None:
    """The largest possible ID below every ID starting with ``prefix``: LIST
    returns IDs *greater than* ``after``, so this starts the walk right at
    the prefix instead of scanning from the first session."""
    if not prefix:
        return None
    alphabet = _SID_ALPHABET
    head, last = prefix[:-1], prefix[-1]
    index = alphabet.index(last)  # --prefix allows these characters only (_prefix)
    if index == 0:
        return head or None  # nothing sorts between head and head + ","
    # head + (the character before last) + "z" * as many as an ID may hold.
    seek = head + alphabet[index - 1]
    return seek + "z" * (p.MAX_SID_LENGTH - len(seek))


def iter_sessions(client: Client, *, page_size: int = DEFAULT_PAGE_SIZE,
                  prefix: str = "", roles: bool = False) -> Iterator[Entry]:
    """Every session (with IDs starting with ``prefix``), in ID order, one
    LIST page at a time; with ``roles``, how a cluster node holds each
    (``LIST ... ROLES``; a daemon older than it is asked without)."""
    after = _seek_before(prefix)
    while True:
        reply = client.request(p.List(after, page_size, roles))
        if roles and isinstance(reply, p.Error) and reply.code == p.Code.BAD_REQUEST:
            roles = False  # a daemon that does not know ROLES (§4.9)
            reply = client.request(p.List(after, page_size))
        if not isinstance(reply, p.Data) or len(reply.tokens) != 1:
            raise _refused("LIST", reply)
        for entry in _parse_list(reply.data):
            if not entry.sid.startswith(prefix):
                if entry.sid > prefix:
                    return  # past every ID with the prefix
                continue
            yield entry
        after = None if reply.tokens[0] == "*" else reply.tokens[0]
        if after is None:
            return


# ---------------------------------------------------------------- commands


def _stats(client: Client) -> dict[str, Any]:
    reply = client.request(p.Stats())
    if not isinstance(reply, p.Data):
        raise _refused("STATS", reply)
    stats: dict[str, Any] = json.loads(reply.data)
    return stats


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    stats = _stats(client)
    if args.json:
        _emit({"address": str(client.address), **stats})
        return EXIT_OK
    verbs = stats.get("verbs") or {}
    busiest = sorted(verbs.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [
        ("daemon", f"{client.address}, phpsess {stats.get('version', '?')}"),
        ("uptime", _duration(int(float(stats.get("uptime_s") or 0) * 1000))),
        *_storage_rows(stats),
        ("connections", str(stats.get("connections", "?"))),
        ("locks", f"{stats.get('locks_held', '?')} held, "
                  f"{stats.get('locks_waiting', '?')} waiting"),
        ("requests", f"{stats.get('requests_total', '?')}"
                     + (" (" + ", ".join(f"{v} {n}" for v, n in busiest) + ")"
                        if busiest else "")),
        ("expired", str(stats.get("expired_total", "?"))),
    ]
    for key in ("lock_timeouts_total", "lock_revoked_total", "errors_total"):
        if key in stats:
            rows.append((key.removesuffix("_total").replace("_", " "), str(stats[key])))
    if stats.get("journal_failed"):
        rows.append(("journal", f"FAILING, changes refused: {stats.get('journal_error')} "
                                f"({stats.get('journal_unwritten_bytes')} bytes wait in memory)"))
    cluster = stats.get("cluster")
    if isinstance(cluster, dict):
        for key, value in cluster.items():
            if key == "peers" and isinstance(value, dict):
                for peer, info in sorted(value.items()):
                    if isinstance(info, dict):
                        # A peer that left drained first: saying so again is noise.
                        draining = (", draining" if info.get("draining")
                                    and info.get("state") != "left" else "")
                        shown = f"{info.get('state')}, {info.get('sessions')} sessions{draining}"
                    else:
                        shown = json.dumps(info)
                    rows.append((f"peer {peer}", shown))
                continue
            shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            rows.append((f"cluster {key.removesuffix('_total').replace('_', ' ')}", shown))
    elif cluster is not None:
        rows.append(("cluster", json.dumps(cluster, sort_keys=True)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return EXIT_OK


def _storage_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """status's storage and sessions rows.  With SQL storage the sessions
    are counted by the database: when it does not answer, STATS has
    ``"sessions": null`` and ``storage_error`` says why."""
    rows = []
    if "storage" in stats:
        table = stats.get("storage_table")
        rows.append(("storage", f"{stats['storage']}" + (f", table {table}" if table else "")))
    if "storage_error" in stats:
        rows.append(("storage error", str(stats["storage_error"])))
    sessions, size = stats.get("sessions"), stats.get("bytes")
    if isinstance(sessions, int):
        shown = f"{sessions}" + (f" ({_size(size)})" if isinstance(size, int) else "")
    else:
        shown = "unknown" + (" (the storage did not answer)" if "storage_error" in stats else "")
    rows.append(("sessions", shown))
    return rows


def _listed(client: Client, args: argparse.Namespace) -> Iterator[Entry]:
    """The sessions ``ls`` shows: its filters and ``--limit`` applied."""
    if args.limit == 0:
        return
    shown = 0
    for entry in iter_sessions(client, page_size=args.page_size, prefix=args.prefix,
                               roles=True):
        if entry.bytes < args.min_bytes or (args.locked and not entry.locked):
            continue
        yield entry
        shown += 1
        if shown == args.limit:
            return


# The TTL column fits every lifetime up to a year: "364d 23h 59m 59s" is the
# longest (a whole year is "365d 0h 0m 0s").
_TTL_WIDTH: Final = len(_duration((p.MAX_TTL_S - 1) * 1000))


class _LsTable:
    """``ls``'s human output.  The ID column is as wide as the longest ID of
    the first rows (up to a page of them, held back until then): PHP's IDs
    are 22-256 characters, a cluster's 42 and more; a longer ID further on
    pushes its row's columns right.  The header is printed with the first
    rows, so only once LIST has answered."""

    def __init__(self, held: int) -> None:
        self.held = held
        self.pending: list[Entry] = []
        self.id_width: int | None = None
        self.cluster = False

    def add(self, entry: Entry) -> None:
        self.pending.append(entry)
        if self.id_width is not None or len(self.pending) >= self.held:
            self.flush()

    def flush(self) -> None:
        if self.id_width is None:
            self.id_width = max([len("ID"), *(len(e.sid) for e in self.pending)])
            # A cluster node says how it holds each copy: one more column.
            self.cluster = any(e.role is not None for e in self.pending)
            print(f"{'ID':<{self.id_width}}  {'BYTES':>10}  {'TTL':>{_TTL_WIDTH}}  LOCKED"
                  + ("  COPIES" if self.cluster else ""))
        for e in self.pending:
            locked = "yes" if e.locked else "no"
            line = (f"{e.sid:<{self.id_width}}  {e.bytes:>10}  "
                    f"{_duration(e.ttl_ms):>{_TTL_WIDTH}}  ")
            if self.cluster:
                line += f"{locked:<{len('LOCKED')}}  {_copies(e)}"
            else:
                line += locked
            print(line)
        self.pending.clear()


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    shown = 0
    if args.json:
        for entry in _listed(client, args):
            row: dict[str, object] = {"id": entry.sid, "bytes": entry.bytes,
                                      "ttl_ms": entry.ttl_ms, "locked": entry.locked}
            if entry.role is not None:
                # A cluster node: how it holds the copy, and who holds the
                # other (null: the only copy).
                row["role"] = entry.role if entry.role != "-" else None
                row["other"] = entry.other if entry.other != "-" else None
            _emit(row)
            shown += 1
        return EXIT_OK
    table = _LsTable(args.page_size)
    try:
        for entry in _listed(client, args):
            table.add(entry)
            shown += 1
    except (AdminError, ClientError):
        if table.pending:  # show what was listed before the failure
            table.flush()
        raise
    table.flush()
    print(f"{shown} session{'' if shown == 1 else 's'}")
    return EXIT_OK


def _get(client: Client, sid: str) -> tuple[bytes, int, bool] | None:
    reply = client.request(p.Get(sid))
    return _get_reply(sid, reply)


def _get_reply(sid: str, reply: p.Reply) -> tuple[bytes, int, bool] | None:
    if isinstance(reply, p.Miss):
        return None
    if not isinstance(reply, p.Data) or len(reply.tokens) != 2:
        raise _refused(f"GET {sid}", reply)
    return reply.data, int(reply.tokens[0]), reply.tokens[1] == "1"


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    got = _get(client, args.sid)
    if got is None:
        missing = f"no session {args.sid} (expired, destroyed or never written)"
        if args.json:
            _emit({"id": args.sid, "found": False, "error": missing})
        raise AdminError(missing, EXIT_NOT_FOUND)
    data, ttl_ms, locked = got
    if args.raw:
        out = sys.stdout.buffer
        out.write(data)
        out.flush()
        return EXIT_OK
    meta = {"id": args.sid, "bytes": len(data), "ttl_ms": ttl_ms, "locked": locked}
    try:
        fmt, decoded = decode_session(data, args.format)
    except DecodeError as exc:
        if args.json:
            _emit({**meta, "error": str(exc)})
        raise AdminError(f"{args.sid}: cannot decode: {exc}; --raw shows the bytes",
                         EXIT_UNDECODABLE) from None
    if args.json:
        _emit({**meta, "format": fmt, "data": decoded})
        return EXIT_OK
    print(f"id: {args.sid}")
    print(f"bytes: {len(data)}")
    print(f"ttl: {_duration(ttl_ms)}")
    print(f"locked: {'yes' if locked else 'no'}")
    print(f"format: {fmt}")
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(_readable(json.dumps(decoded, indent=2, ensure_ascii=False), encoding))
    return EXIT_OK


# Runs of characters other than printable ASCII and newlines: json.dumps
# escapes C0 controls, not DEL, C1 controls or the rest of Unicode.
_NOT_ASCII: Final = re.compile(r"[^\n\x20-\x7e]+")


def _readable(text: str, encoding: str) -> str:
    """JSON text made safe for a terminal: a character that is not printable
    (DEL, C1 controls such as U+009B CSI, bidi and other format characters,
    line and paragraph separators, unassigned ones), or that ``encoding``
    cannot write, becomes a ``\\uXXXX`` escape, which keeps it JSON."""

    def escape(run: re.Match[str]) -> str:
        chars = run.group()
        if chars.isprintable() and _encodes(chars, encoding):
            return chars
        return "".join(
            c if c.isprintable() and _encodes(c, encoding) else _json_escape(c) for c in chars
        )

    return _NOT_ASCII.sub(escape, text)


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def _json_escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:  # a surrogate pair, as JSON writes it
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def _batches(entries: Iterator[Entry]) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    size = 0
    for entry in entries:
        batch.append(entry)
        size += entry.bytes
        if size >= BATCH_BYTES or len(batch) >= BATCH_REQUESTS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _classic(client: Client, args: argparse.Namespace, what: str) -> int:
    from phpsess import sqlmigrate
    from phpsess.sqlstore import StorageError

    try:
        if what == "import":
            counts = sqlmigrate.import_classic(client, args)
        else:
            counts = sqlmigrate.export_classic(client, args)
    except StorageError as exc:
        raise AdminError(str(exc)) from None
    stopped = bool(counts.pop("stopped", 0))
    if args.json:
        _emit({**counts, "stopped": stopped} if what == "import" else counts)
    else:
        print(", ".join(f"{name} {count}" for name, count in counts.items())
              + (" (stopped: --strict)" if stopped else ""))
    return EXIT_FAILURE if counts.get("invalid") or counts.get("refused") else EXIT_OK


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    if args.to_sql:
        return _classic(client, args, "export")
    if args.output == "-":
        _report(args, _export_to(client, args, sys.stdout), sys.stderr)
        return EXIT_OK
    target = args.output
    try:
        info: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        info = None  # a new file (or a symlink to one)
    except OSError as exc:
        raise AdminError(f"--output {target}: {_why(exc)}", EXIT_USAGE) from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise AdminError(f"--output {target} is a directory: name a file in it", EXIT_USAGE)
    if os.path.islink(target) or (info is not None and not stat.S_ISREG(info.st_mode)):
        # /dev/stdout, a process substitution's /dev/fd/63, a fifo, a device
        # or a symlink the user made: written in place, as the shell's > does.
        # Renaming a file over it would replace the link (as root, the
        # system's /dev/stdout) instead of writing where it leads.
        _export_in_place(client, args, target, info)
    else:
        _export_replacing(client, args, target)
    return EXIT_OK


def _export_in_place(client: Client, args: argparse.Namespace, target: str,
                     info: os.stat_result | None) -> None:
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AdminError(f"--output {target}: {_why(exc)}", EXIT_USAGE) from None
    try:
        with open(fd, "w", encoding="ascii") as out:
            counts = _export_to(client, args, out)
    except BrokenPipeError:
        raise  # its reader quit (-o >(head -1)): stop quietly, as for stdout
    except OSError as exc:  # closing flushes the last of it
        raise AdminError(f"writing {target}: {_why(exc)}") from None
    # The summary goes where the sessions do not: -o /dev/stdout is stdout.
    _report(args, counts, sys.stderr if info is not None and _is_stdout(info) else sys.stdout)


def _is_stdout(info: os.stat_result) -> bool:
    try:
        ours = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):  # no stdout, or pytest's stand-in
        return False
    return (ours.st_dev, ours.st_ino) == (info.st_dev, info.st_ino)


def _export_replacing(client: Client, args: argparse.Namespace, target: str) -> None:
    # Session IDs are login tokens: the file is readable by its owner only
    # (whatever the umask), and appears under its name only once complete.
    directory, name = os.path.split(os.path.abspath(target))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise AdminError(f"--output: {exc}", EXIT_USAGE) from None
    try:
        with open(fd, "w", encoding="ascii") as out:
            counts = _export_to(client, args, out)
        os.replace(tmp, target)
    except OSError as exc:  # closing (the last write) or the rename failed
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise AdminError(f"writing {target}: {_why(exc)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _report(args, counts, sys.stdout)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _export_to(client: Client, args: argparse.Namespace, out: IO[str]) -> dict[str, int]:
    """Write every session to ``out``; return how many were exported and
    how many vanished (expired or destroyed) between LIST and GET."""
    exported = vanished = 0
    try:
        # LIST and the pipelined GETs share the one connection; that is safe
        # because every LIST reply is read before a batch's GETs are sent.
        for batch in _batches(iter_sessions(client, page_size=args.page_size)):
            replies = client.pipeline([p.Get(e.sid) for e in batch])
            for entry, reply in zip(batch, replies, strict=True):
                got = _get_reply(entry.sid, reply)
                if got is None:
                    vanished += 1  # expired or destroyed since LIST
                    continue
                data, ttl_ms, _ = got
                out.write(json.dumps({
                    "id": entry.sid, "ttl_ms": ttl_ms,
                    # An import later counts the time since (the wall clock:
                    # the file may move to another machine).
                    "expires_at_ms": _wall_ms() + ttl_ms,
                    "data_b64": base64.b64encode(data).decode("ascii"),
                }) + "\n")
                exported += 1
        out.flush()
    except BrokenPipeError:
        raise  # stdout's reader quit (phpsess export | head): see entrypoint
    except OSError as exc:
        raise AdminError(f"writing {args.output}: {_why(exc)}") from None
    return {"exported": exported, "vanished": vanished}


def _report(args: argparse.Namespace, counts: dict[str, int], report: IO[str]) -> None:
    """export's summary, once the sessions are all written."""
    if args.json:
        print(json.dumps(counts, sort_keys=True), file=report)
    else:
        exported, vanished = counts["exported"], counts["vanished"]
        print(f"exported {exported} sessions"
              + (f" ({vanished} expired or destroyed while exporting)" if vanished else "")
              + ("" if args.output == "-" else f" to {args.output}"), file=report)


class BadLine(ValueError):
    pass


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _whole(obj: dict[str, Any], key: str) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadLine(f"{key} {value!r} is not a whole number")
    return value


def parse_export_line(line: str, now_ms: int | None = None) -> tuple[str, int, bytes]:
    """``(sid, ttl_ms, data)`` of one export line, or :class:`BadLine`.
    With ``now_ms`` (Unix time in ms) and an ``expires_at_ms`` in the line,
    ``ttl_ms`` is what is left of the lifetime at ``now_ms`` (0 or less:
    expired), never more than the line's ``ttl_ms`` (a lifetime does not
    grow after the export: an importing clock behind the exporting one);
    else the line's ``ttl_ms``, the lifetime left when it was exported (an
    export of a version before ``expires_at_ms``)."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise BadLine(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadLine("not a JSON object")
    missing = [k for k in ("id", "ttl_ms", "data_b64") if k not in obj]
    if missing:
        raise BadLine(f"missing {', '.join(missing)}")
    sid, data_b64 = obj["id"], obj["data_b64"]
    if not isinstance(sid, str) or not p.is_valid_sid(sid):
        raise BadLine(f"id {sid!r} is not a session ID")
    ttl_ms = _whole(obj, "ttl_ms")
    if "expires_at_ms" in obj:
        expires_at_ms = _whole(obj, "expires_at_ms")
        if now_ms is not None:
            ttl_ms = min(ttl_ms, expires_at_ms - now_ms)
    if ttl_ms > p.MAX_TTL_S * 1000:
        raise BadLine(f"ttl_ms {ttl_ms} is over the maximum lifetime {p.MAX_TTL_S} s")
    if not isinstance(data_b64, str):
        raise BadLine("data_b64 is not a string")
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadLine(f"data_b64 is not base64: {exc}") from None
    return sid, ttl_ms, data


class _Importer:
    """Writes export lines to the daemon, pipelining WRITEs in batches;
    under --strict one at a time, so that nothing after a refused WRITE is
    written (a pipelined batch is sent whole before its first reply)."""

    def __init__(self, client: Client, name: str, strict: bool) -> None:
        self.client = client
        self.name = name
        self.strict = strict
        self.counts = {"imported": 0, "expired": 0, "invalid": 0, "refused": 0}
        self.stopped = False
        self._pending: list[tuple[int, p.Write]] = []
        self._pending_bytes = 0

    def complain(self, lineno: int, why: str) -> None:
        print(f"phpsess: {self.name}:{lineno}: {why}", file=sys.stderr)

    def feed(self, source: IO[str]) -> None:
        for lineno, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                sid, ttl_ms, data = parse_export_line(line, _wall_ms())
            except BadLine as exc:
                self.counts["invalid"] += 1
                self.complain(lineno, f"{exc}; line {'refused' if self.strict else 'skipped'}")
                if self.strict:
                    self.stopped = True
                    break
                continue
            if ttl_ms <= 0:
                self.counts["expired"] += 1
                continue
            self._pending.append((lineno, p.Write(sid, math.ceil(ttl_ms / 1000), data)))
            self._pending_bytes += len(data)
            if (self.strict or self._pending_bytes >= BATCH_BYTES
                    or len(self._pending) >= BATCH_REQUESTS):
                self.flush()
                if self.stopped:
                    return
        # Lines read before an invalid one are still written under --strict:
        # they were valid, and the report says where it stopped.
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        replies = self.client.pipeline([w for _, w in self._pending])
        for (lineno, write), reply in zip(self._pending, replies, strict=True):
            if isinstance(reply, p.Ok):
                self.counts["imported"] += 1
                continue
            self.counts["refused"] += 1
            self.complain(lineno, f"WRITE {write.sid} refused: {describe(reply)}")
            self.stopped = self.stopped or self.strict
        self._pending.clear()
        self._pending_bytes = 0


def cmd_import(client: Client, args: argparse.Namespace) -> int:
    if args.from_sql:
        return _classic(client, args, "import")
    if args.file is None:
        raise AdminError("import needs a FILE (or - for stdin), or --from-sql URL", EXIT_USAGE)
    name = "stdin" if args.file == "-" else args.file
    importer = _Importer(client, name, args.strict)
    with contextlib.ExitStack() as stack:
        try:
            source: IO[str] = (
                sys.stdin if args.file == "-"
                else stack.enter_context(open(args.file, encoding="utf-8", errors="replace"))
            )
        except OSError as exc:
            raise AdminError(f"{exc}", EXIT_USAGE) from None
        try:
            importer.feed(source)
        except OSError as exc:
            raise AdminError(f"reading {name}: {exc}") from None
    counts = importer.counts
    if args.json:
        _emit({**counts, "stopped": importer.stopped})
    else:
        print(f"imported {counts['imported']}, skipped {counts['expired']} expired, "
              f"{counts['invalid']} invalid lines, {counts['refused']} refused"
              + (" (stopped: --strict)" if importer.stopped else ""))
    return EXIT_FAILURE if counts["invalid"] or counts["refused"] else EXIT_OK


def cmd_kick(client: Client, args: argparse.Namespace) -> int:
    # GET first only to tell the user whether there was anything to destroy.
    # Then its lock, not waiting: a request in progress keeps it (LOCKED
    # below), but one held past its lease goes to whoever asks for it
    # (PROTOCOL.md §6.3): a hung worker must not keep a session an
    # operator removes.
    get_reply, _, _, reply = client.pipeline([
        p.Get(args.sid), p.Hello(p.PROTOCOL_VERSION, wait_ms=0), p.Read(args.sid, lock=True),
        p.Destroy(args.sid),
    ])
    existed = _get_reply(args.sid, get_reply) is not None
    if isinstance(reply, p.Error) and reply.code is p.Code.LOCKED:
        if args.json:
            _emit({"id": args.sid, "destroyed": False, "error": "LOCKED",
                   "message": reply.message})
        raise AdminError(
            f"{args.sid} is locked by a request in progress and was not destroyed; "
            "try again once that request ends (or its lock lease runs out)"
        )
    if not isinstance(reply, p.Ok):
        raise _refused(f"DESTROY {args.sid}", reply)
    if args.json:
        _emit({"id": args.sid, "destroyed": existed, "existed": existed})
    else:
        print(f"destroyed {args.sid}" if existed
              else f"{args.sid}: no such session (nothing to do)")
    return EXIT_OK


def cmd_drain(client: Client, args: argparse.Namespace) -> int:
    process = _local_process(client) if args.wait else None
    reply = client.request(p.Drain())
    if not isinstance(reply, p.Ok):
        raise _refused("DRAIN", reply)
    gone = False
    if args.wait:
        if process is None:
            raise AdminError(
                f"{client.address} is draining, but --wait can only watch a daemon on this "
                "machine (its STATS named no process here): watch its service or its "
                "log for its exit (it stops accepting connections as it finishes)"
            )
        wait_s = _drain_wait_s(args)
        deadline = time.monotonic() + wait_s
        while not (gone := not _running(process)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not gone:
            raise AdminError(
                f"{client.address} is still draining after {wait_s:g} s (pid "
                f"{process[0]}); it stops on its own within its shutdown_timeout_s + "
                "drain_timeout_s: wait longer with --wait-s, or watch that process or "
                "its service's log (it stops accepting connections as it finishes)"
            )
    if args.json:
        _emit({"address": str(client.address), "draining": True, "exited": gone})
    else:
        print(f"{client.address}: " + ("drained and exited" if gone else "draining"))
    return EXIT_OK


def _drain_wait_s(args: argparse.Namespace) -> float:
    """How long drain --wait waits: --wait-s, else the longest the daemon's
    drain may take (its timeouts from --config, or the defaults'), and never
    less than --timeout-s (which bounded the wait before --wait-s)."""
    if args.wait_s is not None:
        return float(args.wait_s)
    wait = DRAIN_WAIT_S
    if args.config:
        from phpsess.config import ConfigError, load

        with contextlib.suppress(ConfigError):  # unreadable: the default is as good
            settings = load(args.config)
            wait = max(wait, float(settings.get("shutdown_timeout_s", 10.0))
                       + float(settings.get("drain_timeout_s", 30.0)) + DRAIN_WAIT_MARGIN_S)
    return max(wait, float(args.timeout_s))


def _local_process(client: Client) -> tuple[int, str] | None:
    """The daemon's (pid, start time) if it runs on this machine, else None.
    The start time tells it from a later process given the same pid."""
    address = client.address
    if isinstance(address, TcpAddress) and not _loopback(address.host):
        return None
    pid = _stats(client).get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:  # the same pid namespace: that pid is a phpsess process
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"phpsess" not in f.read():
                return None
    except OSError:
        return None
    started = _start_time(pid)
    return None if started is None else (pid, started)


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _start_time(pid: int) -> str | None:
    """The process's start time, None once it has exited (a zombie too)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _running(process: tuple[int, str]) -> bool:
    pid, started = process
    return _start_time(pid) == started


_HANDLERS: Final[dict[str, Callable[[Client, argparse.Namespace], int]]] = {
    "status": cmd_status,
    "ls": cmd_ls,
    "show": cmd_show,
    "export": cmd_export,
    "import": cmd_import,
    "kick": cmd_kick,
    "drain": cmd_drain,
}
