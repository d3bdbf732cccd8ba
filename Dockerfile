# One slim image for every role: `analytics-pipeline operator`, `flush`, `migrate` and `sidecar`.
#   make image        (builds on a debootstrapped Debian base with this machine's engine or a private dockerd)
#   docker build -t analytics-pipeline:0.1.0 .
# Stage 1 installs the locked dependencies (requirements.lock: exact versions, checked by hash) and the
# package into a virtualenv; stage 2 copies only that virtualenv onto a clean base and runs it as an
# unprivileged user (uid 10001, as the chart and operator expect). PYTHON_IMAGE: any Debian-based image
# with python3 and its venv module (python:3.11-slim, or Debian with python3-venv).
# No `# syntax=` line: it would make a BuildKit builder fetch a frontend image from a registry.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# python3: a Debian base has no `python` (python:slim has both).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, in their own layer: exactly the versions of requirements.lock, each file checked
# against its hash. Every one ships binary wheels for CPython 3.11 (asyncpg, hiredis, orjson, uvloop),
# so no compiler is needed; --only-binary keeps it that way instead of silently building from source.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes --only-binary=:all: -r /tmp/requirements.lock
WORKDIR /src
# schema.sql: core/schema.sql is a symlink to it.
COPY pyproject.toml README.md schema.sql ./
COPY cli/ cli/
COPY core/ core/
COPY sidecar/ sidecar/
COPY flusher/ flusher/
COPY operator/ operator/
COPY reads/ reads/
RUN pip wheel --no-deps --wheel-dir /wheels .
# Leave /src before running Python: its operator/ folder would shadow the standard library's `operator`.
# --no-deps: the dependencies are the locked ones above; `pip check` proves they satisfy the package.
WORKDIR /
RUN pip install --no-deps /wheels/analytics_pipeline-*.whl \
 && pip check \
 && pip uninstall -y pip setuptools

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="analytics-pipeline" \
      org.opencontainers.image.description="Event analytics sidecar, flusher and Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 analytics \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin analytics
COPY --from=build /opt/venv /opt/venv
# Numeric, so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# 8787: the sidecar (ingest, /healthz, /readyz, /metrics, dashboard on /); 8080: the operator's /healthz.
EXPOSE 8787 8080
ENTRYPOINT ["analytics-pipeline"]
CMD ["--help"]
