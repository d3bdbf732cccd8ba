"""The ingest endpoints' 200: status line, headers and body built as bytes and sent in one write.

aiohttp turns a returned ``web.Response`` into bytes through a chain of ~10 coroutines (prepare,
header preparation, the prepare signal, header serialisation, write_eof, drain); for a 30-byte JSON
answer that is about 5 µs of Python, 10-15% of everything the sidecar spends on a single-event
request. :class:`AcceptedResponse` writes exactly the bytes aiohttp would have written
(``tests/sidecar/test_accepted.py`` compares them byte for byte, keep-alive and HTTP/1.0 included)
through the request's own writer (so a closed connection and back-pressure behave as before).

It takes the general path (aiohttp's own) whenever anything could make the answer differ: a
``on_response_prepare`` signal, cookies, compression, chunking, extra headers, a method other
than POST.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from multidict import CIMultiDict

_HEADERS = CIMultiDict({hdrs.CONTENT_TYPE: "application/json"})
_HEAD = ("HTTP/1.%d 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n"
         f"Server: {SERVER_SOFTWARE}\r\n%s\r\n")
_KEEP_ALIVE_10 = "Connection: keep-alive\r\n"
_CLOSE_11 = "Connection: close\r\n"


class _HeadCache:
    """Encoded status line + headers by (HTTP minor version, keep-alive, body length), for the current Date."""

    __slots__ = ("date", "heads")

    def __init__(self) -> None:
        self.date = ""
        self.heads: dict[tuple[int, bool, int], bytes] = {}

    def get(self, minor: int, keep_alive: bool, length: int) -> bytes:
        date = rfc822_formatted_time()  # aiohttp's own, formatted once a second
        if date != self.date:
            self.date = date
            self.heads = {}
        key = (minor, keep_alive, length)
        head = self.heads.get(key)
        if head is None:
            if keep_alive:
                connection = _KEEP_ALIVE_10 if minor == 0 else ""
            else:
                connection = _CLOSE_11 if minor == 1 else ""
            head = self.heads[key] = (_HEAD % (minor, length, date, connection)).encode("latin-1")
        return head


_HEADS = _HeadCache()


class AcceptedResponse(web.Response):
    """``200 OK`` (stored) with a JSON body, written in one piece; see the module docstring."""

    def __init__(self, body: bytes) -> None:
        super().__init__(status=200, body=body, headers=_HEADERS)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self.prepared or not _plain(self, request):
            return await super().prepare(request)
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        body = self._body
        assert isinstance(body, bytes)
        data = _HEADS.get(request.version.minor, keep_alive, len(body)) + body
        writer = request.writer
        self._req = request
        self._payload_writer = writer
        # The writer checks for a closing transport (ConnectionResetError, as for any response) and
        # waits while the transport's buffer is over its high-water mark.
        await writer.write_eof(data)
        self._eof_sent = True
        self._body_length = len(body)
        self._req = None
        self._payload_writer = None
        return writer


_VERSIONS = (HttpVersion10, HttpVersion11)
# The aiohttp internals the one-piece write sets and reads (checked on aiohttp 3.9-3.14). A future
# aiohttp without them gets its own general path for every answer instead of an AttributeError.
_INTERNALS = ("_eof_sent", "_keep_alive", "_body", "_cookies", "_req", "_payload_writer", "_body_length")
_INTERNALS_PRESENT = all(hasattr(web.Response(body=b""), name) for name in _INTERNALS)


def _plain(response: web.Response, request: web.BaseRequest) -> bool:
    """True when nothing but this module's fixed headers can end up in the answer."""
    if (not _INTERNALS_PRESENT or request.method != hdrs.METH_POST or request.version not in _VERSIONS
            or response._cookies or response.compression or response.chunked or len(response.headers) != 1):
        return False
    for app in request.match_info.apps:
        if app.on_response_prepare:
            return False
    return True
