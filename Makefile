# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DATA := data/tinyshakespeare
DEMO_LOG := model_weights

.PHONY: help venv demo test lint bench clean-demo

help:
	@echo "make demo    train the tiny GPT-2 on the bundled Shakespeare (CPU, a few minutes) and print samples"
	@echo "make test    run the test suite (lint included)"
	@echo "make bench   time training steps (scripts/bench_train.py; PRESET=gpt2 on a GPU)"

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

venv: $(STAMP)

demo: venv
	@if ls $(DEMO_DATA)/*val*.npy >/dev/null 2>&1; then echo "using shards in $(DEMO_DATA)"; \
	else $(PY) -m job.prepare text job/assets/tinyshakespeare.txt --out $(DEMO_DATA) --shard-size 50000; fi
	$(PY) -m job.train --preset tiny --data-dir $(DEMO_DATA) --log-dir $(DEMO_LOG) $(ARGS)
	$(PY) -m job.sample --checkpoint $(DEMO_LOG) --num 3 --max-tokens 48 --prompt "ROMEO:"

lint: venv
	$(VENV)/bin/ruff check job infra scripts tests

test: venv lint
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

PRESET ?= tiny
bench: venv
	$(PY) scripts/bench_train.py --preset $(PRESET) $(ARGS)

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_LOG)
