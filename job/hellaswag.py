"""HellaSwag acc_norm, as in karpathy's build-nanogpt hellaswag.py, with the examples split over DDP ranks.

Each example is a context and 4 endings; the model "picks" the ending whose tokens it finds most likely,
by the mean per-token cross-entropy over the ending (acc_norm: the mean, not the sum, so long endings are
not penalised for being long). GPT-2 124M scores 0.2955 on the 10042 validation examples this way.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from job.config import TrainConfig
from job.errors import UserError
from job.model import GPT2_VOCAB
from job.tokenizer import encode

VAL_URL = TrainConfig.hellaswag_url  # rowanz/hellaswag's val split on GitHub
FILENAME = "hellaswag_val.jsonl"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "nanogpt" / "hellaswag"


# --- data --------------------------------------------------------------------------------------------
def load_examples(path: str | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR, url: str = VAL_URL,
                  timeout: float = 30) -> list[dict]:
    """The examples of a local HellaSwag jsonl (`path`), or of the validation split, downloaded once into `cache_dir`."""
    if path is not None:
        return _read_jsonl(Path(path), fix="pass a HellaSwag jsonl (hellaswag_val.jsonl) to --hellaswag-path")
    cached = Path(cache_dir) / FILENAME
    if not cached.is_file():
        _download(url, cached, timeout)
    return _read_jsonl(cached, fix="delete it to download it again, or pass --hellaswag-path FILE")


def _download(url: str, dest: Path, timeout: float) -> None:
    # Write to a per-process .part file and rename: an interrupted download (or two boxes sharing the
    # filesystem) never leaves a half file that a later run would take for the cached dataset.
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        os.replace(part, dest)
    except (OSError, http.client.HTTPException) as e:  # URLError/HTTPError/timeouts are all OSErrors
        part.unlink(missing_ok=True)
        reason = str(e) if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        reason = " ".join(str(reason).split())  # one line, whatever the OS put in the message
        raise UserError(f"cannot download HellaSwag from {url} ({reason}): put {FILENAME} at {dest}, "
                        "pass --hellaswag-path FILE, or disable with --hellaswag-every 0") from None


def _read_jsonl(path: Path, fix: str) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read HellaSwag file {path} ({e.__class__.__name__}): {fix}") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            ok = (isinstance(ex, dict) and isinstance(ex.get("ctx"), str) and isinstance(ex.get("endings"), list)
                  and len(ex["endings"]) >= 2 and all(isinstance(e, str) for e in ex["endings"])
                  and type(ex.get("label")) is int and 0 <= ex["label"] < len(ex["endings"]))
        except json.JSONDecodeError:
            raise UserError(f"HellaSwag file {path} line {n} is not JSON: {fix}") from None
        if not ok:
            raise UserError(f"HellaSwag file {path} line {n} lacks a string ctx, a list of endings and an int label "
                            f"indexing them: {fix}")
        examples.append(ex)
    if not examples:
        raise UserError(f"HellaSwag file {path} holds no examples: {fix}")
    return examples


@functools.lru_cache(maxsize=1 << 15)
def _render_tokens(ctx: str, endings: tuple[str, ...]) -> tuple[list[int], list[list[int]]]:
    # Cached: every evaluation scores the same examples; tokenizing them again each time would be repeated work.
    # The leading space: in GPT-2's BPE a word after a space is a different token than at the start of text.
    return encode(ctx), [encode(" " + end) for end in endings]


def render_example(example: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens, mask, label): one row per ending, context + ending, zero-padded; mask is 1 on the ending tokens."""
    tokens, mask = _pad([example])
    return tokens, mask, int(example["label"])


def _pad(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of these examples (one per ending, in order), right-padded to the longest."""
    rows = []
    for ex in examples:
        ctx, ends = _render_tokens(ex["ctx"], tuple(ex["endings"]))
        rows += [(ctx + end, len(ctx)) for end in ends]
    tokens = torch.zeros((len(rows), max(len(r) for r, _ in rows)), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, (row, n_ctx) in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, n_ctx : len(row)] = 1
    return tokens, mask


# --- scoring -----------------------------------------------------------------------------------------
def row_losses(model, tokens: torch.Tensor, mask: torch.Tensor, chunk_rows: int = 16) -> torch.Tensor:
    """Mean cross-entropy of each row over its masked (ending) tokens, on the device, no host sync."""
    T = model.config.block_size
    if tokens.size(1) > T:
        # Too long for the model: keep each row's last T tokens (its ending and as much context as fits).
        # Per row, since rows are right-padded to different lengths; the mask moves with the tokens.
        ends = mask.size(1) - mask.flip(1).argmax(1)  # one past each row's last ending token
        idx = (ends - T).clamp(min=0).unsqueeze(1) + torch.arange(T, device=tokens.device)
        tokens, mask = tokens.gather(1, idx), mask.gather(1, idx)
    logits, _ = model(tokens)
    out = []
    # fp32 log-softmax over the vocabulary a few rows at a time: all rows at once would hold rows x T x 50257 floats.
    for i in range(0, tokens.size(0), chunk_rows):
        # Only the 50257 real tokens compete: the padded vocabulary columns are not part of the distribution.
        lg = logits[i : i + chunk_rows, :-1, :GPT2_VOCAB].float()
        tg = tokens[i : i + chunk_rows, 1:]
        losses = F.cross_entropy(lg.reshape(-1, GPT2_VOCAB), tg.reshape(-1), reduction="none").view(tg.shape)
        shift_mask = mask[i : i + chunk_rows, 1:].float()  # position t predicts token t+1
        out.append((losses * shift_mask).sum(1) / shift_mask.sum(1))
    return torch.cat(out)


def score_example(model, tokens: torch.Tensor, mask: torch.Tensor) -> int:
    """Index of the ending with the lowest mean cross-entropy over its tokens (acc_norm)."""
    return int(row_losses(model, tokens, mask).argmin().item())


def predict(model, examples: list[dict], device, batch_examples: int = 16) -> torch.Tensor:
    """The ending each example's model picks (acc_norm), in the order given, as a tensor on the device.

    Examples go through the model `batch_examples` at a time (all their endings as rows of one batch), sorted by
    length so that little is padding, and nothing is read back to the host: one example per forward and a host
    sync each, as build-nanogpt does, is mostly launch overhead on a GPU (docs/BENCHMARKS.md has both timings).
    """
    device = torch.device(device)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["ctx"]) + sum(len(e) for e in examples[i]["endings"]))
    picks = torch.empty(len(examples), dtype=torch.long, device=device)
    for i in range(0, len(order), batch_examples):
        idx = order[i : i + batch_examples]
        batch = [examples[k] for k in idx]
        tokens, mask = _pad(batch)
        losses = row_losses(model, tokens.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        # Each example's rows into one row of a grid (inf where an example has fewer endings): argmin per row.
        counts = torch.tensor([len(ex["endings"]) for ex in batch])
        grid = torch.full((len(batch), int(counts.max())), float("inf"), device=device)
        which = torch.repeat_interleave(torch.arange(len(batch)), counts)
        col = torch.cat([torch.arange(int(c)) for c in counts])
        grid[which.to(device), col.to(device)] = losses.float()
        picks[torch.tensor(idx, device=device)] = grid.argmin(1)
    return picks


def evaluate(model, examples: list[dict], device, rank: int = 0, world: int = 1, autocast_dtype: torch.dtype | None = None,
             limit: int | None = None, batch_examples: int = 16) -> tuple[int, int]:
    """(num_correct_norm, num_total) over all ranks; rank r scores examples r, r+world, ... and all ranks get the sums."""
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    mine = examples[: limit or None][rank::world]  # limit 0 or None: all
    try:
        with torch.no_grad(), autocast:
            picks = predict(model, mine, device, batch_examples)
            labels = torch.tensor([int(ex["label"]) for ex in mine], device=device)
            correct, total = int((picks == labels).sum().item()), len(mine)  # the one host sync
    finally:
        model.train(was_training)
    if world > 1 and dist.is_available() and dist.is_initialized():
        counts = torch.tensor([correct, total], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, total = (int(c) for c in counts.tolist())
    return correct, total
