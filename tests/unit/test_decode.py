"""Decoding of PHP session blobs (phpsess/decode.py), table-driven.  The
blobs are what PHP 8.2's session_encode() writes (checked by hand with real
php; tests/integration/test_admin.py checks it against a live php again)."""

from __future__ import annotations

import ast
import contextlib
import subprocess
import sys
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
    # Names: a byte that is not UTF-8 and the text \xff differ ($k[$_GET["k"]]);
    # a backslash stays as it is where no \x makes it ambiguous.
    ("php_serialize", b'a:1:{s:5:"prefs";a:3:{s:1:"\xff";s:1:"h";s:4:"\\xff";s:1:"d";'
     b's:4:"\\\xffxy";s:1:"e";}}',
     {"prefs": {"\\xff": "h", "\\\\xff": "d", "\\\\\\xffxy": "e"}}),
    ("php", b'o|O:7:"App\\Foo":1:{s:10:"\0App\\Foo\0a";E:7:"App\\x:\xff";}',
     {"o": {"__class__": "App\\Foo",
            "a [private App\\Foo]": {"__enum__": "App\\\\x::\\xff"}}}),
    # A repeated name is made unique, never overwriting a value or the class
    # ((object) $userArray with a key __class__); a reference names it so.
    ("php", b'o|O:8:"stdClass":2:{s:9:"__class__";s:9:"App\\Admin";s:4:"role";s:1:"u";}',
     {"o": {"__class__": "stdClass", "__class__ [#2]": "App\\Admin", "role": "u"}}),
    ("php", b'o|O:1:"A":2:{s:4:"\0*\0x";i:1;s:13:"x [protected]";i:2;}',
     {"o": {"__class__": "A", "x [protected]": 1, "x [protected] [#2]": 2}}),
    ("php_serialize",
     b'a:5:{s:1:"a";i:1;s:6:"a [#2]";i:2;s:1:"a";i:3;i:7;i:4;s:1:"7";R:4;}',
     {"a": 1, "a [#2]": 2, "a [#3]": 3, "7": 4, "7 [#2]": {"__ref__": '$["a [#3]"]'}}),
    ("php", b"a|i:1;a|i:2;r|R:2;", {"a": 1, "a [#2]": 2, "r": {"__ref__": '$["a [#2]"]'}}),
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
    # More digits than PHP writes (int() refuses over 4300 with a ValueError).
    ("php", b"a|i:-" + b"9" * 5000 + b";", "expected an integer of at most 20 digits"),
    ("php", b"a|s:" + b"9" * 5000 + b':"x";', "expected a string length of at most 20"),
    ("php", b"a|a:" + b"9" * 5000 + b":{}", "expected an element count of at most 20"),
    ("php", b"a|a:1:{i:" + b"9" * 5000 + b";N;}", "expected an integer key of at most 20"),
    ("php", b"a|R:" + b"1" * 5000 + b";", "expected a reference number of at most 20"),
    ("php", b"a|C:1:\"C\":" + b"1" * 5000 + b":{}", "expected a payload length of at most 20"),
]


@pytest.mark.parametrize(("fmt", "blob", "message"), MALFORMED)
def test_malformed_is_a_clear_error(fmt: str, blob: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_session(blob, fmt)
    assert message in str(info.value)


def test_integers_have_at_most_20_digits() -> None:
    # PHP's extremes decode; one digit more than PHP writes does not.
    blob = b"n|a:2:{i:-9223372036854775808;i:-9223372036854775808;i:1;i:9223372036854775807;}"
    assert decode_session(blob, "php")[1] == {
        "n": {"-9223372036854775808": -9223372036854775808, "1": 9223372036854775807}
    }
    with pytest.raises(DecodeError, match="expected an integer of at most 20 digits"):
        decode_session(b"a|i:123456789012345678901;", "php")


def test_reference_paths_are_cut() -> None:
    # A path longer than MAX_PATH_CHARS ends in "…" after that many.
    key = b"k" * 300
    blob = b'x|a:2:{s:300:"%s";a:1:{s:1:"y";i:1;}i:0;R:3;}' % key
    cut = '$["x"]["' + "k" * (decode.MAX_PATH_CHARS - 8) + "…"
    assert decode_session(blob, "php")[1] == {
        "x": {"k" * 300: {"y": 1}, "0": {"__ref__": cut}}
    }
    # Short paths are whole, in objects too.
    blob = b'o|O:1:"A":2:{s:5:"a b c";a:1:{i:0;O:1:"B":1:{s:1:"p";i:1;}}s:1:"r";R:4;}'
    assert decode_session(blob, "php")[1] == {"o": {
        "__class__": "A",
        "a b c": [{"__class__": "B", "p": 1}],
        "r": {"__ref__": '$["o"]->{"a b c"}[0]->p'},
    }}


DEEP_PATHS = r"""
import resource, sys, tracemalloc
from phpsess.decode import decode_session
levels, keylen, n = 150, 1000, 8000
key = b"k" * keylen
inner = b"".join(b"i:%d;N;" % i for i in range(n))
inner += b"".join(b"i:%d;R:%d;" % (n + i, levels + 2 + i) for i in range(n))
blob = b"a:%d:{%s}" % (2 * n, inner)
for _ in range(levels):
    blob = b'a:1:{s:%d:"%s";%s}' % (keylen, key, blob)
blob = b"x|" + blob
# 256 MiB more address space than now (the old decoder wanted over 1 GB)
limit = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize() + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
tracemalloc.start()
fmt, data = decode_session(blob, "php")
print(len(blob), tracemalloc.get_traced_memory()[1])
for _ in range(levels + 1):
    data = data["x"] if "x" in data else data["k" * keylen]
# Paths cut at MAX_PATH_CHARS (200): $["x"][" and 192 k.
assert data[n] == data[2 * n - 1] == {"__ref__": '$["x"]["' + "k" * 192 + "…"}, data[n]
"""


def test_memory_stays_proportional_to_the_session() -> None:
    # An API app storing json_decode($body, true): deep objects with long
    # keys, many values under them, references to them.  A path per value
    # took ~150 KB each (over 1 GB for this 340 KB session); the decoder now
    # needs memory of the order of the session's size (address space capped).
    proc = subprocess.run([sys.executable, "-c", DEEP_PATHS], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, peak = map(int, proc.stdout.split())
    assert peak < 50 * size, (size, peak)


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
            (decode._text(k) if isinstance(k, bytes) else str(k)): _from_phpserialize(v)
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
