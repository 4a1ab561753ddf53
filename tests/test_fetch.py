"""fetch-weights against a real OpenSSH server on loopback: incremental, resumable, verified."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from tqdm import tqdm

from conftest import ROOT, assert_one_line_error, grow
from delay_relay import DelayRelay
from infra.fetch import FetchReport, Part, RemoteFile, fetch_weights, transfer
from infra.ssh import connect, run
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


def test_a_box_without_openssl_stat_or_aes_gcm(tmp_path, box):
    """A box whose sshd offers no AES-GCM and whose PATH has neither openssl nor stat: the same fetch, through OpenSSH's
    client on chacha20 (no failed negotiation in sshd's log: no silent fall-back to paramiko), with coreutils' sha256sum
    and checkpoints cut and padded like logs; resumed and verified."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("sh", "bash", "cat", "tail", "head", "tr", "sha256sum", "true"):
        os.symlink(shutil.which(tool), bare / tool)
    srv = start_sshd(tmp_path / "sshd", extra_config=f"SetEnv PATH={bare}\nCiphers chacha20-poly1305@openssh.com,aes128-ctr\n")
    try:
        local = tmp_path / "local"
        local.mkdir()
        data = (box / "model_02000.pt").read_bytes()
        (local / "model_02000.pt.part").write_bytes(data[: 2**20])
        (local / "model_03000.pt.part").write_bytes(b"garbage" * 1000)
        with conn_for(srv) as c:
            assert "openssl" not in run(c, "command -v openssl stat; true").stdout
            with pytest.raises(UserError, match="model_03000.pt: the downloaded bytes do not match"):
                fetch_weights(c, str(box), local, progress=False)
            report = fetch_weights(c, str(box), local, progress=False)
        assert report.copied == ["model_03000.pt", "train.log"] and not list(local.glob("*.part"))
        assert same_files(box, local, ["model_01000.pt", "model_02000.pt", "model_03000.pt", "metrics.jsonl", "train.log"])
        for n in ("model_01000.pt", "model_02000.pt", "model_03000.pt"):
            assert (box / f".fetched-{n}").read_text() == hashlib.sha256((box / n).read_bytes()).hexdigest()
    finally:
        srv.stop()
    log = (tmp_path / "sshd" / "sshd.log").read_text()
    assert log.count("Accepted publickey") == 3 and "no matching cipher" not in log, log  # paramiko, then ssh for each fetch


def test_a_killed_fetch_goes_on_from_its_part_file(server, tmp_path):
    """`fab fetch-weights` killed (SIGKILL, nothing to clean up) in the middle of a checkpoint: no file under its final
    name, and the next run sends only the rest. A relay that delays every chunk keeps the copy slow enough to kill it
    half way."""
    box = tmp_path / "box"
    box.mkdir()
    name = "model_05000.pt"
    (box / name).write_bytes(os.urandom(24 * 2**20))
    local = tmp_path / "local"
    relay = DelayRelay(server.port, 0.1)
    known = tmp_path / "known_hosts"
    known.write_text(server.host_public_key_line.replace(f"]:{server.port} ", f"]:{relay.port} ") + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def fab(port, known_hosts):
        return [sys.executable, "-m", "fabric", "fetch-weights", "--host", f"{server.user}@{server.host}", "--port", str(port),
                "--key", str(server.key_path), "--known-hosts", str(known_hosts), "--weights-dir", str(box), "--to", str(local)]

    proc = subprocess.Popen(fab(relay.port, known), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = local / f"{name}.part"
    try:
        deadline = time.monotonic() + 120
        while not (part.exists() and part.stat().st_size >= 2**20):
            assert proc.poll() is None and time.monotonic() < deadline, "the fetch ended, or never started, before it could be killed"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
        relay.stop()
    have = part.stat().st_size
    assert 0 < have < 24 * 2**20 and not (local / name).exists()
    out = subprocess.run(fab(server.port, server.known_hosts_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"fetched 1 files ({(24 * 2**20 - have) / 2**20:.1f} MiB)" in out.stdout
    assert same_files(box, local, [name]) and not part.exists()
    assert (box / f".fetched-{name}").read_text() == hashlib.sha256((box / name).read_bytes()).hexdigest()


def test_a_checkpoint_removed_during_the_fetch_is_refused_and_the_rest_come_next_time(server, box, tmp_path):
    """Retention on the box removes a checkpoint after the listing: its place in the stream is zeros, refused (with the
    box's digest or without one), nothing of it is kept here, and the next fetch brings what is there."""
    from infra.fetch import remote_files

    local = tmp_path / "local"
    local.mkdir()
    with conn_for(server) as c:
        files = remote_files(c, str(box))
        gone = box / "model_01000.pt"
        known = hashlib.sha256(gone.read_bytes()).hexdigest()
        gone.unlink()
        names = ["model_01000.pt", "model_02000.pt"]
        with pytest.raises(UserError, match=r"could not read .*model_01000.pt on 127.0.0.1 to hash it \(removed meanwhile"):
            transfer(c, [Part(local / n, str(box / n), files[n]) for n in names], tqdm(disable=True), FetchReport())
        files["model_01000.pt"].sha256 = known  # the digest recorded before it went
        with pytest.raises(UserError, match="model_01000.pt: the downloaded bytes do not match the box's sha256"):
            transfer(c, [Part(local / n, str(box / n), files[n]) for n in names], tqdm(disable=True), FetchReport())
        assert list(local.iterdir()) == []
        report = fetch_weights(c, str(box), local, progress=False)
    assert "model_01000.pt" not in report.copied and same_files(box, local, ["model_02000.pt", "model_03000.pt"])


def test_the_fetched_markers_are_written_once(server, box, tmp_path):
    """Each checkpoint safe here gets its .fetched-NAME on the box, by the stream's own session; a fetch that moves
    nothing writes only the ones missing."""
    local = tmp_path / "local"
    ckpts = ["model_01000.pt", "model_02000.pt", "model_03000.pt"]

    def marker(n):
        return box / f".fetched-{n}"

    with conn_for(server) as c:
        fetch_weights(c, str(box), local, latest_only=True, progress=False)
        marker("model_03000.pt").unlink()
        fetch_weights(c, str(box), local, progress=False)  # two to copy, one complete here but not marked
        assert all(marker(n).read_text() == hashlib.sha256((box / n).read_bytes()).hexdigest() for n in ckpts)
        before = {n: marker(n).stat().st_mtime_ns for n in ckpts}
        marker("model_02000.pt").unlink()
        report = fetch_weights(c, str(box), local, progress=False)
    assert report.copied == [] and marker("model_02000.pt").read_text() == hashlib.sha256((box / "model_02000.pt").read_bytes()).hexdigest()
    assert all(marker(n).stat().st_mtime_ns == before[n] for n in ("model_01000.pt", "model_03000.pt"))


@pytest.mark.slow
def test_bench_reports_both_sizes_the_slow_link_and_the_ablations(tmp_path):
    """scripts/bench_fetch.py end to end on tiny sets: every line it promises, well-formed (timings are not judged)."""
    bench = [sys.executable, str(ROOT / "scripts" / "bench_fetch.py"), "--rounds", "1"]
    out = subprocess.run([*bench, "--sets", "2x1,1x2", "--latency-sets", "1x1", "--delay-ms", "5"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    line = r"  {} +[\d.]+- +[\d.]+ s   median +[\d.]+ MB/s   [\d.]+x scp \(rounds [\d.]+\)   CPU here +[\d.]+ s, box +[\d.]+ s"
    names = ("scp", "scp, AES-GCM", "fetch-weights", "fetch, recorded")
    for head in (r"2 x 1 MB checkpoints \(2 MB\), loopback", r"1 x 2 MB checkpoints \(2 MB\), loopback", r"1 x 1 MB checkpoints \(1 MB\), "
                 r"loopback \+ 10 ms round trip \((?:netem|relay in this process; its CPU counts as here)\)"):
        block = re.search(rf"^{head}, 1 rounds, interleaved\n((?:  .*\n)+)", out.stdout, re.M)
        assert block, out.stdout
        rows = block.group(1).splitlines()
        assert [r.split("  ")[1].strip() for r in rows[:4]] == list(names), rows
        assert all(re.fullmatch(line.format(re.escape(n)), r) for n, r in zip(names, rows, strict=False)), rows
        assert re.fullmatch(r"  re-run with nothing to move: [\d.]+ s", rows[4]), rows
    ablate = subprocess.run([*bench, "--sets", "1x1", "--ablations", "--baseline", "HEAD"], capture_output=True, text=True, timeout=600)
    assert ablate.returncode == 0, ablate.stderr
    rows = [r.split("  ")[1].strip() for r in ablate.stdout.splitlines() if re.match(r"  \S.* [\d.]+x scp \(rounds", r)]
    assert rows == ["scp", "fetch-weights", "- chacha20 (OpenSSH's default)", "- sha256sum on the box", "- tail | head",
                    "- a bytes object per read", "- no early write-back", "- no fsync", "- paramiko channel", "- logins after connecting",
                    "fetch-weights at HEAD"], ablate.stdout


def test_first_contact_logs_in_through_openssh_too(tmp_path):
    """`fab fetch-weights --accept-new-host-key` on a box not yet in known_hosts: the OpenSSH session starts once
    paramiko has verified and remembered the key, so it logs in as well, and the bytes do not fall back to paramiko."""
    srv = start_sshd(tmp_path / "sshd")
    try:
        box = tmp_path / "box"
        box.mkdir()
        (box / "model_01000.pt").write_bytes(os.urandom(2**20))
        local, known = tmp_path / "local", tmp_path / "known_hosts"
        cmd = [sys.executable, "-m", "fabric", "fetch-weights", "--host", f"{srv.user}@{srv.host}", "--port", str(srv.port),
               "--key", str(srv.key_path), "--known-hosts", str(known), "--accept-new-host-key", "--weights-dir", str(box), "--to", str(local)]
        out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert same_files(box, local, ["model_01000.pt"]) and known.read_text().split()[0] == f"[127.0.0.1]:{srv.port}"
    finally:
        srv.stop()
    log = (tmp_path / "sshd" / "sshd.log").read_text()
    assert log.count("Accepted publickey") == 2 and "preauth" not in log, log  # paramiko's login, then ssh's


def test_a_weights_dir_with_a_newline_in_its_name(server, tmp_path):
    """The waiting shells take their command as one line: for a path with a newline in it, both sessions start anew
    with the command as their own."""
    box = tmp_path / "box\nweights"
    box.mkdir()
    (box / "model_01000.pt").write_bytes(os.urandom(2**20))
    with conn_for(server) as c:
        report = fetch_weights(c, str(box), tmp_path / "local", progress=False)
    assert report.copied == ["model_01000.pt"] and same_files(box, tmp_path / "local", ["model_01000.pt"])
    assert (box / ".fetched-model_01000.pt").read_text() == hashlib.sha256((box / "model_01000.pt").read_bytes()).hexdigest()
