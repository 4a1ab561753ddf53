"""HellaSwag acc_norm, as in karpathy's build-nanogpt hellaswag.py, with the examples split over DDP ranks.

Each example is a context and 4 endings; the model "picks" the ending whose tokens it finds most likely,
by the mean per-token cross-entropy over the ending (acc_norm: the mean, not the sum, so long endings are
not penalised for being long). GPT-2 124M scores 0.2955 on the 10042 validation examples this way.
"""

from __future__ import annotations

import contextlib
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


def render_example(example: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens, mask, label): one row per ending, context + ending, zero-padded; mask is 1 on the ending tokens."""
    ctx_tokens = encode(example["ctx"])
    # The leading space: in GPT-2's BPE a word after a space is a different token than at the start of text.
    rows = [ctx_tokens + encode(" " + end) for end in example["endings"]]
    tokens = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens) : len(row)] = 1
    return tokens, mask, int(example["label"])


# --- scoring -----------------------------------------------------------------------------------------
def score_example(model, tokens: torch.Tensor, mask: torch.Tensor) -> int:
    """Index of the ending with the lowest mean cross-entropy over its tokens (acc_norm)."""
    T = model.config.block_size
    if tokens.size(1) > T:
        # Too long for the model: keep each row's last T tokens (its ending and as much context as fits).
        # Per row, since rows are right-padded to different lengths; the mask moves with the tokens.
        ends = mask.size(1) - mask.flip(1).argmax(1)  # one past each row's last ending token
        idx = (ends - T).clamp(min=0).unsqueeze(1) + torch.arange(T, device=tokens.device)
        tokens, mask = tokens.gather(1, idx), mask.gather(1, idx)
    logits, _ = model(tokens)
    # Only the 50257 real tokens compete: the padded vocabulary columns are not part of the distribution.
    logits = logits[:, :-1, :GPT2_VOCAB].float()
    losses = F.cross_entropy(logits.reshape(-1, GPT2_VOCAB), tokens[:, 1:].reshape(-1), reduction="none")
    shift_mask = mask[:, 1:].float()  # position t predicts token t+1
    avg_loss = (losses.view(tokens.size(0), -1) * shift_mask).sum(1) / shift_mask.sum(1)
    return int(avg_loss.argmin().item())


def evaluate(model, examples: list[dict], device, rank: int = 0, world: int = 1, autocast_dtype: torch.dtype | None = None,
             limit: int | None = None) -> tuple[int, int]:
    """(num_correct_norm, num_total) over all ranks; rank r scores examples r, r+world, ... and all ranks get the sums."""
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad(), autocast:
            for ex in examples[: limit or None][rank::world]:  # limit 0 or None: all
                tokens, mask, label = render_example(ex)
                correct += int(score_example(model, tokens.to(device), mask.to(device)) == label)
                total += 1
    finally:
        model.train(was_training)
    if world > 1 and dist.is_available() and dist.is_initialized():
        counts = torch.tensor([correct, total], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, total = (int(c) for c in counts.tolist())
    return correct, total
