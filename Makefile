# Two entry points, each doing all of its own set-up on a fresh machine:
#   make run    install, then run the main job (the pre-registered digits study)
#   make test   install, then run ruff, mypy and the whole test suite (nnU-Net included)
# Also: make seg3d (the pre-registered 3D segmentation study, ~15 min), make bench (sampler speed).
# pip and venvs only: uv and poetry would skip the local torch wheels and download gigabytes.
# Two venvs: the studies run on the CPU build of torch 2.13; the tests also cover nnU-Net v2,
# whose torchvision needs torch 2.14.1 (a CUDA build, which runs on the CPU as well).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TEST_VENV ?= .venv-test
TEST_TORCH ?= torch==2.14.1 torchvision==0.29.1
BENCH_VENV ?= .venv-bench

PY := $(VENV)/bin/python
TEST_PY := $(TEST_VENV)/bin/python
STAMP := $(VENV)/.torchdro-installed
TEST_STAMP := $(TEST_VENV)/.torchdro-installed
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.torchdro-installed

.PHONY: install run test bench seg3d clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[experiments,seg3d]"
	touch $(STAMP)

$(TEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_PY) -m pip install --quiet --upgrade pip
	$(TEST_PY) -m pip install --quiet $(TEST_TORCH)
	$(TEST_PY) -m pip install --quiet -e ".[test,nnunet]"
	touch $(TEST_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/torchdro experiment digits --out results/digits

seg3d: $(STAMP)
	$(VENV)/bin/torchdro experiment seg3d --out results/seg3d

# torchrl's C++ extension loads only against the torch it was built for (2.14), so the
# side-by-side benchmark runs in its own venv; the .gitignore inside keeps it out of git.
$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	echo '*' > $(BENCH_VENV)/.gitignore
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet torch==2.14.1
	$(BENCH_PY) -m pip install --quiet -e ".[bench]" torchrl==0.14.1 tensordict==0.14.3
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_PY) -m benchmarks.bench_sampler --out results/benchmark.json
	$(BENCH_PY) -m benchmarks.bench_laws --out results/benchmark_laws.json

test: $(TEST_STAMP)
	$(TEST_PY) -m ruff check src tests benchmarks examples
	$(TEST_PY) -m ruff format --check src tests benchmarks examples
	$(TEST_PY) -m mypy
	$(TEST_PY) -m pytest -q

clean:
	rm -rf $(VENV) $(TEST_VENV) $(BENCH_VENV) results .pytest_cache .ruff_cache .hypothesis
