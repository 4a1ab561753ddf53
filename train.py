"""The old workflow's entry point: `torchrun --standalone --nproc_per_node=8 train.py` in /app still works."""

from job.train import entry

if __name__ == "__main__":
    entry()
