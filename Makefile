# The front door. `make demo` and `make test` install into .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0: the CPU wheel where the machine has it on disk; override with `make install TORCH=torch`
TORCH ?= torch==2.13.0

.PHONY: install demo test test-all lint bench bench-paper gpu-wheels gpu-check clean

$(BIN)/compress: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q "$(TORCH)" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import compress, torch, onnxruntime, mnist1d" && touch $@

install: $(BIN)/compress

demo: install
	$(BIN)/compress demo

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/ruff check compress tests benchmarks

bench: install
	$(BIN)/python benchmarks/train_mnist1d_teacher.py --check
	$(BIN)/python benchmarks/bench_exports.py
	$(BIN)/python benchmarks/targets_scale.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/read_ahead.py
	$(BIN)/python benchmarks/augment.py
	-$(BIN)/python benchmarks/cpu_quota.py  # needs root and a writable cgroup filesystem

# Ba & Caruana's Table 1 on MNIST-1D (about 10 minutes on 2 CPU cores)
bench-paper: install
	$(BIN)/python benchmarks/paper_mnist1d.py

# On a GPU machine, first thing (about 8 minutes on an H100): GPU tests, bf16 throughput, CUDA provider.
# Uses .venv when there is one, else python3 as it is (a GPU machine without network has torch already).
# Wheels a GPU machine without network lacks (its image has the rest): carried in .whl/
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps -d .whl mnist1d

gpu-check:
	@if [ -x $(BIN)/python ]; then $(BIN)/python benchmarks/gpu_check.py; else python3 benchmarks/gpu_check.py; fi

clean:
	rm -rf $(VENV) compress-demo compress-out .pytest_cache
