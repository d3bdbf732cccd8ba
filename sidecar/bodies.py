"""Reading an ingest request's body: size limit, Content-Encoding, PostHog's compressions and form bodies.

aiohttp's own decompression is switched off for the sidecar (``handler_args={"auto_decompress":
False}`` in app.py) so that every encoding goes through this one module: an encoding it does not know
(``foo``) or cannot decode (``br``, ``zstd``: no decoder installed) is a 415 JSON answer, not a body
silently read as plain text or aiohttp's plain-text 400. Every decoded size is capped like the raw
body (``ingest.max_request_bytes``): decompression stops as soon as the output passes the limit, so a
zip bomb costs at most that much memory and is answered 413.

PostHog clients send, besides JSON with ``Content-Encoding: gzip|deflate``: ``?compression=gzip-js``
(a gzip body without the header), ``?compression=lz64`` (lz-string base64 text) and, in older
versions, a form body ``data=<base64 JSON>`` (optionally with ``compression=...`` in the form).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from urllib.parse import parse_qs

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from analytics_pipeline.core.events import FieldError, RequestRejected

from .lzstring import LZStringError, LZStringTooLarge, decompress_from_base64

FORM = "application/x-www-form-urlencoded"
MAX_GZIP_MEMBERS = 64  # concatenated gzip members accepted in one body
_IDENTITY = ("", "identity")


def too_large(size: int, limit: int, what: str = "request body") -> RequestRejected:
    """413: the body (or what it decompresses to) is over ``ingest.max_request_bytes``."""
    return RequestRejected(413, f"{what} is {size} bytes or more, over the {limit}-byte limit "
                           "(ingest.max_request_bytes); send smaller batches",
                           [FieldError(None, "body", "too large")], code="payload_too_large")


def _unreadable(field: str, reason: str, message: str) -> RequestRejected:
    return RequestRejected(400, message, [FieldError(None, field, reason)], code="unreadable_body")


def _unsupported(field: str, value: str, message: str) -> RequestRejected:
    return RequestRejected(415, message, [FieldError(None, field, f"{value!r} is not supported")],
                           code="unsupported_encoding")


async def read_raw_body(request: web.Request, limit: int) -> bytes:
    """The request body as sent, reading at most ``limit + 1`` bytes: a huge body is refused, never buffered."""
    content = request.content
    try:
        if content.is_eof():  # the whole body came with the headers (small requests): no waiting
            body = content.read_nowait()
            if len(body) > limit:
                raise too_large(len(body), limit)
            return body
        length = request.content_length
        if length is not None and length > limit:
            raise too_large(length, limit)
        first = await content.readany()
        if content.at_eof() or not first:
            if len(first) > limit:
                raise too_large(len(first), limit)
            return first
        chunks = [first]
        size = len(first)
        while size <= limit:
            chunk = await content.readany()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
    except (HttpProcessingError, RequestPayloadError) as error:  # bad chunking
        raise _unreadable("body", "unreadable (bad chunking or Content-Encoding)",
                          f"the request body could not be read: {error}".replace("\n", " ")) from None
    raise too_large(size, limit)


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """``data`` gunzipped (``gzip``) or inflated (``deflate``: zlib, or raw as some clients send it),
    producing at most ``limit`` bytes (413 beyond)."""
    if encoding == "gzip":
        wbits = 31
    elif len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
        wbits = 15  # RFC 1950 zlib header
    else:
        wbits = -15  # raw deflate
    out: list[bytes] = []
    size = members = 0
    while True:
        members += 1
        decompressor = zlib.decompressobj(wbits)
        try:
            chunk = decompressor.decompress(data, limit + 1 - size)
        except zlib.error as error:
            raise _unreadable("Content-Encoding", f"not valid {encoding} data",
                              f"the body is not valid {encoding} data: {error}") from None
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit, f"the {encoding}-decompressed body")
        out.append(chunk)
        if not decompressor.eof:
            raise _unreadable("Content-Encoding", f"truncated {encoding} data",
                              f"the {encoding} body ends before its compressed stream does")
        rest = decompressor.unused_data
        if not rest:
            return b"".join(out)
        if wbits != 31 or members >= MAX_GZIP_MEMBERS:
            raise _unreadable("Content-Encoding", f"trailing bytes after the {encoding} data",
                              f"the body holds bytes after its {encoding} stream")
        data = rest


def _content_encoding(data: bytes, header: str, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (applied in the order listed, so undone last first)."""
    for token in reversed([part.strip().lower() for part in header.split(",")]):
        if token in _IDENTITY:
            continue
        if token in ("gzip", "x-gzip"):
            data = inflate(data, "gzip", limit)
        elif token == "deflate":
            data = inflate(data, "deflate", limit)
        elif token in ("br", "zstd"):
            raise _unsupported("Content-Encoding", token, f"Content-Encoding {token!r} is not supported by this "
                               "sidecar (no decoder installed); send the body gzip- or deflate-compressed or plain")
        else:
            raise _unsupported("Content-Encoding", token[:32], f"unknown Content-Encoding {token[:32]!r}; "
                               "the sidecar reads gzip, deflate or identity")
    return data


def _from_base64(text: str, limit: int) -> bytes:
    """Base64 (standard or URL-safe, padding optional; '+' may have become ' ' in a form) to bytes."""
    cleaned = text.strip().replace(" ", "+").replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        decoded = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise _unreadable("data", "neither JSON nor base64", "the form field 'data' is neither JSON nor "
                          "base64-encoded JSON") from None
    if len(decoded) > limit:
        raise too_large(len(decoded), limit, "the base64-decoded body")
    return decoded


def _decompress(data: bytes, compression: str, limit: int) -> bytes:
    """Undo PostHog's ``compression`` (query parameter or form field)."""
    if compression in ("gzip-js", "gzip"):
        if data[:2] != b"\x1f\x8b":
            raise _unreadable("compression", "body is not gzip", f"compression={compression} but the body is "
                              "not gzip data")
        return inflate(data, "gzip", limit)
    if compression == "lz64":
        try:
            text = decompress_from_base64(data.decode("ascii").strip().replace(" ", "+"), limit)
        except UnicodeDecodeError:
            raise _unreadable("compression", "body is not lz64", "compression=lz64 but the body is not "
                              "base64 text") from None
        except LZStringTooLarge:
            raise too_large(limit + 1, limit, "the lz64-decompressed body") from None
        except LZStringError as error:
            raise _unreadable("compression", f"not valid lz64 data: {error}",
                              f"compression=lz64 but the body is not valid lz-string data: {error}") from None
        decoded = text.encode("utf-8", "surrogatepass")
        if len(decoded) > limit:
            raise too_large(len(decoded), limit, "the lz64-decompressed body")
        return decoded
    if compression == "base64":
        return _from_base64(data.decode("latin-1"), limit)
    raise _unsupported("compression", compression[:32], f"unknown compression {compression[:32]!r}; the sidecar "
                       "reads gzip-js, gzip, lz64 and base64")


def _form_data(data: bytes) -> tuple[bytes, str | None]:
    """The ``data`` field of a form body, and its ``compression`` field if any."""
    try:
        fields = parse_qs(data.decode("utf-8"), keep_blank_values=True, max_num_fields=100, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise _unreadable("body", "not a readable form", "the form body could not be read") from None
    values = fields.get("data")
    if not values or not values[0]:
        raise RequestRejected(400, "a form-encoded body must carry the events in its 'data' field "
                              "(data=<base64 JSON>), or send JSON with Content-Type: application/json",
                              [FieldError(None, "data", "is required in a form body")])
    compression = fields.get("compression")
    return values[0].encode("utf-8", "surrogatepass"), compression[0].lower() if compression else None


def decode_body(raw: bytes, *, content_encoding: str | None, compression: str | None, form: bool,
                limit: int) -> bytes:
    """The JSON text of a request: Content-Encoding undone, then form ``data`` and PostHog compression.

    ``compression`` is the query parameter (``gzip-js``, ``lz64``, ...); ``form`` says the body is
    ``application/x-www-form-urlencoded`` (PostHog routes only).
    """
    data = raw
    decoded_by_header = False
    if content_encoding and content_encoding.strip().lower() not in _IDENTITY:
        data = _content_encoding(data, content_encoding, limit)
        decoded_by_header = True
    if form:
        data, form_compression = _form_data(data)
        compression = compression or form_compression
        if not compression:
            stripped = data.lstrip()
            if stripped[:1] not in (b"{", b"["):
                data = _from_base64(data.decode("latin-1"), limit)
            return data
    if compression:
        compression = compression.strip().lower()
        if compression in ("gzip-js", "gzip") and decoded_by_header and data[:2] != b"\x1f\x8b":
            return data  # the same gzip, declared twice: already undone
        if compression not in _IDENTITY:
            data = _decompress(data, compression, limit)
    elif not decoded_by_header and data[:2] == b"\x1f\x8b":
        # posthog-js (1.449 measured) gzips every batch as text/plain with neither Content-Encoding nor
        # ?compression: PostHog's server knows it by the gzip magic bytes, which no JSON text starts with.
        data = inflate(data, "gzip", limit)
    return data


def is_form(content_type: str | None) -> bool:
    """True for ``application/x-www-form-urlencoded`` (with or without parameters)."""
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == FORM

