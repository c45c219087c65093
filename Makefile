# The commands a newcomer needs: `make test` and `make demo` (both install first).
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench clean-venv

install:
	@VENV="$(abspath $(VENV))" bash tools/setup_env.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: everything but the tests marked slow (Runner, tools, subprocesses).
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	$(PY) projects/digits/tools/demo.py $(DEMO_ARGS)

bench: install
	$(PY) tools/benchmark.py $(BENCH_ARGS)

clean-venv:
	rm -rf "$(abspath $(VENV))"
