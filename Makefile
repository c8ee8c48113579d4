# escrow-stream: `make run` and `make test` are the whole set-up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv tools bench stack-up stack-down stack-status topics migrate run worker test test-unit \
        test-integration test-chaos lint bench-domain clean

help:
	@echo "make run          venv + local stack + topics + migrations, then the worker on PORT (3000)"
	@echo "make test         venv + local stack + topics, then the test suite (all but chaos)"
	@echo "make test-chaos   the long fault tests (SIGKILL x10, broker, PostgreSQL, Redis stopped)"
	@echo "make test-unit    unit tests only (no servers)"
	@echo "make lint         ruff and mypy"
	@echo "make stack-up | stack-down | stack-status    Kafka, PostgreSQL, Redis, stripe-mock, S3 (moto)"
	@echo "make bench-domain the domain core benchmark"
	@echo "make bench        every benchmark (~15 min); README's Performance section from the run"
	@echo "make image        the container image (docker or podman; see mk/image.mk)"
	@echo "make tools        test tools that are not Python packages (promtool)"

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(INSTALLED)

stack-up:
	scripts/stack.sh up

stack-down:
	scripts/stack.sh down

stack-status:
	scripts/stack.sh status

topics: venv stack-up
	$(BIN)/escrow-stream topics create

migrate: venv stack-up
	@if $(BIN)/escrow-stream db --help >/dev/null 2>&1; then $(BIN)/escrow-stream db migrate; fi

run: venv stack-up topics migrate
	exec $(BIN)/escrow-stream worker

worker: venv
	exec $(BIN)/escrow-stream worker

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
define run_pytest
	@set +e; $(BIN)/pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest ran no tests" >&2; exit 1; fi; exit $$rc
endef

tools:
	scripts/tools.sh

test: venv stack-up tools topics migrate
	$(call run_pytest,-m "not chaos" $(PYTEST_ARGS))

# Stops and starts the stack's own servers: run it alone, never beside another test run.
test-chaos: venv stack-up topics migrate
	$(call run_pytest,-m chaos -s $(PYTEST_ARGS))

test-unit: venv
	$(call run_pytest,tests/unit $(PYTEST_ARGS))

test-integration: venv stack-up topics migrate
	$(call run_pytest,tests/integration $(PYTEST_ARGS))

lint: venv
	$(BIN)/ruff check escrow_stream tests benchmarks
	$(BIN)/ruff format --check escrow_stream tests benchmarks
	$(BIN)/mypy escrow_stream

bench-domain: venv
	$(BIN)/python -m benchmarks.domain

clean:
	rm -rf $(VENV) escrow-stream-data .pytest_cache .mypy_cache .ruff_cache .hypothesis

bench: venv stack-up
	$(BIN)/python -m benchmarks.all --readme README.md $(BENCH_ARGS)

include mk/image.mk
