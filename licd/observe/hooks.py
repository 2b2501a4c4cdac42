"""Alert hooks: the operator's command, run for each alert with the alert on stdin.

`HookRunner` runs hooks as background tasks, bounded: at most `running` at once and
`pending` started in all, beyond which a hook is dropped (logged), so a storm of alerts
cannot pile up processes. `run_hook_command` runs one command with a deadline and kills
its whole process group past it. A hook that fails, hangs or is missing is logged, never
raised: alerts must not harm the daemon. Which alerts fire is `licd.observe.alerts`'s
business, not this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

#: Hooks running at once, and waiting at most (beyond that an alert's hook is dropped).
MAX_HOOKS_RUNNING = 4
MAX_HOOKS_PENDING = 64
#: Bytes of a hook's stdout and stderr kept for the log; the rest is read and discarded.
HOOK_OUTPUT_LOGGED = 2048
PIPE_LINGER = 1.0


class HookInput(Protocol):
    """What a hook is run for (an `Alert`): its kind, for the log, and its JSON line."""

    @property
    def kind(self) -> str: ...

    def to_json(self) -> bytes: ...


class HookRunner:
    """Runs hooks in the background within its bounds, and drains them at shutdown."""

    def __init__(
        self, *, running: int = MAX_HOOKS_RUNNING, pending: int = MAX_HOOKS_PENDING
    ) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(running)
        self._max_pending = pending

    def start(self, hook: Callable[[], Awaitable[None]], kind: str) -> None:
        """Run `hook()` (for an alert of `kind`) in a task, or drop it, saying why."""
        if len(self._tasks) >= self._max_pending:
            log.warning("event=alert_hook_dropped kind=%s reason=too_many_pending", kind)
            return
        try:
            task = asyncio.get_running_loop().create_task(self._run(hook, kind))
        except RuntimeError:  # no event loop: nothing could run it
            log.warning("event=alert_hook_dropped kind=%s reason=no_event_loop", kind)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, hook: Callable[[], Awaitable[None]], kind: str) -> None:
        async with self._slots:
            try:
                await hook()
            except Exception:
                log.exception("event=alert_hook_failed kind=%s", kind)

    @property
    def pending(self) -> int:
        """Hooks started and not yet finished (running or waiting for a slot)."""
        return len(self._tasks)

    async def drain(self, grace: float | None = None) -> None:
        """Wait for every started hook; after `grace` seconds cancel (kill) what still runs."""
        try:
            async with asyncio.timeout(grace):
                while self._tasks:
                    await asyncio.wait(set(self._tasks))
        except TimeoutError:
            tasks = set(self._tasks)
            log.warning("event=alert_hooks_cancelled count=%d", len(tasks))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# --- the hook command -----------------------------------------------------------------


async def run_hook_command(command: Sequence[str], alert: HookInput, kill_after: float) -> None:
    """Run `command` with `alert` as JSON on stdin; kill it (and its process group) after
    `kill_after` seconds. Its output is logged, truncated. Failures are logged, never raised.
    """
    name = os.path.basename(command[0]) if command else "?"
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so a kill reaches its children
        )
    except (OSError, ValueError) as exc:
        log.warning("event=alert_hook_failed kind=%s hook=%s error=%r", alert.kind, name, str(exc))
        return
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    readers = [asyncio.create_task(_head(proc.stdout)), asyncio.create_task(_head(proc.stderr))]
    finished = False
    try:
        async with asyncio.timeout(kill_after):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(alert.to_json())
                await proc.stdin.drain()
                proc.stdin.close()
            status = await proc.wait()
            # Its output ends when every process holding the pipes (children too) has gone.
            stdout, stderr = [await reader for reader in readers]
            finished = True
    except TimeoutError:
        log.warning(
            "event=alert_hook_timeout kind=%s hook=%s timeout=%g", alert.kind, name, kill_after
        )
        return
    finally:
        if not finished:  # timed out or cancelled: kill the whole group, children included
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
            # The pipes end once the killed group is gone; reading them to their end lets
            # asyncio close the process transport.
            await asyncio.wait(readers, timeout=PIPE_LINGER)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    level = logging.INFO if status == 0 else logging.WARNING
    log.log(
        level,
        "event=alert_hook_done kind=%s hook=%s status=%d stdout=%r stderr=%r",
        alert.kind,
        name,
        status,
        stdout,
        stderr,
    )


async def _head(stream: asyncio.StreamReader) -> str:
    """The first HOOK_OUTPUT_LOGGED bytes of `stream` as text; the rest is read and dropped."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk[: HOOK_OUTPUT_LOGGED - len(kept)]
    text = kept.decode("utf-8", "replace").strip()
    return text + " [truncated]" if len(kept) >= HOOK_OUTPUT_LOGGED else text
