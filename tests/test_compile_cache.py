"""The compile cache's key and its checks, on real directories; the trainer's use of it is in test_train.py
(a warm run reuses it, a foreign entry is ignored) and test_supervisor.py (--runs N compiles once)."""

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from job import compile_cache, contract
from job.compile_cache import KEY_FILE, cache_key, dir_name, prepare, root_for, why_not
from job.errors import file_system_error


def job_sha256() -> str:
    """job/'s code by its own definition: every .py file and contract.env, by path and bytes, in path order."""
    package = Path(compile_cache.__file__).parent
    code = (p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts and (p.suffix == ".py" or p.name == "contract.env"))
    files = sorted(code, key=lambda p: p.relative_to(package).as_posix())
    h = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        h.update(f"{p.relative_to(package).as_posix()}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def test_the_key_is_torch_cuda_the_gpu_model_the_recipe_the_code_and_a_cpus_vector_isa():
    key = cache_key("speedrun", "cpu")
    assert key == {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": "cpu", "recipe": "speedrun", "code": job_sha256(),
                   "cpu_isa": torch.backends.cpu.get_cpu_capability()}
    assert cache_key("gpt2", "cpu")["recipe"] == "gpt2" and cache_key("gpt2", "mps")["gpu"] == "mps"
    assert "cpu_isa" not in cache_key("gpt2", "mps")  # a GPU's kernels are not C++ for the host CPU
    # Each part alone gives another directory; the name starts readable.
    names = {dir_name({**key, part: "other"}) for part in key} | {dir_name(key)}
    assert len(names) == len(key) + 1
    assert dir_name(key).startswith(f"speedrun-torch{torch.__version__.replace('+', '_')}-cpu-") and dir_name(dict(key)) == dir_name(key)


def test_the_root_is_the_persistent_file_system_where_it_is_mounted_else_the_log_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ROOT_ENV, raising=False)
    monkeypatch.setattr(contract, "PERSISTENT", str(tmp_path / "not-mounted"))
    assert root_for(str(tmp_path / "log")) == tmp_path / "log" / contract.COMPILE_CACHE_DIR
    (tmp_path / "mounted").mkdir()
    monkeypatch.setattr(contract, "PERSISTENT", str(tmp_path / "mounted"))
    assert root_for(str(tmp_path / "log")) == Path(contract.COMPILE_CACHE_ROOT)
    assert Path(contract.COMPILE_CACHE_ROOT).parent == Path(contract._C["PERSISTENT"])  # what the launcher mounts
    monkeypatch.setenv(compile_cache.ROOT_ENV, str(tmp_path / "elsewhere"))
    assert root_for(str(tmp_path / "log")) == tmp_path / "elsewhere"


def test_the_users_directory_wins_and_one_torch_set_meanwhile_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ROOT_ENV, str(tmp_path / "root"))
    keyed = str((tmp_path / "root" / dir_name(cache_key("gpt2", "cpu"))).absolute())
    # Unset when the trainer started (""), then set by torch to its default when it first looked: the keyed directory.
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "torch-default"))
    assert compile_cache.use(str(tmp_path / "log"), "gpt2", "cpu", user_dir="") == keyed
    assert os.environ[compile_cache.ENV] == keyed and (Path(keyed) / KEY_FILE).is_file()
    # Set by the user, when the trainer started or (without user_dir) now: used as it is, and nothing is created.
    assert compile_cache.use(str(tmp_path / "log2"), "gpt2", "cpu", user_dir=str(tmp_path / "mine")) == str(tmp_path / "mine")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine2"))
    assert compile_cache.use(str(tmp_path / "log3"), "gpt2", "cpu") == str(tmp_path / "mine2")
    assert os.environ[compile_cache.ENV] == str(tmp_path / "mine2")
    assert not any((tmp_path / p).exists() for p in ("mine", "mine2", "log", "log2", "log3"))


def test_a_new_directory_records_its_key_and_a_matching_one_is_kept(tmp_path):
    key, said = cache_key("gpt2", "cpu"), []
    path = prepare(tmp_path, key, say=lambda *a, **k: said.append(a[0]))
    assert path == tmp_path / dir_name(key) and json.loads((path / KEY_FILE).read_text()) == key
    (path / "fxgraph").mkdir()
    (path / "fxgraph" / "entry").write_text("compiled")
    assert prepare(tmp_path, key, say=lambda *a, **k: said.append(a[0])) == path
    assert (path / "fxgraph" / "entry").read_text() == "compiled" and said == []
    # An empty directory (made by hand) gets its key, and nothing is left beside it.
    empty = tmp_path / "other-root" / dir_name(key)
    empty.mkdir(parents=True)
    assert prepare(tmp_path / "other-root", key) == empty and json.loads((empty / KEY_FILE).read_text()) == key
    assert [p.name for p in (tmp_path / "other-root").iterdir()] == [empty.name] and said == []
    # A file where the directory goes: the error names it, as the trainer's one line for ENOTDIR does (job.errors).
    blocked = tmp_path / "blocked-root" / dir_name(key)
    blocked.parent.mkdir()
    blocked.write_text("not a directory")
    with pytest.raises(NotADirectoryError) as e:
        prepare(tmp_path / "blocked-root", key)
    assert e.value.filename == str(blocked) and file_system_error(e.value).startswith(f"{blocked}: a part of this path is a file")
    assert blocked.read_text() == "not a directory" and [p.name for p in blocked.parent.iterdir()] == [blocked.name]


def test_a_stale_foreign_or_corrupt_directory_is_never_loaded_and_says_why_in_one_line(tmp_path):
    key = cache_key("gpt2", "cpu")
    path, said = tmp_path / dir_name(key), []
    cases = [
        (
            json.dumps({**key, "torch": "2.0.0", "gpu": "NVIDIA A100"}),
            f"it was made for another key (torch '2.0.0', this run {key['torch']!r}; gpu 'NVIDIA A100', this run 'cpu')",
        ),
        ("{half a key", "its key.json is unreadable (JSONDecodeError)"),
        ("[1, 2]", "its key.json is unreadable (not an object)"),
        (None, "it records no key (key.json is missing)"),
    ]
    for text, reason in cases:
        path.mkdir(exist_ok=True)
        (path / "entry").write_text("a kernel of another build")
        if text is not None:
            (path / KEY_FILE).write_text(text)
        assert why_not(path, key) == reason
        said.clear()
        assert prepare(tmp_path, key, say=lambda *a, **k: said.append(a[0])) == path
        assert said == [f"compile cache {path} ignored, not loaded: {reason}; compiling afresh into a new one"]
        assert sorted(p.name for p in path.iterdir()) == [KEY_FILE] and json.loads((path / KEY_FILE).read_text()) == key
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the ignored one is gone, not left aside
        (path / KEY_FILE).unlink()


def test_ranks_that_make_the_directory_at_the_same_moment_share_one(tmp_path, monkeypatch):
    """Every rank of a run prepares the directory as it starts. The new directory lands whole, its key in it, so a rank
    never sees it without one (and moves it aside from under the writer, which then lost its key file and ended the
    rank): here the other rank's lands between this one's making its own and renaming it in, and both use that one."""
    key, said, other = cache_key("gpt2", "cpu"), [], []
    rename = os.rename

    def the_other_rank_lands_first(src, dst):
        if not other:
            other.append(None)
            other[0] = prepare(tmp_path, key, say=lambda *a, **k: said.append(a[0]))
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", the_other_rank_lands_first)
    path = prepare(tmp_path, key, say=lambda *a, **k: said.append(a[0]))
    assert other == [path] and said == []
    assert json.loads((path / KEY_FILE).read_text()) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing moved aside, no temporary file left


def test_a_rank_that_moves_aside_the_new_directory_another_made_meanwhile_puts_it_back(tmp_path, monkeypatch):
    """Two ranks find the same stale directory. One moves it aside, says why and makes a new one, in which Inductor
    starts writing, before the other's move: what that one moved is the new directory, which it puts back, silently."""
    key, said, other = cache_key("gpt2", "cpu"), [], []
    path = tmp_path / dir_name(key)
    path.mkdir()
    (path / "entry").write_text("a kernel of another build")  # files and no key: stale
    judge = compile_cache.why_not

    def the_other_rank_goes_between(p, k):
        reason = judge(p, k)
        if not other:
            other.append(None)
            other[0] = prepare(tmp_path, key, say=lambda *a, **kw: said.append(a[0]))
            (path / "fxgraph").write_text("compiled by the other rank")
        return reason

    monkeypatch.setattr(compile_cache, "why_not", the_other_rank_goes_between)
    assert prepare(tmp_path, key, say=lambda *a, **kw: said.append(a[0])) == path == other[0]
    assert said == [f"compile cache {path} ignored, not loaded: it records no key (key.json is missing); compiling afresh into a new one"]
    assert sorted(p.name for p in path.iterdir()) == ["fxgraph", KEY_FILE] and json.loads((path / KEY_FILE).read_text()) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_directory_another_rank_moves_aside_while_this_one_looks_counts_as_absent(tmp_path, monkeypatch):
    key = cache_key("gpt2", "cpu")
    path = tmp_path / dir_name(key)
    path.mkdir()
    (path / "entry").write_text("a kernel of another build")
    read = Path.read_text

    def moved_meanwhile(self, *args, **kwargs):
        if self == path / KEY_FILE:
            os.rename(path, tmp_path / "aside")  # the other rank's move, between this one's two looks
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", moved_meanwhile)
    assert why_not(path, key) is None


def _prepare_together(root, barrier, results):
    barrier.wait()
    try:
        results.put(str(prepare(root, cache_key("gpt2", "cpu"), say=lambda *a, **k: None)))
    except BaseException as e:  # noqa: BLE001  (what a rank would have died of)
        results.put(repr(e))


def test_ranks_starting_together_on_a_stale_or_absent_directory_all_use_the_one_they_end_with(tmp_path):
    """Real processes, released together, as the ranks of one run start: whichever interleaving the machine gives, each
    gets the directory, which holds its key and nothing else, with nothing left beside it."""
    ctx = multiprocessing.get_context("fork")
    key = cache_key("gpt2", "cpu")
    for trial in range(12):
        root = tmp_path / str(trial)
        path = root / dir_name(key)
        if trial % 2:
            path.mkdir(parents=True)
            (path / "entry").write_text("a kernel of another build")  # stale: no key
        barrier, results = ctx.Barrier(8), ctx.Queue()
        ranks = [ctx.Process(target=_prepare_together, args=(root, barrier, results)) for _ in range(8)]
        for r in ranks:
            r.start()
        got = [results.get(timeout=60) for _ in ranks]
        for r in ranks:
            r.join(timeout=60)
        assert got == [str(path)] * 8, got
        assert [p.name for p in root.iterdir()] == [path.name] and [p.name for p in path.iterdir()] == [KEY_FILE]
        assert json.loads((path / KEY_FILE).read_text()) == key
