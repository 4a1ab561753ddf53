"""The image's default command: one trainer process per visible GPU.

    python -m job.launch [trainer flags]        # torchrun --standalone --nproc_per_node=<GPUs> -m job.train [flags]

NPROC overrides the count (e.g. NPROC=2 for two CPU processes); with no GPU and no NPROC it runs one
CPU process and says so.
"""

from __future__ import annotations

import os
import sys


def command(argv: list[str], gpus: int, nproc_env: str | None) -> list[str]:
    nproc = int(nproc_env) if nproc_env else gpus
    if nproc <= 1:
        return [sys.executable, "-m", "job.train", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "job.train", *argv]


def main() -> None:
    import torch

    gpus = torch.cuda.device_count()
    nproc_env = os.environ.get("NPROC")
    if nproc_env is not None and not nproc_env.isdigit():
        print(f"error: NPROC must be a number of processes, got {nproc_env!r}", file=sys.stderr)
        sys.exit(2)
    if not gpus and not nproc_env:
        print("no GPU visible (run with --gpus all for the GPUs): training on the CPU", file=sys.stderr, flush=True)
    cmd = command(sys.argv[1:], gpus, nproc_env)
    print(f"$ python {' '.join(cmd[1:])}", flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
