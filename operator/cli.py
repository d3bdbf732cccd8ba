"""Run the kopf operator that turns AnalyticsPipeline objects into the sidecar's ConfigMap and the
flusher's CronJob, keeps them repaired, and reports status (Ready / ConfigMapReady / CronJobReady).

Runs as ONE replica (--standalone: no kopf peering objects needed). A liveness endpoint answers on
--liveness (default http://0.0.0.0:8080/healthz) once the operator has started. The --config option
common to all commands is not used by the operator: every pipeline's config comes from its spec.

With --webhook-port, it also serves the sidecar injection webhook (HTTPS, POST /inject-sidecar) with the
certificate in --webhook-cert-dir (reloaded in place when it is renewed), and --metrics-port serves
Prometheus metrics such as analytics_pipeline_injections_total.
"""

from __future__ import annotations

import argparse
import os
import ssl
from pathlib import Path

import kopf
from prometheus_client import start_http_server

from analytics_pipeline import __version__

from . import crd, inject
from .certs import CertificateReloader, server_context
from .handlers import build_registry
from .kube import KubeApi
from .reconcile import OperatorContext
from .webhook import WebhookOptions

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
    parser.add_argument("--allowed-image", action="append", default=[], metavar="IMAGE",
                        help="an image a pipeline's spec may name besides the default (repeatable): an exact "
                             "reference, or a prefix ending in '/' (a registry or repository path), ':' (any tag of "
                             "a repository) or '@' (any digest); without any, specs that name another image get "
                             "Ready=False, reason ImageNotAllowed")
    hook = parser.add_argument_group("sidecar injection webhook")
    hook.add_argument("--webhook-port", type=int, default=0, metavar="PORT",
                      help=f"serve the webhook (HTTPS, path /{crd.WEBHOOK_PATH}) on this port; 0 = off (default)")
    hook.add_argument("--webhook-address", default="0.0.0.0", metavar="ADDR", help="listen address (default: 0.0.0.0)")
    hook.add_argument("--webhook-cert-dir", type=Path, default=Path(crd.WEBHOOK_CERT_DIR), metavar="DIR",
                      help=f"tls.crt and tls.key of the webhook's certificate (default: {crd.WEBHOOK_CERT_DIR})")
    hook.add_argument("--webhook-cert-reload-seconds", type=float, default=10.0, metavar="S",
                      help="check the certificate files for a renewal this often (default: 10)")
    hook.add_argument("--sidecar-mode", choices=inject.MODES, default=inject.NATIVE,
                      help="native: an init container with restartPolicy Always (Kubernetes >= 1.29; Jobs can "
                           "finish); container: a plain container for older clusters (default: native)")
    hook.add_argument("--count-injected-pods", action=argparse.BooleanOptionalAction, default=True,
                      help="on each resync, count the Running pods carrying a pipeline's sidecar into "
                           "status.injectedPods (lists pods by label; default: on)")
    parser.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                        help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics; 0 = off (default)")


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT."""
    if args.resync_seconds <= 0:
        raise SystemExit("analytics-pipeline operator: --resync-seconds must be positive")
    injection = webhook_options(args)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    context = OperatorContext(api=KubeApi(), default_image=args.default_image,
                              allowed_images=tuple(image for image in args.allowed_image if image))
    kopf.run(
        registry=build_registry(resync_seconds=args.resync_seconds, injection=injection),
        standalone=args.standalone,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(ctx=context),
    )
    return 0


def webhook_options(args: argparse.Namespace) -> WebhookOptions | None:
    """The webhook's options, with its certificate checked now so a bad one is a one-line error at start."""
    if not args.webhook_port:
        return None
    if not 1 <= args.webhook_port <= 65535 or args.webhook_cert_reload_seconds <= 0:
        raise SystemExit("analytics-pipeline operator: --webhook-port must be 1-65535 and "
                         "--webhook-cert-reload-seconds positive")
    options = WebhookOptions.from_cert_dir(args.webhook_cert_dir, args.webhook_port, address=args.webhook_address,
                                           mode=args.sidecar_mode, reload_seconds=args.webhook_cert_reload_seconds,
                                           count_pods=args.count_injected_pods)
    try:
        CertificateReloader(server_context(), options.cert_file, options.key_file).load()
    except (OSError, ssl.SSLError) as error:
        raise SystemExit(f"analytics-pipeline operator: the webhook certificate {options.cert_file} and key "
                         f"{options.key_file} cannot be used: {error}") from None
    return options
