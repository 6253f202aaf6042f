# One entry point. `make test` creates .venv when missing, installs the project with the pinned
# versions (only when pyproject.toml or constraints.txt changed), then runs the fast test suite;
# `make test-slow` runs the long end-to-end tests and `make lint` checks style and formatting (CI runs all three).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow bench demo study lint format clean gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow --durations=15

bench: $(STAMP)
	$(PY) benchmarks/bench_atconv.py

# GPU check (benchmarks/GPU_CHECK.md). The GPU machine has no network and no venv: `make gpu-wheels` (here,
# where pip reaches PyPI) downloads the wheels it lacks, for Python 3.12 manylinux x86_64, at the versions
# constraints.txt pins; `make gpu-check` (there) installs them into GPU_SITE and runs the check with python3.
GPU_WHEELS_DIR := gpu-wheels
GPU_WHEELS     := diffusers omegaconf
GPU_PLATFORMS  := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_SITE       ?= /tmp/sit-atconv-gpu-site
GPU_CHECK_ARGS ?=

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS_DIR)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(foreach p,$(GPU_PLATFORMS),--platform $(p)) -d $(GPU_WHEELS_DIR) \
		$$(for p in $(GPU_WHEELS); do grep -i "^$$p==" constraints.txt; done)
	ls $(GPU_WHEELS_DIR)

gpu-check:
	test ! -d $(GPU_WHEELS_DIR) || $(PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
		--target $(GPU_SITE) $(GPU_WHEELS_DIR)/*.whl
	PYTHONPATH=.:$(GPU_SITE) $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

DEMO_RUN := runs/demo-digits
DEMO_CKPT := $(DEMO_RUN)/checkpoints/latest

# Train a small class-conditional SiT-ATConv on scikit-learn's digits (pixel space, CPU, a few
# minutes), then sample a labelled CFG grid and an .npz with labels, and score it with a classifier.
demo: $(STAMP)
	$(PY) train_sit.py --config configs/demo/digits.yaml run.output_dir=$(DEMO_RUN)
	$(PY) sample.py --ckpt $(DEMO_CKPT) --vae none --cfg 2.0 --num-steps 30 --grid-columns 10 \
		--classes 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 --seed 1 --out $(DEMO_RUN)/grid.png
	$(PY) sample.py --ckpt $(DEMO_CKPT) --vae none --cfg 2.0 --num-steps 30 --num-samples 200 \
		--batch-size 100 --out $(DEMO_RUN)/samples.npz
	$(PY) -m sit_atconv.data.score_digits $(DEMO_RUN)/samples.npz
	@echo "checkpoint: $$(readlink -f $(DEMO_CKPT))"
	@echo "grid:       $(DEMO_RUN)/grid.png"
	@echo "samples:    $(DEMO_RUN)/samples.npz"
	@echo "loss plot:  $(DEMO_RUN)/loss.png"

# The small-scale study of the paper's central claim (README, "A small-scale study"): SiT, SiT-ATConv,
# SiT-Hybrid, the DWConv baseline and ATConv without modulation on the digits, 3 seeds each, about half an
# hour on 2 CPU cores. Re-running resumes; STUDY_ARGS adds options (e.g. --variants sit,atconv --seeds 0).
STUDY_DIR  ?= runs/study
STUDY_ARGS ?=

study: $(STAMP)
	$(PY) -m sit_atconv.study --out $(STUDY_DIR) $(STUDY_ARGS)

LINTED := sit_atconv tests benchmarks sample.py train_sit.py eval_fid.py

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

format: $(STAMP)
	$(PY) -m ruff check --fix $(LINTED)
	$(PY) -m ruff format $(LINTED)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
