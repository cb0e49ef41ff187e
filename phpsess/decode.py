"""Decoding of PHP session blobs into JSON-ready values, for ``phpsess show``.
Pure: bytes in, plain Python values (dict, list, str, int, float, bool, None)
out, or :class:`DecodeError`.

Theory of operation.  PHP stores ``$_SESSION`` in one of three formats
(``session.serialize_handler``; /work/shared/PHP-SESSIONS.md):

- ``php``: ``key|<serialize(value)>`` repeated (keys cannot contain ``|``);
- ``php_binary``: a length byte (bit 7 set: an undefined key, no value),
  the key, ``<serialize(value)>``, repeated;
- ``php_serialize``: ``serialize($_SESSION)``, one array.

The values use PHP's ``serialize()`` grammar.  Every value except an ``R:``
occupies a numbered slot (1-based, counted across all top-level keys, array
keys excluded: php-src ``var_unserializer.re``), and ``R:n;`` (a PHP
reference, ``&$x``) and ``r:n;`` (the same object again) point to a slot.
References can be cyclic (``$o->self = $o``), so they are never inlined: a
reference becomes ``{"__ref__": <path of the slot>}`` with paths written
from ``$`` (= ``$_SESSION``), e.g. ``$["cart"]->items[0]``.  A slot keeps
only its parent's slot and its key; a path is built when a reference is
rendered, and cut at :data:`MAX_PATH_CHARS` (a path per value would take
memory of the order of depth x key length for each value).

The ``phpserialize`` library decodes only the reference-free subset
(it rejects ``R:``, ``r:``, ``C:`` and ``E:`` with "unexpected opcode", and
PHP writes ``r:`` for any object stored twice), so this module parses the
grammar itself; the unit tests check it against ``phpserialize`` where both
apply.

Rendering: strings that are valid UTF-8 become JSON strings (NUL bytes as
``\\u0000``); other strings ``{"__bytes_hex__": "..."}``.  Arrays whose keys
are exactly 0..n-1 in order become lists, others objects.  Objects become
``{"__class__": name, prop: value, ...}`` with private properties named
``"prop [private Class]"`` and protected ones ``"prop [protected]"`` (PHP
marks them with NUL bytes).  Names (keys, properties, classes) that are not
UTF-8, or have ``\\x`` in them, are shown with ``\\`` doubled and the
bytes that are not UTF-8 as ``\\xNN``: a byte and the text ``\\xNN`` differ.
A name already shown in the same array or object (a property named
``__class__``, a public one named ``"x [protected]"``) gets ``" [#2]"``,
``" [#3]"``...: every value stored is shown.  ``C:`` objects
(``Serializable``) keep their opaque payload under ``"__serialized__"``;
enum cases become ``{"__enum__": "Suit::Hearts"}``; INF and NAN
``{"__float__": "INF"}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

FORMATS: Final = ("php_serialize", "php", "php_binary")
AUTO_ORDER: Final = FORMATS  # the order ``auto`` tries them in

# Deeper nesting is refused rather than risking Python's recursion limit
# (PHP's own default unserialize_max_depth is 4096; sessions this deep are
# not something a human reads).
MAX_DEPTH: Final = 200

# A rendered reference path longer than this is cut, ending in "…".
MAX_PATH_CHARS: Final = 200

# PHP's integers have at most 19 digits; more is refused before int()
# (which refuses over 4300 digits with a ValueError of its own).
MAX_DIGITS: Final = 20

Json = None | bool | int | float | str | list["Json"] | dict[str, "Json"]


class DecodeError(ValueError):
    """The blob is not valid in the format asked for.  The message names the
    format, the byte offset and what was expected there."""


def decode_session(blob: bytes, fmt: str = "auto") -> tuple[str, dict[str, Json]]:
    """Decode a session blob; return ``(format used, {key: value})``.

    ``fmt`` is ``auto`` or one of :data:`FORMATS`.  ``auto`` tries them in
    :data:`AUTO_ORDER` and returns the first that decodes the whole blob;
    if none does, the :class:`DecodeError` names each one's failure."""
    if fmt == "auto":
        failures = []
        for candidate in AUTO_ORDER:
            try:
                return candidate, _DECODERS[candidate](blob)
            except DecodeError as exc:
                failures.append(str(exc))
        raise DecodeError(
            "not a PHP session in any serialize format (" + "; ".join(failures) + ")"
        )
    try:
        decoder = _DECODERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; use auto or one of {FORMATS}") from None
    return fmt, decoder(blob)


def render_bytes(raw: bytes) -> Json:
    """A PHP string as JSON: text if it is UTF-8, else its hex digits."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"__bytes_hex__": raw.hex()}


def property_name(raw: bytes) -> str:
    """A serialized property name made readable: PHP writes private
    properties as ``\\0Class\\0name`` and protected ones as ``\\0*\\0name``."""
    if raw.startswith(b"\0"):
        cls, sep, name = raw[1:].partition(b"\0")
        if sep:
            shown = _text(name)
            if cls == b"*":
                return f"{shown} [protected]"
            return f"{shown} [private {_text(cls)}]"
    return _text(raw)


def _text(raw: bytes) -> str:
    """Bytes that name something (keys must be str): the text if it is UTF-8
    without ``\\x``, else with ``\\`` doubled and bytes that are not UTF-8 as
    ``\\xNN`` (0x5c is never part of a UTF-8 sequence, so doubling it
    before decoding changes nothing else)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\\x" not in text:
            return text
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _unique(name: str, taken: dict[str, int]) -> str:
    """``name``, or ``name [#n]`` if an earlier key of the same array or
    object is shown as ``name``.  ``taken`` maps each name shown to the
    next ``n`` to try, so that many repeats stay linear."""
    if name not in taken:
        taken[name] = 2
        return name
    n = taken[name]
    while (candidate := f"{name} [#{n}]") in taken:
        n += 1
    taken[name] = n + 1
    taken[candidate] = 2
    return candidate


# The parent of a slot not in an array or object slot: of a key of $ (php,
# php_binary) or of $ itself (php_serialize's array, slot 1, with no key).
ROOT: Final = -1


class _Parser:
    """A cursor over one blob that parses ``serialize()`` values."""

    def __init__(self, blob: bytes, fmt: str) -> None:
        self.blob = blob
        self.fmt = fmt
        self.pos = 0
        # Slot n (1-based) is index n-1 of both lists: the index of its
        # parent's slot (or ROOT) and its key (None: the slot is $).
        # ``objects``: the slots that are objects (their keys are
        # properties); ``paths``: the paths rendered so far.
        self.parents: list[int] = []
        self.keys: list[int | str | None] = []
        self.objects: set[int] = set()
        self.paths: dict[int, str] = {ROOT: "$"}

    def fail(self, what: str, at: int | None = None) -> DecodeError:
        at = self.pos if at is None else at
        found = self.blob[at : at + 12]
        shown = repr(found) if found else "the end of the data"
        return DecodeError(f"{self.fmt}: at byte {at}: {what}, found {shown}")

    def expect(self, token: bytes) -> None:
        if self.blob[self.pos : self.pos + len(token)] != token:
            raise self.fail(f"expected {token.decode('ascii')!r}")
        self.pos += len(token)

    def until(self, delim: bytes, what: str) -> bytes:
        end = self.blob.find(delim, self.pos)
        if end < 0:
            raise self.fail(f"expected {what} ending in {delim.decode('ascii')!r}")
        raw = self.blob[self.pos : end]
        self.pos = end + 1
        return raw

    def integer(self, delim: bytes, what: str, *, signed: bool = True) -> int:
        start = self.pos
        raw = self.until(delim, what)
        body = raw[1:] if signed and raw[:1] in (b"-", b"+") else raw
        if not body.isdigit():
            raise self.fail(f"expected {what} (digits)", start)
        if len(body) > MAX_DIGITS:
            raise self.fail(f"expected {what} of at most {MAX_DIGITS} digits", start)
        return int(raw)

    def string_body(self) -> bytes:
        """``<len>:"<bytes>"`` (after the type letter and colon)."""
        length = self.integer(b":", "a string length", signed=False)
        self.expect(b'"')
        end = self.pos + length
        if end > len(self.blob):
            raise self.fail(f"a string of {length} bytes runs past the end of the data")
        raw = self.blob[self.pos : end]
        self.pos = end
        self.expect(b'"')
        return raw

    def key(self) -> int | bytes:
        """An array key: ``i:<n>;`` or ``s:<len>:"...";`` (takes no slot)."""
        kind = self.blob[self.pos : self.pos + 2]
        if kind == b"i:":
            self.pos += 2
            return self.integer(b";", "an integer key")
        if kind == b"s:":
            self.pos += 2
            raw = self.string_body()
            self.expect(b";")
            return raw
        raise self.fail("expected an array key (i: or s:)")

    def path(self, slot: int) -> str:
        """The path of a slot (0-based), cut at MAX_PATH_CHARS.  Paths are
        kept once rendered: a path cut already is shared by every slot
        under it."""
        todo = []
        while slot not in self.paths:
            todo.append(slot)
            slot = self.parents[slot]
        path = self.paths[slot]
        for slot in reversed(todo):
            key = self.keys[slot]
            if key is None or len(path) > MAX_PATH_CHARS:
                pass  # $ itself, or under a path cut already
            elif isinstance(key, int):
                path = f"{path}[{key}]"
            else:
                key = key[:MAX_PATH_CHARS]
                if self.parents[slot] not in self.objects:
                    path = f'{path}["{key}"]'
                elif key.isidentifier():
                    path = f"{path}->{key}"
                else:
                    path = f'{path}->{{"{key}"}}'
            if len(path) > MAX_PATH_CHARS:
                path = path[:MAX_PATH_CHARS] + "…"
            self.paths[slot] = path
        return path

    def value(self, parent: int, key: int | str | None, depth: int = 0) -> Json:
        if depth > MAX_DEPTH:
            raise self.fail(f"nesting deeper than {MAX_DEPTH} levels")
        start = self.pos
        kind = self.blob[self.pos : self.pos + 1]
        if kind == b"R":
            # A PHP reference takes no slot of its own.
            self.pos += 1
            self.expect(b":")
            target = self.reference(start, len(self.parents))
            return {"__ref__": self.path(target - 1)}
        slot = len(self.parents)
        self.parents.append(parent)
        self.keys.append(key)
        self.pos += 1
        if kind == b"N":
            self.expect(b";")
            return None
        self.expect(b":")
        if kind == b"b":
            raw = self.until(b";", "a boolean")
            if raw not in (b"0", b"1"):
                raise self.fail("expected a boolean 0 or 1", start + 2)
            return raw == b"1"
        if kind == b"i":
            return self.integer(b";", "an integer")
        if kind == b"d":
            return self.double(start)
        if kind == b"s":
            raw = self.string_body()
            self.expect(b";")
            return render_bytes(raw)
        if kind == b"S":
            raise self.fail("escaped strings (S:) are not written by PHP sessions", start)
        if kind == b"a":
            return self.array(slot, depth)
        if kind == b"O":
            return self.object(slot, depth)
        if kind == b"C":
            name = self.string_body()
            self.expect(b":")
            payload = self.string_body_braced()
            return {"__class__": _text(name), "__serialized__": render_bytes(payload)}
        if kind == b"E":
            raw = self.string_body()
            self.expect(b";")
            cls, sep, case = raw.partition(b":")
            if not sep:
                raise self.fail("expected an enum case Class:Case", start)
            return {"__enum__": f"{_text(cls)}::{_text(case)}"}
        if kind == b"r":
            # r: takes a slot, standing for the object it points to.
            target = self.reference(start, slot)
            self.parents[slot] = self.parents[target - 1]
            self.keys[slot] = self.keys[target - 1]
            return {"__ref__": self.path(target - 1)}
        self.pos = start
        raise self.fail("expected a value (N, b, i, d, s, a, O, C, E, R or r)")

    def reference(self, start: int, known: int) -> int:
        """The slot number of ``R:n;`` / ``r:n;``, checked against the
        ``known`` slots before it."""
        n = self.integer(b";", "a reference number", signed=False)
        if not 1 <= n <= known:
            raise self.fail(f"a reference to value {n}, but only {known} precede it", start)
        return n

    def double(self, start: int) -> Json:
        raw = self.until(b";", "a float")
        if raw in (b"INF", b"-INF", b"NAN"):
            return {"__float__": raw.decode("ascii")}
        try:
            number = float(raw.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise self.fail("expected a float", start + 2) from None
        if not math.isfinite(number):
            raise self.fail("expected a float", start + 2)
        return number

    def string_body_braced(self) -> bytes:
        """``<len>:{<bytes>}`` (the payload of a ``C:`` object)."""
        length = self.integer(b":", "a payload length", signed=False)
        self.expect(b"{")
        end = self.pos + length
        if end > len(self.blob):
            raise self.fail(f"a payload of {length} bytes runs past the end of the data")
        raw = self.blob[self.pos : end]
        self.pos = end
        self.expect(b"}")
        return raw

    def entries(self, slot: int, depth: int, taken: dict[str, int]
                ) -> list[tuple[int | bytes, str, Json]]:
        """The ``<count>:{key value...}`` of the array or object in ``slot``;
        each key's name unique among ``taken`` (see :func:`_unique`)."""
        obj = slot in self.objects
        count = self.integer(b":", "an element count", signed=False)
        self.expect(b"{")
        out = []
        for _ in range(count):
            raw_key = self.key()
            if isinstance(raw_key, int):
                shown = str(raw_key)
            else:
                shown = property_name(raw_key) if obj else _text(raw_key)
            name = _unique(shown, taken)
            step = raw_key if isinstance(raw_key, int) and name == shown else name
            out.append((raw_key, name, self.value(slot, step, depth + 1)))
        self.expect(b"}")
        return out

    def array(self, slot: int, depth: int) -> Json:
        items = self.entries(slot, depth, {})
        if [k for k, _, _ in items] == list(range(len(items))):
            return [v for _, _, v in items]
        return {name: v for _, name, v in items}

    def object(self, slot: int, depth: int) -> Json:
        name = self.string_body()
        self.expect(b":")
        self.objects.add(slot)
        result: dict[str, Json] = {"__class__": _text(name)}
        # The marker is taken first: no property replaces it.
        for _, prop, v in self.entries(slot, depth, {"__class__": 2}):
            result[prop] = v
        return result


def decode_php_serialize(blob: bytes) -> dict[str, Json]:
    """``php_serialize``: one ``serialize()``d array."""
    if not blob:
        return {}
    parser = _Parser(blob, "php_serialize")
    if not blob.startswith(b"a:"):
        raise parser.fail("expected an array (a:)")
    parser.parents.append(ROOT)  # slot 1 is $ itself
    parser.keys.append(None)
    parser.pos = 2
    items = parser.entries(0, 0, {})
    if parser.pos != len(blob):
        raise parser.fail(f"{len(blob) - parser.pos} bytes after the end of the array")
    return {name: v for _, name, v in items}


def decode_php(blob: bytes) -> dict[str, Json]:
    """``php``: ``key|value`` repeated."""
    parser = _Parser(blob, "php")
    result: dict[str, Json] = {}
    taken: dict[str, int] = {}
    while parser.pos < len(blob):
        bar = blob.find(b"|", parser.pos)
        if bar < 0:
            raise parser.fail("expected a key ending in '|'")
        key = _unique(_text(blob[parser.pos : bar]), taken)
        parser.pos = bar + 1
        result[key] = parser.value(ROOT, key)
    return result


def decode_php_binary(blob: bytes) -> dict[str, Json]:
    """``php_binary``: length byte, key, value, repeated."""
    parser = _Parser(blob, "php_binary")
    result: dict[str, Json] = {}
    taken: dict[str, int] = {}
    while parser.pos < len(blob):
        length = blob[parser.pos]
        undefined = bool(length & 0x80)
        length &= 0x7F
        start = parser.pos + 1
        if start + length > len(blob):
            raise parser.fail(f"a key of {length} bytes runs past the end of the data")
        raw = blob[start : start + length]
        parser.pos = start + length
        if undefined:
            continue  # PHP: a key unset in $_SESSION, no value follows
        key = _unique(_text(raw), taken)
        result[key] = parser.value(ROOT, key)
    return result


_DECODERS: Final[dict[str, Callable[[bytes], dict[str, Json]]]] = {
    "php_serialize": decode_php_serialize,
    "php": decode_php,
    "php_binary": decode_php_binary,
}
