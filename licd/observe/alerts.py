"""Alerts: tell operators when a licence nears expiry, fills up, or its users are in trouble.

Theory of operation. Eight kinds, two sources:

- `check()` (every `check_interval`, from `run()`) reads the engine view. *licence_expiring*:
  each threshold of `expiry_days` fires once per licence when the time left drops to or
  below it; several crossed at once give one alert naming the smallest; a changed expiry
  (a renewal) re-arms them all. *usage*: each `usage_percent` level fires once when seats
  in use rise to or through it (several at once: one alert naming the highest) and is
  re-armed when usage falls below it again. *site_silent* (a vendor's licd): a site
  router's live block lease (one with `delegate`) not renewed for more than
  `site_silent` seconds (0: off), once per silence, re-armed by its next heartbeat.
- `on_event()` (an EventBus subscriber). *holder_silent*: every RECLAIM, a lease that
  lapsed without a checkin. *denials*: `denials` DENIED events of one licence within
  `denial_window` seconds (monotonic clock) raise one alert, then that licence is muted
  for a window, so a denial storm yields one alert per window, not one per denial.
  *overdraft*: a seat granted in a licence's overdraft, once per licence per window.
  *clock_rollback*: each CLOCK_ROLLBACK, the system clock found set back
  (licd.core.clock_guard). *renewal_failed*: each RENEWAL_FAILED, a router's block
  unrenewed for `renewals_missed` times its `renew_every` (licd.core.router).

Every alert is one WARNING log line, the `on_alert` callback (metrics) and, if a hook is
configured, the hook command with the alert as JSON on stdin, run in the background by
`licd.observe.hooks` (bounded; failures are logged, never raised). This module decides
which alerts fire and starts no process itself. State is in memory only: after a
restart, conditions still true alert once more.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from licd.config.settings import AlertsConfig
from licd.core.events import Event, Kind
from licd.engine import LeasePhase, SeatLease
from licd.observe.hooks import HookRunner, run_hook_command
from licd.observe.metrics import LicenceUsage
from licd_client.safetext import escape

log = logging.getLogger(__name__)

DAY = 86400.0


@dataclass(frozen=True)
class Alert:
    """One alert. `licence` is the public id (never a key); `time` is wall-clock seconds."""

    kind: str  # licence_expiring, usage, holder_silent, denials, overdraft, clock_rollback,
    # renewal_failed, site_silent
    licence: str | None
    message: str
    time: float
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The alert as one line of UTF-8 JSON: what a hook reads on stdin."""
        document = {
            "kind": self.kind,
            "licence": self.licence,
            "message": self.message,
            "time": self.time,
            "at": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="seconds"),
            "detail": self.detail,
        }
        return json.dumps(document, sort_keys=True, default=str).encode() + b"\n"


class AlertMonitor:
    """Watches the engine view and the event bus; raises each alert once, as above.

    `run_hook` replaces the hook command (tests); without it, `config.hook` (if set) is
    run by `run_hook_command`. `on_alert` is called for every alert (the metrics counter).
    `hooks` runs them; the daemon drains it at shutdown.
    """

    def __init__(
        self,
        config: AlertsConfig,
        engine_view: Callable[[float], Iterable[LicenceUsage]],
        *,
        wall: Callable[[], float],
        monotonic: Callable[[], float],
        on_alert: Callable[[Alert], None] | None = None,
        run_hook: Callable[[Alert], Awaitable[None]] | None = None,
        leases: Callable[[], Iterable[SeatLease]] = tuple,
    ) -> None:
        self._engine_view = engine_view
        self._leases = leases
        self._wall = wall
        self._monotonic = monotonic
        self._on_alert = on_alert
        self._injected_hook = run_hook
        # licence id -> (the expiry the fired thresholds belong to, thresholds fired)
        self._expiry_fired: dict[str, tuple[float, set[int]]] = {}
        self._usage_fired: dict[str, set[int]] = {}  # licence id -> levels reached
        # licence id (None: unknown keys) -> the last `denials` (monotonic time, reason)
        self._denials: dict[str | None, deque[tuple[float, str]]] = {}
        self._denials_muted: dict[str | None, float] = {}  # ... until this monotonic time
        # a site router's block lease (handle) -> the last heartbeat it was silent since
        self._silent_fired: dict[str, float] = {}
        self.hooks = HookRunner()
        self.config = config
        self.reconfigure(config)

    def reconfigure(self, config: AlertsConfig) -> None:
        """Apply a reloaded [alerts] table. Thresholds already fired stay fired; denial
        windows start afresh when their size or length changes."""
        old = self.config
        if (old.denials, old.denial_window) != (config.denials, config.denial_window):
            self._denials.clear()
            self._denials_muted.clear()
        self.config = config
        self._expiry_days = sorted(set(config.expiry_days))
        self._usage_percent = sorted(set(config.usage_percent))
        run_hook = self._injected_hook
        if run_hook is None and config.hook:
            run_hook = self._command_hook
        self._run_hook: Callable[[Alert], Awaitable[None]] | None = run_hook

    # ------------------------------------------------------------ the engine view

    def check(self) -> list[Alert]:
        """Evaluate expiry and usage now; returns (and raises) the alerts that fire."""
        now = self._wall()
        alerts: list[Alert] = []
        seen: set[str] = set()
        for usage in self._engine_view(now):
            seen.add(usage.id)
            expiring = self._check_expiry(usage, now)
            if expiring is not None:
                alerts.append(expiring)
            crowded = self._check_usage(usage, now)
            if crowded is not None:
                alerts.append(crowded)
        for gone in self._expiry_fired.keys() - seen:  # removed licences start afresh
            del self._expiry_fired[gone]
        for gone in self._usage_fired.keys() - seen:
            del self._usage_fired[gone]
        alerts += self._check_sites(now)
        for alert in alerts:
            self._raise(alert)
        return alerts

    def _check_sites(self, now: float) -> list[Alert]:
        """site_silent: each live site router's block lease (a lease with `delegate`)
        not renewed for more than `site_silent` seconds, once per silence (a heartbeat
        re-arms it; a lease gone is forgotten). `site_silent` 0: off."""
        limit = self.config.site_silent
        alerts: list[Alert] = []
        fired: dict[str, float] = {}
        for lease in self._leases() if limit > 0 else ():
            if lease.delegate is None or now - lease.last_heartbeat <= limit:
                continue
            if lease.state is not LeasePhase.LIVE:
                # Not yet, or no longer, committed: not told of; an alert given stays given.
                if lease.handle in self._silent_fired:
                    fired[lease.handle] = self._silent_fired[lease.handle]
                continue
            fired[lease.handle] = lease.last_heartbeat
            if self._silent_fired.get(lease.handle) == lease.last_heartbeat:
                continue  # told already, and not heard from since
            h = lease.holder
            site = escape(h.instance or "")
            alerts.append(
                Alert(
                    "site_silent",
                    lease.licence_id,
                    f"site {site} (host {escape(h.host)}) has not renewed its block of "
                    f"licence {lease.licence_id} for {(now - lease.last_heartbeat) / 3600:.1f} h",
                    now,
                    {
                        "handle": lease.handle,
                        "site": h.instance,
                        "host": h.host,
                        "hostid": h.hostid,
                        "seats": lease.seats,
                        "last_heartbeat": lease.last_heartbeat,
                    },
                )
            )
        self._silent_fired = fired  # gone, or heard from since: re-armed
        return alerts

    def _check_expiry(self, usage: LicenceUsage, now: float) -> Alert | None:
        if usage.expires is None:
            self._expiry_fired.pop(usage.id, None)
            return None
        record = self._expiry_fired.get(usage.id)
        if record is None or record[0] != usage.expires:
            record = (usage.expires, set())  # new, or its expiry changed: re-armed
            self._expiry_fired[usage.id] = record
        fired = record[1]
        days_left = (usage.expires - now) / DAY
        crossed = {days for days in self._expiry_days if days_left <= days}
        if not crossed - fired:
            return None
        fired |= crossed
        threshold = min(crossed)
        if days_left > 0:
            message = f"licence {usage.id} expires in {days_left:.1f} days"
        else:
            message = f"licence {usage.id} expired {-days_left:.1f} days ago"
        return Alert(
            "licence_expiring",
            usage.id,
            message,
            now,
            {
                "product": usage.product,
                "expires": usage.expires,
                "days_left": round(days_left, 3),
                "threshold_days": threshold,
            },
        )

    def _check_usage(self, usage: LicenceUsage, now: float) -> Alert | None:
        percent = 100.0 * usage.in_use / usage.total if usage.total > 0 else 0.0
        crossed = {level for level in self._usage_percent if percent >= level}
        fired = self._usage_fired.get(usage.id, set())
        self._usage_fired[usage.id] = crossed  # levels no longer reached are re-armed
        if not crossed - fired:
            return None
        threshold = max(crossed)
        return Alert(
            "usage",
            usage.id,
            f"licence {usage.id} has {usage.in_use} of {usage.total} seats in use"
            f" ({percent:.0f} %, threshold {threshold} %)",
            now,
            {
                "product": usage.product,
                "in_use": usage.in_use,
                "total": usage.total,
                "percent": round(percent, 1),
                "threshold_percent": threshold,
            },
        )

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Forever: `check()`, then wait `check_interval`. A failed check is logged."""
        while True:
            try:
                self.check()
            except Exception:
                log.exception("event=alert_check_failed")
            await sleep(self.config.check_interval)

    # ----------------------------------------------------------------- the events

    def on_event(self, event: Event) -> None:
        """EventBus subscriber: RECLAIM -> holder_silent; DENIED -> the denial window;
        an overdraft checkout -> overdraft; RENEWAL_FAILED -> renewal_failed;
        CLOCK_ROLLBACK -> clock_rollback."""
        if event.kind is Kind.RECLAIM:
            self._raise(self._holder_silent(event))
        elif event.kind is Kind.CHECKOUT and event.detail.get("overdraft"):
            self._overdraft(event)
        elif event.kind is Kind.DENIED:
            alert = self._count_denial(event)
            if alert is not None:
                self._raise(alert)
        elif event.kind is Kind.RENEWAL_FAILED:
            self._raise(self._renewal_failed(event))
        elif event.kind is Kind.CLOCK_ROLLBACK:
            behind = float(event.detail.get("behind", 0.0))
            self._raise(
                Alert(
                    "clock_rollback",
                    None,
                    f"the system clock is {behind:.0f} s behind the latest time licd has seen: "
                    "it was set back; vendor licences hold new grants until it is right",
                    event.time,
                    dict(event.detail),
                )
            )

    @staticmethod
    def _renewal_failed(event: Event) -> Alert:
        last = event.detail.get("last_renewal")
        since = (
            "since the router started"
            if not isinstance(last, int | float)
            else "since " + datetime.fromtimestamp(last, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        )
        return Alert(
            "renewal_failed",
            event.licence,
            f"the block of licence {event.licence} from upstream has not been renewed "
            f"{since}: {escape(event.reason or 'no answer')}",
            event.time,
            {**event.detail, "error": event.reason},
        )

    @staticmethod
    def _holder_silent(event: Event) -> Alert:
        return Alert(
            "holder_silent",
            event.licence,
            f"lease {event.handle} of licence {event.licence} lapsed without a checkin"
            f" (host {escape(event.host or '')}, user {escape(event.user or '')})",
            event.time,
            {
                "handle": event.handle,
                "host": event.host,
                "hostid": event.hostid,
                "user": event.user,
                "ip": event.ip,
                "seats": event.seats,
            },
        )

    def _count_denial(self, event: Event) -> Alert | None:
        cfg = self.config
        now = self._monotonic()
        recent = self._denials.get(event.licence)
        if recent is None:
            recent = self._denials[event.licence] = deque(maxlen=cfg.denials)
        recent.append((now, event.reason or "unknown"))
        if len(recent) < cfg.denials or recent[0][0] < now - cfg.denial_window:
            return None  # fewer than `denials` within the window
        if now < self._denials_muted.get(event.licence, now):
            return None  # already alerted for this window
        self._denials_muted[event.licence] = now + cfg.denial_window
        reasons = dict(Counter(reason for _, reason in recent))
        subject = f"licence {event.licence}" if event.licence else "unknown licence keys"
        return Alert(
            "denials",
            event.licence,
            f"{len(recent)} checkouts of {subject} denied within {cfg.denial_window:g} s",
            event.time,
            {"denials": len(recent), "window": cfg.denial_window, "reasons": reasons},
        )

    def _overdraft(self, event: Event) -> None:
        """A seat granted in overdraft: one alert per licence per denial window, so a
        licence living in its overdraft is reported without a storm."""
        now = self._monotonic()
        key = f"overdraft:{event.licence}"
        if now < self._denials_muted.get(key, now):
            return
        self._denials_muted[key] = now + self.config.denial_window
        in_use = event.detail.get("in_use")
        self._raise(
            Alert(
                "overdraft",
                event.licence,
                f"licence {event.licence} granted a seat in its overdraft ({in_use} in use)",
                event.time,
                {"in_use": in_use, "handle": event.handle, "host": event.host},
            )
        )

    # -------------------------------------------------------- raising an alert

    def _raise(self, alert: Alert) -> None:
        log.warning(
            "event=alert kind=%s licence=%s message=%r", alert.kind, alert.licence, alert.message
        )
        if self._on_alert is not None:
            try:
                self._on_alert(alert)
            except Exception:
                log.exception("event=alert_callback_failed kind=%s", alert.kind)
        if self._run_hook is not None:
            self.hooks.start(partial(self._run_hook, alert), alert.kind)

    async def _command_hook(self, alert: Alert) -> None:
        await run_hook_command(self.config.hook, alert, self.config.hook_timeout)
