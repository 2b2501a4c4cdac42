"""The admin CLI's side of the admin socket: one blocking request, one reply.

It finds the socket (from the config file or an explicit path), sends one admin op in
the protocol's framing and returns the reply map, or raises AdminError with a sentence
a person can act on (daemon not running, socket not permitted, the daemon's refusal).
It never opens the database.
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
_ids = itertools.count(1)


class AdminError(Exception):
    """An admin request could not be made or was refused; the message says why."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class AdminClient:
    def __init__(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
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
        except FileNotFoundError:
            sock.close()
            raise AdminError(
                f"the daemon is not running (no admin socket at {self.path})"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise AdminError(
                f"the daemon is not running (nothing listens on {self.path})"
            ) from None
        except PermissionError:
            sock.close()
            raise AdminError(
                f"permission denied on {self.path}: run as the daemon's user, root, or a "
                "member of the admin group ([admin] group in the config)"
            ) from None
        except OSError as exc:
            sock.close()
            raise AdminError(f"cannot reach the daemon at {self.path}: {exc.strerror}") from None
        return sock

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
