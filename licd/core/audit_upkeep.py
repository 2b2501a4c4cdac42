"""Keeps the audit log bounded: denials folded into counted entries, old entries retired.

`DenialLog` (pure, clock injected) decides which denials become audit entries: the
first of a group (same peer address, licence, reason) at once, then at most one entry
per `interval` carrying how many more there were (`count`, `first`, `last` in its
detail). It holds at most `max_groups` groups; denials beyond that fold into one group
per reason with no address. So whatever a flood sends, at most
2 * (max_groups + len(REGISTRY)) entries are written per interval (docs/admin.md, "Limits").

`retire()` exports entries older than the retention period to JSON-lines files
(appended, fsynced) under the export directory, one per month, then deletes them
(migration 006 permits exactly that delete), in bounded chunks. Nothing here decides
seats or reads the wire; the service feeds `DenialLog`, the daemon runs `retire()`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from licd.core.events import Event
from licd.store.base import Store
from licd.store.records import AuditEntry
from licd_client.errors import REGISTRY

log = logging.getLogger(__name__)

DENIAL_INTERVAL = 60.0  # seconds a group of repeated denials is folded into one entry
MAX_GROUPS = 128  # groups with an address of their own; beyond: one per reason
#: The largest denial entry, in bytes of stored values: host, hostid and user at most
#: 255 characters each (4 bytes apiece in UTF-8: 3,060), the address, licence id, reason
#: and event name (~160), four numbers (32) and the detail (the engine's, at most a few
#: small numbers, plus count/first/last: well under 300).
MAX_ENTRY_BYTES = 4096
RETIRE_CHUNK = 1000  # entries exported and deleted per transaction
RETIRE_MAX_CHUNKS = 100  # chunks per `retire()` call; the next call goes on

GroupKey = tuple[str | None, str | None, str | None]  # (peer address, licence id, reason)


def max_entries_per_interval(max_groups: int = MAX_GROUPS) -> int:
    """The most denial entries `DenialLog` lets through in one interval."""
    return 2 * (max_groups + len(REGISTRY))


@dataclass
class _Group:
    opened: float  # monotonic time the group's interval began
    count: int = 0  # denials since the entry last written
    first: float = 0.0  # wall time of the first of them
    last: Event | None = None  # and the latest


class DenialLog:
    """Which denials to audit: see the module docstring."""

    def __init__(self, interval: float = DENIAL_INTERVAL, max_groups: int = MAX_GROUPS) -> None:
        self.interval = interval
        self.max_groups = max_groups
        self._groups: dict[GroupKey, _Group] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def note(self, event: Event, mono: float) -> Event | None:
        """Count one denial: the entry to write now (the first of its group), or None
        when it is folded into its group's next entry."""
        key: GroupKey = (event.ip, event.licence, event.reason)
        group = self._groups.get(key)
        if group is None and len(self._groups) >= self.max_groups:
            key = (None, None, event.reason)  # too many groups: one per reason
            group = self._groups.get(key)
        if group is None:
            self._groups[key] = _Group(opened=mono)
            return event
        if group.count == 0:
            group.first = event.time
        group.count += 1
        group.last = event
        return None

    def due(self, mono: float, *, every: bool = False) -> list[Event]:
        """The entries of groups whose interval is over (of every group: `every`). A
        group that counted denials stays open for another interval (so a steady stream
        is one entry per interval); one that counted none is closed."""
        out: list[Event] = []
        for key, group in list(self._groups.items()):
            if not every and mono - group.opened < self.interval:
                continue
            if group.count == 0 or group.last is None:
                del self._groups[key]
                continue
            last = group.last
            ip, licence, _ = key
            detail = {**last.detail, "count": group.count, "first": group.first, "last": last.time}
            out.append(replace(last, ip=ip, licence=licence, detail=detail))
            if every:
                del self._groups[key]
            else:
                self._groups[key] = _Group(opened=mono)
        return out


# ------------------------------------------------------------------------- retention


def export_file(directory: Path, time: float) -> Path:
    """The export file for an entry of `time`: audit-YYYY-MM.jsonl (UTC)."""
    month = datetime.fromtimestamp(time, UTC).strftime("%Y-%m")
    return directory / f"audit-{month}.jsonl"


def _append(directory: Path, entries: Sequence[AuditEntry]) -> None:
    """Append `entries` as JSON lines to their months' files and fsync them (blocking)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    by_file: dict[Path, list[str]] = {}
    for entry in entries:
        line = json.dumps(entry.to_json(), sort_keys=True, default=str, ensure_ascii=False)
        by_file.setdefault(export_file(directory, entry.event.time), []).append(line + "\n")
    for path, lines in by_file.items():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            data = "".join(lines).encode("utf-8")
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # the files' names too
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def retire(
    store: Store,
    *,
    cutoff: float,
    directory: Path,
    chunk: int = RETIRE_CHUNK,
    max_chunks: int = RETIRE_MAX_CHUNKS,
) -> int:
    """Export, then delete, the audit entries older than `cutoff` (wall time), oldest
    first, `chunk` at a time, at most `max_chunks` chunks. Returns how many were retired.

    Entries are read from the start of the log by id; those older than `cutoff` are
    exported and deleted, one that is not (a clock set back when it was written) is
    kept and passed over. A crash between the export and the delete exports the chunk
    again next time: a consumer may see an entry twice, with the same id."""
    retired = 0
    after = 0
    for _ in range(max_chunks):
        rows = await store.audit(after=after, limit=chunk)
        old = [e for e in rows if e.event.time < cutoff]
        if not old:
            break
        await asyncio.to_thread(_append, directory, old)
        await store.retire_audit(upto=rows[-1].id, cutoff=cutoff)
        retired += len(old)
        after = rows[-1].id
        if len(rows) < chunk:
            break
    if retired:
        log.info("event=audit_retired entries=%d before=%.0f export=%s", retired, cutoff, directory)
    return retired
