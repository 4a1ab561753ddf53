"""The image's default command: one trainer process per visible GPU.

    python -m job.supervisor [trainer flags]        # torchrun --standalone --nproc_per_node=<GPUs> -m job.train [flags]

NPROC overrides the count (e.g. NPROC=2 for two CPU processes); with no GPU and no NPROC it runs one
CPU process and says so.

    python -m job.supervisor --runs N [trainer flags]   # the same run N times, seeds --seed, --seed + 1, ...

trains them one after another, each in its own log dir under --log-dir (seed-S), with one compile cache
(run_seeds); `python -m job.stats LOGDIR` then gives their statistics as the speedrun's record board does.

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
import tempfile
from collections.abc import Callable

from job import contract
from job.errors import UserError, number

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


class Supervisor:
    """Runs the job in a child process (torchrun's agent, run_agent, or a single trainer) and passes stops on to the
    trainers; one child at a time, so that several runs can follow one another (run_seeds)."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.via_agent = True
        self.stops: list[int] = []  # the signals received once a child was started
        self.early: list[int] = []  # stops that ended an agent before its workers existed
        for sig in (*FORWARDED, signal.SIGHUP, signal.SIGQUIT):  # first, so no stop can orphan a child
            signal.signal(sig, self.forward)

    def forward(self, signum: int, frame) -> None:
        child = self.child
        if child is None:  # before the first child exists (a stop in the first instant): nothing to pass it on to
            raise SystemExit(128 + signum)
        self.stops.append(signum)
        if child.poll() is not None:
            return  # between two runs: run_seeds sees the stop and starts no other
        if not self.via_agent:
            targets = [child.pid]  # a single trainer: it stops as it does for any stop
        else:
            targets = children(child.pid)
            if not targets and signum in FORWARDED:
                # Still meeting the other machines: nothing trained, nothing to save. SIGTERM ends the agent.
                print(f"received {signal.Signals(signum).name} before training started: exiting", file=sys.stderr, flush=True)
                self.early.append(signum)
                child.send_signal(signal.SIGTERM)
                return
            if signum not in FORWARDED:
                targets = [child.pid]  # SIGHUP/SIGQUIT: torchrun shuts everything down
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def start(self, cmd: list[str], via_agent: bool) -> int:
        """Run `cmd` as the child and wait for it; its exit status (a signal -N as 128+N, said in one line)."""
        self.via_agent = via_agent
        seen = len(self.stops)
        # Its own session: a Ctrl-C in the terminal reaches only this process, which decides who gets it.
        self.child = subprocess.Popen(cmd, start_new_session=True)
        if len(self.stops) > seen:  # a stop came while the child was being started: it is meant for this child too
            self.forward(self.stops.pop(), None)
        code = self.child.wait()  # handlers run while waiting (PEP 475 retries the wait)
        if self.early:
            return 128 + self.early[0]
        if code < 0:  # the child itself was killed (the kernel's OOM killer, say); a signal -N exits as 128+N
            who = "torchrun's agent" if via_agent else "the trainer"
            print(f"error: {who} was killed by {signal.Signals(-code).name}: {'the trainers' if via_agent else 'its'} output is above",
                  file=sys.stderr, flush=True)
            return 128 - code
        return code


def agent_command(args: list[str]) -> list[str]:
    """torchrun's agent (run_agent) in a process of its own, with torchrun's arguments `args`."""
    return [sys.executable, "-c", "import sys; from job.supervisor import run_agent; sys.exit(run_agent(sys.argv[1:]))", *args]


def with_log_dir(start: Callable[[list[str]], int], args: list[str]) -> int:
    """start(args) with torchrun's --log-dir a temporary directory of this process, removed when start returns, however
    the agent ended (a stop during the rendezvous ends it by SIGTERM). torchrun keeps each start's per-rank files there
    (error.json; stdout and stderr only when redirected, which this job never asks for), and left to itself makes the
    directory in $TMPDIR and never removes it: a run on a machine's own Python, not in a throwaway container, would
    leave one behind at every start."""
    with tempfile.TemporaryDirectory(prefix="torchelastic_") as logs:
        return start(["--log-dir", logs, *args])


def supervise(args: list[str]) -> int:
    """Run the agent in a child process and pass stops on to the workers; the job's exit status."""
    return with_log_dir(lambda a: Supervisor().start(agent_command(a), via_agent=True), args)


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


def take_runs(argv: list[str]) -> tuple[int | None, list[str]]:
    """The supervisor's own `--runs N`, wherever it is among the trainer's flags, and those flags without it."""
    for i, arg in enumerate(argv):
        if arg == "--runs" or arg.startswith("--runs="):
            inline = arg.startswith("--runs=")
            text = arg.partition("=")[2] if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            return number(text, "--runs", int, 1), argv[:i] + argv[i + (1 if inline else 2):]
    return None, argv


def without(argv: list[str], *flags: str) -> list[str]:
    """`argv` without the flags named and their values (`--flag VALUE` or `--flag=VALUE`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            out.append(arg)
    return out


def run_seeds(runs: int, argv: list[str], gpus: int, nproc_env: str | None) -> int:
    """--runs N: the same run N times, one after another, with the seeds --seed, --seed + 1, ..., each in its own log
    dir under --log-dir (job.contract.run_dirs), all sharing one compile cache, so that the second run and the later
    ones take their compiled graphs from it. A stop ends the current run as it ends any (with a checkpoint) and starts
    no other; the same command again resumes it and trains the rest (a finished run has nothing left to do). The
    first run that fails ends them all, with its status."""
    from job import compile_cache, config

    try:
        cfg = config.parse_args(argv, files=False)  # the seed and log dir the trainer would take
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return contract.EXIT_USER_ERROR
    # One cache for every run: the root the whole --log-dir would have, under which each run's trainer makes (or checks)
    # the directory for its key once past its own refusals, so that a refused first run leaves no cache behind. A root
    # or a TORCHINDUCTOR_CACHE_DIR set by the user wins, as in any run.
    os.environ.setdefault(compile_cache.ROOT_ENV, str(compile_cache.root_for(cfg.log_dir).absolute()))
    sup = Supervisor()
    for i, (seed, name) in enumerate(contract.run_dirs(cfg.seed, runs), 1):
        log_dir = os.path.join(cfg.log_dir, name)
        run_argv = [*without(argv, "--seed", "--log-dir"), "--seed", str(seed), "--log-dir", log_dir]
        args = torchrun_args(run_argv, gpus, nproc_env, dict(os.environ))
        print(f"run {i} of {runs}: seed {seed}, log dir {log_dir}", flush=True)
        print(f"$ python -m job.train {' '.join(run_argv)}" if args is None else f"$ torchrun {' '.join(args)}", flush=True)
        code = sup.start([sys.executable, "-m", "job.train", *run_argv] if args is None else agent_command(args), via_agent=args is not None)
        if code != 0:
            return code
        if sup.stops:
            print(f"stopped at run {i} of {runs} (seed {seed}): the same command resumes it and trains the rest", flush=True)
            return 0
    print(f"{runs} runs done, in {os.path.join(cfg.log_dir, contract.RUN_DIR_FORMAT.format(seed='*'))}: "
          f"`python -m job.stats {cfg.log_dir}` gives their statistics", flush=True)
    return 0


def main() -> None:
    try:
        runs, argv = take_runs(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(contract.EXIT_USER_ERROR)
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
    if runs is not None:
        sys.exit(run_seeds(runs, argv, gpus, nproc_env))
    args = torchrun_args(argv, gpus, nproc_env, dict(os.environ))
    if args is None:
        cmd = [sys.executable, "-m", "job.train", *argv]
        print(f"$ python {' '.join(cmd[1:])}", flush=True)
        os.execv(cmd[0], cmd)
    print(f"$ torchrun {' '.join(args)}", flush=True)
    # Finding the workers needs Linux's /proc, as in the image; elsewhere torchrun's agent keeps its own handling.
    sys.exit(supervise(args) if os.path.isdir("/proc") else with_log_dir(lambda a: run_agent(a, own_signals=True), args))


if __name__ == "__main__":
    main()
