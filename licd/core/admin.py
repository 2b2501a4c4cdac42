"""The admin ops: what `licd status`, `leases`, `why`, `queue`, `revoke`, `licence ...`,
`entitlement ...`, `audit`, `reload`, `key` and `report usage` ask of the daemon over
the admin socket (admin_server.py).

Each op parses its arguments strictly, calls the service or the daemon, and shapes the
results (docs/admin.md). Every action is recorded with the admin's uid. It never decides
seat rules itself and never returns a lease secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from licd import __version__
from licd.config.settings import licence_from_mapping, licence_to_mapping
from licd.core.entitlements import Entitlements
from licd.core.events import Event
from licd.core.router import Router
from licd.core.service import LicenceService
from licd.engine import Availability, Licence, SeatLease
from licd.engine.lease_filter import LeaseFilter
from licd.store.records import Forwarded
from licd_client.entitlements import request_file
from licd_client.errors import BadRequest, UnknownLicence
from licd_client.messages import MAX_STORED_INT, Fields, Holder

log = logging.getLogger(__name__)

MAX_PAGE = 5000
MAX_ENTITLEMENT_FILE = 512 * 1024  # characters of an entitlement file sent to import
MAX_AUDIT_WAIT = 60.0  # longest an `audit` request with `wait` is held open


class DaemonView(Protocol):
    """What the admin interface needs of the daemon beyond the service."""

    @property
    def started(self) -> float: ...
    @property
    def uptime(self) -> float: ...
    @property
    def listen(self) -> list[str]: ...
    @property
    def site(self) -> str: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def connections(self) -> int: ...
    @property
    def router(self) -> Router | None: ...
    @property
    def entitlements(self) -> Entitlements: ...
    async def reload(self, *, admin_uid: int | None = None) -> dict[str, Any]: ...


def licence_status(licence: Licence, usage: Availability, now: float) -> dict[str, Any]:
    """A licence's terms (all but its key) and its state now: `seats` and `features` are
    those in force (add-ons included); `base_seats` and `base_features` the licence's own;
    `reserved` and `available` as the `available` op counts them."""
    days_left = None if licence.expires is None else (licence.expires - now) / 86400
    terms = licence_to_mapping(licence)
    del terms["key"]
    return {
        **terms,
        "base_seats": licence.seats,
        "seats": usage.total,
        "features": licence.features_at(now),
        "base_features": dict(licence.features),
        "in_use": usage.in_use,
        "reserved": usage.reserved,
        "available": usage.available,
        "days_left": days_left,
    }


def lease_listing(lease: SeatLease, borrowed: bool = False) -> dict[str, Any]:
    """A lease as admins see it: everything but its secret. `borrowed`: it is a borrow
    (longer than its licence's borrow_after)."""
    h = lease.holder
    return {
        "handle": lease.handle,
        "licence": lease.licence_id,
        "host": h.host,
        "hostid": h.hostid,
        "user": h.user,
        "pid": h.pid,
        "app": h.app,
        "instance": h.instance,
        "ip": lease.ip,
        "seats": lease.seats,
        "since": lease.created,
        "expires": lease.expires,
        "last_heartbeat": lease.last_heartbeat,
        "state": lease.state.value,
        "borrowed": borrowed,
    }


def forwarded_listing(item: Forwarded) -> dict[str, Any]:
    """A forward-mode lease as a router's admins see it (the seat is held upstream)."""
    h = item.holder
    return {
        "handle": item.handle,
        "licence": item.licence_id,
        "host": h.host,
        "hostid": h.hostid,
        "user": h.user,
        "pid": h.pid,
        "app": None,
        "instance": None,
        "ip": item.ip,
        "seats": item.seats,
        "since": item.created,
        "expires": item.expires,
        "last_heartbeat": None,
        "state": "forwarded",
        "borrowed": False,
    }


def _epoch_to_datetime(value: Any, name: str) -> Any:
    """Admin requests carry times as epoch floats; the licence reader wants datetimes."""
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"licence.{name} must be a time in seconds since the epoch")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, ValueError, OSError):
        raise BadRequest(f"licence.{name} must fall within the years 1 to 9999 in UTC") from None


def _with_datetimes(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The mapping with its times as datetimes, and without None values."""
    out = dict(data)
    for name in names:
        if name in out:
            out[name] = _epoch_to_datetime(out[name], name)
    return {k: v for k, v in out.items() if v is not None}


def _parse_licence(data: dict[str, Any], groups: Mapping[str, tuple[str, ...]]) -> Licence:
    fields_ = _with_datetimes(data, ("not_before", "expires"))
    addons = fields_.get("addon")
    if isinstance(addons, list):
        fields_["addon"] = [
            _with_datetimes(a, ("starts", "ends")) if isinstance(a, dict) else a for a in addons
        ]
    return licence_from_mapping(fields_, "admin request", groups)


class AdminOps:
    """The admin ops, independent of the socket (tests call them directly too)."""

    def __init__(self, service: LicenceService, daemon: DaemonView) -> None:
        self.service = service
        self.daemon = daemon
        self._audit_wakeup = asyncio.Event()
        self.closing = False
        self.long_polls = 0  # `audit` requests waiting for an entry
        self.long_polling = asyncio.Event()  # set while there are any
        service.events.subscribe(self._on_event)
        self._ops: dict[str, Callable[[Fields, int], Awaitable[dict[str, Any]]]] = {
            "status": self.status,
            "leases": self.leases,
            "why": self.why,
            "queue": self.queue,
            "groups": self.groups,
            "revoke": self.revoke,
            "licence.list": self.licence_list,
            "licence.add": self.licence_add,
            "licence.update": self.licence_update,
            "licence.remove": self.licence_remove,
            "entitlement.import": self.entitlement_import,
            "entitlement.list": self.entitlement_list,
            "entitlement.request": self.entitlement_request,
            "audit": self.audit,
            "reload": self.reload,
            "key": self.key,
        }

    def _on_event(self, _: Event) -> None:
        self._audit_wakeup.set()

    def close(self) -> None:
        """Shutting down: answer waiting `audit` requests now."""
        self.closing = True
        self._audit_wakeup.set()

    async def handle(self, data: dict[str, Any], uid: int) -> dict[str, Any]:
        f = Fields(data, "admin request", BadRequest)
        rid = f.uint("id")
        op = f.text("op", max_len=32)
        handler = self._ops.get(op)
        if handler is None:
            raise BadRequest(f"unknown admin op {op!r}; known: {', '.join(sorted(self._ops))}")
        f.rename(op)
        result = await handler(f, uid)
        f.done()
        return {"id": rid, "ok": True, **result}

    # ------------------------------------------------------------------ queries

    async def status(self, f: Fields, uid: int) -> dict[str, Any]:
        engine, d = self.service.engine, self.daemon
        now = self.service.now().wall
        return {
            "version": __version__,
            "started": d.started,
            "uptime": d.uptime,
            "site": d.site,
            "listen": d.listen,
            "key": d.public_key.hex(),
            "connections": d.connections,
            "licences": [
                {
                    **licence_status(x, engine.usage(x, now), now),
                    "mode": self._mode(x.id),
                    "counters": self._counters(x),
                }
                for x in sorted(engine.licences, key=lambda x: x.id)
            ],
            "upstream": d.router.status() if d.router is not None else None,
        }

    def _counters(self, licence: Licence) -> list[dict[str, Any]]:
        at = self.service.now()
        out = []
        for counter in licence.counter:
            state = self.service.engine.counters.state(licence.id, counter, at)
            out.append(
                {
                    "name": counter.name,
                    "used": state.used,
                    "limit": counter.limit,
                    "remaining": max(0, counter.limit - state.used),
                    "reset": counter.reset,
                    "period_start": state.period_start,
                }
            )
        return out

    def _mode(self, licence_id: str) -> str:
        """How a licence is served: "forward" or "block" (relayed from upstream),
        "entitled" (a vendor's entitlement), or "local"."""
        router = self.daemon.router
        if router is not None and licence_id in router.modes:
            return router.modes[licence_id]
        return "entitled" if licence_id in self.service.engine.entitled else "local"

    def _serves(self, licence_id: str) -> bool:
        """Is this a licence of the daemon's own or one relayed from upstream?"""
        router = self.daemon.router
        return self.service.engine.licence_by_id(licence_id) is not None or (
            router is not None and router.is_relayed(licence_id)
        )

    def _refuse_relayed(self, licence_id: str) -> None:
        router = self.daemon.router
        if router is not None and router.is_relayed(licence_id):
            raise BadRequest(
                f"licence {licence_id!r} is relayed from upstream: change it in the config file"
            )

    async def leases(self, f: Fields, uid: int) -> dict[str, Any]:
        chosen = LeaseFilter(
            licence=f.text("licence", max_len=64, required=False),
            host=f.text("host", max_len=255, required=False),
            user=f.text("user", max_len=255, required=False),
            after=f.text("after", max_len=64, required=False),
        )
        limit = f.uint("limit", required=False, maximum=MAX_PAGE) or 1000
        only_borrowed = f.flag("borrowed", False)
        if chosen.licence is not None and not self._serves(chosen.licence):
            raise UnknownLicence(f"no licence with id {chosen.licence!r}")
        # A router's forward-mode leases are listed too: their seats are held upstream.
        router = self.daemon.router
        leases: list[SeatLease | Forwarded] = [
            *self.service.engine.leases,
            *self.service.engine.lingering,  # state "lingering": kept for their holders
        ]
        leases += router.forwarded_listing() if router is not None else []
        if only_borrowed:
            leases = [x for x in leases if self._borrowed(x)]
        page, after = chosen.page(leases, limit)
        return {
            "leases": [
                lease_listing(x, self._borrowed(x))
                if isinstance(x, SeatLease)
                else forwarded_listing(x)
                for x in page
            ],
            "next": after,
        }

    def _borrowed(self, item: SeatLease | Forwarded) -> bool:
        if not isinstance(item, SeatLease):
            return False
        licence = self.service.engine.licence_by_id(item.licence_id)
        return licence is not None and licence.borrows(item.ttl)

    async def why(self, f: Fields, uid: int) -> dict[str, Any]:
        """Every checkout rule's verdict for a holder asking now, in the order of
        decision (engine.explain); nothing is granted. `decision` is what a checkout
        would get: "granted", "overdraft" (granted, flagged) or the error code, and
        `rule` the rule that decides it (the first refusal)."""
        licence_id = f.nonempty_str("licence", max_len=64)
        host = f.nonempty_str("host", max_len=255)
        holder = Holder(
            host=host,
            hostid=f.text("hostid", max_len=255, required=False) or host,
            user=f.text("user", max_len=255, required=False) or "",
            pid=0,
        )
        ip = f.text("ip", max_len=64, required=False)
        seats = f.uint("seats", required=False, maximum=MAX_STORED_INT) or 1
        ttl = f.number("ttl", required=False, positive=True)
        engine = self.service.engine
        licence = engine.licence_by_id(licence_id)
        if licence is None:
            raise UnknownLicence(f"no licence with id {licence_id!r}")
        verdicts = engine.explain(
            licence.key, holder, self.service.now(), seats=seats, ttl=ttl, ip=ip
        )
        deciding = next((v for v in verdicts if not v.passed), None)
        if deciding is not None and deciding.error is not None:
            decision = deciding.error.code
        else:
            decision = "overdraft" if any(v.flagged for v in verdicts) else "granted"
        return {
            "licence": licence.id,
            "holder": {"host": holder.host, "hostid": holder.hostid, "user": holder.user},
            "ip": ip,
            "seats": seats,
            "decision": decision,
            "rule": deciding.rule if deciding is not None else None,
            "verdicts": [v.as_dict() for v in verdicts],
        }

    async def queue(self, f: Fields, uid: int) -> dict[str, Any]:
        """The checkouts waiting in the licences' queues (of one licence: `licence`), each
        queue in the order it is served."""
        licence_id = f.text("licence", max_len=64, required=False)
        engine = self.service.engine
        if licence_id is not None and engine.licence_by_id(licence_id) is None:
            raise UnknownLicence(f"no licence with id {licence_id!r}")
        now = self.service.now()
        out = []
        for lid in sorted(engine.queues):
            if licence_id is not None and lid != licence_id:
                continue
            for waiter in engine.queues[lid]:
                position, waiting, wait = engine.position(waiter)
                h = waiter.holder
                out.append(
                    {
                        "licence": lid,
                        "position": position,
                        "waiting": waiting,
                        "host": h.host,
                        "hostid": h.hostid,
                        "user": h.user,
                        "app": h.app,
                        "instance": h.instance,
                        "ip": waiter.ip,
                        "seats": waiter.seats,
                        "priority": waiter.priority,
                        "since": waiter.since_wall,
                        "waited": max(0.0, now.wall - waiter.since_wall),
                        "wait": wait,
                        "connected": waiter.attached,
                        "blocked_by": waiter.blocked_by,
                    }
                )
        return {"queue": out}

    async def groups(self, f: Fields, uid: int) -> dict[str, Any]:
        """The [groups] in force: each group's rules, by name (`report usage --by group`)."""
        f.done()
        groups = self.service.engine.groups
        return {"groups": {name: list(groups[name]) for name in sorted(groups)}}

    async def licence_list(self, f: Fields, uid: int) -> dict[str, Any]:
        show_keys = f.flag("show_keys", False)
        engine = self.service.engine
        now = self.service.now().wall
        out = []
        for licence in sorted(engine.licences, key=lambda x: x.id):
            item = licence_status(licence, engine.usage(licence, now), now)
            if show_keys:
                item["key"] = licence.key
            out.append(item)
        return {"licences": out}

    async def audit(self, f: Fields, uid: int) -> dict[str, Any]:
        after = f.uint("after", required=False, maximum=MAX_STORED_INT) or 0
        since = f.number("since", required=False)
        until = f.number("until", required=False)
        limit = f.uint("limit", required=False, maximum=MAX_PAGE) or 1000
        wait = min(f.number("wait", required=False) or 0.0, MAX_AUDIT_WAIT)
        f.done()
        store = self.service.store
        self._audit_wakeup.clear()  # before the read: an event during it still wakes us
        entries = await store.audit(after=after, since=since, until=until, limit=limit)
        if not entries and wait > 0 and not self.closing:
            self.long_polls += 1
            self.long_polling.set()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._audit_wakeup.wait()
            finally:
                self.long_polls -= 1
                if not self.long_polls:
                    self.long_polling.clear()
            await store.barrier()  # what woke us is committed (or failed) by now
            entries = await store.audit(after=after, since=since, until=until, limit=limit)
        return {
            "entries": [e.to_json() for e in entries],
            "last": entries[-1].id if entries else after,
        }

    async def key(self, f: Fields, uid: int) -> dict[str, Any]:
        return {"key": self.daemon.public_key.hex()}

    # ------------------------------------------------------------------ actions

    async def revoke(self, f: Fields, uid: int) -> dict[str, Any]:
        handles = f.strings("handles", max_len=64)
        host = f.text("host", max_len=255, required=False)
        user = f.text("user", max_len=255, required=False)
        reason = f.text("reason", max_len=1024, required=False) or ""
        f.done()  # every argument read and checked before anything is done
        if not handles and host is None and user is None:
            raise BadRequest("revoke: name handles, a host or a user")
        revoked = await self.service.revoke(
            handles=handles, host=host, user=user, reason=reason, admin_uid=uid
        )
        return {"revoked": [x.handle for x in revoked]}

    async def licence_add(self, f: Fields, uid: int) -> dict[str, Any]:
        data = f.mapping("licence")
        f.done()
        async with self.service.licence_edits:
            licence = _parse_licence(data, self.service.engine.groups)
            self._refuse_relayed(licence.id)
            if self.service.engine.licence_by_id(licence.id) is not None:
                raise BadRequest(f"licence {licence.id!r} exists already: use licence update")
            result = await self.service.put_licence(licence, admin_uid=uid)
        return {"result": result, "licence": licence.id}

    async def licence_update(self, f: Fields, uid: int) -> dict[str, Any]:
        licence_id = f.text("licence", max_len=64)
        changes = f.mapping("changes")
        # Feature edits merged here, under the lock, so two at once both take effect.
        drop = f.strings("drop_features", max_len=255)
        put = f.mapping("set_features", required=False) or {}
        f.done()
        self._refuse_relayed(licence_id)
        if "id" in changes and changes["id"] != licence_id:
            raise BadRequest("licence update cannot change a licence's id")
        async with self.service.licence_edits:
            current = self.service.engine.licence_by_id(licence_id)
            if current is None:
                raise UnknownLicence(f"no licence with id {licence_id!r}")
            merged = {**licence_to_mapping(current), **changes}
            if drop or put:
                features = dict(merged.get("features") or {})
                for name in drop:
                    features.pop(name, None)
                merged["features"] = features | put
            licence = _parse_licence(merged, self.service.engine.groups)
            result = await self.service.put_licence(licence, admin_uid=uid)
        return {"result": result, "licence": licence.id}

    async def licence_remove(self, f: Fields, uid: int) -> dict[str, Any]:
        licence_id = f.text("licence", max_len=64)
        force = f.flag("force", False)
        f.done()
        self._refuse_relayed(licence_id)
        async with self.service.licence_edits:
            revoked = await self.service.remove_licence(licence_id, force=force, admin_uid=uid)
        return {"removed": licence_id, "revoked": [x.handle for x in revoked]}

    async def entitlement_import(self, f: Fields, uid: int) -> dict[str, Any]:
        text = f.text("text", max_len=MAX_ENTITLEMENT_FILE)
        name = f.text("source", max_len=1024, required=False)
        f.done()
        outcomes = await self.daemon.entitlements.import_text(
            text, admin_uid=uid, source=f"admin {name}" if name else "admin"
        )
        return {"entitlements": [dataclasses.asdict(x) for x in outcomes]}

    async def entitlement_list(self, f: Fields, uid: int) -> dict[str, Any]:
        f.done()
        ents = self.daemon.entitlements
        return {
            "entitlements": ents.listing(),
            "key": self.daemon.public_key.hex(),
            "site_components": list(ents.components),
            "vendor_keys": sorted(k.hex() for k in ents.vendor_keys),
        }

    async def entitlement_request(self, f: Fields, uid: int) -> dict[str, Any]:
        f.done()
        ents = self.daemon.entitlements
        if not ents.held:
            raise BadRequest("this daemon holds no entitlement: there is nothing to renew")
        return {
            "request": request_file(await ents.request()),
            "licences": sorted(ents.held),
        }

    async def reload(self, f: Fields, uid: int) -> dict[str, Any]:
        f.done()
        return await self.daemon.reload(admin_uid=uid)
