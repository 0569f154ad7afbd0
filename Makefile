# Two entry points, each doing all of its own set-up on a fresh machine:
#   make run    install, then run the main job (the digits ERM-vs-DRO study)
#   make test   install, then run ruff and the whole test suite
# Also: make seg3d (the 3D segmentation study, ~15 min), make bench (sampler speed).
# pip and a venv only: uv and poetry would skip the local torch wheel and download gigabytes.

PYTHON ?= python3
VENV ?= .venv
# The CPU build; override (e.g. TORCH=torch) to take another build of torch.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torchdro-installed

.PHONY: install run test bench seg3d clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/torchdro experiment digits --out results/digits

seg3d: $(STAMP)
	$(VENV)/bin/torchdro experiment seg3d --out results/seg3d

bench: $(STAMP)
	$(PY) -m benchmarks.bench_sampler --out results/benchmark.json

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .hypothesis
