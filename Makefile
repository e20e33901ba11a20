# ttt — two commands do everything on a fresh clone:
#   make demo   compare the variants on embedded data (installs first if needed; 12.7 min measured
#               on 2 cores, 2026-12-07, plus the install)
#   make test   the linter, then the fast test suite (installs first if needed; what CI runs)
# and `make compare` runs the full comparison grid behind the README's results (~3 h on 2 cores,
# then ~6 h more for the mixers added since, their 81 runs measured; rerun the same command
# to resume).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests run on the CPU with eight virtual devices so the parallel paths are exercised. The suite is
# dominated by XLA compile time at tiny shapes, so the CPU backend's expensive LLVM passes are off
# (about 30% less CPU time for the suite; results are unaffected at test tolerances).
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=8 \
	--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
PYTEST_WORKERS ?= 2

.PHONY: install test test-slow lint demo compare bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,dev,tokenizer]'
	touch $(STAMP)

test: lint
	$(TEST_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

test-slow: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check ttt experiments tests

demo: $(STAMP)
	$(PY) -m experiments.compare --preset demo --workdir runs/demo

compare: $(STAMP)
	$(PY) -m experiments.compare --preset compare --workdir runs/compare

bench: $(STAMP)
	$(PY) -m experiments.bench --out runs/bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
