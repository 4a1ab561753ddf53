"""The output directory: its shard files and DIR/manifest.json, the record of what a prepare run has committed.

The manifest lists every committed shard with its token count, sha256 and the document range it covers
(start and end as [document, token offset in it]), the row counts of the source files read so far, and whether
the run finished. A file the manifest does not list is never a shard the run vouches for.

Until the val split is decided, the stream is committed as staged shards (`pending`: the same fields, and `at`, the
stream position of the first token) that the final shards are then cut from. The committed shards followed by the
staged ones that reach past them are the stream from its first token on, without a gap.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from job.errors import UserError
from job.prepare.common import MANIFEST, MANIFEST_VERSION, PENDING_NAME, SHARD_NAME, reason


def npy_header(n: int) -> bytes:
    """The .npy header np.save writes for n uint16 tokens (so the shard is byte-identical to build-nanogpt's)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)),
                                               "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


def write_manifest(out: Path, manifest: dict) -> None:
    """Replace out's manifest atomically (temp name, fsync, rename)."""
    path = out / MANIFEST
    tmp = path.with_name(f".{path.name}.tmp")
    # one line per key and per shard: small, and readable with `cat` even for a hundred shards
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items() if k != "shards")
    shards = ",\n".join(f"  {json.dumps(s)}" for s in manifest.get("shards", []))
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{{\n{head},\n \"shards\": [\n{shards}\n ]\n}}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if m.get("version") != MANIFEST_VERSION or not isinstance(m.get("shards"), list):
            raise ValueError(f"version {m.get('version')!r}")
        problem = _missing(m)
    except (ValueError, AttributeError) as e:
        raise UserError(f"{path} is damaged or not job.prepare's ({reason(e)}): pass --overwrite to start over") from e
    if problem:
        raise UserError(f"{path} is damaged or edited by hand ({problem}): restore it, or pass the prepare command --overwrite "
                        "to start over")
    return m


# What each kind of manifest holds (a hand edit may have dropped any of it): downloaded shards (format "bin") and
# tokenized ones; `tokens` and `documents` of a tokenized run are written when it completes.
KEYS = {"version": int, "identity": dict, "complete": bool, "shards": list}
BIN_KEYS = {"revision": (str, type(None)), "train_tokens": (int, type(None)), "tokens": int}
NPY_KEYS = {"units": list}
SHARD_KEYS = {"name": str, "tokens": int, "sha256": str}
PENDING_KEYS = {**SHARD_KEYS, "at": int, "start": list, "end": list}  # a staged shard (older manifests have no `pending`)


def _missing(m: dict) -> str | None:
    """The first key a manifest lacks (or holds with the wrong type), in words, or None."""
    downloaded = isinstance(m.get("identity"), dict) and m["identity"].get("format") == "bin"
    keys = {**KEYS, **(BIN_KEYS if downloaded else NPY_KEYS)}
    if not downloaded and m.get("complete"):
        keys.update(tokens=int, documents=int)
    for key, kind in keys.items():
        if key not in m:
            return f"no key {key!r}"
        if not isinstance(m[key], kind):
            return f"{key!r} is {type(m[key]).__name__}"
    shard_keys = {**SHARD_KEYS, **({"bytes": int} if downloaded else {"start": list, "end": list})}
    if not isinstance(m.get("pending", []), list):
        return f"'pending' is {type(m['pending']).__name__}"
    for what, entries, keys in (("shard", m["shards"], shard_keys), ("staged shard", m.get("pending", []), PENDING_KEYS)):
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                return f"{what} {i + 1} is not an object"
            for key, kind in keys.items():
                if not isinstance(entry.get(key), kind):
                    return f"{what} {i + 1} ({entry.get('name', 'no name')}) has {'no key' if key not in entry else 'a bad'} {key!r}"
    return None


def trainer_shards(out: Path) -> list[Path]:
    # what job.data.list_shards would feed the trainer (not imported: job.data pulls in torch)
    return sorted(p for p in out.iterdir() if p.suffix in (".npy", ".bin") and ("train" in p.name or "val" in p.name) and p.is_file())


def temps(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(".*.tmp") if p.is_file())


def pending_files(out: Path, prefix: str | None = None) -> list[Path]:
    """The staged shards on disk (of one prefix, or of any)."""
    return sorted(p for p in out.glob("*_pending_*.npy") if (m := PENDING_NAME.match(p.name)) and prefix in (None, m["prefix"])
                  and p.is_file())


def check_out_dir(out_dir, overwrite: bool = False) -> None:
    """The refusals that need no knowledge of the source (cheap: run them before resolving a hub dataset)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory: choose another --out")
    if out.is_dir() and not overwrite and read_manifest(out) is None:
        old = trainer_shards(out)
        if old:
            raise UserError(f"--out {out} already has {len(old)} shards ({old[0].name}, ...) not made by a resumable "
                            "job.prepare run: pass --overwrite or choose another --out")


def open_out(out: Path, identity: dict, prefix: str, overwrite: bool) -> dict:
    """The manifest to continue from: a fresh one, or the earlier run's, cut at its first missing or damaged shard."""
    check_out_dir(out, overwrite)
    fresh = {"version": MANIFEST_VERSION, "identity": identity, "complete": False, "units": [], "pending": [], "shards": []}
    if not out.is_dir():
        return fresh
    if overwrite:
        stale = trainer_shards(out) + pending_files(out) + temps(out) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
        for p in stale:  # stale shards of an earlier run would otherwise be mixed into this one
            p.unlink()
        if stale:
            print(f"--overwrite: removed {len(stale)} files of an earlier run from {out}")
        return fresh
    manifest = read_manifest(out)
    if manifest is None:
        return fresh
    if manifest.get("identity") != identity:
        theirs = manifest.get("identity") or {}
        diffs = [k for k in sorted(set(identity) | set(theirs)) if identity.get(k) != theirs.get(k)]
        raise UserError(f"--out {out} holds shards of a different prepare run (differs in: {', '.join(diffs)}): run that "
                        "command again to resume it, pass --overwrite to replace it, or choose another --out")
    manifest["shards"] = _intact(out, manifest, identity["shard_size"])
    manifest["pending"] = _intact_pending(out, manifest, identity["shard_size"])
    _clear_unlisted(out, manifest, prefix)
    return manifest


def _intact(out: Path, manifest: dict, shard_size: int) -> list[dict]:
    """The manifest's shards up to the first one missing or damaged on disk (marking the run unfinished if any is)."""
    kept = []
    for i, entry in enumerate(manifest["shards"]):
        p = out / entry["name"]
        last = manifest["complete"] and i == len(manifest["shards"]) - 1
        # the val shard (the first) may be shorter than shard_size: the split sized it to the corpus
        full = entry["tokens"] == shard_size or last or (i == 0 and entry["tokens"] <= shard_size)
        if not (full and _whole(p, entry["tokens"])):
            print(f"{p.name} is missing or damaged: redoing the dataset from there", file=sys.stderr)
            manifest["complete"] = False
            break
        kept.append(entry)
    return kept


def _whole(p: Path, tokens: int) -> bool:
    return p.is_file() and p.stat().st_size == len(npy_header(tokens)) + 2 * tokens


def _intact_pending(out: Path, manifest: dict, shard_size: int) -> list[dict]:
    """The staged shards a resume can read from: intact, in a row, and reaching back to where the committed ones end."""
    kept: list[dict] = []
    for entry in manifest.get("pending", []):
        at = kept[-1]["at"] + kept[-1]["tokens"] if kept else entry["at"]
        if not (entry["at"] == at and entry["tokens"] == shard_size and _whole(out / entry["name"], shard_size)):
            print(f"{entry['name']} is missing or damaged: tokenizing again from there", file=sys.stderr)
            break
        kept.append(entry)
    if kept and kept[0]["at"] > sum(s["tokens"] for s in manifest["shards"]):
        return []  # a committed shard was damaged, and the staged tokens it held are gone: all is made again from there
    return kept


def _clear_unlisted(out: Path, manifest: dict, prefix: str) -> None:
    """Remove what an interrupted run left that its manifest does not list; refuse shards that are not its own."""
    names = {e["name"] for e in manifest["shards"]}
    for p in trainer_shards(out):
        if p.name in names:
            continue
        m = SHARD_NAME.match(p.name)
        if not (m and m["prefix"] == prefix):
            raise UserError(f"--out {out} has a shard {p.name} that its prepare run did not write: move it away or pass --overwrite")
        p.unlink()  # ours but unlisted: written before a crash could record it; it is redone identically
    staged = {e["name"] for e in manifest["pending"]}
    for p in pending_files(out, prefix):
        if p.name not in staged:
            p.unlink()  # staged, then cut into shards (or written before a crash could record it)
    for p in temps(out):
        p.unlink()  # a shard or manifest interrupted mid-write
