# `make demo` and `make test` are all the set-up a fresh clone needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := all,test,bench

.PHONY: demo test bench venv clean gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

# On a GPU machine, under 10 minutes: needs_cuda tests, kornia, fp16 + GradScaler, nccl DDP (>= 2 GPUs), overhead.
gpu-check: $(VENV)/.installed
	$(PY) benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
