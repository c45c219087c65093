# The commands a newcomer needs: `make test` and `make demo` (both install first).
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo bench clean-venv

install:
	@VENV="$(abspath $(VENV))" bash tools/setup_env.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) projects/digits/tools/demo.py $(DEMO_ARGS)

bench: install
	$(PY) tools/benchmark.py $(BENCH_ARGS)

clean-venv:
	rm -rf "$(abspath $(VENV))"
