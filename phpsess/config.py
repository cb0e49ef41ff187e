"""The configuration file, ``/etc/phpsess/phpsess.toml`` (``--config``).

Every setting of ``phpsess serve`` has a key here, named like its flag, in
one of four tables.  Precedence: built-in defaults < this file < flags.
Unknown keys and wrong types are rejected by name, with the file and line,
so a typo never silently falls back to a default; values out of range are
checked with the flags (``phpsess.__main__``), named with the file and line
that :attr:`Settings.where` keeps.  Parsing is the standard
library's ``tomllib``.  Pure apart from reading the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from typing import Any, Final

DEFAULT_CONFIG: Final = "/etc/phpsess/phpsess.toml"


class ConfigError(Exception):
    """The configuration cannot be used; the message names file, line, key."""


class Settings(dict[str, Any]):
    """What :func:`load` read: argparse destinations and their values, and in
    :attr:`where` the ``"FILE:LINE"`` each came from, so that a value of the
    right type but out of range (checked later, with the flags) is named
    where it stands like any other mistake in the file."""

    where: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self.where = {}


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return _int(value) or isinstance(value, float)


def _str(value: object) -> bool:
    return isinstance(value, str)


def _bool(value: object) -> bool:
    return isinstance(value, bool)


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# table -> key -> (argparse dest, check, what the value must be)
SCHEMA: Final[dict[str, dict[str, tuple[str, Callable[[object], bool], str]]]] = {
    "daemon": {
        "listen": ("listen", _str_list, "a list of addresses"),
        "socket_mode": ("socket_mode", _str, 'an octal string like "0660"'),
        "log_level": ("log_level", _str, "debug, info, warning or error"),
        "metrics_listen": ("metrics_listen", _str, '"HOST:PORT"'),
    },
    "limits": {
        "max_session_bytes": ("max_session_bytes", _int, "a whole number"),
        "max_connections": ("max_connections", _int, "a whole number"),
        "max_incoming_bytes": ("max_incoming_bytes", _int, "a whole number"),
        "max_outgoing_bytes": ("max_outgoing_bytes", _int, "a whole number"),
        "idle_timeout_s": ("idle_timeout_s", _number, "a number of seconds"),
        "lock_wait_s": ("lock_wait_s", _number, "a number of seconds"),
        "lock_lease_s": ("lock_lease_s", _number, "a number of seconds"),
        "max_locks_per_connection": ("max_locks_per_connection", _int, "a whole number"),
        "shutdown_timeout_s": ("shutdown_timeout_s", _number, "a number of seconds"),
    },
    "storage": {
        "data_dir": ("data_dir", _str, "a directory"),
        "fsync": ("fsync", _str, "always, interval or never"),
        "fsync_interval_ms": ("fsync_interval_ms", _int, "a whole number of milliseconds"),
        "compact_min_bytes": ("compact_min_bytes", _int, "a whole number"),
        "memory_only": ("memory_only", _bool, "true or false"),
        # The SQL backend (--storage ...): README "SQL storage".
        "url": ("storage", _str, '"mysql://USER@HOST:PORT/DB"'),
        "password": ("storage_password", _str, "a string"),
        "password_file": ("storage_password_file", _str, "a file path"),
        "table": ("storage_table", _str, "a table name"),
        "engine": ("storage_engine", _str, "InnoDB or ndbcluster"),
        "pool_size": ("storage_pool_size", _int, "a whole number"),
    },
    "cluster": {
        "node": ("node", _str, "a node name"),
        "listen": ("cluster_listen", _str, '"HOST:PORT"'),
        "secret_file": ("cluster_secret_file", _str, "a file path"),
        "heartbeat_ms": ("heartbeat_ms", _int, "a whole number of milliseconds"),
        "dead_after_ms": ("dead_after_ms", _int, "a whole number of milliseconds"),
        "probe_ms": ("probe_ms", _int, "a whole number of milliseconds"),
        "drain_timeout_s": ("drain_timeout_s", _number, "a number of seconds"),
        "peers": ("peer", lambda v: isinstance(v, dict), "a table NAME = \"HOST:PORT\""),
    },
}


# Settings that name a file or directory: a relative one is taken relative
# to the configuration file's directory.
_PATHS: Final = frozenset({"data_dir", "storage_password_file", "cluster_secret_file"})

# A key (bare, "basic" or 'literal'), and dotted keys made of them.
_KEY: Final = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED: Final = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER: Final = re.compile(rf"\s*\[\[?\s*({_DOTTED})\s*\]\]?")
_ASSIGNMENT: Final = re.compile(rf"\s*({_DOTTED})\s*=")


def _key_path(dotted: str) -> tuple[str, ...]:
    return tuple(_unquoted(part) for part in re.findall(_KEY, dotted))


def _unquoted(key: str) -> str:
    if key[0] == "'":
        return key[1:-1]
    if key[0] == '"':
        try:  # a basic string's escapes are JSON's, and \UXXXXXXXX
            return str(tomllib.loads(f"k = {key}")["k"])
        except tomllib.TOMLDecodeError:
            return key[1:-1]
    return key


def _paths(text: str) -> list[tuple[str, ...]]:
    """For each line, the full key path it defines (``()`` for none): a
    header ``[a.b]`` or ``[[a.b]]`` defines ``(a, b)``; ``c.d = 1`` under
    it ``(a, b, c, d)``.  Lines inside multi-line values may be misread:
    only the position of a mistake depends on this (tomllib reports none)."""
    table: tuple[str, ...] = ()
    paths = []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            table = _key_path(header.group(1))
            paths.append(table)
            continue
        assignment = _ASSIGNMENT.match(line)
        paths.append(table + _key_path(assignment.group(1)) if assignment else ())
    return paths


def _line_of(paths: list[tuple[str, ...]], *wanted: str) -> int:
    """The line where the key path ``wanted`` is defined: the first line
    defining it or a key inside it; else (a key in an inline table) the
    line defining the nearest table around it; 0 if none (not expected)."""
    best, best_depth = 0, 0
    for number, path in enumerate(paths, 1):
        if path[: len(wanted)] == wanted:
            return number
        if len(path) > best_depth and wanted[: len(path)] == path:
            best, best_depth = number, len(path)
    return best


def _tables_of(key: str) -> list[str]:
    return [f"[{table}]" for table, keys in SCHEMA.items() if key in keys]


def load(path: str) -> Settings:
    """The settings in ``path`` as argparse destinations (``peer`` as a list
    of ``NAME=HOST:PORT``); ConfigError for anything wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); a TOML file "
            "is UTF-8: save it so (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        hint = ""
        unquoted = re.search(r"^\s*socket_mode\s*=\s*(0[0-7]+)\s*(?:#.*)?$", text, re.MULTILINE)
        if unquoted:
            hint = f' (write socket_mode quoted: socket_mode = "{unquoted.group(1)}")'
        raise ConfigError(f"{path}: not valid TOML: {exc}{hint}") from exc
    paths = _paths(text)
    settings = Settings()
    for table, values in document.items():
        where = f"{path}:{_line_of(paths, table)}"
        if table not in SCHEMA:
            if not isinstance(values, dict):
                homes = _tables_of(table)
                if homes:
                    raise ConfigError(
                        f"{where}: {table} is a key of {' or '.join(homes)}, not a table: "
                        f"put it under {homes[0]} (a key before the first [table] header "
                        "belongs to none)"
                    )
                raise ConfigError(
                    f"{where}: unknown key {table!r} outside any table; settings go in "
                    + ", ".join(f"[{t}]" for t in SCHEMA)
                )
            raise ConfigError(
                f"{where}: unknown table [{table}]; known: "
                + ", ".join(f"[{t}]" for t in SCHEMA)
            )
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}: [{table}] must be one table, written [{table}] (not [[{table}]] "
                f"nor {table} = ...)"
            )
        for key, value in values.items():
            where = f"{path}:{_line_of(paths, table, key)}"
            spec = SCHEMA[table].get(key)
            if spec is None:
                hint = (
                    f" ([{key}] is a table of its own, not part of [{table}])"
                    if key in SCHEMA and key != table else ""
                )
                raise ConfigError(
                    f"{where}: unknown key {key!r} in [{table}]{hint}; known: "
                    + ", ".join(SCHEMA[table])
                )
            dest, check, expected = spec
            if not check(value):
                raise ConfigError(f"{where}: [{table}] {key} must be {expected}")
            settings.where[dest] = where
            if dest == "peer":
                peers = []
                for name, address in value.items():
                    if not isinstance(address, str):
                        line = _line_of(paths, table, key, name)
                        raise ConfigError(f"{path}:{line}: peer {name} must be \"HOST:PORT\"")
                    peers.append(f"{name}={address}")
                settings["peer"] = peers
            elif dest == "socket_mode":
                try:
                    settings[dest] = int(value, 8)
                except ValueError:
                    raise ConfigError(f"{where}: [{table}] {key} must be {expected}") from None
            elif dest in _PATHS and isinstance(value, str) and value:
                # Relative to the file, not to whatever directory the daemon
                # was started in (systemd starts it in /).
                settings[dest] = os.path.join(os.path.dirname(os.path.abspath(path)), value)
            else:
                settings[dest] = value
    return settings
