"""The admin CLI's side of the admin socket: one blocking request, one reply.

It is given the socket's path (and where that path came from, for its messages), sends
one admin op in the protocol's framing and returns the reply map, or raises AdminError
with a sentence a person can act on (no socket, a stale socket, socket not permitted, the
daemon's refusal). It never opens the database.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
from pathlib import Path
from typing import Any

from licd_client.errors import LicdError, ProtocolViolation
from licd_client.messages import parse_error
from licd_client.wire import MAX_FRAME_ADMIN, REPLY_LIMITS, FrameDecoder, encode

DEFAULT_TIMEOUT = 30.0
#: Ends every "not running": how to reach a daemon other than the one tried.
ELSEWHERE = (
    "to ask another daemon give --config FILE or --socket PATH, or set LICD_CONFIG or LICD_SOCKET"
)
_ids = itertools.count(1)


class AdminError(Exception):
    """An admin request could not be made or was refused; the message says why."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class AdminClient:
    """`origin` says where `path` came from ("from --config FILE"), in the messages."""

    def __init__(
        self, path: Path, *, origin: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.path = path
        self.origin = origin
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send `op` with `args` (None values left out); the reply's results."""
        request = {"op": op, "id": next(_ids), **{k: v for k, v in args.items() if v is not None}}
        try:
            frame = encode(request)
        except OverflowError:
            raise AdminError(
                f"{op}: a number is out of range (msgpack integers are -2^63..2^64-1)"
            ) from None
        except (TypeError, ValueError) as exc:
            raise AdminError(f"{op}: a value cannot be sent: {exc}") from None
        sock = self._connect()
        try:
            # Refused before the daemon read anything: the refusal is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(frame)
            reply = self._read(sock)
        except TimeoutError:
            raise AdminError(f"the daemon did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise AdminError(f"the admin connection failed: {exc.strerror or exc}") from None
        finally:
            sock.close()
        if reply.get("ok") is not True:
            try:
                err = parse_error(reply)
            except ProtocolViolation as exc:
                raise AdminError(f"unexpected reply from the daemon: {exc}") from None
            raise AdminError(err.message, err.code)
        return reply

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise AdminError(self._unreachable(exc)) from None
        return sock

    def _unreachable(self, exc: OSError) -> str:
        """Why connecting to the socket failed, where it was (and why there), what to do."""
        where = f"{self.path} ({self.origin})" if self.origin else str(self.path)
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            return f"the daemon is not running: no socket at {where}; {ELSEWHERE}"
        if isinstance(exc, ConnectionRefusedError) and not self.path.is_socket():
            return f"the daemon is not running: {where} is not a socket; {ELSEWHERE}"
        if isinstance(exc, ConnectionRefusedError):
            return (
                f"the daemon is not running: connection refused on {where}, a socket left "
                f"behind by a daemon that stopped; {ELSEWHERE}"
            )
        if isinstance(exc, PermissionError):
            return (
                f"permission denied on {where}: run as the daemon's user, root, or a member "
                "of the admin group ([admin] group in the config)"
            )
        return f"cannot reach the daemon at {where}: {exc.strerror or exc}"

    @staticmethod
    def _read(sock: socket.socket) -> dict[str, Any]:
        decoder = FrameDecoder(MAX_FRAME_ADMIN, REPLY_LIMITS)
        while True:
            try:
                frame = decoder.next_frame()
            except LicdError as exc:
                raise AdminError(f"unreadable reply from the daemon: {exc.message}") from None
            if frame is not None:
                return frame
            data = sock.recv(65536)
            if not data:
                raise AdminError("the daemon closed the admin connection without a reply")
            decoder.feed(data)
