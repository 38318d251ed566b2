# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; pinned so that pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-min eval bench proto clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tribune demo --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

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

BENCHES := rm_training serving ppo_step gateway_load

bench: $(STAMP)
	for b in $(BENCHES); do $(PY) bench/$$b.py --output bench/results || exit 1; done

proto: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) $(MIN_VENV) runs .pytest_cache
