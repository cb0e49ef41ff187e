"""Parsing of daemon addresses: ``unix:/abs/path.sock`` and ``tcp:HOST:PORT``
(PROTOCOL.md §1).  Pure."""

from __future__ import annotations

import ipaddress
from typing import Final

import attrs

DEFAULT_SOCKET: Final = "/run/phpsess/phpsess.sock"
DEFAULT_LISTEN: Final = f"unix:{DEFAULT_SOCKET}"


@attrs.frozen
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@attrs.frozen
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


Address = UnixAddress | TcpAddress


class AddressError(ValueError):
    pass


def parse_tcp_address(text: str) -> TcpAddress:
    """A setting that takes TCP only (cluster addresses, the metrics
    endpoint): ``HOST:PORT``, also written ``tcp:HOST:PORT`` or
    ``tcp://HOST:PORT``.  Errors quote ``text`` as given."""
    given = f"tcp:{text.removeprefix('tcp:').removeprefix('//')}"
    try:
        parsed = parse_address(given)
    except AddressError as exc:
        why = str(exc).removeprefix(f"{given!r}: ")  # parse_address's own quote
        if why.startswith("expected tcp:HOST:PORT"):
            why = "expected HOST:PORT (an IP address or localhost, and a port)"
        raise AddressError(f"{text!r}: {why}") from None
    assert isinstance(parsed, TcpAddress)
    return parsed


def parse_address(text: str) -> Address:
    """Parse ``unix:/abs/path`` or ``tcp:HOST:PORT`` (also the PHP forms
    ``unix:///abs/path`` and ``tcp://HOST:PORT``)."""
    forms = "use unix:/abs/path.sock or tcp:HOST:PORT"
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise AddressError(f"{text!r}: a unix socket path must be absolute; {forms}")
        if len(path.encode()) > 107:
            raise AddressError(f"{text!r}: unix socket paths are limited to 107 bytes")
        return UnixAddress(path)
    if text.startswith("tcp:"):
        rest = text[len("tcp:") :]
        if rest.startswith("//"):
            rest = rest[2:]
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise AddressError(f"{text!r}: expected tcp:HOST:PORT; {forms}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise AddressError(f"{text!r}: port must be 0-65535")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise AddressError(
                    f"{text!r}: give an IP address (or localhost), not a host name"
                ) from None
        return TcpAddress(host, port)
    raise AddressError(f"{text!r} is not an address; {forms}")
