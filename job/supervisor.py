"""The image's default command: one trainer process per visible GPU.

    python -m job.supervisor [trainer flags]        # torchrun --standalone --nproc_per_node=<GPUs> -m job.train [flags]

NPROC overrides the count (e.g. NPROC=2 for two CPU processes); with no GPU and no NPROC it runs one
CPU process and says so.

Multi-node (set by `fab launch --hosts A,B`): NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT give torchrun
--nnodes/--node-rank and a rendezvous whose TCP store runs on the first host. Node ranks are fixed (static
rendezvous) rather than assigned by c10d's dynamic rendezvous, which orders nodes by address: the first host
must be node 0, because global rank 0 writes the checkpoints and logs there and its log is the one streamed.

Several processes run under torchrun's own agent, started by this process (not exec'd) for three things the
`torchrun` command gets wrong for this trainer:
- A stop: torchrun answers SIGTERM/SIGINT by signalling the workers and SIGKILLing them 30 s later, which can cut
  the final checkpoint (1.5 GB to network storage) short, then exits 1 with a traceback. Here each SIGTERM/SIGINT
  is passed on to every worker once (the trainer's own rules apply: the first finishes the step and saves, a second
  Ctrl-C aborts), the agent waits for them as for any run, and the exit status is theirs: 0 after a clean stop.
  `docker stop -t` stays the one deadline. Before the workers exist (multi-node rendezvous) a stop ends the agent.
- A user mistake or a diverged run: the worker's one `error:` line, then the worker's exit status (2 or 3) rather
  than torchrun's exit 1 and its ChildFailedError traceback, so `.train-exit` on the box tells them apart.
- Any other failure: one line naming the rank and its status, after the worker's own output.

Why two processes (this supervisor, and the agent in a child of its own): the agent spends the rendezvous blocked
in C++, where no Python signal handler runs, so it could not be the one to hear a stop. The supervisor only waits,
and it finds the workers as the agent's children.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

from job import contract

# Exit statuses whose worker has already said everything in one line (a user mistake, a diverged run, a rank that
# lost another, a second Ctrl-C): nothing to add. job.contract.EXIT_STATUSES says what each means.
SELF_EXPLAINED = {contract.EXIT_USER_ERROR, contract.EXIT_DIVERGED, contract.EXIT_RANK_LOST, contract.EXIT_INTERRUPTED}
FORWARDED = (signal.SIGTERM, signal.SIGINT)
# What a worker's fatal signal most often means, for the launcher's one line.
SIGNAL_CAUSES = {
    signal.SIGKILL: "killed outright, most often by the kernel's out-of-memory killer: the machine's RAM, not the GPU's "
                    "(`dmesg` on the box says)",
    signal.SIGSEGV: "a crash inside native code (torch, NCCL or the driver)",
    signal.SIGABRT: "a crash inside native code (torch, NCCL or the driver)",
    signal.SIGBUS: "a bus error: shared memory (/dev/shm) too small for the container, or a file mapped from disk that went away",
}


def torchrun_args(argv: list[str], gpus: int, nproc_env: str | None, env: dict[str, str] | None = None) -> list[str] | None:
    """torchrun's arguments for this machine, or None for a single process (no torchrun at all)."""
    env = env or {}
    nproc = int(nproc_env) if nproc_env else max(gpus, 1)
    nnodes = int(env.get("NNODES", "1"))
    if nnodes > 1:
        rdzv = [f"--nnodes={nnodes}", f"--node-rank={env['NODE_RANK']}", f"--master-addr={env['MASTER_ADDR']}",
                f"--master-port={env['MASTER_PORT']}"]
        return [*rdzv, f"--nproc_per_node={nproc}", "-m", "job.train", *argv]
    if nproc <= 1:
        return None
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "job.train", *argv]


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc): the agent's workers, which it starts in their own sessions."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def supervise(args: list[str]) -> int:
    """Run the agent (run_agent) in a child process and pass stops on to the workers; the job's exit status."""
    cmd = [sys.executable, "-c", "import sys; from job.supervisor import run_agent; sys.exit(run_agent(sys.argv[1:]))", *args]
    agent: subprocess.Popen | None = None
    early = []

    def forward(signum: int, frame) -> None:
        if agent is None:  # before the agent exists (a stop in the first instant): nothing to pass it on to
            raise SystemExit(128 + signum)
        workers = children(agent.pid)
        if not workers and agent.poll() is None and signum in FORWARDED:
            # Still meeting the other machines: nothing trained, nothing to save. SIGTERM ends the agent.
            print(f"received {signal.Signals(signum).name} before training started: exiting", file=sys.stderr, flush=True)
            early.append(signum)
            agent.send_signal(signal.SIGTERM)
            return
        for pid in workers if signum in FORWARDED else [agent.pid]:  # SIGHUP/SIGQUIT: torchrun shuts everything down
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (*FORWARDED, signal.SIGHUP, signal.SIGQUIT):  # first, so no stop can orphan the agent
        signal.signal(sig, forward)
    # Its own session: a Ctrl-C in the terminal reaches only this process, which decides who gets it.
    agent = subprocess.Popen(cmd, start_new_session=True)
    code = agent.wait()  # handlers run while waiting (PEP 475 retries the wait)
    if early:
        return 128 + early[0]
    if code < 0:  # the agent itself was killed (the kernel's OOM killer, say); a signal -N exits as 128+N
        print(f"error: torchrun's agent was killed by {signal.Signals(-code).name}: the trainers' output is above",
              file=sys.stderr, flush=True)
        return 128 - code
    return code


class _QuietAgent(logging.Filter):
    # The agent logs "failed (exitcode: N) local_rank: ..." for a failure and "Sending process P closing signal"
    # for each worker it then stops: run_agent's summary says it once.
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "failed (exitcode" not in msg and "closing signal" not in msg


def first_failure(failures: dict) -> tuple[int, object]:
    """The failure to report: the earliest, leaving out the consequences of another rank's failure, a rank that lost
    it (RankLost) and one the agent then stopped (SIGTERM): the agent can find them in the same poll as the cause,
    and their timestamps tie to the second."""
    consequences = (contract.EXIT_RANK_LOST, -signal.SIGTERM)
    causes = {r: f for r, f in failures.items() if f.exitcode not in consequences} or failures
    rank = min(causes, key=lambda r: (causes[r].timestamp, r))
    return rank, causes[rank]


def run_agent(args: list[str], own_signals: bool = False) -> int:
    """Run torchrun's elastic agent here with `args`; the job's exit status. With own_signals it handles SIGTERM
    and SIGINT itself, as `torchrun` does."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent installs handlers for --signals-to-handle when it starts the workers. SIGTERM and SIGINT are left
    # out: the supervisor passes those to the workers. SIGHUP/SIGQUIT keep torchrun's meaning (shut everything down).
    if not own_signals:
        args = ["--signals-to-handle", "SIGHUP,SIGQUIT", *args]
    # torchrun's default for its workers, set here so it does not print a banner about it on every start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietAgent())
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        rank, failure = first_failure(e.failures)
        code = failure.exitcode
        status = 128 - code if code < 0 else code  # a signal -N exits as 128+N, as a shell reports it
        if status not in SELF_EXPLAINED:
            what = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"status {code}"
            cause = SIGNAL_CAUSES.get(-code)
            print(f"error: training failed: rank {rank} on {socket.gethostname()} exited with {what}"
                  + (f": {cause}" if cause else "") + " (its output is above)", file=sys.stderr, flush=True)
        return status
    return 0


def main() -> None:
    import torch

    gpus = torch.cuda.device_count()
    nproc_env = os.environ.get("NPROC")
    if nproc_env is not None and not nproc_env.isdigit():
        print(f"error: NPROC must be a number of processes, got {nproc_env!r}", file=sys.stderr)
        sys.exit(contract.EXIT_USER_ERROR)
    if not gpus and not nproc_env:
        print("no GPU visible (run with --gpus all for the GPUs): training on the CPU", file=sys.stderr, flush=True)
    missing = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if int(os.environ.get("NNODES", "1") or 1) > 1 and not os.environ.get(k)]
    if missing:
        print(f"error: NNODES > 1 needs {', '.join(missing)} too (fab launch --hosts sets them)", file=sys.stderr)
        sys.exit(contract.EXIT_USER_ERROR)
    args = torchrun_args(sys.argv[1:], gpus, nproc_env, dict(os.environ))
    if args is None:
        cmd = [sys.executable, "-m", "job.train", *sys.argv[1:]]
        print(f"$ python {' '.join(cmd[1:])}", flush=True)
        os.execv(cmd[0], cmd)
    print(f"$ torchrun {' '.join(args)}", flush=True)
    # Finding the workers needs Linux's /proc, as in the image; elsewhere torchrun's agent keeps its own handling.
    sys.exit(supervise(args) if os.path.isdir("/proc") else run_agent(args, own_signals=True))


if __name__ == "__main__":
    main()
