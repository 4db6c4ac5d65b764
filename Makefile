# specbatch — three commands (times measured on the 2-core CPU VM, 2026-12-03):
#   make demo       a core install (no torch) into .venv, then the default policy study + dashboard:
#                   about 1 min (49 s on a quiet machine, 1.5-2 min under load); the first run also
#                   installs the dependencies (about 3 min under load)
#   make test       the test environment (core + torch + profiler + test extras) in .venv-test and the whole
#                   suite: 11-14 min (the first run also installs torch and the extras)
#   make test-fast  the suite without the tests marked slow (decorated, or listed in tests/conftest.py):
#                   about 1 min (57 s; the target is 2 min)
# Installs are quiet and happen only when needed: the demo reinstalls specbatch (6 s) when one of its files
# changed (the stamp .venv/.installed depends on them), its dependencies only when pyproject.toml changed; the
# test environment is an editable install, rebuilt only when pyproject.toml changed.
PYTHON ?= python3
# torch is installed on its own, first, so pip never picks a build by itself. Override for your machine,
# e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_VENV ?= .venv
TEST_VENV ?= .venv-test
PYTEST_ARGS ?=
PIP = -m pip install -q --disable-pip-version-check

# every file that goes into the package (what the demo's install copies)
PACKAGE_FILES := pyproject.toml $(shell find specbatch conf traces sim profiler fidelity dashboards -type f \
	\( -name '*.py' -o -name '*.yaml' -o -name '*.csv' -o -name '*.json' \) -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: demo test test-fast clean demo-note test-note test-fast-note

demo-note:
	@echo "make demo: the default policy study (24 runs) and its dashboard: about 1 min on 2 cores (2 under load)$(if $(wildcard $(DEMO_VENV)/.deps),, - first installing the dependencies: about 3 min more)"

$(DEMO_VENV)/.installed: $(PACKAGE_FILES)
	@set -e; \
	if [ ! -x $(DEMO_VENV)/bin/python ] || [ ! -f $(DEMO_VENV)/.deps ] || [ pyproject.toml -nt $(DEMO_VENV)/.deps ]; then \
	  echo "make demo: installing specbatch and its dependencies into $(DEMO_VENV)"; \
	  $(PYTHON) -m venv $(DEMO_VENV); \
	  $(DEMO_VENV)/bin/python $(PIP) --upgrade pip; \
	  $(DEMO_VENV)/bin/python $(PIP) .; \
	  touch $(DEMO_VENV)/.deps; \
	else \
	  echo "make demo: specbatch's files changed since the last install: reinstalling it into $(DEMO_VENV)"; \
	  $(DEMO_VENV)/bin/python $(PIP) --no-deps --force-reinstall .; \
	fi; \
	touch $@

demo: demo-note $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/specbatch-demo

$(TEST_VENV)/.installed: pyproject.toml
	@echo "make: installing the test environment into $(TEST_VENV) (torch $(TORCH_SPEC), the profile and test extras)"
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python $(PIP) --upgrade pip
	$(TEST_VENV)/bin/python $(PIP) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(TEST_VENV)/bin/python $(PIP) -e ".[profile,test]"
	touch $@

test-note:
	@echo "make test: the whole suite, 11-14 min on 2 cores (progress below; the 10 slowest tests at the end)"

test: test-note $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest --durations=10 $(PYTEST_ARGS)

test-fast-note:
	@echo "make test-fast: the suite without the tests marked slow, about 1 min on 2 cores"

test-fast: test-fast-note $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -m "not slow" --durations=10 $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) build *.egg-info outputs multirun
