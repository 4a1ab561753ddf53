"""The on-box cost guard as a real process: a temp dir as the log dir, the fake Lambda API over HTTP and moto's S3
server. The test plays the trainer (checkpoints, "end" events, exit files) and the laptop (.fetched markers)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from job.errors import UserError
from job.sidecar.guard import SelfTerminator
from job.sidecar.lambda_cloud import LambdaCloud
from job.sidecar.s3 import client, upload_files
from tests.conftest import ROOT
from tests.fake_lambda import TEST_KEY, FakeLambda

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in AWS}
    os.environ.update(AWS)
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def fake():
    with FakeLambda() as f:
        yield f
        assert f.problems == [], f.problems
        # The guard's only use of the API: terminate, with the right key.
        assert all((r.method, r.path) == ("POST", "/instance-operations/terminate") for r in f.requests), f.requests


@pytest.fixture
def box(tmp_path):
    """The log dir (the box's weights dir) and the 0600 key file the launcher mounts into the guard's container."""
    log = tmp_path / "model_weights"
    log.mkdir()
    key = tmp_path / "secrets" / "lambda_api_key"
    key.parent.mkdir()
    key.write_text(TEST_KEY + "\n")
    key.chmod(0o600)
    return log, key


class GuardProc:
    def __init__(self, fake, log: Path, key: Path, *flags):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **AWS)
        env["LAMBDA_API_KEY"] = "decoy-from-env"  # must be ignored: the guard takes the key from the file only
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "job.sidecar.guard", "--log-dir", str(log), "--api-key-file", str(key),
                                      "--api-base", fake.url, "--poll-seconds", "0.05", *map(str, flags)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def status(self) -> dict:
        try:
            return json.loads((self.log / ".guard-status").read_text())
        except (OSError, ValueError):
            return {}

    def wait_for(self, state: str, *words: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if s.get("state") == state and all(w in s.get("detail", "") for w in words):
                return s
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        out, err = self.proc.communicate()
        raise AssertionError(f"guard never reached {state} {words}: last status {self.status()}\n{out}\n{err}")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        status_text = (self.log / ".guard-status").read_text() if (self.log / ".guard-status").exists() else ""
        assert TEST_KEY not in out + err + status_text  # the key never reaches output, logs or files
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        return self.finish()


def checkpoint(log: Path, step: int, size: int = 65536) -> Path:
    p = log / f"model_{step:05d}.pt"
    p.write_bytes(os.urandom(size))
    return p


def event(log: Path, **fields) -> None:
    with open(log / "metrics.jsonl", "a") as f:
        f.write(json.dumps(fields) + "\n")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def terminated(fake) -> list:
    return [r.body for r in fake.calls("POST", "/instance-operations/terminate")]


def test_terminates_only_once_the_final_checkpoint_is_in_s3(fake, box, endpoint):
    log, key = box
    me, bystander = fake.add_instance("run"), fake.add_instance("other-run")
    s3 = client(endpoint)
    s3.create_bucket(Bucket="ckpt")
    checkpoint(log, 10)
    event(log, event="end", step=5, reason="done")  # a previous run's end: not this run's
    event(log, event="train", step=10, loss=5.0)
    g = GuardProc(fake, log, key, "--instance-id", me["id"], "--terminate-when-done", "--s3", "s3://ckpt/run", "--s3-endpoint", endpoint)
    g.wait_for("watching", "training in progress")
    final = checkpoint(log, 20)
    event(log, event="end", step=20, reason="done")
    g.wait_for("waiting-sync", "model_00020.pt", "not in S3 yet")
    s3.put_object(Bucket="ckpt", Key="run/model_00020.pt", Body=final.read_bytes(), Metadata={"sha256": "0" * 64})
    g.wait_for("waiting-sync", "differs from the local file (sha256)")
    assert terminated(fake) == [] and me["status"] == "active"
    upload_files([final], "s3://ckpt/run", s3=s3)
    rc, out, err = g.finish()
    assert rc == 0, err
    assert terminated(fake) == [{"instance_ids": [me["id"]]}]
    assert me["status"] == "terminated" and bystander["status"] == "active"
    assert g.status()["state"] == "terminated" and "model_00020.pt is in s3://ckpt/run/model_00020.pt" in g.status()["detail"]
    assert "guard: terminated:" in out


def test_max_hours_requests_a_stop_then_waits_for_the_laptop_copy(fake, box):
    log, key = box
    me = fake.add_instance("run")
    checkpoint(log, 10)
    g = GuardProc(fake, log, key, "--instance-id", me["id"], "--max-hours", "0.0002", "--stop-grace-minutes", "10")
    g.wait_for("stop-requested", "--max-hours reached")
    assert "--max-hours reached" in json.loads((log / ".stop-request").read_text())["reason"]
    final = checkpoint(log, 30)  # the trainer honours the request: checkpoint, "end", exit
    event(log, event="end", step=30, reason="stopped")
    g.wait_for("waiting-sync", "model_00030.pt is not confirmed anywhere")
    (log / ".fetched-model_00030.pt").write_text("f" * 64)  # a copy that does not match
    g.wait_for("waiting-sync", "model_00030.pt is not confirmed anywhere", ".fetched-model_00030.pt does not match")
    assert terminated(fake) == []
    (log / ".fetched-model_00030.pt").write_text(json.dumps({"sha256": sha(final)}))
    rc, _, err = g.finish()
    assert rc == 0, err
    assert terminated(fake) == [{"instance_ids": [me["id"]]}]
    assert "stopped at step 30" in g.status()["detail"] and "on the laptop" in g.status()["detail"]


def test_ignored_stop_request_never_loses_the_only_copy(fake, box):
    log, key = box
    me = fake.add_instance("run")
    ckpt = checkpoint(log, 5)
    g = GuardProc(fake, log, key, "--instance-id", me["id"], "--max-hours", "0.0001", "--stop-grace-minutes", "0.001")
    g.wait_for("blocked", "did not stop within the grace period", "model_00005.pt is not confirmed anywhere")
    assert terminated(fake) == []
    (log / ".fetched-model_00005.pt").write_text(sha(ckpt) + "\n")
    rc, _, err = g.finish()
    assert rc == 0, err
    assert terminated(fake) == [{"instance_ids": [me["id"]]}]


def test_a_full_disk_never_kills_the_guard(fake, box, disk):
    """Its status, state and stop-request files cannot be written: it must still terminate the box at --max-hours
    (the grace then runs from the deadline, since the trainer could not be asked to stop)."""
    _, key = box
    log = disk(2**20) / "model_weights"
    log.mkdir()
    me = fake.add_instance("run")
    ckpt = checkpoint(log, 5)
    (log / ".fetched-model_00005.pt").write_text(sha(ckpt))  # the laptop has it
    with open(log / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 65536)
    g = GuardProc(fake, log, key, "--instance-id", me["id"], "--max-hours", "0.0001", "--stop-grace-minutes", "0.001")
    rc, out, err = g.finish()
    assert rc == 0, out + err
    assert f"guard: warning: cannot write .guard-{me['id']}.json in {log} (No space left on device)" in out
    assert "guard: terminated: the trainer did not stop within the grace period" in out
    assert terminated(fake) == [{"instance_ids": [me["id"]]}]
    assert not list(log.glob("*.tmp")) and not (log / ".stop-request").exists()


def test_failed_run_kept_or_terminated(fake, box):
    log, key = box
    me = fake.add_instance("run")
    g = GuardProc(fake, log, key, "--instance-id", me["id"], "--terminate-when-done", "--keep-on-failure")
    g.wait_for("watching")
    (log / ".train-exit").write_text("1\n")
    rc, _, err = g.finish()
    assert rc == 0, err
    assert g.status()["state"] == "kept" and terminated(fake) == [] and me["status"] == "active"
    # A new guard on the same box after a settled run starts afresh (the old exit file is older than it).
    time.sleep(1.1)  # file times have 1 s of slack in the freshness rule
    g = GuardProc(fake, log, key, "--instance-id", me["id"], "--terminate-when-done")
    g.wait_for("watching")
    (log / ".train-exit").write_text("137\n")  # crashed before any checkpoint: nothing to lose
    rc, _, err = g.finish()
    assert rc == 0, err
    assert "exited with status 137; no checkpoint to keep" in g.status()["detail"]
    assert terminated(fake) == [{"instance_ids": [me["id"]]}]


@pytest.mark.parametrize("reason", ["diverged", "checkpoint-failed"])
def test_a_run_that_ended_in_failure_is_kept_with_keep_on_failure(fake, box, reason):
    """The trainer's "end" event comes before its exit status: a diverged run or one that could not checkpoint is a
    failure there too, so --keep-on-failure keeps the box for inspection."""
    log, key = box
    me = fake.add_instance("run")
    checkpoint(log, 10)
    g = GuardProc(fake, log, key, "--instance-id", me["id"], "--terminate-when-done", "--keep-on-failure")
    g.wait_for("watching")
    event(log, event="end", step=12, reason=reason)
    rc, _, err = g.finish()
    assert rc == 0, err
    assert g.status()["state"] == "kept" and f"training ended ({reason} at step 12)" in g.status()["detail"]
    assert terminated(fake) == [] and me["status"] == "active"


def test_terminate_failure_is_retried_not_fatal(fake, box):
    log, key = box
    key.write_text("revoked-key\n")
    me = fake.add_instance("run")
    g = GuardProc(fake, log, key, "--instance-id", me["id"], "--terminate-when-done")
    (log / ".train-exit").write_text("0")
    g.wait_for("terminating", "retrying: Lambda Cloud rejected the API key")
    assert g.proc.poll() is None  # still there, trying again
    g.kill()
    fake.requests.clear()  # requests with the revoked key were expected here


def test_refuses_any_other_instance(fake):
    me, other = fake.add_instance("me"), fake.add_instance("other")
    t = SelfTerminator(LambdaCloud(TEST_KEY, fake.url), me["id"])
    for ids in ([other["id"]], [me["id"], other["id"]], []):
        with pytest.raises(UserError) as e:
            t.terminate(ids)
        assert f"only its own instance {me['id']}" in str(e.value)
    assert fake.requests == [] and other["status"] == "active"


def test_setup_mistakes_are_one_line(fake, box, tmp_path):
    log, key = box
    cases = [(["--instance-id", "abc"], "nothing to guard: pass --terminate-when-done and/or --max-hours H"),
             (["--instance-id", "abc", "--terminate-when-done", "--log-dir", tmp_path / "nope"], "does not exist"),
             (["--instance-id", "abc", "--max-hours", "-1"], "--max-hours must be positive")]
    for flags, words in cases:
        rc, _, err = GuardProc(fake, log, key, *flags).finish()
        assert rc == 2 and err.count("\n") == 1 and words in err, err
    key.chmod(0o644)
    rc, _, err = GuardProc(fake, log, key, "--instance-id", "abc", "--terminate-when-done").finish()
    assert rc == 2 and f"run `chmod 600 {key}`" in err and err.count("\n") == 1


def test_every_end_reason_the_trainer_writes_has_an_exit_status():
    import re

    from job.errors import END_REASONS

    # the trainer writes "end" events directly (log.event("end", ..., reason=...)) and through Trainer._end(step, reason, ...)
    source = "".join(p.read_text() for p in (ROOT / "job").glob("*.py"))
    written = set(re.findall(r'event\("end", [^)]*reason="([a-z-]+)"', source)) | set(re.findall(r'_end\([^,]+, "([a-z-]+)"', source))
    assert written == set(END_REASONS), written
