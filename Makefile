# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DATA := data/tinyshakespeare
# RECIPE=speedrun (or speedrun-2025-05-24) trains a modded-nanogpt record at its tiny size instead; each recipe has its own log dir (a run
# refuses to resume another recipe's checkpoints).
RECIPE ?= gpt2
DEMO_LOG := model_weights$(if $(filter-out gpt2,$(RECIPE)),-$(RECIPE))

# The container contract (image name, /app, /persistent, /app/log): one file, also read by job/ and infra/.
include job/contract.env

.PHONY: fetch-weights help venv demo demo-data test test-fast lint bench bench-prepare plot dashboard clean-demo check-docker build-image push-image run-local run-local-cpu shell

help:
	@echo "make demo [RECIPE=speedrun]   train the tiny GPT-2 on the bundled Shakespeare (CPU, a few minutes) and print samples"
	@echo "make test    run the test suite (lint included)"
	@echo "make test-fast   the edit loop: the tests without Docker, sshd, training runs or C++ compiles (pytest -m 'not slow')"
	@echo "make bench   time training steps (scripts/bench_train.py; PRESET=gpt2 on a GPU)"
	@echo "make plot [LOGDIR=model_weights]   loss and HellaSwag curves of a run -> LOGDIR/plot.png"
	@echo "make dashboard [LOGDIR=model_weights] [PORT=6006]   TensorBoard over a run's log dir at http://127.0.0.1:PORT/ (Ctrl-C stops it)"
	@echo "make bench-prepare   tokenizing throughput: job.prepare vs tiktoken's batch encoder (scripts/bench_prepare.py)"
	@echo "make build-image [CUDA=cu128] [NAME=...] [BASE_IMAGE=...]   build the trainer image for a CUDA flavour (infra/flavour.py;"
	@echo "                 default cu130) as NAME:<git sha>, NAME:<git sha>-<flavour>, NAME:<flavour> and NAME:latest, and"
	@echo "                 its data image (job.prepare alone) as NAME:<git sha>-<flavour>-data"
	@echo "make push-image REGISTRY=registry.example.com/team [CUDA=cu128]   push NAME:<git sha>-<flavour> and NAME:<flavour>, print the digest"
	@echo "make run-local [CMD='...']   train in the image on this machine's GPUs (./data -> /persistent, ./model_weights -> /app/log)"
	@echo "make run-local-cpu           the same on the CPU (tiny preset on the bundled corpus)"
	@echo "make shell                   a shell in the image with the same mounts"
	@echo "make fetch-weights HOST=ubuntu@IP [TO=dir] [FLAGS=...]   checkpoints from the box (fab fetch-weights)"
	@echo "the cloud path (fab --list): fab launch --host ubuntu@IP | logs | status | stop; fab provision | types | instances | terminate"

$(STAMP): requirements.txt requirements-data.txt requirements-dev.txt requirements-launcher.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

venv: $(STAMP)

# The bundled corpus, one document per paragraph (each after <|endoftext|>): the speedrun recipe reads whole documents.
# Shards of an older demo, cut as one document, are made again.
demo-data: venv
	@if grep -qs '"paragraphs": true' $(DEMO_DATA)/manifest.json && ls $(DEMO_DATA)/*val*.npy >/dev/null 2>&1; then \
		echo "using shards in $(DEMO_DATA)"; \
	else $(PY) -m job.prepare text job/assets/tinyshakespeare.txt --paragraphs --out $(DEMO_DATA) --shard-size 50000 \
		$$(test -e $(DEMO_DATA) && echo --overwrite); fi

demo: demo-data
	$(PY) -m job.train --recipe $(RECIPE) --preset tiny --data-dir $(DEMO_DATA) --log-dir $(DEMO_LOG) $(ARGS)
	$(PY) -m job.sample --checkpoint $(DEMO_LOG) --num 3 --max-tokens 48 --prompt "ROMEO:"

lint: venv
	$(VENV)/bin/ruff check job infra scripts tests train.py fabfile.py
	$(VENV)/bin/hadolint docker/Dockerfile

# Three pytest workers on a 2-core machine: much of the suite waits (on containers, sshd, torchrun's rendezvous, a
# registry push), and a third worker runs CPU work in that time; each worker's torch gets one thread
# (tests/conftest.py), and what shares the Docker engine stays on one worker. TEST_WORKERS=0 runs the suite in this
# process, one test at a time.
TEST_WORKERS ?= 3
# glibc's malloc hands a large tensor's memory back to the kernel when it is freed (munmap, or a trim of the heap's
# top), and the next step's tensor of the same size faults it in again page by page, zeroed: in the tests' small CPU
# runs that churn is a large share of their system time. The test processes, and all they start, keep it in the heap.
# Python's bytecode caches stay on (__pycache__, git-ignored and never in a build context) even where the caller's
# environment sets PYTHONDONTWRITEBYTECODE: the suite starts hundreds of trainer, script and fab processes, and each
# would compile job/, infra/ and scripts/ from source again (docs/BENCHMARKS.md, "Test suite").
# A test that runs torch on two OpenMP threads beside the other workers (its stored figures came from a two-thread
# run) lets an idle thread sleep instead of spinning on a core another worker needs.
TEST_ENV = MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONDONTWRITEBYTECODE= OMP_WAIT_POLICY=PASSIVE

test: venv lint
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 tests $(PYTEST_ARGS)

# tests/conftest.py marks what needs Docker, an sshd, a training run or a C++ compile as slow: the rest is the quick edit loop.
test-fast: venv
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow" tests $(PYTEST_ARGS)

PRESET ?= tiny
bench: venv
	$(PY) scripts/bench_train.py --preset $(PRESET) $(ARGS)

bench-prepare: venv
	$(PY) scripts/bench_prepare.py $(ARGS)

LOGDIR ?= $(DEMO_LOG)
plot: venv
	$(PY) -m job.plot $(LOGDIR) $(ARGS)

# job.dashboards checks LOGDIR and PORT (a number, free on 127.0.0.1) before it becomes TensorBoard.
PORT ?= $(TENSORBOARD_PORT)
dashboard: venv
	@$(PY) -m job.dashboards '$(LOGDIR)' '$(PORT)'

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_LOG)

# ---- the trainer image ------------------------------------------------------------------------------
NAME ?= $(IMAGE_NAME)
GIT_SHA := $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
DOCKER ?= docker
# The CUDA flavour of the pinned torch (cu130, cu128, cu126, or the CUDA version 12.8): base image and wheel index
# come from infra/flavour.py's table. A BASE_IMAGE given here wins over the flavour's (docker keeps the last).
CUDA ?=
FLAVOUR = $(shell $(PYTHON) -m infra.flavour --name $(CUDA) 2>/dev/null)
BUILD_ARGS = --build-arg WORKDIR=$(WORKDIR) --build-arg LOG_DIR=$(LOG_DIR) --build-arg PERSISTENT=$(PERSISTENT) \
	--build-arg GIT_COMMIT=$(shell git rev-parse HEAD 2>/dev/null) \
	$$($(PYTHON) -m infra.flavour $(CUDA)) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE))
# Mounts of the old workflow: persistent storage -> /persistent, weights -> /app/log. Run as the calling
# user so checkpoints on the host are the user's.
HOST_DATA ?= $(CURDIR)/data
HOST_WEIGHTS ?= $(CURDIR)/model_weights
RUN_FLAGS = --rm --ipc=host --user $$(id -u):$$(id -g) -v $(HOST_DATA):$(PERSISTENT) -v $(HOST_WEIGHTS):$(LOG_DIR)
# Unlimited locked memory (pinned host buffers, NCCL) and a 64 MiB stack, as NVIDIA recommends for PyTorch on GPUs.
GPU_FLAGS = --gpus all --ulimit memlock=-1 --ulimit stack=67108864
CMD ?=

check-docker:
	@command -v $(DOCKER) >/dev/null 2>&1 || { echo "error: docker is not installed: install Docker Engine (https://docs.docker.com/engine/install/) and retry" >&2; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "error: cannot talk to the Docker daemon: start it (sudo systemctl start docker) or add your user to the docker group" >&2; exit 1; }

build-image: check-docker
	@$(PYTHON) -m infra.flavour $(CUDA) >/dev/null
	$(DOCKER) build -f docker/Dockerfile $(BUILD_ARGS) -t $(NAME):$(GIT_SHA) -t $(NAME):$(GIT_SHA)-$(FLAVOUR) -t $(NAME):$(FLAVOUR) \
		-t $(NAME):latest .
	$(DOCKER) build -f docker/Dockerfile $(BUILD_ARGS) --target data -t $(NAME):$(GIT_SHA)-$(FLAVOUR)-data .

# Pushes the flavour's image (NAME:<git sha>-<flavour>, as build-image tagged it) as REGISTRY/NAME:<git sha>-<flavour>
# and REGISTRY/NAME:<flavour>, and its data image (the Dockerfile's data stage) under the same tags with -data, and
# prints the digest that `fab launch --image REGISTRY/NAME@sha256:...` pins. Docker's own login (`docker login HOST`)
# holds any credentials: none goes on a command line here.
push-image: check-docker
	@$(PYTHON) -m infra.registry push --docker '$(DOCKER)' --registry '$(REGISTRY)' --name '$(NAME)' --tag '$(GIT_SHA)' \
		--flavour '$(or $(CUDA),$(FLAVOUR))'

run-local: check-docker
	@$(DOCKER) info --format '{{json .Runtimes}}' | grep -q nvidia || { echo "error: this Docker has no NVIDIA runtime (install nvidia-container-toolkit for GPUs); to train on the CPU instead run: make run-local-cpu" >&2; exit 1; }
	@mkdir -p $(HOST_DATA) $(HOST_WEIGHTS)
	$(DOCKER) run $(GPU_FLAGS) $(RUN_FLAGS) $(NAME):latest $(CMD)

run-local-cpu: check-docker
	@mkdir -p $(HOST_DATA) $(HOST_WEIGHTS)
	@$(MAKE) --no-print-directory demo-data DEMO_DATA=$(HOST_DATA)/tinyshakespeare
	$(DOCKER) run $(RUN_FLAGS) $(NAME):latest $(or $(CMD),python -m job.supervisor --preset tiny --data-dir $(PERSISTENT)/tinyshakespeare)

shell: check-docker
	@mkdir -p $(HOST_DATA) $(HOST_WEIGHTS)
	$(DOCKER) run -it $(RUN_FLAGS) $(NAME):latest bash

# ---- the launcher (runs on the laptop) ---------------------------------------------------------------
fetch-weights: venv
	@test -n "$(HOST)" || { echo "error: HOST is not set: make fetch-weights HOST=ubuntu@IP [TO=dir] [FLAGS=--latest-only]" >&2; exit 1; }
	$(VENV)/bin/fab fetch-weights --host $(HOST) $(if $(TO),--to $(TO)) $(FLAGS)
