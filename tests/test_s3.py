"""S3 upload against a real S3 protocol server (moto's server mode, HTTP on loopback) through boto3."""

from __future__ import annotations

import hashlib
import os

import pytest
from moto.server import ThreadedMotoServer

from job.errors import UserError
from job.sidecar.s3 import client, parse_s3_url, upload_files


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_upload_is_multipart_verified_and_incremental(endpoint, tmp_path):
    s3 = client(endpoint)
    s3.create_bucket(Bucket="weights")
    files = []
    for name, size in (("model_01000.pt", 12 * 2**20 + 5), ("model_02000.pt", 3 * 2**20), ("metrics.jsonl", 100)):
        p = tmp_path / name
        p.write_bytes(os.urandom(size))
        files.append(p)
    first = upload_files(files, "s3://weights/run1", s3=s3, chunk_mib=5)
    assert sorted(first.uploaded) == ["metrics.jsonl", "model_01000.pt", "model_02000.pt"]
    for p in files:
        body = s3.get_object(Bucket="weights", Key=f"run1/{p.name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(p.read_bytes()).hexdigest()
    # The 12 MiB file went up in 5 MiB parts: S3 reports a multipart ETag ("...-3").
    assert s3.head_object(Bucket="weights", Key="run1/model_01000.pt")["ETag"].strip('"').endswith("-3")
    second = upload_files(files, "s3://weights/run1", s3=s3, chunk_mib=5)
    assert second.uploaded == [] and sorted(second.skipped) == sorted(p.name for p in files)
    files[2].write_bytes(b"more log lines")
    assert upload_files(files, "s3://weights/run1", s3=s3, chunk_mib=5).uploaded == ["metrics.jsonl"]


def test_sidecar_uploads_tensorboard_event_files_like_the_logs(endpoint, tmp_path):
    """The S3 sidecar's pass: TensorBoard's event files go up with the logs, and again whenever they grow."""
    import io

    from job.sidecar.sync import Syncer

    s3 = client(endpoint)
    s3.create_bucket(Bucket="events")
    events = tmp_path / "events.out.tfevents.1796000000.box.7.0"
    events.write_bytes(os.urandom(3000))
    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 0}\n')
    syncer = Syncer(tmp_path, "s3://events/run", s3, out=io.StringIO())
    syncer.sync_once()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="events")["Contents"])
    assert keys == ["run/events.out.tfevents.1796000000.box.7.0", "run/metrics.jsonl"]
    with open(events, "ab") as f:
        f.write(b"more records")
    syncer.sync_once()
    assert s3.get_object(Bucket="events", Key=f"run/{events.name}")["Body"].read() == events.read_bytes()


def test_fab_fetch_weights_to_s3(endpoint, tmp_path):
    """The whole path: box (real sshd) -> laptop dir -> S3 (moto server), twice; the second run moves nothing."""
    import subprocess
    import sys

    from conftest import ROOT
    from sshd import start_sshd

    srv = start_sshd(tmp_path / "sshd")
    try:
        box = tmp_path / "box"
        box.mkdir()
        (box / "model_00100.pt").write_bytes(os.urandom(2**20))
        client(endpoint).create_bucket(Bucket="ckpts")
        cmd = [sys.executable, "-m", "fabric", "fetch-weights", "--host", f"{srv.user}@{srv.host}", "--port", str(srv.port),
               "--key", str(srv.key_path), "--known-hosts", str(srv.known_hosts_path), "--weights-dir", str(box),
               "--to", str(tmp_path / "local"), "--s3", "s3://ckpts/run7", "--s3-endpoint", endpoint]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert "uploaded 1 files to s3://ckpts/run7, 0 already there" in first.stdout
        body = client(endpoint).get_object(Bucket="ckpts", Key="run7/model_00100.pt")["Body"].read()
        assert body == (box / "model_00100.pt").read_bytes()
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert "uploaded 0 files to s3://ckpts/run7, 1 already there" in second.stdout
        assert "testing" not in first.stdout + first.stderr + second.stdout + second.stderr  # credentials never printed
    finally:
        srv.stop()


def test_bad_urls_and_missing_bucket_are_one_line(endpoint, tmp_path):
    for bad in ("weights/run1", "s3://", "http://x"):
        with pytest.raises(UserError, match="not an S3 URL"):
            parse_s3_url(bad)
    p = tmp_path / "model_00001.pt"
    p.write_bytes(b"x")
    with pytest.raises(UserError, match="NoSuchBucket") as e:
        upload_files([p], "s3://no-such-bucket/x", s3=client(endpoint))
    assert "\n" not in str(e.value) and "testing" not in str(e.value)


def test_sidecar_survives_an_s3_outage_and_a_full_disk_then_finishes(tmp_path, disk, monkeypatch):
    """The S3 sidecar on the box: S3 unreachable at first, then no room for its .synced marker. Each is said once
    and retried; when both clear it uploads, marks, and exits after the trainer's "end" like any other run."""
    import json
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from sshd import free_port

    creds = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    log = disk(2**20) / "model_weights"
    log.mkdir()
    ckpt = log / "model_00010.pt"
    ckpt.write_bytes(os.urandom(65536))
    filler = log / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
    out = tmp_path / "sidecar.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(out, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "job.sidecar.sync", "--log-dir", str(log), "--s3", "s3://late/run",
                                 "--endpoint-url", f"http://127.0.0.1:{port}", "--interval", "0.2"], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)

    def wait_for(text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in out.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, out.read_text()
            time.sleep(0.1)

    server, started = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False), False
    try:
        wait_for("sync: error: cannot reach S3 for s3://late (EndpointConnectionError)")  # S3 down
        server.start()
        started = True
        client(f"http://127.0.0.1:{port}").create_bucket(Bucket="late")
        wait_for("No space left on device; retrying")  # uploaded, but the marker cannot be written
        filler.unlink()
        wait_for("sync: working again")
        with open(log / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"event": "end", "step": 10, "reason": "done"}) + "\n")
        assert proc.wait(timeout=60) == 0, out.read_text()
        s3 = client(f"http://127.0.0.1:{port}")
        body = s3.get_object(Bucket="late", Key="run/model_00010.pt")["Body"].read()
        assert body == ckpt.read_bytes()
        assert json.loads((log / ".synced-model_00010.pt").read_text())["sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        proc.kill()
        if started:
            server.stop()
    text = out.read_text()
    assert text.count("sync: error:") == 2, text  # each failure said once, not once per pass
    assert text.rstrip().endswith("sync: training ended and every checkpoint is in S3: exiting"), text
    assert not list(log.glob("*.tmp"))
