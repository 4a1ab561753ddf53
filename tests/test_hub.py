"""job.prepare's hub sources (fineweb-gpt2, finewebedu-gpt2) against a local server speaking the Hugging Face hub's
file protocol over real HTTP (tests/hub_server.py), with real huggingface_hub and real .bin files cut from the bundled
corpus: only the shards a run needs, pinned to one commit, verified, resumed, retried, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error
from hub_server import COMMIT, HubServer, make_repo
from job import binshard, contract
from job.data import ShardLoader, list_shards, load_shard
from job.errors import UserError

SPEC = contract.HUB_SHARDS["finewebedu-gpt2"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> list[Path]:
    return make_repo(tmp_path_factory.mktemp("hub") / "finewebedu", SPEC.prefix)  # 30K val, 60K train shards, 7 files


@pytest.fixture
def hub(repo, tmp_path):
    server = HubServer({SPEC.repo: repo[0].parent}, token="hf_good")
    yield server
    server.stop()


def prepare(hub, out, *args, token: str | None = None, timeout=120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(Path(out).parent / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "job.prepare", "finewebedu-gpt2", "--out", str(out), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def shard_gets(hub) -> list[str]:
    return sorted(r[1] for r in hub.gets() if r[1].endswith(".bin"))


def test_downloads_only_the_shards_the_run_needs_verified_and_pinned(hub, repo, tmp_path):
    out = tmp_path / "data"
    proc = prepare(hub, out, "--train-tokens", 100_000)
    assert proc.returncode == 0, proc.stderr
    names = [p.name for p in repo[:3]]  # val + two 60K train shards hold 100K train tokens; the third is never asked for
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(names)
    assert shard_gets(hub) == sorted(names)
    for p in repo[:3]:
        assert (out / p.name).read_bytes() == p.read_bytes()
    manifest = json.loads((out / contract.PREPARE_MANIFEST).read_text())
    assert manifest["complete"] and manifest["revision"] == COMMIT and manifest["train_tokens"] == 100_000
    assert [s["name"] for s in manifest["shards"]] == names
    assert [s["sha256"] for s in manifest["shards"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in repo[:3]]
    assert manifest["tokens"] == 150_000 and "ready in" in proc.stdout and "sha256 ok" in proc.stdout
    # every file after the first contact comes from the commit it resolved to, never from a moving `main`
    revisions = [(r[0], r[4]) for r in hub.requests if r[1].endswith(".bin")]
    assert revisions[0] == ("HEAD", "main") and {rev for _, rev in revisions[1:]} == {COMMIT}

    # the trainer's loader reads them, and verify checks them against the manifest
    assert [p.name for p in list_shards(out, "train")] == names[1:]
    np.testing.assert_array_equal(load_shard(out / names[1]), np.fromfile(repo[1], dtype="<u2", offset=binshard.HEADER_BYTES))
    verify = subprocess.run([sys.executable, "-m", "job.prepare", "verify", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 0 and "3 of 3 shards ok, 150,000 tokens" in verify.stdout, verify.stdout + verify.stderr

    # again: nothing is fetched; asking for more fetches only what is missing
    before = len(hub.requests)
    again = prepare(hub, out, "--train-tokens", 100_000)
    assert again.returncode == 0 and "already complete" in again.stdout and len(hub.requests) == before
    more = prepare(hub, out, "--train-tokens", 150_000)
    assert more.returncode == 0, more.stderr
    assert shard_gets(hub) == sorted(names + [repo[3].name])


@pytest.mark.parametrize("corpus", sorted(set(contract.HUB_SHARDS) - {"finewebedu-gpt2"}))
def test_every_other_hub_corpus_downloads_under_its_own_repo_and_prefix(corpus, tmp_path):
    """The speedrun recipes' corpus (modded-nanogpt's FineWeb shards) comes by the same code as the default one's, from
    its own repo and under its own file prefix: what a recipe's card names is what is fetched."""
    spec = contract.HUB_SHARDS[corpus]
    files = make_repo(tmp_path / "hub" / corpus, spec.prefix)
    server = HubServer({spec.repo: files[0].parent}, token="hf_good")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
        out = tmp_path / "data"
        proc = subprocess.run([sys.executable, "-m", "job.prepare", corpus, "--out", str(out), "--train-tokens", "60000"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in out.glob("*.bin")) == sorted(p.name for p in files[:2])
        assert all((out / p.name).read_bytes() == p.read_bytes() for p in files[:2])
        assert {r[1].split("/")[-1] for r in server.gets() if r[1].endswith(".bin")} == {p.name for p in files[:2]}
    finally:
        server.stop()


def test_without_train_tokens_it_fetches_every_shard_up_to_the_end_of_the_dataset(hub, repo, tmp_path):
    out = tmp_path / "all"
    proc = prepare(hub, out, "--workers", 3)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(p.name for p in repo)
    manifest = json.loads((out / contract.PREPARE_MANIFEST).read_text())
    assert manifest["complete"] and manifest["tokens"] == sum(len(load_shard(p)) for p in repo)
    # the shards hold the corpus in order: EOT first, as every document starts
    assert load_shard(out / repo[0].name)[0] == 50256
    loader = ShardLoader(out, "train", 4, 64)
    x, y = loader.next_batch()
    assert x.shape == (4, 64) and (x[:, 1:] == y[:, :-1]).all()

    # a shard damaged on disk later: verify names it, and once it is deleted the same command fetches it alone again
    bad = out / repo[2].name
    raw = bytearray(bad.read_bytes())
    raw[5000] ^= 1
    bad.write_bytes(bytes(raw))
    verify = subprocess.run([sys.executable, "-m", "job.prepare", "verify", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 1 and f"{bad.name}: BAD: sha256" in verify.stdout and f"Delete {bad.name}" in verify.stdout
    bad.unlink()
    gets = shard_gets(hub)
    again = prepare(hub, out)
    assert again.returncode == 0 and bad.read_bytes() == repo[2].read_bytes(), again.stderr
    assert shard_gets(hub) == sorted(gets + [bad.name])


def test_rate_limits_and_server_errors_are_retried_and_a_dropped_transfer_resumes(hub, repo, tmp_path):
    val, train = repo[0].name, repo[1].name
    hub.fail[val] = [429, 503]  # the HEAD that resolves the commit
    hub.fail[train] = [502]
    hub.cut[train] = 5000  # the first transfer of the train shard stops after 5,000 bytes
    out = tmp_path / "flaky"
    proc = prepare(hub, out, "--train-tokens", 1)
    assert proc.returncode == 0, proc.stderr
    assert "HTTP 429 from the hub; trying again" in proc.stderr and "HTTP 502 from the hub; trying again" in proc.stderr
    assert (out / train).read_bytes() == repo[1].read_bytes()
    assert len(hub.gets(train)) == 2 and not (out / repo[2].name).exists()


def test_a_refused_token_is_one_line(hub, tmp_path):
    out = tmp_path / "refused"
    proc = prepare(hub, out, token="hf_wrong")
    line = assert_one_line_error(proc, "refused the Hugging Face token", "HF_TOKEN")
    assert "hf_wrong" not in line
    assert {r[2] for r in hub.requests if r[1].endswith(".bin")} == {"Bearer hf_wrong"}  # the token the user has is the one sent
    ok = prepare(hub, tmp_path / "granted", "--train-tokens", 1, token="hf_good")
    assert ok.returncode == 0, ok.stderr
    hub.require_token = True
    assert_one_line_error(prepare(hub, tmp_path / "anonymous"), "refused an anonymous download", "set HF_TOKEN")


def test_a_shard_that_does_not_match_the_hubs_hash_is_deleted_and_named(hub, repo, tmp_path):
    hub.corrupt.add(repo[1].name)
    out = tmp_path / "corrupt"
    proc = prepare(hub, out, "--train-tokens", 1, "--workers", 1)
    assert_one_line_error(proc, repo[1].name, "sha256", "run the same command again")
    assert not (out / repo[1].name).exists() and (out / repo[0].name).exists()
    manifest = json.loads((out / contract.PREPARE_MANIFEST).read_text())
    assert not manifest["complete"] and [s["name"] for s in manifest["shards"]] == [repo[0].name]
    hub.corrupt.clear()
    again = prepare(hub, out, "--train-tokens", 1)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr
    assert len(hub.gets(repo[0].name)) == 1  # the verified val shard is kept, not fetched again


def test_no_such_dataset_and_bad_flags_are_one_line(hub, tmp_path):
    other = HubServer({})
    try:
        assert_one_line_error(prepare(other, tmp_path / "x"), SPEC.repo)
    finally:
        other.stop()
    assert_one_line_error(prepare(hub, tmp_path / "y", "--train-tokens", 0), "--train-tokens")
    (tmp_path / "file").write_text("")
    assert_one_line_error(prepare(hub, tmp_path / "file"), "not a directory")
    npy = tmp_path / "npy"
    npy.mkdir()
    (npy / "edufineweb_train_000001.npy").write_bytes(b"")
    assert_one_line_error(prepare(hub, npy), "--overwrite")


# ---- the .bin format in the trainer's loader ----------------------------------------------------------------

def test_bin_shards_load_as_flat_uint16_maps_and_bad_ones_are_one_line(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    binshard.write(tmp_path / "x_val_000000.bin", tokens[:1000])
    binshard.write(tmp_path / "x_train_000001.bin", tokens)
    arr = load_shard(tmp_path / "x_train_000001.bin")
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr.ndim == 1
    np.testing.assert_array_equal(arr, tokens)
    raw = (tmp_path / "x_train_000001.bin").read_bytes()
    assert raw[:12] == np.array([20240520, 1, 5000], dtype="<i4").tobytes() and len(raw) == 1024 + 2 * 5000
    (tmp_path / "cut_train_000002.bin").write_bytes(raw[:3000])
    with pytest.raises(UserError, match=r"truncated \(3,000 bytes on disk, its header describes 11,024\)"):
        load_shard(tmp_path / "cut_train_000002.bin")
    (tmp_path / "junk_train_000003.bin").write_bytes(b"\x00" * 2048)
    with pytest.raises(UserError, match="not a .bin shard"):
        load_shard(tmp_path / "junk_train_000003.bin")
    assert [p.suffix for p in list_shards(tmp_path, "train")] == [".bin"] * 3


def test_a_shard_bad_on_the_hub_itself_is_named_as_such_not_fetched_again_and_again(repo, tmp_path):
    """Bytes that match the hub's sha256 but hold a token outside the vocabulary: another download gives the same."""
    import shutil

    bad_repo = tmp_path / "bad-repo"
    shutil.copytree(repo[0].parent, bad_repo)
    tokens = np.fromfile(repo[1], dtype="<u2", offset=binshard.HEADER_BYTES).copy()
    tokens[100] = 60000
    binshard.write(bad_repo / repo[1].name, tokens)
    server = HubServer({SPEC.repo: bad_repo})
    try:
        out = tmp_path / "data"
        line = assert_one_line_error(prepare(server, out, "--train-tokens", 1, "--workers", 1), repo[1].name, "60000",
                                     "bad on the hub itself", "another corpus", "report it")
        assert "run the same command again" not in line
        assert not (out / repo[1].name).exists() and (out / repo[0].name).exists()
    finally:
        server.stop()
