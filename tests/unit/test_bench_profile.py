"""The benchmark's profile reading (benchmarks/profile.py): which py-spy samples are the
event loop's, on the standard loop and on uvloop (whose loop runs in C, so a
callback's frames sit right below `Runner.run`), and which are the store's threads'."""

from __future__ import annotations

from benchmarks.profile import parse_collapsed

MAIN = ";".join(
    [
        "<module> (licd/__main__.py:5)",
        "serve (licd/cli/main.py:116)",
        "Runner.run (asyncio/runners.py:118)",
    ]
)
ASYNCIO = ";".join(
    [
        MAIN,
        "BaseEventLoop.run_until_complete (asyncio/base_events.py:640)",
        "BaseEventLoop.run_forever (asyncio/base_events.py:607)",
        "BaseEventLoop._run_once (asyncio/base_events.py:1922)",
    ]
)
THREAD = "Thread._bootstrap (threading.py:995);Thread.run (threading.py:975)"


def test_uvloop_and_asyncio_loops_are_the_loop_and_threads_are_not() -> None:
    text = "\n".join(
        [
            f"{MAIN};ServerConnection._write (licd/shells/server.py:250) 7",  # uvloop
            f"{ASYNCIO};Dispatcher.handle (licd/core/dispatch.py:255) 3",
            f"{ASYNCIO};EpollSelector.select (selectors.py:468) 5",  # waiting
            f"{THREAD};_timed_commit (licd/store/sqlite.py:301) 2",
        ]
    )
    busy, others, idle, own, inclusive = parse_collapsed(text)
    assert (busy, others, idle) == (10, 2, 5)
    assert own["ServerConnection._write (licd/shells/server.py)"] == 7
    assert own["Dispatcher.handle (licd/core/dispatch.py)"] == 3
    assert inclusive["Runner.run (asyncio/runners.py)"] == 10
