"""Authentication of peer traffic (CLUSTER.md §4): signed heartbeats and the
challenge-response handshake."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phpsess.membership import MAX_PEERS, Heartbeat
from phpsess.peerauth import (
    HEARTBEAT_MAGIC,
    MAX_DATAGRAM_BYTES,
    MIN_SECRET_BYTES,
    AuthError,
    ReplayGuard,
    accept_line,
    auth_line,
    challenge_line,
    check_secret,
    decode_heartbeat,
    decode_heartbeat_sent,
    encode_heartbeat,
    new_challenge,
    next_heartbeat_ms,
    parse_accept_line,
    parse_auth_line,
    parse_challenge_line,
    proof,
    verify_proof,
)

SECRET = b"0123456789abcdef-secret"
OTHER = b"0123456789abcdef-wrong!"
NOW = 1_700_000_000.0
HB = Heartbeat("web1", 123456789, 40, 7, False, (("web2", 5), ("web3", 2**63 - 1)))


def sign(body: object, secret: bytes = SECRET, raw: bytes | None = None) -> bytes:
    """A correctly signed datagram around an arbitrary (possibly bad) payload."""
    payload = HEARTBEAT_MAGIC + (
        raw if raw is not None else json.dumps(body, separators=(",", ":")).encode()
    )
    return payload + hmac.new(secret, payload, hashlib.sha256).digest()


def body(**changes: object) -> dict[str, object]:
    result: dict[str, object] = {
        "n": "web1",
        "i": 1,
        "s": 0,
        "k": 0,
        "d": False,
        "x": [],
        "h": [],
        "t": int(NOW * 1000),
    }
    result.update(changes)
    return result


# -- secrets


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"x" * 16, b"x" * 16),
        (b"x" * 16 + b"\n", b"x" * 16),
        (b"x" * 16 + b" \r\n\t\n", b"x" * 16),
        (b"  " + b"x" * 16, b"  " + b"x" * 16),  # only trailing whitespace goes
    ],
)
def test_check_secret(raw: bytes, expected: bytes) -> None:
    assert check_secret(raw) == expected


@pytest.mark.parametrize("raw", [b"", b"x" * 15, b"x" * 15 + b"\n\n", b" " * 40])
def test_check_secret_too_short(raw: bytes) -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_SECRET_BYTES}") as info:
        check_secret(raw)
    assert "xxxxxxxx" not in str(info.value)


def test_short_secret_is_refused_everywhere() -> None:
    with pytest.raises(ValueError):
        encode_heartbeat(HB, b"short", NOW)
    with pytest.raises(ValueError):
        decode_heartbeat(encode_heartbeat(HB, SECRET, NOW), b"short", NOW)
    with pytest.raises(ValueError):
        proof(b"short", new_challenge(), "web1")


# -- heartbeats


def test_round_trip() -> None:
    datagram = encode_heartbeat(HB, SECRET, NOW)
    assert datagram.startswith(HEARTBEAT_MAGIC)
    assert decode_heartbeat(datagram, SECRET, NOW + 1.0) == HB
    assert len(datagram) < 400


def test_worst_case_size_fits_a_datagram() -> None:
    big = 2**63 - 1
    dead = tuple((f"{i:016d}", big) for i in range(MAX_PEERS))
    worst = Heartbeat("x" * 16, big, big, big, False, dead)
    datagram = encode_heartbeat(worst, SECRET, 9_000_000_000_000.0)
    assert len(datagram) <= MAX_DATAGRAM_BYTES
    assert decode_heartbeat(datagram, SECRET, 9_000_000_000_000.0) == worst
    five = Heartbeat("x" * 16, big, big, big, True, dead[:4])
    assert len(encode_heartbeat(five, SECRET, NOW)) < 1400 // 2


def test_wrong_secret() -> None:
    with pytest.raises(AuthError, match="HMAC") as info:
        decode_heartbeat(encode_heartbeat(HB, OTHER, NOW), SECRET, NOW)
    assert SECRET.decode() not in str(info.value)
    assert OTHER.decode() not in str(info.value)


@pytest.mark.parametrize(
    ("sent", "received", "ok"),
    [
        (NOW, NOW, True),
        (NOW, NOW + 29.9, True),
        (NOW, NOW - 29.9, True),
        (NOW, NOW + 30.1, False),  # stale (or replayed)
        (NOW, NOW - 30.1, False),  # from the future
        (0.0, NOW, False),
    ],
)
def test_timestamp_window(sent: float, received: float, ok: bool) -> None:
    datagram = encode_heartbeat(HB, SECRET, sent)
    if ok:
        assert decode_heartbeat(datagram, SECRET, received) == HB
    else:
        with pytest.raises(AuthError, match="timestamp"):
            decode_heartbeat(datagram, SECRET, received)


def test_a_replayed_or_late_heartbeat_is_refused_and_a_restart_is_not() -> None:
    guard = ReplayGuard()
    first = encode_heartbeat(HB, SECRET, NOW)
    hb, sent_ms = decode_heartbeat_sent(first, SECRET, NOW)
    assert (hb, sent_ms) == (HB, NOW * 1000)
    assert guard.fresh(hb.name, sent_ms)
    assert not guard.fresh(hb.name, sent_ms)  # the same datagram again
    assert guard.fresh("web2", sent_ms)  # senders are tracked apart
    later = decode_heartbeat_sent(encode_heartbeat(HB, SECRET, NOW + 0.5), SECRET, NOW + 1)
    assert guard.fresh(HB.name, later[1])
    assert not guard.fresh(HB.name, sent_ms)  # an older one, replayed or late
    # A restart is a new incarnation whose clock has moved on.
    restarted = attrs.evolve(HB, incarnation=HB.incarnation + 1)
    again = decode_heartbeat_sent(encode_heartbeat(restarted, SECRET, NOW + 9), SECRET, NOW + 9)
    assert guard.fresh(again[0].name, again[1])


def test_a_senders_timestamps_increase_even_if_its_clock_steps_back() -> None:
    first = next_heartbeat_ms(NOW, 0)
    assert first == NOW * 1000
    assert next_heartbeat_ms(NOW - 5, first) == first + 1
    assert next_heartbeat_ms(NOW + 0.5, first + 1) == first + 500
    decoded = decode_heartbeat_sent(encode_heartbeat(HB, SECRET, (first + 1) / 1000), SECRET, NOW)
    assert decoded[1] == first + 1  # survives the float round trip


def test_max_skew_is_a_parameter() -> None:
    datagram = encode_heartbeat(HB, SECRET, NOW)
    with pytest.raises(AuthError):
        decode_heartbeat(datagram, SECRET, NOW + 2.0, max_skew_s=1.0)


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"x" * 31,
        b"x" * 44,
        b"x" * (MAX_DATAGRAM_BYTES + 1),
        sign(body(), raw=b"")[len(HEARTBEAT_MAGIC) :],  # no magic (and so a bad tag)
        sign(None, raw=b"{"),
        sign(None, raw=b"\xff{}"),
        sign(None, raw=b'{"n":"web1","n":"web1"}'),
        sign(None, raw=b"[" * 600 + b"]" * 600),
        sign(None, raw=b"NaN"),
        sign([]),
        sign("web1"),
        sign(body(t=NOW * 1000)),  # a float
        sign(body(t=None)),
        sign(body(t=-1)),
        sign(body(n="web-1")),
        sign(body(n="")),
        sign(body(n=1)),
        sign(body(n="é")),
        sign(body(i=0)),
        sign(body(i=2**63)),
        sign(body(i=True)),
        sign(body(i="1")),
        sign(body(s=-1)),
        sign(body(k=2**64)),
        sign(body(d=1)),
        sign(body(d="false")),
        sign(body(x={})),
        sign(body(x=[["b", 1, 2]])),
        sign(body(x=[["b", 0]])),
        sign(body(x=["b"])),
        sign(body(x=[[1, 1]])),
        sign(body(x=[["c", 1], ["b", 1]])),
        sign(body(x=[["b", 1], ["b", 2]])),
        sign(body(x=[[f"n{i}", 1] for i in range(MAX_PEERS + 1)])),
        sign(body(h={})),
        sign(body(h=[1])),
        sign(body(h=["web-1"])),
        sign(body(h=["c", "b"])),
        sign(body(h=["b", "b"])),
        sign(body(h=[f"n{i:02d}" for i in range(MAX_PEERS + 1)])),
        sign({k: v for k, v in body().items() if k != "h"}),
        sign(body(extra=1)),
        sign({k: v for k, v in body().items() if k != "d"}),
        sign(body(), secret=OTHER),
    ],
)
def test_malformed_datagrams(datagram: bytes) -> None:
    with pytest.raises(AuthError):
        decode_heartbeat(datagram, SECRET, NOW)


def test_signed_body_helper_is_accepted() -> None:
    """The table above fails for the reason it names, not for the helper."""
    assert decode_heartbeat(
        sign(body(x=[["b", 1], ["c", 2]], h=["a", "d"])), SECRET, NOW
    ) == Heartbeat("web1", 1, 0, 0, False, (("b", 1), ("c", 2)), ("a", "d"))


names = st.from_regex(r"[A-Za-z0-9]{1,16}", fullmatch=True)
incarnations = st.integers(1, 2**63 - 1)
counts = st.integers(0, 2**63 - 1)
heartbeats = st.builds(
    Heartbeat,
    name=names,
    incarnation=incarnations,
    sessions=counts,
    sockets=counts,
    draining=st.booleans(),
    dead=st.dictionaries(names, incarnations, max_size=MAX_PEERS).map(
        lambda d: tuple(sorted(d.items()))
    ),
    hears=st.sets(names, max_size=MAX_PEERS).map(lambda s: tuple(sorted(s))),
)
wall_clocks = st.floats(0.0, 4_000_000_000.0)


@given(heartbeats, wall_clocks)
def test_round_trip_property(hb: Heartbeat, now: float) -> None:
    datagram = encode_heartbeat(hb, SECRET, now)
    assert len(datagram) <= MAX_DATAGRAM_BYTES
    decoded = decode_heartbeat(datagram, SECRET, now)
    # Whom it hears is left out only when the datagram would be too large.
    assert decoded in (hb, attrs.evolve(hb, hears=()))
    if decoded != hb:
        assert len(encode_heartbeat(attrs.evolve(hb, hears=()), SECRET, now)) > 1000


@given(heartbeats, st.data())
def test_tampering_any_byte_fails(hb: Heartbeat, data: st.DataObject) -> None:
    datagram = bytearray(encode_heartbeat(hb, SECRET, NOW))
    index = data.draw(st.integers(0, len(datagram) - 1))
    datagram[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(AuthError):
        decode_heartbeat(bytes(datagram), SECRET, NOW)


@given(heartbeats, st.integers(1, 40))
def test_truncation_or_extension_fails(hb: Heartbeat, n: int) -> None:
    datagram = encode_heartbeat(hb, SECRET, NOW)
    for bad in (datagram[:-n], datagram + b"\x00" * n, datagram[n:]):
        with pytest.raises(AuthError):
            decode_heartbeat(bad, SECRET, NOW)


@given(st.binary(max_size=2000), wall_clocks)
def test_arbitrary_bytes_only_raise_auth_or_value_error(datagram: bytes, now: float) -> None:
    with contextlib.suppress(AuthError, ValueError):
        decode_heartbeat(datagram, SECRET, now)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.sampled_from(["n", "i", "s", "k", "d", "x", "t", "z"]), children)
        ),
    )
)
def test_arbitrary_signed_json_only_raises_auth_error(value: object) -> None:
    """A peer holding the secret that lies still gets only AuthError."""
    datagram = sign(value)
    if len(datagram) > MAX_DATAGRAM_BYTES:
        return
    with contextlib.suppress(AuthError):
        decode_heartbeat(datagram, SECRET, NOW)


# -- handshake


def test_new_challenge() -> None:
    a, b = new_challenge(), new_challenge()
    assert len(a) == len(b) == 32
    assert a != b


def test_proof_is_hmac_of_challenge_and_name() -> None:
    challenge = bytes(range(32))
    expected = hmac.new(SECRET, challenge + b"web1", hashlib.sha256).digest()
    assert proof(SECRET, challenge, "web1") == expected
    verify_proof(SECRET, challenge, "web1", expected)


@pytest.mark.parametrize(
    ("secret", "challenge", "name"),
    [
        (OTHER, bytes(range(32)), "web1"),
        (SECRET, bytes(32), "web1"),
        (SECRET, bytes(range(32)), "web2"),
    ],
)
def test_verify_proof_rejects(secret: bytes, challenge: bytes, name: str) -> None:
    tag = proof(secret, challenge, name)
    with pytest.raises(AuthError) as info:
        verify_proof(SECRET, bytes(range(32)), "web1", tag)
    assert tag.hex() not in str(info.value)
    with pytest.raises(AuthError):
        verify_proof(SECRET, bytes(range(32)), "web1", tag[:16])


def test_full_handshake() -> None:
    # listener "web1", connector "web2"
    c1 = new_challenge()
    line1 = challenge_line(c1)
    assert line1 == b"CHALLENGE " + c1.hex().encode() + b"\n"
    got_c1 = parse_challenge_line(line1)
    assert got_c1 == c1
    c2 = new_challenge()
    line2 = auth_line("web2", 77, got_c1, SECRET, c2)
    assert line2.startswith(b"AUTH web2 77 ") and line2.endswith(b"\n")
    name, incarnation, tag, their_challenge = parse_auth_line(line2)
    assert (name, incarnation, their_challenge) == ("web2", 77, c2)
    verify_proof(SECRET, c1, name, tag)
    line3 = accept_line("web1", their_challenge, SECRET)
    assert line3.startswith(b"ACCEPT web1 ")
    listener, tag3 = parse_accept_line(line3)
    assert listener == "web1"
    verify_proof(SECRET, c2, "web1", tag3)
    for line in (line1, line2, line3):
        assert len(line) <= 1024
        assert all(0x21 <= b <= 0x7E or b == 0x20 for b in line[:-1])


def test_handshake_with_wrong_secret_fails() -> None:
    c1 = new_challenge()
    _, _, tag, c2 = parse_auth_line(auth_line("web2", 1, c1, OTHER, new_challenge()))
    with pytest.raises(AuthError):
        verify_proof(SECRET, c1, "web2", tag)
    _, tag3 = parse_accept_line(accept_line("web1", c2, OTHER))
    with pytest.raises(AuthError):
        verify_proof(SECRET, c2, "web1", tag3)


def test_lines_parse_without_newline() -> None:
    c = bytes(range(32))
    assert parse_challenge_line(challenge_line(c).rstrip(b"\n")) == c


HEX = "ab" * 32


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"CHALLENGE\n",
        b"CHALLENGE " + HEX[:-2].encode() + b"\n",
        b"CHALLENGE " + HEX.upper().encode() + b"\n",
        b"CHALLENGE " + HEX.encode() + b" \n",
        b"CHALLENGE  " + HEX.encode() + b"\n",
        b"CHALLENGE " + HEX.encode() + b"\r\n",
        b"CHALLENGE " + HEX.encode() + b"\n\n",
        b"challenge " + HEX.encode() + b"\n",
        b"CHALLENGE " + ("a b" + HEX[3:]).encode() + b"\n",  # fromhex would skip the space
    ],
)
def test_bad_challenge_lines(line: bytes) -> None:
    with pytest.raises(AuthError):
        parse_challenge_line(line)


@pytest.mark.parametrize(
    "line",
    [
        f"AUTH web2 1 {HEX}\n",
        f"AUTH web2 1 {HEX} {HEX} x\n",
        f"AUTH web-2 1 {HEX} {HEX}\n",
        f"AUTH {'w' * 17} 1 {HEX} {HEX}\n",
        f"AUTH web2 0 {HEX} {HEX}\n",
        f"AUTH web2 01 {HEX} {HEX}\n",
        f"AUTH web2 -1 {HEX} {HEX}\n",
        f"AUTH web2 {2**63} {HEX} {HEX}\n",
        f"AUTH web2 99999999999999999999 {HEX} {HEX}\n",
        f"AUTH web2 1 {HEX[:-1]} {HEX}\n",
        f"AUTH web2 1 {HEX} {HEX}g\n",
        f"ACCEPT web2 {HEX}\n",
    ],
)
def test_bad_auth_lines(line: str) -> None:
    with pytest.raises(AuthError):
        parse_auth_line(line.encode())


def test_a_malformed_line_is_shown_in_hex_not_as_text() -> None:
    # Its bytes come from whoever connected: as text, "key=value" words in
    # them read as fields of the log line that quotes the error.
    line = b"AUTH x event=peer_dead peer=n2 level=error msg=forged\n"
    with pytest.raises(AuthError) as caught:
        parse_auth_line(line)
    message = str(caught.value)
    assert "=" not in message and line[:40].hex() in message


def test_auth_line_bounds() -> None:
    assert parse_auth_line(f"AUTH web2 {2**63 - 1} {HEX} {HEX}\n".encode())[1] == 2**63 - 1


@pytest.mark.parametrize(
    "line",
    ["ACCEPT web1\n", f"ACCEPT web1 {HEX} x\n", f"ACCEPT web_1 {HEX}\n", f"AUTH web1 {HEX}\n"],
)
def test_bad_accept_lines(line: str) -> None:
    with pytest.raises(AuthError):
        parse_accept_line(line.encode())


@given(st.binary(max_size=300))
def test_arbitrary_lines_only_raise_auth_error(line: bytes) -> None:
    for parse in (parse_challenge_line, parse_auth_line, parse_accept_line):
        with contextlib.suppress(AuthError):
            parse(line)


@pytest.mark.parametrize(
    "call",
    [
        lambda: challenge_line(b"short"),
        lambda: auth_line("web-2", 1, bytes(32), SECRET, bytes(32)),
        lambda: auth_line("web2", 0, bytes(32), SECRET, bytes(32)),
        lambda: auth_line("web2", 1, bytes(31), SECRET, bytes(32)),
        lambda: auth_line("web2", 1, bytes(32), SECRET, bytes(33)),
        lambda: accept_line("", bytes(32), SECRET),
        lambda: proof(SECRET, bytes(32), "a b"),
    ],
)
def test_our_own_bad_arguments_are_value_errors(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]
