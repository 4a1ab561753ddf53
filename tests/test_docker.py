"""The real trainer image, built and run on the machine's Docker engine (CPU torch, local Debian base).

The only deviation from production: BASE_IMAGE is a locally made Debian image (no registry is reachable)
and torch is the CPU wheel; the container runs without `--gpus all` because this host has no GPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BASE, CORPUS, ENGINE, ROOT, cpu_torch_wheel, losses, sh
from job import contract
from job.data import write_shard
from job.tokenizer import EOT, encode

pytestmark = [pytest.mark.slow, ENGINE]  # one worker runs them in order (tests/conftest.py)
NAME = "nanogpt-train-test"
UID = 4321  # a host user that is not root: files must come out owned by it
SMALL = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--total-batch-tokens", "2048",
         "--eval-every", "3", "--val-steps", "2", "--sample-num", "1", "--sample-tokens", "4"]


@pytest.fixture(scope="module")
def context(docker, tmp_path_factory) -> Path:
    """A copy of the repository's tracked files as the build context (the test edits it to force rebuilds)."""
    sh(ROOT / "scripts" / "make_test_base_image.sh", BASE, timeout=900)
    ctx = tmp_path_factory.mktemp("context")
    files = sh("git", "ls-files", "-co", "--exclude-standard", cwd=ROOT).stdout.split("\n")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (ctx / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, ctx / f)
    shutil.copy(cpu_torch_wheel(), ctx / "docker" / "wheels")
    return ctx


def build(ctx: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = sh("make", "-C", ctx, "build-image", f"NAME={NAME}", f"BASE_IMAGE={BASE}", timeout=1800)
    return proc, time.time() - t0


def layers(image: str) -> list[str]:
    return json.loads(sh("docker", "image", "inspect", "-f", "{{json .RootFS.Layers}}", image).stdout)


@pytest.fixture(scope="module")
def image(context) -> str:
    proc, seconds = build(context)
    print(f"full build: {seconds:.1f} s")
    return f"{NAME}:latest"


@pytest.fixture
def persistent(tmp_path) -> Path:
    """A persistent filesystem with shards of the bundled corpus, as the old workflow mounts it."""
    fs = tmp_path / "fs"
    (fs / "shakespeare").mkdir(parents=True)
    tokens = np.array([EOT] + encode(CORPUS.read_text()), dtype=np.uint16)
    for i in range(0, len(tokens), 50_000):
        write_shard(fs / "shakespeare" / f"data_{'val' if i == 0 else 'train'}_{i // 50_000:06d}.npy", tokens[i : i + 50_000])
    return fs


def weights_dir(tmp_path) -> Path:
    w = tmp_path / "model_weights"
    w.mkdir()
    shutil.chown(w, UID, UID)
    return w


def test_make_run_local_cpu_prepares_the_corpus_and_trains(image, tmp_path):
    data, w = tmp_path / "data", tmp_path / "w"
    proc = make("run-local-cpu", f"NAME={NAME}", f"HOST_DATA={data}", f"HOST_WEIGHTS={w}",
                f"CMD=python -m job.supervisor {' '.join(SMALL)} --total-batch-tokens 1024 --data-dir /persistent/tinyshakespeare --max-steps 3",
                timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (data / "tinyshakespeare").glob("*.npy"))[-1] == "data_val_000000.npy"
    assert (w / "model_00003.pt").is_file() and "done: 3 steps" in proc.stdout


def test_old_workflow_command_trains_resumes_and_files_belong_to_the_user(image, persistent, tmp_path):
    w = weights_dir(tmp_path)
    old_cmd = ["docker", "run", "--rm", "-v", f"{persistent}:{contract.PERSISTENT}", "-v", f"{w}:{contract.LOG_DIR}", image,
               "torchrun", "--standalone", "--nproc_per_node=2", "train.py", *SMALL, "--data-dir", f"{contract.PERSISTENT}/shakespeare"]
    first = sh(*old_cmd, "--max-steps", 6, "--checkpoint-every", 3)
    assert "device cpu x 2" in first.stdout
    saved = sorted(p.name for p in w.glob("model_*.pt"))
    assert saved == ["model_00003.pt", "model_00006.pt"]
    for p in w.iterdir():
        assert (p.stat().st_uid, p.stat().st_gid) == (UID, UID), p  # not root
    second = sh(*old_cmd, "--max-steps", 9, "--checkpoint-every", 3)
    assert "resumed from log/model_00006.pt at step 6" in second.stdout
    assert sorted(losses(w)) == list(range(9))
    assert all(p.stat().st_uid == UID for p in w.iterdir())


def test_default_command_runs_one_process_per_device_and_user_flag(image, persistent, tmp_path):
    w = weights_dir(tmp_path)
    # No GPU here: NPROC stands in for the GPU count the launcher would detect.
    proc = sh("docker", "run", "--rm", "--user", f"{UID}:{UID}", "-e", "NPROC=2", "-v", f"{persistent}:{contract.PERSISTENT}",
              "-v", f"{w}:{contract.LOG_DIR}", image, "python", "-m", "job.supervisor", *SMALL,
              "--data-dir", f"{contract.PERSISTENT}/shakespeare", "--max-steps", 3)
    assert "--nproc_per_node=2" in proc.stdout and "device cpu x 2" in proc.stdout
    assert [p.stat().st_uid for p in w.glob("model_*.pt")] == [UID]


def test_default_command_without_data_says_what_to_do(image, tmp_path):
    proc = sh("docker", "run", "--rm", "-v", f"{tmp_path}:{contract.PERSISTENT}", image, check=False)
    assert proc.returncode != 0
    assert f"error: data dir {contract.DATA_DIR} does not exist" in proc.stderr


def test_image_follows_the_contract_and_carries_no_secrets(image):
    cfg = json.loads(sh("docker", "image", "inspect", "-f", "{{json .Config}}", image).stdout)
    assert cfg["WorkingDir"] == contract.WORKDIR
    assert cfg["Cmd"] == ["python", "-m", "job.supervisor"]
    names = [e.split("=", 1)[0] for e in cfg["Env"]]
    assert not [n for n in names if any(s in n.upper() for s in ("SECRET", "TOKEN", "PASSWORD", "AWS_", "API_KEY"))]
    history = sh("docker", "history", "--no-trunc", image).stdout
    assert "AWS_" not in history and "LAMBDA_API_KEY" not in history
    # Tokenizer files are baked in: encoding works with networking off.
    out = sh("docker", "run", "--rm", "--network", "none", image, "python", "-c",
             "from job.tokenizer import encode; print(encode(\"Hello, I'm a language model,\"))").stdout
    assert out.strip() == "[15496, 11, 314, 1101, 257, 3303, 2746, 11]"
    # What runs on the box is job/ (the sidecars included); the laptop's launcher (infra/) stays out.
    sh("docker", "run", "--rm", "--network", "none", image, "sh", "-c",
       "test ! -e infra && python -m job.sidecar.guard --help >/dev/null && python -m job.sidecar.sync --help >/dev/null")


def test_code_only_change_reuses_the_dependency_layers(image, context):
    before = layers(image)
    with open(context / "job" / "__init__.py", "a") as f:
        f.write(f"# rebuild marker {time.time()}\n")
    proc, seconds = build(context)
    print(f"code-only rebuild: {seconds:.1f} s")
    after = layers(image)
    changed = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a != b]
    # Only the source layer (job/, the last) is new; the system packages and the venv are cache hits.
    assert changed == [len(after) - 1], changed
    assert "Collecting" not in proc.stdout and "apt-get" not in proc.stdout.split("COPY job/")[-1]


def make(*args, **kw) -> subprocess.CompletedProcess:
    return sh("make", "--no-print-directory", "-C", ROOT, *args, check=False, **kw)


def test_make_targets_without_docker_say_so_in_one_line():
    for target in ("build-image", "run-local", "shell", "push-image"):
        proc = make(target, "DOCKER=/nonexistent/docker")
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines()[0].startswith("error: docker is not installed"), proc.stderr


def test_run_local_without_nvidia_runtime_offers_the_cpu_run(docker):
    if "nvidia" in sh("docker", "info", "--format", "{{json .Runtimes}}").stdout:
        pytest.skip(reason="this Docker has the NVIDIA runtime, so run-local would really train")
    proc = make("run-local")
    assert proc.returncode != 0
    assert "no NVIDIA runtime" in proc.stderr and "make run-local-cpu" in proc.stderr
    proc = make("push-image")
    assert proc.returncode != 0 and "REGISTRY is not set" in proc.stderr


# ---- make push-image against a real registry ---------------------------------------------------------------------
PUSH_NAME = "nanogpt-push-test"  # a name of its own: the engine may hold a user's nanogpt-train of the same commit


def push_image(*args) -> subprocess.CompletedProcess:
    """make push-image with this interpreter (the recipe runs infra.registry)."""
    return make("push-image", f"PYTHON={sys.executable}", f"NAME={PUSH_NAME}", *args, timeout=600)


@pytest.fixture
def pushable(docker):
    """The small test base tagged as build-image tags a cu130 image of this commit (the push reads nothing else)."""
    sh(ROOT / "scripts" / "make_test_base_image.sh", BASE, timeout=900)
    tag = f"{PUSH_NAME}:{git_sha()}-cu130"
    sh("docker", "tag", BASE, tag)
    sh("docker", "tag", BASE, f"{tag}-data")  # and its data image, as build-image tags it
    yield tag
    gone = [r for r in sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split() if PUSH_NAME in r]
    if gone:
        sh("docker", "rmi", "--no-prune", *gone, check=False)


def git_sha() -> str:
    return sh("git", "rev-parse", "--short", "HEAD", cwd=ROOT).stdout.strip()


def local_refs(prefix: str) -> list[str]:
    return [r for r in sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split() if r.startswith(prefix)]


def test_push_image_pushes_the_flavours_tags_and_prints_the_digest_the_registry_serves(pushable, registry):
    proc = push_image(f"REGISTRY={registry.host}/team")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digest = re.search(r"^pushed \S+ and :cu130: digest (sha256:[0-9a-f]{64})$", proc.stdout, re.M).group(1)
    repo = f"team/{PUSH_NAME}"
    assert registry.digest(repo, f"{git_sha()}-cu130") == digest and registry.digest(repo, "cu130") == digest
    data = re.search(r"^pushed its data image as \S+-cu130-data and :cu130-data: digest (sha256:[0-9a-f]{64})$", proc.stdout, re.M).group(1)
    assert registry.digest(repo, f"{git_sha()}-cu130-data") == data and registry.digest(repo, "cu130-data") == data
    assert f"fab launch --image {registry.host}/{repo}:{git_sha()} (the box's flavour, its data image pulled first)" in proc.stdout
    assert f"or --image {registry.host}/{repo}@{digest}" in proc.stdout
    assert not proc.stderr.strip(), proc.stderr


def test_a_registry_seeded_with_kept_layers_takes_a_push_without_a_layer_sent(pushable, registry, tmp_path):
    """The launch tests' registry starts with the layers of an earlier test run's push (tests/registry_server.py): a push
    to it then finds every layer there and uploads none, and the registry serves the same image."""
    from registry_server import keep_layers, seed_layers, start_registry

    repo, cache = f"team/{PUSH_NAME}-seeded", tmp_path / "cache"
    sh("docker", "tag", pushable, f"{registry.host}/{repo}:first")
    sh("docker", "push", f"{registry.host}/{repo}:first")  # sent, or mounted from the push test's repository
    keep_layers(registry, repo, cache)
    again = start_registry(tmp_path / "registry")
    try:
        assert seed_layers(again, repo, cache) >= 1 and again.digest(repo, "first") is None  # layers only, no image
        sh("docker", "tag", pushable, f"{again.host}/{repo}:second")
        second = sh("docker", "push", f"{again.host}/{repo}:second").stdout
        # Without the seed this registry has no layer to mount from: docker would compress and send each ("Pushed").
        assert "Pushed" not in second and "Layer already exists" in second, second
        digest = re.search(r"digest: (sha256:[0-9a-f]{64})", second).group(1)
        assert again.digest(repo, "second") == digest == registry.digest(repo, "first")
    finally:
        again.stop()
        sh("docker", "rmi", "--no-prune", f"{registry.host}/{repo}:first", f"{again.host}/{repo}:second", check=False)


def test_push_image_to_an_unreachable_registry_is_one_line_and_leaves_no_tag(pushable):
    from sshd import free_port

    registry = f"127.0.0.1:{free_port()}/team"
    proc = push_image(f"REGISTRY={registry}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 2 and re.fullmatch(r"make(\[\d+\])?: \*\*\* \[[^]]*\] Error 2", lines[1]), proc.stderr
    assert lines[0].startswith(f"error: docker push {registry}/{PUSH_NAME}:") and "connection refused" in lines[0], lines[0]
    assert "is reachable from here" in lines[0]
    assert local_refs(registry) == []  # the registry's tags it made here are gone again
