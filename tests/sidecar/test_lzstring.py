"""The lz-string decoder against strings compressed by the JavaScript original (lz-string 1.5.0).

data/lz64_vectors.json was produced by data/lz64_vectors.js (``npm install lz-string@1.5.0``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analytics_pipeline.sidecar.lzstring import LZStringError, LZStringTooLarge, decompress_from_base64

VECTORS = json.loads((Path(__file__).parent / "data" / "lz64_vectors.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("vector", VECTORS, ids=[f"{len(v['text'])}-chars-{i}" for i, v in enumerate(VECTORS)])
def test_decodes_what_the_javascript_compressed(vector: dict[str, str]) -> None:
    assert decompress_from_base64(vector["lz64"], 1_000_000) == vector["text"]


def test_surrogate_pairs_become_one_character() -> None:
    vector = next(v for v in VECTORS if "😀" in v["text"])
    assert "🚀" in decompress_from_base64(vector["lz64"], 1000)


def test_output_is_capped() -> None:
    vector = next(v for v in VECTORS if len(v["text"]) == 8000)
    assert len(decompress_from_base64(vector["lz64"], 8000)) == 8000
    with pytest.raises(LZStringTooLarge):
        decompress_from_base64(vector["lz64"], 7999)


@pytest.mark.parametrize("bad", ["", "****", "A", VECTORS[8]["lz64"][:-10], "é"])
def test_bad_input_raises_a_clear_error(bad: str) -> None:
    with pytest.raises(LZStringError):
        decompress_from_base64(bad, 100_000)
