# Developer entry points. `make demo` and `make test` are the whole set-up: both create .venv and
# install the project (with the Airflow server and test extras) when needed.

PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
ARGS        ?=

.PHONY: venv install demo test test-unit test-e2e test-chaos package image bench clean

venv: $(PY)

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel

# Reinstall only when the dependency list changed (a no-op pip resolve still costs ~20 s).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[server,test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) scripts/demo.py $(ARGS)

# Unit, integration, PostgreSQL, security, packaging, e2e and chaos tests (about 25 minutes on 2
# cores). The chaos faults run in a second pytest beside the rest (scripts/run-tests.sh); with ARGS
# only `pytest ARGS` runs, without them. PostgreSQL's server binaries come from Debian's package,
# installed when missing.
test: install
	bash scripts/install-test-deps.sh
	PY=$(PY) bash scripts/run-tests.sh $(ARGS)

test-unit: install
	$(PY) -m pytest -ra -m "not e2e" tests/unit $(ARGS)

test-e2e: install
	$(PY) -m pytest -ra -m e2e tests/e2e $(ARGS)

# Faults injected into two schedulers, two gateways and two agents on PostgreSQL (issue 4). Figures
# go to build/chaos/*.json; the table for docs/reliability.md is printed at the end, pass or fail.
test-chaos: install
	bash scripts/install-test-deps.sh
	$(PY) -m pytest -ra tests/chaos $(ARGS); status=$$?; $(PY) tests/chaos/report.py; exit $$status

# The issue-5 benchmark (15-30 min on 2 cores; ARGS=--quick for ~5 min), not part of make test.
# Airflow's edge3 provider is installed only into this separate environment, never into .venv.
BENCH_VENV  := build/bench-venv
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml
	$(PYTHON_BOOT) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --upgrade pip setuptools wheel
	$(BENCH_PY) -m pip install -e '.[server,test,bench]' 'apache-airflow-providers-edge3==5.1.0'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	bash scripts/install-test-deps.sh
	$(BENCH_PY) -m bench.run $(ARGS)

# Standalone agent binaries (PyInstaller onedir + onefile, release tarball) and the .deb, in dist/.
package: install
	$(PY) packaging/build.py --onedir --onefile --tarball
	sh packaging/deb/build_deb.sh

# The container image, built without a Docker daemon (buildah; CONTAINER=podman or docker work too).
# Its base image comes from a registry, so this needs registry access.
CONTAINER ?= buildah
image:
	$(CONTAINER) build -f packaging/container/Containerfile -t edge-agent:0.1.0 .

clean:
	rm -rf .demo build dist .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
