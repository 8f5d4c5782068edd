# kmstn: the two set-up commands are `make demo` and `make test`.
# Both are idempotent and do all set-up on a fresh Debian machine with Python 3.11.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo demo-mesh deps venv lint type protos unit integration bench simulate clean

test: deps venv lint type protos
	$(BIN)/pytest

demo: deps venv
	$(BIN)/python -m lab.demo --topology examples/testbed.toml --state state/demo

# The mesh (examples/mesh.toml) from per-node files: keys while a QKD link's
# devices are killed, and the time from the fault to the first key over the
# new path.
demo-mesh: deps venv
	$(BIN)/python -m lab.demo --topology examples/mesh.toml --state state/demo-mesh \
		--fail-link QKD-W1-W2 --repeat 3

# Link state at scale: 1,000 simulated nodes of the real link-state code.
simulate: venv
	$(BIN)/python -m routing.simulate --nodes 1000

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
	$(BIN)/mypy kme routing keyvault relay gateway lab

protos: venv
	$(BIN)/python protos/generate.py --check

unit: venv
	$(BIN)/pytest -m "not integration and not soak"

integration: deps venv
	$(BIN)/pytest -m integration

# Component benchmarks (each prints its own numbers); `kmstn bench` measures a
# running federation (see README).
bench: deps venv
	$(BIN)/python -m routing.bench
	$(BIN)/python -m lab.qkdsim.bench --quick
	$(BIN)/python -m keyvault.bench
	$(BIN)/python -m relay.bench
	$(BIN)/python -m gateway.bench
	$(BIN)/python -m gateway.bench_edge --requests 100

clean:
	rm -rf $(VENV) .tox .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
