"""The phpsess wire protocol, version 1: a pure, I/O-free codec.

Theory of operation (see ``protocol/PROTOCOL.md``, cited as §N):

A byte stream carries header lines, each optionally followed by a payload
whose length the header gives (§2). :class:`RequestParser` is fed bytes with
:meth:`RequestParser.receive_data` and hands out one event per request from
:meth:`RequestParser.next_event`: a request object (``Hello``, ``Read``, ...),
a :class:`RequestError` for a request that was framed correctly but is wrong
(the stream stays usable), or a :class:`FatalError` after which the stream can
no longer be parsed.  ``NEED_DATA`` means "feed me more bytes".

The parser has three states, held in one table (:data:`_TRANSITIONS`):

- ``HEADER``: looking for the LF that ends a header line;
- ``PAYLOAD``: collecting the payload a WRITE announced;
- ``DISCARD``: swallowing the payload of a WRITE that was refused (over the
  size limit, or a bad ID or TTL; §4.2: the connection stays usable);
- ``BROKEN``: a fatal error was reported; nothing more is parsed.

Replies are encoded by :func:`encode_reply`; the client side (used by the
admin commands and the tests) has :func:`encode_request` and
:class:`ReplyParser`.  No module here imports trio, socket, time or logging.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Final

import attrs

PROTOCOL_VERSION: Final = 1
MAX_HEADER_BYTES: Final = 1024  # §2, including the LF
DEFAULT_MAX_SESSION_BYTES: Final = 16 * 1024 * 1024  # §10
MAX_TTL_S: Final = 31_536_000  # §4: one year
MAX_WAIT_MS: Final = 3_600_000  # §3.2
MAX_LEASE_MS: Final = 86_400_000  # §3.2
MAX_LIST_LIMIT: Final = 10_000  # §4.9
MIN_SID_LENGTH: Final = 22  # §4.8
MAX_SID_LENGTH: Final = 256  # §5

_SID_RE: Final = re.compile(rb"[A-Za-z0-9,-]{1,256}\Z")
_NUMBER_RE: Final = re.compile(rb"(0|[1-9][0-9]{0,17})\Z")
_LONG_NUMBER_RE: Final = re.compile(rb"[1-9][0-9]{18,}\Z")
# A payload length: any decimal (a huge one is TOO_LARGE, not a framing error).
_LENGTH_RE: Final = re.compile(rb"(0|[1-9][0-9]{0,39})\Z")
# A whole header line: printable ASCII tokens separated by single spaces.
_LINE_RE: Final = re.compile(rb"[\x21-\x7e]+(?: [\x21-\x7e]+)*\Z")
# Fast paths for the requests of every web request, in the form PHP's handler
# sends them (§4).  A line they do not match takes the general path, which
# accepts the same lines and explains what is wrong with the others.
_FAST_READ: Final = re.compile(
    rb"READ ([A-Za-z0-9,-]{1,256})(?: (LOCK|NOLOCK))?( DESTROYED)?\Z"
)
_FAST_WRITE: Final = re.compile(
    rb"WRITE ([A-Za-z0-9,-]{1,256}) ([1-9][0-9]{0,7}) (0|[1-9][0-9]{0,8})( KEEP)?\Z"
)
_FAST_HELLO: Final = re.compile(
    rb"HELLO 1 wait_ms=(0|[1-9][0-9]{0,6})(?: lease_ms=([1-9][0-9]{0,7}))? client=([\x21-\x7e]+)\Z"
)


def is_valid_sid(sid: str | bytes) -> bool:
    """True if ``sid`` is a session ID that §5 allows."""
    raw = sid.encode("ascii", "replace") if isinstance(sid, str) else sid
    return _SID_RE.match(raw) is not None


class Code(enum.Enum):
    """Machine codes of error replies (§9)."""

    VERSION = "VERSION"
    NEED_HELLO = "NEED_HELLO"
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_VERB = "UNKNOWN_VERB"
    BAD_ID = "BAD_ID"
    TOO_LARGE = "TOO_LARGE"
    LOCK_TIMEOUT = "LOCK_TIMEOUT"
    LOCK_LOST = "LOCK_LOST"
    LOCKED = "LOCKED"
    BAD_FRAME = "BAD_FRAME"
    HEADER_TOO_LONG = "HEADER_TOO_LONG"
    BUSY = "BUSY"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"
    NOT_MASTER = "NOT_MASTER"  # CLUSTER.md §5: asked a node that is not the master
    STALE = "STALE"  # CLUSTER.md §6: a replicated change from a former master
    UNAVAILABLE = "UNAVAILABLE"  # the session's master cannot be reached now
    DENIED = "DENIED"  # §4.9: an admin verb from a user who may not use it
    TOO_MANY_LOCKS = "TOO_MANY_LOCKS"  # §6.1: past max_locks_per_connection


# Errors after which the daemon closes the connection (§9).
_FATAL: Final = frozenset(
    {Code.BAD_FRAME, Code.HEADER_TOO_LONG, Code.BUSY, Code.SHUTTING_DOWN, Code.INTERNAL}
)


def _sid(value: str) -> None:
    if not is_valid_sid(value):
        raise ValueError(f"invalid session id {value!r}")


def _check_sid(instance: object, attribute: object, value: str) -> None:
    _sid(value)


def _check_ttl(instance: object, attribute: object, value: int) -> None:
    if not 1 <= value <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be 1-{MAX_TTL_S}, not {value}")


# ---------------------------------------------------------------- requests


@attrs.frozen
class Hello:
    version: int
    wait_ms: int | None = None
    lease_ms: int | None = None
    client: str | None = None


@attrs.frozen
class Read:
    sid: str = attrs.field(validator=_check_sid)
    lock: bool = True
    # The client understands ``MISS DESTROYED`` (§4.1): the session was
    # destroyed while this locking READ waited for its lock.
    destroyed: bool = False


@attrs.frozen
class Write:
    sid: str = attrs.field(validator=_check_sid)
    ttl_s: int = attrs.field(validator=_check_ttl)
    data: bytes
    keep: bool = False


@attrs.frozen
class Touch:
    sid: str = attrs.field(validator=_check_sid)
    ttl_s: int = attrs.field(validator=_check_ttl)
    keep: bool = False


@attrs.frozen
class Exists:
    sid: str = attrs.field(validator=_check_sid)


@attrs.frozen
class Destroy:
    sid: str = attrs.field(validator=_check_sid)


@attrs.frozen
class Close:
    pass


@attrs.frozen
class Gc:
    max_lifetime_s: int = attrs.field(validator=_check_ttl)


@attrs.frozen
class Create:
    length: int = 32
    bits: int = 5
    lock: bool = True

    def __attrs_post_init__(self) -> None:
        if not MIN_SID_LENGTH <= self.length <= MAX_SID_LENGTH:
            raise ValueError(f"length must be {MIN_SID_LENGTH}-{MAX_SID_LENGTH}")
        if self.bits not in (4, 5, 6):
            raise ValueError("bits must be 4, 5 or 6")


@attrs.frozen
class Ping:
    pass


@attrs.frozen
class Stats:
    pass


@attrs.frozen
class Drain:
    pass


@attrs.frozen
class Get:
    sid: str = attrs.field(validator=_check_sid)


@attrs.frozen
class List:
    after: str | None
    limit: int
    # Each line also says how a cluster node holds the copy (§4.9).
    roles: bool = False

    def __attrs_post_init__(self) -> None:
        if self.after is not None:
            _sid(self.after)
        if not 1 <= self.limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be 1-{MAX_LIST_LIMIT}")


# -- peer requests (CLUSTER.md §6-§8): accepted on authenticated peer
# connections only; a client sending them gets UNKNOWN_VERB.


@attrs.frozen
class ReplPut:
    sid: str = attrs.field(validator=_check_sid)
    master: str
    epoch: int
    version: int
    ttl_s: int = attrs.field(validator=_check_ttl)
    data: bytes


@attrs.frozen
class ReplDelete:
    sid: str = attrs.field(validator=_check_sid)
    master: str
    epoch: int
    version: int


@attrs.frozen
class Where:
    sid: str = attrs.field(validator=_check_sid)


@attrs.frozen
class Handoff:
    sid: str = attrs.field(validator=_check_sid)
    epoch: int
    version: int
    ttl_s: int = attrs.field(validator=_check_ttl)
    data: bytes


PeerRequest = ReplPut | ReplDelete | Where | Handoff

Request = (
    Hello | Read | Write | Touch | Exists | Destroy | Close | Gc | Create
    | Ping | Stats | Get | List | Drain | ReplPut | ReplDelete | Where | Handoff
)


@attrs.frozen
class RequestError:
    """A framed request that is wrong: reply with an error, keep parsing."""

    code: Code
    message: str


@attrs.frozen
class FatalError:
    """The stream cannot be parsed any further: reply, then close."""

    code: Code
    message: str


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA

Event = Request | RequestError | FatalError

# ---------------------------------------------------------------- replies


@attrs.frozen
class Ok:
    tokens: tuple[str, ...] = ()


@attrs.frozen
class Data:
    data: bytes
    tokens: tuple[str, ...] = ()


@attrs.frozen
class Miss:
    # ``MISS DESTROYED`` (§4.1), only ever sent to a READ that asked for it.
    destroyed: bool = False


@attrs.frozen
class Error:
    code: Code
    message: str

    @property
    def fatal(self) -> bool:
        return self.code in _FATAL


Reply = Ok | Data | Miss | Error

OK: Final = Ok()
MISS: Final = Miss()
MISS_DESTROYED: Final = Miss(destroyed=True)
_OK_LINE: Final = b"OK\n"
_MISS_LINE: Final = b"MISS\n"
_MISS_DESTROYED_LINE: Final = b"MISS DESTROYED\n"


def encode_reply(reply: Reply) -> bytes:
    """The bytes of one reply (§8)."""
    if type(reply) is Ok:
        if not reply.tokens:
            return _OK_LINE
        return ("OK " + " ".join(reply.tokens) + "\n").encode("ascii")
    if type(reply) is Data:
        return data_header(reply) + reply.data
    if type(reply) is Miss:
        return _MISS_DESTROYED_LINE if reply.destroyed else _MISS_LINE
    assert isinstance(reply, Error)
    # The sentence must stay one printable line whatever went into it, and
    # within MAX_HEADER_BYTES (§2) however much of a request it quotes.
    sentence = "".join(c if " " <= c <= "~" else "?" for c in reply.message)
    line = f"ERR {reply.code.name} {sentence}"
    if len(line) >= MAX_HEADER_BYTES:
        line = line[: MAX_HEADER_BYTES - 4] + "..."
    return (line + "\n").encode("ascii")


def data_header(reply: Data) -> bytes:
    """The header line of a DATA reply (§8), to send before its data (a
    big session's data goes out from where it lies, not copied after it)."""
    head = f"DATA {len(reply.data)}"
    if reply.tokens:
        head += " " + " ".join(reply.tokens)
    return head.encode("ascii") + b"\n"


# ---------------------------------------------------------------- request parser


class _State(enum.Enum):
    HEADER = "HEADER"
    PAYLOAD = "PAYLOAD"
    DISCARD = "DISCARD"
    BROKEN = "BROKEN"


class _Input(enum.Enum):
    SIMPLE_REQUEST = "simple request"  # a header with no payload
    WRITE_HEADER = "write header"  # payload follows
    DISCARDED_WRITE = "discarded write"  # a refused payload to swallow
    PAYLOAD_DONE = "payload done"
    FATAL = "fatal"


# (state, input) -> next state.  Anything not listed is a bug in this module.
_TRANSITIONS: Final[dict[tuple[_State, _Input], _State]] = {
    (_State.HEADER, _Input.SIMPLE_REQUEST): _State.HEADER,
    (_State.HEADER, _Input.WRITE_HEADER): _State.PAYLOAD,
    (_State.HEADER, _Input.DISCARDED_WRITE): _State.DISCARD,
    (_State.HEADER, _Input.FATAL): _State.BROKEN,
    (_State.PAYLOAD, _Input.PAYLOAD_DONE): _State.HEADER,
    (_State.DISCARD, _Input.PAYLOAD_DONE): _State.HEADER,
}


class _BadRequest(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _number(token: bytes, what: str, low: int, high: int) -> int:
    if _NUMBER_RE.match(token) is None:
        if _LONG_NUMBER_RE.match(token) is not None:  # well formed, only too big
            raise _BadRequest(Code.BAD_REQUEST, f"{what} must be {low}-{high}, not {_show(token)}")
        raise _BadRequest(Code.BAD_REQUEST, f"{what} must be a decimal number, not {_show(token)}")
    value = int(token)
    if not low <= value <= high:
        raise _BadRequest(Code.BAD_REQUEST, f"{what} must be {low}-{high}, not {value}")
    return value


def _show(token: bytes) -> str:
    text = token[:40].decode("ascii", "replace")
    return repr(text) + ("..." if len(token) > 40 else "")


def _sid_arg(token: bytes) -> str:
    if _SID_RE.match(token) is None:
        raise _BadRequest(
            Code.BAD_ID,
            "session id must be 1-256 characters from A-Z a-z 0-9 , - "
            f"(got {len(token)} bytes); nothing was done",
        )
    return token.decode("ascii")


def _arity(args: list[bytes], low: int, high: int, usage: str) -> None:
    if not low <= len(args) <= high:
        raise _BadRequest(Code.BAD_REQUEST, f"usage: {usage}")


def _flag(args: list[bytes], index: int, allowed: dict[bytes, bool], usage: str) -> bool | None:
    if len(args) <= index:
        return None
    try:
        return allowed[args[index]]
    except KeyError:
        raise _BadRequest(Code.BAD_REQUEST, f"usage: {usage}") from None


def _parse_hello(args: list[bytes]) -> Hello:
    usage = "HELLO <version> [wait_ms=N] [lease_ms=N] [client=TOKEN]"
    if not args:
        raise _BadRequest(Code.BAD_REQUEST, f"usage: {usage}")
    version = _number(args[0], "version", 0, 10**9)
    options: dict[str, bytes] = {}
    for arg in args[1:]:
        key, sep, value = arg.partition(b"=")
        name = key.decode("ascii")
        if not sep:
            raise _BadRequest(Code.BAD_REQUEST, f"HELLO option {_show(arg)} is not key=value")
        if name not in ("wait_ms", "lease_ms", "client"):
            raise _BadRequest(
                Code.BAD_REQUEST,
                f"unknown HELLO option {_show(key)}; known: wait_ms, lease_ms, client",
            )
        if not value:
            raise _BadRequest(Code.BAD_REQUEST, f"HELLO option {name} has no value")
        if name in options:
            raise _BadRequest(Code.BAD_REQUEST, f"HELLO option {name!r} given twice")
        options[name] = value
    wait = options.get("wait_ms")
    lease = options.get("lease_ms")
    client = options.get("client")
    return Hello(
        version=version,
        wait_ms=None if wait is None else _number(wait, "wait_ms", 0, MAX_WAIT_MS),
        lease_ms=None if lease is None else _number(lease, "lease_ms", 1, MAX_LEASE_MS),
        client=None if client is None else client.decode("ascii"),
    )


# Epochs and versions (CLUSTER.md §6, §11.4).  A number on the wire has at
# most 18 digits (MAX_COUNTER, _NUMBER_RE).  A node counts on from what its
# peers send it (one more per change, takeover or hand-over) and sends the
# result on in REPLs, so it takes less than that from them, leaving room
# for COUNTER_HEADROOM increments before the next hop's limit: a copy's
# counters (REPL, REPLDEL) up to MAX_COPY_COUNTER, and what it takes as the
# start of its own counting as master (HANDOFF, a WHERE answer) up to
# MAX_START_COUNTER.  Taking MAX_COUNTER itself wedged the session: its next
# write had a version no REPL can carry.  No honest cluster comes near
# either bound (10^17 writes to one session).
MAX_COUNTER: Final = 10**18 - 1
COUNTER_HEADROOM: Final = 10**17
MAX_COPY_COUNTER: Final = MAX_COUNTER - COUNTER_HEADROOM
MAX_START_COUNTER: Final = MAX_COPY_COUNTER - COUNTER_HEADROOM


def _node(token: bytes) -> str:
    if re.fullmatch(rb"[A-Za-z0-9]{1,16}", token) is None:
        raise _BadRequest(Code.BAD_REQUEST, f"node name {_show(token)} is not valid")
    return token.decode("ascii")


def _parse_peer(verb: bytes, args: list[bytes]) -> Request:
    if verb == b"WHERE":
        _arity(args, 1, 1, "WHERE <sid>")
        return Where(_sid_arg(args[0]))
    if verb == b"REPLDEL":
        _arity(args, 4, 4, "REPLDEL <sid> <master> <epoch> <version>")
        return ReplDelete(
            _sid_arg(args[0]),
            _node(args[1]),
            _number(args[2], "epoch", 0, MAX_COPY_COUNTER),
            _number(args[3], "version", 0, MAX_COPY_COUNTER),
        )
    raise _BadRequest(Code.UNKNOWN_VERB, f"unknown verb {_show(verb)}; see PROTOCOL.md section 4")


def _parse_simple(verb: bytes, args: list[bytes], peer: bool = False) -> Request:
    """Parse a request that has no payload (everything but WRITE, REPL, HANDOFF)."""
    if verb == b"READ":
        usage = "READ <sid> [LOCK|NOLOCK] [DESTROYED]"
        _arity(args, 1, 3, usage)
        destroyed = len(args) > 1 and args[-1] == b"DESTROYED"
        if destroyed:
            args = args[:-1]
        _arity(args, 1, 2, usage)
        lock = _flag(args, 1, {b"LOCK": True, b"NOLOCK": False}, usage)
        return Read(_sid_arg(args[0]), True if lock is None else lock, destroyed)
    if verb == b"TOUCH":
        usage = "TOUCH <sid> <ttl_s> [KEEP]"
        _arity(args, 2, 3, usage)
        keep = _flag(args, 2, {b"KEEP": True}, usage)
        sid = _sid_arg(args[0])
        return Touch(sid, _number(args[1], "ttl_s", 1, MAX_TTL_S), bool(keep))
    if verb == b"CLOSE":
        _arity(args, 0, 0, "CLOSE")
        return Close()
    if verb == b"HELLO":
        return _parse_hello(args)
    if verb == b"EXISTS":
        _arity(args, 1, 1, "EXISTS <sid>")
        return Exists(_sid_arg(args[0]))
    if verb == b"DESTROY":
        _arity(args, 1, 1, "DESTROY <sid>")
        return Destroy(_sid_arg(args[0]))
    if verb == b"CREATE":
        usage = "CREATE [<length> <bits>] [NOLOCK]"
        lock = True
        if args and args[-1] == b"NOLOCK":
            lock = False
            args = args[:-1]
        if len(args) not in (0, 2):
            raise _BadRequest(Code.BAD_REQUEST, f"usage: {usage}")
        if not args:
            return Create(lock=lock)
        length = _number(args[0], "length", MIN_SID_LENGTH, MAX_SID_LENGTH)
        bits = _number(args[1], "bits", 4, 6)
        return Create(length, bits, lock)
    if verb == b"GC":
        _arity(args, 1, 1, "GC <max_lifetime_s>")
        return Gc(_number(args[0], "max_lifetime_s", 1, MAX_TTL_S))
    if verb == b"PING":
        _arity(args, 0, 0, "PING")
        return Ping()
    if verb == b"STATS":
        _arity(args, 0, 0, "STATS")
        return Stats()
    if verb == b"DRAIN":
        _arity(args, 0, 0, "DRAIN")
        return Drain()
    if verb == b"GET":
        _arity(args, 1, 1, "GET <sid>")
        return Get(_sid_arg(args[0]))
    if verb == b"LIST":
        usage = "LIST <after|*> <limit> [ROLES]"
        _arity(args, 2, 3, usage)
        roles = _flag(args, 2, {b"ROLES": True}, usage)
        after = None if args[0] == b"*" else _sid_arg(args[0])
        return List(after, _number(args[1], "limit", 1, MAX_LIST_LIMIT), bool(roles))
    if peer:
        return _parse_peer(verb, args)
    raise _BadRequest(Code.UNKNOWN_VERB, f"unknown verb {_show(verb)}; see PROTOCOL.md section 4")


_Builder = Callable[[bytes], Request]


def _write_args(args: list[bytes]) -> _Builder:
    sid = _sid_arg(args[0])
    ttl_s = _number(args[1], "ttl_s", 1, MAX_TTL_S)
    keep = bool(_flag(args, 3, {b"KEEP": True}, "WRITE <sid> <ttl_s> <len> [KEEP]"))
    return lambda data: Write(sid, ttl_s, data, keep)


def _repl_args(args: list[bytes]) -> _Builder:
    sid = _sid_arg(args[0])
    master = _node(args[1])
    epoch = _number(args[2], "epoch", 0, MAX_COPY_COUNTER)
    version = _number(args[3], "version", 0, MAX_COPY_COUNTER)
    ttl_s = _number(args[4], "ttl_s", 1, MAX_TTL_S)
    return lambda data: ReplPut(sid, master, epoch, version, ttl_s, data)


def _handoff_args(args: list[bytes]) -> _Builder:
    sid = _sid_arg(args[0])
    # The receiver masters the session from these on (CLUSTER.md §8).
    epoch = _number(args[1], "epoch", 0, MAX_START_COUNTER)
    version = _number(args[2], "version", 0, MAX_START_COUNTER)
    ttl_s = _number(args[3], "ttl_s", 1, MAX_TTL_S)
    return lambda data: Handoff(sid, epoch, version, ttl_s, data)


# verb -> (usage, fewest args, most args, index of the length, argument parser, peer only)
_PayloadVerb = tuple[str, int, int, int, Callable[[list[bytes]], _Builder], bool]
_PAYLOAD_VERBS: Final[dict[bytes, _PayloadVerb]] = {
    b"WRITE": ("WRITE <sid> <ttl_s> <len> [KEEP]", 3, 4, 2, _write_args, False),
    b"REPL": ("REPL <sid> <master> <epoch> <version> <ttl_s> <len>", 6, 6, 5, _repl_args, True),
    b"HANDOFF": ("HANDOFF <sid> <epoch> <version> <ttl_s> <len>", 5, 5, 4, _handoff_args, True),
}


class RequestParser:
    """Turns a byte stream from a client into request events (§2, §4).

    ``max_session_bytes`` bounds WRITE payloads; larger ones are swallowed and
    reported as ``RequestError(TOO_LARGE)``.  At most ``MAX_HEADER_BYTES`` of
    an unfinished header and one payload are ever buffered.
    """

    __slots__ = (
        "_buf",
        "_max_session_bytes",
        "_peer",
        "_pending_write",
        "_remaining",
        "_state",
    )

    def __init__(
        self, max_session_bytes: int = DEFAULT_MAX_SESSION_BYTES, *, peer: bool = False
    ) -> None:
        self._peer = peer  # an authenticated peer connection: peer verbs allowed
        self._buf = bytearray()
        self._state = _State.HEADER
        # Makes the request once the payload being collected is complete.
        self._pending_write: _Builder | None = None
        self._remaining = 0  # payload bytes still expected (PAYLOAD, DISCARD)
        self._max_session_bytes = max_session_bytes

    @property
    def max_session_bytes(self) -> int:
        return self._max_session_bytes

    @max_session_bytes.setter
    def max_session_bytes(self, value: int) -> None:
        self._max_session_bytes = value

    @property
    def mid_request(self) -> bool:
        """True while part of a request has arrived but not all of it."""
        return bool(self._buf) or self._state in (_State.PAYLOAD, _State.DISCARD)

    @property
    def broken(self) -> bool:
        return self._state is _State.BROKEN

    def _go(self, event: _Input) -> None:
        self._state = _TRANSITIONS[(self._state, event)]

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._state is _State.BROKEN:
            return
        if self._state is _State.DISCARD:
            # Never buffer what we are going to throw away.
            skipped = min(len(data), self._remaining)
            self._remaining -= skipped
            data = data[skipped:]
            if self._remaining == 0:
                self._go(_Input.PAYLOAD_DONE)
        self._buf += data

    def next_event(self) -> Event | _NeedData:
        state = self._state
        if state is _State.HEADER:
            return self._next_header()
        if state is _State.PAYLOAD:
            if len(self._buf) < self._remaining:
                return NEED_DATA
            n = self._remaining
            data = bytes(self._buf[:n])
            del self._buf[:n]
            build = self._pending_write
            assert build is not None
            self._pending_write = None
            self._go(_Input.PAYLOAD_DONE)
            return build(data)
        if state is _State.DISCARD:
            skipped = min(len(self._buf), self._remaining)
            del self._buf[:skipped]
            self._remaining -= skipped
            if self._remaining:
                return NEED_DATA
            self._go(_Input.PAYLOAD_DONE)
            return self._next_header()
        return NEED_DATA  # BROKEN

    def _fatal(self, code: Code, message: str) -> FatalError:
        self._go(_Input.FATAL)
        self._buf.clear()
        return FatalError(code, message)

    def _next_header(self) -> Event | _NeedData:
        buf = self._buf
        end = buf.find(b"\n", 0, MAX_HEADER_BYTES)
        if end < 0:
            if len(buf) >= MAX_HEADER_BYTES:
                return self._fatal(
                    Code.HEADER_TOO_LONG,
                    f"no end of line within {MAX_HEADER_BYTES} bytes (MAX_HEADER_BYTES); "
                    "closing the connection",
                )
            return NEED_DATA
        line = bytes(buf[:end])
        del buf[: end + 1]
        first = line[:1]
        if first == b"R":
            m = _FAST_READ.match(line)
            if m is not None:  # stays in HEADER
                return Read(m[1].decode("ascii"), m[2] != b"NOLOCK", m[3] is not None)
        elif first == b"W":
            m = _FAST_WRITE.match(line)
            if m is not None:
                ttl_s = int(m[2])
                length = int(m[3])
                if ttl_s <= MAX_TTL_S and length <= self._max_session_bytes:
                    sid = m[1].decode("ascii")
                    keep = m[4] is not None
                    if len(buf) >= length:  # the payload is here: stays in HEADER
                        data = bytes(buf[:length])
                        del buf[:length]
                        return Write(sid, ttl_s, data, keep)
                    self._pending_write = lambda data: Write(sid, ttl_s, data, keep)
                    self._remaining = length
                    self._go(_Input.WRITE_HEADER)
                    return NEED_DATA
        elif first == b"H":
            m = _FAST_HELLO.match(line)
            if m is not None:
                wait_ms = int(m[1])
                lease_ms = None if m[2] is None else int(m[2])
                if wait_ms <= MAX_WAIT_MS and (lease_ms is None or lease_ms <= MAX_LEASE_MS):
                    return Hello(1, wait_ms, lease_ms, m[3].decode("ascii"))
        if _LINE_RE.match(line) is None:
            return self._fatal(
                Code.BAD_FRAME,
                "a header line must be printable ASCII tokens separated by single "
                "spaces; closing the connection",
            )
        tokens = line.split(b" ")
        verb = tokens[0]
        args = tokens[1:]
        payload_verb = _PAYLOAD_VERBS.get(verb)
        if payload_verb is not None and (self._peer or not payload_verb[5]):
            return self._payload_header(payload_verb, args)
        try:
            request = _parse_simple(verb, args, self._peer)
        except _BadRequest as exc:
            self._go(_Input.SIMPLE_REQUEST)
            return RequestError(exc.code, exc.message)
        self._go(_Input.SIMPLE_REQUEST)
        return request

    def _discard(self, length: int, error: RequestError) -> RequestError:
        """Swallow a WRITE payload we refuse, without buffering it (§4.2)."""
        self._remaining = length
        self._go(_Input.DISCARDED_WRITE)
        # Bytes already buffered belong to the payload being discarded.
        skipped = min(len(self._buf), length)
        del self._buf[:skipped]
        self._remaining -= skipped
        if self._remaining == 0:
            self._go(_Input.PAYLOAD_DONE)
        return error

    def _payload_header(self, spec: _PayloadVerb, args: list[bytes]) -> Event | _NeedData:
        usage, fewest, most, length_at, parse_args, _ = spec
        if not fewest <= len(args) <= most or _LENGTH_RE.match(args[length_at]) is None:
            # Without a length we cannot find the next request.
            return self._fatal(
                Code.BAD_FRAME,
                f"usage: {usage}; without a payload length the stream cannot be "
                "parsed, closing the connection",
            )
        length = int(args[length_at])
        if length > self._max_session_bytes:
            return self._discard(
                length,
                RequestError(
                    Code.TOO_LARGE,
                    f"session data of {length} bytes is over max_session_bytes="
                    f"{self._max_session_bytes}; the stored session is unchanged",
                ),
            )
        try:
            build = parse_args(args)
        except _BadRequest as exc:
            # Well framed but wrong: swallow the payload, report, go on.
            return self._discard(length, RequestError(exc.code, exc.message))
        self._pending_write = build
        self._remaining = length
        self._go(_Input.WRITE_HEADER)
        return self.next_event()


# ---------------------------------------------------------------- client side


def encode_request(request: Request) -> bytes:
    """The bytes of one request (§4); the inverse of :class:`RequestParser`."""
    if isinstance(request, Write):
        head = f"WRITE {request.sid} {request.ttl_s} {len(request.data)}"
        if request.keep:
            head += " KEEP"
        return head.encode("ascii") + b"\n" + request.data
    if isinstance(request, Read):
        told = " DESTROYED" if request.destroyed else ""
        return f"READ {request.sid} {'LOCK' if request.lock else 'NOLOCK'}{told}\n".encode(
            "ascii"
        )
    if isinstance(request, Touch):
        keep = " KEEP" if request.keep else ""
        return f"TOUCH {request.sid} {request.ttl_s}{keep}\n".encode("ascii")
    if isinstance(request, Hello):
        parts = [f"HELLO {request.version}"]
        if request.wait_ms is not None:
            parts.append(f"wait_ms={request.wait_ms}")
        if request.lease_ms is not None:
            parts.append(f"lease_ms={request.lease_ms}")
        if request.client is not None:
            parts.append(f"client={request.client}")
        return (" ".join(parts) + "\n").encode("ascii")
    if isinstance(request, Exists):
        return f"EXISTS {request.sid}\n".encode("ascii")
    if isinstance(request, Destroy):
        return f"DESTROY {request.sid}\n".encode("ascii")
    if isinstance(request, Close):
        return b"CLOSE\n"
    if isinstance(request, Gc):
        return f"GC {request.max_lifetime_s}\n".encode("ascii")
    if isinstance(request, Create):
        nolock = "" if request.lock else " NOLOCK"
        return f"CREATE {request.length} {request.bits}{nolock}\n".encode("ascii")
    if isinstance(request, ReplPut):
        head = (
            f"REPL {request.sid} {request.master} {request.epoch} {request.version} "
            f"{request.ttl_s} {len(request.data)}\n"
        )
        return head.encode("ascii") + request.data
    if isinstance(request, ReplDelete):
        return (
            f"REPLDEL {request.sid} {request.master} {request.epoch} {request.version}\n"
        ).encode("ascii")
    if isinstance(request, Where):
        return f"WHERE {request.sid}\n".encode("ascii")
    if isinstance(request, Handoff):
        head = (
            f"HANDOFF {request.sid} {request.epoch} {request.version} {request.ttl_s} "
            f"{len(request.data)}\n"
        )
        return head.encode("ascii") + request.data
    if isinstance(request, Ping):
        return b"PING\n"
    if isinstance(request, Stats):
        return b"STATS\n"
    if isinstance(request, Drain):
        return b"DRAIN\n"
    if isinstance(request, Get):
        return f"GET {request.sid}\n".encode("ascii")
    assert isinstance(request, List)
    roles = " ROLES" if request.roles else ""
    return f"LIST {request.after or '*'} {request.limit}{roles}\n".encode("ascii")


class ReplyError(Exception):
    """The daemon sent something that is not a reply (§8)."""


class ReplyParser:
    """Turns a byte stream from the daemon into :data:`Reply` objects."""

    def __init__(self, max_payload_bytes: int = 1 << 31) -> None:
        self._buf = bytearray()
        self._max_payload_bytes = max_payload_bytes
        self._pending: tuple[int, tuple[str, ...]] | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buf += data

    def next_reply(self) -> Reply | _NeedData:
        if self._pending is None:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_HEADER_BYTES:
                    raise ReplyError("reply line longer than MAX_HEADER_BYTES")
                return NEED_DATA
            line = bytes(self._buf[:end]).decode("ascii", "replace")
            del self._buf[: end + 1]
            status, _, rest = line.partition(" ")
            if status == "OK":
                return Ok(tuple(rest.split(" ")) if rest else ())
            if status == "MISS" and not rest:
                return MISS
            if status == "MISS" and rest == "DESTROYED":
                return MISS_DESTROYED
            if status == "ERR":
                name, _, sentence = rest.partition(" ")
                try:
                    code = Code[name]
                except KeyError:
                    raise ReplyError(f"unknown error code {name!r}") from None
                return Error(code, sentence)
            if status == "DATA":
                fields = rest.split(" ")
                if not fields[0].isdigit() or int(fields[0]) > self._max_payload_bytes:
                    raise ReplyError(f"bad DATA length in {line[:80]!r}")
                self._pending = (int(fields[0]), tuple(fields[1:]))
            else:
                raise ReplyError(f"not a reply: {line[:80]!r}")
        length, tokens = self._pending
        if len(self._buf) < length:
            return NEED_DATA
        data = bytes(self._buf[:length])
        del self._buf[:length]
        self._pending = None
        return Data(data, tokens)


# Admin verbs that stop the daemon or list every session ID: only root, the
# daemon's own user and cluster peers may use them (§4.9, Code.DENIED).
ADMIN_ONLY: Final = frozenset({Drain, List})
