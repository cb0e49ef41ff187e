"""Decoding of PHP session blobs (phpsess/decode.py), table-driven.  The
blobs are what PHP 8.2's session_encode() writes (checked by hand with real
php; tests/integration/test_admin.py checks it against a live php again)."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from typing import Any

import phpserialize  # type: ignore[import-untyped]
import pytest

from phpsess import decode
from phpsess.decode import DecodeError, decode_session

CART = (
    b'O:4:"Cart":3:{s:11:"\0Cart\0items";a:1:{i:0;s:4:"book";}'
    b's:4:"\0*\0p";d:1.5;s:4:"self";r:%d;}'
)
CART_JSON = {
    "__class__": "Cart",
    "items [private Cart]": ["book"],
    "p [protected]": 1.5,
    "self": {"__ref__": '$["cart"]'},
}
SHARED_JSON = {
    "cart": CART_JSON,
    "a": {"x": 1},
    "b": {"__ref__": '$["a"]'},
    "c": {"__ref__": '$["cart"]'},
}

# (format, blob, expected)
CASES: list[tuple[str, bytes, dict[str, Any]]] = [
    ("php", b"", {}),
    ("php_serialize", b"", {}),
    ("php", b'a|i:1;s|s:3:"x|y";', {"a": 1, "s": "x|y"}),
    ("php_binary", b'\x01ai:1;\x01ss:3:"x|y";', {"a": 1, "s": "x|y"}),
    ("php_serialize", b'a:2:{s:1:"a";i:1;s:1:"s";s:3:"x|y";}', {"a": 1, "s": "x|y"}),
    # Every scalar.
    ("php", b"n|N;t|b:1;f|b:0;i|i:-42;d|d:0.1;e|d:1.0E+25;z|d:-0;",
     {"n": None, "t": True, "f": False, "i": -42, "d": 0.1, "e": 1e25, "z": -0.0}),
    ("php", b"p|d:INF;m|d:-INF;q|d:NAN;",
     {"p": {"__float__": "INF"}, "m": {"__float__": "-INF"}, "q": {"__float__": "NAN"}}),
    # Binary strings: NUL bytes stay text when UTF-8, others become hex.
    ("php", b's|s:3:"a\0b";', {"s": "a\0b"}),
    ("php", b'bin|s:9:"\0\x01\xff|;:"\n\r";', {"bin": {"__bytes_hex__": "0001ff7c3b3a220a0d"}}),
    ("php", 'u|s:6:"h\u00e9llo";'.encode(), {"u": "h\u00e9llo"}),
    # Nested arrays: lists when keyed 0..n-1 in order, objects otherwise.
    ("php_serialize",
     b'a:1:{s:1:"m";a:3:{i:0;a:0:{}i:1;a:1:{i:5;s:1:"x";}i:2;a:2:{i:1;i:1;i:0;i:0;}}}',
     {"m": [[], {"5": "x"}, {"1": 1, "0": 0}]}),
    # Objects (private, protected, public properties) and references: r: to
    # the same object (also itself), R: to a PHP reference (&$shared).
    ("php", b"cart|" + CART % 1 + b'a|a:1:{s:1:"x";i:1;}b|R:6;c|r:1;', SHARED_JSON),
    ("php_binary",
     b"\x04cart" + CART % 1 + b'\x01aa:1:{s:1:"x";i:1;}\x01bR:6;\x01cr:1;', SHARED_JSON),
    ("php_serialize",
     b'a:4:{s:4:"cart";' + CART % 2 + b's:1:"a";a:1:{s:1:"x";i:1;}s:1:"b";R:7;s:1:"c";r:2;}',
     SHARED_JSON),
    # References deep inside: the path names where the target lives.
    ("php_serialize", b'a:2:{s:1:"l";a:2:{i:0;s:1:"v";i:1;R:3;}s:1:"o";R:2;}',
     {"l": ["v", {"__ref__": '$["l"][0]'}], "o": {"__ref__": '$["l"]'}}),
    # An undefined key in php_binary (length byte with bit 7 set) has no value.
    ("php_binary", b'\x81x\x01ai:1;', {"a": 1}),
    # Enum cases, Serializable (C:) objects, __serialize() objects.
    ("php", b'e|E:6:"Suit:H";', {"e": {"__enum__": "Suit::H"}}),
    ("php", b'c|C:3:"Foo":5:{hello}', {"c": {"__class__": "Foo", "__serialized__": "hello"}}),
    ("php", b'ao|O:11:"ArrayObject":2:{i:0;i:0;i:1;a:1:{i:0;i:1;}}',
     {"ao": {"__class__": "ArrayObject", "0": 0, "1": [1]}}),
]


@pytest.mark.parametrize(("fmt", "blob", "expected"), CASES)
def test_decode(fmt: str, blob: bytes, expected: dict[str, Any]) -> None:
    assert decode_session(blob, fmt) == (fmt, expected)


@pytest.mark.parametrize(("fmt", "blob", "expected"), [c for c in CASES if c[1]])
def test_auto_finds_the_format(fmt: str, blob: bytes, expected: dict[str, Any]) -> None:
    assert decode_session(blob) == (fmt, expected)


MALFORMED: list[tuple[str, bytes, str]] = [
    ("php", b"a|i:1", "php: at byte 4: expected an integer ending in ';'"),
    ("php", b"a|i:x;", "php: at byte 4: expected an integer (digits)"),
    ("php", b"a|i:1;junk", "php: at byte 6: expected a key ending in '|'"),
    ("php", b'a|s:10:"short";', "runs past the end of the data"),
    ("php", b'a|s:1:"xy";', "expected '\"'"),
    ("php", b"a|b:2;", "expected a boolean 0 or 1"),
    ("php", b"a|Q:1;", "expected a value"),
    ("php", b"a|R:1;", "a reference to value 1, but only 0 precede it"),
    ("php", b"a|a:1:{i:0;r:2;}", "a reference to value 2, but only 1 precede it"),
    ("php", b"a|a:2:{i:0;i:1;}", "expected an array key"),
    ("php", b"a|a:1:{i:0;i:1;", "expected '}'"),
    ("php_serialize", b"i:1;", "php_serialize: at byte 0: expected an array (a:)"),
    ("php_serialize", b"a:0:{}x", "1 bytes after the end of the array"),
    ("php_binary", b"\x09ab", "a key of 9 bytes runs past the end"),
    ("php", b"a|" + b"a:1:{i:0;" * 300 + b"N;" + b"}" * 300, "nesting deeper than"),
]


@pytest.mark.parametrize(("fmt", "blob", "message"), MALFORMED)
def test_malformed_is_a_clear_error(fmt: str, blob: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_session(blob, fmt)
    assert message in str(info.value)


def test_auto_names_every_failure() -> None:
    with pytest.raises(DecodeError) as info:
        decode_session(b"\xff\xfe garbage")
    text = str(info.value)
    assert "not a PHP session in any serialize format" in text
    for fmt in decode.FORMATS:
        assert f"{fmt}: at byte" in text


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        decode_session(b"", "json")


@pytest.mark.parametrize(("fmt", "blob", "expected"), [c for c in CASES if c[1]])
def test_every_prefix_of_a_blob_fails_cleanly(
    fmt: str, blob: bytes, expected: dict[str, Any]
) -> None:
    # Truncated data (a torn export, a wrong --format) never raises anything
    # but DecodeError, whatever the cut.  php_binary cut between two entries
    # is a valid shorter session, as in PHP.
    for cut in range(1, len(blob)):
        with contextlib.suppress(DecodeError):
            decode_session(blob[:cut], fmt)


# -- cross-check with the phpserialize library where it applies (it knows no
# references, enums or C: objects)

def _from_phpserialize(value: Any) -> Any:
    if isinstance(value, bytes):
        return decode.render_bytes(value)
    if isinstance(value, float):
        return value
    if isinstance(value, phpserialize.phpobject):
        out = {"__class__": value.__name__.decode()}
        for key, v in value.__php_vars__.items():
            name = decode.property_name(key) if isinstance(key, bytes) else str(key)
            out[name] = _from_phpserialize(v)
        return out
    if isinstance(value, dict):
        keys = list(value)
        if keys == list(range(len(keys))):
            return [_from_phpserialize(v) for v in value.values()]
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): _from_phpserialize(v)
            for k, v in value.items()
        }
    return value


@pytest.mark.parametrize("blob", [
    c[1] for c in CASES
    if c[0] == "php_serialize" and c[1] and b"R:" not in c[1] and b"r:" not in c[1]
] + [
    b'a:3:{s:1:"o";O:3:"Foo":2:{s:6:"\0Foo\0a";i:1;s:4:"\0*\0b";a:0:{}}'
    b's:1:"b";s:3:"\0\xff\0";i:7;d:2.5;}',
])
def test_agrees_with_phpserialize(blob: bytes) -> None:
    want = _from_phpserialize(phpserialize.loads(blob, object_hook=phpserialize.phpobject))
    assert decode_session(blob, "php_serialize")[1] == want


def test_decode_is_pure() -> None:
    """STYLE.md §1: no I/O modules."""
    tree = ast.parse(Path(decode.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    }
    assert imported <= {"__future__", "math", "collections", "typing"}, imported
