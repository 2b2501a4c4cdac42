"""Every fenced code block in README.md and docs/*.md runs as written against `make run`.

A block's language (the word after its opening fence) decides what is done with it:

- `python`: run as a program by the project's interpreter, with the environment the
  README tells a user to set (LICD_SERVER, and LICD_SERVER_KEY from `licd key show`);
  it must exit 0 and leave no seat held.
- `sh`: run by bash, the runnable blocks of one file in one shell in document order, as
  one terminal would (a block's test replays the blocks above it first, so each test
  stands alone). The shell starts as a new terminal does: no LICD_ variables set. A
  comment line at the start of a line, directly below a command, shows the command's
  output: the output (stdout and stderr, as a terminal shows them) must be exactly those
  lines, and a last line ending in `(exit N)` gives its exit status; a command shown
  without output must exit 0. Background jobs (`&`) are seat holders: before the next
  block, the test waits (bounded) until the daemon holds one lease per running job, as
  a reader sees each `licd-client checkout` print its lease before typing on.
- `toml`: loaded by the daemon's config loader (licd/config/settings.py). A fragment is merged
  into a minimal config first: keys before any table header, or `[[licence.NAME]]`
  tables without a `[[licence]]`, belong to a licence with a made-up key, id, product
  and seats (those the fragment sets are its own).
- `text`: an illustration (output samples, diagrams, layouts); nothing runs.

Every block needs a language: a block without one, or with a language not listed here,
fails (say `text` for an illustration). A block that cannot run in a test (needs root or
systemd, starts a long-running daemon, installs packages) is marked just above its
fence (blank lines between are allowed) with `<!-- doc-test: skip (REASON) -->`; it is
reported as skipped with its reason.

`make run` is `licd serve` on its embedded defaults; the test runs exactly that with
its state under a temporary XDG_STATE_HOME, except the port: the docs say
127.0.0.1:27500, so the daemon listens on a reserved free port instead (a real daemon
may hold 27500), and every occurrence of exactly `127.0.0.1:27500` in a python or sh
block is rewritten to that address before it runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from licd.cli.admin_client import AdminClient
from licd.config.settings import ConfigError, parse_config
from tests.integration.procs import (
    ROOT,
    RUN_TIMEOUT,
    STOP_TIMEOUT,
    DaemonProcess,
    child_env,
    licd_command,
    toml_value,
)
from tests.support import reserved_port

pytestmark = pytest.mark.slow

DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
DOCUMENTED_ADDRESS = "127.0.0.1:27500"
BLOCK_TIMEOUT = 60.0  # bound on one sh block (a few commands) or a python block
SETTLE_TIMEOUT = 20.0  # bound on the wait for the daemon's leases to match the jobs
_POLL = 0.02

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
_MARKER = re.compile(r"^\s*<!--\s*doc-test:(.*?)-->\s*$")
_SKIP = re.compile(r"\s*skip \((.+)\)\s*")
_STATUS = re.compile(r"^(.*?)\s*\(exit (\d+)\)$")
_HEADER = re.compile(r"^\s*\[", re.MULTILINE)
#: What a `toml` fragment's licence gets unless it sets the key itself.
_MINIMAL_LICENCE: dict[str, str | int] = {
    "key": "DOCS-0000-0000",
    "id": "docs",
    "product": "docs",
    "seats": 1,
}


# ---------------------------------------------------------------- finding blocks


@dataclass(frozen=True)
class Block:
    """One fenced code block: where its fence is, its language and its text."""

    doc: str  # the file, relative to the repository
    line: int  # the opening fence's line, from 1
    lang: str
    text: str
    skip: str | None  # the reason of its `doc-test: skip` marker

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def read_blocks(doc: Path, root: Path = ROOT) -> tuple[list[Block], list[str]]:
    """The fenced blocks of `doc`, and the problems found (unclosed fence, bad or
    orphaned marker)."""
    name = doc.relative_to(root).as_posix()
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    marker: tuple[int, str | None] | None = None  # (line, skip reason) awaiting its fence
    i = 0
    while i < len(lines):
        here = f"{name}:{i + 1}"
        fence = _FENCE.match(lines[i])
        found = _MARKER.match(lines[i])
        if found:
            if marker is not None:
                problems.append(f"{name}:{marker[0]}: a doc-test marker with no fence below")
            skip = _SKIP.fullmatch(found.group(1))
            if skip is None:
                problems.append(f"{here}: say `<!-- doc-test: skip (REASON) -->`")
            marker = (i + 1, skip.group(1).strip() if skip else None)
        elif fence:
            indent, ticks, info = fence.groups()
            end = i + 1
            while end < len(lines) and not re.fullmatch(
                rf"\s*{re.escape(ticks[0])}{{{len(ticks)},}}\s*", lines[end]
            ):
                end += 1
            if end == len(lines):
                problems.append(f"{here}: the fence is never closed")
            body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
            lang = info.split()[0] if info.strip() else ""
            reason = marker[1] if marker else None
            blocks.append(Block(name, i + 1, lang, "\n".join(body) + "\n", reason))
            marker = None
            i = end
        elif lines[i].strip() and marker is not None:
            problems.append(f"{name}:{marker[0]}: a doc-test marker with no fence below")
            marker = None
        i += 1
    if marker is not None:
        problems.append(f"{name}:{marker[0]}: a doc-test marker with no fence below")
    return blocks, problems


def _all_blocks() -> tuple[list[Block], list[str]]:
    blocks: list[Block] = []
    problems: list[str] = []
    for doc in DOCS:
        found, wrong = read_blocks(doc)
        blocks += found
        problems += wrong
    return blocks, problems


BLOCKS, PROBLEMS = _all_blocks()
LANGUAGES = ("python", "sh", "toml", "text")


def cases(lang: str) -> list[object]:
    """The blocks of `lang` as test parameters; marked ones skipped with their reason."""
    return [
        pytest.param(
            b, id=b.id, marks=[pytest.mark.skip(reason=f"{b.id}: {b.skip}")] if b.skip else []
        )
        for b in BLOCKS
        if b.lang == lang
    ]


def test_every_block_has_a_language_the_test_runs() -> None:
    unknown = [f"{b.id}: {b.lang or 'no language'}" for b in BLOCKS if b.lang not in LANGUAGES]
    assert PROBLEMS + unknown == []
    readme = {b.lang for b in BLOCKS if b.doc == "README.md" and not b.skip}
    assert {"python", "sh", "toml"} <= readme  # the reader found the README's examples


def test_the_reader_finds_fences_markers_and_their_problems(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "<!-- doc-test: skip (needs root) -->\n```sh\nsudo x\n```\n\n"
        "  ~~~~python extra\n  print(1)\n  ```\n  ~~~~\n"
        "<!-- doc-test: skip -->\n\ntext\n```\nplain\n",
        encoding="utf-8",
    )
    blocks, problems = read_blocks(doc, tmp_path)
    assert [(b.line, b.lang, b.text, b.skip) for b in blocks] == [
        (2, "sh", "sudo x\n", "needs root"),
        (6, "python", "print(1)\n```\n", None),
        (13, "", "plain\n", None),
    ]
    assert problems == [
        "x.md:10: say `<!-- doc-test: skip (REASON) -->`",
        "x.md:10: a doc-test marker with no fence below",
        "x.md:13: the fence is never closed",
    ]


# ---------------------------------------------------------------- the daemon


@dataclass(frozen=True)
class Site:
    """The daemon `make run` starts, and what a reader's terminal knows of it."""

    address: str  # host:port, standing in for DOCUMENTED_ADDRESS
    admin_socket: Path
    terminal: dict[str, str]  # a new terminal's environment: no LICD_ variables
    configured: dict[str, str]  # plus what the README tells the reader to export

    def rewrite(self, text: str) -> str:
        return text.replace(DOCUMENTED_ADDRESS, self.address)

    def settle(self, leases: int, what: str) -> None:
        """Wait (bounded) until the daemon holds exactly `leases` leases."""
        admin = AdminClient(self.admin_socket)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            held = admin.call("leases")["leases"]
            if len(held) == leases:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: the daemon holds {len(held)} leases: {held}")
            time.sleep(_POLL)


#: `licd serve` with no --config, as `make run` runs it, on `sys.argv[1]` for a port.
_SERVE_EMBEDDED = """\
import sys
import licd.config.settings
licd.config.settings.DEFAULT_LISTEN = (("127.0.0.1", int(sys.argv[1])),)
from licd.cli.main import main
main(["serve"], prog_name="licd")
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("make-run")
    terminal = {k: v for k, v in child_env().items() if not k.startswith("LICD_")}
    terminal["XDG_STATE_HOME"] = str(directory / "state")
    terminal["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), terminal["PATH"]))
    port = reserved_port()
    daemon = DaemonProcess(
        None,
        directory / "licd.stderr",
        command=[sys.executable, "-c", _SERVE_EMBEDDED, str(port)],
        env=terminal,
    )
    try:
        daemon.start()
        daemon.wait_for(r"event=ready")
        key = subprocess.run(
            licd_command("key", "show"),
            env=terminal,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=True,
        ).stdout.strip()
        address = f"127.0.0.1:{port}"
        configured = {**terminal, "LICD_SERVER": address, "LICD_SERVER_KEY": key}
        socket = Path(terminal["XDG_STATE_HOME"]) / "licd" / "admin.sock"
        yield Site(address, socket, terminal, configured)
        daemon.terminate()
    finally:
        daemon.kill()


# ---------------------------------------------------------------- python


@pytest.mark.parametrize("block", cases("python"))
def test_python_block_runs(block: Block, site: Site, tmp_path: Path) -> None:
    program = tmp_path / f"{block.doc.replace('/', '_')}_{block.line}.py"
    program.write_text(site.rewrite(block.text), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(program)],
        env=site.configured,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{block.id} exited {done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr
    site.settle(0, f"after {block.id}")


# ---------------------------------------------------------------- toml


def as_config(fragment: str) -> str:
    """`fragment` as a whole config: a licence's keys or tables get a minimal licence."""
    bare = tomllib.loads(_HEADER.split(fragment, maxsplit=1)[0])
    tables = tomllib.loads(fragment).get("licence")
    licence_keys = set(bare) | (set(tables) if isinstance(tables, dict) else set())
    if not licence_keys:
        return fragment
    minimal = [f"{k} = {toml_value(v)}" for k, v in _MINIMAL_LICENCE.items() if k not in bare]
    return "\n".join(["[[licence]]", *minimal, fragment])


@pytest.mark.parametrize("block", cases("toml"))
def test_toml_block_is_a_config_licd_loads(block: Block) -> None:
    try:
        parse_config(as_config(block.text), Path(block.id))
        rejected = ""
    except ConfigError as exc:
        rejected = str(exc)
    assert rejected == ""


def test_a_fragment_is_merged_into_a_minimal_config() -> None:
    one = parse_config(as_config('seats = 10\noverdraft = 2\n[groups]\ncad = ["user:a"]\n'), ROOT)
    assert [(x.key, x.seats, x.overdraft) for x in one.licences] == [("DOCS-0000-0000", 10, 2)]
    assert one.groups == {"cad": ("user:a",)}
    counter = parse_config(as_config('[[licence.counter]]\nname = "scans"\nlimit = 5\n'), ROOT)
    assert [c.name for c in counter.licences[0].counter] == ["scans"]
    whole = '[[licence]]\nkey = "K"\nid = "k"\nproduct = "p"\nseats = 1\n'
    assert as_config(whole) == whole
    with pytest.raises(ConfigError, match="seats"):
        parse_config(as_config("seats = -1\n"), ROOT)


# ---------------------------------------------------------------- sh


@dataclass(frozen=True)
class Step:
    """Commands of an sh block, and the output the block shows below them (None: none
    shown, then only exit status 0 is asked for)."""

    line: int  # of its first line in the doc
    commands: str
    output: tuple[str, ...] | None
    status: int


def steps(block: Block) -> list[Step]:
    """`block` cut after each run of output lines."""
    out: list[Step] = []
    commands: list[str] = []
    shown: list[str] = []
    first = block.line + 1

    def close() -> None:
        status = 0
        if shown and (exit_line := _STATUS.match(shown[-1])):
            shown[-1], status = exit_line.group(1), int(exit_line.group(2))
        out.append(Step(first, "\n".join(commands), tuple(shown) if shown else None, status))

    for n, line in enumerate(block.text.splitlines(), start=block.line + 1):
        is_output = line.startswith("#") and any(c.strip() for c in commands)
        if not is_output and shown:
            close()
            commands, shown, first = [], [], n
        if is_output:
            shown.append(line.removeprefix("#").removeprefix(" "))
        else:
            commands.append(line)
    if any(c.strip() for c in commands):
        close()
    return out


def test_steps_split_an_sh_block_at_its_output() -> None:
    block = Block("x.md", 10, "sh", "a\nb &   # note\n# out 1\n#\n# err   (exit 3)\nc\n", None)
    assert steps(block) == [
        Step(11, "a\nb &   # note", ("out 1", "", "err"), 3),
        Step(16, "c", None, 0),
    ]


class Shell:
    """One bash, fed the blocks of one doc in order, as one terminal runs them.

    Bash leads its own process group: background jobs are in it, so whatever a failed
    test leaves running is stopped (SIGTERM: a holder checks its seat in) by `close`."""

    def __init__(self, site: Site, directory: Path) -> None:
        self.site = site
        self.directory = directory
        self.blocks = 0
        self.stderr_path = directory / "bash.stderr"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                ["bash"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=site.terminal,
                cwd=ROOT,
                text=True,
                start_new_session=True,
            )

    def run(self, block: Block) -> None:
        """Run `block`, check what each of its steps shows, and wait for the daemon to
        hold one lease per running background job."""
        self.blocks += 1
        base = self.directory / str(self.blocks)
        cut = steps(block)
        script = []
        for n, step in enumerate(cut):
            script += [
                "{",
                self.site.rewrite(step.commands),
                f"}} </dev/null >{shlex.quote(f'{base}.{n}.out')} 2>&1",
                f"echo $? >{shlex.quote(f'{base}.{n}.status')}",
            ]
        jobs = Path(f"{base}.jobs")
        new = shlex.quote(f"{jobs}.new")
        script += [f'echo "$(jobs -rp | wc -l)" >{new}', f"mv {new} {shlex.quote(str(jobs))}"]
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n".join(script) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + BLOCK_TIMEOUT
        while not jobs.exists():
            assert self.proc.poll() is None, f"{block.id}: bash exited: {self.stderr()}"
            assert time.monotonic() < deadline, f"{block.id}: still running: {self.stderr()}"
            time.sleep(_POLL)
        for n, step in enumerate(cut):
            shown = Path(f"{base}.{n}.out").read_text(encoding="utf-8", errors="replace")
            status = int(Path(f"{base}.{n}.status").read_text(encoding="utf-8"))
            where = f"{block.doc}:{step.line}: {step.commands.strip()}"
            assert "Traceback" not in shown, f"{where}\n{shown}"
            if step.output is not None:
                lines = [line.rstrip() for line in shown.rstrip().splitlines()]
                assert lines == [line.rstrip() for line in step.output], where
            assert status == step.status, f"{where}: exit {status}\n{shown}"
        self.site.settle(int(jobs.read_text(encoding="utf-8")), f"after {block.id}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        """Stop the background jobs (each checks its seat in), then bash."""
        with contextlib.suppress(BrokenPipeError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("kill $(jobs -p) 2>/dev/null; wait\nexit 0\n")
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # what is left: stuck or orphaned
            deadline = time.monotonic() + STOP_TIMEOUT
            with contextlib.suppress(ProcessLookupError):
                while time.monotonic() < deadline:
                    os.killpg(self.proc.pid, sig)
                    self.proc.poll()  # reaps bash: a zombie would still be in the group
                    time.sleep(_POLL)
        self.proc.wait(STOP_TIMEOUT)


def sh_session(block: Block) -> Sequence[Block]:
    """The runnable sh blocks of `block`'s doc, from its first one to `block`."""
    same = [b for b in BLOCKS if b.doc == block.doc and b.lang == "sh" and not b.skip]
    return same[: same.index(block) + 1]


@pytest.mark.parametrize("block", cases("sh"))
def test_sh_block_runs_and_shows_its_output(block: Block, site: Site, tmp_path: Path) -> None:
    shell = Shell(site, tmp_path)
    try:
        for earlier in sh_session(block):
            shell.run(earlier)
    finally:
        shell.close()
    site.settle(0, f"after {block.id}'s shell ended")
