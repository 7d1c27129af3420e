PYTHON ?= python3
BACKEND ?= tensorflow
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q -p no:cacheprovider --timeout=900

.PHONY: venv demo test clean

venv: $(STAMP)

# Re-installs only when requirements-dev.txt or pyproject.toml is newer than
# the stamp; an existing .venv is reused.
$(STAMP): requirements-dev.txt requirements-nlp.txt pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -r requirements-dev.txt
	$(VPY) -m pip install --no-deps -r requirements-nlp.txt
	$(VPY) -m pip install -e .
	touch $(STAMP)

demo: venv
	KERAS_BACKEND=$(BACKEND) $(VPY) examples/digits_demo.py

# Runs the suite on both backends; fails if either run fails.
test: venv
	@status=0; \
	echo "== KERAS_BACKEND=tensorflow =="; \
	KERAS_BACKEND=tensorflow $(VPY) -m pytest $(PYTEST_ARGS) tests || status=1; \
	echo "== KERAS_BACKEND=jax =="; \
	KERAS_BACKEND=jax $(VPY) -m pytest $(PYTEST_ARGS) tests || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
