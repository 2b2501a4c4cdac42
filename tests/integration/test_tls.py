"""TLS on the same framing: the daemon serves it, the client library and a site router's
upstream link speak it, and a plain-TCP peer gets nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from licd.config.settings import RelayedLicence, UpstreamConfig
from licd.daemon import StartupError
from licd.engine import Licence
from licd_client import AsyncClient
from licd_client.errors import LicdError
from tests.support import DICOM, RawPeer, address, make_config, running

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return crt, key


def client_context(crt: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(crt))


async def test_client_library_over_tls(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    crt, key = cert
    config = make_config(tmp_path / "state", tls_cert=crt, tls_key=key)
    async with running(config) as daemon:
        host, port = address(daemon)
        client = AsyncClient(
            f"{host}:{port}", daemon.signer.public, ssl=client_context(crt), retry_for=0
        )
        lease = await client.checkout(DICOM.key)
        await lease.renew_once()
        assert (await client.available(DICOM.key)).in_use == 1
        await client.aclose()
        plain = await RawPeer.connect((host, port))  # no TLS: no protocol reply, ever
        await plain.send({"op": "hello", "id": 1, "protocol": 1, "client": "plain"})
        try:
            reply = await plain.recv(within=5)
        except (ConnectionError, ValueError, LicdError):
            reply = None  # the TLS alert bytes are no frame
        assert reply is None
        await plain.close()


async def test_router_reaches_its_upstream_over_tls(
    tmp_path: Path, cert: tuple[Path, Path]
) -> None:
    crt, key = cert
    vendor_licence = Licence(
        key="VEND-KEY", id="vendor", product="p", seats=5, max_ttl=3600.0, delegable=True
    )
    vendor_config = make_config(tmp_path / "v", vendor_licence, tls_cert=crt, tls_key=key)
    async with running(vendor_config) as vendor:
        upstream = UpstreamConfig(
            servers=(f"127.0.0.1:{address(vendor)[1]}",),
            trust=(vendor.signer.public,),
            tls=True,
            ca_file=crt,
        )
        block = RelayedLicence(key="VEND-KEY", id="site", mode="block", block_seats=2)
        router_config = dataclasses.replace(
            make_config(tmp_path / "r"), upstream=upstream, relayed=(block,)
        )
        async with running(router_config) as site_router:
            assert site_router.router is not None
            state = site_router.router.blocks["site"]
            await site_router.router.take_block(state)
            assert state.block is not None and state.block.seats == 2
            assert site_router.router.link.state.connected


def test_a_bad_certificate_stops_the_start(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    config = make_config(tmp_path / "state", tls_cert=bogus, tls_key=bogus)

    async def start() -> None:
        async with running(config):
            pass

    with pytest.raises(StartupError, match="cannot load the TLS certificate"):
        asyncio.run(start())
    assert not (tmp_path / "state").exists()  # refused before anything was created
