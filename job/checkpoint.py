"""Checkpoints: atomic, resumable, loadable with `torch.load(weights_only=True)`.

A checkpoint keeps build-nanogpt's keys ('model', 'config', 'step', 'val_loss') so old notebooks still
load it, plus what an exact resume needs: optimizer state, the data loader's position, RNG states and
the full training config, all as tensors and plain Python types (no pickled classes).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import torch

from job import contract
from job.errors import UserError

_PREFIX = contract.CHECKPOINT_GLOB.split("*")[0]
_NAME = re.compile(rf"^{re.escape(_PREFIX)}(\d+)\.pt$")
FORMAT_VERSION = 1
# Model fields that must match for a checkpoint to be loadable into this run's model.
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def checkpoint_path(log_dir, step: int) -> Path:
    return Path(log_dir) / contract.CHECKPOINT_FORMAT.format(step=step)


def list_checkpoints(log_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temp files of an interrupted write never match the pattern."""
    d = Path(log_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict, log_dir, step: int) -> Path:
    """Write temp file, fsync, rename, fsync the directory: a kill at any moment leaves only whole files."""
    d = Path(log_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(d, step)
    tmp = d / f".{final.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            # Fault injection for the crash-during-write test: hold the half-finished temp file open.
            delay = float(os.environ.get("NANOGPT_TEST_SAVE_DELAY", "0") or 0)
            if delay:
                time.sleep(delay)
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def clean_stale_temps(log_dir) -> None:
    """Remove temp files left by a process killed mid-write (they are never valid checkpoints)."""
    d = Path(log_dir)
    if d.is_dir():
        for p in d.glob(f".{_PREFIX}*.pt.tmp*"):
            p.unlink(missing_ok=True)


def apply_retention(log_dir, keep_last: int, keep_every: int) -> list[Path]:
    """Keep the newest `keep_last` plus every step divisible by `keep_every`; keep_last 0 keeps everything."""
    if keep_last <= 0:
        return []
    ckpts = list_checkpoints(log_dir)
    newest = {step for step, _ in ckpts[-keep_last:]}
    removed = []
    for step, path in ckpts:
        if step in newest or (keep_every and step % keep_every == 0):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist: pass --resume auto, never or an existing model_*.pt") from None
    except Exception as e:  # truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is damaged or not ours; "
                        "delete it or point --resume at another one") from None


def find_resumable(log_dir) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; a damaged one (e.g. copied half-way) is skipped with a warning."""
    for _, path in reversed(list_checkpoints(log_dir)):
        try:
            return path, load(path)
        except UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
    return None


def check_compatible(ckpt: dict, model_config: dict, path) -> None:
    theirs = ckpt.get("config") or {}
    diffs = [f"{k}={theirs.get(k)} (this run: {model_config[k]})" for k in ARCH_KEYS if theirs.get(k) != model_config[k]]
    if diffs:
        raise UserError(
            f"checkpoint {path} is a different model ({', '.join(diffs)}): use the same --preset/model flags, "
            "another --log-dir, or --resume never to start fresh"
        )
    if "optimizer" not in ckpt or "data" not in ckpt:
        raise UserError(f"checkpoint {path} has weights only (no optimizer/data state), so training cannot resume exactly "
                        "from it: use another --log-dir or --resume never")


def rng_state(device_type: str) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, device_type: str) -> None:
    torch.set_rng_state(state["torch"])
    if device_type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
