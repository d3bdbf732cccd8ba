"""Which pod this sidecar runs in: the name that picks its shard of the pipeline (core/keys.sidecar_shard_tag)."""

from __future__ import annotations

import os
import socket


def pod_name() -> str:
    """``POD_NAME`` (the operator sets it from the downward API), else ``HOSTNAME``, else the host's name."""
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
