"""The training container on the box: prepare data, start, stream logs, report status, stop.

Plain functions over a Connection and the Box that preflight found; the fab tasks are thin wrappers. Containers
carry labels (nanogpt.role=train|sync, nanogpt.node-rank) so logs/status/stop find them whatever their name.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import sys
from dataclasses import dataclass, field

from infra.box import Box
from infra.ssh import run, stream
from job import contract
from job.errors import UserError

ROLE = "nanogpt.role"
RANK = "nanogpt.node-rank"
# GPU runs: unlimited locked memory (pinned buffers, NCCL) and a 64 MiB stack, as NVIDIA recommends for PyTorch.
GPU_FLAGS = "--gpus all --ulimit memlock=-1 --ulimit stack=67108864"
SUPERVISOR = "job.supervisor"  # the image's default command: one trainer process per GPU under torchrun
STOP_TIMEOUT = 300  # seconds `docker stop` waits for the final checkpoint (1.5 GB to network storage) before SIGKILL


@dataclass
class Job:
    """What to run; the same on every node of a multi-node run."""

    preset: str = "gpt2"
    steps: int | None = None
    nproc: int | None = None  # processes per node; None: one per GPU
    trainer_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    name: str = contract.CONTAINER_NAME
    mounts: dict[str, str] = field(default_factory=dict)  # a file on the box -> its read-only path in the container (secrets)

    @property
    def data_subdir(self) -> str:
        """Under the persistent mount: build-nanogpt's FineWeb-edu dir, or the bundled corpus for the tiny preset."""
        return "tinyshakespeare" if self.preset == "tiny" else posixpath.basename(contract.DATA_DIR)

    def prepare_command(self) -> str:
        out = f"{contract.PERSISTENT}/{self.data_subdir}"
        if self.preset == "tiny":
            return f"python -m job.prepare text job/assets/tinyshakespeare.txt --out {out} --shard-size 50000"
        return f"python -m job.prepare fineweb-edu --out {out}"

    def trainer_command(self) -> list[str]:
        args = ["python", "-m", SUPERVISOR, "--preset", self.preset, "--data-dir", f"{contract.PERSISTENT}/{self.data_subdir}",
                "--log-dir", contract.LOG_DIR, "--resume", "auto"]
        if self.steps:
            args += ["--max-steps", str(self.steps)]
        return args + self.trainer_args


def docker_base(box: Box, *, detach: bool, name: str | None, labels: dict[str, str], network_host: bool = False,
                gpus: bool = True) -> str:
    """`docker run` with what every container of ours shares; gpus=False for those that never touch a GPU."""
    # --init: a tiny init as PID 1 forwards `docker stop`'s SIGTERM. Without it torchrun is PID 1, and the kernel drops
    # signals to a PID 1 that has no handler yet, so a stop in the first seconds would wait for the SIGKILL.
    parts = [box.docker, "run", "-d" if detach else "--rm", "--init", "--user", f"{box.uid}:{box.gid}", "--ipc=host",
             "-v", shlex.quote(f"{box.data_dir}:{contract.PERSISTENT}"), "-v", shlex.quote(f"{box.weights_dir}:{contract.LOG_DIR}")]
    if name:
        parts += ["--name", shlex.quote(name)]
    parts += [f"--label {shlex.quote(f'{k}={v}')}" for k, v in labels.items()]
    if network_host:
        parts.append("--network host")  # multi-node rendezvous and NCCL/Gloo; sidecars reach S3 and the API as the host does
    if gpus and box.use_gpus:
        parts.append(GPU_FLAGS)
    return " ".join(parts)


def has_shards(conn, box: Box, job: Job) -> bool:
    """Ready to train: train and val shards, and, where job.prepare wrote them, its manifest says it finished (an
    interrupted prepare leaves complete shards but not all of them; running prepare again resumes it). Shards made
    elsewhere (build-nanogpt's fineweb.py) have no manifest and count as they are."""
    d = shlex.quote(posixpath.join(box.data_dir, job.data_subdir))
    if run(conn, f"ls {d}/*train*.npy >/dev/null 2>&1 && ls {d}/*val*.npy >/dev/null 2>&1", warn=True).failed:
        return False
    manifest = run(conn, f"cat {d}/{contract.PREPARE_MANIFEST} 2>/dev/null", warn=True)
    if not manifest.ok:
        return True
    try:
        return json.loads(manifest.stdout).get("complete") is True
    except ValueError:
        return False


def ensure_data(conn, box: Box, image: str, job: Job, out=sys.stdout) -> None:
    if has_shards(conn, box, job):
        out.write(f"data: shards found in {box.data_dir}/{job.data_subdir} on {conn.host}\n")
        return
    out.write(f"data: no complete set of shards in {box.data_dir}/{job.data_subdir} on {conn.host}: preparing them there "
              f"({box.cpus} cores; an interrupted preparation resumes)\n")
    cmd = f"{docker_base(box, detach=False, name=None, labels={ROLE: 'prepare'}, gpus=False)} {shlex.quote(image)} {job.prepare_command()}"
    status = stream(conn, f"{cmd} 2>&1", out=out)
    if status != 0:
        raise UserError(f"data preparation failed on {conn.host} (exit {status}): its output is above; fix it and launch again")


def containers(conn, docker: str, role: str = "train", all_states: bool = False) -> list[dict]:
    """Our containers on the box, node rank 0 first: [{name, state, status, rank}]."""
    fmt = '{{.Names}}\t{{.State}}\t{{.Status}}\t{{.Label "' + RANK + '"}}'
    res = run(conn, f"{docker} ps {'-a ' if all_states else ''}--filter label={ROLE}={role} --format {shlex.quote(fmt)}", warn=True)
    rows = [dict(zip(("name", "state", "status", "rank"), line.split("\t"), strict=False)) for line in res.stdout.splitlines() if line.strip()]
    return sorted(rows, key=lambda r: (r.get("rank") or "0", r["name"]))


def running(conn, docker: str, role: str = "train") -> list[dict]:
    return [c for c in containers(conn, docker, role) if c["state"] == "running"]


def refuse_if_active(conn, docker: str) -> None:
    active = running(conn, docker)
    if active:
        raise UserError(f"a training run is already active on {conn.host} ({active[0]['name']}, {active[0]['status']}): "
                        f"watch it with `fab logs --host {conn.user}@{conn.host}`, or pass --restart to stop it and start again")


def start(conn, box: Box, image: str, job: Job, *, nnodes: int = 1, node_rank: int = 0, master: tuple[str, int] | None = None,
          out=sys.stdout) -> str:
    """Start the trainer detached (the caller has checked that none runs, or stopped it). Returns the container name."""
    name = job.name if nnodes == 1 else f"{job.name}-node{node_rank}"
    run(conn, f"{box.docker} rm -f {shlex.quote(name)} >/dev/null 2>&1", warn=True)  # a finished run's container holds the name
    env = dict(job.env)
    if job.nproc:
        env["NPROC"] = str(job.nproc)
    if nnodes > 1:
        env.update(NNODES=str(nnodes), NODE_RANK=str(node_rank), MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
    flags = docker_base(box, detach=True, name=name, labels={ROLE: "train", RANK: str(node_rank)}, network_host=nnodes > 1)
    flags += "".join(f" -e {shlex.quote(f'{k}={v}')}" for k, v in env.items())
    flags += "".join(f" -v {shlex.quote(f'{src}:{dst}:ro')}" for src, dst in job.mounts.items())
    cmd = f"{flags} {shlex.quote(image)} {' '.join(shlex.quote(a) for a in job.trainer_command())}"
    res = run(conn, cmd, warn=True)
    if res.failed:
        raise UserError(f"docker run failed on {conn.host}: {' '.join((res.stderr or res.stdout).split())[:300]}")
    out.write(f"started {name} on {conn.host}" + (f" (node {node_rank} of {nnodes})" if nnodes > 1 else "") + "\n")
    return name


def find_train_container(conn, docker: str) -> dict:
    found = containers(conn, docker, all_states=True)
    if not found:
        raise UserError(f"no training container on {conn.host}: start one with `fab launch --host {conn.user}@{conn.host}`")
    live = [c for c in found if c["state"] == "running"]
    return (live or found)[0]


def stream_logs(conn, docker: str, name: str, tail: int | str = "all", follow: bool = True, out=sys.stdout) -> int:
    """Copy the container's output here until it exits (or Ctrl-C, which the caller turns into a hint)."""
    return stream(conn, f"{docker} logs {'-f ' if follow else ''}--tail {shlex.quote(str(tail))} {shlex.quote(name)} 2>&1", out=out)


def exit_code(conn, docker: str, name: str) -> int | None:
    res = run(conn, f"{docker} inspect --format '{{{{.State.Status}}}} {{{{.State.ExitCode}}}}' {shlex.quote(name)}", warn=True)
    parts = res.stdout.split()
    return int(parts[1]) if res.ok and parts and parts[0] == "exited" else None


def weights_mount(conn, docker: str, name: str) -> str | None:
    fmt = '{{range .Mounts}}{{if eq .Destination "' + contract.LOG_DIR + '"}}{{.Source}}{{end}}{{end}}'
    res = run(conn, f"{docker} inspect --format {shlex.quote(fmt)} {shlex.quote(name)}", warn=True)
    return res.stdout.strip() or None


def newest_checkpoint(conn, docker: str, name: str, weights: str | None = None) -> str | None:
    """`model_00100.pt (1,455 MiB, 2026-11-26T03:10)` for the newest checkpoint in the container's weights dir."""
    weights = weights or weights_mount(conn, docker, name)
    if not weights:
        return None
    cmd = f"cd {shlex.quote(weights)} && ls -l --time-style=+%Y-%m-%dT%H:%M {contract.CHECKPOINT_GLOB} 2>/dev/null | tail -1"
    parts = run(conn, cmd, warn=True).stdout.split()
    return f"{parts[-1]} ({int(parts[4]) / 2**20:,.0f} MiB, {parts[5]})" if len(parts) >= 7 else None


def status(conn, docker: str) -> dict:
    """Running?, step, loss, tok/s, ETA, newest checkpoint, GPU use: read from docker, metrics.jsonl and nvidia-smi."""
    c = find_train_container(conn, docker)
    info = {"host": conn.host, "container": c["name"], "state": c["state"], "since": c["status"]}
    weights = weights_mount(conn, docker, c["name"])
    if weights:
        info["weights_dir"] = weights
        tail = run(conn, f"tail -n 400 {shlex.quote(weights + '/' + contract.METRICS_FILE)}", warn=True).stdout
        info.update(summarize_metrics(tail.splitlines()))
        info["checkpoint"] = newest_checkpoint(conn, docker, c["name"], weights)
    gpu = run(conn, "nvidia-smi --query-gpu=utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits", warn=True)
    if gpu.ok and gpu.stdout.strip():
        rows = [[int(float(v)) for v in line.split(",")] for line in gpu.stdout.splitlines() if line.strip()]
        info["gpus"] = f"{len(rows)} GPUs, {sum(r[0] for r in rows) / len(rows):.0f}% busy, " \
                       f"{sum(r[1] for r in rows) / 1024:.0f}/{sum(r[2] for r in rows) / 1024:.0f} GiB"
    return info


def summarize_metrics(lines: list[str]) -> dict:
    last: dict[str, dict] = {}
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if isinstance(ev, dict) and "event" in ev:
            last[ev["event"]] = ev
    out: dict = {}
    train = last.get("train")
    if train:
        out.update(step=train["step"], loss=round(train["loss"], 4), tok_s=train.get("tok_s"))
        cfg = last.get("start", {}).get("config", {})
        max_steps = cfg.get("max_steps")
        if max_steps and train.get("ms"):
            from job.metrics import format_eta

            out["max_steps"] = max_steps
            out["eta"] = format_eta(train["ms"] / 1000 * (max_steps - train["step"] - 1))
    if "val" in last:
        out["val_loss"] = round(last["val"]["loss"], 4)
    if "hellaswag" in last:
        out["hellaswag"] = last["hellaswag"].get("acc_norm")
    if "end" in last:
        out["ended"] = last["end"].get("reason")
    return out


def format_status(info: dict) -> str:
    keys = ("container", "state", "since", "step", "max_steps", "loss", "val_loss", "hellaswag", "tok_s", "eta", "checkpoint", "gpus", "ended")
    width = max(len(k) for k in keys)
    lines = [f"{info['host']}:"]
    for k in keys:
        if info.get(k) is not None:
            v = f"{info[k]:,.0f}" if k == "tok_s" else info[k]
            lines.append(f"  {k.ljust(width)}  {v}")
    return "\n".join(lines)


def stop_container(conn, docker: str, name: str, timeout: int = STOP_TIMEOUT, out=sys.stdout) -> None:
    """SIGTERM, so the trainer saves a checkpoint at the end of the current step, then wait for it to exit."""
    out.write(f"stopping {name} on {conn.host} (SIGTERM; the trainer saves a checkpoint, up to {timeout} s)\n")
    res = run(conn, f"{docker} stop -t {int(timeout)} {shlex.quote(name)}", warn=True, timeout=timeout + 60)
    if res.failed:
        raise UserError(f"could not stop {name} on {conn.host}: {' '.join(res.stderr.split())[:200]}")
