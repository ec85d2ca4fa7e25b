# `make demo` and `make test` are all the set-up a fresh clone needs; `make docs` builds the API reference.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := all,test,bench,docs,lint
# The API reference: the package (its public names) and the modules it does not re-export.
DOC_MODULES := saflex_data saflex_data.distributed $(addprefix saflex_data.adapters.,torchvision albumentations kornia timm)

.PHONY: demo test lint docs bench venv clean gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# DEMO_ARGS passes options to the demo, e.g. `make demo DEMO_ARGS="--threads 1"` on a shared, busy machine.
demo: $(VENV)/.installed
	$(PY) examples/demo.py $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

# ruff with the project's settings ([tool.ruff] in pyproject.toml), on the whole repository.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The API reference, generated from the docstrings into docs/api/ (not committed); open docs/api/index.html.
docs: $(VENV)/.installed
	rm -rf docs/api
	$(PY) -m pdoc --docformat google --no-show-source -o docs/api $(DOC_MODULES)

# On a GPU machine, under 10 minutes: needs_cuda tests, kornia, fp16 + GradScaler, nccl DDP (>= 2 GPUs), overhead.
gpu-check: $(VENV)/.installed
	$(PY) benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info docs/api
