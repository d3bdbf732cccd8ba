"""``helm test`` check: is the CRD served, may this service account use it, does the operator answer?

Run inside the test pod as ``python -m analytics_pipeline.operator.selftest --operator-url URL``. Uses
the pod's service account token and CA (standard library only) and exits non-zero, saying what failed,
unless all of these hold:

1. API discovery lists ``analyticspipelines`` (and its ``status`` subresource) in analyticspipeline.io/v1alpha1;
2. listing AnalyticsPipelines in the namespace succeeds (the CRD is established and RBAC allows it);
3. the operator's liveness endpoint answers 200 (retried while the operator starts).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import crd

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class CheckFailed(Exception):
    """One check did not pass; the message says which and why."""


def _get(url: str, token: str | None, context: ssl.SSLContext | None, timeout: float) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")[:300]
    except (urllib.error.URLError, OSError) as error:
        raise CheckFailed(f"GET {url}: {getattr(error, 'reason', error)}") from None
    try:
        return status, json.loads(body) if body else {}
    except ValueError:
        return status, body.decode("utf-8", "replace")[:300]


def check_crd_served(api: str, token: str | None, context: ssl.SSLContext | None, timeout: float) -> str:
    """Discovery lists the resource and its status subresource."""
    status, body = _get(f"{api}/apis/{crd.GROUP}/{crd.VERSION}", token, context, timeout)
    if status != 200 or not isinstance(body, dict):
        raise CheckFailed(f"API discovery of {crd.API_VERSION} answered {status}: {body} (is the CRD installed?)")
    names = {item.get("name") for item in body.get("resources") or []}
    missing = {crd.PLURAL, f"{crd.PLURAL}/status"} - names
    if missing:
        raise CheckFailed(f"{crd.API_VERSION} does not serve {', '.join(sorted(missing))} (served: {sorted(names)})")
    return f"CRD served: {crd.API_VERSION} lists {crd.PLURAL} and {crd.PLURAL}/status"


def check_list(api: str, namespace: str, token: str | None, context: ssl.SSLContext | None, timeout: float) -> str:
    """Listing the namespace's AnalyticsPipelines works."""
    url = f"{api}/apis/{crd.GROUP}/{crd.VERSION}/namespaces/{namespace}/{crd.PLURAL}"
    status, body = _get(url, token, context, timeout)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise CheckFailed(f"listing {crd.PLURAL} in {namespace} answered {status}: {body}")
    return f"listing {crd.PLURAL} in namespace {namespace} works ({len(body['items'])} found)"


def check_operator(url: str, timeout: float, wait: float) -> str:
    """The operator's liveness endpoint answers 200 within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            status, body = _get(url, None, None, timeout)
            if status == 200:
                return f"operator liveness endpoint {url} answered 200"
            problem = f"answered {status}: {body}"
        except CheckFailed as error:
            problem = str(error)
        if time.monotonic() >= deadline:
            raise CheckFailed(f"operator liveness endpoint {url} {problem}")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    """Run the checks; 0 when all pass, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m analytics_pipeline.operator.selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operator-url", required=True, help="the operator's liveness URL (via its Service)")
    parser.add_argument("--api-server", default="https://kubernetes.default.svc")
    parser.add_argument("--token-file", type=Path, default=SA_DIR / "token")
    parser.add_argument("--ca-file", type=Path, default=SA_DIR / "ca.crt")
    parser.add_argument("--namespace", help="namespace to list in (default: the pod's own)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the operator to answer")
    args = parser.parse_args(argv)

    token = args.token_file.read_text(encoding="utf-8").strip() if args.token_file.exists() else None
    namespace = args.namespace
    if not namespace and (SA_DIR / "namespace").exists():
        namespace = (SA_DIR / "namespace").read_text(encoding="utf-8").strip()
    context = None
    if args.api_server.startswith("https"):
        context = ssl.create_default_context(cafile=str(args.ca_file) if args.ca_file.exists() else None)
    api = args.api_server.rstrip("/")
    checks = [lambda: check_crd_served(api, token, context, args.timeout),
              lambda: check_list(api, namespace or "default", token, context, args.timeout),
              lambda: check_operator(args.operator_url, args.timeout, args.wait)]
    failed = 0
    for check in checks:
        try:
            print(f"ok   {check()}", flush=True)
        except CheckFailed as error:
            failed += 1
            print(f"FAIL {error}", flush=True)
    print("all checks passed" if not failed else f"{failed} check(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
