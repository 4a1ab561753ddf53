"""Shards already tokenized on the Hugging Face hub, downloaded instead of made: `python -m job.prepare fineweb-gpt2
--out DIR [--train-tokens N]` (and finewebedu-gpt2; the table is job.contract.HUB_SHARDS).

modded-nanogpt's maintainers publish FineWeb and FineWeb-edu tokenized with GPT-2's tokenizer in llm.c's .bin format
(job/binshard.py), 100M tokens a shard: {prefix}_val_000000.bin, then {prefix}_train_000001.bin, ... Fetching them
takes minutes where tokenizing takes an hour of a big box.

- Only what the run needs: the val shard, then train shards until they hold --train-tokens (all of them without it).
  How many that is follows from the headers of the shards fetched, so a dataset of smaller shards works too; the
  first index the hub does not have is the end of the dataset.
- Pinned: the first contact resolves the revision to a commit, recorded in the manifest; every file, now and on a
  resume, comes from that commit.
- Verified: the size the hub announced (huggingface_hub checks it), the header against the file size, every token
  inside GPT-2's vocabulary, and the sha256 against the hub's (an LFS file's ETag is its sha256).
- Resumable: a file cut short resumes where it stopped (huggingface_hub keeps the partial file under DIR/.cache); a
  verified shard is recorded in DIR/manifest.json and never fetched again.
- Rate limits: anonymous downloads are throttled; answers 429 and 5xx and dropped connections are retried with
  backoff (the server's Retry-After when it sends one). A token (HF_TOKEN or the hub's token file) lifts the limit;
  a refused one is one line.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job import binshard, contract
from job.errors import UserError, check_output_path, http_url
from job.fsutil import retry_advice, write_failure
from job.hub_token import hf_token
from job.prepare.common import MANIFEST, MANIFEST_VERSION, reason
from job.prepare.manifest import read_manifest, trainer_shards, write_manifest
from job.tokenizer import VOCAB_SIZE

REVISION = "main"
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
TRIES = 6  # attempts per file: about two minutes of backoff in all before giving up
BACKOFF_S = 2.0  # the first wait; it doubles, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 60.0
WORKERS = 4  # files fetched at once: one HTTP stream rarely fills a big box's link


def shard_file(spec: contract.HubShards, index: int) -> str:
    return f"{spec.prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def check_environment() -> None:
    """Settings that no retry can fix, refused before the first request (huggingface_hub reads them at import): an
    HF_ENDPOINT that is not an http(s) URL, a token that cannot be sent in an HTTP header."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        http_url(endpoint, "HF_ENDPOINT", "set it to the hub's URL (e.g. https://huggingface.co), or unset it")
    hf_token()


def _hf():
    import huggingface_hub  # imported late: --help and argument errors need not pay for it
    from huggingface_hub.utils import disable_progress_bars

    if not sys.stderr.isatty():
        disable_progress_bars()  # \r-bars in a log are noise: one line per shard instead
    return huggingface_hub


@dataclass
class Fetched:
    index: int
    entry: dict | None  # the manifest entry; None: the hub has no such file (the dataset ends before it)


class Retry(Exception):
    """A failure worth another try (rate limit, server error, dropped connection), with the wait the server asked."""

    def __init__(self, what: str, wait_s: float | None = None):
        super().__init__(what)
        self.wait_s = wait_s


def _classify(e: BaseException, spec: contract.HubShards, name: str) -> BaseException:
    """A huggingface_hub/httpx failure as Retry (try again) or UserError (one line); others pass through."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    endpoint = _hf().constants.ENDPOINT
    if isinstance(e, OfflineModeIsEnabled):
        return UserError(f"cannot download {name} from {spec.repo}: HF_HUB_OFFLINE is set; unset it, or prepare the data elsewhere")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status in RETRY_STATUSES:
            after = e.response.headers.get("Retry-After")
            return Retry(f"HTTP {status}", float(after) if after and after.isdigit() else None)
        if status in (401, 403) and _hf().get_token():
            return UserError(f"the Hugging Face hub ({endpoint}) refused the Hugging Face token for {spec.repo} (HTTP {status}): "
                             "check HF_TOKEN or the token file (`hf auth login`), or unset it to download anonymously")
        if status in (401, 403):
            return UserError(f"the Hugging Face hub ({endpoint}) refused an anonymous download of {spec.repo} (HTTP {status}): "
                             "set HF_TOKEN or run `hf auth login`")
        return UserError(f"cannot download {name} from {spec.repo} at {endpoint}: {reason(e)}")
    cause = e.__cause__ or e.__context__
    if isinstance(e, LocalEntryNotFoundError) and cause is not None:
        return _classify(cause, spec, name)  # no connection: huggingface_hub says "not cached", the cause says why
    if type(e).__module__.startswith("httpx") or isinstance(e, (ConnectionError, TimeoutError)):
        return Retry(f"{type(e).__name__}: {str(e)[:200]}")
    return e


def _with_retries(fn, spec: contract.HubShards, name: str, log=sys.stderr):
    """fn() retried on Retry with exponential backoff; the last failure is one line."""
    for attempt in range(1, TRIES + 1):
        try:
            return fn()
        except UserError:
            raise
        except Exception as e:
            err = _classify(e, spec, name)
            if err is e:
                raise
            if not isinstance(err, Retry):
                raise err from e
            if attempt == TRIES:
                raise UserError(f"the Hugging Face hub at {_hf().constants.ENDPOINT} still fails ({err}) for {name} of {spec.repo} "
                                f"after {TRIES} tries: check network access and run the same command later (it resumes); a token "
                                "(HF_TOKEN) lifts the anonymous rate limit") from e
            delay = err.wait_s if err.wait_s is not None else min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
            print(f"{name}: {err} from the hub; trying again in {delay:.0f} s ({attempt} of {TRIES})", file=log, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def resolve_commit(spec: contract.HubShards, revision: str = REVISION) -> str:
    """The commit `revision` points at now (one HEAD request for the val shard)."""
    hf = _hf()
    name = shard_file(spec, 0)

    def head():
        url = hf.hf_hub_url(spec.repo, name, repo_type="dataset", revision=revision)
        return hf.get_hf_file_metadata(url).commit_hash

    commit = _with_retries(head, spec, name)
    if not commit:
        raise UserError(f"{hf.constants.ENDPOINT} did not name the commit of {spec.repo}@{revision}: is it the Hugging Face hub?")
    return commit


def scan(path: Path) -> dict:
    """One pass over a downloaded .bin shard: its token count, sha256 and largest token, or what is wrong with it
    (with the sha256 of its bytes still: a file the hub itself holds damaged has the hub's digest)."""
    ntok, problem = binshard.read_header(path)
    digest, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            body = chunk[max(binshard.HEADER_BYTES - offset, 0):]  # the tokens after the header (chunks stay even)
            offset += len(chunk)
            if not problem and len(body) >= 2:
                top = max(top, int(np.frombuffer(body[: len(body) // 2 * 2], dtype="<u2").max()))
    if not problem and top >= VOCAB_SIZE:
        problem = f"token id {top} is outside GPT-2's vocabulary"
    if problem:
        return {"problem": problem, "sha256": digest.hexdigest()}
    return {"tokens": ntok, "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _fetch(spec: contract.HubShards, commit: str, out: Path, index: int) -> Fetched:
    """Download one shard (resuming a partial file), verify it and return its manifest entry."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hf, name = _hf(), shard_file(spec, index)

    def head():
        try:
            return hf.get_hf_file_metadata(hf.hf_hub_url(spec.repo, name, repo_type="dataset", revision=commit)).etag or ""
        except EntryNotFoundError:
            return None  # the dataset ends before this index

    def get():
        return hf.hf_hub_download(spec.repo, name, repo_type="dataset", revision=commit, local_dir=out)

    etag = _with_retries(head, spec, name)
    if etag is None:
        return Fetched(index, None)
    try:
        path = _with_retries(get, spec, name)
    except OSError as e:
        if getattr(e, "errno", None) is not None and not isinstance(e, LocalEntryNotFoundError):  # the disk: ENOSPC, EACCES
            advice = retry_advice(e, out, "--out", "run the same command to go on from them")
            raise UserError(f"cannot write {name} to {out}: {write_failure(e, out, 2 * spec.shard_tokens)}; the shards already "
                            f"downloaded stay: {advice}") from e
        raise
    info = scan(Path(path))
    digest_known = re.fullmatch(r"[0-9a-f]{64}", etag) is not None
    if "problem" in info and digest_known and info["sha256"] == etag:
        # the bytes are the hub's own: fetching them again gives the same file, so it is not deleted to be retried
        Path(path).unlink(missing_ok=True)
        raise UserError(f"{name} of {spec.repo}@{commit[:12]} is bad on the hub itself ({info['problem']}; its bytes match the "
                        f"hub's sha256, so downloading it again gives the same file): prepare another corpus (e.g. "
                        f"`python -m job.prepare fineweb-edu`), and report it to the dataset's maintainers")
    if "problem" not in info and digest_known and info["sha256"] != etag:
        info = {"problem": f"sha256 {info['sha256'][:12]}... differs from the hub's {etag[:12]}..."}
    if "problem" in info:
        Path(path).unlink(missing_ok=True)
        raise UserError(f"{name} from {spec.repo} is damaged ({info['problem']}); it was deleted: run the same command again "
                        "to download it again")
    entry = {"name": name, "split": "val" if index == 0 else "train", **info}
    return Fetched(index, entry)


def _open(out: Path, source: str, spec: contract.HubShards, overwrite: bool) -> dict:
    """The manifest to continue from: its verified shards that are still on disk whole; refusals as for job.prepare."""
    identity = {"source": source, "repo": spec.repo, "format": "bin", "tokenizer": "gpt2"}
    fresh = {"version": MANIFEST_VERSION, "identity": identity, "revision": None, "complete": False, "train_tokens": None,
             "tokens": 0, "shards": []}
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory: choose another --out")
    if not out.is_dir():
        return fresh
    manifest = None if overwrite else read_manifest(out)
    if overwrite:
        stale = trainer_shards(out) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
        for p in stale:
            p.unlink()
        if stale:
            print(f"--overwrite: removed {len(stale)} files of an earlier run from {out}")
        return fresh
    if manifest is None:
        old = trainer_shards(out)
        if old:
            raise UserError(f"--out {out} already has {len(old)} shards ({old[0].name}, ...) not downloaded by job.prepare: "
                            "pass --overwrite or choose another --out")
        return fresh
    if manifest.get("identity") != identity:
        raise UserError(f"--out {out} holds shards of a different prepare run ({(manifest.get('identity') or {}).get('source', '?')}): "
                        f"choose another --out, or pass --overwrite to replace them")
    kept = [e for e in manifest["shards"] if (out / e["name"]).is_file() and (out / e["name"]).stat().st_size == e["bytes"]]
    if len(kept) < len(manifest["shards"]):
        print(f"{len(manifest['shards']) - len(kept)} recorded shards are missing or damaged in {out}: downloading them again",
              file=sys.stderr)
        manifest["complete"] = False
    manifest["shards"] = kept
    return manifest


class Plan:
    """Which shards to fetch: the val shard, then train shards in order until they hold `need` tokens (counting a
    shard in flight as a full one) or the hub has no more."""

    def __init__(self, spec: contract.HubShards, need: int | None, have: dict[int, dict]):
        self.spec, self.need, self.have = spec, need, have  # have: index -> entry, the shards on disk
        self.next, self.end = 0, None  # the next index to consider; the first index the hub lacks

    def train_tokens(self, in_flight: int = 0) -> int:
        done = sum(e["tokens"] for i, e in self.have.items() if i > 0 and (self.end is None or i < self.end))
        return done + in_flight * self.spec.shard_tokens

    def more(self, in_flight: set[int]) -> int | None:
        """The next index to fetch, or None (enough, the end of the dataset, or wait for those in flight)."""
        while self.end is None or self.next < self.end:
            if self.next > 0 and self.need is not None and self.train_tokens(len([i for i in in_flight if i > 0])) >= self.need:
                return None
            i, self.next = self.next, self.next + 1
            if i not in self.have:
                return i
        return None

    def estimate(self) -> int:
        """Files in all, for the progress line (the dataset's length is learnt only at its end)."""
        train = math.ceil(self.need / self.spec.shard_tokens) if self.need else 0
        return max(1 + train, len(self.have)) if self.need else len(self.have) + 1


def _run(spec: contract.HubShards, commit: str, out: Path, plan: Plan, workers: int, record) -> None:
    """Fetch what the plan asks for, `workers` files at a time; record(Fetched) commits each verified shard."""
    t0, got_bytes, files = time.time(), 0, 0
    with ThreadPoolExecutor(workers) as ex:
        flying: dict = {}
        while True:
            while len(flying) < workers and (i := plan.more(set(flying.values()))) is not None:
                flying[ex.submit(_fetch, spec, commit, out, i)] = i
            if not flying:
                return
            done, _ = wait(flying, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=flying.get):
                del flying[fut]
                f = fut.result()  # a UserError here ends the run; the shards recorded so far stay
                if f.entry is None:
                    plan.end = f.index if plan.end is None else min(plan.end, f.index)
                    if f.index == 0:
                        raise UserError(f"{spec.repo} has no {shard_file(spec, 0)}: is it one of modded-nanogpt's shard datasets?")
                    continue
                plan.have[f.index] = f.entry
                record(f.entry)
                files, got_bytes = files + 1, got_bytes + f.entry["bytes"]
                rate = got_bytes / max(time.time() - t0, 1e-9)
                print(f"{f.entry['name']}: {f.entry['tokens']:,} tokens, sha256 ok | {len(plan.have)}/{plan.estimate()} files, "
                      f"{got_bytes / 1e6:,.1f} MB this run at {rate / 1e6:,.1f} MB/s", flush=True)


def download(source: str, out_dir, train_tokens: int | None = None, overwrite: bool = False, workers: int = WORKERS) -> list[Path]:
    """Download `source` (a job.contract.HUB_SHARDS key) into out_dir: the val shard and enough train shards for
    train_tokens (all without it). Returns the shard paths, val first."""
    spec = contract.HUB_SHARDS[source]
    if train_tokens is not None and train_tokens < 1:
        raise UserError(f"--train-tokens must be at least 1, got {train_tokens}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    out = Path(out_dir)
    check_output_path(out, "--out", directory=True)
    check_environment()
    manifest = _open(out, source, spec, overwrite)
    have = {int(e["name"].rsplit("_", 1)[1].split(".")[0]): e for e in manifest["shards"]}
    plan = Plan(spec, train_tokens, have)
    covered = manifest["complete"] and (manifest["train_tokens"] is None or (train_tokens is not None and train_tokens <= manifest["train_tokens"]))
    if covered or (manifest["complete"] and Plan(spec, train_tokens, dict(have)).more(set()) is None):
        print(f"{out} is already complete: {len(have)} shards, {manifest['tokens']:,} tokens of {spec.repo} "
              f"(`python -m job.prepare verify {out}` checks them)")
        return [out / e["name"] for e in manifest["shards"]]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if manifest["revision"] is None:
        manifest["revision"] = resolve_commit(spec)
    if have:
        print(f"resuming {out}: {len(have)} shards already verified")
    print(f"downloading {spec.repo}@{manifest['revision'][:12]} to {out}: the val shard and "
          f"{'every train shard' if train_tokens is None else f'train shards for {train_tokens:,} tokens'}", flush=True)
    manifest["complete"], manifest["train_tokens"] = False, train_tokens

    def record(entry: dict) -> None:
        manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: (e["split"] != "val", e["name"]))
        manifest["tokens"] = sum(e["tokens"] for e in manifest["shards"])
        write_manifest(out, manifest)

    try:
        _run(spec, manifest["revision"], out, plan, workers, record)
    except KeyboardInterrupt:
        print(f"interrupted: {len(manifest['shards'])} verified shards kept in {out}; run the same command to resume", file=sys.stderr)
        raise
    short = train_tokens is not None and plan.train_tokens() < train_tokens
    manifest["complete"] = True
    write_manifest(out, manifest)
    took = time.time() - t0
    print(f"{out}: {len(manifest['shards'])} shards (1 val, {len(manifest['shards']) - 1} train), {manifest['tokens']:,} tokens, "
          f"ready in {took:.1f}s" + (f"; the dataset holds only {plan.train_tokens():,} train tokens, fewer than "
                                     f"--train-tokens: the run will see some of them more than once" if short else ""))
    return [out / e["name"] for e in manifest["shards"]]
