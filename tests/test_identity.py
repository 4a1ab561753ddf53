"""What a run records of itself (job/identity.py): the code's commit and content hash, the image the launcher ran,
torch, CUDA, the driver and the GPU, in the start event and every checkpoint."""

import json
import shutil
import subprocess
import sys

import torch

from conftest import ROOT, events, run_cli, train_cmd
from infra.box import Box
from infra.container import Job, format_status, run_command, summarize_metrics
from infra.flavour import DEFAULT
from infra.image import build_args_for
from job import identity


def head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def copy_of_job(tmp_path):
    """job/ as the image has it: the package alone, no .git above it (caches left behind, as .dockerignore does)."""
    dst = tmp_path / "app" / "job"
    shutil.copytree(ROOT / "job", dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_in_a_checkout_the_commit_is_head_and_the_hash_is_of_job():
    ident = identity.code_identity()
    assert ident["commit"] == head()
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "job"], capture_output=True, text=True).stdout
    assert ident["dirty"] is bool(status.strip())
    assert ident["code_sha256"] == identity.code_hash(ROOT / "job") and len(ident["code_sha256"]) == 64


def test_without_git_the_content_hash_names_the_code_and_changes_with_it(tmp_path, monkeypatch):
    monkeypatch.delenv(identity.COMMIT_ENV, raising=False)
    copy = copy_of_job(tmp_path)
    assert identity.git_commit(copy) == (None, None)
    ident = identity.code_identity(copy)
    assert ident == {"commit": None, "dirty": None, "code_sha256": identity.code_hash(ROOT / "job")}  # same code, same hash
    # What the code is not leaves it alone: caches, data.
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0")
    (copy / "assets" / "notes.txt").write_text("not code\n")
    assert identity.code_hash(copy) == ident["code_sha256"]
    # One byte of a module, the contract, a new module: each is other code.
    seen = {ident["code_sha256"]}
    for change in (lambda: (copy / "train.py").write_text((copy / "train.py").read_text() + "\n"),
                   lambda: (copy / "contract.env").write_text((copy / "contract.env").read_text() + "# x\n"),
                   lambda: (copy / "extra.py").write_text("")):
        change()
        seen.add(identity.code_hash(copy))
    assert len(seen) == 4


def test_in_the_image_the_commit_comes_from_the_build(tmp_path):
    """No .git in the image: the commit is the one docker/Dockerfile's GIT_COMMIT build arg left in NANOGPT_COMMIT."""
    copy = copy_of_job(tmp_path)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from job import identity; "
            "print(json.dumps(identity.code_identity(identity.PACKAGE)))")
    env = {"PATH": "/usr/bin:/bin", identity.COMMIT_ENV: "0123abcd" * 5}
    out = subprocess.run([sys.executable, "-c", code, str(copy.parent)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=True).stdout
    assert f'"commit": "{"0123abcd" * 5}"' in out and '"dirty": null' in out


def test_the_launcher_passes_the_image_reference_and_id_into_the_trainer():
    box = Box(host="box", user="ubuntu", uid=1000, gid=1000, docker="docker", data_dir="/data", weights_dir="/weights")
    _, cmd = run_command(box, "nanogpt-train:src-abc-cu130", Job(preset="tiny"), image_id="sha256:" + "e" * 64)
    assert f"-e {identity.IMAGE_ENV}=nanogpt-train:src-abc-cu130" in cmd
    assert f"-e {identity.IMAGE_ID_ENV}=sha256:{'e' * 64}" in cmd
    # A user's --env cannot make the run record another image.
    _, cmd = run_command(box, "repo/img:cu130", Job(preset="tiny", env={identity.IMAGE_ENV: "other"}))
    assert f"-e {identity.IMAGE_ENV}=repo/img:cu130" in cmd and "other" not in cmd and identity.IMAGE_ID_ENV not in cmd


def test_fab_status_names_the_code_of_the_run():
    start = {"event": "start", "config": {"max_steps": 10}, "identity": {"commit": "f" * 40, "code_sha256": "c" * 64}}
    train = {"event": "train", "step": 3, "loss": 5.0, "ms": 10.0, "tok_s": 100.0}
    info = summarize_metrics([json.dumps(start), json.dumps(train)])
    assert info["code"] == "f" * 12
    assert f"code        {'f' * 12}" in format_status({"host": "box", **info})
    start["identity"]["commit"] = None  # an image built from no checkout: its code's hash
    assert summarize_metrics([json.dumps(start), json.dumps(train)])["code"] == "sha256 " + "c" * 12


def test_the_image_build_bakes_in_this_checkouts_commit():
    assert build_args_for(DEFAULT)["GIT_COMMIT"] == head()
    make = ["make", "--no-print-directory", "-C", str(ROOT), "build-image", "DOCKER=echo", "NAME=nanogpt-identity-test"]
    proc = subprocess.run(make, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"--build-arg GIT_COMMIT={head()}" in proc.stdout
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"ENV {identity.COMMIT_ENV}=${{GIT_COMMIT}}" in dockerfile


def test_a_run_records_its_identity_in_the_start_event_and_every_checkpoint(shards, tmp_path):
    log = tmp_path / "log"
    run_cli(*train_cmd(shards, log, "--max-steps", 4, "--checkpoint-every", 2), check=True,
            NANOGPT_IMAGE="nanogpt-train:test", NANOGPT_IMAGE_ID="sha256:" + "a" * 64)
    want = {"commit": head(), "code_sha256": identity.code_hash(ROOT / "job"), "image": "nanogpt-train:test",
            "image_id": "sha256:" + "a" * 64, "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None}
    start = events(log, "start")[0]["identity"]
    assert {k: start[k] for k in want} == want
    assert start["driver"] is None or start["driver"][0].isdigit()  # nvidia-smi's, where there is one
    for step in (2, 4):
        ck = torch.load(log / f"model_{step:05d}.pt", map_location="cpu", weights_only=True)
        assert ck["identity"] == start
    # A resumed run (maybe of other code, in another image) says again what it runs.
    run_cli(*train_cmd(shards, log, "--max-steps", 6, "--checkpoint-every", 2), check=True, NANOGPT_IMAGE="", NANOGPT_IMAGE_ID="")
    resume = events(log, "resume")[0]["identity"]
    assert resume["code_sha256"] == want["code_sha256"] and resume["image"] is None
    sample = run_cli("-m", "job.sample", "--checkpoint", log, "--num", "1", "--max-tokens", "4", "--device", "cpu", check=True)
    ck = torch.load(log / "model_00006.pt", map_location="cpu", weights_only=True)
    assert f"step 6, val loss {ck['val_loss']}, code {head()[:12]}" in sample.stdout
    # Outside a container there is no image.
    log2 = tmp_path / "log2"
    run_cli(*train_cmd(shards, log2, "--max-steps", 1), check=True, NANOGPT_IMAGE="", NANOGPT_IMAGE_ID="")
    assert {k: events(log2, "start")[0]["identity"][k] for k in ("image", "image_id")} == {"image": None, "image_id": None}
