"""TLS between watcher and hub, with real certificates made at test time (trustme)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import Api, start_hub, wait_for
from dicomhub.errors import DicomhubError

trustme = pytest.importorskip("trustme", reason="trustme is not installed")

pytestmark = pytest.mark.asyncio


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A server CA with a certificate for 127.0.0.1, and a separate client CA."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert = server_ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert("watcher-1.example")
    paths = {name: tmp_path / f"{name}.pem" for name in
             ("ca", "cert", "key", "client_ca", "client_cert", "client_key", "other_ca")}
    server_ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    client_ca.cert_pem.write_to_path(paths["client_ca"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    trustme.CA().cert_pem.write_to_path(paths["other_ca"])
    return paths


def client_context(pki: dict[str, Path], with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca"])
    if with_cert:
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
    return context


async def test_hub_serves_https_and_a_verifying_watcher_delivers(tmp_path: Path, pki,
                                                                 run_watcher) -> None:
    hub = await start_hub(tmp_path, tls_cert=pki["cert"], tls_key=pki["key"])
    try:
        assert hub.url.startswith("https://") and hub.ws_url.startswith("wss://")
        connector = aiohttp.TCPConnector(ssl=client_context(pki))
        async with aiohttp.ClientSession(connector=connector) as http:
            api = Api(http, hub.url, await hub.key("read"))
            running = await run_watcher(hub, ca_file=pki["ca"])
            ds = factory.write(running.inbox / "a.dcm")

            async def indexed() -> bool:
                return (await api.get("/api/stats"))["instances"] == 1

            await wait_for(indexed, "the file to arrive over wss://")
            assert (await api.get(f"/api/series/{ds.SeriesInstanceUID}"))["instance_count"] == 1
            async with http.get(hub.url + "/") as page:
                assert page.status == 200
            await running.stop()
        async with aiohttp.ClientSession() as plain:  # plain HTTP to a TLS port fails
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(hub.url.replace("https", "http") + "/api/health") as r:
                    await r.read()
    finally:
        await hub.stop()


async def test_watcher_refuses_a_hub_it_cannot_verify(tmp_path: Path, pki, run_watcher,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from watcher.service import Watcher
    from dicomhub.config import WatcherConfig

    hub = await start_hub(tmp_path, tls_cert=pki["cert"], tls_key=pki["key"])
    try:
        config = WatcherConfig(hub_url=hub.ws_url, watch=(tmp_path / "inbox",),
                               state_dir=tmp_path / "state", settle=0.2, key_file=None,
                               watcher_id="untrusting", workers=1, ca_file=pki["other_ca"])
        watcher = Watcher(config, await hub.key("ingest"))
        with caplog.at_level(logging.ERROR, logger="dicomhub.watcher"):
            task = asyncio.create_task(watcher.run())
            factory.write(tmp_path / "inbox" / "a.dcm")

            async def refused_and_kept() -> bool:
                return "not trusted" in caplog.text and watcher.state.backlog == 1

            await wait_for(refused_and_kept, "the watcher to refuse the hub, keeping the record")
            assert watcher.link is not None and not watcher.link.connected.is_set()
            assert (await hub.store.stats())["instances"] == 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await hub.stop()


async def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, pki,
                                                        run_watcher) -> None:
    hub = await start_hub(tmp_path, tls_cert=pki["cert"], tls_key=pki["key"],
                          client_ca=pki["client_ca"])
    try:
        without = aiohttp.TCPConnector(ssl=client_context(pki))
        async with aiohttp.ClientSession(connector=without) as http:
            with pytest.raises(aiohttp.ClientError):
                async with http.get(hub.url + "/api/health") as r:
                    await r.read()
        running = await run_watcher(hub, ca_file=pki["ca"], client_cert=pki["client_cert"],
                                    client_key=pki["client_key"])
        factory.write(running.inbox / "a.dcm")

        async def indexed() -> bool:
            return (await hub.store.stats())["instances"] == 1

        await wait_for(indexed, "the file to arrive over mutual TLS")
    finally:
        await hub.stop()


async def test_plain_http_off_loopback_needs_allow_insecure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DicomhubError, match="refusing plain HTTP on 0.0.0.0"):
        await start_hub(tmp_path, host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="dicomhub.hub"):
        hub = await start_hub(tmp_path, host="0.0.0.0", allow_insecure=True)
    try:
        assert "plain HTTP on 0.0.0.0" in caplog.text
    finally:
        await hub.stop()
