# hpcdl: `make demo` runs the main job, `make test` runs the tests; both install what they need.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The cached venv may be shared by several clones: this tree's hpcdl comes first on the path.
export PYTHONPATH := $(CURDIR)
PYTEST_ARGS ?=

.PHONY: setup demo test lint
setup:
	bash .ci/install.sh

demo: setup
	hpcdl doctor
	hpcdl prepare fashion_mnist --out results/data/fashion_mnist.h5 --force

test: setup
	ruff check hpcdl tests
	python -m pytest $(PYTEST_ARGS)

lint:
	ruff check hpcdl tests
	ruff format --check hpcdl tests
