"""Token shards and the distributed loader.

Shards come in two formats, told apart by their suffix: build-nanogpt's flat uint16 .npy arrays, and llm.c's .bin
files (a header of 256 int32: magic 20240520, version 1, the token count; then the uint16 tokens), which is how
modded-nanogpt publishes FineWeb tokenized on the Hugging Face hub. Either way the file name contains `train` or
`val`, and every document is preceded by <|endoftext|>. Shards are memory-mapped, never read whole into RAM:
a 100M-token shard is 200 MB, and eight ranks each holding one would waste 1.6 GB for nothing.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import numpy as np
import torch

from job import binshard
from job.errors import UserError

SPLITS = ("train", "val")
SUFFIXES = (".npy", ".bin")


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Sorted shard paths of one split (`train` or `val` in the file name, .npy or .bin files)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"data dir {d} does not exist: prepare shards with `python -m job.prepare ... --out {d}` or pass --data-dir")
    return sorted(p for p in d.iterdir() if p.suffix in SUFFIXES and split in p.name and p.is_file())


def check_data_dir(data_dir: str | os.PathLike) -> None:
    for split in SPLITS:
        if not list_shards(data_dir, split):
            raise UserError(
                f"data dir {data_dir} has no {split} shards (*{split}*.npy or *{split}*.bin): "
                f"prepare them with `python -m job.prepare text FILES --out {data_dir}` or `python -m job.prepare fineweb-edu --out {data_dir}`"
            )


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write a shard atomically (temp name, fsync, rename): a reader never sees half a shard."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
            raise ValueError("token ids do not fit in uint16")
        tokens = tokens.astype(np.uint16)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, tokens)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map one shard (.npy or .bin) as a flat uint16 array; the OS pages in only the windows we touch."""
    if Path(path).suffix == ".bin":
        return _load_bin(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # cut short by an interrupted copy, or not a .npy file at all
        raise UserError(f"shard {path} cannot be read: {_shard_problem(path, e)}; {_REDO}") from None
    if arr.dtype != np.uint16 or arr.ndim != 1:
        raise UserError(f"shard {path} is not a flat uint16 array (dtype {arr.dtype}, shape {arr.shape}): re-create it with job.prepare")
    return arr


_REDO = "copy it again or re-create it with job.prepare (`python -m job.prepare verify DIR` checks every shard)"


def _load_bin(path) -> np.ndarray:
    ntok, problem = binshard.read_header(path)
    if problem:
        raise UserError(f"shard {path} cannot be read: {problem}; {_REDO}")
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)  # np.memmap refuses an empty map
    return np.memmap(path, dtype="<u2", mode="r", offset=binshard.HEADER_BYTES, shape=(ntok,))


def check_token_ids(path, tokens: np.ndarray) -> None:
    """Every id must be a GPT-2 token: a shard from another tokenizer would index past the embedding table (or
    silently train the padding rows). One pass over the memory map, done when a shard is first opened."""
    from job.tokenizer import VOCAB_SIZE

    if tokens.size and int(tokens.max()) >= VOCAB_SIZE:
        at = int(np.argmax(tokens >= VOCAB_SIZE))
        raise UserError(f"shard {path} holds token id {int(tokens[at])} (at position {at:,}), outside GPT-2's vocabulary "
                        f"(0..{VOCAB_SIZE - 1}): it was not made with GPT-2's tokenizer; re-create it with job.prepare "
                        "(`python -m job.prepare verify DIR` checks every shard)")


def _shard_problem(path, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno:  # the file could not be opened at all (permissions, I/O): say that
        return e.strerror
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            need = f.tell() + int(np.prod(shape)) * dtype.itemsize
    except (ValueError, EOFError, OSError):
        return f"not a .npy file ({size:,} bytes)"
    if size < need:
        return f"truncated ({size:,} bytes on disk, its header describes {need:,})"
    return f"{type(e).__name__}: {e}"


class ShardLoader:
    """Each rank reads disjoint (B*T+1)-token windows, interleaved like build-nanogpt's DataLoaderLite.

    The loader's position is one pair (shard, offset) shared by all ranks: rank r reads the window at
    offset + r*B*T, then everyone advances by B*T*world. Saving that pair in the checkpoint restores the
    exact stream, even if the run resumes with a different number of ranks.

    When it moves to the next shard:
    - by default, build-nanogpt's rule: after any micro-batch, when the next one of all ranks (B*T*world + 1
      tokens) no longer fits. With gradient accumulation that can happen in the middle of a step, so which
      windows a step reads after the first shard switch depends on the number of ranks;
    - with `step_tokens` (the tokens of one optimizer step, over all ranks and micro-steps), modded-nanogpt's
      rule: only between steps, when the shard holds no more than a step's tokens + 1 past the offset. A step
      is then one span of the shard wherever it runs: micro-step a of rank r reads window a*world + r of it, the
      window rank a*world + r of a run with one micro-step per rank reads. The position within the step
      (`into_step`, tokens) is saved too: 0 at every step boundary, where checkpoints are taken.
    """

    def __init__(self, data_dir, split: str, B: int, T: int, rank: int = 0, world: int = 1, pin_memory: bool = False,
                 step_tokens: int | None = None):
        self.B, self.T, self.rank, self.world = B, T, rank, world
        self.pin_memory = pin_memory  # read windows straight into page-locked memory (CUDA can then copy asynchronously)
        self.split = split
        if step_tokens is not None and (step_tokens <= 0 or step_tokens % (B * T * world)):
            raise ValueError(f"a step of {step_tokens} tokens is not a whole number of micro-batches of {B} x {T} x {world} ranks")
        self.step_tokens = step_tokens
        self._checked: set[Path] = set()
        self.shards = list_shards(data_dir, split)
        if not self.shards:
            raise UserError(f"no {split} shards in {data_dir}: prepare data first (python -m job.prepare)")
        need = self._room()
        small = [p.name for p in self.shards if len(load_shard(p)) < need]
        if len(small) == len(self.shards):
            if step_tokens is None:
                what, flags = f"micro-batch {B} x seq-len {T} x {world} ranks + 1", "--micro-batch/--seq-len"
            else:
                what = f"a step of {step_tokens} tokens + 2, as modded-nanogpt's loader needs"
                flags = "--val-seq-len" if split == "val" else "--total-batch-tokens/--seq-len"
            raise UserError(
                f"every {split} shard in {data_dir} is shorter than one step's {need} tokens "
                f"({what}): use a smaller {flags} or bigger shards"
            )
        self.reset()

    def reset(self) -> None:
        self.shard = 0
        self.offset = 0
        self.into_step = 0
        self._tokens = None
        self._skip_short()

    def _load(self) -> np.ndarray:
        if self._tokens is None:
            path = self.shards[self.shard]
            self._tokens = load_shard(path)
            if path not in self._checked:  # once per shard: the val shard is re-opened at every evaluation
                check_token_ids(path, self._tokens)
                self._checked.add(path)
        return self._tokens

    def _room(self) -> int:
        """The tokens past the offset that the shard must hold for the loader to stay in it."""
        if self.step_tokens is None:
            return self.B * self.T * self.world + 1
        # modded-nanogpt's test, `pos + batch_size + 1 >= len(tokens)`, moves on one token earlier than the step's
        # batch_size + 1 tokens need.
        return self.step_tokens + 2

    def _skip_short(self) -> None:
        # Move to the first shard (from the current one) that can hold a whole step; within a step (step_tokens)
        # the step's span was checked when it began.
        if self.into_step:
            return
        while len(self._load()) < self.offset + self._room():
            self.shard = (self.shard + 1) % len(self.shards)
            self.offset = 0
            self._tokens = None

    def next_batch(self, B: int | None = None, T: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next window of B x T tokens per rank (default: the loader's own; a recipe may stage its batch)."""
        if (B or self.B, T or self.T) != (self.B, self.T):
            if self.step_tokens is not None:
                raise ValueError("a loader that keeps whole steps in one shard (step_tokens) reads one layout")
            self.B, self.T = B or self.B, T or self.T
            self._skip_short()  # the new step's span must fit in the shard too
        B, T = self.B, self.T
        start = self.offset + self.rank * B * T
        # One copy: uint16 from the memory map straight into the (pinned) int64 tensor handed on.
        buf = torch.empty(B * T + 1, dtype=torch.int64, pin_memory=self.pin_memory)
        np.copyto(buf.numpy(), self._load()[start : start + B * T + 1], casting="safe")
        x = buf[:-1].view(B, T)
        y = buf[1:].view(B, T)
        self.offset += B * T * self.world
        if self.step_tokens is not None:
            self.into_step = (self.into_step + B * T * self.world) % self.step_tokens
        self._skip_short()
        return x, y

    def state_dict(self) -> dict:
        state = {"split": self.split, "shard": self.shard, "offset": self.offset, "shard_name": self.shards[self.shard].name}
        if self.step_tokens is not None:
            state["into_step"] = self.into_step
        return state

    def load_state_dict(self, state: dict) -> None:
        shard, offset = int(state["shard"]), int(state["offset"])
        name = state.get("shard_name")
        if shard >= len(self.shards) or (name and self.shards[shard].name != name):
            raise UserError(
                f"the checkpoint's data position ({name or shard}) is not in the data dir's {self.split} shards: "
                "resume with the same data dir, or start fresh with --resume never"
            )
        self.shard, self.offset, self._tokens = shard, offset, None
        # A position saved without it (build-nanogpt's rule, or before it was kept) is at a step boundary.
        self.into_step = int(state.get("into_step", 0)) if self.step_tokens is not None else 0
        self._skip_short()


class DeviceLoader:
    """Wraps a loader so batches come out already on the device, copied ahead of use.

    On CUDA each batch sits in pinned memory and its host-to-device copy is queued non-blocking `depth`
    batches before the step asks for it: the training thread never waits for a copy, and reading the next
    window from the memory map happens while the GPU is still busy with the current micro-step.
    `state_dict()` is the position of the next batch *handed out*, not of the next one read, so a
    checkpoint resumes at exactly the same token whatever was prefetched. depth 0: copy when asked.
    """

    def __init__(self, loader, device: str | torch.device, depth: int = 1):
        self.loader, self.device, self.depth = loader, torch.device(device), depth
        self.cuda = self.device.type == "cuda"
        self._queue: deque = deque()  # (position before the batch, x, y, shape, (x, y) in host memory)
        self.host_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the last batch handed out, in host memory

    def _fetch(self, shape: tuple[int, ...] = ()) -> None:
        state = self.loader.state_dict()
        x, y = host = self.loader.next_batch(*shape)
        if self.cuda:
            if not x.is_pinned():
                x, y = host = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        else:
            x, y = x.to(self.device), y.to(self.device)
        self._queue.append((state, x, y, shape, host))

    def next_batch(self, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; `shape` (B, T) asks for another layout than the loader's own (a staged recipe's step).
        Batches prefetched in another layout are put back: the loader rewinds to the first of them."""
        if self._queue and self._queue[0][3] != shape:
            self.loader.load_state_dict(self._queue[0][0])
            self._queue.clear()
        if not self._queue:
            self._fetch(shape)
        _, x, y, _, self.host_batch = self._queue.popleft()
        while len(self._queue) < self.depth:
            self._fetch(shape)
        return x, y

    def state_dict(self) -> dict:
        return self._queue[0][0] if self._queue else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._queue.clear()
        self.loader.load_state_dict(state)

    def reset(self) -> None:
        self._queue.clear()
        self.loader.reset()
