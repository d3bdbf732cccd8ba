"""The webhook's certificate is reloaded in place: after the files change, NEW TLS connections see the new
certificate, while the server (and a connection opened before) keeps running; a bad pair changes nothing."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from operator_harness import eventually, free_port
from webhook_support import TestPKI, admission_review, peer_serial, wait_for_port

from analytics_pipeline.operator.certs import CertificateReloader, ReloadingWebhookServer, server_context


async def answer(request: Any, **_: Any) -> dict[str, Any]:
    """A stand-in for kopf's admission function: echo the request's uid."""
    return {"uid": request["request"]["uid"]}


async def post_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, uid: str) -> dict[str, Any]:
    """One HTTP/1.1 request on an already open (keep-alive) connection."""
    review = admission_review({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}, "shop")
    review["request"]["uid"] = uid
    body = json.dumps(review).encode()
    writer.write(b"POST /inject-sidecar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return json.loads(await reader.readexactly(length))


async def test_renewed_certificate_is_served_to_new_connections_without_a_restart(pki: TestPKI) -> None:
    port = free_port()
    server = ReloadingWebhookServer(addr="127.0.0.1", port=port, certfile=pki.cert_file, keyfile=pki.key_file,
                                    reload_seconds=0.05)
    context = pki.client_context()
    async with server:  # as kopf runs it: the context's exit stops the server
        client_config = await anext(server(answer))
        assert client_config["url"] == f"https://127.0.0.1:{port}"
        await wait_for_port(port, context)
        first = pki.serial
        assert await peer_serial(port, context) == first
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
        assert await post_on(reader, writer, "before") == {"uid": "before"}

        # cert-manager (or a helm upgrade) renews the Secret; the kubelet swaps the mounted files
        second = pki.issue()
        await eventually(lambda: server.reloader.reloads == 1, within=5)
        assert await peer_serial(port, context) == second != first
        # the listening socket never closed: the connection opened before still works
        assert await post_on(reader, writer, "after") == {"uid": "after"}
        writer.close()
        await writer.wait_closed()

        # a certificate whose key has not arrived yet does not load: the previous pair stays in force
        third = pki.issue(write_key=False)
        await asyncio.sleep(0.3)
        assert server.reloader.reloads == 1
        assert await peer_serial(port, context) == second
        pki.key_file.write_bytes(pki.pending_key)
        await eventually(lambda: server.reloader.reloads == 2, within=5)
        assert await peer_serial(port, context) == third
    with pytest.raises(OSError):
        await peer_serial(port, context)  # stopped with the operator


def test_unusable_files_fail_at_start_with_the_reason(tmp_path: Path, pki: TestPKI) -> None:
    with pytest.raises(FileNotFoundError):
        ReloadingWebhookServer(addr="127.0.0.1", port=1, certfile=tmp_path / "nope.crt", keyfile=pki.key_file)
    other = TestPKI(tmp_path / "other")
    reloader = CertificateReloader(server_context(), pki.cert_file, other.key_file)
    with pytest.raises(ssl.SSLError):
        reloader.load()
    assert reloader.check() is False and reloader.loaded is None


def test_server_context_refuses_old_tls() -> None:
    assert server_context().minimum_version == ssl.TLSVersion.TLSv1_2
