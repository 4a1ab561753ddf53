"""The container contract, read from contract.env beside this file (the single source of truth), and the tables
every side reads: what each exit status means, and the corpora published on the hub.

Inside the image the trainer runs from WORKDIR, reads shards from the persistent filesystem mounted at
PERSISTENT and writes logs and checkpoints to LOG_DIR (the host's ~/model_weights in the old workflow).
The Makefile includes the same file and hands the values to docker build, so nothing is copied by hand.

Both sides import this module: the trainer and the sidecars in the image, and the launcher on the laptop, which
has neither torch nor numpy. So it imports nothing but the standard library.

    python -m job.contract exit-codes      # the exit-status table, as Markdown, for the docs
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_FILE = Path(__file__).resolve().parent / "contract.env"


def read(path: Path = ENV_FILE) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


_C = read()
IMAGE_NAME = _C["IMAGE_NAME"]
CONTAINER_NAME = _C["CONTAINER_NAME"]
WORKDIR = _C["WORKDIR"]
PERSISTENT = _C["PERSISTENT"]
DATA_DIR = _C["DATA_DIR"]  # where build-nanogpt's fineweb.py left the shards on the persistent filesystem
LOG_DIR = _C["LOG_DIR"]
CHECKPOINT_GLOB = _C["CHECKPOINT_PREFIX"] + "*.pt"
CHECKPOINT_FORMAT = _C["CHECKPOINT_PREFIX"] + "{step:05d}.pt"
METRICS_FILE = _C["METRICS_FILE"]  # one JSON object per event
HUMAN_LOG_FILE = _C["HUMAN_LOG_FILE"]  # the human lines printed on stdout
NANOGPT_LOG_FILE = _C["NANOGPT_LOG_FILE"]  # build-nanogpt's own format ("{step} train {loss}"), for old tools
TENSORBOARD_EVENTS_PREFIX = _C["TENSORBOARD_EVENTS_PREFIX"]  # in the log dir: TensorBoard's event files, treated as logs
TENSORBOARD_PORT = int(_C["TENSORBOARD_PORT"])  # the box's TensorBoard (fab dashboard), on its loopback only
WANDB_RUN_ID_FILE = _C["WANDB_RUN_ID_FILE"]  # in the log dir: the W&B run a restart continues
WANDB_KEY_FILE = _C["WANDB_KEY_FILE"]  # in the trainer container: the W&B API key, mounted read-only by fab launch
COMPILE_CACHE_ROOT = _C["COMPILE_CACHE_ROOT"]  # torch.compile's caches, one directory per key (job.compile_cache)
COMPILE_CACHE_DIR = _C["COMPILE_CACHE_DIR"]  # in the log dir: the same, where the persistent file system is not mounted
RUN_DIR_FORMAT = _C["RUN_DIR_PREFIX"] + "{seed}"  # in the log dir: one of several runs (--runs N), by its seed
STOP_REQUEST_FILE = _C["STOP_REQUEST_FILE"]  # in the log dir: the cost guard asks the trainer to checkpoint and stop
TRAIN_EXIT_FILE = _C["TRAIN_EXIT_FILE"]  # in the log dir: the trainer container's exit status, for the cost guard
SYNCED_MARKER = _C["SYNCED_PREFIX"] + "{name}"  # in the log dir: NAME is verified in S3 (written by the S3 sidecar)
FETCHED_MARKER = _C["FETCHED_PREFIX"] + "{name}"  # in the log dir: NAME is verified on the laptop (written by fetch-weights)
TIMELINE_FILE = _C["TIMELINE_FILE"]  # in the log dir: the launch's stages and their seconds, written by fab launch
PREPARE_MANIFEST = _C["PREPARE_MANIFEST"]  # beside the shards: job.prepare's record of what it wrote and whether it finished


def run_dirs(first_seed: int, runs: int) -> list[tuple[int, str]]:
    """--runs N: each run's seed (the run's --seed, then the next ones) and the name of its log dir in the log dir."""
    return [(seed, RUN_DIR_FORMAT.format(seed=seed)) for seed in range(first_seed, first_seed + runs)]


# ---- exit statuses ----------------------------------------------------------------------------------------
# One table for the trainer (job.errors, the supervisor), the sidecars, the launcher's explanation of a container's
# status and the docs (`python -m job.contract exit-codes`). A process killed by signal N exits 128+N.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_RANK_LOST = 4
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_KILLED = 128 + signal.SIGKILL

EXIT_STATUSES = {
    EXIT_OK: "done, or stopped with a final checkpoint (Ctrl-C, `fab stop`, `docker stop`, the cost guard's stop request)",
    EXIT_FAILED: "a failure with no status of its own: a bug (its traceback is above), or a command that says why in its last "
                 "line (a `fab` prompt not answered yes, `python -m job.prepare verify` finding a bad shard, the S3 sidecar "
                 "stopped before its uploads were confirmed)",
    EXIT_USER_ERROR: "a problem the user can fix (a setting, a missing or unreadable file, a full disk, out of GPU memory, a "
                     "checkpoint that could not be written), named with its fix in one `error:` line",
    EXIT_DIVERGED: "training diverged: the loss or the weights stopped being finite; nothing after the last good checkpoint was saved",
    EXIT_RANK_LOST: "a rank lost contact with another: a machine of the run went away, or the network between them",
    EXIT_INTERRUPTED: "interrupted: a second Ctrl-C aborted the run without a final checkpoint",
    EXIT_KILLED: "killed by SIGKILL: the kernel's out-of-memory killer (the machine's RAM), or a stop that outlasted its timeout",
}

# The reasons of the trainer's "end" event (metrics.jsonl) and the exit status each goes with: the cost guard acts
# on the event before the container's exit status exists.
END_REASONS = {"done": EXIT_OK, "stopped": EXIT_OK, "diverged": EXIT_DIVERGED, "checkpoint-failed": EXIT_USER_ERROR}


def exit_meaning(code: int) -> str:
    """What an exit status means, from the table; other statuses above 128 name their signal."""
    if code in EXIT_STATUSES:
        return EXIT_STATUSES[code]
    if code > 128 and code - 128 in signal.valid_signals():
        return f"killed by {signal.Signals(code - 128).name}"
    return "not one of the statuses the project uses: the output above says more"


def exit_statuses_markdown() -> str:
    rows = ["| Status | Meaning |", "| --- | --- |"]
    rows += [f"| {code} | {meaning} |" for code, meaning in sorted(EXIT_STATUSES.items())]
    rows.append("| 128+N | killed by signal N (143: SIGTERM, 139: SIGSEGV, a crash in native code) |")
    return "\n".join(rows) + "\n"


# ---- data on the hub (each recipe's card, job/recipes/, names the corpus it trains on) ---------------------------------------------------
# Corpora published already tokenized with GPT-2's tokenizer (by modded-nanogpt's maintainers), in llm.c's .bin
# format: `python -m job.prepare NAME --out DIR` downloads them (job/prepare/hub.py), `fab launch` does so by default.
@dataclass(frozen=True)
class HubShards:
    repo: str  # a dataset repo on the Hugging Face hub
    prefix: str  # its files: {prefix}_val_000000.bin, then {prefix}_train_000001.bin, ... (1-based, 6 digits)
    subdir: str  # the directory under the persistent mount that fab launch downloads it to
    tokenize: str  # the job.prepare source that makes the same corpus from text (the slow path: --tokenize)
    shard_tokens: int = 100_000_000  # every train shard but the last holds this many tokens


HUB_SHARDS = {
    "fineweb-gpt2": HubShards("kjj0/fineweb10B-gpt2", "fineweb", "fineweb10B-gpt2", "fineweb"),
    "finewebedu-gpt2": HubShards("kjj0/finewebedu10B-gpt2", "finewebedu", "finewebedu10B-gpt2", "fineweb-edu"),
}
# Where the tokenizing path writes each corpus under the persistent mount (fineweb-edu: build-nanogpt's directory).
TOKENIZED_SUBDIR = {"fineweb-edu": DATA_DIR.rsplit("/", 1)[-1], "fineweb": "fineweb10B"}


class _ArgumentParser(argparse.ArgumentParser):
    """job.errors.ArgumentParser's one `error:` line and exit status, for this module's own command: it imports no
    module of the project, job.errors included (which imports it)."""

    def error(self, message):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def main(argv: list[str] | None = None) -> None:
    p = _ArgumentParser(prog="python -m job.contract", description="Print a table of the container contract for the docs.")
    p.add_argument("table", choices=["exit-codes"], help="exit-codes: what each exit status means, as a Markdown table")
    p.parse_args(argv)
    sys.stdout.write(exit_statuses_markdown())


if __name__ == "__main__":
    main()
