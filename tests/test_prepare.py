"""job.prepare on real files: shard layout, exact tokens, input formats, determinism, resume after a kill, verify, bad input."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# datasets reads these once, at import: never let a test reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import run_cli  # noqa: E402
from job.errors import UserError  # noqa: E402
from job.prepare import DELAY_ENV, MANIFEST, MemorySource, file_source, main, parquet_files, prepare, prepare_documents  # noqa: E402
from job.prepare.split import VAL_MAX, VAL_MIN, decided_after, val_size  # noqa: E402
from job.tokenizer import EOT, get_encoding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "job" / "assets" / "tinyshakespeare.txt"
# Varied lengths on purpose: empty, unicode, a literal "<|endoftext|>" (text, not the EOT token), and one document
# longer than several small shards.
DOCS = [
    "Hello world.",
    "",
    "naïve café — 日本語 🚀\n\ttabs and  spaces",
    "a literal <|endoftext|> inside a document is ordinary text",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 12,
]
DOCS += [f"document {i}: " + "word " * (i % 23) for i in range(60)]


def expected(docs) -> np.ndarray:
    # the reference stream, straight from tiktoken's Encoding: EOT, then the document's tokens, for each document in order
    enc = get_encoding()
    return np.array([t for d in docs for t in [EOT, *enc.encode_ordinary(d)]], dtype=np.uint16)


def check_shards(paths, prefix, shard_size, want, val=None):
    """The shards hold `want` in order, the val shard `val` tokens (default: a full shard), the others full ones."""
    names = [p.name for p in paths]
    assert names == [f"{prefix}_val_000000.npy"] + [f"{prefix}_train_{i:06d}.npy" for i in range(1, len(paths))]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(names + [MANIFEST])  # no temp files left behind
    shards = [np.load(p) for p in paths]
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    assert [len(s) for s in shards[:-1]] == [shard_size if val is None else val, *[shard_size] * (len(shards) - 2)][: len(shards) - 1]
    assert 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), want)
    manifest = json.loads((paths[0].parent / MANIFEST).read_text())
    assert manifest["complete"] and manifest["tokens"] == len(want)
    assert [s["name"] for s in manifest["shards"]] == names
    assert [s["sha256"] for s in manifest["shards"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    return manifest


def test_tinyshakespeare(tmp_path):
    paths = prepare(file_source([SHAKESPEARE]), tmp_path / "out", shard_size=100_000, workers=1)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    want = expected([text])
    assert len(paths) == -(-len(want) // 100_000) == 4
    check_shards(paths, "data", 100_000, want)
    assert get_encoding().decode(np.concatenate([np.load(p) for p in paths])[1:].tolist()) == text
    # build-nanogpt writes shards with np.save: ours are the very same bytes
    buf = io.BytesIO()
    np.save(buf, np.load(paths[-1]))
    assert paths[-1].read_bytes() == buf.getvalue()


def test_paragraphs_make_each_paragraph_of_a_text_file_a_document(tmp_path, capsys):
    text = "First, a line.\nIts second line.\n\nSecond paragraph.\n  \t\n\n\nThird, after blank lines with spaces.\n"
    (tmp_path / "plays.txt").write_text(text)
    out = tmp_path / "out"
    main(["text", str(tmp_path / "plays.txt"), "--paragraphs", "--out", str(out), "--shard-size", "8", "--workers", "1"])
    paragraphs = ["First, a line.\nIts second line.", "Second paragraph.", "Third, after blank lines with spaces.\n"]
    tokens = np.concatenate([np.load(p) for p in sorted(out.glob("data_*.npy"), key=lambda p: ("train" in p.name, p.name))])
    np.testing.assert_array_equal(tokens, expected(paragraphs))  # each paragraph after its own <|endoftext|>
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["documents"] == 3 and manifest["identity"]["paragraphs"] is True
    # The same file cut as one document is another prepare run: refused, the paragraph shards kept.
    with pytest.raises(SystemExit) as e:
        main(["text", str(tmp_path / "plays.txt"), "--out", str(out), "--shard-size", "8", "--workers", "1"])
    assert e.value.code == 2 and "differs in: paragraphs" in capsys.readouterr().err
    assert json.loads((out / MANIFEST).read_text()) == manifest


def test_val_split_rule():
    # small: the minimum, or the whole --shard-size below it (make demo's 50,000: every shard, val included, full)
    assert val_size(338_026, 100_000_000) == VAL_MIN == 100_000
    assert val_size(338_026, 50_000) == 50_000
    assert val_size(1121, 37) == 37
    # medium: a tenth of the corpus
    assert val_size(5_000_000, 100_000_000) == 500_000
    assert val_size(999_999_999, 100_000_000) == 99_999_999
    # huge: one full shard, as fineweb.py (FineWeb-Edu 10BT: the 100M val shard), and never more than VAL_MAX
    assert val_size(10_000_000_000, 100_000_000) == 100_000_000
    assert val_size(1_000_000_000, 100_000_000) == 100_000_000
    assert val_size(10_000_000_000, 500_000_000) == VAL_MAX == 100_000_000
    assert val_size(10_000_000_000, 1_000_000) == 1_000_000
    # how long the pipeline stages the stream before the rule no longer depends on the total
    assert decided_after(100_000_000) == 1_000_000_000
    assert decided_after(120_000) == 1_200_000
    assert decided_after(VAL_MIN) == decided_after(50_000) == 0
    for shard_size in (120_000, 100_000_000, 500_000_000):
        need = decided_after(shard_size)
        assert val_size(need, shard_size) == val_size(100 * need, shard_size) == min(shard_size, VAL_MAX)


def test_default_shard_size_splits_a_small_corpus(tmp_path, capsys):
    out = tmp_path / "out"
    paths = prepare(file_source([SHAKESPEARE]), out, workers=1)
    want = expected([SHAKESPEARE.read_text(encoding="utf-8")])
    assert [p.name for p in paths] == ["data_val_000000.npy", "data_train_000001.npy"]
    assert [len(np.load(p)) for p in paths] == [VAL_MIN, len(want) - VAL_MIN]
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in paths]), want)
    assert f"val split: the first 100,000 of {len(want):,} tokens (29.6%); train: the other {len(want) - VAL_MIN:,}" in capsys.readouterr().out
    assert run_verify(capsys, out)[0] == 0
    # a resume keeps the short val shard and redoes only the missing train shard
    before = paths[1].read_bytes()
    paths[1].unlink()
    mtime = paths[0].stat().st_mtime_ns
    assert prepare(file_source([SHAKESPEARE]), out, workers=1) == paths
    assert "resuming" in capsys.readouterr().out
    assert paths[0].stat().st_mtime_ns == mtime and paths[1].read_bytes() == before


def test_large_corpus_gets_a_full_val_shard(tmp_path, capsys):
    # over ten shards of 120,000 tokens (> VAL_MIN): the first full shard is val, exactly as fineweb.py cuts it
    files = []
    for i in range(4):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_bytes(SHAKESPEARE.read_bytes())
    paths = prepare(file_source(files), tmp_path / "out", 120_000, workers=2)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    check_shards(paths, "data", 120_000, expected([text] * 4))
    assert "val split: the first 120,000 tokens, a full shard (the corpus has at least 1,200,000)" in capsys.readouterr().out


def test_a_source_known_to_be_large_cuts_a_full_val_shard_without_holding_tokens_back(tmp_path, capsys):
    # a whole hub corpus (Source.large) is not counted first: val is one full shard from the first token on
    source = file_source([SHAKESPEARE])
    source.large = True
    paths = prepare(source, tmp_path / "out", 120_000, workers=1)
    want = expected([SHAKESPEARE.read_text(encoding="utf-8")])
    assert [len(np.load(p)) for p in paths] == [120_000, 120_000, len(want) - 240_000]
    assert "val split: the first 120,000 tokens, a full shard" in capsys.readouterr().out


@pytest.mark.slow
def test_bundled_corpus_with_default_sizes_trains(tmp_path):
    data, log = tmp_path / "data", tmp_path / "log"
    prep = run_cli("-m", "job.prepare", "text", SHAKESPEARE, "--out", data, timeout=120)
    assert prep.returncode == 0, prep.stderr
    assert "wrote 2 shards" in prep.stdout and "(1 val, 1 train)" in prep.stdout
    train = run_cli("-m", "job.train", "--preset", "tiny", "--max-steps", "3", "--data-dir", data, "--log-dir", log,
                    "--device", "cpu", "--sample-num", "0")
    assert train.returncode == 0, train.stderr
    assert "done: 3 steps" in train.stdout and "val loss" in train.stdout


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


# 1120: the corpus (1121 tokens) is one token more than the val shard, just enough for a train shard
@pytest.mark.parametrize("shard_size", [37, 1000, 1120])
def test_formats_give_identical_shards(tmp_path, shard_size):
    corpus, want = write_corpus(tmp_path / "corpus"), expected(DOCS)
    outputs = {}
    for fmt, files in corpus.items():
        paths = prepare(file_source(files, text_field="body"), tmp_path / fmt, shard_size, prefix="c", workers=1, batch_docs=5)
        check_shards(paths, "c", shard_size, want)
        outputs[fmt] = [p.read_bytes() for p in paths]
    assert all(o == outputs["txt"] for o in outputs.values())


def test_workers_identical_bytes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    files = corpus["txt"] + corpus["parquet"]  # a mixed list is tokenized in the order given
    # batches of 3 documents: many tasks in flight, returned in order by the pool
    runs = [prepare(file_source(files, "body"), tmp_path / f"w{w}", 101, workers=w, batch_docs=3) for w in (1, 2)]
    assert [p.name for p in runs[0]] == [p.name for p in runs[1]]
    assert [p.read_bytes() for p in runs[0]] == [p.read_bytes() for p in runs[1]]
    check_shards(runs[1], "data", 101, expected(DOCS + DOCS))


def test_overwrite_replaces_and_removes_stale(tmp_path):
    out = tmp_path / "out"
    prepare_documents(DOCS, out, 50, workers=1)
    assert len(list(out.glob("data_train_*.npy"))) > 3
    (out / "notes.md").write_text("keep me")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="different prepare run .*--overwrite"):
        prepare_documents(DOCS[:2], out, 50, workers=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused: nothing touched
    paths = prepare_documents(DOCS[:3], out, 5, prefix="small", workers=1, overwrite=True)
    assert sorted(out.iterdir()) == sorted(paths + [out / "notes.md", out / MANIFEST])  # old data_* shards gone, others kept
    want = expected(DOCS[:3])
    assert len(paths) == -(-len(want) // 5) > 1
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in paths]), want)


def test_shards_without_manifest_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "edufineweb_val_000000.npy", np.array([EOT, 1, 2], dtype=np.uint16))
    with pytest.raises(UserError, match="already has 1 shards .*--overwrite"):
        prepare_documents(DOCS, out, 50, workers=1)


def fineweb_like(d: Path, nfiles: int = 4, per_file: int = 40) -> list[str]:
    """Parquet files shaped like FineWeb-edu's (text plus metadata columns); returns the documents in order."""
    d.mkdir(parents=True)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    docs = []
    for k in range(nfiles):
        rows = [text[(k * per_file + i) * 997 % 900_000 :][: 40 + (k * per_file + i) * 131 % 1500] for i in range(per_file)]
        docs += rows
        table = pa.table({"text": rows, "id": [f"<urn:uuid:{k}-{i}>" for i in range(per_file)], "score": [3.2] * per_file,
                          "token_count": [len(r) // 4 for r in rows]})
        pq.write_table(table, d / f"{k:03d}_00000.parquet", row_group_size=16)
    return docs


def test_resume_redoes_from_first_damaged_shard_without_rereading_done_files(tmp_path):
    docs = fineweb_like(tmp_path / "pq")
    files = parquet_files([str(tmp_path / "pq")])
    ref = prepare(file_source(files), tmp_path / "ref", 300, prefix="edufineweb", workers=1, batch_docs=7)
    manifest = check_shards(ref, "edufineweb", 300, expected(docs))
    out = tmp_path / "out"
    prepare(file_source(files), out, 300, prefix="edufineweb", workers=1, batch_docs=7)
    # A shard that starts inside a document of the third file: the resume must skip two whole files and part of a document.
    k = next(i for i, s in enumerate(manifest["shards"]) if s["start"][1] > 0 and s["start"][0] > 2 * 40)
    (out / ref[k].name).unlink()
    (out / f".{ref[k + 1].name}.tmp").write_bytes(b"half a shard")  # what a kill during a write leaves
    (out / ref[k + 2].name).write_bytes(b"truncated")
    # Files before the resume point are not even opened: make the first two unreadable (same size, so the same source).
    for f in files[:2]:
        f.write_bytes(b"\0" * f.stat().st_size)
    paths = prepare(file_source(files), out, 300, prefix="edufineweb", workers=1, batch_docs=7)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in ref]
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in ref] + [MANIFEST])
    # Complete: a third run changes nothing.
    mtimes = [p.stat().st_mtime_ns for p in paths]
    prepare(file_source(files), out, 300, prefix="edufineweb", workers=1, batch_docs=7)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes


def cli(cmd: str, env=None, **kw) -> subprocess.Popen:
    """Start `python -m job.prepare CMD` (CMD split on spaces; test paths have none), offline, with its own HF cache."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    argv = [sys.executable, "-m", "job.prepare", *cmd.split()]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_fineweb_tokenizes_like_fineweb_edu_under_its_own_prefix(tmp_path):
    docs = fineweb_like(tmp_path / "pq", nfiles=2, per_file=10)
    paths = main(["fineweb", "--data-files", str(tmp_path / "pq"), "--out", str(tmp_path / "out"), "--shard-size", "2000",
                  "--workers", "1"])
    assert paths[0].name == "fineweb_val_000000.npy" and paths[1].name == "fineweb_train_000001.npy"
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in paths]), expected(docs))


@pytest.mark.slow  # seconds of real work (a kill and resume, a full export, a model trace): not the edit loop
def test_sigkill_then_resume_gives_identical_shards(tmp_path):
    docs = fineweb_like(tmp_path / "pq")
    ref = prepare(file_source(parquet_files([str(tmp_path / "pq")])), tmp_path / "ref", 300, prefix="edufineweb",
                  workers=1, batch_docs=7)
    out = tmp_path / "out"
    cmd = f"fineweb-edu --data-files {tmp_path}/pq --out {out} --shard-size 300 --workers 2 --batch-docs 7"
    # Each shard write pauses half-way (temp file on disk, not renamed), so the kill lands in the middle of one.
    kill_when(cmd, out, "12 shards and one mid-write", lambda m, tmps: len(m["shards"]) >= 12 and m.get("units") and tmps)
    m = json.loads((out / MANIFEST).read_text())
    assert not m["complete"] and 12 <= len(m["shards"]) < len(ref)
    assert list(out.glob(".*.npy.tmp")), "the kill should have caught a shard mid-write"
    verify_run = cli(f"verify {out}")
    stdout, _ = verify_run.communicate(timeout=60)
    assert verify_run.returncode == 1 and "INCOMPLETE" in stdout and "temp file of an interrupted write" in stdout

    proc = cli(cmd)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"resuming {out}: {len(m['shards'])} shards" in stdout
    assert f"from {len(docs)} documents" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in ref] + [MANIFEST])
    assert [(out / p.name).read_bytes() for p in ref] == [p.read_bytes() for p in ref]
    assert json.loads((out / MANIFEST).read_text())["shards"] == json.loads((tmp_path / "ref" / MANIFEST).read_text())["shards"]


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def kill_when(cmd: str, out: Path, what: str, ready) -> dict:
    """Run `python -m job.prepare CMD` with every shard write paused half-way, SIGKILL it (with its workers, like a lost
    machine) once ready(manifest, temp files) holds, and return the manifest it left."""
    proc = cli(cmd, {DELAY_ENV: "0.2"}, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                m = json.loads((out / MANIFEST).read_text())
            except (FileNotFoundError, ValueError):
                m = {"shards": [], "pending": [], "complete": False}
            if ready(m, list(out.glob(".*.npy.tmp"))):
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"not killed {what}: {stderr}"
    m = json.loads((out / MANIFEST).read_text())
    assert not m["complete"]
    for e in m["shards"] + m["pending"]:  # what the manifest lists is whole and right
        assert hashlib.sha256((out / e["name"]).read_bytes()).hexdigest() == e["sha256"], e["name"]
    return m


# Shards of 120,000 tokens, over VAL_MIN: the split waits for ten shards' worth of tokens (or the end), and the stream is
# staged until then. "small" (about 5.5 shards) ends first: a val shard of VAL_MIN tokens, the train shards cut from the
# staged ones at other positions. "large" (about 11.5 shards) decides a full val shard: the staged shards are the first
# shards as they are.
KILLS = {
    "small": (700, [
        ("one shard staged", lambda m, tmp: len(m["pending"]) >= 1),
        ("mid-write of the third staged shard", lambda m, tmp: len(m["pending"]) == 2 and tmp),
        ("three staged", lambda m, tmp: len(m["pending"]) >= 3),
        ("the val shard cut from the staged ones", lambda m, tmp: m["shards"] and m["pending"]),
        ("mid-write of a train shard cut from them", lambda m, tmp: len(m["shards"]) >= 3 and tmp),
    ]),
    "large": (1440, [
        ("two staged", lambda m, tmp: len(m["pending"]) >= 2),
        ("mid-write of the sixth staged shard", lambda m, tmp: len(m["pending"]) == 5 and tmp),
        ("nine staged, the split not decided yet", lambda m, tmp: len(m["pending"]) >= 9 and not m["shards"]),
        ("mid-write of a shard past the staged ones", lambda m, tmp: len(m["shards"]) >= 10 and tmp),
    ]),
}


@pytest.mark.slow  # a dozen fresh processes, each killed on purpose
@pytest.mark.parametrize("corpus", KILLS)
def test_sigkill_while_staging_or_cutting_then_resume_gives_identical_shards(tmp_path, corpus):
    per_file, kills = KILLS[corpus]
    docs = fineweb_like(tmp_path / "pq", per_file=per_file)
    ref_dir, out = tmp_path / "ref", tmp_path / "out"
    ref = prepare(file_source(parquet_files([str(tmp_path / "pq")])), ref_dir, 120_000, prefix="edufineweb", workers=1)
    want = expected(docs)
    check_shards(ref, "edufineweb", 120_000, want, val_size(len(want), 120_000))
    assert (len(np.load(ref[0])), len(ref)) == ((VAL_MIN, 6) if corpus == "small" else (120_000, 12))
    cmd = f"fineweb-edu --data-files {tmp_path}/pq --out {out} --shard-size 120000 --workers 2"
    for what, ready in kills:
        m = kill_when(cmd, out, what, ready)
        staged = {p.name for p in out.glob("edufineweb_pending_*.npy")}
        assert {e["name"] for e in m["pending"]} <= staged, what
        assert not any("train" in p.name or "val" in p.name for p in out.glob("*pending*"))  # never fed to the trainer
    proc = cli(cmd)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"resuming {out}: " in stdout and f"from {len(docs):,} documents" in stdout
    assert listing(out) == listing(ref_dir)  # every shard and the manifest, byte for byte; no staged or temp file left
    # On a slow disk (every write paused), from start to end: the shards are cut only from staged shards on disk.
    slow = cli(cmd.replace(str(out), str(tmp_path / "slow")), {DELAY_ENV: "0.2"})
    _, stderr = slow.communicate(timeout=120)
    assert slow.returncode == 0, stderr
    assert listing(tmp_path / "slow") == listing(ref_dir)


# Shards of 120,000 tokens: about nine (the split waits for the end of the corpus, and every shard is cut from the staged
# ones) and about eleven and a half (the split is decided after ten: the staged shards become the first ones as they are).
@pytest.mark.parametrize("ndocs", [3400, 4400])
def test_memory_stays_at_two_shards_while_the_split_waits(tmp_path, ndocs):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    docs = [text[i * 1009 % 1_000_000 :][: 600 + i * 37 % 900] for i in range(ndocs)]
    want, shard = expected(docs), 120_000
    assert (8 * shard < len(want) < decided_after(shard)) if ndocs == 3400 else len(want) > 11 * shard
    prepare(MemorySource(docs[:50]), tmp_path / "warm", 1000, workers=1)  # the imports a first run makes are not its data
    source = MemorySource(docs)
    tracemalloc.start()  # it counts numpy's buffers too
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        paths = prepare(source, tmp_path / "out", shard, workers=1, batch_docs=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    check_shards(paths, "data", shard, want, val_size(len(want), shard))
    # The shard being filled and the one being written, and a batch besides. Holding the stream back until the split is
    # decided would be every shard (the first case) or ten (the second).
    assert peak - before < 3 * 2 * shard, f"{(peak - before) / (2 * shard):.1f} shards' worth of memory"


def run_verify(capsys, d) -> tuple[int, str]:
    try:
        main(["verify", str(d)])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def test_verify(tmp_path, capsys):
    out = tmp_path / "out"
    paths = prepare_documents(DOCS, out, 40, prefix="edufineweb", workers=1)
    capsys.readouterr()
    code, text = run_verify(capsys, out)
    assert code == 0 and f"{len(paths)} of {len(paths)} shards ok" in text and "BAD" not in text
    # one flipped token (same size, so only the hash can tell), one truncated file, one shard not in the manifest
    data = bytearray(paths[2].read_bytes())
    data[-1] ^= 1
    paths[2].write_bytes(bytes(data))
    paths[4].write_bytes(paths[4].read_bytes()[:-6])
    np.save(out / "other_train_000009.npy", np.array([EOT, 5], dtype=np.uint16))
    code, text = run_verify(capsys, out)
    assert code == 1
    assert f"{paths[2].name}: BAD: sha256" in text
    assert f"{paths[4].name}: BAD: truncated" in text
    assert "other_train_000009.npy: BAD: not in the manifest" in text
    assert f"{len(paths) - 2} of {len(paths)} shards ok" in text and f"Delete {paths[2].name}" in text
    # A shard whose documents were cut differently than the manifest says: caught by the EOT count.
    (out / "other_train_000009.npy").unlink()
    paths[2].write_bytes(paths[3].read_bytes())
    m = json.loads((out / MANIFEST).read_text())
    m["shards"][2]["sha256"] = m["shards"][3]["sha256"]
    m["shards"][2]["start"] = [0, 0]
    (out / MANIFEST).write_text(json.dumps(m))
    code, text = run_verify(capsys, out)
    assert f"{paths[2].name}: BAD: EOT structure" in text
    # Without a manifest (build-nanogpt's own shards): dtype, sizes and EOT, no hashes.
    (out / MANIFEST).unlink()
    paths[4].unlink()
    for p in paths[5:]:
        p.unlink()
    np.save(paths[3], np.arange(40, dtype=np.int32))
    code, text = run_verify(capsys, out)
    assert code == 1 and "no manifest.json" in text and f"{paths[3].name}: BAD: not a flat uint16 array" in text
    assert f"{paths[0].name}: ok" in text and f"{paths[2].name}: ok" in text


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
        "full": (40, cli(f"fineweb-edu --dataset {repo} --out {tmp_path}/full --shard-size 64 --workers 2 --batch-docs 6", env)),
        "few": (
            7,
            cli(f"fineweb-edu --dataset {repo} --name sample-10BT --out {tmp_path}/few --shard-size 64 --max-docs 7 "
                "--workers 1 --progress-every 0", env),
        ),
    }
    for out, (n, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert f"from {n} documents" in stdout
        paths = sorted((tmp_path / out).glob("*.npy"), key=lambda p: int(p.stem[-6:]))  # val_000000 first, then train_000001...
        check_shards(paths, "edufineweb", 64, expected(docs[:n]))
        if out == "few":  # not a terminal: progress lines with documents (of the total), tokens, rate and ETA
            assert f"prepare: 7/7 (100.0%) docs | {len(expected(docs[:7])):,} tokens |" in stderr, stderr
            assert "M tok/s | ETA " in stderr


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
    "data_files_missing": ("fineweb-edu --data-files {tmp}/nowhere", "--data-files {tmp}/nowhere: no parquet files there"),
    "data_files_not_parquet": ("fineweb-edu --data-files {tmp}/ok.txt", "not a .parquet file"),
    "data_files_and_dataset": ("fineweb-edu --data-files {tmp}/ok.txt --dataset x", "pass one of them"),
    "existing_shards_fineweb_all": ("fineweb --out {tmp}/shards", "already has 2 shards"),
    "hub_unreachable_fineweb_all": ("fineweb --max-docs 1", "to stream HuggingFaceFW/fineweb (sample-10BT)"),
    "hub_offline_download": ("fineweb-gpt2", "HF_HUB_OFFLINE is set"),
    "bad_train_tokens": ("finewebedu-gpt2 --train-tokens -5", "--train-tokens"),
    "verify_no_dir": ("verify {tmp}/nowhere", "is not a directory"),
    "verify_no_shards": ("verify {tmp}", "has no shards"),
    "corpus_too_small": ("text {tmp}/ok.txt", "has 3 tokens, too few to split into val and train"),
}


def snapshot(*dirs: Path) -> dict:
    return {str(p): p.read_bytes() if p.is_file() else None for d in dirs for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "ok.txt").write_text("fine text")
    (tmp / "data.csv").write_text("text\nhello\n")
    (tmp / "empty.jsonl").write_text("")
    # the first row alone fills several shards, and the bad row is in the same batch: nothing is committed
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
        cmd = cmd.format(tmp=tmp) + ("" if "--out" in cmd or cmd.startswith("verify") else f" --out {out}")
        procs[name] = (cli(cmd, {"HF_HOME": str(tmp / "hf")}), snapshot(tmp / "shards", out), out)
    results = {}
    for name, (proc, before, out) in procs.items():
        _, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stderr, before, snapshot(tmp / "shards", out), tmp)
    return results


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(bad_runs, case):
    rc, stderr, before, after, tmp = bad_runs[case]
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert BAD[case][1].format(tmp=tmp) in lines[0], lines[0]
    assert after == before  # existing files untouched, no shards, manifest or temp files left behind
