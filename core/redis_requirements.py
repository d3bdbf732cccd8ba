"""What the pipeline requires of Redis, checked by sidecar and flusher alike (each with its own client).

``maxmemory-policy`` must be ``noeviction``: any evicting policy lets Redis drop live buckets (acked
counts) or dedup keys without telling anyone. Where ``CONFIG GET`` is refused (managed Redis, ACLs,
renamed command) the policy cannot be read: that is a warning, not a failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

REQUIRED_POLICY = "noeviction"
FIX_POLICY = ("set 'maxmemory-policy noeviction' (redis.conf, CONFIG SET maxmemory-policy noeviction, or the "
              "managed service's parameter group), or set redis.allow_eviction: true to accept the risk")


@dataclass(frozen=True, slots=True)
class PolicyCheck:
    """The outcome of reading ``maxmemory-policy``: ``policy`` is None when it could not be read."""

    policy: str | None
    allowed: bool
    refused: str | None = None  # why CONFIG GET failed, when it did
    node: str | None = None  # the Redis Cluster master this is about (host:port), None on a lone Redis

    @property
    def evicting(self) -> bool:
        """An evicting policy is in force (whether or not the config accepts it)."""
        return self.policy is not None and self.policy != REQUIRED_POLICY

    @property
    def problem(self) -> str | None:
        """The message that makes readiness fail / the flusher exit, or None when all is well."""
        if not self.evicting or self.allowed:
            return None
        return (f"Redis maxmemory-policy is {self.policy!r}{self._on}: an evicting policy silently drops acked counts "
                f"and message_id dedup keys when memory runs out; {FIX_POLICY}")

    @property
    def warning(self) -> str | None:
        """What to log when the policy is unknown or knowingly accepted; None when it is noeviction."""
        if self.policy is None:
            return (f"cannot read Redis maxmemory-policy{self._on} ({self.refused}): make sure it is "
                    f"{REQUIRED_POLICY!r}, or acked counts may be evicted silently")
        if self.evicting and self.allowed:
            return (f"Redis maxmemory-policy is {self.policy!r}{self._on} and redis.allow_eviction is true: acked "
                    "counts and dedup keys may be evicted silently when memory runs out")
        return None


    @property
    def _on(self) -> str:
        return f" on Redis Cluster master {self.node}" if self.node else ""


def check_nodes(replies: Mapping[str, object], *, allowed: bool) -> PolicyCheck:
    """Judge ``CONFIG GET maxmemory-policy`` of every master of a cluster (node name -> reply): the first
    node with a problem (then with a warning) is the one reported, by name; else all agree."""
    checks = [replace(check_policy(reply, allowed=allowed), node=node) for node, reply in sorted(replies.items())]
    if not checks:
        return PolicyCheck(None, allowed, "no Redis Cluster master answered")
    for wanted in ("problem", "warning"):
        for check in checks:
            if getattr(check, wanted):
                return check
    return replace(checks[0], node=None)


def policy_from_reply(reply: object) -> str | None:
    """The policy out of a ``CONFIG GET maxmemory-policy`` reply (a flat list or a mapping), else None."""
    if isinstance(reply, dict):
        values = list(reply.values())
    elif isinstance(reply, list | tuple):
        values = list(reply[1::2])
    else:
        return None
    if not values:
        return None
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def check_policy(reply: object, *, allowed: bool) -> PolicyCheck:
    """Judge a ``CONFIG GET maxmemory-policy`` reply (empty when the command exists but hides it)."""
    policy = policy_from_reply(reply)
    if policy is None:
        return PolicyCheck(None, allowed, "CONFIG GET returned nothing")
    return PolicyCheck(policy, allowed)


def unchecked(reason: str, *, allowed: bool) -> PolicyCheck:
    """The outcome when ``CONFIG GET`` was refused (``reason``: Redis's error message)."""
    return PolicyCheck(None, allowed, " ".join(reason.split()))


def memory_usage(info: str | bytes) -> tuple[int, int]:
    """``(used_memory, maxmemory)`` out of an ``INFO memory`` reply (maxmemory 0 = no limit)."""
    text = info.decode() if isinstance(info, bytes) else info
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("used_memory", "maxmemory"):
            values[name] = int(value.strip())
    return values.get("used_memory", 0), values.get("maxmemory", 0)
