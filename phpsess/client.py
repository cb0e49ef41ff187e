"""A small blocking client of the phpsess protocol, for admin commands,
scripts and tests.  One connection, one request at a time (or several with
:meth:`Client.pipeline`)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Final

from phpsess import protocol as p
from phpsess.addresses import Address, TcpAddress, UnixAddress, parse_address

# The longest timeout_s: a day (the admin commands' --timeout-s allows as much).
MAX_TIMEOUT_S: Final = 86400.0


class ClientError(Exception):
    """The daemon could not be reached or sent something that is not a reply."""


def describe(reply: p.Reply) -> str:
    """A reply as a user reads it: ``BUSY the daemon is at ...`` for an error."""
    if isinstance(reply, p.Error):
        return f"{reply.code.value} {reply.message}"
    return f"unexpected reply {reply!r}"


class Client:
    def __init__(self, address: Address | str, *, timeout_s: float = 10.0, hello: bool = True,
                 wait_ms: int | None = None, lease_ms: int | None = None) -> None:
        if not 0 < timeout_s <= MAX_TIMEOUT_S:  # also NaN and inf
            # socket.settimeout would raise OverflowError past about 300 years.
            raise ValueError(f"timeout_s must be more than 0 and at most {MAX_TIMEOUT_S:g}, "
                             f"not {timeout_s!r}")
        self.address = parse_address(address) if isinstance(address, str) else address
        self._parser = p.ReplyParser()
        try:
            if isinstance(self.address, UnixAddress):
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout_s)
                self._sock.connect(self.address.path)
            else:
                assert isinstance(self.address, TcpAddress)
                self._sock = socket.create_connection(
                    (self.address.host, self.address.port), timeout=timeout_s
                )
        except OSError as exc:
            with contextlib.suppress(AttributeError):
                self._sock.close()
            raise ClientError(f"cannot connect to {self.address}: {exc}") from exc
        if hello:
            try:
                reply = self._hello(p.Hello(p.PROTOCOL_VERSION, wait_ms, lease_ms, "phpsess-cli"))
            except ClientError:
                self.close()
                raise
            if not isinstance(reply, p.Ok):
                self.close()
                raise ClientError(f"{self.address}: the daemon refused the connection: "
                                  f"{describe(reply)}")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def send_raw(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ClientError(f"cannot send to {self.address}: {exc}") from exc

    def read_reply(self) -> p.Reply:
        while True:
            try:
                reply = self._parser.next_reply()
            except p.ReplyError as exc:
                raise ClientError(f"{self.address}: {exc}") from exc
            if reply is not p.NEED_DATA:
                assert not isinstance(reply, p._NeedData)
                return reply
            try:
                data = self._sock.recv(1 << 20)
            except OSError as exc:
                raise ClientError(f"cannot read from {self.address}: {exc}") from exc
            if not data:
                raise ClientError(f"{self.address} closed the connection")
            self._parser.receive_data(data)

    def _hello(self, hello: p.Hello) -> p.Reply:
        try:
            self.send_raw(p.encode_request(hello))
        except ClientError as exc:
            # A daemon at max_connections answers BUSY and closes without
            # reading (PROTOCOL.md §9): its answer may be waiting for us even
            # though our HELLO could not be sent.
            try:
                return self.read_reply()
            except ClientError:
                raise exc from None
        return self.read_reply()

    def request(self, request: p.Request) -> p.Reply:
        self.send_raw(p.encode_request(request))
        return self.read_reply()

    def pipeline(self, requests: Sequence[p.Request]) -> list[p.Reply]:
        self.send_raw(b"".join(p.encode_request(r) for r in requests))
        return [self.read_reply() for _ in requests]
