"""fetch-weights against a real OpenSSH server on loopback: incremental, resumable, verified."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from tqdm import tqdm

from conftest import ROOT, assert_one_line_error, grow
from infra.fetch import FetchReport, Part, RemoteFile, fetch_weights, transfer
from infra.ssh import connect
from job.errors import UserError
from sshd import start_sshd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield srv
    srv.stop()


@pytest.fixture
def box(tmp_path):
    """The box's weights dir: three checkpoints and the logs, as the trainer leaves them."""
    d = tmp_path / "box" / "model_weights"
    d.mkdir(parents=True)
    for step in (1000, 2000, 3000):
        (d / f"model_{step:05d}.pt").write_bytes(os.urandom(3 * 2**20 + step))
    (d / "metrics.jsonl").write_text('{"event": "train", "step": 0, "loss": 10.9}\n')
    (d / "train.log").write_text("step 0 | loss 10.9\n")
    (d / "events.out.tfevents.1796000000.box.7.0").write_bytes(os.urandom(5000))  # TensorBoard's, fetched like a log
    (d / "wandb").mkdir()  # W&B's own directory stays on the box
    (d / ".model_04000.pt.tmp123").write_bytes(b"half a checkpoint")  # a save in progress: never fetched
    return d


def conn_for(server):
    return connect(f"{server.user}@{server.host}", port=server.port, key=str(server.key_path), known_hosts=str(server.known_hosts_path))


def same_files(a, b, names):
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_fetch_copies_everything_then_nothing(server, box, tmp_path):
    local = tmp_path / "local"
    with conn_for(server) as c:
        first = fetch_weights(c, str(box), local, progress=False)
        second = fetch_weights(c, str(box), local, progress=False)
    names = ["events.out.tfevents.1796000000.box.7.0", "metrics.jsonl", "model_01000.pt", "model_02000.pt", "model_03000.pt", "train.log"]
    assert sorted(first.copied) == names and sorted(p.name for p in local.iterdir()) == names
    assert same_files(box, local, names)
    assert second.copied == [] and second.bytes_transferred == 0 and sorted(second.skipped) == names


def test_interrupted_transfer_resumes_from_the_part_file(server, box, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    data = (box / "model_02000.pt").read_bytes()
    (local / "model_02000.pt.part").write_bytes(data[: 2**20])  # what a killed transfer leaves
    with conn_for(server) as c:
        report = fetch_weights(c, str(box), local, progress=False)
    assert (local / "model_02000.pt").read_bytes() == data and not (local / "model_02000.pt.part").exists()
    sizes = sum((box / n).stat().st_size for n in report.copied)
    assert report.bytes_transferred == sizes - 2**20  # the first MiB was not sent again


def test_corrupt_part_is_detected_and_the_next_run_repairs_it(server, box, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "model_01000.pt.part").write_bytes(b"garbage" * 1000)
    with conn_for(server) as c:
        with pytest.raises(UserError, match="do not match"):
            fetch_weights(c, str(box), local, progress=False)
        assert not (local / "model_01000.pt").exists() and not (local / "model_01000.pt.part").exists()
        fetch_weights(c, str(box), local, progress=False)
    assert same_files(box, local, ["model_01000.pt", "model_02000.pt", "model_03000.pt"])


def test_latest_only_and_never_overwrite_a_different_local_checkpoint(server, box, tmp_path):
    local = tmp_path / "local"
    with conn_for(server) as c:
        report = fetch_weights(c, str(box), local, latest_only=True, progress=False)
        assert sorted(report.copied) == ["events.out.tfevents.1796000000.box.7.0", "metrics.jsonl", "model_03000.pt", "train.log"]
        (local / "model_03000.pt").write_bytes(b"another run's checkpoint")
        with pytest.raises(UserError, match="differs"):
            fetch_weights(c, str(box), local, progress=False)
        with pytest.raises(UserError, match="does not exist"):
            fetch_weights(c, str(box / "nope"), local, progress=False)
    assert (local / "model_03000.pt").read_bytes() == b"another run's checkpoint"


def test_fab_fetch_weights_task(server, box, tmp_path):
    local = tmp_path / "local"
    cmd = [sys.executable, "-m", "fabric", "fetch-weights", "--host", f"{server.user}@{server.host}", "--port", str(server.port),
           "--key", str(server.key_path), "--known-hosts", str(server.known_hosts_path), "--weights-dir", str(box), "--to", str(local)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fetched 6 files" in out.stdout and same_files(box, local, ["model_03000.pt"])
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "fetched 0 files (0.0 MiB)" in again.stdout and "6 already complete" in again.stdout
    bad = subprocess.run([*cmd[:5], "root@127.0.0.1", "--port", "1", "--to", str(local)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert_one_line_error(bad)


def test_fetch_that_cannot_fit_is_refused_before_any_transfer(server, box, tmp_path, disk):
    local = disk(5 * 2**20) / "weights"  # one 3 MiB checkpoint fits, three do not
    with conn_for(server) as c:
        with pytest.raises(UserError, match=r"weights has \d+ MiB free and this fetch needs 9 MiB \(6 files\): make room "
                                            r"there, fetch --latest-only, or fetch --to a disk with room"):
            fetch_weights(c, str(box), local, progress=False)
        assert list(local.iterdir()) == []
        report = fetch_weights(c, str(box), local, latest_only=True, progress=False)
    assert sorted(report.copied) == ["events.out.tfevents.1796000000.box.7.0", "metrics.jsonl", "model_03000.pt", "train.log"]
    assert same_files(box, local, report.copied)


def test_disk_filling_during_a_transfer_keeps_the_part_and_the_next_fetch_goes_on(server, box, tmp_path, disk):
    # Something else fills the disk after the free-space check: the write itself fails.
    local = disk(2 * 2**20) / "weights"
    local.mkdir()
    name, size = "model_03000.pt", (box / "model_03000.pt").stat().st_size
    with conn_for(server) as c:
        digest = hashlib.sha256((box / name).read_bytes()).hexdigest()
        with pytest.raises(UserError, match=rf"no space left on the device for {local / name} \(\d+ KiB free, 1 MiB still "
                                            r"to copy\): make room there and run fetch-weights again; it goes on from the "
                                            rf"2 MiB in {name}.part"):
            part = Part(local / name, str(box / name), RemoteFile(size, 0, digest))
            transfer(c, [part], tqdm(disable=True), FetchReport())
        part = local / f"{name}.part"
        assert part.stat().st_size > 0 and not (local / name).exists()
        kept = part.read_bytes()
        grow(local.parent, 8 * 2**20)
        fetch_weights(c, str(box), local, latest_only=True, progress=False)
    assert same_files(box, local, [name]) and (box / name).read_bytes().startswith(kept)


@pytest.mark.parametrize("ssh", [None, "#!/bin/sh\necho 'Permission denied (publickey).' >&2\nexit 255\n"])
def test_paramiko_channel_where_ssh_is_missing_or_cannot_log_in(server, box, tmp_path, monkeypatch, ssh):
    """A laptop without OpenSSH's client, or whose ssh cannot log in as paramiko did (another key, its own ssh_config):
    the same stream over a paramiko channel, resumed and verified alike."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if ssh:
        (bin_dir / "ssh").write_text(ssh)
        (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    local = tmp_path / "local"
    local.mkdir()
    data = (box / "model_02000.pt").read_bytes()
    (local / "model_02000.pt.part").write_bytes(data[: 2**20])
    with conn_for(server) as c:
        report = fetch_weights(c, str(box), local, progress=False)
    assert same_files(box, local, ["model_01000.pt", "model_02000.pt", "model_03000.pt", "metrics.jsonl"])
    assert report.bytes_transferred == sum((box / n).stat().st_size for n in report.copied) - 2**20


def test_a_digest_recorded_on_the_box_is_used_and_a_stale_one_ignored(server, box, tmp_path):
    """The S3 sidecar's .synced-NAME (newer than the checkpoint) stands for the box's sha256: a wrong one there makes the
    copy fail verification, which proves it was used; one older than the checkpoint (another run's) is ignored."""
    name = "model_03000.pt"
    marker = box / f".synced-{name}"
    marker.write_text(json.dumps({"url": "s3://b/p/" + name, "sha256": "0" * 64, "size": (box / name).stat().st_size}))
    local = tmp_path / "local"
    with conn_for(server) as c:
        with pytest.raises(UserError, match=f"{name}: the downloaded bytes do not match the box's sha256"):
            fetch_weights(c, str(box), local, latest_only=True, progress=False)
        assert not (local / name).exists()
        old = (box / name).stat().st_mtime - 60
        os.utime(marker, (old, old))
        report = fetch_weights(c, str(box), local, latest_only=True, progress=False)
    assert name in report.copied and same_files(box, local, [name])
    assert (box / f".fetched-{name}").read_text() == hashlib.sha256((box / name).read_bytes()).hexdigest()


def test_a_log_that_grows_during_the_fetch_comes_as_listed(server, box, tmp_path):
    """Files travel in one stream, each cut at its listed size: a log appended to after the listing cannot shift the
    checkpoints that follow it."""
    from infra.fetch import remote_files

    local = tmp_path / "local"
    local.mkdir()
    with conn_for(server) as c:
        files = remote_files(c, str(box))
        listed = (box / "metrics.jsonl").read_bytes()
        with open(box / "metrics.jsonl", "a") as f:
            f.write('{"event": "train", "step": 1, "loss": 10.1}\n' * 1000)
        names = ["metrics.jsonl", "model_01000.pt"]
        report = FetchReport()
        transfer(c, [Part(local / n, str(box / n), files[n]) for n in names], tqdm(disable=True), report)
    assert (local / "metrics.jsonl").read_bytes() == listed and same_files(box, local, ["model_01000.pt"])
    assert report.copied == names
