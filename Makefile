# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; pinned so that pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-min eval bench proto node-client lock clean

# the Node.js parts of the tests, pinned by clients/node/package-lock.json, into
# clients/node/node_modules (git-ignored): the cross-language RewardService client
# (tests/test_gateway.py) and headless Chromium (@sparticuz/chromium, a self-contained build from
# the npm registry, driven by puppeteer-core) for the labelling page (tests/test_collect_label.py);
# skipped where node is not installed
NODE := $(shell command -v node 2>/dev/null)
NODE_CLIENT := clients/node/node_modules/.package-lock.json

$(NODE_CLIENT): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

node-client: $(NODE_CLIENT)

# .[dev] holds the [train] and [serve] extras (and so [gateway]); constraints.txt pins every
# version, the same file the images install from
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tribune demo --output runs/demo

# one pytest-xdist worker per core, each test module on one worker (its module fixtures built once);
# TEST_WORKERS=0 runs the suite in this process
TEST_WORKERS ?= auto

test: $(STAMP) $(if $(NODE),$(NODE_CLIENT))
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# The tests at the lowest versions pyproject allows of the libraries whose APIs move most;
# a separate virtual environment, so the main one stays as it is. CI runs it next to `make test`.
MIN_VENV ?= .venv-min
MIN_SPECS := "transformers==4.56.0" "accelerate==1.10.0" "protobuf==6.33.5"
MIN_TESTS ?= tests/test_console.py tests/test_tracking.py tests/test_rl_math.py tests/test_ppo_step.py tests/test_cli.py

test-min:
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(MIN_VENV)/bin/python -m pip install -q ".[dev]" "$(TORCH_SPEC)" $(MIN_SPECS)
	$(MIN_VENV)/bin/python -m pip check
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

# the whole pipeline, default settings, on every task of the suite (runs/evaluate/evaluation.json + .png)
eval: $(STAMP)
	$(VENV)/bin/tribune evaluate --output runs/evaluate

BENCHES := rm_training serving mixed_lengths ppo_step gateway_load

bench: $(STAMP)
	for b in $(BENCHES); do $(PY) bench/$$b.py --output bench/results || exit 1; done

# regenerates the Python code; then the lint and breaking-change check against protos/api_snapshot.json
# (after a deliberate compatible change: python protos/api_check.py --accept)
proto: $(STAMP)
	$(PY) protos/generate.py
	$(PY) protos/api_check.py

# rewrites constraints.txt from the versions in .venv (after a dependency change and a green `make test`)
lock: $(STAMP)
	$(PY) docker/lock.py

clean:
	rm -rf $(VENV) $(MIN_VENV) runs .pytest_cache
