"""The webhook's HTTPS server: kopf's own server, with the serving certificate reloaded in place.

The certificate comes from a mounted ``kubernetes.io/tls`` Secret (``tls.crt``/``tls.key``), written by
cert-manager or by the Helm chart. When it is renewed, the kubelet swaps the files; :class:`CertificateReloader`
notices (it re-reads and hashes them every few seconds: a Secret volume sends no reliable file events) and
loads the new pair into the SSL context the server is already using. New TLS handshakes then present the
new certificate; the listening socket, open connections and the operator keep running. A half-written or
mismatched pair is refused by OpenSSL and the old certificate stays in force until a valid pair appears.

kopf's :class:`kopf.WebhookServer` could restart itself on a change (``file_check_interval``), but that
closes the listening socket for a moment, and with ``failurePolicy: Ignore`` a pod created in that moment
would go without its sidecar; so its own check is pushed out of the way and ours swaps the certificate live.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web

from . import review

logger = logging.getLogger("analytics_pipeline.operator")

# kopf re-reads the files this often to restart its server; ours reloads them in place instead.
_KOPF_CHECK_DISABLED = 365 * 86400.0


def server_context() -> ssl.SSLContext:
    """A server-side TLS context: TLS 1.2 or newer, the default (safe) ciphers, no client certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class CertificateReloader:
    """Keeps ``context`` serving the certificate and key currently in ``certfile``/``keyfile``."""

    def __init__(self, context: ssl.SSLContext, certfile: Path, keyfile: Path, interval: float = 10.0) -> None:
        self.context = context
        self.certfile = Path(certfile)
        self.keyfile = Path(keyfile)
        self.interval = interval
        self.loaded: str | None = None  # digest of the pair in force
        self._refused: str | None = None  # digest of the last pair OpenSSL refused (warned once)
        self.reloads = 0

    def _digest(self) -> str | None:
        hasher = hashlib.sha256()
        try:
            for path in (self.certfile, self.keyfile):
                hasher.update(path.read_bytes())
                hasher.update(b"\0")
        except OSError:
            return None
        return hasher.hexdigest()

    def load(self) -> None:
        """Load the pair now; raises (OSError, ssl.SSLError) if it is missing or the key does not match."""
        digest = self._digest()
        self.context.load_cert_chain(str(self.certfile), str(self.keyfile))
        self.loaded = digest

    def check(self) -> bool:
        """Reload if the files changed; True when a new certificate was loaded."""
        digest = self._digest()
        if digest is None or digest == self.loaded or digest == self._refused:
            return False
        try:
            # Try the pair on a scratch context first: a failed load_cert_chain can leave the new certificate
            # with the old key in a context, and the live one would then fail every handshake.
            server_context().load_cert_chain(str(self.certfile), str(self.keyfile))
            self.context.load_cert_chain(str(self.certfile), str(self.keyfile))
        except (OSError, ssl.SSLError) as error:
            # E.g. the certificate was replaced but not yet its key: keep serving the old pair, retry on change.
            self._refused = digest
            logger.warning("webhook certificate in %s not reloaded, the previous one stays in force: %s",
                           self.certfile.parent, error)
            return False
        self.loaded, self._refused = digest, None
        self.reloads += 1
        logger.info("webhook certificate reloaded from %s: new TLS connections use it", self.certfile.parent)
        return True

    async def run(self) -> None:
        """Check every ``interval`` seconds, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.interval)
            self.check()


class ReloadingWebhookServer(kopf.WebhookServer):
    """kopf's webhook server on our certificate files, with the certificate swapped live on renewal, and every
    review's envelope checked first (:mod:`.review`: a malformed one gets a 400 AdmissionReview error)."""

    @staticmethod
    async def _serve(fn: kopf.WebhookFn, request: web.Request) -> web.Response:
        try:  # kopf answers a body that is not JSON with a bare 400; the API server deserves an AdmissionReview
            json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise review.bad_request("", f"the body is not JSON: {error}") from None
        return await kopf.WebhookServer._serve(fn, request)

    def __init__(self, *, addr: str | None, port: int, certfile: Path, keyfile: Path,
                 reload_seconds: float = 10.0, **kwargs: Any) -> None:
        self.reloader = CertificateReloader(server_context(), certfile, keyfile, reload_seconds)
        self.reloader.load()  # fail at start-up, with the reason, if the files are missing or do not match
        super().__init__(addr=addr, port=port, certfile=str(certfile), pkeyfile=str(keyfile),
                         context=self.reloader.context, file_check_interval=_KOPF_CHECK_DISABLED, **kwargs)

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        watcher = asyncio.create_task(self.reloader.run(), name="webhook certificate reloader")
        try:
            # kopf enters the server as an async context manager, whose exit closes kopf's own generator
            # (and so the listening socket) deterministically.
            async for client_config in super().__call__(review.strict(fn)):
                yield client_config
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
