"""The admin socket: a Unix socket server, and who may use it.

The socket is created with mode 0660 (and the configured group). On each connection
the peer's uid and gid are read from the kernel (SO_PEERCRED) before anything else;
a peer not allowed gets one `denied` frame and the connection closes. Allowed peers'
requests are read one at a time and answered by `AdminOps` (admin.py), their errors
as the one error map (`licd.core.errors`) tells them to an administrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from licd.config.settings import AdminConfig
from licd.core.admin import AdminOps
from licd.core.errors import Audience, error_reply
from licd_client.errors import Denied, LicdError
from licd_client.messages import request_id
from licd_client.wire import MAX_FRAME_ADMIN, REPLY_LIMITS, FrameDecoder, encode

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Peer(pid, uid, gid)


@dataclass
class Access:
    """Who may use the admin socket."""

    group_gid: int | None = None
    group_members: frozenset[str] = frozenset()
    uids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_config(cls, config: AdminConfig) -> Access:
        uids = frozenset({0, os.geteuid(), *config.allow_uids})
        if config.group is None:
            return cls(uids=uids)
        try:
            entry = grp.getgrnam(config.group)
        except KeyError:
            raise ValueError(f"admin.group: no group named {config.group!r}") from None
        return cls(entry.gr_gid, frozenset(entry.gr_mem), uids)

    def allows(self, peer: Peer) -> bool:
        if peer.uid in self.uids:
            return True
        if self.group_gid is None:
            return False
        if peer.gid == self.group_gid:
            return True
        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            return False
        return name in self.group_members


class AdminServer:
    """Listens on the admin socket and serves one request at a time per connection."""

    def __init__(self, ops: AdminOps, config: AdminConfig, path: Path, access: Access) -> None:
        self.ops = ops
        self.config = config
        self.path = path
        self.access = access
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        path = self.path
        check_socket_path(path)
        if path.exists() or path.is_symlink():
            if await _in_use(path):
                raise OSError(f"{path} is in use by another process")
            path.unlink()  # a stale socket of an earlier run
        old_umask = os.umask(0o117)  # the socket is born 0660, never wider
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o660)
        if self.access.group_gid is not None:
            os.chown(path, -1, self.access.group_gid)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.ops.close()  # waiting audit requests answer now
            if self._handlers:
                await asyncio.wait(set(self._handlers), timeout=2.0)
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_credentials(sock)
            if not self.access.allows(peer):
                log.warning("event=admin_refused uid=%d pid=%d", peer.uid, peer.pid)
                refusal = Denied(f"uid {peer.uid} may not use the admin socket")
                writer.write(encode(error_reply(None, refusal, Audience.ADMIN)[0]))
                await writer.drain()
                return
            await self._serve(reader, writer, peer)
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        decoder = FrameDecoder(MAX_FRAME_ADMIN, REPLY_LIMITS)
        while True:
            try:
                frame = decoder.next_frame()
            except LicdError as exc:  # the stream cannot be read on: answer, then close
                writer.write(encode(error_reply(None, exc, Audience.ADMIN)[0]))
                await writer.drain()
                return
            if frame is None:
                data = await reader.read(65536)
                if not data:
                    return
                decoder.feed(data)
                continue
            try:
                reply = await self.ops.handle(frame, peer.uid)
                close = False
            except Exception as exc:
                rid, op = request_id(frame), frame.get("op")
                reply, close = error_reply(rid, exc, Audience.ADMIN, op)
            writer.write(encode(reply))
            await writer.drain()
            if close or self.ops.closing:
                return


#: The longest path a Unix socket address holds (sun_path, less its NUL).
MAX_SOCKET_PATH = 107


def check_socket_path(path: Path) -> None:
    """ValueError unless `path` can be the admin socket: short enough, and nothing but a
    (stale) socket there now, so that replacing it never deletes a file."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"the path is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes)")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError("something that is not a socket is there; name a path of its own")


async def _in_use(path: Path) -> bool:
    """True when something accepts connections on the Unix socket at `path`."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    return True
