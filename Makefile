# Quick start:  make demo   (whole pipeline on built-in data)
#               make test   (the test suite)
# Each target sets up .venv itself on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# PyTorch builds that install from this project's machines (see README).
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: test demo venv clean benchmarks study-tiny

venv: $(VENV)/.installed

# The project and what it runs on; the demo needs nothing more. --no-compile:
# Python compiles the modules it imports on first use, not all of torch's
# files at install time (40 s of a fresh set-up on 2 cores).
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile $(TORCH_PINS)
	$(PY) -m pip install --quiet --no-compile -e .
	touch $@

# The test extras (pytest, onnx and onnxruntime for the export tests, ...).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/decouple demo --out demo_out

# The study's design (configs/study_grid.yaml) in about a minute on 2 cores: two tiny
# backbones x two losses x {balanced, imbalance 100} on the CIFAR-10 JPEGs of ../shared/data,
# then its tables. One torch thread: faster on cores other work shares.
study-tiny: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/decouple sweep configs/study_tiny.yaml
	$(VENV)/bin/decouple export --db results/study_tiny.db --layout study

benchmarks: $(VENV)/.installed-test
	$(PY) benchmarks/stage_two.py
	$(PY) benchmarks/sweep.py
	$(PY) benchmarks/stage_one.py
	$(PY) benchmarks/predict.py
	$(PY) benchmarks/round_trip.py

clean:
	rm -rf demo_out .pytest_cache
