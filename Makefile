# kmstn: the two set-up commands are `make demo` and `make test`.
# Both are idempotent and do all set-up on a fresh Debian machine with Python 3.11.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo deps venv lint type protos unit integration bench clean

test: deps venv lint type protos
	$(BIN)/pytest

demo: deps venv
	@echo "kmstn demo: not yet. The federation launcher (kmstn federation up) is a later step;"
	@echo "until it lands, 'make test' runs every service that exists for real."

deps:
	@./deploy/debian-deps.sh

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "kmstn needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .

type: venv
	$(BIN)/mypy kme routing

protos: venv
	$(BIN)/python protos/generate.py --check

unit: venv
	$(BIN)/pytest -m "not integration and not soak"

integration: deps venv
	$(BIN)/pytest -m integration

bench: venv
	$(BIN)/python -m routing.bench

clean:
	rm -rf $(VENV) .tox .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
