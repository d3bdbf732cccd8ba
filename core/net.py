"""Network address helpers shared by the sidecar (which warns when it listens beyond loopback) and the
operator (which keeps a pipeline's ingest on loopback unless the spec explicitly exposes it)."""

from __future__ import annotations

import ipaddress

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (the only safe binding for a sidecar)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
