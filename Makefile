# One entry point. `make test` creates .venv when missing, installs the project with the pinned
# versions (only when pyproject.toml or constraints.txt changed), then runs the fast test suite;
# `make test-slow` runs the long end-to-end tests and `make lint` checks style and formatting (CI runs all three).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow bench demo lint format clean

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

LINTED := sit_atconv tests benchmarks sample.py train_sit.py eval_fid.py

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

format: $(STAMP)
	$(PY) -m ruff check --fix $(LINTED)
	$(PY) -m ruff format $(LINTED)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
