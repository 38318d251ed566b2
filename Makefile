# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; pinned so that pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test eval bench proto clean

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

# the whole pipeline, default settings, on every task of the suite (runs/evaluate/evaluation.json + .png)
eval: $(STAMP)
	$(VENV)/bin/tribune evaluate --output runs/evaluate

BENCHES := rm_training serving ppo_step gateway_load

bench: $(STAMP)
	for b in $(BENCHES); do $(PY) bench/$$b.py --output bench/results || exit 1; done

proto: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
