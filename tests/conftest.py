"""Shared fixtures: real shards built from the bundled corpus, and helpers to run the real trainer."""

from __future__ import annotations

import contextlib
import getpass
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

# Under pytest-xdist the workers share the machine's cores. torch's default of one thread per core in every worker
# oversubscribes them, and OpenMP's idle threads then spin for their turn: the same tests took twice the CPU time.
# Each worker (and every process it starts, which inherits the variable) gets its share instead.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)))

# What the tests compile on the CPU stands in for the GPU's compile: they prove what torch.compile does to the trainer's
# graphs (breaks, recompiles, caches, numerics), not Inductor's vectorised C++ for this CPU, which the trainer runs
# only when told to compile on a CPU (--compile on; by default it compiles on CUDA only). Scalar C++ builds in less
# time, and the suite compiles a few hundred kernels (docs/BENCHMARKS.md). Every process the tests start inherits it; the tests of
# FlexAttention on the CPU, whose kernels exist only vectorised, turn it back on (vectorised_inductor).
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

import torch  # noqa: E402  (after the thread count above, which torch reads when it is imported)

# Past Dynamo's recompile limit a compiled function runs eagerly without a word. A function that several tests in one
# worker call at shapes of their own can reach it, and a test of the compiled path would then test the eager one. In
# the test processes reaching the limit is an error instead (the trainers they start keep torch's default).
torch._dynamo.config.fail_on_recompile_limit_hit = True

from forkserver import ForkServer, kill_tree, run_process  # noqa: E402
from job.data import write_shard  # noqa: E402
from job.tokenizer import EOT, encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "job" / "assets" / "tinyshakespeare.txt"
BASE = "nanogpt-test-base:bookworm"  # a local Debian image standing in for the CUDA base (scripts/make_test_base_image.sh)

# A model small enough that a training step takes tens of milliseconds on one CPU core.
SMALL = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--seq-len", "32",
         "--micro-batch", "4", "--total-batch-tokens", "256", "--warmup-steps", "5", "--eval-every", "5", "--val-steps", "2",
         "--sample-num", "0", "--hellaswag-every", "0", "--device", "cpu"]
# The 2025-05-24 speedrun port's tiny preset narrowed the same way: its 12 layers 64 wide, one sequence of one attention
# block (128 tokens) per micro-batch, two per step.
SPEEDRUN_SMALL = ["--recipe", "speedrun-2025-05-24", "--preset", "tiny", "--n-head", "1", "--n-embd", "64", "--block-size", "256",
                  "--seq-len", "128", "--total-batch-tokens", "256", "--val-seq-len", "256", "--val-tokens", "512",
                  "--eval-every", "5", "--sample-num", "0", "--hellaswag-every", "0", "--device", "cpu"]
# The current record's tiny preset narrowed to 32 wide: every stage's batch divided by 1024 (eight sequences of 16, 32
# and 48 tokens a step: the output layer's vocabulary-wide work is most of a CPU's step, in proportion to the tokens),
# its stages starting at steps 3, 6 and 9 of twelve.
RECORD_SMALL = ["--recipe", "speedrun", "--preset", "tiny", "--n-embd", "32", "--block-size", "256", "--batch-divisor", "1024",
                "--scheduled-steps", "9", "--extension-steps", "3", "--seq-len", "48", "--total-batch-tokens", "384",
                "--val-seq-len", "128", "--val-tokens", "256", "--eval-every", "5", "--sample-num", "0", "--hellaswag-every", "0",
                "--device", "cpu"]
# The recipes that read whole documents (sequences that start at <|endoftext|>) train on doc_shards.
DOCUMENT_RECIPES = {"speedrun"}


# ---- the `slow` marker, applied by what a test needs ------------------------------------------------------
# `make test-fast` (pytest -m "not slow") is the edit loop: no Docker, sshd, training run or C++ compile. A test is slow when
# it (or a fixture it uses, however indirectly) needs the Docker engine, starts an sshd, or trains: runs the trainer
# to a step count (`--max-steps` on its command line) or in process against the benchmark's plain step. The test's
# own code, its fixtures' and the helpers of its module that they call are looked at. @pytest.mark.slow still works:
# a test that compiles C++ kernels with Inductor (seconds of g++ on a cold cache) carries it by hand.
SLOW_FIXTURES = {"docker", "registry"}
SLOW_NAMES = {"start_sshd", "sshd_fixture", "PlainStep"}
SLOW_CONSTANTS = {"--max-steps"}


def _refs(func, seen: set) -> tuple[set, set]:
    """Global/attribute names and constants in func's code, its nested code and its module's helpers it calls."""
    names, consts, codes = set(), set(), [func.__code__]
    while codes:
        code = codes.pop()
        names |= set(code.co_names)
        for c in code.co_consts:
            (codes.append(c) if hasattr(c, "co_names") else consts.add(c) if isinstance(c, str) else None)
    for name in list(names):
        helper = func.__globals__.get(name)
        if callable(helper) and getattr(helper, "__module__", None) == func.__module__ and hasattr(helper, "__code__") \
                and helper not in seen:
            seen.add(helper)
            more_names, more_consts = _refs(helper, seen)
            names |= more_names
            consts |= more_consts
    return names, consts


def _uses(item, fixtures: set, names: set, consts: set = frozenset()) -> bool:
    if fixtures & set(item.fixturenames):
        return True
    funcs = [getattr(item, "function", None)]
    funcs += [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    for f in funcs:
        if hasattr(f, "__code__"):
            found_names, found_consts = _refs(f, set())
            if names & found_names or consts & found_consts:
                return True
    return False


# `make test` runs on pytest-xdist workers (`--dist loadgroup`): the modules that share the Docker engine (image tags,
# the test boxes' containers) or a fixed port carry `xdist_group("engine")`, so one worker runs them in order; the
# tests of a module that share a module-scoped fixture (a trained model, a run) go to one worker too, which makes it once.
ENGINE = pytest.mark.xdist_group("engine")


def _xdist_groups(config, items) -> None:
    """On a worker: give each test of a group the `@NAME` suffix that --dist loadgroup schedules by. pytest-xdist 3.8
    writes it to `item._nodeid`, which pytest 9 no longer reads (a node's id lives in `_id`), so without this every
    group would be spread over both workers."""
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")})
        if not names and _uses_a_module_fixture(item):  # one worker runs the module, so the fixture is made once
            names = [f"module-{item.path.stem}"]
        suffix = f"@{'_'.join(names)}"
        if names and not item.nodeid.endswith(suffix):  # a parameter's id may hold an "@" of its own
            item._id = coerce_node_id(item.nodeid + suffix)


def _uses_a_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return bool(info) and any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


def _needs_slow_machinery(item) -> bool:
    return _uses(item, SLOW_FIXTURES, SLOW_NAMES, SLOW_CONSTANTS)


def pytest_collection_modifyitems(config, items):  # before pytest's own, which deselects by -m
    for item in items:
        if "slow" not in item.keywords and _needs_slow_machinery(item):
            item.add_marker(pytest.mark.slow)
    _xdist_groups(config, items)
    _slow_first(config, items)


def _slow_first(config, items) -> None:
    """On a worker: the slow tests ahead of the quick ones. --dist loadgroup hands out the groups, largest first, then
    single tests in this order, so a minute-long test no longer starts near the end while the other workers run out of
    work; the quick ones fill in at the end. A group's tests stay together whatever the order."""
    if hasattr(config, "workerinput") and config.getvalue("loadgroup"):
        items.sort(key=lambda item: "slow" not in item.keywords)  # stable: each kind keeps its order


def script_module(name: str):
    """Import scripts/NAME.py (scripts/ is not a package) to test its functions directly."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The bundled corpus tokenized into build-nanogpt-style shards (val first), 40K tokens each."""
    d = tmp_path_factory.mktemp("shards")
    tokens = np.array([EOT] + encode(CORPUS.read_text()), dtype=np.uint16)
    size = 40_000
    for i in range(0, len(tokens), size):
        write_shard(d / f"shakespeare_{'val' if i == 0 else 'train'}_{i // size:06d}.npy", tokens[i : i + size])
    return d


@pytest.fixture(scope="session")
def doc_shards(tmp_path_factory) -> Path:
    """The bundled corpus as documents (its paragraphs, each after <|endoftext|>), in shards of 40K tokens, val first:
    the current record's loader starts every sequence at a document."""
    tokens = np.array([t for doc in CORPUS.read_text().split("\n\n") for t in [EOT, *encode(doc)]], dtype=np.uint16)
    d = tmp_path_factory.mktemp("doc-shards")
    for i in range(0, len(tokens), 40_000):
        write_shard(d / f"plays_{'val' if i == 0 else 'train'}_{i // 40_000:06d}.npy", tokens[i : i + 40_000])
    return d


@pytest.fixture(scope="session")
def corpora(shards, doc_shards) -> dict[str, Path]:
    """Each recipe's data dir: doc_shards for those that read whole documents, shards for the others."""
    return {recipe: doc_shards if recipe in DOCUMENT_RECIPES else shards for recipe in RECIPE_ARGS}


@pytest.fixture(scope="session")
def hellaswag_rows(tmp_path_factory) -> Path:
    """Five HellaSwag-format rows from the corpus: the right ending is the line that follows the context. An odd number,
    so that two ranks score unequal shares."""
    lines = [ln for ln in CORPUS.read_text().splitlines() if len(ln.split()) >= 6]
    rows = []
    for i in range(5):
        ctx, right = lines[100 * i], lines[100 * i + 1]
        wrong = [lines[(100 * i + 37 * k) % len(lines)] for k in (3, 5, 7)]
        endings = wrong[:]
        endings.insert(i % 4, right)
        rows.append({"ctx": ctx, "endings": endings, "label": i % 4})
    path = tmp_path_factory.mktemp("hellaswag") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextlib.contextmanager
def vectorised_inductor():
    """Inductor's vector ISA as torch picks it by default (a dry build per ISA), for code that compiles only vectorised:
    FlexAttention's CPU kernels. The list of ISAs that pass is cached per process, so it is cleared on both sides.

    The ISA's width is set as `cpp.simdlen`, which is part of the key of Inductor's graph cache (the picked ISA is
    not): a graph generated for 8 lanes (AVX2), then taken from the cache shared by every test process and built with
    16 (AVX-512), writes past its buffers and corrupts the heap."""
    from torch._inductor import config, cpu_vec_isa

    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    try:
        with config.patch({"cpp.vec_isa_ok": None}):
            isa = cpu_vec_isa.pick_vec_isa()
            with config.patch({"cpp.simdlen": isa.bit_width() if isa else None}):
                yield
    finally:
        cpu_vec_isa.valid_vec_isa_list.cache_clear()


# Inductor's graph cache is keyed without the vector ISA that ATEN_CPU_CAPABILITY picks: graphs cached under
# avx512 fail to build under `default` (at::vec undeclared). A run of the suite under a forced capability gets a cache
# of its own, for the trainers it starts and for what the tests compile in this process.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) /
                                                f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # One compile cache for every test's trainer (torch's own default), not one per temp log dir: the same graphs
    # compile once per machine. The test of the log-dir cache passes TORCHINDUCTOR_CACHE_DIR="".
    e.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"))
    e.update({k: str(v) for k, v in extra.items()})
    return e


# run_cli's command lines run in children of one fork server per test process, which has imported torch and the
# trainer once (tests/forkserver.py: each child is the process the command line would start, with its own exit status,
# stdout and stderr); a command line whose environment changes what those imports read runs in a subprocess instead.
# RUN_CLI_SUBPROCESS=1 runs every one (and the launcher tests' fab runs, which fork the same way) in a subprocess.
# torch._dynamo is preloaded too: the trainer imports it even with compile off (an optimizer's add_param_group is wrapped
# to keep Dynamo out, and the wrapper imports it), and it costs a child as much as torch itself. So is TensorBoard's
# summary module, which every run's first event imports (fsspec copies the whole environment there: a scan, which lets
# each command line keep its own PYTEST_CURRENT_TEST and PATH).
CLI_PRELOAD = ["numpy", "torch", "torch._dynamo", "torch.utils.tensorboard.summary", "job.train", "job.sample", "job.export",
               "job.stats", "job.prepare", "job.plot"]
_servers: dict[tuple, ForkServer] = {}


def run_forked(argv: list[str], preload: list[str], base: dict[str, str], e: dict[str, str],
               timeout: float) -> subprocess.CompletedProcess:
    """run_process(argv) in environment `e`, in a child of this test process's fork server for `preload` where it can
    fork, else in a subprocess. The server starts on first use in `base`, the environment without any command line's
    own variables: one of those that its imports read would send every later command line to a subprocess."""
    if os.environ.get("RUN_CLI_SUBPROCESS") == "1":
        return run_process(argv, cwd=ROOT, env=e, timeout=timeout)
    server = _servers.get(tuple(preload))
    if server is None:
        server = _servers[tuple(preload)] = ForkServer(preload, cwd=ROOT, env=base)
    return server.run(argv, cwd=ROOT, env=e, timeout=timeout)


def pytest_sessionfinish(session, exitstatus):
    for server in _servers.values():
        server.close()


def run_cli(*args, check=False, timeout=300, **env_extra) -> subprocess.CompletedProcess:
    proc = run_forked([sys.executable, *map(str, args)], CLI_PRELOAD, env(), env(**env_extra), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_cmd(data_dir, log_dir, *extra) -> list[str]:
    return ["-m", "job.train", *SMALL, "--data-dir", str(data_dir), "--log-dir", str(log_dir), *map(str, extra)]


def events(log_dir, kind: str) -> list[dict]:
    path = Path(log_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == kind]


def losses(log_dir) -> dict[int, float]:
    """Train loss per step; after a crash and resume the re-run steps overwrite the first attempt's."""
    return {e["step"]: e["loss"] for e in events(log_dir, "train")}


def one(pattern: str, text: str) -> re.Match:
    """The match of `pattern` at the start of exactly one line of `text`."""
    found = [m for line in text.splitlines() if (m := re.match(pattern, line))]
    assert len(found) == 1, (pattern, text)
    return found[0]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---- a real full disk ------------------------------------------------------------------------------------
@pytest.fixture
def disk(tmp_path):
    """disk(bytes) -> a directory on a tmpfs of that size; grow(dir, bytes) gives it more room."""
    mounted = []

    def make(size: int, name: str = "disk"):
        d = tmp_path / name
        d.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(d)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(reason=f"cannot mount a size-limited tmpfs here ({proc.stderr.strip()}): it needs root, "
                               "which CI has")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def grow(d, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size // 1024}k", str(d)], check=True)


# ---- the real Docker engine ----------------------------------------------------------------------------
def sh(*args, check=True, timeout=1200, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def docker():
    if shutil.which("docker") is None:
        pytest.skip(reason="the docker CLI is not installed here (CI installs docker.io and starts dockerd in .ci/run)")
    if sh("docker", "info", check=False).returncode != 0:
        pytest.skip(reason="no Docker daemon is reachable here (CI starts dockerd in .ci/run)")
    # The untagged images the tests' builds leave in the engine stay: with the classic builder they hold the build
    # cache: without them the next run builds the trainer image's venv layer again, for minutes.
    return "docker"


@pytest.fixture(scope="session")
def registry(docker, tmp_path_factory):
    """A real Docker registry on 127.0.0.1 (tests/registry_server.py), empty at the start of the session."""
    from registry_server import SKIP_REASON, registry_available, start_registry

    if not registry_available():
        pytest.skip(reason=SKIP_REASON)
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


def cpu_torch_wheel() -> Path:
    links = sh("python3", "-m", "pip", "config", "get", "global.find-links", check=False).stdout.strip() or "/opt/wheels"
    found = sorted(glob.glob(f"{links}/torch-2.13.0+cpu-*.whl"))
    if not found:
        pytest.skip(reason=f"no local CPU torch 2.13.0 wheel in {links}: the build would pull GBs of CUDA torch")
    return Path(found[0])


# ---- the trainer in this process --------------------------------------------------------------------------
@contextlib.contextmanager
def one_thread():
    """torch on one thread, as the trainer's subprocesses run (OMP_NUM_THREADS=1 in env()): the same float summation
    order, so a run here and one there can be compared closely, and two runs here bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_in_process(args, before_step: int | None = None, action=None):
    """`python -m job.train ARGS` in this process, through the trainer's own parser and Trainer; `action(trainer)` runs
    just before step `before_step`'s optimizer step (a kill is an exception raised there, a SIGTERM the real signal).
    Returns the Trainer."""
    from job.config import parse_args
    from job.runtime import setup_runtime
    from job.train import Trainer

    cfg = parse_args([str(a) for a in args])
    trainer = Trainer(cfg, setup_runtime(cfg))
    if before_step is not None:
        step_fn = trainer.train_step

        def train_step(step):
            if step == before_step:
                action(trainer)
            return step_fn(step)

        trainer.train_step = train_step
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache or env()["TORCHINDUCTOR_CACHE_DIR"]  # the subprocesses' cache, as main() would
    try:
        with one_thread():
            trainer.run()
    finally:
        if cache is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    return trainer


# Every recipe at a size a CPU trains in seconds; a new recipe adds its line here and gets every promise of
# tests/test_promises.py.
RECIPE_ARGS = {"gpt2": SMALL, "speedrun-2025-05-24": SPEEDRUN_SMALL, "speedrun": RECORD_SMALL}
PROMISE_STEPS = 12
# The modules that read `references` run on one xdist worker, so the runs are made once.
REFERENCES = pytest.mark.xdist_group("references")


def recipe_argv(recipe, data_dir, log, *extra) -> list[str]:
    return [*RECIPE_ARGS[recipe], "--data-dir", str(data_dir), "--log-dir", str(log), "--max-steps", str(PROMISE_STEPS), *map(str, extra)]


@pytest.fixture(scope="session")
def references(corpora, hellaswag_rows, tmp_path_factory):
    """Per recipe, one uninterrupted run in this process, evaluating, sampling and checkpointing every few steps: what
    every interrupted run must reproduce, and what a run of the recipe logs and saves."""
    out = {}
    for recipe in RECIPE_ARGS:
        out[recipe] = log = tmp_path_factory.mktemp(f"reference-{recipe}")
        train_in_process(recipe_argv(recipe, corpora[recipe], log, "--checkpoint-every", 4, "--hellaswag-every", 6, "--hellaswag-path",
                                     hellaswag_rows, "--sample-num", 2, "--sample-tokens", 8, "--sample-every", 6))
    return out


# ---- a trainer in a process of its own ------------------------------------------------------------------
def wait_for(predicate, proc, timeout=300):
    """Until predicate() holds; a process that exits first, or the timeout, fails the test (the timeout kills its tree)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.05)
    kill_tree(proc.pid)
    raise AssertionError("timed out waiting for the trainer")
