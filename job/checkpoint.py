"""Checkpoints: atomic, resumable, loadable with `torch.load(weights_only=True)`, written in the background.

A checkpoint keeps build-nanogpt's keys ('model', 'config', 'step', 'val_loss') so old notebooks still
load it, plus what an exact resume needs: optimizer state, the data loader's position, RNG states and
the full training config, all as tensors and plain Python types (no pickled classes).

Training stops only to copy the state into CPU memory (`AsyncSaver`); a thread writes the file.
`Checkpointer` is one run's whole checkpoint lifecycle, as the trainer uses it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

from job import contract
from job.errors import UserError
from job.fsutil import free_bytes, fsync_dir, human_bytes, out_of_space, write_failure

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


class CheckpointWriteError(UserError):
    """A checkpoint file could not be written (a full disk, most often); nothing visible changed."""

    def __init__(self, message: str, step: int, no_space: bool):
        super().__init__(message)
        self.step, self.no_space = step, no_space


def save(state: dict, log_dir, step: int) -> Path:
    """Write temp file, fsync, rename, fsync the directory: a kill at any moment leaves only whole files.

    A failed write (full disk, I/O error) removes its temp file and raises CheckpointWriteError, which says why
    in one line: torch's zip writer reports a full disk only as "unexpected pos", so the free space decides."""
    d = Path(log_dir)
    final = checkpoint_path(d, step)
    tmp = d / f".{final.name}.tmp{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            # Fault injection for the crash-during-write test: hold the half-finished temp file open.
            delay = float(os.environ.get("NANOGPT_TEST_SAVE_DELAY", "0") or 0)
            if delay:
                time.sleep(delay)
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(d)
    except (OSError, RuntimeError) as e:  # a full disk or a refused write (torch's zip writer: RuntimeError); not bugs
        _remove(tmp)  # first, so the free space below is what the next attempt would have
        need = state_bytes(state)
        raise CheckpointWriteError(f"checkpoint {final.name} could not be written to {d}: {write_failure(e, d, need)}", step,
                                   no_space=out_of_space(e, free_bytes(d), need)) from e
    finally:
        _remove(tmp)
    return final


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # gone already, or its directory never was one
        path.unlink(missing_ok=True)


def state_bytes(state) -> int:
    """Bytes of tensor data in `state`, a storage shared by several tensors (the tied wte/lm_head) counted once:
    within a percent of the file torch.save writes (tested)."""
    seen: dict[int, int] = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(state)
    return sum(seen.values())


def estimate_bytes(model: torch.nn.Module) -> int:
    """The size of a training checkpoint of `model` before its optimizer has any state: the weights plus AdamW's
    two moments of each (same dtype), the rest (data position, RNG, config) being kilobytes."""
    weights = state_bytes(list(model.parameters()))
    return 3 * weights + state_bytes(list(model.buffers())) + 2**16


def clean_stale_temps(log_dir) -> None:
    """Remove temp files left by a process killed mid-write (they are never valid checkpoints)."""
    d = Path(log_dir)
    if d.is_dir():
        for p in d.glob(f".{_PREFIX}*.pt.tmp*"):
            p.unlink(missing_ok=True)


def retained(steps, keep_last: int, keep_every: int) -> list[int]:
    """Which of the checkpoint `steps` the retention policy keeps: the newest `keep_last` plus every step
    divisible by `keep_every`; keep_last 0 keeps everything."""
    steps = sorted(steps)
    if keep_last <= 0:
        return steps
    newest = set(steps[-keep_last:])
    return [s for s in steps if s in newest or (keep_every and s % keep_every == 0)]


def apply_retention(log_dir, keep_last: int, keep_every: int) -> list[Path]:
    """Delete the checkpoints that `retained` does not keep; returns their paths."""
    ckpts = list_checkpoints(log_dir)
    keep = set(retained([step for step, _ in ckpts], keep_last, keep_every))
    removed = []
    for step, path in ckpts:
        if step not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def most_on_disk(existing, future, keep_last: int, keep_every: int) -> int:
    """The most checkpoints on disk at once when `future` steps are saved into a log dir holding `existing`:
    each new file is complete before retention removes old ones, so a rotation briefly holds keep_last + 1."""
    on_disk = sorted(existing)
    most = len(on_disk)
    for step in future:
        on_disk.append(step)
        most = max(most, len(on_disk))
        on_disk = retained(on_disk, keep_last, keep_every)
    return most


def load(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist: pass an existing model_*.pt file, or a log dir that holds them") from None
    except Exception as e:  # truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is damaged or not ours; "
                        "delete it or use another one (when training: --resume PATH)") from None


# The entries every reader of a checkpoint uses, and their types; the last two are absent from older checkpoints.
ENTRIES = {"model": dict, "config": dict, "step": int, "train_config": dict, "identity": dict}
OPTIONAL_ENTRIES = {"train_config", "identity"}


def _entry_problems(ckpt) -> list[str]:
    if not isinstance(ckpt, dict):
        return [f"it holds a {type(ckpt).__name__}"]
    wrong = [f"{key!r} is a {type(ckpt[key]).__name__}" for key, kind in ENTRIES.items()
             if key in ckpt and (not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool))]
    wrong += [f"{key!r} is missing" for key in ENTRIES if key not in OPTIONAL_ENTRIES and key not in ckpt]
    if not wrong and ckpt["step"] < 0:
        wrong.append(f"its step is {ckpt['step']}")
    return wrong


def check_structure(ckpt, path) -> dict:
    """`ckpt` if it has the entries every reader of a checkpoint uses, of their types: anything else that torch can
    load (another program's file, one edited by hand) is one line here, not a traceback where an entry is first read."""
    if wrong := _entry_problems(ckpt):
        raise UserError(f"{path} is not a checkpoint written by `python -m job.train` ({', '.join(wrong)}): pass a model_*.pt "
                        "from a log dir")
    return ckpt


def find_resumable(log_dir) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; a damaged one (e.g. copied half-way) or a foreign one is skipped with a warning."""
    for _, path in reversed(list_checkpoints(log_dir)):
        try:
            return path, check_structure(load(path), path)
        except UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
    return None


# ---- a checkpoint outside training: job.sample and job.export --------------------------------------------

def resolve_checkpoint(path) -> str:
    """A log dir stands for its newest checkpoint."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"{path} holds no model_*.pt checkpoints: train first or pass a checkpoint file")
        return str(found[-1][1])
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist: pass a model_*.pt file, or a log dir that holds them")
    return str(path)


def checkpoint_recipe(ckpt: dict) -> str:
    """The recipe a checkpoint was trained with (checkpoints from before recipes existed are gpt2's)."""
    recipe = (ckpt.get("train_config") or {}).get("recipe", "gpt2")
    # `--recipe speedrun` first named the 2025-05-24 record's port, whose checkpoints hold its GPT's own keys
    # (blocks.*); the current record's port keeps its model under gpt.*.
    if recipe == "speedrun" and any(k.startswith("blocks.") for k in ckpt.get("model") or {}):
        return "speedrun-2025-05-24"
    return recipe


def load_model(path, device: str) -> tuple:
    """The GPT a checkpoint holds, on `device`, in the state its step had (the recipe's model_schedule), and the
    checkpoint. Anything that is not one of the trainer's checkpoints (another pickle, a model of another shape) is
    one line, not a traceback."""
    from job import recipes

    ckpt = check_structure(load(path), path)
    recipe = checkpoint_recipe(ckpt)
    if recipe not in recipes.names():
        raise UserError(f"{path} was trained with --recipe {recipe}, which this version does not have: use the version that wrote it")
    card = recipes.get(recipe)
    try:
        model = card.model_from_config(ckpt["config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: its weights do not fit the model its config describes ({first}): "
                        "pass a model_*.pt written by `python -m job.train`") from None
    if not all(p.isfinite().all() for p in model.parameters()):
        raise UserError(f"{path}: its weights hold NaN or inf (the run had diverged): use an earlier checkpoint")
    model = model.to(device)
    if ckpt.get("train_config"):
        # The step's model state that is not in the weights (the speedrun's windows and rotary scaling), as the run
        # had it when it saved, made on the device it will run on as the trainer makes it.
        card.model_schedule(model, ckpt["step"], _train_config(ckpt["train_config"], recipe, path))
    return model, ckpt


def _train_config(values: dict, recipe: str, path):
    from job.config import from_dict

    try:
        return from_dict({**values, "recipe": recipe})
    except UserError as e:
        raise UserError(f"{path}: its training settings do not load in this version ({e}): use the version that wrote it") from None


def check_compatible(ckpt: dict, model_config: dict, path, recipe: str = "gpt2") -> None:
    their_recipe = checkpoint_recipe(ckpt)
    if their_recipe != recipe:
        raise UserError(f"checkpoint {path} was trained with --recipe {their_recipe} (this run: {recipe}): use --recipe "
                        f"{their_recipe}, another --log-dir, or --resume never to start fresh")
    theirs = ckpt.get("config") or {}
    diffs = [f"{k}={theirs.get(k)} (this run: {model_config[k]})" for k in ARCH_KEYS if theirs.get(k) != model_config[k]]
    if diffs:
        raise UserError(
            f"checkpoint {path} is a different model ({', '.join(diffs)}): use the same --preset/model flags, "
            "another --log-dir, or --resume never to start fresh"
        )
    if not all(key in ckpt for key in ("optimizer", "data", "rng")):
        raise UserError(f"checkpoint {path} has weights only (no optimizer/data/RNG state), so training cannot resume exactly "
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


# --- background saving ---------------------------------------------------------------------------------
def snapshot(state, buffers: dict | None = None):
    """A copy of `state` (nested dicts/lists of tensors and plain values) that training can no longer change.

    GPU tensors go to pinned CPU buffers with non-blocking copies and one synchronize at the end, so training is
    held only for the copy (docs/BENCHMARKS.md has the time for GPT-2 124M). `buffers` (name -> tensor) keeps
    those buffers between saves, since allocating page-locked memory costs far more than filling it. Tensors
    sharing storage (the tied wte/lm_head weight) stay one tensor, so the file stores it once.
    """
    buffers = {} if buffers is None else buffers
    memo: dict = {}
    cuda_copies = False

    def walk(obj, name: str):
        nonlocal cuda_copies
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype, obj.device)
            if key in memo:
                return memo[key]
            buf = buffers.get(name)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                buffers[name] = buf
            buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
            cuda_copies |= obj.is_cuda
            memo[key] = buf
            return buf
        if isinstance(obj, dict):
            return {k: walk(v, f"{name}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v, f"{name}/{i}") for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    out = walk(state, "")
    if cuda_copies:
        torch.cuda.synchronize()  # the copies above were queued asynchronously: wait once for all of them
    return out


class AsyncSaver:
    """Writes checkpoints in a background thread; at most one write in flight.

    `save()` snapshots the state (the only part the training thread waits for, besides a previous write still
    running) and returns; the thread then runs `save()` above (temp file, fsync, rename: only complete files
    are ever visible) and the retention policy. `wait()` blocks until the write is done; call it before the
    process ends. A failed write is raised on the training thread by the next `poll()`, `save()` or `wait()`.
    """

    def __init__(self, log_dir, keep_last: int = 0, keep_every: int = 0):
        self.log_dir, self.keep_last, self.keep_every = log_dir, keep_last, keep_every
        self._thread: threading.Thread | None = None
        self._buffers: dict = {}
        self._lock = threading.Lock()
        self._finished: list[dict] = []
        self._error: BaseException | None = None

    def save(self, state: dict, step: int, **info) -> dict:
        """Start writing checkpoint `step`; returns how long training was held (`stall_s`, `wait_s` of it spent
        waiting for the previous write)."""
        t0 = time.perf_counter()
        self._join()
        t_wait = time.perf_counter() - t0
        frozen = snapshot(state, self._buffers)
        stall = time.perf_counter() - t0
        # Not a daemon: an exception or the end of the main thread still lets a started write finish.
        self._thread = threading.Thread(target=self._write, args=(frozen, step, info), name=f"checkpoint-{step}")
        self._thread.start()
        return {"stall_s": stall, "wait_s": t_wait}

    def _write(self, state: dict, step: int, info: dict) -> None:
        t0 = time.perf_counter()
        try:
            path = save(state, self.log_dir, step)
            removed = apply_retention(self.log_dir, self.keep_last, self.keep_every)
        except BaseException as e:  # handed to the training thread, which reports it
            with self._lock:
                self._error = e
            return
        with self._lock:
            self._finished.append({"step": step, "path": path, "write_s": time.perf_counter() - t0, "removed": removed, **info})

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> list[dict]:
        """Writes finished since the last call (oldest first)."""
        self._raise()
        with self._lock:
            done, self._finished = self._finished, []
        return done

    def wait(self) -> list[dict]:
        self._join()
        return self.poll()


# --- one run's checkpoints -----------------------------------------------------------------------------
class Checkpointer:
    """The checkpoints of one training run: which one to resume from, the free-space check, background saves with
    retention, the log line of each finished write, a failed write, and which checkpoint to resume from when the
    run stops early. Only the master rank writes; every rank holds one (they agree on when to save).

    A failed write is kept (`failed`), not raised where it is found: under DDP the other ranks must hear of it in
    the step's all-reduce first, or they would wait for this one in the next collective until torchrun kills them.
    The trainer then calls `raise_failed_write()` on every rank in the same step."""

    # What an error line says about the checkpoint to resume from, by why the run stopped: (some written, none yet).
    HINTS = {
        "diverged": ("the last checkpoint, {path} (step {step}), was written before: resume from it with {fix}",
                     "no checkpoint was written to {log_dir}: start again with {fix}"),
        "rank-lost": ("{name} (step {step}) is the last checkpoint: run the same command to resume from it",
                      "no checkpoint was written yet"),
        "write-failed": ("{name} (step {step}) is the last one written and is intact: {fix}, then run the same command "
                         "to resume from it", "no checkpoint was written yet: {fix} or pass another --log-dir, and start again"),
    }

    def __init__(self, log_dir, keep_last: int, keep_every: int, master: bool, log):
        self.log_dir, self.master, self.log = log_dir, master, log
        self.saver = AsyncSaver(log_dir, keep_last, keep_every)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.held_for: dict[int, dict] = {}  # step -> how long its save held training, until the write is logged
        self.last_step: int | None = None  # saved (or resumed from) last: never saved twice
        self.last_time = time.time()
        self.error: CheckpointWriteError | None = None  # the master's first failed write

    # --- start ---------------------------------------------------------------------------------------
    def resume(self, mode: str, model_config: dict, recipe: str) -> tuple[str, dict] | None:
        """(path, checkpoint) to resume from for --resume `mode` (auto | never | PATH), or None to start fresh."""
        if self.master:
            clean_stale_temps(self.log_dir)
        if mode == "never":
            existing = list_checkpoints(self.log_dir)
            if existing:
                raise UserError(f"--resume never, but {self.log_dir} already holds {existing[-1][1].name} (and would be "
                                "overwritten): use another --log-dir, or --resume auto to continue that run")
            return None
        if mode == "auto":
            found = find_resumable(self.log_dir)
            if found is None:
                return None
            path, ckpt = found
        else:
            path, ckpt = mode, check_structure(load(mode), mode)
        check_compatible(ckpt, model_config, path, recipe)
        self.last_step = int(ckpt["step"])
        return str(path), ckpt

    def check_room(self, model: torch.nn.Module, start_step: int, max_steps: int, every: int) -> str | None:
        """Refuse to start when the log dir cannot hold even the next checkpoint (better now than an hour in), and
        return a warning when this run's checkpoints, with the retention policy, will outgrow its free space."""
        probe = Path(self.log_dir) / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")  # an OSError naming the dir (one line from cli_main) if checkpoints could not go there
        probe.unlink()
        size, free = estimate_bytes(model), free_bytes(self.log_dir)
        if free < size:
            raise UserError(f"{self.log_dir} has {human_bytes(free)} free and a checkpoint of this model takes about "
                            f"{human_bytes(size)}: free space there, or pass a --log-dir on a disk with room")
        future = [s for s in range(start_step + 1, max_steps + 1) if s == max_steps or (every and s % every == 0)]
        existing = [s for s, _ in list_checkpoints(self.log_dir)]
        more = most_on_disk(existing, future, self.keep_last, self.keep_every) - len(existing)
        if free >= more * size:
            return None
        return (f"warning: {self.log_dir} has {human_bytes(free)} free, and this run's checkpoints will need up to "
                f"{human_bytes(more * size)} more at once ({more} of about {human_bytes(size)}, with --keep-last "
                f"{self.keep_last} --keep-every {self.keep_every}): the run stops with an error when the disk fills. "
                "Free space, or keep fewer checkpoints")

    # --- during the run ------------------------------------------------------------------------------
    def due(self, minutes: float) -> bool:
        """Whether `minutes` (0: never) have passed since the last save; the master's clock decides."""
        return bool(minutes and self.master and time.time() - self.last_time >= 60 * minutes)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def save(self, step: int, state_fn, held_since: float) -> None:
        """Snapshot `state_fn()` (master only) and write it in the background; `held_since` is when training was
        first held for this save (perf_counter), for the log line."""
        if self.master and self.error is None:  # after a failed write, training stops at the next step
            state = state_fn()
            try:
                held = self.saver.save(state, step, val_loss=state.get("val_loss"))
            except CheckpointWriteError as e:  # the previous write failed; this one was not started
                self.error = self.error or e
            else:
                self.held_for[step] = {**held, "stall_s": time.perf_counter() - held_since}
            self.report()  # the previous write, if save() just waited for it
        self.last_step, self.last_time = step, time.time()

    def report(self, wait: bool = False) -> None:
        """Log the writes that have finished (all of them, after waiting, with wait=True)."""
        if not self.master:
            return
        try:
            finished = self.saver.wait() if wait else self.saver.poll()
        except CheckpointWriteError as e:
            self.error = self.error or e
            finished = self.saver.poll()
        for done in finished:
            held = self.held_for.pop(done["step"], {"stall_s": 0.0})
            removed = done["removed"]
            self.log.line(f"step {done['step']:6d} | saved {done['path']} (training held {held['stall_s']:.2f} s, "
                          f"written in the background in {done['write_s']:.2f} s)"
                          + (f", removed {', '.join(p.name for p in removed)}" if removed else ""))
            self.log.event("checkpoint", step=done["step"], path=str(done["path"]), val_loss=done["val_loss"],
                           seconds=round(done["write_s"], 3), stall_s=round(held["stall_s"], 3))

    def flush(self) -> None:
        """Wait for every write in flight and log it; stop if one failed."""
        self.report(wait=True)
        if self.failed:
            self.raise_failed_write()

    # --- the end of a run that cannot go on ----------------------------------------------------------
    def resume_hint(self, why: str, fix: str = "") -> str:
        """Which checkpoint the run can go on from, for its error line (after the writes in flight landed)."""
        self.report(wait=True)
        saved = list_checkpoints(self.log_dir)
        some, none = self.HINTS[why]
        if saved:
            step, path = saved[-1]
            return some.format(path=path, name=path.name, step=step, fix=fix)
        return none.format(log_dir=self.log_dir, fix=fix)

    def raise_failed_write(self) -> None:
        """A checkpoint could not be written: stop (a run that cannot save only burns the box) and say how to go on.
        Only the master knows the details; the other ranks point to its line."""
        self.report(wait=True)
        if not self.master:
            raise UserError("rank 0 could not write a checkpoint and training stopped: rank 0's error line names the "
                            "cause and the checkpoint to resume from")
        e = self.error
        fix = "make room (move old checkpoints away, or keep fewer with --keep-last)" if e.no_space else "fix that"
        then = self.resume_hint("write-failed", fix)
        self.log.line(f"step {e.step:6d} | {e}: stopping")
        self.log.event("end", step=e.step, reason="checkpoint-failed")  # the S3 sidecar and the cost guard finish on this
        raise UserError(f"{e}; {then}") from e
