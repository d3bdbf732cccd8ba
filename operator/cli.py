"""Run the kopf operator that turns AnalyticsPipeline objects into the sidecar's ConfigMap and the
flusher's CronJob, keeps them repaired, and reports status (Ready / ConfigMapReady / CronJobReady).

Runs as ONE replica (--standalone: no kopf peering objects needed). A liveness endpoint answers on
--liveness (default http://0.0.0.0:8080/healthz) once the operator has started. The --config option
common to all commands is not used by the operator: every pipeline's config comes from its spec.
"""

from __future__ import annotations

import argparse
import os

import kopf

from analytics_pipeline import __version__

from .handlers import build_registry
from .kube import KubeApi
from .reconcile import OperatorContext

ENV_DEFAULT_IMAGE = "ANALYTICS_PIPELINE_IMAGE"
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``analytics-pipeline operator``."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch only this namespace (repeatable; exact names)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--liveness", default=DEFAULT_LIVENESS, metavar="URL",
                        help=f"serve kopf's health endpoint here; '' disables it (default: {DEFAULT_LIVENESS})")
    parser.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=True,
                        help="run without kopf peering (one replica; the chart uses strategy Recreate)")
    parser.add_argument("--resync-seconds", type=float, default=60.0, metavar="S",
                        help="re-check every pipeline's children this often, events or not (default: 60)")
    parser.add_argument("--default-image", default=os.environ.get(ENV_DEFAULT_IMAGE)
                        or f"analytics-pipeline:{__version__}", metavar="IMAGE",
                        help=f"image for the flusher/sidecar when a spec sets none (default: ${ENV_DEFAULT_IMAGE})")


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT."""
    if args.resync_seconds <= 0:
        raise SystemExit("analytics-pipeline operator: --resync-seconds must be positive")
    context = OperatorContext(api=KubeApi(), default_image=args.default_image)
    kopf.run(
        registry=build_registry(resync_seconds=args.resync_seconds),
        standalone=args.standalone,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(ctx=context),
    )
    return 0
