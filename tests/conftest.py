"""Suite-wide settings: a bounded Hypothesis profile, ports released after each test, and
one throwaway PostgreSQL server for the tests that need one (`pg_server`).

Hypothesis is imported here, at collection, on purpose as well: importing it late (its
pytest plugin does, in the terminal summary after a failure) has crashed pytest under
CPython 3.11.7 ("SystemError: AST constructor recursion depth mismatch").
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.pgcluster import PgServer, postgres_or_skip
from tests.support import release_reserved_ports

#: Every property test: bounded by its number of examples (not by time: a per-example
#: deadline, or the too_slow health check, would fail on a loaded machine), and on
#: failure the falsifying example plus a `@reproduce_failure` blob to paste back in. `ci` is the
#: default; LICD_HYPOTHESIS_PROFILE=thorough runs many more examples by hand.
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,  # a per-example time limit would fail on a loaded machine
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=5000)
settings.load_profile(os.environ.get("LICD_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _release_reserved_ports() -> Iterator[None]:
    yield
    release_reserved_ports()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A real PostgreSQL server for the session (tests/pgcluster.py); its tests skip,
    naming what to install, where there is none."""
    postgres_or_skip()
    with PgServer() as server:
        yield server
