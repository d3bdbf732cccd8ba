"""Fault injection for crash tests: ``ANALYTICS_FLUSH_FAULT=<step>[:<n>]`` SIGKILLs the flusher right after
the n-th time (default first) it passes ``step``.

Steps, in protocol order: ``after_lock``, ``after_recover``, ``after_claim``, ``after_read`` (unit opened,
its transaction not begun),
``in_transaction`` (upserts done, COMMIT not sent), ``after_commit`` (before the Redis cleanup),
``after_cleanup``, ``after_retention``. Unset (the normal case) it costs one dict lookup per step.
"""

from __future__ import annotations

import os
import signal

ENV_FAULT = "ANALYTICS_FLUSH_FAULT"
STEPS = ("after_lock", "after_recover", "after_claim", "after_read", "in_transaction", "after_commit",
         "after_cleanup", "after_retention")

_passed: dict[str, int] = {}


def checkpoint(step: str) -> None:
    """Die here (SIGKILL, no cleanup of any kind) if the environment asks for a fault at ``step``."""
    wanted = os.environ.get(ENV_FAULT)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != step:
        return
    _passed[step] = _passed.get(step, 0) + 1
    if _passed[step] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
