"""lz-string's ``decompressFromBase64`` (what PostHog's ``?compression=lz64`` bodies hold), with an output cap.

A port of lz-string 1.5.0's ``_decompress`` (JavaScript, MIT). Written here rather than taken from
PyPI because the packages there either need Python 2 shims (``lzstring`` 1.0.4 pulls ``future``) or
are unproven, and none bounds its output: an LZW stream of n codes can expand to ~n²/2 characters,
so a 500 KB body could demand gigabytes. Here decoding stops as soon as the output passes ``limit``
characters; the dictionary never holds more than the output plus one character per code.
``tests/sidecar/test_lzstring.py`` checks it against strings compressed by the JavaScript original.
"""

from __future__ import annotations

_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_VALUES = {character: value for value, character in enumerate(_BASE64)}


class LZStringError(ValueError):
    """The input is not lz-string base64 (a bad character, a truncated or inconsistent stream)."""


class LZStringTooLarge(ValueError):
    """The decompressed text would be longer than the allowed limit."""


def decompress_from_base64(text: str, limit: int) -> str:
    """The text ``LZString.compressToBase64`` had compressed; at most ``limit`` UTF-16 code units."""
    if not text:
        raise LZStringError("empty input")
    try:
        values = [_VALUES[character] for character in text]
    except KeyError as error:
        raise LZStringError(f"{error.args[0]!r} is not a base64 character") from None
    units = _decompress(values, 32, limit)
    try:  # JavaScript strings are UTF-16: pairs of surrogates are one character
        return units.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        raise LZStringError("the decompressed text holds an unpaired surrogate") from None


def _decompress(values: list[int], reset: int, limit: int) -> str:
    length = len(values)
    val = values[0]
    position = reset
    index = 1

    def read(bit_count: int) -> int:
        nonlocal val, position, index
        bits = 0
        for power in range(bit_count):
            if val & position:
                bits |= 1 << power
            position >>= 1
            if position == 0:
                position = reset
                val = values[index] if index < length else 0
                index += 1
        return bits

    dictionary: list[str] = ["", "", ""]  # codes 0-2 are commands, never looked up
    enlarge_in = 4
    num_bits = 3
    kind = read(2)
    if kind == 2:
        return ""
    if kind not in (0, 1):
        raise LZStringError("bad first code")
    first = chr(read(8 if kind == 0 else 16))
    dictionary.append(first)
    w = first
    result = [first]
    size = 1
    while True:
        if index > length:
            raise LZStringError("truncated input")
        code = read(num_bits)
        if code in (0, 1):
            dictionary.append(chr(read(8 if code == 0 else 16)))
            code = len(dictionary) - 1
            enlarge_in -= 1
        elif code == 2:
            return "".join(result)
        if enlarge_in == 0:
            enlarge_in = 1 << num_bits
            num_bits += 1
        if code < len(dictionary):
            entry = dictionary[code]
        elif code == len(dictionary):
            entry = w + w[0]
        else:
            raise LZStringError("inconsistent stream (unknown dictionary code)")
        size += len(entry)
        if size > limit:
            raise LZStringTooLarge(f"decompresses to more than {limit} characters")
        result.append(entry)
        dictionary.append(w + entry[0])
        enlarge_in -= 1
        w = entry
        if enlarge_in == 0:
            enlarge_in = 1 << num_bits
            num_bits += 1
