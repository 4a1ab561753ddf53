"""The container contract: the one place that names paths shared by docker/, job/ and infra/.

Inside the image the trainer runs from WORKDIR, reads shards from the persistent filesystem mounted at
PERSISTENT and writes logs and checkpoints to LOG_DIR (the host's ~/model_weights in the old workflow).
"""

WORKDIR = "/app"
PERSISTENT = "/persistent"
DATA_DIR = "/persistent/edu_fineweb10B"  # where build-nanogpt's fineweb.py left the shards
LOG_DIR = "/app/log"
IMAGE_NAME = "nanogpt-train"

# Log-dir layout (what the trainer writes, what fetch-weights and plotting read).
CHECKPOINT_GLOB = "model_*.pt"
CHECKPOINT_FORMAT = "model_{step:05d}.pt"
METRICS_FILE = "metrics.jsonl"  # one JSON object per event
HUMAN_LOG_FILE = "train.log"  # the human lines printed on stdout
NANOGPT_LOG_FILE = "log.txt"  # build-nanogpt's own format ("{step} train {loss}"), for old tools
