"""Put this folder first on PYTHONPATH to make ``import uvloop`` fail: the sidecar then runs on asyncio's loop.

benchmarks/ingest.py uses it to measure what uvloop earns the real sidecar process, unmodified.
"""

raise ImportError("uvloop hidden by benchmarks/baseline/no_uvloop (measuring the plain asyncio loop)")
