PYTHON ?= python3
BACKEND ?= tensorflow
BACKENDS ?= tensorflow jax torch
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q -p no:cacheprovider --timeout=900 --durations=15

# The lowest Keras that pyproject.toml allows ("keras>=X"), installed alone
# into a folder put first on PYTHONPATH, so the rest of the venv is reused.
KERAS_LOWEST := $(shell sed -n 's/^ *"keras>=\([0-9.]*\)".*/\1/p' pyproject.toml)
KERAS_LOWEST_DIR := $(VENV)/keras-lowest
KERAS_LOWEST_STAMP := $(KERAS_LOWEST_DIR)/.installed-$(KERAS_LOWEST)
# `make compat-test`: these Keras versions ("lowest", "pinned") ...
COMPAT_KERAS ?= lowest pinned
# ... on a smoke subset that reaches every Keras internal keras_dp uses
# (keras_dp/keras_compat.py) through real training.
COMPAT_TESTS := tests/test_keras_compat.py tests/test_backend_protocol.py \
	tests/test_optimizers.py tests/test_private_model.py
COMPAT_SELECT := not test_private_model or make_private_returns \
	or multi_output_logs or regularizer or dropout_masks_differ \
	or train_on_batch_divides

.PHONY: venv demo test compat-test lint lint-imports docs wheel-test clean

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

# The stamp's name holds the version: raising the floor installs anew.
$(KERAS_LOWEST_STAMP): | venv
	rm -rf $(KERAS_LOWEST_DIR)
	$(VPY) -m pip install --no-deps --target $(KERAS_LOWEST_DIR) "keras==$(KERAS_LOWEST)"
	touch $@

demo: venv
	KERAS_BACKEND=$(BACKEND) $(VPY) examples/digits_demo.py

# No import cycles: the layers contract of pyproject.toml
# ([tool.importlinter]).
# Lint and format check ([tool.ruff] in pyproject.toml); `ruff format .`
# fixes the format.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lint-imports: venv
	$(VENV)/bin/lint-imports

# Builds the wheel and sdist (python -m build), runs twine check, installs
# the wheel into a fresh venv and trains one private step on each backend
# from it, the native kernels built from the installed package's sources
# (tools/wheel_smoke.py).
wheel-test: venv
	$(VPY) tools/wheel_smoke.py

# The documentation site (mkdocs.yml: docs/ and the API reference from the
# docstrings, by mkdocstrings) into site/. --strict: every warning (a
# broken link, a docstring naming a parameter that does not exist) fails.
docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir site

# The smoke subset against each Keras of COMPAT_KERAS, all backends at
# once; each run checks that it imported the Keras it meant to
# (KERAS_DP_EXPECT_KERAS, tests/test_keras_compat.py).
compat-test: venv $(KERAS_LOWEST_STAMP)
	@mkdir -p .test-logs; \
	status=0; \
	for k in $(COMPAT_KERAS); do \
		for b in $(BACKENDS); do \
			if [ $$k = lowest ]; then \
				path=$(abspath $(KERAS_LOWEST_DIR)); expect=$(KERAS_LOWEST); \
			else \
				path=; expect=pinned; \
			fi; \
			PYTHONPATH=$$path$${PYTHONPATH:+:$$PYTHONPATH} \
			KERAS_DP_EXPECT_KERAS=$$expect KERAS_BACKEND=$$b \
			$(VPY) -m pytest $(PYTEST_ARGS) -k "$(COMPAT_SELECT)" \
				$(COMPAT_TESTS) > .test-logs/compat-$$k-$$b.log 2>&1 & \
			echo $$! > .test-logs/compat-$$k-$$b.pid; \
		done; \
		for b in $(BACKENDS); do \
			wait $$(cat .test-logs/compat-$$k-$$b.pid) || status=1; \
			echo "== compat-test: Keras $$k, KERAS_BACKEND=$$b =="; \
			tail -n 25 .test-logs/compat-$$k-$$b.log; \
		done; \
	done; \
	exit $$status

# Runs the lint, the import contract, the docs build (`make docs`), the
# wheel smoke test (`make wheel-test`), the compat smoke subset against
# the lowest Keras (the suite itself runs on the pinned one), then the
# suite on both backends at once (most of a test's time is single-threaded
# tracing, so two runs share two cores well); prints each backend's log
# and fails if any step fails.
test: venv
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory lint-imports
	@$(MAKE) --no-print-directory docs
	@$(MAKE) --no-print-directory wheel-test
	@$(MAKE) --no-print-directory compat-test COMPAT_KERAS=lowest
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
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .test-logs \
		.grimp_cache .import_linter_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
