"""`python -m job.prepare verify DIR`: re-read every shard and check it against the manifest (or, for shards that
build-nanogpt's fineweb.py wrote, which have no manifest, against the format alone)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from job import binshard
from job.errors import UserError
from job.prepare.common import MANIFEST, SHARD_NAME, default_workers, reason
from job.prepare.manifest import pending_files, read_manifest, temps, trainer_shards
from job.tokenizer import EOT, VOCAB_SIZE


def _scan(path: Path) -> dict:
    """One pass over a shard file: its sha256, length, dtype, first token, EOT count and largest token."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        shape, fortran, dtype = _read_header(path, f)
        header_len = f.tell()
        f.seek(0)
        digest.update(f.read(header_len))
        info = {"shape": shape, "dtype": dtype, "fortran": fortran, "tokens": 0, "eot": 0, "max": -1, "first": None}
        if dtype != np.dtype("<u2") or len(shape) != 1:
            return info
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            arr = np.frombuffer(chunk[: len(chunk) // 2 * 2], dtype="<u2")
            if info["first"] is None and len(arr):
                info["first"] = int(arr[0])
            info["tokens"] += len(arr)
            info["eot"] += int(np.count_nonzero(arr == EOT))
            info["max"] = max(info["max"], int(arr.max()) if len(arr) else -1)
            info["odd"] = len(chunk) % 2
    info["sha256"] = digest.hexdigest()
    return info


def _read_header(path: Path, f) -> tuple:
    """(shape, fortran, dtype) from a .npy header, or from a .bin one (llm.c's: job/binshard.py); f ends after it."""
    if path.suffix == ".bin":
        ntok, problem = binshard.read_header(path)
        if problem:
            raise ValueError(problem)
        f.seek(binshard.HEADER_BYTES)
        return (ntok,), False, np.dtype("<u2")
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _check(path: Path, entry: dict | None, shard_size: int | None, first: bool, last: bool) -> str | None:
    """What is wrong with one shard, or None. The first shard (val) and the last may be shorter than shard_size."""
    if not path.is_file():
        return "missing"
    try:
        info = _scan(path)
    except (ValueError, OSError) as e:
        return f"not a {path.suffix} shard ({reason(e)})"
    if info["dtype"] != np.dtype("<u2") or len(info["shape"]) != 1:
        return f"not a flat uint16 array (dtype {info['dtype']}, shape {info['shape']})"
    if info.get("odd") or info["tokens"] != info["shape"][0]:
        return f"truncated: the header says {info['shape'][0]:,} tokens, the file holds {info['tokens']:,}"
    if info["max"] >= VOCAB_SIZE:
        return f"token id {info['max']} is outside GPT-2's vocabulary"
    if info["tokens"] == 0:
        return "empty"
    short = first or last
    if shard_size is not None and (info["tokens"] > shard_size or (not short and info["tokens"] != shard_size)):
        return f"{info['tokens']:,} tokens, expected {'at most ' if short else ''}{shard_size:,}"
    if entry is None:
        return None
    return _against_manifest(info, entry)


def _against_manifest(info: dict, entry: dict) -> str | None:
    if info["tokens"] != entry["tokens"]:
        return f"{info['tokens']:,} tokens, the manifest says {entry['tokens']:,}"
    if info["sha256"] != entry["sha256"]:
        return f"sha256 {info['sha256'][:12]}... differs from the manifest's {entry['sha256'][:12]}..."
    if "start" not in entry:
        return None  # downloaded shards: their document ranges are not known, their hash is the hub's
    # Every document starts with EOT and no text encodes to EOT, so the EOTs count the documents starting here.
    (d0, o0), (d1, o1) = entry["start"], entry["end"]
    docs = d1 - d0 + (o1 > 0) - (o0 > 0)
    if info["eot"] != docs or (info["first"] == EOT) != (o0 == 0):
        return f"EOT structure broken: {info['eot']:,} EOT tokens, {docs:,} documents start in it per the manifest"
    return None


def _index_key(p: Path):
    m = SHARD_NAME.match(p.name)
    return (0, int(m["index"]), p.name) if m else (1, 0, p.name)


def _open_shard(p: Path):
    try:
        if p.suffix == ".bin":
            ntok, problem = binshard.read_header(p)
            return None if problem or not ntok else np.memmap(p, dtype="<u2", mode="r", offset=binshard.HEADER_BYTES, shape=(ntok,))
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None


def _listed(out: Path, manifest: dict | None) -> tuple[list[Path], list, int | None]:
    """The shards to check, their manifest entries (None without a manifest) and the shard size they should have."""
    if manifest is not None:
        entries = manifest["shards"]
        return [out / e["name"] for e in entries], entries, manifest["identity"].get("shard_size")  # None: downloaded
    # build-nanogpt's own shards (no manifest): names, dtype, sizes and the val shard's leading EOT
    on_disk = trainer_shards(out)
    if not on_disk:
        raise UserError(f"{out} has no shards (*train*.npy / *val*.npy, or .bin) to verify")
    paths = sorted(on_disk, key=_index_key)
    shard_size = max((len(a) for a in map(_open_shard, paths) if a is not None and a.ndim == 1), default=None)
    print(f"{out}: no {MANIFEST} (not made by job.prepare): checking dtype, sizes and EOT structure, no hashes")
    return paths, [None] * len(paths), shard_size


def _check_all(paths: list[Path], entries: list, shard_size: int | None, complete: bool) -> dict[str, str]:
    """Check the shards in parallel (hashing and reading release the GIL), one line each, in order."""
    problems: dict[str, str] = {}
    last = len(paths) - 1
    with ThreadPoolExecutor(min(8, default_workers())) as ex:
        results = ex.map(lambda i: _check(paths[i], entries[i], shard_size, i == 0, i == last and complete), range(len(paths)))
        for p, problem in zip(paths, results, strict=True):
            print(f"{p.name}: {'ok' if problem is None else 'BAD: ' + problem}", flush=True)
            if problem:
                problems[p.name] = problem
    return problems


def _strays(out: Path, paths: list[Path], manifest: dict | None, problems: dict[str, str]) -> None:
    """What the per-shard checks cannot see: a val shard without its leading EOT (no manifest), shards the manifest
    does not list, temp files of an interrupted write."""
    if manifest is None:
        first = _open_shard(paths[0]) if paths[0].name not in problems else None
        if first is not None and "val" in paths[0].name and len(first) and first[0] != EOT:
            problems[paths[0].name] = "does not start with EOT"
            print(f"{paths[0].name}: BAD: does not start with EOT (every document is preceded by EOT)")
    else:
        listed = {p.name for p in paths}
        for p in trainer_shards(out):
            if p.name not in listed:
                problems[p.name] = "not in the manifest"
                print(f"{p.name}: BAD: not in the manifest (written just before an interruption, or not ours); the "
                      "prepare command removes or redoes it")
    for p in pending_files(out):
        print(f"{p.name}: staged until the val split is decided (not a shard; the prepare command cuts the shards from it)")
    for p in temps(out):
        print(f"{p.name}: temp file of an interrupted write (not a shard; the prepare command removes it)")


def _both_splits(out: Path, paths: list[Path], manifest: dict | None) -> None:
    """The trainer reads a val shard and train shards (job.data.check_data_dir): a directory without either is refused
    here too, whatever its shards hold."""
    if manifest is not None and not manifest["complete"]:
        return  # an interrupted run: the summary says INCOMPLETE
    if manifest is not None and not paths:
        raise UserError(f"{out / MANIFEST} says the run finished but lists no shards: pass the prepare command --overwrite "
                        "to make them again")
    for split in ("val", "train"):
        if not any(split in p.name for p in paths):
            raise UserError(f"{out} has no {split} shard (*{split}*.npy or .bin), which the trainer needs: run the prepare "
                            f"command again with --overwrite, or copy the {split} shard in")


def verify(out_dir) -> bool:
    """Check every shard of out_dir and print one line each; True if all are good and the run is complete."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory: pass the --out of a prepare run")
    manifest = read_manifest(out)
    paths, entries, shard_size = _listed(out, manifest)
    _both_splits(out, paths, manifest)
    problems = _check_all(paths, entries, shard_size, manifest is None or manifest["complete"])
    _strays(out, paths, manifest, problems)
    incomplete = manifest is not None and not manifest["complete"]
    good = len(paths) - len([p for p in paths if p.name in problems])
    summary = f"{out}: {good} of {len(paths)} shards ok"
    if manifest is not None and manifest["complete"]:
        docs = f" from {manifest['documents']:,} documents" if manifest.get("documents") is not None else ""
        summary += f", {manifest['tokens']:,} tokens{docs}"
    if problems:
        first_bad = min(problems)
        summary += f"; bad: {', '.join(sorted(problems))}. Delete {first_bad} and run the prepare command again: it redoes the dataset from there"
    if incomplete:
        summary += "; INCOMPLETE: the prepare run was interrupted, run the same command again to finish it"
    print(summary)
    return not problems and not incomplete
