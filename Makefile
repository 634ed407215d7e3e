# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# Both create .venv and install the package with its extras. On machines without CUDA, torch is
# pinned to the CPU build (constraints-cpu.txt: torch==2.13.0); with CUDA, pip keeps/gets a CUDA
# build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HRM := $(VENV)/bin/hrm
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PIP_CONSTRAINT := $(if $(HAS_CUDA),,-c constraints-cpu.txt)
DEMO_DIR ?= out/demo

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_CONSTRAINT) -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The main job: the user's flow on a tiny Mixtral on the CPU (profile -> optimize -> run ->
# validate), then the modeling flow for Mixtral-8x7B on the shipped T4 profile. A minute or two.
DEMO_GEN := --prompt-len 32 --gen-len 16 --num-seqs 64
demo: setup
	mkdir -p $(DEMO_DIR)
	export COLUMNS=$${COLUMNS:-120}; set -e; \
	$(HRM) profile --quick --device cpu -o $(DEMO_DIR)/cpu.toml; \
	$(HRM) optimize --model tiny-mixtral --hardware $(DEMO_DIR)/cpu.toml $(DEMO_GEN) \
		--gpu-mem 0.03 -o $(DEMO_DIR)/tiny-policy.json; \
	$(HRM) run --model tiny-mixtral --dummy-weights --policy $(DEMO_DIR)/tiny-policy.json \
		$(DEMO_GEN) --device cpu --gpu-mem 0.03 --hardware $(DEMO_DIR)/cpu.toml \
		--trace $(DEMO_DIR)/tiny-trace.json -o $(DEMO_DIR)/tiny-result.json; \
	$(HRM) validate --model tiny-mixtral --hardware $(DEMO_DIR)/cpu.toml --grid quick \
		--device cpu -o $(DEMO_DIR)/validate; \
	$(HRM) optimize --model mixtral-8x7b --hardware t4 --prompt-len 77 --gen-len 128 \
		-o $(DEMO_DIR)/policy.json

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -m pytest -n 2 tests
	$(PY) -m pytest --nbmake notebooks

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
