"""The container contract, read from contract.env beside this file (the single source of truth).

Inside the image the trainer runs from WORKDIR, reads shards from the persistent filesystem mounted at
PERSISTENT and writes logs and checkpoints to LOG_DIR (the host's ~/model_weights in the old workflow).
The Makefile includes the same file and hands the values to docker build, so nothing is copied by hand.
"""

from __future__ import annotations

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
COMPILE_CACHE_DIR = _C["COMPILE_CACHE_DIR"]  # in the log dir: torch.compile's caches, kept across container restarts
STOP_REQUEST_FILE = _C["STOP_REQUEST_FILE"]  # in the log dir: the cost guard asks the trainer to checkpoint and stop
