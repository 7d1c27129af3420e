PYTHON ?= python3
BACKEND ?= tensorflow
BACKENDS ?= tensorflow jax
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

# Runs the suite on both backends at once (most of a test's time is
# single-threaded tracing, so two runs share two cores well); prints each
# backend's log and fails if either run fails.
test: venv
	@mkdir -p .test-logs; \
	for b in $(BACKENDS); do \
		KERAS_BACKEND=$$b $(VPY) -m pytest $(PYTEST_ARGS) tests \
			> .test-logs/$$b.log 2>&1 & \
		echo $$! > .test-logs/$$b.pid; \
	done; \
	status=0; \
	for b in $(BACKENDS); do \
		wait $$(cat .test-logs/$$b.pid) || status=1; \
		echo "== KERAS_BACKEND=$$b =="; \
		cat .test-logs/$$b.log; \
	done; \
	exit $$status

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .test-logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
