# steel_ray: `make demo` runs the main job on a synthetic set, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo

.PHONY: install demo test test-slow test-browser lint bench clean lock rehearsal

# pip's output (its warnings about this machine's extra package indexes included) goes to
# .venv/install.log; the console gets one line, or the log's last lines when the install fails
# constraints.txt pins every package to the versions tested together (make lock regenerates it);
# the cluster files install with the same file, so every node runs the same versions
$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing steel_ray and its dependencies into $(VENV) (log: $(VENV)/install.log; a first install takes about 2 minutes)"
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install -c constraints.txt -e '.[test]'; } >$(VENV)/install.log 2>&1 \
		|| { tail -n 30 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)
	@echo "installed: $$($(PY) -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "ray", "segmentation-models-pytorch", "optuna")))')"

install: $(STAMP)

demo: install
	$(PY) -m steel_ray.demo --data $(DEMO_DATA) --run $(DEMO_RUN)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check steel_ray tests benchmarks

test-slow: install
	$(PY) -m pytest -q -m slow

# the demo's report rendered by a real browser: Debian's chromium and its driver (installed with
# apt-get when missing; root, or sudo), the demo made first when its report is missing; the
# screenshot goes to $(DEMO_RUN)/blend/report_screenshot.png. Not part of make test.
test-browser: install
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "installing Debian's chromium and chromium-driver (apt-get; log: $(VENV)/apt.log)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium chromium-driver; } >$(VENV)/apt.log 2>&1 \
		|| { tail -n 20 $(VENV)/apt.log; echo "apt-get failed: see $(VENV)/apt.log"; exit 1; }; }
	@test -f $(DEMO_RUN)/blend/report.html || $(MAKE) demo
	STEEL_RAY_REPORT=$(DEMO_RUN)/blend/report.html STEEL_RAY_SCREENSHOT=$(DEMO_RUN)/blend/report_screenshot.png \
		$(PY) -m pytest -q -s -m browser tests/test_browser.py

bench: install
	$(PY) benchmarks/bench_rle.py

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN)

# constraints.txt: pip freeze of a fresh venv that installed setup.cfg's ranges (and the test
# extras); rerun after changing setup.cfg, then make install
LOCKVENV := .lockvenv
lock:
	rm -rf $(LOCKVENV) && $(PYTHON) -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/python -m pip install --upgrade pip >$(LOCKVENV).log 2>&1
	$(LOCKVENV)/bin/python -m pip install '.[test]' >>$(LOCKVENV).log 2>&1 || { tail -n 30 $(LOCKVENV).log; exit 1; }
	{ echo "# Versions tested together: pip freeze of a fresh install of setup.cfg (make lock, $$(date +%F))."; \
	  echo "# Used as pip -c by make install and by the setup commands of cluster.yaml and cluster-local.yaml."; \
	  $(LOCKVENV)/bin/python -m pip freeze --exclude-editable | grep -iv '^steel.ray *[=@]' | sed 's/+[A-Za-z0-9.]*$$//'; } >constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm -rf $(LOCKVENV) $(LOCKVENV).log

# the cluster path on one machine: a second Ray node with its own disk (root: unshare --mount),
# moto's S3 server, a node killed mid-trial; ends with "rehearsal: ok" (about 3 minutes)
rehearsal: install
	$(PY) benchmarks/rehearsal.py --run runs/rehearsal --data data/rehearsal
