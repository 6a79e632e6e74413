# tasklease — the commands the README promises and CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install spire dev demo test test-unit lint bench soak clean help

help:
	@echo "make dev    - start the real local stack (OpenBao, SPIRE, Redis, PostgreSQL) and the broker"
	@echo "make demo   - narrate one workflow run on a fresh local stack (every step checked)"
	@echo "make test   - run every test (unit + against the real stack), with coverage"
	@echo "make lint   - ruff, mypy --strict, import-linter"
	@echo "make bench  - benchmarks (figures printed, nothing asserted)"
	@echo "make soak   - bounded soak under faults checking nothing lost / nothing leaked (TASKLEASE_SOAK_SECONDS, TASKLEASE_SOAK_SEED)"

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

spire:
	bash deploy/build-spire.sh

dev: install spire
	$(BIN)/tasklease dev

demo: install spire
	$(BIN)/tasklease demo

test: install spire
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage report

test-unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check broker tests $(wildcard bench)
	$(BIN)/ruff format --check broker tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/lint-imports
	cd deploy/k8scheck && unformatted=$$("$$(go env GOROOT)/bin/gofmt" -l .) \
	  && { [ -z "$$unformatted" ] || { echo "gofmt needed: $$unformatted"; exit 1; }; } \
	  && go vet ./...

bench: install spire
	@for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# Not in `make test` or `make bench`: about 90 s of load under faults (seeded), then the checks.
soak: install spire
	$(BIN)/python bench/soak_faults.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
