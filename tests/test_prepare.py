"""job.prepare on real files: shard layout, exact tokens, input formats, determinism, fineweb-edu, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# datasets reads these once, at import: never let a test reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from job.errors import UserError  # noqa: E402
from job.prepare import file_documents, prepare_documents  # noqa: E402
from job.tokenizer import EOT, get_encoding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "job" / "assets" / "tinyshakespeare.txt"
# Varied lengths on purpose: empty, unicode, and one document longer than several small shards.
DOCS = [
    "Hello world.",
    "",
    "naïve café — 日本語 🚀\n\ttabs and  spaces",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 12,
]
DOCS += [f"document {i}: " + "word " * (i % 23) for i in range(60)]


def expected(docs) -> np.ndarray:
    # the reference stream, straight from tiktoken's Encoding: EOT, then the document's tokens, for each document in order
    enc = get_encoding()
    return np.array([t for d in docs for t in [EOT, *enc.encode_ordinary(d)]], dtype=np.uint16)


def check_shards(paths, prefix, shard_size, want):
    names = [p.name for p in paths]
    assert names == [f"{prefix}_val_000000.npy"] + [f"{prefix}_train_{i:06d}.npy" for i in range(1, len(paths))]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(names)  # nothing else left behind (staging dir)
    shards = [np.load(p) for p in paths]
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    assert [len(s) for s in shards[:-1]] == [shard_size] * (len(shards) - 1) and 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), want)


def test_tinyshakespeare(tmp_path):
    paths = prepare_documents(file_documents([SHAKESPEARE]), tmp_path / "out", shard_size=100_000, workers=1)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    want = expected([text])
    assert len(paths) == -(-len(want) // 100_000) == 4
    check_shards(paths, "data", 100_000, want)
    assert get_encoding().decode(np.concatenate([np.load(p) for p in paths])[1:].tolist()) == text


def write_corpus(d: Path) -> dict[str, list[Path]]:
    """The same DOCS as .txt files (one per document), one .jsonl, one .json and two .parquet files."""
    d.mkdir()
    txt = []
    for i, doc in enumerate(DOCS):
        txt.append(d / f"doc{i:03d}.txt")
        txt[-1].write_bytes(doc.encode())  # bytes: no newline translation, the file is exactly the document
    (d / "c.jsonl").write_text("".join(json.dumps({"id": i, "body": doc}) + "\n" for i, doc in enumerate(DOCS)))
    (d / "c.json").write_text("\n".join(json.dumps({"body": doc}) for doc in DOCS))
    half = len(DOCS) // 2
    pq.write_table(pa.table({"body": DOCS[:half], "n": list(range(half))}), d / "a.parquet")
    pq.write_table(pa.table({"body": DOCS[half:]}), d / "b.parquet")
    return {"txt": txt, "jsonl": [d / "c.jsonl"], "json": [d / "c.json"], "parquet": [d / "a.parquet", d / "b.parquet"]}


@pytest.mark.parametrize("shard_size", [37, 1000, 10**6])
def test_formats_give_identical_shards(tmp_path, shard_size):
    corpus, want = write_corpus(tmp_path / "corpus"), expected(DOCS)
    outputs = {}
    for fmt, files in corpus.items():
        paths = prepare_documents(file_documents(files, text_field="body"), tmp_path / fmt, shard_size, prefix="c", workers=1)
        check_shards(paths, "c", shard_size, want)
        outputs[fmt] = [p.read_bytes() for p in paths]
    assert all(o == outputs["txt"] for o in outputs.values())


def test_workers_identical_bytes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    files = corpus["txt"] + corpus["parquet"]  # a mixed list is tokenized in the order given
    runs = [prepare_documents(file_documents(files, "body"), tmp_path / f"w{w}", 101, workers=w) for w in (1, 2)]
    assert [p.name for p in runs[0]] == [p.name for p in runs[1]]
    assert [p.read_bytes() for p in runs[0]] == [p.read_bytes() for p in runs[1]]
    check_shards(runs[1], "data", 101, expected(DOCS + DOCS))


def test_overwrite_replaces_and_removes_stale(tmp_path):
    out = tmp_path / "out"
    prepare_documents(DOCS, out, 50, workers=1)
    assert len(list(out.glob("data_train_*.npy"))) > 3
    (out / "notes.md").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        prepare_documents(DOCS[:2], out, 50, workers=1)
    paths = prepare_documents(DOCS[:3], out, 5, prefix="small", workers=1, overwrite=True)
    assert sorted(out.iterdir()) == sorted(paths + [out / "notes.md"])  # the old data_* shards are gone, other files kept
    want = expected(DOCS[:3])
    assert len(paths) == -(-len(want) // 5) > 1
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in paths]), want)


@pytest.mark.parametrize("prefix", ["interval", "my_train", "a/b", ""])
def test_bad_prefix(tmp_path, prefix):
    with pytest.raises(UserError, match="prefix"):
        prepare_documents(DOCS, tmp_path, 10, prefix=prefix, workers=1)


def test_bad_files_in_process(tmp_path):
    # more of the same failures as the CLI cases below, without ~3 s of process start-up each
    (tmp_path / "empty.txt").write_text("")
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "nofield.parquet")
    (tmp_path / "nofield.json").write_text(json.dumps([{"body": "a"}, {"text": "b"}]))
    out = tmp_path / "out"
    for files, field, want in [
        (["empty.txt"], "text", "only empty documents"),
        (["nofield.parquet"], "body", "nofield.parquet row 1 has no text field 'body' \\(fields: content\\)"),
        (["empty.txt", "nofield.json"], "body", "nofield.json row 2 has no text field 'body'"),
    ]:
        with pytest.raises(UserError, match=want):
            prepare_documents(file_documents([tmp_path / f for f in files], field), out, 10, workers=1)
        assert list(out.iterdir()) == []  # the staging dir is gone


def cli(cmd: str, env=None) -> subprocess.Popen:
    """Start `python -m job.prepare CMD` (CMD split on spaces; test paths have none), offline, with its own HF cache."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    argv = [sys.executable, "-m", "job.prepare", *cmd.split()]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fineweb_edu_local_dataset_dir(tmp_path):
    # Laid out like the hub repo: a README whose YAML front matter declares the sample-10BT config over sample/10BT/*.parquet.
    repo = tmp_path / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*.parquet\n"
        "- config_name: default\n  data_files:\n  - split: train\n    path: data/*.parquet\n---\n# local copy\n"
    )
    docs = [f"fineweb doc {i} " + "educational text " * (i % 7) for i in range(40)]
    for k in range(2):
        table = pa.table({"text": docs[k * 20 : (k + 1) * 20], "id": [f"<urn:{k}:{i}>" for i in range(20)], "score": [3.1] * 20})
        pq.write_table(table, repo / f"sample/10BT/{k:03d}_00000.parquet")
    env = {"HF_HOME": str(tmp_path / "hf")}
    runs = {
        "full": (40, cli(f"fineweb-edu --dataset {repo} --out {tmp_path}/full --shard-size 64 --workers 2", env)),
        "few": (
            7,
            cli(f"fineweb-edu --dataset {repo} --name sample-10BT --out {tmp_path}/few --shard-size 64 --max-docs 7", env),
        ),
    }
    for out, (n, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert f"from {n} documents" in stdout
        paths = sorted((tmp_path / out).glob("*.npy"), key=lambda p: int(p.stem[-6:]))  # val_000000 first, then train_000001...
        check_shards(paths, "edufineweb", 64, expected(docs[:n]))


# name -> (command line, text the error line must contain); every case gets --out {tmp}/out_NAME unless it names one
BAD = {
    "missing_file": ("text {tmp}/ok.txt {tmp}/nope.txt", "does not exist"),
    "unsupported_ext": ("text {tmp}/data.csv", "unsupported file type '.csv'"),
    "empty_jsonl": ("text {tmp}/empty.jsonl", "no documents"),
    "missing_field_jsonl": ("text {tmp}/nofield.jsonl --shard-size 100", "row 2 has no text field 'text'"),
    "malformed_jsonl": ("text {tmp}/bad.jsonl", "cannot read"),
    "existing_shards": ("text {tmp}/ok.txt --out {tmp}/shards", "already has 2 shards"),
    "existing_shards_fineweb": ("fineweb-edu --out {tmp}/shards", "already has 2 shards"),
    "hub_unreachable": ("fineweb-edu --max-docs 1", "cannot reach the Hugging Face hub"),
    "bad_shard_size": ("text {tmp}/ok.txt --shard-size 0", "--shard-size"),
    "bad_prefix": ("text {tmp}/ok.txt --prefix interval", "--prefix"),
}


def snapshot(*dirs: Path) -> dict:
    return {str(p): p.read_bytes() if p.is_file() else None for d in dirs for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "ok.txt").write_text("fine text")
    (tmp / "data.csv").write_text("text\nhello\n")
    (tmp / "empty.jsonl").write_text("")
    # the first row alone fills several shards, so the failure comes after shards were written (to staging)
    (tmp / "nofield.jsonl").write_text(json.dumps({"text": "long " * 500}) + "\n" + json.dumps({"body": "x"}) + "\n")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    (tmp / "shards").mkdir()
    (tmp / "shards" / "data_val_000000.npy").write_bytes(b"old val shard")
    (tmp / "shards" / "data_train_000001.npy").write_bytes(b"old train shard")
    # All cases at once: each process pays ~2 s of interpreter and import start-up, which would add up run one by one.
    procs = {}
    for name, (cmd, _) in BAD.items():
        out = tmp / f"out_{name}"
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        cmd = cmd.format(tmp=tmp) + ("" if "--out" in cmd else f" --out {out}")
        procs[name] = (cli(cmd, {"HF_HOME": str(tmp / "hf")}), snapshot(tmp / "shards", out), out)
    results = {}
    for name, (proc, before, out) in procs.items():
        _, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stderr, before, snapshot(tmp / "shards", out))
    return results


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(bad_runs, case):
    rc, stderr, before, after = bad_runs[case]
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert BAD[case][1] in lines[0], lines[0]
    assert after == before  # existing files untouched, no shards or staging dir left behind
