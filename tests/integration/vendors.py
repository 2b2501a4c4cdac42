"""Support for tests of vendor entitlements: a vendor made with `licd vendor` (its key
and the entitlement files it issues), `licd` commands run on a worker thread (the daemon
under test serves on the test's event loop), and a site config that trusts the vendor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from licd.cli.main import main
from licd.config.settings import Config, VendorConfig
from licd.daemon import Daemon
from tests.support import DICOM, make_config

SITE = ("machine:11aa", "mac:22bb", "host:33cc")  # the test daemon's host-id components
CAD_KEY = "CAD-0001-VENDOR"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def licd(*args: str) -> Result:
    """`licd ARGS...` on a worker thread (the daemon serves on this one)."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def ok(*args: str) -> str:
    result = await licd(*args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


async def refused(*args: str) -> str:
    result = await licd(*args)
    assert result.exit_code == 1, (args, result.output, result.exception)
    return result.stderr


@dataclasses.dataclass
class Vendor:
    """The vendor's key file and public key, and where its files go."""

    key_file: Path
    public: str
    out: Path

    async def issue(self, daemon_key: str, name: str, *options: str, **terms: Any) -> Path:
        """An entitlement file for licence `cad` (terms as keyword options)."""
        args = {
            "licence-id": "cad",
            "licence-key": CAD_KEY,
            "product": "cad",
            "seats": 3,
            "expires": iso(time.time() + 30 * 86400),
            "sequence": 1,
        } | {k.replace("_", "-"): v for k, v in terms.items()}
        path = self.out / name
        flat = [item for k, v in args.items() for item in (f"--{k}", str(v))]
        await ok(
            "vendor",
            "issue",
            "--key",
            str(self.key_file),
            "--for",
            daemon_key,
            *flat,
            *options,
            "--out",
            str(path),
        )
        return path


@pytest.fixture(name="vendor")
async def vendor_fixture(tmp_path: Path) -> Vendor:
    """A vendor key made with `licd vendor keygen`."""
    out = tmp_path / "vendor"
    out.mkdir()
    key = out / "vendor.key"
    printed = await ok("vendor", "keygen", str(key))
    return Vendor(key, printed.strip().splitlines()[-1], out)


def site_config(tmp_path: Path, vendor: Vendor) -> Config:
    config = make_config(tmp_path / "state", DICOM)
    return dataclasses.replace(config, vendor=VendorConfig((bytes.fromhex(vendor.public),)))


def sock(daemon: Daemon) -> tuple[str, str]:
    return ("--socket", str(daemon.admin.path))
