"""Leadership of a cluster of licd nodes sharing one PostgreSQL database (docs/ha.md).

One node, the leader, runs the engine and answers; the others are standbys: they answer
`hello`, and every other op with `unavailable`, `retry_after` and `detail.leader` (the
leader's address), so clients move there.

The rules, with `ttl` = `[store] leader_ttl` and `delay` = `[store] lock_delay`:
- the leader renews the leadership row every ttl/3; a renewal sent at monotonic time t
  and acknowledged lets it answer until t + ttl (its *deadline*). Past the deadline it
  answers nothing but `unavailable` (`refusal`), and `hold` raises LeadershipLost: the
  daemon stops. A renewal refused (another node holds the row) does the same at once.
- a standby takes over only when the row was released (a clean stop) or has not been
  renewed for ttl + delay on the database's clock (`campaign`). The row's renewal
  happened after the leader sent it, so the leader's deadline passes at least `delay`
  before any takeover, as long as clocks run at nearly the same rate.
- every write is fenced at the leader's epoch (the store's `fence`): a leader that was
  paused past its deadline and wakes up commits nothing, so it grants nothing.

The database calls are the store's (postgres.py); this module decides when to make
them and what a node answers meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from licd.core.dispatch import hello_reply
from licd.core.errors import Audience, error_reply
from licd.core.keys import Signer
from licd.store.base import StoreError
from licd_client.errors import LicdError, Unavailable
from licd_client.messages import Hello, parse_request

if TYPE_CHECKING:
    from licd.store.postgres import LeaderRow

log = logging.getLogger(__name__)


def boottime() -> float:
    """Seconds on a clock that, unlike `time.monotonic`, goes on while the machine is
    suspended (Linux's CLOCK_BOOTTIME): a leader suspended past its deadline wakes up
    knowing it (else the monotonic clock)."""
    return time.clock_gettime(_BOOTTIME)


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class LeadershipLost(Exception):
    """This node was the leader and no longer is: it must stop answering."""


class LeaderStore(Protocol):
    """The store's leadership calls (PostgresStore); `lost` says why its writes can no
    longer be trusted to match the engine (a write whose outcome is unknown), if so."""

    lost: str | None

    def fence(self, epoch: int, node: str) -> None: ...
    async def leader(self) -> LeaderRow: ...
    async def claim(self, node: str, address: str, hold_for: float) -> int | None: ...
    async def renew(self, epoch: int, node: str) -> bool: ...


class ClusterStore(LeaderStore, Protocol):
    """The leadership calls and the cluster's key (PostgresStore), for the daemon."""

    async def cluster_key(self, public: bytes | None = None) -> bytes | None: ...


class Leadership:
    """This node's part in the cluster: `campaign` until it leads, then `hold`."""

    def __init__(
        self,
        store: LeaderStore,
        *,
        node: str,
        address: str,
        ttl: float,
        lock_delay: float,
        monotonic: Callable[[], float] = boottime,
    ) -> None:
        self.store = store
        self.node = node
        self.address = address  # where clients reach this node
        self.ttl = ttl
        self.lock_delay = lock_delay
        self._monotonic = monotonic
        self.epoch: int | None = None  # while leading
        self.deadline = float("-inf")  # monotonic: answer until then
        self.leader_address = ""  # the leader's address as last seen ("" unknown)
        self._holding: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self.epoch is not None and self._monotonic() < self.deadline

    def refusal(self) -> LicdError | None:
        """What a request other than hello gets while this node may not answer: None
        while it leads and its deadline has not passed."""
        if self.leading:
            return None
        leader = self.leader_address if self.leader_address != self.address else ""
        detail: dict[str, Any] = {"reason": "standby"}
        if leader:
            detail["leader"] = leader
        where = f"; the leader is at {leader}" if leader else ""
        return Unavailable(
            f"this licd is a standby of a cluster{where}",
            retry_after=max(1.0, self.ttl / 3),
            detail=detail,
        )

    async def campaign(self) -> int:
        """Wait until this node leads; returns its epoch. Meanwhile `leader_address`
        follows the row (for redirects). Database failures are logged and retried."""
        hold_for = self.ttl + self.lock_delay
        logged = ""
        while True:
            wait = self.ttl / 3
            try:
                row = await self.store.leader()
                self.leader_address = row.address
                if not row.node or row.age > hold_for:
                    sent = self._monotonic()
                    epoch = await self.store.claim(self.node, self.address, hold_for)
                    if epoch is not None:
                        self._lead(epoch, sent)
                        log.info("event=leader_elected node=%s epoch=%d", self.node, epoch)
                        return epoch
                elif row.node != logged:
                    logged = row.node
                    log.info(
                        "event=standby leader=%s address=%s epoch=%d",
                        row.node,
                        row.address,
                        row.epoch,
                    )
                else:
                    # Look again when the leader's renewal would be overdue, not later.
                    wait = min(wait, max(0.1, hold_for - row.age + 0.05))
            except StoreError as exc:
                log.warning("event=campaign_failed error=%r", str(exc))
            await asyncio.sleep(wait)

    def _lead(self, epoch: int, sent: float) -> None:
        self.epoch = epoch
        self.deadline = sent + self.ttl
        self.leader_address = self.address
        self.store.fence(epoch, self.node)

    def start_holding(self) -> None:
        """Start renewing (`hold`) at once: the leader loads its state meanwhile."""
        self._holding = asyncio.get_running_loop().create_task(self.hold(), name="leadership")

    async def watch(self) -> None:
        """Until the leadership is lost: raises LeadershipLost then (the daemon stops)."""
        if self._holding is None:
            raise LeadershipLost("this node never led")
        await asyncio.shield(self._holding)

    def stop(self) -> None:
        """Stop renewing (the daemon has stopped; its store let the leadership go)."""
        if self._holding is not None:
            self._holding.cancel()
        self.deadline = float("-inf")

    async def hold(self) -> None:
        """Renew every ttl/3 while leading; raises LeadershipLost when another node
        holds the row, or when the deadline passed without a renewal."""
        epoch = self.epoch
        if epoch is None:
            raise LeadershipLost("this node never led")
        while True:
            if self.store.lost is not None:
                self._lost(self.store.lost)
            sent = self._monotonic()
            try:
                async with asyncio.timeout(max(0.0, self.deadline - sent)):
                    renewed = await self.store.renew(epoch, self.node)
            except (StoreError, TimeoutError) as exc:
                if self._monotonic() >= self.deadline:
                    self._lost(
                        f"no renewal by the deadline ({str(exc) or 'the database did not answer'})"
                    )
                log.warning("event=leader_renew_failed error=%r", str(exc))
                renewed = None
            if renewed is False:
                self._lost("another node took the leadership over")
            if renewed:
                self.deadline = sent + self.ttl
            await asyncio.sleep(
                self.ttl / 3 if renewed else min(1.0, max(0.0, self.deadline - self._monotonic()))
            )

    def _lost(self, why: str) -> None:
        log.error("event=leadership_lost node=%s epoch=%s reason=%r", self.node, self.epoch, why)
        self.deadline = float("-inf")
        if self.store.lost is None:
            self.store.lost = f"the leadership was lost ({why})"  # no write, no release
        raise LeadershipLost(why)


class StandbyAnswers:
    """A standby's answers, frame by frame: `hello` as any licd answers it (so clients
    learn the site's key and find the cluster), everything else the refusal."""

    def __init__(self, signer: Signer, leadership: Leadership, wall: Callable[[], float]) -> None:
        self.signer = signer
        self.leadership = leadership
        self._wall = wall

    def answer(self, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The reply map, and whether to close the connection after it (a frame that
        is no request, or a malformed hello)."""
        rid = data.get("id") if isinstance(data.get("id"), int) else None
        try:
            if data.get("op") != "hello":
                raise self.leadership.refusal() or Unavailable("this licd is starting")
            request = parse_request(data)
            assert isinstance(request, Hello)
            return hello_reply(request, self.signer, self._wall()).to_wire(), False
        except LicdError as exc:
            return error_reply(rid, exc, Audience.CLIENT, data.get("op"))

    @staticmethod
    def refuse(exc: LicdError) -> dict[str, Any]:
        """The frame for an error outside any request (a frame too large, or one that
        cannot be decoded); the connection is closed after it."""
        return error_reply(None, exc, Audience.CLIENT)[0]
