# steel_ray: `make demo` runs the main job on a synthetic set, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo

.PHONY: install demo test test-slow lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m steel_ray.demo --data $(DEMO_DATA) --run $(DEMO_RUN)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check steel_ray tests benchmarks

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/bench_rle.py

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN)
