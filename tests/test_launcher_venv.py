"""The laptop side installs from requirements-launcher.txt alone: `fab` works in a virtualenv without torch or numpy.

The virtualenv is real (python -m venv, pip install -r requirements-launcher.txt from the package index) and is
cached under ~/.cache/nanogpt-cloud (or $XDG_CACHE_HOME), keyed by the requirements file's hash and the Python
version: a machine pays the install once, and a changed requirements file gets a fresh one.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error
from sshd import sshd_available, start_sshd

REQUIREMENTS = ROOT / "requirements-launcher.txt"
LAPTOP_FILES = [ROOT / "fabfile.py", *sorted((ROOT / "infra").glob("*.py"))]


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanogpt-cloud"
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + f"{sys.version_info[:2]}".encode()).hexdigest()[:16]
    return base / f"launcher-venv-{key}"


@pytest.fixture(scope="module")
def venv() -> Path:
    """The launcher's virtualenv, built once per requirements file (a lock keeps parallel runs from racing)."""
    d = cache_dir()
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{d}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / ".complete").exists():
            shutil.rmtree(d, ignore_errors=True)  # an install cut short
            subprocess.run([sys.executable, "-m", "venv", str(d)], check=True, capture_output=True)
            proc = subprocess.run([str(d / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                                   str(REQUIREMENTS)], capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, f"pip install -r requirements-launcher.txt failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            (d / ".complete").touch()
    return d


def clean_env(**extra) -> dict:
    """This process's environment without what would let the test venv's packages (torch) leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def run_in(venv: Path, *args, cwd=ROOT, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *map(str, args[1:])], cwd=cwd, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def launcher_imports() -> list[str]:
    """Every module fabfile.py and infra/ import, at the top or inside a function (absolute imports only)."""
    found = set()
    for path in LAPTOP_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
                found.add(node.module)
    return sorted(found)


def test_the_launcher_venv_has_neither_torch_nor_numpy(venv):
    proc = run_in(venv, "python", "-c", "import importlib.util as u; print([m for m in ('torch', 'numpy') if u.find_spec(m)])", cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_every_module_the_launcher_imports_loads_there(venv):
    """Lazy imports inside functions included: each path a fab task can take (fetch-weights --s3: boto3) is covered."""
    modules = launcher_imports()
    assert "job.sidecar.s3" in modules and "boto3" in modules and not any(m.startswith(("job.config", "job.prepare")) for m in modules)
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    proc = run_in(venv, "python", "-c", code, *modules, env=clean_env(PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_fab_list_and_launch_help(venv):
    listing = run_in(venv, "fab", "--list")
    assert listing.returncode == 0, listing.stderr
    for task in ("launch", "logs", "status", "stop", "fetch-weights", "provision", "types", "instances", "terminate"):
        assert f"\n  {task}" in listing.stdout, (task, listing.stdout)
    helped = run_in(venv, "fab", "launch", "--help")
    assert helped.returncode == 0 and "--sync-s3" in helped.stdout and "--provision" in helped.stdout, helped.stdout + helped.stderr


def test_fab_fetch_weights_without_a_box_is_one_line(venv, tmp_path):
    assert_one_line_error(run_in(venv, "fab", "fetch-weights"), "no box given", "--host")
    bad_url = run_in(venv, "fab", "fetch-weights", "--host", "ubuntu@127.0.0.1", "--s3", "bucket/prefix")
    assert bad_url.returncode == 2 and assert_one_line_error(bad_url, "not an S3 URL", "s3://BUCKET/PREFIX")
    closed = run_in(venv, "fab", "fetch-weights", "--host", "ubuntu@127.0.0.1", "--port", free_port(), "--known-hosts",
                    tmp_path / "known_hosts", "--to", tmp_path / "w")
    assert closed.returncode == 2 and assert_one_line_error(closed, "127.0.0.1")
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(not sshd_available(), reason="openssh-server is not installed (CI installs it in .ci/run)")
def test_fab_fetch_weights_to_s3_from_the_launcher_venv(venv, tmp_path):
    """The whole laptop path with only the launcher's packages: a real sshd as the box, moto's S3 server as S3."""
    import boto3
    from moto.server import ThreadedMotoServer

    srv = start_sshd(tmp_path / "sshd")
    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3_server.start()
    try:
        endpoint = "http://{}:{}".format(*s3_server.get_host_and_port())
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket="weights")
        box = tmp_path / "box"
        box.mkdir()
        (box / "model_00100.pt").write_bytes(os.urandom(2 * 2**20))
        (box / "metrics.jsonl").write_text('{"event": "train", "step": 0, "loss": 10.9}\n')
        proc = run_in(venv, "fab", "fetch-weights", "--host", f"{srv.user}@{srv.host}", "--port", srv.port, "--key", srv.key_path,
                      "--known-hosts", srv.known_hosts_path, "--weights-dir", box, "--to", tmp_path / "w", "--s3", "s3://weights/run",
                      "--s3-endpoint", endpoint, env=clean_env(**creds))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "uploaded 2 files to s3://weights/run" in proc.stdout
        assert (tmp_path / "w" / "model_00100.pt").read_bytes() == (box / "model_00100.pt").read_bytes()
        body = s3.get_object(Bucket="weights", Key="run/model_00100.pt")["Body"].read()
        assert body == (box / "model_00100.pt").read_bytes()
    finally:
        s3_server.stop()
        srv.stop()


def test_provision_estimates_the_cost_of_a_preset_without_torch(venv):
    """`fab launch --provision` reads the preset's step count (job.contract) for its estimate, then asks; no answer aborts."""
    from fake_lambda import A10, TEST_KEY, FakeLambda

    with FakeLambda(boot_polls=1) as api:
        env = clean_env(LAMBDA_API_KEY=TEST_KEY)
        proc = run_in(venv, "fab", "launch", "--provision", "--type", A10, "--ssh-key", "laptop", "--api-base", api.url, env=env)
        assert "19073 steps" in proc.stdout and proc.returncode == 1, proc.stdout + proc.stderr
        assert_one_line_error(proc, "aborted: nothing was changed")
        tiny = run_in(venv, "fab", "launch", "--provision", "--type", A10, "--ssh-key", "laptop", "--api-base", api.url, "--preset", "tiny",
                      env=env)
        assert "300 steps" in tiny.stdout, tiny.stdout + tiny.stderr
        unknown = run_in(venv, "fab", "launch", "--provision", "--type", A10, "--ssh-key", "laptop", "--api-base", api.url, "--preset",
                         "gpt5", env=env)
        assert unknown.returncode == 2 and assert_one_line_error(unknown, "--preset gpt5", "tiny")
        assert not api.instances and not api.problems


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
