"""Names shared by the operator, its tests and the Helm chart: the CRD, labels, children, mount paths.

The CRD's YAML itself lives in ONE place, the Helm chart (``charts/analytics-pipeline/crds/``);
:func:`crd_path` finds it in a source checkout (tests, tooling). The operator never reads it at run time.
"""

from __future__ import annotations

from pathlib import Path

GROUP = "analyticspipeline.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AnalyticsPipeline"
PLURAL = "analyticspipelines"
SINGULAR = "analyticspipeline"
SHORT_NAMES = ("ap",)
CRD_NAME = f"{PLURAL}.{GROUP}"

# The longest CR name whose children still have valid names: a CronJob name may have at most 52
# characters (its Jobs append 11), and the CronJob is "<name>-flusher".
MAX_NAME_LENGTH = 44

# Children: names, the ConfigMap key, where the flusher mounts it.
CONFIGMAP_SUFFIX = "-sidecar-config"
CRONJOB_SUFFIX = "-flusher"
CONFIG_KEY = "config.yaml"
SIDECAR_SNIPPET_KEY = "sidecar-container.yaml"
CONFIG_DIR = "/etc/analytics-pipeline"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
SIDECAR_PORT_NAME = "analytics"
SIDECAR_CONTAINER_NAME = "analytics-sidecar"
SIDECAR_VOLUME_NAME = "analytics-config"

# Sidecar injection: pods labelled `analyticspipeline.io/inject: <pipeline name>` get the sidecar container of
# that pipeline (in the pod's namespace) from the operator's mutating admission webhook at the URL path below.
LABEL_INJECT = "analyticspipeline.io/inject"
WEBHOOK_PATH = "inject-sidecar"  # also the kopf handler id: kopf routes POST /<id> to that handler
WEBHOOK_CERT_DIR = "/etc/analytics-pipeline/webhook-tls"  # tls.crt + tls.key (a kubernetes.io/tls Secret)

# Labels on every child (Kubernetes' recommended labels).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
APP_NAME = "analytics-pipeline"
MANAGED_BY = "analytics-pipeline-operator"
LABEL_PIPELINE = f"{GROUP}/pipeline"

# kopf's own bookkeeping (progress, last handled spec, finalizer) under our prefix, not kopf.zalando.org.
ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/operator"

# Environment variables the flusher and sidecar read their connection strings from (core/config.py).
ENV_REDIS_URL = "REDIS_URL"
ENV_DATABASE_URL = "DATABASE_URL"
# The sidecar's pod name (downward API): a sidecar of a sharded pipeline picks its shard by it (core/keys.py).
ENV_POD_NAME = "POD_NAME"


def configmap_name(name: str) -> str:
    """The sidecar ConfigMap of pipeline ``name``."""
    return f"{name}{CONFIGMAP_SUFFIX}"


def cronjob_name(name: str) -> str:
    """The flusher CronJob of pipeline ``name``."""
    return f"{name}{CRONJOB_SUFFIX}"


def pipeline_name(namespace: str, name: str) -> str:
    """The pipeline id that scopes Redis keys and PostgreSQL rows: ``<namespace>/<name>``."""
    return f"{namespace}/{name}"


def crd_path() -> Path:
    """The CRD manifest in a source checkout (the chart is its single home)."""
    return Path(__file__).resolve().parents[1] / "charts" / APP_NAME / "crds" / f"{CRD_NAME}.yaml"
