"""The ``analytics-pipeline`` command: one entry point, one subcommand per role.

Each subcommand lives in the package that owns it and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported, so ``flush`` does not pay
for kopf and ``operator`` does not pay for aiohttp.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from analytics_pipeline import __version__
from analytics_pipeline.core.config import ENV_CONFIG_FILE, ConfigError
from analytics_pipeline.core.logs import setup_logging

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sidecar": ("analytics_pipeline.sidecar.cli", "run the ingest sidecar (HTTP on localhost, counts into Redis)"),
    "flush": ("analytics_pipeline.flusher.cli", "move Redis counters into PostgreSQL exactly once"),
    "migrate": ("analytics_pipeline.flusher.migrate", "create or upgrade the PostgreSQL schema (idempotent)"),
    "deadletter": ("analytics_pipeline.flusher.deadletter_cli",
                   "list, retry or discard flush units set aside after repeated failures"),
    "query": ("analytics_pipeline.query", "print counts, uniques and event types from the shell"),
    "operator": ("analytics_pipeline.operator.cli", "run the kopf operator for AnalyticsPipeline objects"),
    "demo": ("analytics_pipeline.demo", "run a local end-to-end demo: sidecar, events, flush, dashboard numbers"),
}

EPILOG = f"""\
configuration:
  --config FILE (or ${ENV_CONFIG_FILE}) names a YAML file; REDIS_URL, DATABASE_URL and
  ANALYTICS_PIPELINE override it. See README "Configuration" for every key.

Run 'analytics-pipeline <command> --help' for a command's options."""


def _load(name: str) -> ModuleType | None:
    """Import a subcommand's module; None when this build does not have it."""
    module_name = SUBCOMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None
        raise


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    """The top-level parser; only ``selected`` gets its full set of options."""
    parser = argparse.ArgumentParser(
        prog="analytics-pipeline",
        description="Kubernetes-native event analytics: a sidecar counts events in Redis, a flusher moves "
                    "them exactly once into PostgreSQL, an operator configures both.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, summary) in SUBCOMMANDS.items():
        module = _load(name) if name == selected else None
        doc = (module.__doc__ or summary).strip() if module else summary
        sub = subparsers.add_parser(name, help=summary, description=doc,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--config", metavar="FILE", help=f"YAML config file (default: ${ENV_CONFIG_FILE})")
        sub.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                         help="log verbosity (default: info)")
        sub.add_argument("--log-format", default="text", choices=["text", "json"],
                         help="'json' for one structured object per line (default: text)")
        if module is not None:
            module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn configuration errors into a one-line message and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((arg for arg in argv if not arg.startswith("-")), None)
    if selected in SUBCOMMANDS and _load(selected) is None:
        print(f"analytics-pipeline: '{selected}' is not available in this build "
              f"(module {SUBCOMMANDS[selected][0]} is missing)", file=sys.stderr)
        return 2
    args = build_parser(selected if selected in SUBCOMMANDS else None).parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    module = _load(args.command)
    assert module is not None
    try:
        return int(module.run(args) or 0)
    except ConfigError as error:
        print(f"analytics-pipeline: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
