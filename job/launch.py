"""The image's default command: one trainer process per visible GPU.

    python -m job.launch [trainer flags]        # torchrun --standalone --nproc_per_node=<GPUs> -m job.train [flags]

NPROC overrides the count (e.g. NPROC=2 for two CPU processes); with no GPU and no NPROC it runs one
CPU process and says so.

Multi-node (set by `fab launch --hosts A,B`): NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT give torchrun
--nnodes/--node-rank and a rendezvous whose TCP store runs on the first host. Node ranks are fixed (static
rendezvous) rather than assigned by c10d's dynamic rendezvous, which orders nodes by address: the first host
must be node 0, because global rank 0 writes the checkpoints and logs there and its log is the one streamed.
"""

from __future__ import annotations

import os
import sys


def command(argv: list[str], gpus: int, nproc_env: str | None, env: dict[str, str] | None = None) -> list[str]:
    env = env or {}
    nproc = int(nproc_env) if nproc_env else max(gpus, 1)
    nnodes = int(env.get("NNODES", "1"))
    if nnodes > 1:
        rdzv = [f"--nnodes={nnodes}", f"--node-rank={env['NODE_RANK']}", f"--master-addr={env['MASTER_ADDR']}",
                f"--master-port={env['MASTER_PORT']}"]
        return [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={nproc}", "-m", "job.train", *argv]
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
    missing = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if int(os.environ.get("NNODES", "1") or 1) > 1 and not os.environ.get(k)]
    if missing:
        print(f"error: NNODES > 1 needs {', '.join(missing)} too (fab launch --hosts sets them)", file=sys.stderr)
        sys.exit(2)
    cmd = command(sys.argv[1:], gpus, nproc_env, dict(os.environ))
    print(f"$ python {' '.join(cmd[1:])}", flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
