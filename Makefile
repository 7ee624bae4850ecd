# Apex Ingest. `make run` serves on the embedded SQLite database; `make test` runs everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
SDK := sdk/python
SDK_VENV := .venv-sdk
PYSRC := apex_ingest gateway tests bench snippet $(SDK)

.PHONY: run test test-sdk lint proto proto-check snippet breaking install install-dev services bench bench-enrichment test-reliability clean

$(VENV)/.run-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(SDK)/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q -e './$(SDK)[grpc]'
	touch $@ $(VENV)/.run-installed

install: $(VENV)/.run-installed
install-dev: $(VENV)/.dev-installed

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## run: serve the gRPC server and the HTTP gateway on the embedded SQLite database
run: install
	$(VENV)/bin/apex-ingest db upgrade
	$(VENV)/bin/apex-ingest demo --ports-free
	@echo "The apex-ingest commands of README.md, from another shell here: . $(VENV)/bin/activate first (or $(VENV)/bin/apex-ingest ...), with the same APEX_* ports and database if you set any."
	@echo
	APEX_LOG_FORMAT=$${APEX_LOG_FORMAT:-text} exec $(VENV)/bin/apex-ingest serve

## test: install what the tests need, make sure PostgreSQL and Redis are up, run pytest (and
## the SDK's own tests in a venv that holds nothing but the SDK)
test: install-dev services test-sdk $(BUF)
	$(PY) -m pytest $(PYTEST_ARGS)

## test-sdk: the SDK's standard-library tests against the SDK installed alone in a fresh venv
test-sdk:
	test -x $(SDK_VENV)/bin/python || $(PYTHON) -m venv $(SDK_VENV)
	rm -rf $(SDK)/build
	$(SDK_VENV)/bin/python -m pip install -q --force-reinstall ./$(SDK)
	rm -rf $(SDK)/build
	cd $(SDK)/tests && $(CURDIR)/$(SDK_VENV)/bin/python -m unittest discover -s .

## test-reliability: the full fault and hostile-input suite (a fast subset runs in `make test`)
test-reliability: install-dev services $(BUF)
	$(PY) -m pytest tests/reliability -m reliability

services:
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-services.sh
	bash scripts/ensure-nats.sh

## proto: regenerate the committed Python stubs from proto/
proto: install-dev
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
		$$(find proto -name '*.proto' | sort)
	@# The SDK's own copy, registered under its own module name (it never imports apex_ingest).
	tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$$tmp --pyi_out=$$tmp proto/apex_ingest/v1/ingest.proto && \
	sed "s/'apex_ingest\.v1\.ingest_pb2'/'apex_ingest_sdk._proto.ingest_pb2'/" \
		$$tmp/apex_ingest/v1/ingest_pb2.py > $(SDK)/apex_ingest_sdk/_proto/ingest_pb2.py && \
	cp $$tmp/apex_ingest/v1/ingest_pb2.pyi $(SDK)/apex_ingest_sdk/_proto/ingest_pb2.pyi && \
	rm -rf $$tmp

## proto-check: fail if the committed stubs differ from what `make proto` generates
proto-check: proto
	@test -z "$$(git status --porcelain -- apex_ingest/v1 $(SDK)/apex_ingest_sdk/_proto)" || \
		{ echo "stubs out of date: run 'make proto' and commit"; \
		  git status --porcelain -- apex_ingest/v1 $(SDK)/apex_ingest_sdk/_proto; exit 1; }

## snippet: build gateway/static/apex.js (what /apex.js serves) from snippet/apex.js
snippet: install-dev
	$(PY) snippet/build.py

lint: install-dev $(BUF)
	$(PY) snippet/build.py --check
	$(BUF) lint
	$(BUF) format --diff --exit-code
	$(VENV)/bin/ruff check $(PYSRC)
	$(VENV)/bin/ruff format --check $(PYSRC)
	$(VENV)/bin/mypy
	cd $(SDK) && $(CURDIR)/$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

## breaking: compare the proto against the last released state: the newest `v*` tag if there
## is one, else where this branch left origin/main (or main), else the root commit
breaking: $(BUF)
	@base=$$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null || \
		git merge-base HEAD origin/main 2>/dev/null || \
		git rev-list --max-parents=0 HEAD | tail -n 1); \
	if [ "$$base" = "$$(git rev-parse HEAD)" ]; then base=$$(git rev-list --max-parents=0 HEAD | tail -n 1); fi; \
	echo "buf breaking against $$base"; \
	$(BUF) breaking --against ".git#ref=$$base"

clean:
	rm -rf $(VENV) $(SDK_VENV) $(SDK)/build node_modules .mypy_cache .ruff_cache .pytest_cache
	@test ! -e apex-ingest.db || echo "kept apex-ingest.db (your events): delete it yourself if you mean to"

## bench: the full path against its baselines (needs PostgreSQL and wrk)
bench: install-dev
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	@command -v nats-server >/dev/null || { apt-get update -qq && apt-get install -y -qq nats-server >/dev/null; }
	$(PY) -m bench.run $(BENCH_ARGS)

## bench-enrichment: what enrichment costs (issue #19): the microbenchmark, then interleaved
## service runs with APEX_ENRICHMENT on and off (5 x 10 s each per load: ~4 minutes)
bench-enrichment: install-dev
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(PY) -m bench.enrichment
	$(PY) -m bench.run --enrichment-compare --rounds 5 --seconds 10 $(BENCH_ARGS)
