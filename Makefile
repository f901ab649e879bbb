# embplex — the two commands a new user needs:
#   make quickstart   set up, then fine-tune and evaluate all-MiniLM-L6-v2 on SciFact
#   make test         set up, then run the test suite
#   make docs         set up, then serve the documentation site on http://127.0.0.1:8000
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart test docs bench bench-smoke clean

setup: $(VENV)/.installed

# torch 2.13.0 first: a CPU build of it lies on this machine's disk, while a bare
# "torch" requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

quickstart: setup
	$(BIN)/embplex quickstart

test: setup
	$(BIN)/python -m pytest

# the site of docs/ (mkdocs.yml), rebuilt on every change; `mkdocs build --strict` is what CI runs
docs: setup
	$(BIN)/python -m mkdocs serve

# the full benchmarks (about 25 minutes on 2 cores); results in benchmarks/results/
bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/run.py encode --json
	$(BIN)/python benchmarks/run.py train --json
	$(BIN)/python benchmarks/run.py length --json
	$(BIN)/python benchmarks/report.py
	$(BIN)/python benchmarks/report.py --plot

bench-smoke: setup
	$(BIN)/python benchmarks/run.py encode --smoke
	$(BIN)/python benchmarks/run.py train --smoke
	$(BIN)/python benchmarks/run.py length --smoke

clean:
	rm -rf $(VENV) runs build dist *.egg-info
