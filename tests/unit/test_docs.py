"""The docs stand alone: they cite no file outside the repository, and every repository
path they name exists (a client author reads docs/protocol.md and nothing else)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
#: Files of the project's specification that live outside the repository.
OUTSIDE = re.compile(r"PROTOCOL\.md|ARCHITECTURE\.md|\bseeds?/|\bseeds? \d{3}\b|\.\./shared")
#: Repository paths named in the text (docs/x.md, licd/...; not /etc/licd/..., licd/0.1).
PATH = re.compile(
    r"(?<![\w/.-])((?:docs|licd|licd_client|tests|benchmarks|systemd)/[A-Za-z_][\w./-]*\w"
    r"|config\.example\.toml)"
)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_a_doc_cites_nothing_outside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert OUTSIDE.findall(text) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    named = {m.rstrip(".") for m in PATH.findall(text)}
    missing = sorted(p for p in named if not (ROOT / p).exists() and "*" not in p)
    assert missing == []
