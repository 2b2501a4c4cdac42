"""The hook runner: bounded background hooks drained at shutdown, and the hook command
(stdin, output, deadline, process group), run with real subprocesses."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace

import pytest

from licd.observe.alerts import Alert
from licd.observe.hooks import HOOK_OUTPUT_LOGGED, HookRunner, run_hook_command

NOW = 1_790_000_000.0

# --- the runner -----------------------------------------------------------------------


async def test_hooks_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    runner = HookRunner(running=2, pending=3)
    release = asyncio.Event()
    running = most = ran = 0

    async def hook() -> None:
        nonlocal running, most, ran
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        ran += 1

    for _ in range(5):
        runner.start(hook, "usage")
    assert runner.pending == 3
    dropped = "event=alert_hook_dropped kind=usage reason=too_many_pending"
    assert caplog.text.count(dropped) == 2
    for _ in range(5):  # every task gets its turn: two run, the third waits for a slot
        await asyncio.sleep(0)
    assert running == 2
    release.set()
    await runner.drain()
    assert (most, ran, runner.pending) == (2, 3, 0)


async def test_drain_cancels_hooks_that_outlast_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    runner = HookRunner()
    runner.start(forever, "usage")
    async with asyncio.timeout(10):  # a drain that never cancels fails here, not at 120 s
        await runner.drain(grace=0.01)
    assert runner.pending == 0
    assert "event=alert_hooks_cancelled count=1" in caplog.text


async def test_a_hook_that_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("hook broke")

    runner = HookRunner()
    runner.start(broken, "holder_silent")
    await runner.drain()
    assert "event=alert_hook_failed kind=holder_silent" in caplog.text
    assert "hook broke" in caplog.text  # the traceback is logged, not raised


def test_without_an_event_loop_the_hook_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    async def hook() -> None:
        raise AssertionError("never run")

    runner = HookRunner()
    runner.start(hook, "usage")
    assert runner.pending == 0
    assert "reason=no_event_loop" in caplog.text


# --- the hook command -----------------------------------------------------------------

ALERT = Alert("holder_silent", "cad", "lease h1 lapsed", NOW, {"handle": "h1"})


def script(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


async def test_hook_output_is_logged_truncated(caplog: pytest.LogCaptureFixture) -> None:
    code = "import sys; sys.stdout.write('x' * 100000); sys.stderr.write('oops')"
    with caplog.at_level(logging.INFO, logger="licd.observe.hooks"):
        await run_hook_command(script(code), ALERT, 30.0)
    [record] = [r for r in caplog.records if "alert_hook_done" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "status=0" in record.getMessage() and "stderr='oops'" in record.getMessage()
    assert "[truncated]" in record.getMessage()
    assert len(record.getMessage()) < 3 * HOOK_OUTPUT_LOGGED


async def test_a_hook_that_hangs_is_killed(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run_hook_command(script("import time; time.sleep(60)"), ALERT, 0.3)
    assert loop.time() - started < 10
    assert "event=alert_hook_timeout" in caplog.text


async def test_a_hook_whose_child_holds_the_pipes_is_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    code = "import subprocess; subprocess.Popen(['sleep', '60'])"  # exits, its child lingers
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run_hook_command(script(code), ALERT, 0.5)
    assert loop.time() - started < 10
    assert "event=alert_hook_timeout" in caplog.text


async def test_a_hook_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    await run_hook_command(script("import sys; sys.exit(1)"), ALERT, 30.0)
    assert "status=1" in caplog.text
    [record] = [r for r in caplog.records if "alert_hook_done" in r.getMessage()]
    assert record.levelno == logging.WARNING


async def test_a_missing_hook_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    await run_hook_command(("/nonexistent/licd-hook",), ALERT, 30.0)
    assert "event=alert_hook_failed" in caplog.text and "licd-hook" in caplog.text


async def test_a_hook_that_ignores_stdin_is_fine(caplog: pytest.LogCaptureFixture) -> None:
    big = replace(ALERT, detail={"pad": "x" * 300000})  # more than a pipe holds
    with caplog.at_level(logging.INFO, logger="licd.observe.hooks"):
        await run_hook_command(script("pass"), big, 30.0)
    assert "status=0" in caplog.text
