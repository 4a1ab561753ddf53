"""fetch-weights against a real OpenSSH server on loopback: incremental, resumable, verified."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from tqdm import tqdm

from conftest import ROOT, assert_one_line_error, grow
from infra.fetch import _download, fetch_weights
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
        sftp = c.sftp()
        digest = hashlib.sha256((box / name).read_bytes()).hexdigest()
        with pytest.raises(UserError, match=rf"no space left on the device for {local / name} \(\d+ KiB free, 1 MiB still "
                                            r"to copy\): make room there and run fetch-weights again; it goes on from the "
                                            rf"2 MiB in {name}.part"):
            _download(sftp, str(box / name), local / name, size, digest, tqdm(disable=True))
        part = local / f"{name}.part"
        assert part.stat().st_size > 0 and not (local / name).exists()
        kept = part.read_bytes()
        grow(local.parent, 8 * 2**20)
        fetch_weights(c, str(box), local, latest_only=True, progress=False)
    assert same_files(box, local, [name]) and (box / name).read_bytes().startswith(kept)
