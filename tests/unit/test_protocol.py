"""The wire codec (PROTOCOL.md §2, §4, §8, §9), table-driven.

Every input is fed three ways, as h11's ``tr()`` does: whole, one byte at a
time, and followed by the first bytes of the next request.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from phpsess import protocol as p

SID = "abc123,-XYZ"
LONG_SID = "s" * 256
MAX = 64  # max_session_bytes of the parsers below


def drain(parser: p.RequestParser) -> list[p.Event]:
    events: list[p.Event] = []
    while True:
        event = parser.next_event()
        if event is p.NEED_DATA:
            return events
        assert not isinstance(event, p._NeedData)
        events.append(event)


def feed_whole(data: bytes, max_session_bytes: int = MAX) -> list[p.Event]:
    parser = p.RequestParser(max_session_bytes)
    parser.receive_data(data)
    return drain(parser)


def feed_bytewise(data: bytes, max_session_bytes: int = MAX) -> list[p.Event]:
    parser = p.RequestParser(max_session_bytes)
    events = drain(parser)
    for i in range(len(data)):
        parser.receive_data(data[i : i + 1])
        events += drain(parser)
    return events


FEEDERS: list[Callable[[bytes], list[p.Event]]] = [feed_whole, feed_bytewise]

# ---------------------------------------------------------------- valid requests (§4)

REQUESTS: list[tuple[bytes, p.Request]] = [
    (b"HELLO 1\n", p.Hello(1)),
    (b"HELLO 2\n", p.Hello(2)),  # parses; the engine answers VERSION
    (b"HELLO 1 wait_ms=0\n", p.Hello(1, wait_ms=0)),
    (b"HELLO 1 wait_ms=3600000\n", p.Hello(1, wait_ms=3_600_000)),
    (b"HELLO 1 lease_ms=1\n", p.Hello(1, lease_ms=1)),
    (b"HELLO 1 lease_ms=86400000\n", p.Hello(1, lease_ms=86_400_000)),
    (b"HELLO 1 client=php-fpm:1234\n", p.Hello(1, client="php-fpm:1234")),
    (
        b"HELLO 1 client=x lease_ms=500 wait_ms=250\n",
        p.Hello(1, wait_ms=250, lease_ms=500, client="x"),
    ),
    (b"HELLO 1 client=a=b\n", p.Hello(1, client="a=b")),
    (b"READ " + SID.encode() + b"\n", p.Read(SID)),
    (b"READ " + SID.encode() + b" LOCK\n", p.Read(SID, lock=True)),
    (b"READ " + SID.encode() + b" NOLOCK\n", p.Read(SID, lock=False)),
    # §4.1: a client that understands MISS DESTROYED says so.
    (b"READ " + SID.encode() + b" LOCK DESTROYED\n", p.Read(SID, lock=True, destroyed=True)),
    (b"READ " + SID.encode() + b" DESTROYED\n", p.Read(SID, destroyed=True)),
    (b"READ " + SID.encode() + b" NOLOCK DESTROYED\n", p.Read(SID, lock=False, destroyed=True)),
    (b"READ DESTROYED\n", p.Read("DESTROYED")),
    (b"READ " + LONG_SID.encode() + b"\n", p.Read(LONG_SID)),
    (b"READ -\n", p.Read("-")),
    (b"WRITE s1 1440 5\nhello", p.Write("s1", 1440, b"hello")),
    (b"WRITE s1 1 0\n", p.Write("s1", 1, b"")),
    (b"WRITE s1 31536000 3 KEEP\nabc", p.Write("s1", 31_536_000, b"abc", keep=True)),
    (b"WRITE s1 60 8\n\x00\n\xff\r\nA \x7f", p.Write("s1", 60, b"\x00\n\xff\r\nA \x7f")),
    (b"WRITE s1 60 10\nPING\nPING\n", p.Write("s1", 60, b"PING\nPING\n")),
    (b"WRITE s1 60 64\n" + bytes(range(64)), p.Write("s1", 60, bytes(range(64)))),
    (b"TOUCH s1 1440\n", p.Touch("s1", 1440)),
    (b"TOUCH s1 1 KEEP\n", p.Touch("s1", 1, keep=True)),
    (b"EXISTS s1\n", p.Exists("s1")),
    (b"DESTROY s1\n", p.Destroy("s1")),
    (b"CLOSE\n", p.Close()),
    (b"GC 1440\n", p.Gc(1440)),
    (b"GC 31536000\n", p.Gc(31_536_000)),
    (b"CREATE\n", p.Create()),
    (b"CREATE NOLOCK\n", p.Create(lock=False)),
    (b"CREATE 22 4\n", p.Create(22, 4)),
    (b"CREATE 256 6 NOLOCK\n", p.Create(256, 6, lock=False)),
    (b"CREATE 48 5\n", p.Create(48, 5)),
    (b"PING\n", p.Ping()),
    (b"STATS\n", p.Stats()),
    (b"GET s1\n", p.Get("s1")),
    (b"LIST * 100\n", p.List(None, 100)),
    (b"LIST - 5\n", p.List("-", 5)),  # "-" is a valid session id
    (b"LIST s1 10000\n", p.List("s1", 10_000)),
    (b"LIST abc 1\n", p.List("abc", 1)),
    (b"LIST * 100 ROLES\n", p.List(None, 100, roles=True)),
]


@pytest.mark.parametrize(("data", "expected"), REQUESTS)
@pytest.mark.parametrize("feed", FEEDERS)
def test_request_parses(
    feed: Callable[[bytes], list[p.Event]], data: bytes, expected: p.Request
) -> None:
    assert feed(data) == [expected]


@pytest.mark.parametrize(("data", "expected"), REQUESTS)
@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("trailing", [b"P", b"PING", b"WRITE s2 1 3\nab"])
def test_request_with_trailing_bytes(
    feed: Callable[[bytes], list[p.Event]], data: bytes, expected: p.Request, trailing: bytes
) -> None:
    """Bytes of the next, unfinished request are left for later, not misparsed."""
    parser = p.RequestParser(MAX)
    if feed is feed_whole:
        parser.receive_data(data + trailing)
        events = drain(parser)
    else:
        events = []
        for byte in data + trailing:
            parser.receive_data(bytes([byte]))
            events += drain(parser)
    assert events == [expected]
    assert parser.mid_request
    # Finishing the next request yields it.
    rest = {b"P": b"ING\n", b"PING": b"\n", b"WRITE s2 1 3\nab": b"c"}[trailing]
    parser.receive_data(rest)
    nxt = p.Write("s2", 1, b"abc") if trailing.startswith(b"WRITE") else p.Ping()
    assert drain(parser) == [nxt]
    assert not parser.mid_request


@pytest.mark.parametrize(("data", "expected"), REQUESTS)
def test_encode_request_is_inverse(data: bytes, expected: p.Request) -> None:
    assert feed_whole(p.encode_request(expected)) == [expected]


def test_pipelined_requests_in_one_chunk() -> None:
    stream = b"".join(data for data, _ in REQUESTS)
    expected = [req for _, req in REQUESTS]
    assert feed_whole(stream) == expected
    assert feed_bytewise(stream) == expected


def test_header_of_exactly_max_header_bytes_is_accepted() -> None:
    prefix = b"HELLO 1 client="
    label = b"x" * (p.MAX_HEADER_BYTES - len(prefix) - 1)
    line = prefix + label + b"\n"
    assert len(line) == p.MAX_HEADER_BYTES
    for feed in FEEDERS:
        assert feed(line) == [p.Hello(1, client=label.decode())]


# ---------------------------------------------------------------- non-fatal errors (§9)

ERRORS: list[tuple[bytes, p.Code]] = [
    # §5: BAD_ID.  An empty sid cannot be a token, so "READ " is a framing error
    # (below); an empty sid never reaches the request.
    (b"READ ../x\n", p.Code.BAD_ID),
    (b"READ a/b\n", p.Code.BAD_ID),
    (b"READ a.b\n", p.Code.BAD_ID),
    (b"READ a_b\n", p.Code.BAD_ID),
    # §4.1: [LOCK|NOLOCK] [DESTROYED], each at most once, in that order
    (b"READ s1 DESTROYED LOCK\n", p.Code.BAD_REQUEST),
    (b"READ s1 DESTROYED DESTROYED\n", p.Code.BAD_REQUEST),
    (b"READ s1 LOCK DESTROYED x\n", p.Code.BAD_REQUEST),
    (b"READ s1 LOCK NOLOCK\n", p.Code.BAD_REQUEST),
    (b"READ s1 destroyed\n", p.Code.BAD_REQUEST),
    (b"READ " + b"s" * 257 + b"\n", p.Code.BAD_ID),
    (b"EXISTS ../x\n", p.Code.BAD_ID),
    (b"DESTROY " + b"s" * 257 + b"\n", p.Code.BAD_ID),
    (b"TOUCH ../x 10\n", p.Code.BAD_ID),
    (b"GET ~\n", p.Code.BAD_ID),
    (b"LIST ../x 10\n", p.Code.BAD_ID),
    (b"LIST ** 10\n", p.Code.BAD_ID),
    (b"LIST a* 10\n", p.Code.BAD_ID),
    # BAD_REQUEST: numbers
    (b"TOUCH s1 0\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1 31536001\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1 010\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1 +10\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1 -1\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1 1e3\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1 " + b"9" * 30 + b"\n", p.Code.BAD_REQUEST),
    (b"GC 0\n", p.Code.BAD_REQUEST),
    (b"GC 31536001\n", p.Code.BAD_REQUEST),
    (b"GC x\n", p.Code.BAD_REQUEST),
    (b"CREATE 21 5\n", p.Code.BAD_REQUEST),
    (b"CREATE 257 5\n", p.Code.BAD_REQUEST),
    (b"CREATE 32 3\n", p.Code.BAD_REQUEST),
    (b"CREATE 32 7\n", p.Code.BAD_REQUEST),
    (b"CREATE 32\n", p.Code.BAD_REQUEST),
    (b"CREATE 32 5 6\n", p.Code.BAD_REQUEST),
    (b"CREATE LOCK\n", p.Code.BAD_REQUEST),
    (b"LIST * 0\n", p.Code.BAD_REQUEST),
    (b"LIST * 10001\n", p.Code.BAD_REQUEST),
    (b"LIST * x\n", p.Code.BAD_REQUEST),
    (b"LIST * 10 ROLE\n", p.Code.BAD_REQUEST),
    (b"LIST * 10 ROLES ROLES\n", p.Code.BAD_REQUEST),
    (b"HELLO x\n", p.Code.BAD_REQUEST),
    (b"HELLO 01\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 wait_ms=3600001\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 wait_ms=-1\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 lease_ms=0\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 lease_ms=86400001\n", p.Code.BAD_REQUEST),
    # BAD_REQUEST: options
    (b"HELLO 1 colour=blue\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 WAIT_MS=5\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 wait_ms\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 wait_ms=\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 =5\n", p.Code.BAD_REQUEST),
    (b"HELLO 1 wait_ms=5 wait_ms=6\n", p.Code.BAD_REQUEST),
    (b"READ s1 lock\n", p.Code.BAD_REQUEST),
    (b"READ s1 KEEP\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1 10 NOLOCK\n", p.Code.BAD_REQUEST),
    # BAD_REQUEST: arity
    (b"HELLO\n", p.Code.BAD_REQUEST),
    (b"READ\n", p.Code.BAD_REQUEST),
    (b"READ s1 LOCK x\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1\n", p.Code.BAD_REQUEST),
    (b"TOUCH s1 10 KEEP x\n", p.Code.BAD_REQUEST),
    (b"EXISTS\n", p.Code.BAD_REQUEST),
    (b"EXISTS s1 s2\n", p.Code.BAD_REQUEST),
    (b"DESTROY\n", p.Code.BAD_REQUEST),
    (b"CLOSE s1\n", p.Code.BAD_REQUEST),
    (b"GC\n", p.Code.BAD_REQUEST),
    (b"GC 1 2\n", p.Code.BAD_REQUEST),
    (b"PING x\n", p.Code.BAD_REQUEST),
    (b"STATS x\n", p.Code.BAD_REQUEST),
    (b"GET\n", p.Code.BAD_REQUEST),
    (b"LIST *\n", p.Code.BAD_REQUEST),
    (b"LIST * 1 2\n", p.Code.BAD_REQUEST),
    # UNKNOWN_VERB: verbs are upper case and exactly those of §4
    (b"BOGUS\n", p.Code.UNKNOWN_VERB),
    (b"read s1\n", p.Code.UNKNOWN_VERB),
    (b"Ping\n", p.Code.UNKNOWN_VERB),
    (b"DELETE s1\n", p.Code.UNKNOWN_VERB),
    (b"\x7e\n", p.Code.UNKNOWN_VERB),
]


@pytest.mark.parametrize(("data", "code"), ERRORS)
@pytest.mark.parametrize("feed", FEEDERS)
def test_request_error_keeps_stream_usable(
    feed: Callable[[bytes], list[p.Event]], data: bytes, code: p.Code
) -> None:
    events = feed(data + b"PING\n")
    assert len(events) == 2, events
    error, nxt = events
    assert isinstance(error, p.RequestError)
    assert error.code is code
    assert error.message  # a sentence for humans
    assert nxt == p.Ping()


def test_bad_id_message_does_not_echo_the_id() -> None:
    [error] = feed_whole(b"READ ../../etc/passwd\n")
    assert isinstance(error, p.RequestError)
    assert "passwd" not in error.message


def test_a_well_formed_number_out_of_range_is_called_so_whatever_its_length() -> None:
    # 19 digits and more were "not a decimal number".
    for line, message in (
        (b"TOUCH s1 9999999999999999999\n", "ttl_s must be 1-31536000, not '9999999999999999999'"),
        (b"TOUCH s1 31536001\n", "ttl_s must be 1-31536000, not 31536001"),
        (b"TOUCH s1 1e3\n", "ttl_s must be a decimal number, not '1e3'"),
        (b"TOUCH s1 0999\n", "ttl_s must be a decimal number, not '0999'"),
    ):
        [error] = feed_whole(line)
        assert isinstance(error, p.RequestError) and error.code is p.Code.BAD_REQUEST
        assert error.message == message, line


def test_unknown_hello_option_is_named() -> None:
    [error] = feed_whole(b"HELLO 1 colour=blue\n")
    assert isinstance(error, p.RequestError)
    assert "colour" in error.message


def test_an_error_reply_stays_within_the_header_limit() -> None:
    # It quotes the request: a long unknown option is cut, and whatever a
    # message holds, the line stays within MAX_HEADER_BYTES (§2).
    [error] = feed_whole(b"HELLO 1 " + b"k" * 1000 + b"=1\n")
    assert isinstance(error, p.RequestError) and "kkk" in error.message
    line = p.encode_reply(p.Error(error.code, error.message))
    assert line.startswith(b"ERR BAD_REQUEST unknown HELLO option 'kkk")
    assert len(line) < 200
    long = p.encode_reply(p.Error(p.Code.BAD_REQUEST, "x" * 5000))
    assert len(long) == p.MAX_HEADER_BYTES and long.endswith(b"...\n")
    parser = p.ReplyParser()
    parser.receive_data(long)
    reply = parser.next_reply()
    assert isinstance(reply, p.Error) and reply.code is p.Code.BAD_REQUEST
    assert reply.message == "x" * (1020 - len("ERR BAD_REQUEST ")) + "..."


def test_an_empty_hello_option_value_is_named() -> None:
    [error] = feed_whole(b"HELLO 1 client=\n")
    assert isinstance(error, p.RequestError) and error.code is p.Code.BAD_REQUEST
    assert error.message == "HELLO option client has no value"


WRITE_ERRORS: list[tuple[bytes, p.Code]] = [
    # Well framed WRITEs that are wrong: the payload is swallowed, not parsed.
    (b"WRITE ../x 10 5\nPING\n", p.Code.BAD_ID),
    (b"WRITE " + b"s" * 257 + b" 10 5\nPING\n", p.Code.BAD_ID),
    (b"WRITE s1 0 5\nPING\n", p.Code.BAD_REQUEST),
    (b"WRITE s1 31536001 5\nPING\n", p.Code.BAD_REQUEST),
    (b"WRITE s1 x 5\nPING\n", p.Code.BAD_REQUEST),
    (b"WRITE s1 10 5 NOKEEP\nPING\n", p.Code.BAD_REQUEST),
    (b"WRITE s1 10 0 keep\n", p.Code.BAD_REQUEST),
    # TOO_LARGE takes precedence (§4.2), even over a bad id
    (b"WRITE s1 10 65\n" + b"PING\n" * 13, p.Code.TOO_LARGE),
    (b"WRITE ../x 10 65\n" + b"PING\n" * 13, p.Code.TOO_LARGE),
    (b"WRITE s1 10 100000\n" + b"\n" * 100_000, p.Code.TOO_LARGE),
]


@pytest.mark.parametrize(("data", "code"), WRITE_ERRORS)
@pytest.mark.parametrize("feed", FEEDERS)
def test_wrong_write_swallows_its_payload(
    feed: Callable[[bytes], list[p.Event]], data: bytes, code: p.Code
) -> None:
    events = feed(data + b"EXISTS s9\n")
    assert len(events) == 2, events
    error, nxt = events
    assert isinstance(error, p.RequestError)
    assert error.code is code
    assert nxt == p.Exists("s9")


def test_too_large_payload_is_never_buffered() -> None:
    parser = p.RequestParser(MAX)
    parser.receive_data(b"WRITE s1 10 1000000\n")
    [error] = drain(parser)
    assert isinstance(error, p.RequestError) and error.code is p.Code.TOO_LARGE
    assert "1000000" in error.message and str(MAX) in error.message
    for _ in range(99):
        parser.receive_data(b"\xff" * 10_000)
        assert drain(parser) == []
        assert len(parser._buf) == 0  # white box: discarded bytes are not kept
        assert parser.mid_request
    parser.receive_data(b"\xff" * 10_000 + b"PING\n")
    assert drain(parser) == [p.Ping()]
    assert not parser.mid_request


def test_write_of_exactly_max_session_bytes_is_accepted() -> None:
    data = b"\x00" * MAX
    for feed in FEEDERS:
        assert feed(b"WRITE s1 10 64\n" + data) == [p.Write("s1", 10, data)]


def test_max_session_bytes_can_be_changed() -> None:
    parser = p.RequestParser(4)
    assert parser.max_session_bytes == 4
    parser.max_session_bytes = 8
    parser.receive_data(b"WRITE s1 10 8\n12345678")
    assert drain(parser) == [p.Write("s1", 10, b"12345678")]


def test_default_max_session_bytes_is_16_mib() -> None:
    assert p.RequestParser().max_session_bytes == 16 * 1024 * 1024 == p.DEFAULT_MAX_SESSION_BYTES


# ---------------------------------------------------------------- fatal errors (§2, §9)

FATAL: list[tuple[bytes, p.Code]] = [
    (b"READ \n", p.Code.BAD_FRAME),  # empty sid: trailing space
    (b"\n", p.Code.BAD_FRAME),
    (b" PING\n", p.Code.BAD_FRAME),
    (b"PING \n", p.Code.BAD_FRAME),
    (b"READ  s1\n", p.Code.BAD_FRAME),
    (b"PING\r\n", p.Code.BAD_FRAME),
    (b"READ s1\rNOLOCK\n", p.Code.BAD_FRAME),
    (b"READ s\x00\n", p.Code.BAD_FRAME),
    (b"READ s\x01\n", p.Code.BAD_FRAME),
    (b"READ s\x1b[0m\n", p.Code.BAD_FRAME),
    (b"READ s\x7f\n", p.Code.BAD_FRAME),
    (b"READ \xc3\xa9t\xc3\xa9\n", p.Code.BAD_FRAME),
    (b"READ s\xff\n", p.Code.BAD_FRAME),
    (b"READ\ts1\n", p.Code.BAD_FRAME),
    (b"BOGUS\x00\n", p.Code.BAD_FRAME),
    (b"WRITE s1 10\nabc", p.Code.BAD_FRAME),
    (b"WRITE s1\n", p.Code.BAD_FRAME),
    (b"WRITE\n", p.Code.BAD_FRAME),
    (b"WRITE s1 10 abc\nabc", p.Code.BAD_FRAME),
    (b"WRITE s1 10 -3\nabc", p.Code.BAD_FRAME),
    (b"WRITE s1 10 03\nabc", p.Code.BAD_FRAME),
    (b"WRITE s1 10 0x3\nabc", p.Code.BAD_FRAME),
    (b"A" * p.MAX_HEADER_BYTES, p.Code.HEADER_TOO_LONG),
    (b"HELLO 1 client=" + b"x" * (p.MAX_HEADER_BYTES - 15) + b"\n", p.Code.HEADER_TOO_LONG),
    (b"\x00" * 5000, p.Code.HEADER_TOO_LONG),
]


@pytest.mark.parametrize(("data", "code"), FATAL)
@pytest.mark.parametrize("feed", FEEDERS)
def test_fatal_error_ends_parsing(
    feed: Callable[[bytes], list[p.Event]], data: bytes, code: p.Code
) -> None:
    # Valid requests follow; none of them may come out.
    events = feed(data + b"\nPING\nWRITE s1 1 1\nx")
    assert len(events) == 1, events
    [error] = events
    assert isinstance(error, p.FatalError)
    assert error.code is code
    assert "clos" in error.message  # tells the peer the connection goes away


@pytest.mark.parametrize(("data", "code"), FATAL)
def test_broken_parser_ignores_more_data(data: bytes, code: p.Code) -> None:
    parser = p.RequestParser(MAX)
    parser.receive_data(data)
    [error] = drain(parser)
    assert isinstance(error, p.FatalError) and error.code is code
    assert parser.broken
    for _ in range(10):
        parser.receive_data(b"PING\n" * 1000)
        assert parser.next_event() is p.NEED_DATA
    assert len(parser._buf) == 0  # white box: a broken parser keeps nothing


@pytest.mark.parametrize("feed", FEEDERS)
def test_fatal_after_good_requests_keeps_those(feed: Callable[[bytes], list[p.Event]]) -> None:
    events = feed(b"PING\nREAD s1\nPING \nPING\n")
    assert events[:2] == [p.Ping(), p.Read("s1")]
    assert len(events) == 3
    assert isinstance(events[2], p.FatalError) and events[2].code is p.Code.BAD_FRAME


def test_header_too_long_is_reported_before_the_lf_arrives() -> None:
    parser = p.RequestParser(MAX)
    parser.receive_data(b"A" * (p.MAX_HEADER_BYTES - 1))
    assert drain(parser) == []
    parser.receive_data(b"A")
    [error] = drain(parser)
    assert isinstance(error, p.FatalError) and error.code is p.Code.HEADER_TOO_LONG


def test_mid_request() -> None:
    parser = p.RequestParser(MAX)
    assert not parser.mid_request
    parser.receive_data(b"WRITE s1 1 4\nab")
    assert drain(parser) == []
    assert parser.mid_request
    parser.receive_data(b"cd")
    assert drain(parser) == [p.Write("s1", 1, b"abcd")]
    assert not parser.mid_request


# ---------------------------------------------------------------- events validate themselves


@pytest.mark.parametrize(
    "build",
    [
        lambda: p.Read(""),
        lambda: p.Read("../x"),
        lambda: p.Read("a\n"),
        lambda: p.Read("s" * 257),
        lambda: p.Write("s1", 0, b""),
        lambda: p.Write("s1", p.MAX_TTL_S + 1, b""),
        lambda: p.Touch("é", 1),
        lambda: p.Gc(0),
        lambda: p.Create(21, 5),
        lambda: p.Create(32, 7),
        lambda: p.List("../x", 1),
        lambda: p.List(None, 0),
        lambda: p.List(None, p.MAX_LIST_LIMIT + 1),
    ],
)
def test_invalid_events_cannot_be_built(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize(
    ("sid", "valid"),
    [
        ("a", True),
        ("-", True),
        (",", True),
        ("AZaz09,-", True),
        ("s" * 256, True),
        ("s" * 257, False),
        ("", False),
        ("../x", False),
        ("a b", False),
        ("a\x00", False),
        ("a\n", False),
        ("é", False),
        (b"abc", True),
        (b"ab\xff", False),
    ],
)
def test_is_valid_sid(sid: str | bytes, valid: bool) -> None:
    assert p.is_valid_sid(sid) is valid


# ---------------------------------------------------------------- replies (§8)

REPLIES: list[tuple[p.Reply, bytes]] = [
    (p.OK, b"OK\n"),
    (p.Ok(), b"OK\n"),
    (p.Ok(("1",)), b"OK 1\n"),
    (p.Ok(("0",)), b"OK 0\n"),
    (p.Ok(("abcdefghijklmnopqrstuv0123456789",)), b"OK abcdefghijklmnopqrstuv0123456789\n"),
    (p.Data(b""), b"DATA 0\n"),
    (p.Data(b'a|s:1:"x";'), b'DATA 10\na|s:1:"x";'),
    (p.Data(b"\x00\n\xff\r\n"), b"DATA 5\n\x00\n\xff\r\n"),
    (p.Data(b"xy", ("1440000", "1")), b"DATA 2 1440000 1\nxy"),
    (p.Data(b"s1 2 10 0\n", ("*",)), b"DATA 10 *\ns1 2 10 0\n"),
    (p.MISS, b"MISS\n"),
    (p.MISS_DESTROYED, b"MISS DESTROYED\n"),
    (p.Error(p.Code.LOCKED, "another request holds it"), b"ERR LOCKED another request holds it\n"),
    (p.Error(p.Code.BAD_FRAME, "closing"), b"ERR BAD_FRAME closing\n"),
    (p.Error(p.Code.INTERNAL, ""), b"ERR INTERNAL \n"),
]


@pytest.mark.parametrize(("reply", "wire"), REPLIES)
def test_encode_reply(reply: p.Reply, wire: bytes) -> None:
    assert p.encode_reply(reply) == wire


def test_error_sentence_stays_one_printable_line() -> None:
    wire = p.encode_reply(p.Error(p.Code.BAD_ID, "bad\nid\x00\xe9\x7f\r!"))
    assert wire == b"ERR BAD_ID bad?id????!\n"


@pytest.mark.parametrize("code", list(p.Code))
def test_every_error_code_round_trips(code: p.Code) -> None:
    reply = p.Error(code, "what went wrong and what to do")
    parser = p.ReplyParser()
    parser.receive_data(p.encode_reply(reply))
    assert parser.next_reply() == reply
    assert parser.next_reply() is p.NEED_DATA


def test_fatal_codes_are_those_of_section_9() -> None:
    fatal = {code for code in p.Code if p.Error(code, "").fatal}
    assert fatal == {
        p.Code.BAD_FRAME,
        p.Code.HEADER_TOO_LONG,
        p.Code.BUSY,
        p.Code.SHUTTING_DOWN,
        p.Code.INTERNAL,
    }


def parse_replies(wire: bytes, bytewise: bool) -> list[p.Reply]:
    chunks = [wire[i : i + 1] for i in range(len(wire))] if bytewise else [wire]
    return replies_from(chunks)


def replies_from(chunks: list[bytes]) -> list[p.Reply]:
    """Every reply in a stream fed to one ReplyParser chunk by chunk."""
    parser = p.ReplyParser()
    replies: list[p.Reply] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while True:
            reply = parser.next_reply()
            if reply is p.NEED_DATA:
                break
            assert not isinstance(reply, p._NeedData)
            replies.append(reply)
    return replies


@pytest.mark.parametrize(("reply", "wire"), REPLIES)
@pytest.mark.parametrize("bytewise", [False, True])
def test_reply_parser_round_trip(reply: p.Reply, wire: bytes, bytewise: bool) -> None:
    assert parse_replies(wire + b"OK 1\n", bytewise) == [reply, p.Ok(("1",))]


def test_reply_parser_pipelined() -> None:
    wire = b"".join(w for _, w in REPLIES)
    expected = [r for r, _ in REPLIES]
    assert parse_replies(wire, False) == expected
    assert parse_replies(wire, True) == expected


@pytest.mark.parametrize(
    "wire",
    [
        b"HELLO 1\n",
        b"ok\n",
        b"MISS x\n",
        b"MISS DESTROYED x\n",
        b"MISS destroyed\n",
        b"ERR NO_SUCH_CODE sentence\n",
        b"ERR\n",
        b"DATA\n",
        b"DATA x\n",
        b"DATA -1\n",
        b"DATA 99999999999\n",  # over max_payload_bytes below
        b"X" * (p.MAX_HEADER_BYTES + 1),
    ],
)
def test_reply_parser_rejects_non_replies(wire: bytes) -> None:
    parser = p.ReplyParser(max_payload_bytes=1 << 20)
    parser.receive_data(wire)
    with pytest.raises(p.ReplyError):
        parser.next_reply()


def test_a_huge_numeric_write_length_is_too_large_not_a_framing_error() -> None:
    parser = p.RequestParser(max_session_bytes=100)
    parser.receive_data(b"WRITE s1 60 " + b"9" * 30 + b"\n")
    event = parser.next_event()
    assert isinstance(event, p.RequestError) and event.code is p.Code.TOO_LARGE
    assert not parser.broken


# ---------------------------------------------------------------- peer counters (CLUSTER.md §11.4)

_COPY = p.MAX_COPY_COUNTER
_START = p.MAX_START_COUNTER


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        # A copy's counters (REPL, REPLDEL): up to MAX_COPY_COUNTER, room
        # left for the takeovers and writes that carry them on.
        (f"REPL s1-a-b a {_COPY} {_COPY} 60 1\nx".encode(),
         p.ReplPut("s1-a-b", "a", _COPY, _COPY, 60, b"x")),
        (f"REPLDEL s1-a-b a {_COPY} {_COPY}\n".encode(),
         p.ReplDelete("s1-a-b", "a", _COPY, _COPY)),
        # What the receiver masters from (HANDOFF): up to MAX_START_COUNTER,
        # so that its writes' REPLs stay within the copy's bound.
        (f"HANDOFF s1-a-b {_START} {_START} 60 1\nx".encode(),
         p.Handoff("s1-a-b", _START, _START, 60, b"x")),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_peer_counters_up_to_their_bound_are_taken(
    wire: bytes, expected: p.Request, bytewise: bool
) -> None:
    parser = p.RequestParser(MAX, peer=True)
    events: list[p.Event] = []
    for chunk in [wire[i : i + 1] for i in range(len(wire))] if bytewise else [wire]:
        parser.receive_data(chunk)
        events += drain(parser)
    assert events == [expected]


@pytest.mark.parametrize(
    "wire",
    [
        f"REPL s1-a-b a {_COPY + 1} 1 60 1\nx".encode(),
        f"REPL s1-a-b a 1 {_COPY + 1} 60 1\nx".encode(),
        f"REPL s1-a-b a 1 {p.MAX_COUNTER} 60 1\nx".encode(),
        f"REPLDEL s1-a-b a {_COPY + 1} 1\n".encode(),
        f"REPLDEL s1-a-b a 1 {_COPY + 1}\n".encode(),
        f"HANDOFF s1-a-b {_START + 1} 1 60 1\nx".encode(),
        f"HANDOFF s1-a-b 1 {_START + 1} 60 1\nx".encode(),
        f"HANDOFF s1-a-b {p.MAX_COUNTER} {p.MAX_COUNTER} 600 1\nx".encode(),
    ],
)
def test_peer_counters_past_their_bound_are_bad_requests(wire: bytes) -> None:
    # Taken, the session's next write had a version no REPL may carry: the
    # backup refused it, the client got UNAVAILABLE, a drain lost it.
    parser = p.RequestParser(MAX, peer=True)
    parser.receive_data(wire + b"PING\n")
    event = parser.next_event()
    assert isinstance(event, p.RequestError) and event.code is p.Code.BAD_REQUEST, event
    assert "must be 0-" in event.message
    assert parser.next_event() == p.Ping()  # the payload was read and dropped


def test_the_counter_bounds_leave_headroom_within_the_wire_format() -> None:
    assert _START + p.COUNTER_HEADROOM == _COPY
    assert _COPY + p.COUNTER_HEADROOM == p.MAX_COUNTER == 10**18 - 1
