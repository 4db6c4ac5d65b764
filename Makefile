# specbatch — two commands:
#   make demo   set up a core install (no torch) and run the default policy study + dashboard
#   make test   set up the test environment (core + profiler + test extras) and run the whole suite
PYTHON ?= python3
# torch is installed on its own, first, so pip never picks a build by itself. Override for your machine,
# e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_VENV ?= .venv
TEST_VENV ?= .venv-test
PYTEST_ARGS ?=

.PHONY: demo test clean

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install -q .
	touch $@

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/python -m pip install -q --no-deps --force-reinstall .
	$(DEMO_VENV)/bin/specbatch-demo

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(TEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(TEST_VENV)/bin/python -m pip install -q -e ".[profile,test]"
	touch $@

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV) build *.egg-info outputs multirun

# docs: rewrite the result tables in README.md and docs/*.md from docs/results/ (DOCS_ARGS=--results reruns the studies first)
.PHONY: docs
docs:
	$(if $(wildcard $(TEST_VENV)/bin/python),$(TEST_VENV)/bin/python,$(PYTHON)) docs/generate.py $(DOCS_ARGS)
