# syntax=docker/dockerfile:1
# One slim image for every role: `analytics-pipeline operator`, `flush`, `migrate` and `sidecar`.
#   docker build -t analytics-pipeline:0.1.0 .
# Stage 1 builds the package into a virtualenv; stage 2 copies only that virtualenv onto a clean
# python:slim base and runs it as an unprivileged user (uid 10001, as the chart and operator expect).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Every dependency ships binary wheels for CPython 3.11 (asyncpg, hiredis, orjson, uvloop),
# so no compiler is needed; --only-binary keeps it that way instead of silently building from source.
# schema.sql: core/schema.sql is a symlink to it.
COPY pyproject.toml README.md schema.sql ./
COPY cli/ cli/
COPY core/ core/
COPY sidecar/ sidecar/
COPY flusher/ flusher/
COPY operator/ operator/
RUN pip install --upgrade pip \
 && pip wheel --no-deps --wheel-dir /wheels .
# Leave /src before running Python: its operator/ folder would shadow the standard library's `operator`.
WORKDIR /
RUN pip install --only-binary=:all: /wheels/analytics_pipeline-*.whl \
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
