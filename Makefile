# Two commands do all the set-up on a fresh machine:
#   make demo   virtual environment + install + the quick comparison matrix, its summary and report
#   make test   virtual environment + install + the test suite
# TORCH is installed first so that no unpinned torch (and its CUDA packages) is ever pulled in;
# override it where another build is wanted, e.g. make demo TORCH='torch==2.13.0 --index-url URL'.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.estbench-installed
TEST_STAMP := $(VENV)/.estbench-test-installed

.PHONY: demo test bench install clean

install: $(TEST_STAMP)

# the demo needs only the package; the tests add the test extra (pytest, Ray, Jupyter)
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/estbench run runs/quick.toml --out runs/quick
	$(BIN)/estbench report runs/quick

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

bench: $(TEST_STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-columns=median,iqr,rounds

clean:
	rm -rf $(VENV) runs/*/ .pytest_cache .benchmarks
