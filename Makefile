# hpcdl: `make demo` runs the main job, `make test` runs the tests; both install what they need.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The cached venv may be shared by several clones: this tree's hpcdl comes first on the path.
export PYTHONPATH := $(CURDIR)
PYTEST_ARGS ?=
# pytest-xdist processes, each taking whole test files (--dist loadfile keeps a file's fixtures
# and order): the Slurm tests spend about half their time waiting on the scheduler, and the
# other process runs the rest of the suite in those cycles. TEST_PROCESSES=0: one process.
TEST_PROCESSES ?= 2

.PHONY: setup setup-gpu prereqs-demo prereqs-test image demo test lint bench bench-quick \
	peer-venvs
# The runtime (install.sh): the gpu variant when nvidia-smi lists a GPU, cpu otherwise, as .venv.
setup:
	./install.sh --link $(VENV)

# The gpu variant anywhere (no GPU needed to build it), as .venv-gpu.
setup-gpu:
	./install.sh --variant gpu --link .venv-gpu

# Not the runtime: the demo's data and the tests' tools (Debian packages, see the script).
prereqs-demo:
	bash .ci/test-prereqs.sh demo
prereqs-test:
	bash .ci/test-prereqs.sh test

# The Apptainer image from containers/hpcdl.def (its %post is install.sh --variant gpu).
image:
	@command -v apptainer >/dev/null || { echo "make image: no apptainer on PATH. Build where" \
	  "it is (module load apptainer; apptainer build [--fakeroot] hpcdl.sif containers/hpcdl.def)" \
	  "or remotely (apptainer build --remote ...), then copy hpcdl.sif to the cluster." \
	  "tests/test_container.py runs the definition in a Debian 12 root here instead." >&2; exit 1; }
	apptainer build hpcdl.sif containers/hpcdl.def

DEMO_CONFIG ?= configs/demo.yaml

# A real local sweep on Fashion-MNIST: prepare, 2 workers sharing one Optuna study, the
# final retrain, aggregate and the report. Snakemake's output goes through `hpcdl status
# --follow`, which prints it unchanged above one live line on the sweep (reading the study
# every 5 s) and ends with it; pipefail keeps Snakemake's exit code as the target's.
demo: setup prereqs-demo
	hpcdl doctor
	set -o pipefail; snakemake --profile profiles/local --configfile $(DEMO_CONFIG) 2>&1 \
	  | hpcdl status --follow --config $(DEMO_CONFIG)
	@echo "report: $$(python -c 'from hpcdl import config; print(config.load("$(DEMO_CONFIG)").sweep_dir)')/report.html"

test: setup prereqs-test
	ruff check hpcdl tests benchmarks
	snakemake --lint --configfile configs/smoke.yaml
	python -m pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

# the code is formatted by hand to ruff's line length (100); `ruff format` is not applied.
# snakemake --lint exits 1 on any finding, so CI (make test) fails on one.
lint:
	ruff check hpcdl tests benchmarks
	snakemake --lint --configfile configs/smoke.yaml

# Benchmarks append to benchmarks/RESULTS.md. bench-quick: each script's small mode.
BENCH_ARGS ?=
bench: setup
	cd benchmarks && python bench_overhead.py $(BENCH_ARGS) && python bench_scaling.py $(BENCH_ARGS) \
	  && python bench_storage.py $(BENCH_ARGS) && python bench_sweep.py $(BENCH_ARGS) \
	  && python bench_accuracy.py $(BENCH_ARGS) && python bench_memory.py $(BENCH_ARGS) \
	  && python bench_pipeline.py $(BENCH_ARGS) && python bench_stream.py $(BENCH_ARGS) \
	  && python bench_peers.py $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

# Benchmark 9's peers (Ray Tune, KerasTuner) in venvs of their own, from pinned requirement
# files; never the runtime venv or the image. bench_peers.py calls this when one is missing.
PEER_PYTHON ?= python3
peer-venvs: benchmarks/.venv-ray/.installed benchmarks/.venv-kt/.installed

benchmarks/.venv-%/.installed: benchmarks/peers/requirements-%.txt
	rm -rf benchmarks/.venv-$*
	$(PEER_PYTHON) -m venv benchmarks/.venv-$*
	benchmarks/.venv-$*/bin/pip install --quiet -r $<
	touch $@
