"""The configuration file: every setting, rejection by name with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from phpsess.config import ConfigError, load

FULL = """\
# phpsess
[daemon]
listen = ["unix:/run/phpsess/phpsess.sock", "tcp:127.0.0.1:7700"]
socket_mode = "0660"
log_level = "warning"
metrics_listen = "127.0.0.1:9464"

[limits]
max_session_bytes = 1048576
max_connections = 100
max_outgoing_bytes = 8388608
idle_timeout_s = 60
lock_wait_s = 5.5
lock_lease_s = 120
shutdown_timeout_s = 3

[storage]
data_dir = "/var/lib/phpsess"
fsync = "always"
fsync_interval_ms = 100
compact_min_bytes = 1000000
memory_only = false

[cluster]
node = "web1"
listen = "10.0.0.1:7701"
secret_file = "/etc/phpsess/cluster.secret"
heartbeat_ms = 250
dead_after_ms = 2000
drain_timeout_s = 20

[cluster.peers]
web2 = "10.0.0.2:7701"
web3 = "10.0.0.3:7701"
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "phpsess.toml"
    path.write_text(text)
    return str(path)


def test_every_setting_is_read_under_its_flag_name(tmp_path: Path) -> None:
    settings = load(_write(tmp_path, FULL))
    assert settings == {
        "listen": ["unix:/run/phpsess/phpsess.sock", "tcp:127.0.0.1:7700"],
        "socket_mode": 0o660, "log_level": "warning", "metrics_listen": "127.0.0.1:9464",
        "max_session_bytes": 1048576, "max_connections": 100,
        "max_outgoing_bytes": 8388608, "idle_timeout_s": 60,
        "lock_wait_s": 5.5, "lock_lease_s": 120, "shutdown_timeout_s": 3,
        "data_dir": "/var/lib/phpsess", "fsync": "always", "fsync_interval_ms": 100,
        "compact_min_bytes": 1000000, "memory_only": False,
        "node": "web1", "cluster_listen": "10.0.0.1:7701",
        "cluster_secret_file": "/etc/phpsess/cluster.secret", "heartbeat_ms": 250,
        "dead_after_ms": 2000, "drain_timeout_s": 20,
        "peer": ["web2=10.0.0.2:7701", "web3=10.0.0.3:7701"],
    }


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    # They were relative to the directory the daemon started in: / under
    # systemd, another one in a shell, for the same file.
    (tmp_path / "etc").mkdir()
    path = _write(
        tmp_path / "etc",
        '[storage]\ndata_dir = "data"\npassword_file = "../db.password"\n'
        '[cluster]\nsecret_file = "/abs/cluster.secret"\n',
    )
    settings = load(path)
    here = str(tmp_path / "etc")
    assert settings["data_dir"] == f"{here}/data"
    assert settings["storage_password_file"] == f"{here}/../db.password"
    assert settings["cluster_secret_file"] == "/abs/cluster.secret"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmax_conections = 5\n", ":2: unknown key 'max_conections' in [limits]"),
        ("[daemon]\n\n[limitz]\nx = 1\n", ":3: unknown table [limitz]"),
        ("[limits]\nlock_wait_s = \"soon\"\n", ":2: [limits] lock_wait_s must be a number"),
        ("[storage]\nmemory_only = 1\n", ":2: [storage] memory_only must be true or false"),
        ("[daemon]\nlisten = \"unix:/x.sock\"\n", ":2: [daemon] listen must be a list"),
        ("[daemon]\nsocket_mode = \"rw\"\n", ":2: [daemon] socket_mode must be an octal"),
        ("[cluster.peers]\nweb2 = 7\n", ":2: peer web2 must be"),
        ("[limits\n", "not valid TOML"),
        # TOML reads 0660 as a bad number: its own message gave no hint.
        ("[daemon]\nsocket_mode = 0660\n",
         'not valid TOML: Expected newline or end of document after a statement (at line 2, '
         'column 16) (write socket_mode quoted: socket_mode = "0660")'),
    ],
)
def test_mistakes_are_named_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\n\nlimits.max_conections = 5\n",
         ":3: unknown key 'limits' in [daemon] ([limits] is a table of its own"),
        ("# x\nlimits.max_conections = 5\n", ":2: unknown key 'max_conections' in [limits]"),
        ("\nlimits = { max_conections = 5 }\n", ":2: unknown key 'max_conections' in [limits]"),
        ('[limits]\n"max_conections" = 5\n', ":2: unknown key 'max_conections' in [limits]"),
        ('[cluster]\nnode = "a"\npeers = { web2 = 7 }\n', ":3: peer web2 must be"),
        ("[limits]\n\n[[daemon]]\n", ":3: [daemon] must be one table, written [daemon]"),
        ('\nlog_level = "debug"\n[daemon]\n',
         ":2: log_level is a key of [daemon], not a table: put it under [daemon]"),
        ('listen = ["unix:/x.sock"]\n', ":1: listen is a key of [daemon] or [cluster]"),
        ("verbose = true\n", ":1: unknown key 'verbose' outside any table"),
    ],
)
def test_mistakes_in_dotted_keys_inline_and_array_tables_have_their_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(path + message), str(info.value)


def test_a_file_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "phpsess.toml"
    path.write_bytes(b'[storage]\n# caf\xc3\xa9\ndata_dir = "/x/dd\xff"\n')  # Latin-1
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value).startswith(f"{path}:3: not valid UTF-8 (byte 0xff)")


def test_every_setting_says_where_it_stands(tmp_path: Path) -> None:
    # For mistakes found later, with the flags (a value out of range).
    path = _write(tmp_path, FULL)
    where = load(path).where
    lines = FULL.splitlines()
    for dest, key in (("log_level", "log_level ="), ("max_connections", "max_connections ="),
                      ("fsync", "fsync ="), ("cluster_listen", 'listen = "10.0.0.1'),
                      ("peer", "[cluster.peers]")):
        line = next(n for n, text in enumerate(lines, 1) if text.startswith(key))
        assert where[dest] == f"{path}:{line}", dest
    assert set(where) == set(load(path))


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load(str(tmp_path / "nope.toml"))


def test_the_shipped_example_is_valid_and_complete() -> None:
    from phpsess.config import SCHEMA
    from tests.conftest import ROOT

    example = ROOT / "deploy" / "phpsess.toml"
    settings = load(str(example))
    text = example.read_text()
    for keys in SCHEMA.values():
        for key in keys:  # every key is documented, set or commented out
            assert f"{key} =" in text or (key == "peers" and "[cluster.peers]" in text), key
    assert settings["data_dir"] == "/var/lib/phpsess"
