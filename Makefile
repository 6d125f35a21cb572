# Two entry points for a new user: `make demo` and `make test`.
# Each creates .venv if needed, installs the CPU build of torch first (an unpinned torch pulls a
# multi-GB CUDA build), then the package, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

# Tiny-model torch ops are ~10x slower with 2 contended threads; MLflow telemetry stays off.
export OMP_NUM_THREADS ?= 1
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint clean phoenix-venv wheel-check docs docs-images

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[test,airflow]"
	touch $@ $(VENV)/.installed

# Arize Phoenix for tests/test_phoenix_source.py, in its own environment: it pins other FastAPI
# releases than ctloop (which stays below 0.137 for Airflow).
PHOENIX_VENV ?= .venv-phoenix
PHOENIX_SPEC ?= "arize-phoenix==20.26.1" "openinference-instrumentation-openai==0.1.66" "openai>=1.40"

$(PHOENIX_VENV)/.installed:
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install -q $(PHOENIX_SPEC)
	touch $@

phoenix-venv: $(PHOENIX_VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/ctloop demo

# scripts/with_postgres.sh starts a throwaway PostgreSQL for the shadow store's tests;
# scripts/run_tests.sh runs the suite on two pytest-xdist workers, then the serial tests alone.
test: $(VENV)/.installed-test $(PHOENIX_VENV)/.installed
	scripts/with_postgres.sh scripts/run_tests.sh $(PY) $(PYTEST_ARGS)

# The inner loop: unit tests only (no whole cycles, no Airflow, no PostgreSQL); CI runs everything.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Lint, format check, the layering contracts (import-linter) and types (mypy), see pyproject.toml.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests dags benchmarks scripts
	$(VENV)/bin/ruff format --check src tests dags benchmarks scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# The docs site: scripts/build_docs.py writes the generated pages (the sections the README keeps, the
# configuration and command line references), then mkdocs (in its own environment) builds it with
# --strict, so a broken link or a missing page fails. The site lands in build/site/.
DOCS_VENV ?= .venv-docs
$(DOCS_VENV)/.installed:
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q "mkdocs==1.6.1" "mkdocs-material==9.8.2"
	touch $@

docs: $(VENV)/.installed-test $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) scripts/build_docs.py --build $(DOCS_VENV)/bin/mkdocs

# The docs' screenshots of the example reports (headless Chromium: apt-get install chromium).
docs-images: $(VENV)/.installed-test
	$(PY) scripts/build_docs.py --screenshots

# The package as users install it: a wheel and an sdist built from the checkout, the wheel installed
# into a clean environment (nothing editable, no test extras), its command run on the shipped example.
WHEEL_VENV ?= $(CURDIR)/build/wheel-venv
wheel-check: $(PY)
	rm -rf dist $(WHEEL_VENV)
	$(PY) -m pip install -q build
	$(PY) -m build -q --wheel --sdist --outdir dist . >/dev/null
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(WHEEL_VENV)/bin/python -m pip install -q dist/ctloop-*.whl
	cd /tmp && $(WHEEL_VENV)/bin/ctloop --help >/dev/null
	cd /tmp && $(WHEEL_VENV)/bin/ctloop validate-config $(CURDIR)/configs/production.example.yaml
	cd /tmp && $(WHEEL_VENV)/bin/python $(CURDIR)/scripts/check_wheel.py

clean:
	rm -rf $(VENV) $(PHOENIX_VENV) $(DOCS_VENV) ctloop-workspace build dist
