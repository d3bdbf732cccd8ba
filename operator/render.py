"""Pure functions from an AnalyticsPipeline spec to what should exist: the Config, a cron schedule,
the sidecar ConfigMap and the flusher CronJob. No I/O, so every rule here is unit-testable.

The operator reads ONLY the spec fields listed in :data:`DEFAULTS` (the CRD's schema declares each of
them with the same default and range); anything it cannot use raises :class:`InvalidSpec` whose message
names the field and says how to fix it.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass
from dataclasses import field as dataclass_field
from typing import Any

import yaml

from analytics_pipeline.core.config import UNCOUNTED_EVENTS, Config, ConfigError, parse_config
from analytics_pipeline.core.net import LOOPBACK, is_loopback

from . import crd

# ---------------------------------------------------------------------------------------------------------
# Spec defaults: the same values as the CRD's `default:` keywords (a test keeps them in step).

DEFAULT_SIDECAR_RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
DEFAULT_FLUSHER_RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
DEFAULT_INTERVAL = "5m"

DEFAULTS: dict[str, Any] = {
    "redis": {"secretRef": {"name": None, "key": "redis-url"}, "cluster": "auto"},
    # readSecretRef: a read-only role's connection string for the sidecar (the flusher keeps secretRef's).
    "postgres": {"secretRef": {"name": None, "key": "database-url"},
                 "readSecretRef": {"name": None, "key": "database-read-url"}},
    "counters": {"ttlSeconds": 7 * 86400, "granularities": ["daily", "hourly", "user_daily"], "shards": 1},
    "ingest": {
        "maxEventBytes": 32 * 1024,
        "maxRequestBytes": 500 * 1024,
        "maxBatchEvents": 2500,
        "maxNameLength": 128,
        "maxIdLength": 256,
        "maxFutureSeconds": 300,
        "maxPastSeconds": None,  # None: the counter TTL
        "dedupWindowSeconds": 43200,
        "allOrNothing": False,
        "uncountedEvents": list(UNCOUNTED_EVENTS),
    },
    "flush": {"schedule": None, "interval": None, "batchSize": 1000, "retentionDays": 400,
              "deadLetterAfterFailures": 3},
    "suspend": False,
    "sidecar": {
        "image": None,  # None: the operator's --default-image
        "imagePullPolicy": "IfNotPresent",
        "host": LOOPBACK,
        "exposeIngest": False,  # host is used beyond loopback only when this is true
        "port": 8787,
        "healthPort": 8788,
        "waitReplicas": 0,
        "resources": DEFAULT_SIDECAR_RESOURCES,
    },
    "flusher": {
        "image": None,
        "imagePullPolicy": "IfNotPresent",
        "resources": DEFAULT_FLUSHER_RESOURCES,
        "runMigrations": True,
        "startingDeadlineSeconds": 120,
        "activeDeadlineSeconds": 1800,
        "backoffLimit": 2,
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
    },
}

# spec path -> Config path. Everything the sidecar/flusher config gets from the CR.
CONFIG_FIELDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("counters", "ttlSeconds"): ("counters", "ttl_seconds"),
    ("counters", "granularities"): ("counters", "granularities"),
    ("counters", "shards"): ("counters", "shards"),
    ("redis", "cluster"): ("redis", "cluster"),
    ("sidecar", "waitReplicas"): ("server", "wait_replicas"),
    ("ingest", "maxEventBytes"): ("ingest", "max_event_bytes"),
    ("ingest", "maxRequestBytes"): ("ingest", "max_request_bytes"),
    ("ingest", "maxBatchEvents"): ("ingest", "max_batch_events"),
    ("ingest", "maxNameLength"): ("ingest", "max_name_length"),
    ("ingest", "maxIdLength"): ("ingest", "max_id_length"),
    ("ingest", "maxFutureSeconds"): ("ingest", "max_future_seconds"),
    ("ingest", "maxPastSeconds"): ("ingest", "max_past_seconds"),
    ("ingest", "dedupWindowSeconds"): ("ingest", "dedup_window_seconds"),
    ("ingest", "allOrNothing"): ("ingest", "all_or_nothing"),
    ("ingest", "uncountedEvents"): ("ingest", "uncounted_events"),
    ("sidecar", "port"): ("server", "port"),
    ("sidecar", "healthPort"): ("server", "health_port"),
    ("flush", "batchSize"): ("flush", "batch_size"),
    ("flush", "retentionDays"): ("flush", "retention_days"),
    ("flush", "deadLetterAfterFailures"): ("flush", "dead_letter_after_failures"),
}

# Ranges of the spec fields that are not part of Config (Config's own fields are range-checked by Config).
INT_RANGES: dict[tuple[str, ...], tuple[int, int]] = {
    ("flusher", "startingDeadlineSeconds"): (10, 86400),
    ("flusher", "activeDeadlineSeconds"): (60, 86400),
    ("flusher", "backoffLimit"): (0, 10),
    ("flusher", "successfulJobsHistoryLimit"): (0, 100),
    ("flusher", "failedJobsHistoryLimit"): (0, 100),
    ("sidecar", "port"): (1, 65535),  # Config allows 0 (any free port): useless behind a probe
    ("sidecar", "healthPort"): (1, 65535),
}

# The sidecar's probe listener: the kubelet's probes and Prometheus reach it on the pod IP (ingest stays on loopback).
HEALTH_PORT_NAME = "analytics-ops"

PULL_POLICIES = ("Always", "IfNotPresent", "Never")

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}

# The flusher's exit code when dead-lettered units wait (analytics_pipeline.flusher.cli.DEAD_LETTER_EXIT).
FLUSH_DEAD_LETTER_EXIT = 3


class InvalidSpec(ValueError):
    """The spec cannot be turned into objects; ``field`` is the spec path, the message says how to fix it.
    ``reason`` is the Ready condition's reason (and the Event's)."""

    reason = "InvalidSpec"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"spec.{field}: {message}")
        self.field = field


class ImageNotAllowed(InvalidSpec):
    """The spec names an image the operator's admin did not allow (a pipeline's author must not pick what runs)."""

    reason = "ImageNotAllowed"


# ---------------------------------------------------------------------------------------------------------
# Reading the spec


def get(spec: Mapping[str, Any], *path: str) -> Any:
    """The value at ``path`` in the spec, else its default from :data:`DEFAULTS` (a deep copy)."""
    node: Any = spec
    for depth, part in enumerate(path):
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            default: Any = DEFAULTS
            for key in path:
                default = default[key]
            return copy.deepcopy(default)
        node = node[part]
        if depth < len(path) - 1 and not isinstance(node, Mapping):
            raise InvalidSpec(".".join(path[: depth + 1]), f"must be an object, got {type(node).__name__}")
    return node


def _int(spec: Mapping[str, Any], *path: str) -> int:
    value = get(spec, *path)
    low, high = INT_RANGES[path]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(".".join(path), f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidSpec(".".join(path), f"must be between {low} and {high}, got {value}")
    return value


def _bool(spec: Mapping[str, Any], *path: str) -> bool:
    value = get(spec, *path)
    if not isinstance(value, bool):
        raise InvalidSpec(".".join(path), f"must be true or false, got {value!r}")
    return value


def _choice(spec: Mapping[str, Any], choices: tuple[str, ...], *path: str) -> str:
    value = get(spec, *path)
    if value not in choices:
        raise InvalidSpec(".".join(path), f"must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _secret_ref(spec: Mapping[str, Any], section: str, ref: str = "secretRef") -> dict[str, str]:
    """A Secret name and key: a secretKeyRef always resolves in the pod's (= the pipeline's) namespace."""
    name, key = get(spec, section, ref, "name"), get(spec, section, ref, "key")
    if not isinstance(name, str) or not DNS_SUBDOMAIN.match(name):
        raise InvalidSpec(f"{section}.{ref}.name", "must name the Secret (in the pipeline's namespace) that holds "
                          f"the connection string, e.g. 'analytics-connections'; got {name!r}")
    if not isinstance(key, str) or not SECRET_KEY.match(key):
        raise InvalidSpec(f"{section}.{ref}.key", f"must be a key of that Secret, got {key!r}")
    return {"name": name, "key": key}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``1Gi``, ``2``) as a number; ValueError if it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    match = QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    suffix = match["suffix"] or ""
    if suffix[:1] in ("e", "E"):
        return float(match["num"]) * 10 ** int(suffix[1:])
    return float(match["num"]) * _SUFFIX[suffix]


def _resources(spec: Mapping[str, Any], section: str) -> dict[str, dict[str, str | int]]:
    value = get(spec, section, "resources")
    field = f"{section}.resources"
    if not isinstance(value, Mapping):
        raise InvalidSpec(field, f"must be an object with 'requests' and/or 'limits', got {value!r}")
    result: dict[str, dict[str, str | int]] = {}
    for part, amounts in value.items():
        if part not in ("requests", "limits"):
            raise InvalidSpec(f"{field}.{part}", "unknown key: only 'requests' and 'limits' are allowed")
        if not isinstance(amounts, Mapping):
            raise InvalidSpec(f"{field}.{part}", f"must map a resource name to a quantity, got {amounts!r}")
        checked: dict[str, str | int] = {}
        for resource, amount in amounts.items():
            try:
                parse_quantity(amount)
            except ValueError:
                raise InvalidSpec(f"{field}.{part}.{resource}", "must be a quantity such as '100m', 0.25, "
                                  f"'128Mi' or '1Gi' (a string or a number), got {amount!r}") from None
            checked[str(resource)] = amount
        result[part] = checked
    return result


def image_allowed(image: str, allowed: Sequence[str]) -> bool:
    """Does the admin's list allow ``image``? An entry is an exact image reference, or a prefix when it ends with
    ``/`` (a registry or repository path: ``registry.example.com/team/``), ``:`` (any tag of one repository:
    ``registry.example.com/analytics-pipeline:``) or ``@`` (any digest of one repository)."""
    for entry in allowed:
        if image == entry or (entry.endswith(("/", ":", "@")) and image.startswith(entry) and len(image) > len(entry)):
            return True
    return False


def _image(spec: Mapping[str, Any], section: str, default_image: str, allowed: Sequence[str] = ()) -> str:
    value = get(spec, section, "image") or default_image
    if not isinstance(value, str) or not value.strip() or any(ch.isspace() for ch in value):
        raise InvalidSpec(f"{section}.image", f"must be an image reference such as 'repo/analytics-pipeline:0.1.0', "
                          f"got {value!r}")
    if value != default_image and not image_allowed(value, allowed):
        listed = f"nor in its allowed images ({', '.join(allowed)})" if allowed else "and it allows no other image"
        raise ImageNotAllowed(f"{section}.image", f"{value!r} is not the operator's image ({default_image}) {listed}: "
                              f"remove spec.{section}.image to run the operator's image, or ask the cluster admin to "
                              "list it in the chart's operator.allowedImages")
    return value


def sidecar_host(spec: Mapping[str, Any]) -> str:
    """Where the sidecar's ingest, queries and dashboard listen: loopback, unless ``sidecar.exposeIngest``."""
    host = get(spec, "sidecar", "host")
    if not isinstance(host, str) or not host.strip():
        raise InvalidSpec("sidecar.host", f"must be an address such as 127.0.0.1, got {host!r}")
    return host if _bool(spec, "sidecar", "exposeIngest") or is_loopback(host) else LOOPBACK


def sidecar_ports(spec: Mapping[str, Any]) -> tuple[int, int]:
    """(ingest port, probe port): both in the pod's one network namespace, so they must differ."""
    port, health = _int(spec, "sidecar", "port"), _int(spec, "sidecar", "healthPort")
    if port == health:
        raise InvalidSpec("sidecar.healthPort", f"must differ from sidecar.port ({port}): the probe listener and "
                          "the ingest listener are two sockets in one pod")
    return port, health


def posture_warnings(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(Event reason, message) for each thing in the spec that weakens the default posture: said on the Ready
    condition and in Warning Events, so it is a visible choice."""
    warnings = []
    host, port = get(spec, "sidecar", "host"), _int(spec, "sidecar", "port")
    if sidecar_host(spec) != host:
        warnings.append(("HostIgnored", f"spec.sidecar.host {host!r} is ignored: ingest, queries and the dashboard "
                         f"stay on {LOOPBACK} unless spec.sidecar.exposeIngest is true (objects created with an "
                         "earlier CRD carry its old default 0.0.0.0: remove it with kubectl patch ap <name> "
                         "--type=json -p '[{\"op\":\"remove\",\"path\":\"/spec/sidecar/host\"}]')"))
    elif not is_loopback(host):
        warnings.append(("IngestExposed", f"spec.sidecar.exposeIngest is true: the sidecar's ingest, queries and "
                         f"dashboard listen on {host}:{port} with no authentication, reachable by anything that can "
                         "reach the pod; restrict it with a NetworkPolicy"))
    if get(spec, "postgres", "readSecretRef", "name") is None:
        warnings.append(("WriterCredentialsInSidecar", "the sidecar holds the flusher's (writer's) database "
                         "credentials: set spec.postgres.readSecretRef to a read-only role's connection string "
                         "(docs/kubernetes.md, Security model)"))
    return warnings


# ---------------------------------------------------------------------------------------------------------
# Schedules


MINUTE_STEPS = tuple(n for n in range(1, 60) if 60 % n == 0)
HOUR_STEPS = tuple(n for n in range(1, 24) if 24 % n == 0)
INTERVAL_RE = re.compile(r"^(?P<count>[1-9][0-9]{0,4})(?P<unit>[mhd])$")
INTERVAL_HELP = (f"use a divisor of 60 minutes ({', '.join(f'{n}m' for n in MINUTE_STEPS)}), "
                 f"a divisor of 24 hours ({', '.join(f'{n}h' for n in HOUR_STEPS)}) or 1d, "
                 "or set flush.schedule to a cron expression instead")


def interval_to_schedule(interval: str) -> str:
    """Map an interval to the cron schedule that runs exactly every interval, or raise InvalidSpec.

    Rules: ``Nm`` needs N to divide 60 (``5m`` → ``*/5 * * * *``); a multiple of 60 minutes counts as
    hours. ``Nh`` needs N to divide 24 (``1h`` → ``0 * * * *``, ``6h`` → ``0 */6 * * *``); a multiple of
    24 hours counts as days. Only ``1d`` (``0 0 * * *``) maps for days: months are not divisible.
    """
    match = INTERVAL_RE.match(interval) if isinstance(interval, str) else None
    if not match:
        raise InvalidSpec("flush.interval", f"{interval!r} is not an interval: write a whole number and a unit "
                          f"m, h or d (e.g. '5m', '1h'); {INTERVAL_HELP}")
    count, unit = int(match["count"]), match["unit"]
    if unit == "m" and count % 60 == 0:
        count, unit = count // 60, "h"
    if unit == "h" and count % 24 == 0:
        count, unit = count // 24, "d"
    if unit == "m" and count > 60:
        raise InvalidSpec("flush.interval", f"'{interval}' does not map exactly to a cron schedule: longer than an "
                          f"hour but not a whole number of hours; {INTERVAL_HELP}")
    if unit == "h" and count > 24:
        raise InvalidSpec("flush.interval", f"'{interval}' does not map exactly to a cron schedule: longer than a "
                          f"day but not a whole number of days; {INTERVAL_HELP}")
    if unit == "m":
        if 60 % count:
            raise InvalidSpec("flush.interval", f"'{interval}' does not map exactly to a cron schedule: 60 is not "
                              f"divisible by {count}, so the last run of each hour would come "
                              f"{60 - (60 // count) * count} minutes before the next; {INTERVAL_HELP}")
        return "* * * * *" if count == 1 else f"*/{count} * * * *"
    if unit == "h":
        if 24 % count:
            raise InvalidSpec("flush.interval", f"'{interval}' does not map exactly to a cron schedule: 24 is not "
                              f"divisible by {count}; {INTERVAL_HELP}")
        return "0 * * * *" if count == 1 else f"0 */{count} * * *"
    if count != 1:
        raise InvalidSpec("flush.interval", f"'{interval}' does not map exactly to a cron schedule (months are not "
                          f"divisible into {count}-day runs); {INTERVAL_HELP}")
    return "0 0 * * *"


CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = {name: i for i, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_DAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# (name, low, high, names, "?" allowed)
_CRON_FIELDS = (("minute", 0, 59, {}, False), ("hour", 0, 23, {}, False), ("day of month", 1, 31, {}, True),
                ("month", 1, 12, _MONTHS, False), ("day of week", 0, 7, _DAYS, True))


def _cron_value(text: str, low: int, high: int, names: Mapping[str, int]) -> int:
    value = names.get(text.lower()) if names else None
    if value is None:
        if not text.isdigit():
            raise ValueError(f"'{text}' is not a number")
        value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{value} is outside {low}-{high}")
    return value


def _check_cron_field(text: str, low: int, high: int, names: Mapping[str, int], question: bool) -> None:
    for item in text.split(","):
        if question and item == "?":
            continue
        base, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"step '{step}' must be a positive number")
        if base == "*":
            continue
        start, dash, end = base.partition("-")
        first = _cron_value(start, low, high, names)
        if dash and _cron_value(end, low, high, names) < first:
            raise ValueError(f"range '{base}' runs backwards")


def validate_schedule(schedule: str) -> str:
    """Check a cron schedule the way Kubernetes' CronJob parser reads it (5 fields or a macro)."""
    if not isinstance(schedule, str) or not schedule.strip():
        raise InvalidSpec("flush.schedule", f"must be a cron expression such as '*/5 * * * *', got {schedule!r}")
    text = " ".join(schedule.split())
    if text.startswith("@"):
        if text in CRON_MACROS:
            return text
        raise InvalidSpec("flush.schedule", f"unknown macro {text!r}: use one of {', '.join(CRON_MACROS)} "
                          "(for '@every <duration>' use flush.interval)")
    if text.upper().startswith(("TZ=", "CRON_TZ=")):
        raise InvalidSpec("flush.schedule", "time zones are not allowed in the schedule: it always runs in UTC")
    fields = text.split(" ")
    if len(fields) != 5:
        raise InvalidSpec("flush.schedule", f"{schedule!r} has {len(fields)} fields; a cron schedule has 5: "
                          "minute hour day-of-month month day-of-week (e.g. '*/5 * * * *')")
    for field, (label, low, high, names, question) in zip(fields, _CRON_FIELDS, strict=True):
        try:
            _check_cron_field(field, low, high, names, question)
        except ValueError as error:
            raise InvalidSpec("flush.schedule", f"{label} field '{field}' of {schedule!r}: {error}") from None
    return text


def effective_schedule(spec: Mapping[str, Any]) -> str:
    """The CronJob schedule: ``flush.schedule``, else ``flush.interval`` mapped, else every 5 minutes."""
    schedule, interval = get(spec, "flush", "schedule"), get(spec, "flush", "interval")
    if schedule is not None and interval is not None:
        raise InvalidSpec("flush", f"set either flush.schedule ({schedule!r}) or flush.interval ({interval!r}), "
                          "not both: remove one of them")
    if schedule is not None:
        return validate_schedule(schedule)
    return interval_to_schedule(interval if interval is not None else DEFAULT_INTERVAL)


# ---------------------------------------------------------------------------------------------------------
# Config


def build_config(namespace: str, name: str, spec: Mapping[str, Any]) -> Config:
    """THE config model for this pipeline (pipeline ``<namespace>/<name>``), from the spec's fields."""
    if not DNS_LABEL.match(name) or len(name) > crd.MAX_NAME_LENGTH:
        raise InvalidSpec("(metadata.name)", f"the name {name!r} must be at most {crd.MAX_NAME_LENGTH} lower-case "
                          "letters, digits and '-' (the CronJob '<name>-flusher' must fit in 52 characters)")
    data: dict[str, Any] = {"pipeline": crd.pipeline_name(namespace, name)}
    for spec_path, (section, key) in CONFIG_FIELDS.items():
        value = get(spec, *spec_path)
        if value is not None:
            data.setdefault(section, {})[key] = value
    sidecar_ports(spec)  # tighter than Config's range (0 = any port makes no sense behind a probe), and distinct
    data.setdefault("server", {})["host"] = sidecar_host(spec)
    try:
        return parse_config(data, source="spec")
    except ConfigError as error:
        loc, message = error.key, error.reason
        # Speak the spec's language: config keys in the message become the spec fields they come from.
        named = sorted((message.find(".".join(target)), path) for path, target in CONFIG_FIELDS.items()
                       if ".".join(target) in message)
        for path, target in CONFIG_FIELDS.items():
            message = message.replace(".".join(target), ".".join(path))
        spec_path = next((path for path, target in CONFIG_FIELDS.items() if loc[:2] == target), None)
        if spec_path is None and named:
            spec_path = named[0][1]
        field = ".".join(spec_path) if spec_path else ".".join(loc) or "(spec)"
        got = f" (got {error.value!r})" if loc and "(got " not in message and error.value is not MISSING else ""
        raise InvalidSpec(field, f"{message}{got}") from None


def config_yaml(config: Config) -> str:
    """The ConfigMap's ``config.yaml``: the model's file form (no connection strings), stable key order."""
    return yaml.safe_dump(config.to_file_dict(), sort_keys=True, default_flow_style=False)


# ---------------------------------------------------------------------------------------------------------
# Children


def labels(name: str, component: str) -> dict[str, str]:
    """The ``app.kubernetes.io/*`` labels every child of pipeline ``name`` carries."""
    return {
        crd.LABEL_NAME: crd.APP_NAME,
        crd.LABEL_INSTANCE: name,
        crd.LABEL_COMPONENT: component,
        crd.LABEL_PART_OF: crd.APP_NAME,
        crd.LABEL_MANAGED_BY: crd.MANAGED_BY,
        crd.LABEL_PIPELINE: name,
    }


def container_security_context() -> dict[str, Any]:
    """Nothing but what the process needs: non-root, read-only root, no capabilities, no escalation."""
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """The pod-level half: the image's unprivileged user (uid 10001), RuntimeDefault seccomp."""
    return {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _secret_env(variable: str, ref: Mapping[str, str]) -> dict[str, Any]:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}}


def render_configmap(namespace: str, name: str, config: Config, sidecar_snippet: str) -> dict[str, Any]:
    """The sidecar ConfigMap: ``config.yaml`` (loadable by ``core.config.load_config``) and a container snippet."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": crd.configmap_name(name), "namespace": namespace,
                     "labels": labels(name, "sidecar-config")},
        "data": {crd.CONFIG_KEY: config_yaml(config), crd.SIDECAR_SNIPPET_KEY: sidecar_snippet},
    }


def sidecar_env(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``REDIS_URL`` from the Redis secret ref, and ``DATABASE_URL`` (the dashboard and query endpoints only
    read): the read-only ``postgres.readSecretRef`` when set, else the writer's ``postgres.secretRef`` (a
    posture warning). secretKeyRefs to the pipeline's own namespace: the connection strings are never copied.
    ``POD_NAME`` comes from the downward API: with ``counters.shards`` > 1 the sidecar writes to the shard
    a stable hash of its pod name picks (``core.keys.sidecar_shard_tag``)."""
    env = [_secret_env(crd.ENV_REDIS_URL, _secret_ref(spec, "redis"))]
    if get(spec, "postgres", "readSecretRef", "name") is not None:
        env.append(_secret_env(crd.ENV_DATABASE_URL, _secret_ref(spec, "postgres", "readSecretRef")))
    elif get(spec, "postgres", "secretRef", "name") is not None:
        env.append(_secret_env(crd.ENV_DATABASE_URL, _secret_ref(spec, "postgres")))
    env.append({"name": crd.ENV_POD_NAME,
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}})
    return env


def sidecar_volume(name: str, volume_name: str = crd.SIDECAR_VOLUME_NAME) -> dict[str, Any]:
    """The pod volume the sidecar mounts: pipeline ``name``'s ConfigMap (the whole directory, for live reload)."""
    return {"name": volume_name, "configMap": {"name": crd.configmap_name(name)}}


def render_sidecar_container(name: str, spec: Mapping[str, Any], default_image: str, *,
                             allowed_images: Sequence[str] = (),
                             volume_name: str = crd.SIDECAR_VOLUME_NAME) -> dict[str, Any]:
    """The sidecar container of pipeline ``name``: published as the ConfigMap's snippet AND injected by the
    webhook (one function, so both are the same thing). ``volume_name`` is the pod volume of :func:`sidecar_volume`.

    Only the probe listener (``/healthz``, ``/readyz``, ``/metrics``) is declared and probed: ingest listens on
    loopback, where the app reaches it, unless the spec exposes it. The startup probe (``/healthz``: the process
    listens) matters for a native sidecar: the kubelet starts the app's containers only once it passes, so the
    app's first events find the sidecar up.
    """
    port, health_port = sidecar_ports(spec)
    ports = [{"name": HEALTH_PORT_NAME, "containerPort": health_port, "protocol": "TCP"}]
    if not is_loopback(sidecar_host(spec)):
        ports.insert(0, {"name": crd.SIDECAR_PORT_NAME, "containerPort": port, "protocol": "TCP"})
    probe = {"httpGet": {"path": "/readyz", "port": HEALTH_PORT_NAME}, "periodSeconds": 5}
    return {
        "name": crd.SIDECAR_CONTAINER_NAME,
        "image": _image(spec, "sidecar", default_image, allowed_images),
        "imagePullPolicy": _choice(spec, PULL_POLICIES, "sidecar", "imagePullPolicy"),
        "command": ["analytics-pipeline"],
        "args": ["sidecar", "--config", crd.CONFIG_PATH, "--log-format", "json"],
        "ports": ports,
        "env": sidecar_env(spec),
        "startupProbe": {"httpGet": {"path": "/healthz", "port": HEALTH_PORT_NAME}, "periodSeconds": 1,
                         "failureThreshold": 30},
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": HEALTH_PORT_NAME}, "periodSeconds": 10},
        "resources": _resources(spec, "sidecar"),
        "securityContext": {**container_security_context(), "runAsUser": 10001, "runAsGroup": 10001},
        "volumeMounts": [{"name": volume_name, "mountPath": crd.CONFIG_DIR, "readOnly": True}],
    }


def sidecar_snippet(name: str, container: Mapping[str, Any]) -> str:
    """YAML text an app team pastes into its pod spec (container + the volume it mounts)."""
    return ("# Or let the operator add it: label the pod analyticspipeline.io/inject: \"" + name + "\"\n"
            "# (docs/injection.md). By hand: add this container to your pod's `containers` (or `initContainers`\n"
            "# with restartPolicy: Always) and this volume to its `volumes`. Mount the directory, not a subPath:\n"
            "# the sidecar re-reads config.yaml when the operator changes it.\n"
            + yaml.safe_dump({"containers": [dict(container)], "volumes": [sidecar_volume(name)]}, sort_keys=False))


def render_cronjob(namespace: str, name: str, spec: Mapping[str, Any], schedule: str,
                   default_image: str, allowed_images: Sequence[str] = ()) -> dict[str, Any]:
    """The flusher CronJob: runs ``analytics-pipeline flush`` on the schedule, never two at once. It gets the
    writer's ``postgres.secretRef``, never the sidecar's read-only ``readSecretRef``."""
    image = _image(spec, "flusher", default_image, allowed_images)
    pull = _choice(spec, PULL_POLICIES, "flusher", "imagePullPolicy")
    env = [_secret_env(crd.ENV_REDIS_URL, _secret_ref(spec, "redis")),
           _secret_env(crd.ENV_DATABASE_URL, _secret_ref(spec, "postgres"))]
    mounts = [{"name": "config", "mountPath": crd.CONFIG_DIR, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}]
    resources = _resources(spec, "flusher")

    def container(container_name: str, command: str) -> dict[str, Any]:
        return {
            "name": container_name,
            "image": image,
            "imagePullPolicy": pull,
            "command": ["analytics-pipeline"],
            "args": [command, "--config", crd.CONFIG_PATH, "--log-format", "json"],
            "env": [dict(item) for item in env],
            "resources": copy.deepcopy(resources),
            "securityContext": container_security_context(),
            "volumeMounts": [dict(item) for item in mounts],
        }

    pod_labels = labels(name, "flusher")
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the flusher never talks to the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container("flusher", "flush")],
        "volumes": [{"name": "config", "configMap": {"name": crd.configmap_name(name)}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    if _bool(spec, "flusher", "runMigrations"):
        pod_spec["initContainers"] = [container("migrate", "migrate")]
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": crd.cronjob_name(name), "namespace": namespace, "labels": pod_labels},
        "spec": {
            "schedule": schedule,
            "timeZone": "Etc/UTC",
            "suspend": _bool(spec, "suspend"),
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": _int(spec, "flusher", "startingDeadlineSeconds"),
            "successfulJobsHistoryLimit": _int(spec, "flusher", "successfulJobsHistoryLimit"),
            "failedJobsHistoryLimit": _int(spec, "flusher", "failedJobsHistoryLimit"),
            "jobTemplate": {
                "metadata": {"labels": dict(pod_labels)},
                "spec": {
                    "backoffLimit": _int(spec, "flusher", "backoffLimit"),
                    # Exit 3: the flush worked but dead-lettered units wait (docs/flush-protocol.md "Dead
                    # letters"): fail the Job at once (no backoff retries that would only flush again), so the
                    # CronJob shows a failed run and the operator warns (FlushFailed) until they are settled.
                    "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                        "containerName": "flusher", "operator": "In", "values": [FLUSH_DEAD_LETTER_EXIT]}}]},
                    "activeDeadlineSeconds": _int(spec, "flusher", "activeDeadlineSeconds"),
                    "template": {"metadata": {"labels": dict(pod_labels)}, "spec": pod_spec},
                },
            },
        },
    }


@dataclass(frozen=True)
class Desired:
    """Everything one pipeline should have, computed from its spec alone."""

    config: Config
    schedule: str
    suspend: bool
    configmap: dict[str, Any]
    cronjob: dict[str, Any]
    warnings: list[tuple[str, str]] = dataclass_field(default_factory=list)


def desired_state(namespace: str, name: str, spec: Mapping[str, Any], *, default_image: str,
                  allowed_images: Sequence[str] = ()) -> Desired:
    """Validate the spec and render both children; raises InvalidSpec naming the first bad field
    (ImageNotAllowed for an image the operator's admin did not allow)."""
    if not isinstance(spec, Mapping):
        raise InvalidSpec("(spec)", "the spec must be an object")
    config = build_config(namespace, name, spec)
    schedule = effective_schedule(spec)
    snippet = sidecar_snippet(name, render_sidecar_container(name, spec, default_image,
                                                             allowed_images=allowed_images))
    return Desired(
        config=config,
        schedule=schedule,
        suspend=_bool(spec, "suspend"),
        configmap=render_configmap(namespace, name, config, snippet),
        cronjob=render_cronjob(namespace, name, spec, schedule, default_image, allowed_images),
        warnings=posture_warnings(spec),
    )


# ---------------------------------------------------------------------------------------------------------
# Drift: does what exists already contain what should exist?


def _scalar_equal(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    if isinstance(want, bool) or isinstance(have, bool):
        return False
    if isinstance(want, str | int | float) and isinstance(have, str | int | float):
        try:  # the API server canonicalises quantities ("0.5" -> "500m", "1024Mi" -> "1Gi")
            return math.isclose(parse_quantity(want), parse_quantity(have), rel_tol=1e-9)
        except ValueError:
            return False
    return False


def contains(have: Any, want: Any) -> bool:
    """True when ``have`` has every field of ``want`` with an equal value (lists: same length, item-wise).

    Fields only ``have`` carries (server defaults such as ``dnsPolicy``) do not count as drift.
    """
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(key in have and contains(have[key], value)
                                                 for key, value in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(have) == len(want)
                and all(contains(h, w) for h, w in zip(have, want, strict=True)))
    return _scalar_equal(want, have)
