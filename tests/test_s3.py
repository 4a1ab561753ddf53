"""S3 upload against a real S3 protocol server (moto's server mode, HTTP on loopback) through boto3."""

from __future__ import annotations

import hashlib
import os

import pytest
from moto.server import ThreadedMotoServer

from infra.s3 import client, parse_s3_url, upload_files
from job.errors import UserError


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
